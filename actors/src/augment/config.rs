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
    /// The same factor on all axes, drawn uniformly, as batchgeneratorsv2's
    /// `SpatialTransform`: patch coordinates are multiplied by it, so > 1 samples a
    /// larger area (structures shrink) and < 1 zooms in.
    pub scaling: Range,
    /// The smallest scale the loader's region accounts for (nnU-Net's `get_patch_size`
    /// uses 0.85); draws reaching past the region sample padding, as in nnU-Net.
    pub region_min_scale: f32,
    /// In-plane rotation range (±degrees, about z) when the patch is so anisotropic
    /// that nnU-Net augments in 2D (`do_dummy_2d_data_aug`: largest edge > 3 × z edge).
    #[serde(default = "default_dummy_2d_rotation")]
    pub dummy_2d_rotation_degrees: f32,
    /// In-plane rotation range (±degrees) of a 2D configuration's patch (z = 1) whose
    /// longer edge is more than 1.5 × the shorter (nnU-Net: 15°; square-ish 2D patches
    /// use `dummy_2d_rotation_degrees`, 180°, as nnU-Net's 2D trainer).
    #[serde(default = "default_elongated_2d_rotation")]
    pub elongated_2d_rotation_degrees: f32,
}

fn default_dummy_2d_rotation() -> f32 {
    180.0
}

fn default_elongated_2d_rotation() -> f32 {
    15.0
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NoiseConfig {
    pub enabled: bool,
    pub p: f64,
    /// Standard deviation drawn uniformly from this range. nnU-Net names it
    /// `noise_variance` but uses the draw as the standard deviation, and so do we.
    #[serde(alias = "variance")]
    pub sigma: Range,
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
                dummy_2d_rotation_degrees: 180.0,
                elongated_2d_rotation_degrees: 15.0,
            },
            noise: NoiseConfig { enabled: true, p: 0.1, sigma: Range::new(0.0, 0.1) },
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

    /// Whether nnU-Net augments this patch in 2D (`do_dummy_2d_data_aug`): the largest
    /// edge is more than 3 × the z edge. Rotation and scaling then act in-plane only and
    /// low-resolution simulation leaves z alone. A 2D configuration's patch (z = 1) is
    /// always augmented in-plane: nnU-Net's 2D trainer rotates and scales in 2D.
    pub fn dummy_2d(patch: [usize; 3]) -> bool {
        let max = *patch.iter().max().unwrap_or(&1) as f64;
        patch[0] == 1 || max / patch[0].max(1) as f64 > 3.0
    }

    /// The in-plane rotation range (±degrees) when augmenting in-plane: nnU-Net's
    /// 2D rule for a 2D configuration's patch (z = 1: ±15° when its longer edge is more
    /// than 1.5 × the shorter, else ±180°), and ±180° in the dummy-2D case.
    pub fn in_plane_rotation_degrees(&self, patch: [usize; 3]) -> f32 {
        let (long, short) = (patch[1].max(patch[2]) as f64, patch[1].min(patch[2]).max(1) as f64);
        if patch[0] == 1 && long / short > 1.5 {
            self.spatial.elongated_2d_rotation_degrees
        } else {
            self.spatial.dummy_2d_rotation_degrees
        }
    }

    /// The region the loader reads around the patch (nnU-Net's "initial patch size",
    /// `get_patch_size`): the patch vector turned by the largest angle about each axis
    /// alone (as a row vector times the rotation matrix, nnU-Net's convention), the
    /// per-axis maximum magnitude, divided by `region_min_scale` and truncated. In the
    /// dummy-2D case the angles are the in-plane range (capped at 90°) and z keeps the
    /// patch's size. Rotations combined over several axes can reach past it; they
    /// sample padding there, as in nnU-Net. Without spatial augmentation it is the patch.
    pub fn source_region(&self, patch: [usize; 3]) -> [usize; 3] {
        if !self.spatial.enabled || (self.spatial.p_rotation <= 0.0 && self.spatial.p_scaling <= 0.0) {
            return patch;
        }
        let dummy = Self::dummy_2d(patch);
        let v: [f64; 3] = std::array::from_fn(|a| patch[a] as f64);
        let mut extent = v;
        // A 2D configuration's patch turns about z only (nnU-Net's 2D `get_patch_size`).
        let axes = if patch[0] == 1 { 0..1 } else { 0..3 };
        for axis in axes {
            let deg = if dummy { self.in_plane_rotation_degrees(patch) } else { self.spatial.rotation_degrees[axis] };
            let t = (deg.abs() as f64).min(90.0).to_radians();
            let (s, c) = t.sin_cos();
            // v · R_axis(t): the rotation about one axis mixes the other two.
            let (i, j) = match axis {
                0 => (1, 2),
                1 => (0, 2),
                _ => (0, 1),
            };
            let mut r = v;
            if axis == 1 {
                // R_y = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
                r[i] = v[i] * c - v[j] * s;
                r[j] = v[i] * s + v[j] * c;
            } else {
                // R_x = [[1, 0, 0], [0, c, -s], [0, s, c]], R_z = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
                r[i] = v[i] * c + v[j] * s;
                r[j] = -v[i] * s + v[j] * c;
            }
            for (e, x) in extent.iter_mut().zip(r) {
                *e = e.max(x.abs());
            }
        }
        let s = self.spatial.region_min_scale as f64;
        let mut region: [usize; 3] = std::array::from_fn(|a| ((extent[a] / s) as usize).max(patch[a]));
        if dummy {
            region[0] = patch[0];
        }
        region
    }
}
