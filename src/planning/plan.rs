//! `cps3d plan`: nnU-Net v2's default planning heuristics for `3d_fullres` and `2d`,
//! plus the 3D-CPS training settings, as `plans.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::fingerprint::{median, Fingerprint};
use super::topology::{features_per_stage, pool_and_conv_props, NetworkSpec};
use crate::error::{Error, Result};

/// nnU-Net's constants (ExperimentPlanner).
pub const ANISO_THRESHOLD: f64 = 3.0;
const FEATUREMAP_MIN_EDGE: usize = 4;
const REFERENCE_VAL_3D: f64 = 560_000_000.0;
const REFERENCE_VAL_2D: f64 = 85_000_000.0;
const REFERENCE_GB: f64 = 8.0;
const REFERENCE_BS_3D: f64 = 2.0;
const REFERENCE_BS_2D: f64 = 12.0;
const MIN_BATCH: usize = 2;
const MAX_DATASET_COVERED: f64 = 0.05;

/// Intensity normalisation of one channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// "CT" (clip to the percentiles before resampling, then z-score with the dataset
    /// statistics) or "zscore" (z-score with the dataset statistics, no clipping; nnU-Net
    /// z-scores non-CT channels per case instead).
    pub scheme: String,
    pub mean: f64,
    pub std: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    /// "all_voxels" (3D-CPS) or "foreground" (nnU-Net).
    pub statistics: String,
}

impl Normalization {
    /// The clipping nnU-Net's CT scheme applies before resampling (z-scoring is linear,
    /// so it can follow later); other schemes do not clip.
    #[inline]
    pub fn clip(&self, v: f32) -> f32 {
        if self.scheme == "CT" {
            (v as f64).clamp(self.clip_low, self.clip_high) as f32
        } else {
            v
        }
    }

    /// The z-score of an already clipped (and resampled) value.
    #[inline]
    pub fn standardize(&self, v: f32) -> f32 {
        (v as f64 - self.mean) as f32 / self.std.max(1e-8) as f32
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigurationPlan {
    /// Target spacing (z, y, x) for 3D; (y, x) for 2D.
    pub spacing: Vec<f64>,
    pub median_shape_after_resampling: Vec<usize>,
    pub patch_size: Vec<usize>,
    /// Labeled samples per step (nnU-Net's batch size).
    pub batch_size: usize,
    pub batch_dice: bool,
    pub network: NetworkSpec,
    /// Feature-map elements per sample (nnU-Net's memory proxy) and the budget it fits.
    pub feature_map_elements: u64,
    pub feature_map_budget: u64,
    /// Deep-supervision output scales per axis, finest first (1 = full resolution).
    pub deep_supervision_scales: Vec<Vec<f64>>,
    pub resampling: Resampling,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resampling {
    pub image_order: u8,
    pub label: String,
    /// Axes whose spacing is > ANISO_THRESHOLD × the finest are resampled separately
    /// with this order (nnU-Net: 0).
    pub anisotropic_axis_order: u8,
    pub anisotropy_threshold: f64,
}

impl Resampling {
    /// Only nnU-Net's default resampling is implemented; another setting in plans.json
    /// is refused rather than silently ignored.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.image_order != 3 || self.label != "one_hot_linear" || self.anisotropic_axis_order != 0 {
            return Err(format!(
                "resampling {{image_order: {}, label: {:?}, anisotropic_axis_order: {}}}: only nnU-Net's default \
                 (3: cubic B-spline images, \"one_hot_linear\" labels, 0: nearest along the separate axis) is implemented",
                self.image_order, self.label, self.anisotropic_axis_order
            ));
        }
        if self.anisotropy_threshold.is_nan() || self.anisotropy_threshold <= 1.0 {
            return Err(format!("resampling anisotropy_threshold {} must be above 1", self.anisotropy_threshold));
        }
        Ok(())
    }
}

impl Default for Resampling {
    fn default() -> Self {
        Resampling {
            image_order: 3,
            label: "one_hot_linear".into(),
            anisotropic_axis_order: 0,
            anisotropy_threshold: ANISO_THRESHOLD,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LambdaSchedule {
    /// λ rises linearly from 0 to λmax over `ramp_epochs`, then stays (the paper).
    LinearRamp { ramp_epochs: usize },
    /// λ = λmax from the start (the authors' code).
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// lr·(1 − epoch/epochs)^exponent (nnU-Net).
    Poly { exponent: f64 },
    /// Multiply by `factor` when the validation loss has not improved for `patience` epochs (the paper).
    Plateau { factor: f64, patience: usize, min_lr: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    pub kind: String,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

/// How the two sibling networks are trained (paper Table 2, nnU-Net defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpsSettings {
    pub configuration: String,
    pub labeled_batch: usize,
    pub unlabeled_batch: usize,
    pub lambda_max: f64,
    pub lambda_schedule: LambdaSchedule,
    pub optimizer: Optimizer,
    pub lr_schedule: LrSchedule,
    pub epochs: usize,
    pub iterations_per_epoch: usize,
    pub grad_clip_norm: f64,
    pub oversample_foreground: f64,
    pub mixed_precision: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plans {
    pub dataset_name: Option<String>,
    pub dataset_root: std::path::PathBuf,
    pub channels: BTreeMap<usize, String>,
    pub labels: BTreeMap<u8, String>,
    pub num_classes: usize,
    pub normalization: Vec<Normalization>,
    pub original_median_spacing: [f64; 3],
    pub original_median_shape: [f64; 3],
    pub configurations: BTreeMap<String, ConfigurationPlan>,
    pub cps: CpsSettings,
    /// Training augmentation (nnU-Net's defaults; every transform switchable).
    #[serde(default)]
    pub augmentation: cps3d_actors::augment::AugmentConfig,
}

impl Plans {
    pub fn read(path: &Path) -> Result<Plans> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        crate::util::write_json_atomic(path, self)
    }

    pub fn configuration(&self, name: &str) -> Option<&ConfigurationPlan> {
        self.configurations.get(name)
    }

    /// Labeled and unlabeled samples per batch: the CPS settings' for the configuration they
    /// were planned with; another configuration (2D when the plan trains 3D) uses its own
    /// nnU-Net batch size for both (the paper's 2D arm: 12 + 12).
    pub fn batch_sizes(&self, configuration: &str) -> (usize, usize) {
        match self.configuration(configuration) {
            Some(c) if configuration != self.cps.configuration => (c.batch_size, c.batch_size),
            _ => (self.cps.labeled_batch, self.cps.unlabeled_batch),
        }
    }
}

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

/// Environment variable that replaces the memory the machine reports: bytes, or with a
/// K, M, G, T or P suffix (powers of 1000); "off" turns the memory checks off.
pub const MEMORY_ENV: &str = "CPS3D_MAX_MEMORY";

/// Memory a command may plan to use, and where the number comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBudget {
    pub bytes: f64,
    pub source: String,
}

/// `CPS3D_MAX_MEMORY` when set, else MemAvailable of /proc/meminfo lowered to the
/// headroom under the cgroup's memory.max; `None` when checks are off or nothing is known.
pub fn memory_budget() -> std::result::Result<Option<MemoryBudget>, String> {
    if let Some(v) = std::env::var_os(MEMORY_ENV) {
        let v = v.to_string_lossy().trim().to_string();
        if v.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let bytes = parse_bytes(&v)
            .ok_or_else(|| format!("{MEMORY_ENV}={v:?}: expected a size such as 64G, 512M or 1000000, or off"))?;
        return Ok(Some(MemoryBudget { bytes, source: format!("{MEMORY_ENV}={v}") }));
    }
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let kb = t.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
        kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok().map(|kb| kb * 1024.0)
    });
    let cgroup = cgroup_headroom();
    Ok(match (available, cgroup) {
        (Some(a), Some(c)) if c < a => Some(MemoryBudget { bytes: c, source: "cgroup memory.max".into() }),
        (Some(a), _) => Some(MemoryBudget { bytes: a, source: "MemAvailable in /proc/meminfo".into() }),
        (None, Some(c)) => Some(MemoryBudget { bytes: c, source: "cgroup memory.max".into() }),
        (None, None) => None,
    })
}

/// memory.max − memory.current of this process's cgroup (v2), when limited.
fn cgroup_headroom() -> Option<f64> {
    let rel = std::fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string()))?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok()?.trim().parse::<f64>().ok();
    let max = read("memory.max")?; // "max" (no limit) does not parse
    Some((max - read("memory.current").unwrap_or(0.0)).max(0.0))
}

/// "64G", "512M", "1.5T", "1000000" → bytes.
fn parse_bytes(s: &str) -> Option<f64> {
    let s = s.trim_end_matches(['B', 'b']);
    let (num, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, ' '),
    };
    let scale = match unit {
        ' ' => 1.0,
        'K' => 1e3,
        'M' => 1e6,
        'G' => 1e9,
        'T' => 1e12,
        'P' => 1e15,
        _ => return None,
    };
    let v: f64 = num.trim().parse().ok()?;
    (v >= 0.0 && v.is_finite()).then_some(v * scale)
}

/// Bytes in decimal units, e.g. "24.3 GB".
pub fn format_bytes(bytes: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Refuses `need` bytes beyond the memory budget, with the numbers: `what` says what
/// needs them, `hint` what to change.
pub fn check_memory(need: f64, what: &str, hint: &str) -> std::result::Result<(), String> {
    let Some(budget) = memory_budget()? else {
        return Ok(());
    };
    if need <= budget.bytes {
        return Ok(());
    }
    Err(format!(
        "{what} needs about {} of memory, more than the {} available ({}); {hint}, or set {MEMORY_ENV} \
         (e.g. 64G, or off) to override",
        format_bytes(need),
        format_bytes(budget.bytes),
        budget.source
    ))
}

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
    use crate::planning::fingerprint::{CaseFingerprint, ChannelIntensity};
    use crate::planning::intensity::IntensityAccumulator;

    fn fingerprint(cases: &[([f64; 3], [usize; 3])]) -> Fingerprint {
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
    fn memory_sizes_parse_and_print_in_decimal_units() {
        assert_eq!(parse_bytes("64G"), Some(64e9));
        assert_eq!(parse_bytes("1.5TB"), Some(1.5e12));
        assert_eq!(parse_bytes("1000"), Some(1000.0));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1G"), None);
        assert_eq!(format_bytes(1e6), "1.0 MB");
        assert_eq!(format_bytes(8e9), "8.0 GB");
        assert_eq!(format_bytes(512.0), "512 B");
    }

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
