//! FLARE22 scoring: Dice (DSC) and normalised surface distance (NSD) per case and organ, by
//! the official evaluation rules, and the score table in the official script's CSV layout.
//!
//! The rules (see DESIGN.md, "Evaluation"):
//! - arrays in the file's own axis order, spacing from the reference header's pixdim;
//! - both masks empty: DSC 1, NSD 1; only the prediction has the organ: 0, 0;
//! - aorta, IVC and esophagus: both masks cut to the reference's slice range along the third
//!   array axis, `[z_min, z_max)` (the official script leaves out the last slice, so an organ on
//!   a single slice leaves nothing to score and its DSC and NSD are NaN, as there);
//! - DSC < 0.2: NSD 0; otherwise NSD at the organ's tolerance (mm);
//! - both rounded to 4 decimals.

pub mod surface;

use std::path::{Path, PathBuf};

use ndarray::{s, ArrayView3, Zip};
use serde::Serialize;

use crate::dataset::labels::FLARE22_ORGANS;
use crate::error::{Error, Result};
use crate::io::geometry;
use crate::io::nifti::read_labels_file_order;

/// NSD tolerance in mm per organ, in label order 1..=13.
pub const FLARE22_TOLERANCE_MM: [f64; 13] = [5.0, 3.0, 3.0, 5.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 5.0, 7.0, 3.0];

/// Organs scored only on the reference's slice range: aorta, IVC, esophagus.
pub const SLICE_RANGE_ORGANS: [u8; 3] = [5, 6, 10];

/// Below this DSC the NSD counts as 0.
pub const MIN_DSC_FOR_NSD: f64 = 0.2;

/// One organ's scores, rounded to 4 decimals; NaN where the official script gives NaN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OrganScore {
    pub dsc: f64,
    pub nsd: f64,
}

/// Rounds like Python's `round(x, 4)`: to the nearest 4-decimal number, from the exact value.
pub fn round4(x: f64) -> f64 {
    if x.is_finite() {
        format!("{x:.4}").parse().expect("a formatted float parses")
    } else {
        x
    }
}

/// Per-label voxel counts and inclusive bounding boxes of one label map.
struct LabelExtents {
    count: Vec<usize>,
    lo: Vec<[usize; 3]>,
    hi: Vec<[usize; 3]>,
}

impl LabelExtents {
    fn of(labels: ArrayView3<'_, u8>) -> LabelExtents {
        let mut e = LabelExtents { count: vec![0; 256], lo: vec![[usize::MAX; 3]; 256], hi: vec![[0; 3]; 256] };
        for ((i, j, k), &l) in labels.indexed_iter() {
            let l = l as usize;
            e.count[l] += 1;
            if l == 0 {
                continue; // background needs a count only
            }
            for (axis, v) in [i, j, k].into_iter().enumerate() {
                e.lo[l][axis] = e.lo[l][axis].min(v);
                e.hi[l][axis] = e.hi[l][axis].max(v);
            }
        }
        e
    }
}

/// Scores of the 13 FLARE22 organs for one case. `reference` and `prediction` are label maps
/// in the file's axis order with the same shape; `spacing` is the reference's pixdim (mm).
pub fn score_case(reference: ArrayView3<'_, u8>, prediction: ArrayView3<'_, u8>, spacing: [f64; 3]) -> Vec<OrganScore> {
    assert_eq!(reference.shape(), prediction.shape(), "label maps must have the same shape");
    let re = LabelExtents::of(reference);
    let pe = LabelExtents::of(prediction);
    FLARE22_ORGANS
        .iter()
        .zip(FLARE22_TOLERANCE_MM)
        .map(|(&(id, _, _), tolerance)| {
            let l = id as usize;
            match (re.count[l], pe.count[l]) {
                (0, 0) => OrganScore { dsc: 1.0, nsd: 1.0 },
                (0, _) => OrganScore { dsc: 0.0, nsd: 0.0 },
                _ => {
                    // Both masks are zero outside the union of the two boxes.
                    let mut lo = re.lo[l];
                    let mut hi = re.hi[l];
                    if pe.count[l] > 0 {
                        for a in 0..3 {
                            lo[a] = lo[a].min(pe.lo[l][a]);
                            hi[a] = hi[a].max(pe.hi[l][a]);
                        }
                    }
                    let mut end = [hi[0] + 1, hi[1] + 1, hi[2] + 1];
                    if SLICE_RANGE_ORGANS.contains(&id) {
                        lo[2] = re.lo[l][2];
                        end[2] = re.hi[l][2];
                    }
                    let region = s![lo[0]..end[0], lo[1]..end[1], lo[2]..end[2].max(lo[2])];
                    score_organ(reference.slice(region), prediction.slice(region), id, spacing, tolerance)
                }
            }
        })
        .collect()
}

fn score_organ(
    reference: ArrayView3<'_, u8>,
    prediction: ArrayView3<'_, u8>,
    id: u8,
    spacing: [f64; 3],
    tolerance: f64,
) -> OrganScore {
    let gt = reference.map(|&v| v == id);
    let pred = prediction.map(|&v| v == id);
    let (mut both, mut sum) = (0usize, 0usize);
    Zip::from(&gt).and(&pred).for_each(|&g, &p| {
        both += (g && p) as usize;
        sum += g as usize + p as usize;
    });
    let dsc = if sum == 0 { f64::NAN } else { 2.0 * both as f64 / sum as f64 };
    let nsd = if dsc < MIN_DSC_FOR_NSD {
        0.0
    } else {
        surface::SurfaceDistances::compute(gt.view(), pred.view(), spacing).surface_dice(tolerance)
    };
    OrganScore { dsc: round4(dsc), nsd: round4(nsd) }
}

/// One scored case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseScores {
    pub name: String,
    pub organs: Vec<OrganScore>,
}

/// Reads a reference/prediction pair and scores it. Errors name the file at fault.
pub fn score_files(reference: &Path, prediction: &Path) -> Result<(Vec<OrganScore>, Vec<String>)> {
    let (ref_labels, ref_geometry) = read_labels_file_order(reference)?;
    let (pred_labels, pred_geometry) = read_labels_file_order(prediction)?;
    if ref_labels.shape() != pred_labels.shape() {
        return Err(Error::invalid(
            prediction,
            format!(
                "shape {:?} differs from the reference's {:?} ({})",
                pred_labels.shape(),
                ref_labels.shape(),
                reference.display()
            ),
        ));
    }
    let pixdim = ref_geometry.header.pixdim;
    let spacing = [pixdim[1] as f64, pixdim[2] as f64, pixdim[3] as f64];
    if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(Error::invalid(reference, format!("voxel sizes (pixdim) {spacing:?} are not positive")));
    }
    let mut warnings = Vec::new();
    let difference = geometry::max_abs_diff(&ref_geometry.file_affine, &pred_geometry.file_affine);
    if difference > 1e-3 {
        warnings.push(format!(
            "{}: affine differs from the reference's by up to {difference:.3} mm; scored voxel by voxel as the official script does",
            prediction.display()
        ));
    }
    for (path, labels) in [(reference, &ref_labels), (prediction, &pred_labels)] {
        if let Some(&v) = labels.iter().find(|&&v| v > 13) {
            warnings
                .push(format!("{}: label value {v} is not a FLARE22 organ (1..=13) and is not scored", path.display()));
        }
    }
    Ok((score_case(ref_labels.view(), pred_labels.view(), spacing), warnings))
}

/// Scores (name, reference, prediction) pairs on `workers` threads; a failure (or a
/// panic) on one case is reported with its file and the others go on. `on_done` is
/// called after each case. Returns the scores sorted by name and the problems.
pub fn score_pairs(
    jobs: &[(String, std::path::PathBuf, std::path::PathBuf)],
    workers: usize,
    on_done: impl Fn() + Sync,
) -> (Vec<CaseScores>, Vec<String>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, ref_path, pred_path)) = jobs.get(i) else { break };
                // A bug on one case must not take the other cases' scores with it.
                let outcome = std::panic::catch_unwind(|| score_files(ref_path, pred_path)).unwrap_or_else(|_| {
                    Err(Error::invalid(pred_path, "scoring panicked (a bug in cps3d; the other cases go on)"))
                });
                results.lock().unwrap_or_else(|e| e.into_inner()).push((name.clone(), outcome));
                on_done();
            });
        }
    });
    let mut cases = Vec::new();
    let mut problems = Vec::new();
    for (name, outcome) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match outcome {
            Ok((organs, warnings)) => {
                warnings.iter().for_each(|w| tracing::warn!("{w}"));
                cases.push(CaseScores { name, organs });
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    (cases, problems)
}

/// Writes the score table (CSV) and the summary JSON beside it; returns the summary.
pub fn write_scores(cases: &[CaseScores], csv: &Path) -> Result<Summary> {
    let summary = summarize(cases);
    if let Some(dir) = csv.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::util::write_atomic(csv, to_csv(cases).as_bytes())?;
    crate::util::write_json_atomic(&csv.with_extension("summary.json"), &summary)?;
    Ok(summary)
}

/// The CSV header of the official script: Name, 13 × `<organ>_DSC`, 13 × `<organ>_NSD`.
pub fn csv_header() -> String {
    let mut cols = vec!["Name".to_string()];
    cols.extend(FLARE22_ORGANS.iter().map(|(_, _, short)| format!("{short}_DSC")));
    cols.extend(FLARE22_ORGANS.iter().map(|(_, _, short)| format!("{short}_NSD")));
    cols.join(",")
}

fn format_score(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// The score table as CSV text (header and one row per case).
pub fn to_csv(cases: &[CaseScores]) -> String {
    let mut text = csv_header();
    text.push('\n');
    for case in cases {
        let mut row = vec![case.name.clone()];
        row.extend(case.organs.iter().map(|o| format_score(o.dsc)));
        row.extend(case.organs.iter().map(|o| format_score(o.nsd)));
        text.push_str(&row.join(","));
        text.push('\n');
    }
    text
}

/// Mean per organ over cases (NaN scores left out, as pandas does) and the mean over organs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub cases: usize,
    /// (short organ name, mean DSC, mean NSD).
    pub organs: Vec<(String, f64, f64)>,
    pub mean_dsc: f64,
    pub mean_nsd: f64,
}

pub fn summarize(cases: &[CaseScores]) -> Summary {
    let mean = |values: Vec<f64>| {
        let finite: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
        if finite.is_empty() {
            f64::NAN
        } else {
            finite.iter().sum::<f64>() / finite.len() as f64
        }
    };
    let organs: Vec<(String, f64, f64)> = FLARE22_ORGANS
        .iter()
        .enumerate()
        .map(|(o, (_, _, short))| {
            (
                short.to_string(),
                mean(cases.iter().map(|c| c.organs[o].dsc).collect()),
                mean(cases.iter().map(|c| c.organs[o].nsd).collect()),
            )
        })
        .collect();
    Summary {
        cases: cases.len(),
        mean_dsc: mean(organs.iter().map(|o| o.1).collect()),
        mean_nsd: mean(organs.iter().map(|o| o.2).collect()),
        organs,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<12} {:>7} {:>7}", "organ", "DSC", "NSD")?;
        for (name, dsc, nsd) in &self.organs {
            writeln!(f, "{name:<12} {dsc:>7.4} {nsd:>7.4}")?;
        }
        write!(f, "{:<12} {:>7.4} {:>7.4}   ({} cases)", "mean", self.mean_dsc, self.mean_nsd, self.cases)
    }
}

/// Label-map files of a folder (`.nii.gz` or `.nii`), sorted, with their case names.
pub fn label_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let case = name.strip_suffix(".nii.gz").or_else(|| name.strip_suffix(".nii"));
        if let (Some(case), true) = (case, path.is_file()) {
            files.push((case.to_string(), path.clone()));
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn organ(scores: &[OrganScore], id: u8) -> OrganScore {
        scores[id as usize - 1]
    }

    #[test]
    fn rounding_matches_python() {
        assert_eq!(round4(0.91404999), 0.914);
        assert_eq!(round4(0.99995), 1.0); // 0.99995 is stored just above .99995
        assert_eq!(round4(2.0 / 3.0), 0.6667);
        assert!(round4(f64::NAN).is_nan());
    }

    #[test]
    fn empty_organs_follow_the_official_rules() {
        let reference = Array3::<u8>::zeros((10, 10, 10));
        let mut prediction = reference.clone();
        prediction[[4, 4, 4]] = 3;
        let scores = score_case(reference.view(), prediction.view(), [1.0; 3]);
        assert_eq!(organ(&scores, 1), OrganScore { dsc: 1.0, nsd: 1.0 }, "both empty");
        assert_eq!(organ(&scores, 3), OrganScore { dsc: 0.0, nsd: 0.0 }, "only predicted");
        let scores = score_case(prediction.view(), reference.view(), [1.0; 3]);
        assert_eq!(organ(&scores, 3), OrganScore { dsc: 0.0, nsd: 0.0 }, "only in the reference");
    }

    #[test]
    fn low_dice_zeroes_nsd() {
        // Cubes of 10³ overlapping by one slice: DSC 0.1, yet every surfel is within 7 mm.
        let mut reference = Array3::<u8>::zeros((30, 14, 14));
        let mut prediction = reference.clone();
        reference.slice_mut(s![2..12, 2..12, 2..12]).fill(12);
        prediction.slice_mut(s![11..21, 2..12, 2..12]).fill(12);
        let duodenum = organ(&score_case(reference.view(), prediction.view(), [0.5; 3]), 12);
        assert_eq!(duodenum, OrganScore { dsc: 0.1, nsd: 0.0 });
        // Two slices of overlap: DSC 0.2 exactly, so the NSD is computed (all within tolerance).
        prediction.fill(0);
        prediction.slice_mut(s![10..20, 2..12, 2..12]).fill(12);
        let duodenum = organ(&score_case(reference.view(), prediction.view(), [0.5; 3]), 12);
        assert_eq!(duodenum, OrganScore { dsc: 0.2, nsd: 1.0 });
    }

    #[test]
    fn slice_range_organs_leave_out_the_last_reference_slice() {
        let mut reference = Array3::<u8>::zeros((12, 12, 12));
        reference.slice_mut(s![3..8, 3..8, 4..5]).fill(5); // aorta on one slice
        let prediction = reference.clone();
        let aorta = organ(&score_case(reference.view(), prediction.view(), [1.0; 3]), 5);
        assert!(aorta.dsc.is_nan() && aorta.nsd.is_nan(), "single slice: nothing left to score, {aorta:?}");

        // Aorta on slices 4..=6: only 4 and 5 count. A prediction wrong only on slice 6
        // (and beyond the range) is perfect; one wrong on slice 4 is not.
        reference.slice_mut(s![3..8, 3..8, 4..7]).fill(5);
        let mut prediction = reference.clone();
        prediction.slice_mut(s![.., .., 6..]).fill(0);
        prediction.slice_mut(s![0..2, 0..2, 8..12]).fill(5);
        let aorta = organ(&score_case(reference.view(), prediction.view(), [1.0; 3]), 5);
        assert_eq!(aorta, OrganScore { dsc: 1.0, nsd: 1.0 });
        prediction.slice_mut(s![.., .., 4..5]).fill(0);
        let aorta = organ(&score_case(reference.view(), prediction.view(), [1.0; 3]), 5);
        assert_eq!(aorta.dsc, round4(2.0 * 25.0 / 75.0));
        // Organs outside the rule are scored on every slice.
        let mut liver_ref = reference.mapv(|v| if v == 5 { 1 } else { 0 });
        let liver_pred = liver_ref.clone();
        liver_ref.slice_mut(s![.., .., 6..7]).fill(0);
        let liver = organ(&score_case(liver_ref.view(), liver_pred.view(), [1.0; 3]), 1);
        assert_eq!(liver.dsc, round4(2.0 * 50.0 / 125.0));
    }

    #[test]
    fn spacing_follows_the_array_axes() {
        // Prediction = reference shifted by one voxel along one axis; 3 mm along that axis is
        // beyond the 2 mm aorta tolerance, 1 mm is within it.
        let mut reference = Array3::<u8>::zeros((16, 16, 16));
        reference.slice_mut(s![4..10, 4..10, 4..10]).fill(7);
        for axis in 0..3 {
            let mut prediction = Array3::<u8>::zeros((16, 16, 16));
            let mut r = [4..10, 4..10, 4..10];
            r[axis] = 5..11;
            prediction.slice_mut(s![r[0].clone(), r[1].clone(), r[2].clone()]).fill(7);
            let mut spacing = [1.0; 3];
            let near = organ(&score_case(reference.view(), prediction.view(), spacing), 7);
            assert_eq!(near.nsd, 1.0, "axis {axis}, 1 mm shift");
            spacing[axis] = 3.0;
            let far = organ(&score_case(reference.view(), prediction.view(), spacing), 7);
            assert!(far.nsd < 0.95, "axis {axis}, 3 mm shift: {far:?}");
            assert_eq!(far.dsc, near.dsc, "DSC does not depend on spacing");
            spacing[axis] = 1.0;
            spacing[(axis + 1) % 3] = 3.0;
            let across = organ(&score_case(reference.view(), prediction.view(), spacing), 7);
            assert_eq!(across.nsd, 1.0, "axis {axis}: coarse spacing across the shift does not matter");
        }
    }

    #[test]
    fn csv_has_the_official_columns() {
        let header = csv_header();
        assert!(header.starts_with("Name,Liver_DSC,RK_DSC,Spleen_DSC,"));
        assert!(header.ends_with("Duodenum_NSD,LK_NSD"));
        assert_eq!(header.split(',').count(), 27);
        let case = CaseScores { name: "a".into(), organs: vec![OrganScore { dsc: 0.914, nsd: f64::NAN }; 13] };
        let row = to_csv(&[case]).lines().nth(1).unwrap().to_string();
        assert!(row.starts_with("a,0.914,") && row.ends_with(",NaN"), "{row}");
    }
}
