//! Augmentation settings: nnU-Net v2's defaults (`nnUNetTrainer.get_training_transforms`),
//! every transform switchable and tunable, stored in the plan.

use serde::{Deserialize, Serialize};

/// A range `[lo, hi]` drawn nnU-Net's "BGContrast" way when it straddles 1: below 1
/// half the time, above 1 the other half (so 0.7–1.5 does not favour > 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub lo: f32,
    pub hi: f32,
}

impl Range {
    pub const fn new(lo: f32, hi: f32) -> Range {
        Range { lo, hi }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpatialConfig {
    pub enabled: bool,
    pub p_rotation: f64,
    /// Maximum rotation about each axis, degrees (drawn uniformly in ±).
    pub rotation_degrees: [f32; 3],
    pub p_scaling: f64,
    /// The same factor on all axes, as nnU-Net: coordinates are divided by it, so
    /// < 1 samples a larger area (structures shrink) and > 1 zooms in.
    pub scaling: Range,
    /// The smallest scale the loader's region accounts for (nnU-Net's `get_patch_size`
    /// uses 0.85); smaller draws sample zeros beyond the region, as in nnU-Net.
    pub region_min_scale: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NoiseConfig {
    pub enabled: bool,
    pub p: f64,
    /// Variance drawn uniformly from this range.
    pub variance: Range,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BlurConfig {
    pub enabled: bool,
    pub p: f64,
    pub p_per_channel: f64,
    /// Sigma in voxels, drawn per axis.
    pub sigma: Range,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FactorConfig {
    pub enabled: bool,
    pub p: f64,
    pub range: Range,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LowResConfig {
    pub enabled: bool,
    pub p: f64,
    pub p_per_channel: f64,
    /// Zoom factor, the same on all axes.
    pub zoom: Range,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MirrorConfig {
    pub enabled: bool,
    pub p_per_axis: f64,
    /// Which of (z, y, x) may be mirrored.
    pub axes: [bool; 3],
}

/// All transforms, in the order they are applied.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    pub spatial: SpatialConfig,
    pub noise: NoiseConfig,
    pub blur: BlurConfig,
    pub brightness: FactorConfig,
    pub contrast: FactorConfig,
    pub low_resolution: LowResConfig,
    pub gamma_inverted: FactorConfig,
    pub gamma: FactorConfig,
    pub mirror: MirrorConfig,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            spatial: SpatialConfig {
                enabled: true,
                p_rotation: 0.2,
                rotation_degrees: [30.0; 3],
                p_scaling: 0.2,
                scaling: Range::new(0.7, 1.4),
                region_min_scale: 0.85,
            },
            noise: NoiseConfig { enabled: true, p: 0.1, variance: Range::new(0.0, 0.1) },
            blur: BlurConfig { enabled: true, p: 0.2, p_per_channel: 0.5, sigma: Range::new(0.5, 1.0) },
            brightness: FactorConfig { enabled: true, p: 0.15, range: Range::new(0.75, 1.25) },
            contrast: FactorConfig { enabled: true, p: 0.15, range: Range::new(0.75, 1.25) },
            low_resolution: LowResConfig { enabled: true, p: 0.25, p_per_channel: 0.5, zoom: Range::new(0.5, 1.0) },
            gamma_inverted: FactorConfig { enabled: true, p: 0.1, range: Range::new(0.7, 1.5) },
            gamma: FactorConfig { enabled: true, p: 0.3, range: Range::new(0.7, 1.5) },
            mirror: MirrorConfig { enabled: true, p_per_axis: 0.5, axes: [true; 3] },
        }
    }
}

impl AugmentConfig {
    /// Everything off: the patch is the centre crop of the region.
    pub fn none() -> AugmentConfig {
        let mut c = AugmentConfig::default();
        c.spatial.enabled = false;
        c.noise.enabled = false;
        c.blur.enabled = false;
        c.brightness.enabled = false;
        c.contrast.enabled = false;
        c.low_resolution.enabled = false;
        c.gamma_inverted.enabled = false;
        c.gamma.enabled = false;
        c.mirror.enabled = false;
        c
    }

    /// The region the loader reads around the patch centre, as nnU-Net's
    /// `get_patch_size`: the vector of patch dimensions rotated about each axis by
    /// that axis's largest angle, the per-axis maximum of the magnitudes, divided by
    /// `region_min_scale`. (Rotations combined over several axes can reach past it;
    /// they sample zeros there, as in nnU-Net.) Without spatial augmentation it is
    /// the patch itself.
    pub fn source_region(&self, patch: [usize; 3]) -> [usize; 3] {
        if !self.spatial.enabled || (self.spatial.p_rotation <= 0.0 && self.spatial.p_scaling <= 0.0) {
            return patch;
        }
        let v: [f64; 3] = std::array::from_fn(|a| patch[a] as f64);
        let mut extent = v;
        if self.spatial.p_rotation > 0.0 {
            for axis in 0..3 {
                // Angles are drawn in ±max: both signs.
                for sign in [1.0, -1.0] {
                    let mut angles = [0.0; 3];
                    angles[axis] = sign * (self.spatial.rotation_degrees[axis] as f64).to_radians();
                    let m = super::spatial::rotation_matrix(angles);
                    for (i, e) in extent.iter_mut().enumerate() {
                        let r: f64 = (0..3).map(|j| m[i][j] * v[j]).sum();
                        *e = e.max(r.abs());
                    }
                }
            }
        }
        let s = if self.spatial.p_scaling > 0.0 { self.spatial.region_min_scale.clamp(0.1, 1.0) as f64 } else { 1.0 };
        std::array::from_fn(|a| ((extent[a] / s) as usize).max(patch[a]))
    }
}
