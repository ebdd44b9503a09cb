//! `plans.json`: what `cps3d plan` writes and every later stage reads — per configuration
//! (`3d_fullres`, `2d`) the spacing, patch, batch and network, the normalisation of each
//! channel, and the 3D-CPS training settings.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::topology::NetworkSpec;
use crate::error::{Error, Result};

/// nnU-Net's anisotropy threshold: an axis whose spacing is more than this many times
/// the others' is treated apart (target spacing, resampling).
pub const ANISO_THRESHOLD: f64 = 3.0;

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
