//! `cps3d plan`: nnU-Net v2's planning heuristics (its ExperimentPlanner) for `3d_fullres`
//! and `2d` — target spacing, patch and network topology within the reference memory,
//! batch size, normalisation — and the 3D-CPS settings on top, filling [`Plans`].

use std::collections::BTreeMap;

use super::fingerprint::{median, Fingerprint};
use super::topology::{features_per_stage, pool_and_conv_props, NetworkSpec};
use crate::error::{Error, Result};

// The plan's types, where its callers have always found them.
pub use super::plans::{
    ConfigurationPlan, CpsSettings, LambdaSchedule, LrSchedule, Normalization, Optimizer, Plans, Resampling,
    ANISO_THRESHOLD,
};

/// What the user may override.
#[derive(Debug, Clone, Default)]
pub struct PlanOverrides {
    pub target_spacing: Option<[f64; 3]>,
    pub patch_size_3d: Option<[usize; 3]>,
    pub patch_size_2d: Option<[usize; 2]>,
    pub features_3d: Option<Vec<usize>>,
    pub features_2d: Option<Vec<usize>>,
    pub base_features: Option<usize>,
    pub max_features_3d: Option<usize>,
    /// nnU-Net v2: 512; v1 (the paper's 2D network): 480.
    pub max_features_2d: Option<usize>,
    pub gpu_memory_gb: Option<f64>,
    /// Use the foreground statistics (nnU-Net) instead of all voxels (3D-CPS).
    pub foreground_statistics: bool,
    pub epochs: Option<usize>,
    pub iterations_per_epoch: Option<usize>,
    /// SGD's initial learning rate and momentum (nnU-Net: 0.01, 0.99).
    pub lr: Option<f64>,
    pub momentum: Option<f64>,
    /// Share of each batch's labeled samples centred on a voxel of a random class
    /// (nnU-Net: 0.33).
    pub oversample_foreground: Option<f64>,
    pub lambda_ramp_epochs: Option<usize>,
    pub constant_lambda: bool,
    pub plateau_lr: bool,
    /// Train without augmentation (ablations, data-path benchmarks).
    pub no_augmentation: bool,
    /// Labeled samples per step of the trained configuration, instead of nnU-Net's rule
    /// (at least 2: nnU-Net's foreground oversampling forces the last third of a batch).
    pub batch_size: Option<usize>,
    /// Unlabeled samples per step (default: as many as labeled, the paper's 2 + 2).
    pub unlabeled_batch: Option<usize>,
}

/// nnU-Net's constants (ExperimentPlanner).
const FEATUREMAP_MIN_EDGE: usize = 4;
const REFERENCE_VAL_3D: f64 = 560_000_000.0;
const REFERENCE_VAL_2D: f64 = 85_000_000.0;
const REFERENCE_GB: f64 = 8.0;
const REFERENCE_BS_3D: f64 = 2.0;
const REFERENCE_BS_2D: f64 = 12.0;
const MIN_BATCH: usize = 2;
const MAX_DATASET_COVERED: f64 = 0.05;

/// Median spacing, except that a very coarse axis of a dataset with few voxels
/// along it takes the 10th percentile (nnU-Net's anisotropy rule).
pub fn target_spacing(fp: &Fingerprint) -> [f64; 3] {
    let labeled: Vec<_> = fp.labeled_cases().collect();
    let mut target = fp.median_spacing;
    let sizes = fp.median_shape_after_crop;
    let worst = (0..3).max_by(|&a, &b| target[a].total_cmp(&target[b])).unwrap_or(0);
    let others: Vec<usize> = (0..3).filter(|&i| i != worst).collect();
    let max_other_spacing = others.iter().map(|&i| target[i]).fold(f64::MIN, f64::max);
    let min_other_size = others.iter().map(|&i| sizes[i]).fold(f64::MAX, f64::min);
    let aniso_spacing = target[worst] > ANISO_THRESHOLD * max_other_spacing;
    let aniso_voxels = sizes[worst] * ANISO_THRESHOLD < min_other_size;
    if aniso_spacing && aniso_voxels {
        let mut axis: Vec<f64> = labeled.iter().map(|c| c.spacing[worst]).collect();
        axis.sort_by(f64::total_cmp);
        let mut t = percentile(&axis, 10.0);
        if t < max_other_spacing {
            t = max_other_spacing.max(t) + 1e-5;
        }
        target[worst] = t;
    }
    target
}

/// numpy.percentile (linear) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let pos = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Shape after resampling from `spacing` to `target` (nnU-Net's `compute_new_shape`).
pub fn resampled_shape(shape: &[usize], spacing: &[f64], target: &[f64]) -> Vec<usize> {
    // nnU-Net's compute_new_shape: spacing ratio times the size, Python's rounding.
    shape
        .iter()
        .zip(spacing)
        .zip(target)
        .map(|((&n, &s), &t)| ((s / t * n as f64).round_ties_even() as usize).max(1))
        .collect()
}

struct ConfigInputs<'a> {
    spacing: Vec<f64>,
    median_shape: Vec<f64>,
    n_voxels_dataset: f64,
    input_channels: usize,
    num_classes: usize,
    patch_override: Option<Vec<usize>>,
    features_override: Option<&'a Vec<usize>>,
    base_features: usize,
    max_features: usize,
    gpu_memory_gb: f64,
}

fn make_network(inp: &ConfigInputs<'_>, strides: Vec<Vec<usize>>, kernels: Vec<Vec<usize>>) -> Result<NetworkSpec> {
    let n = strides.len();
    let features = match inp.features_override {
        Some(f) if f.len() != n => {
            return Err(Error::invalid(
                "plans",
                format!("--features lists {} stages but this patch and spacing give {n} stages", f.len()),
            ))
        }
        Some(f) => f.clone(),
        None => features_per_stage(n, inp.base_features, inp.max_features),
    };
    Ok(NetworkSpec::plain(inp.spacing.len(), inp.input_channels, inp.num_classes, features, kernels, strides))
}

fn plan_configuration(inp: ConfigInputs<'_>) -> Result<ConfigurationPlan> {
    let dim = inp.spacing.len();
    let reference = if dim == 3 { REFERENCE_VAL_3D } else { REFERENCE_VAL_2D } * inp.gpu_memory_gb / REFERENCE_GB;
    let ref_bs = if dim == 3 { REFERENCE_BS_3D } else { REFERENCE_BS_2D };
    let fixed_patch = inp.patch_override.is_some();
    let initial: Vec<usize> = match &inp.patch_override {
        Some(p) => p.clone(),
        None => {
            // A patch of 256³ (2048² in 2D) voxels with isotropic physical proportions,
            // no larger than the median image.
            let inv: Vec<f64> = inp.spacing.iter().map(|s| 1.0 / s).collect();
            let vol: f64 = inv.iter().product();
            let edge: f64 = if dim == 3 { 256f64.powi(3) } else { 2048f64.powi(2) };
            let scale = (edge / vol).powf(1.0 / dim as f64);
            inv.iter()
                .zip(&inp.median_shape)
                .map(|(&i, &m)| ((i * scale).round()).min(m.round()).max(1.0) as usize)
                .collect()
        }
    };
    let mut topo = pool_and_conv_props(&inp.spacing, &initial, FEATUREMAP_MIN_EDGE, 999_999);
    let mut net = make_network(&inp, topo.strides.clone(), topo.kernels.clone())?;
    let mut estimate = net.feature_map_elements(&topo.patch) as f64;
    if !fixed_patch {
        // Shrink the axis that is largest relative to the median image until it fits.
        while estimate / ref_bs * 2.0 > reference {
            let axis = (0..dim)
                .max_by(|&a, &b| {
                    (topo.patch[a] as f64 / inp.median_shape[a])
                        .total_cmp(&(topo.patch[b] as f64 / inp.median_shape[b]))
                })
                .unwrap_or(0);
            let mut trial = topo.patch.clone();
            trial[axis] = trial[axis].saturating_sub(topo.divisible_by[axis]).max(1);
            let div = pool_and_conv_props(&inp.spacing, &trial, FEATUREMAP_MIN_EDGE, 999_999).divisible_by;
            let mut patch = topo.patch.clone();
            patch[axis] = patch[axis].saturating_sub(div[axis]).max(1);
            topo = pool_and_conv_props(&inp.spacing, &patch, FEATUREMAP_MIN_EDGE, 999_999);
            net = make_network(&inp, topo.strides.clone(), topo.kernels.clone())?;
            estimate = net.feature_map_elements(&topo.patch) as f64;
            if topo.patch.iter().all(|&p| p <= 8) {
                break;
            }
        }
    }
    let bs = (reference / estimate * ref_bs).round();
    let patch_voxels: f64 = topo.patch.iter().map(|&p| p as f64).product();
    let bs_5_percent = (inp.n_voxels_dataset * MAX_DATASET_COVERED / patch_voxels).round();
    let batch_size = (bs.min(bs_5_percent).max(MIN_BATCH as f64)) as usize;
    // Deep-supervision scales: cumulative product of strides, inverted, finest first.
    let mut scales = Vec::new();
    let mut cum = vec![1usize; dim];
    for s in &net.strides[..net.strides.len() - 1] {
        for d in 0..dim {
            cum[d] *= s[d];
        }
        scales.push(cum.iter().map(|&c| 1.0 / c as f64).collect());
    }
    Ok(ConfigurationPlan {
        spacing: inp.spacing.clone(),
        median_shape_after_resampling: inp.median_shape.iter().map(|&m| m.round() as usize).collect(),
        patch_size: topo.patch.clone(),
        batch_size,
        batch_dice: true,
        network: net,
        feature_map_elements: estimate as u64,
        feature_map_budget: reference as u64,
        deep_supervision_scales: scales,
        resampling: Resampling::default(),
    })
}

/// nnU-Net's channel-name rule: "CT" gets CT normalisation, anything else z-score.
fn normalization_for(fp: &Fingerprint, overrides: &PlanOverrides) -> Vec<Normalization> {
    fp.intensity
        .iter()
        .map(|ch| {
            let stats = if overrides.foreground_statistics { &ch.foreground } else { &ch.all_voxels };
            let is_ct = ch.name.eq_ignore_ascii_case("ct");
            Normalization {
                scheme: if is_ct { "CT".into() } else { "zscore".into() },
                mean: stats.mean,
                std: stats.std,
                clip_low: stats.percentile_00_5,
                clip_high: stats.percentile_99_5,
                statistics: if overrides.foreground_statistics { "foreground".into() } else { "all_voxels".into() },
            }
        })
        .collect()
}

pub fn plan(fp: &Fingerprint, overrides: &PlanOverrides) -> Result<Plans> {
    let spacing = overrides.target_spacing.unwrap_or_else(|| target_spacing(fp));
    if spacing.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
        return Err(Error::invalid("plans", format!("target spacing {spacing:?} must be positive")));
    }
    let new_shapes: Vec<Vec<usize>> =
        fp.labeled_cases().map(|c| resampled_shape(&c.shape_after_crop, &c.spacing, &spacing)).collect();
    let median_shape: Vec<f64> =
        (0..3).map(|a| median(&mut new_shapes.iter().map(|s| s[a] as f64).collect::<Vec<_>>())).collect();
    let n_voxels_dataset = median_shape.iter().product::<f64>() * fp.num_labeled as f64;
    let num_classes = fp.labels.keys().next_back().map(|&m| m as usize + 1).unwrap_or(2);
    let input_channels = fp.channels.len();
    let base = overrides.base_features.unwrap_or(32);
    // min(base·2^stage, max) with base above max is a flat network of max everywhere.
    let derived = [
        ("--max-features", overrides.max_features_3d.unwrap_or(320), overrides.features_3d.is_none()),
        ("--max-features-2d", overrides.max_features_2d.unwrap_or(512), overrides.features_2d.is_none()),
    ];
    for (flag, max, from_base) in derived {
        if from_base && base > max {
            let default = if overrides.base_features.is_none() { " (the default)" } else { "" };
            return Err(Error::invalid(
                "--base-features",
                format!("{base}{default} is above {flag} {max}: every stage would have {max} features; lower one or raise the other"),
            ));
        }
    }
    let gpu = overrides.gpu_memory_gb.unwrap_or(8.0);
    let mut configurations = BTreeMap::new();
    if median_shape[0] > 1.0 {
        let c3 = plan_configuration(ConfigInputs {
            spacing: spacing.to_vec(),
            median_shape: median_shape.clone(),
            n_voxels_dataset,
            input_channels,
            num_classes,
            patch_override: overrides.patch_size_3d.map(|p| p.to_vec()),
            features_override: overrides.features_3d.as_ref(),
            base_features: base,
            max_features: overrides.max_features_3d.unwrap_or(320),
            gpu_memory_gb: gpu,
        })?;
        configurations.insert("3d_fullres".to_string(), c3);
    }
    let c2 = plan_configuration(ConfigInputs {
        spacing: spacing[1..].to_vec(),
        median_shape: median_shape[1..].to_vec(),
        n_voxels_dataset,
        input_channels,
        num_classes,
        patch_override: overrides.patch_size_2d.map(|p| p.to_vec()),
        features_override: overrides.features_2d.as_ref(),
        base_features: base,
        max_features: overrides.max_features_2d.unwrap_or(512),
        gpu_memory_gb: gpu,
    })?;
    configurations.insert("2d".to_string(), c2);
    for (name, c) in &configurations {
        c.network.check(&c.patch_size).map_err(|e| Error::invalid("plans", format!("{name}: {e}")))?;
    }
    let main = if configurations.contains_key("3d_fullres") { "3d_fullres" } else { "2d" };
    if let Some(b) = overrides.batch_size {
        if b < MIN_BATCH {
            return Err(Error::invalid("--batch-size", format!("{b}: at least {MIN_BATCH} labeled samples per step")));
        }
        configurations.get_mut(main).expect("present").batch_size = b;
    }
    let batch = configurations[main].batch_size;
    let epochs = overrides.epochs.unwrap_or(1000);
    let cps = CpsSettings {
        configuration: main.to_string(),
        labeled_batch: batch,
        unlabeled_batch: overrides.unlabeled_batch.unwrap_or(batch),
        lambda_max: 0.5,
        lambda_schedule: if overrides.constant_lambda {
            LambdaSchedule::Constant
        } else {
            // The paper ramps "until a specific epoch" without naming it: a tenth of training.
            LambdaSchedule::LinearRamp { ramp_epochs: overrides.lambda_ramp_epochs.unwrap_or((epochs / 10).max(1)) }
        },
        optimizer: Optimizer {
            kind: "sgd".into(),
            lr: overrides.lr.unwrap_or(0.01),
            momentum: overrides.momentum.unwrap_or(0.99),
            nesterov: true,
            weight_decay: 3e-5,
        },
        lr_schedule: if overrides.plateau_lr {
            LrSchedule::Plateau { factor: 0.5, patience: 30, min_lr: 1e-6 }
        } else {
            LrSchedule::Poly { exponent: 0.9 }
        },
        epochs,
        iterations_per_epoch: overrides.iterations_per_epoch.unwrap_or(250),
        grad_clip_norm: 12.0,
        oversample_foreground: overrides.oversample_foreground.unwrap_or(0.33),
        mixed_precision: true,
    };
    let mut original_shape = fp.median_shape_after_crop;
    for s in original_shape.iter_mut() {
        *s = s.round();
    }
    Ok(Plans {
        dataset_name: fp.dataset_name.clone(),
        dataset_root: fp.dataset_root.clone(),
        channels: fp.channels.clone(),
        labels: fp.labels.clone(),
        num_classes,
        normalization: normalization_for(fp, overrides),
        original_median_spacing: fp.median_spacing,
        original_median_shape: original_shape,
        configurations,
        cps,
        augmentation: if overrides.no_augmentation {
            cps3d_actors::augment::AugmentConfig::none()
        } else {
            cps3d_actors::augment::AugmentConfig::default()
        },
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::planning::fingerprint::{CaseFingerprint, ChannelIntensity};
    use crate::planning::intensity::IntensityAccumulator;

    pub(crate) fn fingerprint(cases: &[([f64; 3], [usize; 3])]) -> Fingerprint {
        let cases: Vec<CaseFingerprint> = cases
            .iter()
            .enumerate()
            .map(|(i, &(spacing, shape))| CaseFingerprint {
                id: format!("c{i}"),
                labeled: true,
                spacing,
                shape,
                nonzero_box: [[0, shape[0]], [0, shape[1]], [0, shape[2]]],
                shape_after_crop: shape,
                axis_codes: "RAS".into(),
            })
            .collect();
        let med = |f: &dyn Fn(&CaseFingerprint) -> f64| median(&mut cases.iter().map(f).collect::<Vec<_>>());
        let mut acc = IntensityAccumulator::default();
        acc.add_slice(&[-1000.0, 0.0, 40.0, 100.0]);
        let labels = (0..14u8).map(|i| (i, format!("l{i}"))).collect();
        Fingerprint {
            dataset_root: "x".into(),
            dataset_name: None,
            channels: [(0, "CT".to_string())].into_iter().collect(),
            labels,
            file_ending: ".nii.gz".into(),
            num_labeled: cases.len(),
            num_unlabeled: 0,
            median_spacing: [0, 1, 2].map(|a| med(&|c| c.spacing[a])),
            median_shape_after_crop: [0, 1, 2].map(|a| med(&|c| c.shape_after_crop[a] as f64)),
            median_relative_size_after_crop: 1.0,
            cases,
            intensity: vec![ChannelIntensity { name: "CT".into(), all_voxels: acc.stats(), foreground: acc.stats() }],
            failed_cases: vec![],
        }
    }

    #[test]
    fn isotropic_patch_pools_every_axis_down_to_4() {
        let fp = fingerprint(&[([1.0; 3], [200, 200, 200]); 10]);
        let o = PlanOverrides { patch_size_3d: Some([128, 128, 128]), ..Default::default() };
        let c = &plan(&fp, &o).unwrap().configurations["3d_fullres"];
        assert_eq!(c.patch_size, vec![128, 128, 128]);
        let mut strides = vec![vec![1, 1, 1]];
        strides.extend(std::iter::repeat_n(vec![2, 2, 2], 5));
        assert_eq!(c.network.strides, strides);
        assert_eq!(c.network.features_per_stage, vec![32, 64, 128, 256, 320, 320]);
        assert!(c.network.kernel_sizes.iter().all(|k| k == &vec![3, 3, 3]));
        assert_eq!(c.deep_supervision_scales[0], vec![1.0, 1.0, 1.0]);
        assert_eq!(c.deep_supervision_scales[1], vec![0.5, 0.5, 0.5]);
    }

    #[test]
    fn five_mm_slices_pool_in_plane_first() {
        let fp = fingerprint(&[([5.0, 0.8, 0.8], [40, 512, 512]); 10]);
        let o = PlanOverrides { patch_size_3d: Some([40, 224, 224]), ..Default::default() };
        let c = &plan(&fp, &o).unwrap().configurations["3d_fullres"];
        // Worked out by hand from the rules (see topology.rs).
        assert_eq!(
            c.network.strides,
            vec![vec![1, 1, 1], vec![1, 2, 2], vec![1, 2, 2], vec![2, 2, 2], vec![2, 2, 2], vec![2, 2, 2]]
        );
        assert_eq!(
            c.network.kernel_sizes,
            vec![vec![1, 3, 3], vec![1, 3, 3], vec![3, 3, 3], vec![3, 3, 3], vec![3, 3, 3], vec![3, 3, 3]]
        );
        assert_eq!(c.patch_size, vec![40, 224, 224]);
    }

    #[test]
    fn tiny_images_get_few_stages_and_the_minimum_batch() {
        let fp = fingerprint(&[([1.0; 3], [10, 20, 20]); 10]);
        let p = plan(&fp, &PlanOverrides::default()).unwrap();
        let c = &p.configurations["3d_fullres"];
        assert_eq!(c.patch_size, vec![10, 20, 20]);
        assert_eq!(c.network.strides, vec![vec![1, 1, 1], vec![2, 2, 2], vec![1, 2, 2]]);
        // 5% of 10 cases of 4000 voxels is half a patch: the floor of 2 applies.
        assert_eq!(c.batch_size, 2);
        assert_eq!(p.cps.labeled_batch, 2);
        assert_eq!(p.cps.unlabeled_batch, 2);
    }

    #[test]
    fn the_batch_can_be_set_and_the_unlabeled_share_apart() {
        let fp = fingerprint(&[([1.0; 3], [10, 20, 20]); 10]);
        let o = PlanOverrides { batch_size: Some(3), unlabeled_batch: Some(1), ..Default::default() };
        let p = plan(&fp, &o).unwrap();
        assert_eq!(p.configurations["3d_fullres"].batch_size, 3);
        assert_eq!((p.cps.labeled_batch, p.cps.unlabeled_batch), (3, 1));
        let e = plan(&fp, &PlanOverrides { batch_size: Some(1), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("--batch-size") && e.contains("at least 2"), "{e}");
    }

    #[test]
    fn very_large_images_shrink_the_patch_until_it_fits() {
        let fp = fingerprint(&[([1.0, 0.8, 0.8], [500, 512, 512]); 50]);
        let c = &plan(&fp, &PlanOverrides::default()).unwrap().configurations["3d_fullres"];
        // The initial 256³-voxel patch (221×276×276) does not fit 8 GB.
        assert!(
            c.feature_map_elements <= c.feature_map_budget,
            "{} > {}",
            c.feature_map_elements,
            c.feature_map_budget
        );
        let voxels: usize = c.patch_size.iter().product();
        assert!(voxels < 221 * 276 * 276, "{:?}", c.patch_size);
        for (p, s) in c.patch_size.iter().zip(&c.deep_supervision_scales[c.deep_supervision_scales.len() - 1]) {
            assert_eq!((*p as f64 * s).fract(), 0.0, "patch divisible by the total stride");
        }
        assert_eq!(c.batch_size, 2);
        // A larger GPU allows a larger patch.
        let big = plan(&fp, &PlanOverrides { gpu_memory_gb: Some(40.0), ..Default::default() }).unwrap();
        let big_voxels: usize = big.configurations["3d_fullres"].patch_size.iter().product();
        assert!(big_voxels > voxels);
    }

    #[test]
    fn anisotropic_datasets_take_the_10th_percentile_slice_spacing() {
        let mut cases = vec![([5.0, 0.8, 0.8], [60, 512, 512]); 8];
        cases.push(([1.0, 0.8, 0.8], [300, 512, 512]));
        cases.push(([2.0, 0.8, 0.8], [150, 512, 512]));
        let t = target_spacing(&fingerprint(&cases));
        // sorted z spacings 1, 2, 5, ...: numpy percentile 10 = 1 + 0.9·(2 − 1).
        assert!((t[0] - 1.9).abs() < 1e-9, "{t:?}");
        assert_eq!([t[1], t[2]], [0.8, 0.8]);
        // Isotropic data keeps the median.
        assert_eq!(target_spacing(&fingerprint(&[([1.5, 0.8, 0.8], [200, 300, 300]); 5])), [1.5, 0.8, 0.8]);
    }

    #[test]
    fn paper_networks_come_out_at_their_parameter_counts() {
        let fp = fingerprint(&[([1.0; 3], [300, 512, 512]); 50]);
        let o = PlanOverrides {
            patch_size_3d: Some([112, 160, 128]),
            patch_size_2d: Some([512, 512]),
            max_features_2d: Some(480),
            ..Default::default()
        };
        let p = plan(&fp, &o).unwrap();
        assert_eq!(p.num_classes, 14);
        assert_eq!(p.configurations["3d_fullres"].network.parameter_count, 30_795_654);
        assert_eq!(p.configurations["2d"].network.parameter_count, 41_287_490);
        assert_eq!(p.configurations["2d"].network.features_per_stage, vec![32, 64, 128, 256, 480, 480, 480, 480]);
    }

    #[test]
    fn feature_override_must_match_the_stage_count() {
        let fp = fingerprint(&[([1.0; 3], [200, 200, 200]); 10]);
        let bad =
            PlanOverrides { patch_size_3d: Some([64, 64, 64]), features_3d: Some(vec![8, 16]), ..Default::default() };
        let e = plan(&fp, &bad).unwrap_err().to_string();
        assert!(e.contains("--features lists 2 stages"), "{e}");
        let good = PlanOverrides {
            patch_size_3d: Some([32, 48, 48]),
            features_3d: Some(vec![8, 16, 32, 64]),
            ..Default::default()
        };
        let c = &plan(&fp, &good).unwrap().configurations["3d_fullres"];
        assert_eq!(c.network.features_per_stage, vec![8, 16, 32, 64]);
    }

    #[test]
    fn only_the_implemented_resampling_is_accepted() {
        let mut r = Resampling::default();
        assert!(r.check().is_ok());
        r.image_order = 1;
        let e = r.check().unwrap_err();
        assert!(e.contains("image_order: 1") && e.contains("B-spline"), "{e}");
        let r = Resampling { anisotropy_threshold: 0.5, ..Default::default() };
        assert!(r.check().is_err());
    }

    #[test]
    fn normalization_uses_all_voxels_unless_told_otherwise() {
        let fp = fingerprint(&[([1.0; 3], [50, 50, 50]); 3]);
        let p = plan(&fp, &PlanOverrides::default()).unwrap();
        assert_eq!(p.normalization[0].scheme, "CT");
        assert_eq!(p.normalization[0].statistics, "all_voxels");
        let n = &p.normalization[0];
        assert!((n.standardize(n.clip(5000.0)) - ((n.clip_high - n.mean) / n.std) as f32).abs() < 1e-5);
    }
}
