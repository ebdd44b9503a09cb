//! The memory preprocessing needs per case at a plan's spacing, checked before a run
//! starts instead of failing mid-way on an allocation.

use super::fingerprint::Fingerprint;
use super::plans::Plans;
use crate::memory::{check_memory, format_bytes, memory_budget};

/// Peak bytes of preprocessing one case of `raw` voxels (before cropping) resampled to
/// `new` voxels: float32 channels and uint8 labels as read, then per channel the
/// float32 output and about as much again in the separable resampling's intermediates,
/// and the resampled labels (measured: 0.36 GB for 6.5 → 42 Mvoxels; this says 0.41).
pub fn preprocess_case_bytes(channels: usize, raw: f64, new: f64) -> f64 {
    let c = channels as f64;
    raw * (4.0 * c + 1.0) + new * (8.0 * c + 1.0)
}

/// Refuses to preprocess with `workers` cases in memory at a time when that cannot
/// fit: the largest cases of `fingerprint` when given, else the plan's median case.
/// `preprocess_case` would otherwise abort the whole run allocating.
pub fn check_preprocess_memory(
    plans: &Plans,
    configuration: &str,
    fingerprint: Option<&Fingerprint>,
    workers: usize,
) -> std::result::Result<(), String> {
    let conf =
        plans.configuration(configuration).ok_or_else(|| format!("the plan has no configuration {configuration}"))?;
    let channels = plans.channels.len().max(1);
    let voxels = |s: &[f64]| s.iter().product::<f64>();
    // A 2D configuration keeps each case's slice spacing.
    let target = |case_spacing: [f64; 3]| -> Vec<f64> {
        match conf.spacing.len() {
            2 => vec![case_spacing[0], conf.spacing[0], conf.spacing[1]],
            _ => conf.spacing.clone(),
        }
    };
    // (bytes, description), largest first.
    let mut cases: Vec<(f64, String)> = match fingerprint {
        Some(fp) if !fp.cases.is_empty() => fp
            .cases
            .iter()
            .map(|c| {
                let raw: Vec<f64> = c.shape.iter().map(|&n| n as f64).collect();
                let new: Vec<f64> = c
                    .shape_after_crop
                    .iter()
                    .zip(c.spacing)
                    .zip(target(c.spacing))
                    .map(|((&n, s), t)| (s / t * n as f64).round().max(1.0))
                    .collect();
                let bytes = preprocess_case_bytes(channels, voxels(&raw), voxels(&new));
                (bytes, format!("the largest case, {}: {:.0?} → {:.0?} voxels", c.id, raw, new))
            })
            .collect(),
        _ => {
            let raw = plans.original_median_shape.to_vec();
            let mut new: Vec<f64> = conf.median_shape_after_resampling.iter().map(|&n| n as f64).collect();
            if new.len() == 2 {
                new.insert(0, raw[0]);
            }
            let bytes = preprocess_case_bytes(channels, voxels(&raw), voxels(&new));
            vec![(bytes, format!("the median case: {raw:.0?} → {new:.0?} voxels"))]
        }
    };
    cases.sort_by(|a, b| b.0.total_cmp(&a.0));
    let at_once = workers.max(1).min(match fingerprint {
        Some(fp) if !fp.cases.is_empty() => cases.len(),
        _ => workers.max(1),
    });
    let need: f64 = (0..at_once).map(|i| cases[i.min(cases.len() - 1)].0).sum();
    let (largest, about) = &cases[0];
    let what = format!(
        "preprocessing {at_once} case(s) at a time at spacing {:.3?} mm ({about}, {} each)",
        conf.spacing,
        format_bytes(*largest)
    );
    let fits_one = memory_budget()?.is_none_or(|b| *largest <= b.bytes);
    let hint = if at_once > 1 && fits_one {
        "use fewer workers (-j) or plan a coarser --target-spacing"
    } else {
        "plan a coarser --target-spacing"
    };
    check_memory(need, &what, hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planning::plan::tests::fingerprint;
    use crate::planning::plan::{plan, PlanOverrides};

    #[test]
    fn preprocessing_memory_follows_the_planned_median_case() {
        let fp = fingerprint(&[([1.0; 3], [100, 200, 200]); 3]);
        let p = plan(&fp, &PlanOverrides::default()).unwrap();
        // 4 Mvoxels in and out: 4M·5 + 4M·9 bytes.
        assert_eq!(preprocess_case_bytes(1, 4e6, 4e6), 56e6);
        let fine = plan(&fp, &PlanOverrides { target_spacing: Some([0.001; 3]), ..Default::default() }).unwrap();
        // 10⁶ times the voxels: refused on any machine, with the numbers.
        if memory_budget().unwrap().is_some() {
            let e = check_preprocess_memory(&fine, "3d_fullres", None, 1).unwrap_err();
            assert!(e.contains("PB of memory") && e.contains("--target-spacing"), "{e}");
        }
        // With the fingerprint, the largest case decides.
        assert!(check_preprocess_memory(&p, "3d_fullres", Some(&fp), 2).is_ok());
    }
}
