//! nnU-Net's default 3D training augmentation, per sample, consistently on the image
//! and its labels, in reused buffers.
//!
//! Order (nnU-Net v2's `get_training_transforms`): rotation/scaling (one resampling
//! pass from the enlarged region, labels as one-hot scores, else a crop), Gaussian
//! noise, Gaussian blur,
//! multiplicative brightness, contrast, low-resolution simulation, inverted gamma,
//! gamma, mirroring; then the ignore label becomes background and deep-supervision
//! targets are made. All randomness is drawn up front ([`Augmenter::draw`]) in a
//! fixed order, so a seed gives the same output bit for bit.

pub mod config;
pub mod ops;
pub mod spatial;

use rand::Rng;

pub use config::{AugmentConfig, Range};

/// Labels outside the scan (padding) carry this value until augmentation ends.
pub const IGNORE_LABEL: u8 = 255;
/// Channels a sample may have (per-channel parameters live in fixed arrays, so a
/// draw allocates nothing).
pub const MAX_CHANNELS: usize = 8;

/// Every random decision for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Draw {
    /// Angles (radians) about axes z, y, x; only the first is used in-plane.
    pub rotation: Option<[f64; 3]>,
    pub scale: Option<f64>,
    /// nnU-Net's dummy-2D augmentation: rotation about z and scaling of (y, x) only.
    pub in_plane: bool,
    pub noise_sigma: Option<f32>,
    pub noise_seed: u64,
    pub blur_sigma: [Option<[f32; 3]>; MAX_CHANNELS],
    pub brightness: [Option<f32>; MAX_CHANNELS],
    pub contrast: [Option<f32>; MAX_CHANNELS],
    pub low_res_zoom: [Option<f32>; MAX_CHANNELS],
    pub gamma_inverted: [Option<f32>; MAX_CHANNELS],
    pub gamma: [Option<f32>; MAX_CHANNELS],
    pub mirror: [bool; 3],
}

impl Draw {
    pub fn spatial(&self) -> bool {
        self.rotation.is_some() || self.scale.is_some()
    }

    /// The source-from-patch matrix `A`: patch offset `d` (from the patch centre)
    /// samples the source at `centre + A·d`. As batchgeneratorsv2's
    /// `create_affine_matrix_3d`: `A = R₂(α₂)·R₁(α₁)·R₀(α₀)·S`, `R_k` the rotation about
    /// array axis k (0 = z), `S` the scale; in-plane (its 2D matrix): `R₀(α₀)·diag(1, s, s)`.
    pub fn matrix(&self) -> [[f64; 3]; 3] {
        let a = self.rotation.unwrap_or([0.0; 3]);
        let s = self.scale.unwrap_or(1.0);
        let (r, scale) = if self.in_plane {
            (spatial::rotation_matrix([a[0], 0.0, 0.0]), [1.0, s, s])
        } else {
            (spatial::rotation_matrix(a), [s; 3])
        };
        std::array::from_fn(|i| std::array::from_fn(|j| r[i][j] * scale[j]))
    }
}

/// One augmented sample; buffers are reused from sample to sample.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// `[channel][z][y][x]` of the patch.
    pub image: Vec<f32>,
    /// `[z][y][x]` of the patch; empty for unlabeled samples.
    pub labels: Vec<u8>,
    /// Labels at each deep-supervision scale after the first (full resolution).
    pub ds_labels: Vec<Vec<u8>>,
    pub draw: Draw,
}

/// Draws from `[lo, hi]`, below 1 half the time when the range straddles 1
/// (batchgenerators' `BGContrast`).
fn draw_factor(rng: &mut impl Rng, r: Range) -> f32 {
    if r.lo < 1.0 && r.hi > 1.0 {
        if rng.random_bool(0.5) {
            rng.random_range(r.lo..1.0)
        } else {
            rng.random_range(1.0..=r.hi)
        }
    } else {
        uniform(rng, r)
    }
}

fn uniform(rng: &mut impl Rng, r: Range) -> f32 {
    if r.hi > r.lo {
        rng.random_range(r.lo..=r.hi)
    } else {
        r.lo
    }
}

pub struct Augmenter {
    cfg: AugmentConfig,
    patch: [usize; 3],
    region: [usize; 3],
    /// nnU-Net's `do_dummy_2d_data_aug` for this patch.
    dummy_2d: bool,
    channels: usize,
    /// Output shapes of the deep-supervision targets after the first.
    ds_shapes: Vec<[usize; 3]>,
    tmp: Vec<f32>,
    tmp2: Vec<f32>,
    small: Vec<f32>,
    noise_table: Vec<f32>,
    lut: Vec<f32>,
}

/// The part of the enlarged region one draw reads: `offset` and `shape` within the
/// region, and the patch centre in that box's voxel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceBox {
    pub offset: [usize; 3],
    pub shape: [usize; 3],
    pub centre: [f64; 3],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AugmentError(pub String);

impl std::fmt::Display for AugmentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AugmentError {}

impl Augmenter {
    /// `ds_scales`: per deep-supervision output, the scale per axis, finest first
    /// (the plan's `deep_supervision_scales`; the first is full resolution).
    pub fn new(
        cfg: AugmentConfig,
        patch: [usize; 3],
        channels: usize,
        ds_scales: &[[f64; 3]],
    ) -> Result<Augmenter, AugmentError> {
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(AugmentError(format!("{channels} channels: 1..={MAX_CHANNELS} supported")));
        }
        if patch.contains(&0) {
            return Err(AugmentError(format!("empty patch {patch:?}")));
        }
        let ds_shapes = ds_scales
            .iter()
            .skip(1)
            .map(|s| std::array::from_fn(|a| ((patch[a] as f64 * s[a]).round() as usize).max(1)))
            .collect();
        Ok(Augmenter {
            region: cfg.source_region(patch),
            dummy_2d: AugmentConfig::dummy_2d(patch),
            cfg,
            patch,
            channels,
            ds_shapes,
            tmp: Vec::new(),
            tmp2: Vec::new(),
            small: Vec::new(),
            noise_table: vec![0.0; 1 << 14],
            lut: Vec::new(),
        })
    }

    /// nnU-Net's enlarged patch (z, y, x): the box the loader places in the volume
    /// (`get_bbox`) and samples from.
    pub fn region(&self) -> [usize; 3] {
        self.region
    }

    pub fn dummy_2d(&self) -> bool {
        self.dummy_2d
    }

    pub fn patch(&self) -> [usize; 3] {
        self.patch
    }

    pub fn ds_shapes(&self) -> &[[usize; 3]] {
        &self.ds_shapes
    }

    pub fn config(&self) -> &AugmentConfig {
        &self.cfg
    }

    /// Draws every random parameter of one sample, in a fixed order.
    pub fn draw(&self, rng: &mut impl Rng) -> Draw {
        let c = &self.cfg;
        let mut d = Draw::default();
        if c.spatial.enabled {
            d.in_plane = self.dummy_2d;
            let angle = |rng: &mut dyn rand::RngCore, max_degrees: f32| {
                let m = max_degrees as f64;
                if m > 0.0 {
                    rng.random_range(-m..=m).to_radians()
                } else {
                    0.0
                }
            };
            if rng.random_bool(c.spatial.p_rotation) {
                d.rotation = Some(if self.dummy_2d {
                    [angle(rng, c.in_plane_rotation_degrees(self.patch)), 0.0, 0.0]
                } else {
                    std::array::from_fn(|a| angle(rng, c.spatial.rotation_degrees[a]))
                });
            }
            if rng.random_bool(c.spatial.p_scaling) {
                d.scale = Some(uniform(rng, c.spatial.scaling) as f64);
            }
        }
        if c.noise.enabled && rng.random_bool(c.noise.p) {
            d.noise_sigma = Some(uniform(rng, c.noise.sigma));
            d.noise_seed = rng.next_u64();
        }
        if c.blur.enabled && rng.random_bool(c.blur.p) {
            for ch in 0..self.channels {
                if rng.random_bool(c.blur.p_per_channel) {
                    d.blur_sigma[ch] = Some(std::array::from_fn(|_| uniform(rng, c.blur.sigma)));
                }
            }
        }
        if c.brightness.enabled && rng.random_bool(c.brightness.p) {
            for ch in 0..self.channels {
                d.brightness[ch] = Some(draw_factor(rng, c.brightness.range));
            }
        }
        if c.contrast.enabled && rng.random_bool(c.contrast.p) {
            for ch in 0..self.channels {
                d.contrast[ch] = Some(draw_factor(rng, c.contrast.range));
            }
        }
        if c.low_resolution.enabled && rng.random_bool(c.low_resolution.p) {
            for ch in 0..self.channels {
                if rng.random_bool(c.low_resolution.p_per_channel) {
                    d.low_res_zoom[ch] = Some(uniform(rng, c.low_resolution.zoom));
                }
            }
        }
        if c.gamma_inverted.enabled && rng.random_bool(c.gamma_inverted.p) {
            for ch in 0..self.channels {
                d.gamma_inverted[ch] = Some(draw_factor(rng, c.gamma_inverted.range));
            }
        }
        if c.gamma.enabled && rng.random_bool(c.gamma.p) {
            for ch in 0..self.channels {
                d.gamma[ch] = Some(draw_factor(rng, c.gamma.range));
            }
        }
        if c.mirror.enabled {
            for a in 0..3 {
                d.mirror[a] = c.mirror.axes[a] && rng.random_bool(c.mirror.p_per_axis);
            }
        }
        d
    }

    /// Where the patch sits in the enlarged region for this draw, as nnU-Net places it:
    /// with rotation or scaling the patch centre is the region's centre `(R − 1)/2`;
    /// without, the patch is cropped from `⌊R/2⌋ − ⌊P/2⌋` (batchgeneratorsv2's
    /// `crop_tensor`), no interpolation. Returns the part of the region this draw reads
    /// (the bare patch for the ~64% of samples without rotation or scaling, else the
    /// bounding box of the turned patch plus the interpolation neighbour, within the
    /// region): a loader that draws first reads only that.
    pub fn source_box(&self, d: &Draw) -> SourceBox {
        let (p, r) = (self.patch, self.region);
        if !d.spatial() {
            let offset: [usize; 3] = std::array::from_fn(|a| r[a] / 2 - p[a] / 2);
            return SourceBox { offset, shape: p, centre: std::array::from_fn(|a| (p[a] as f64 - 1.0) / 2.0) };
        }
        let m = d.matrix();
        let half: [f64; 3] = std::array::from_fn(|a| (p[a] as f64 - 1.0) / 2.0);
        let mut offset = [0usize; 3];
        let mut shape = [0usize; 3];
        let mut centre = [0f64; 3];
        for i in 0..3 {
            let c = (r[i] as f64 - 1.0) / 2.0;
            let extent: f64 = (0..3).map(|j| (m[i][j] * half[j]).abs()).sum();
            // Trilinear reads floor(x) and floor(x) + 1; a hair of slack for rounding.
            let lo = ((c - extent - 1e-6).floor() as i64).clamp(0, r[i] as i64) as usize;
            let hi = ((c + extent + 1e-6).floor() as i64 + 2).clamp(lo as i64 + 1, r[i] as i64) as usize;
            offset[i] = lo;
            shape[i] = hi - lo;
            centre[i] = c - lo as f64;
        }
        SourceBox { offset, shape, centre }
    }

    /// Draws and applies, from a source of the full [`Self::region`]: `src_image` is
    /// `[channel][z][y][x]`, `src_labels` `[z][y][x]` with [`IGNORE_LABEL`] outside the scan.
    pub fn augment(&mut self, rng: &mut impl Rng, src_image: &[f32], src_labels: Option<&[u8]>, out: &mut Sample) {
        let d = self.draw(rng);
        let b = self.source_box(&d);
        let centre = std::array::from_fn(|a| b.centre[a] + b.offset[a] as f64);
        let region = self.region;
        self.apply(&d, region, centre, src_image, src_labels, out);
    }

    /// Applies a draw to a source of shape `src_shape` in which the patch centre sits
    /// at `centre` (source voxel coordinates; [`Self::source_box`] gives both for the
    /// part of the region a draw needs). Outside the source the image is 0 and labels
    /// are [`IGNORE_LABEL`].
    pub fn apply(
        &mut self,
        d: &Draw,
        src_shape: [usize; 3],
        centre: [f64; 3],
        src_image: &[f32],
        src_labels: Option<&[u8]>,
        out: &mut Sample,
    ) {
        let (patch, channels) = (self.patch, self.channels);
        let pn: usize = patch.iter().product();
        let rn: usize = src_shape.iter().product();
        assert_eq!(src_image.len(), rn * channels, "source image is not channels × region");
        out.draw = *d;
        out.image.resize(pn * channels, 0.0);
        if let Some(l) = src_labels {
            assert_eq!(l.len(), rn, "source labels are not the region's size");
            out.labels.resize(pn, 0);
        } else {
            out.labels.clear();
        }
        if d.spatial() {
            let m = d.matrix();
            let labels = src_labels.map(|l| (l, out.labels.as_mut_slice(), IGNORE_LABEL));
            spatial::transform(src_image, labels, src_shape, &mut out.image, patch, channels, &m, centre);
        } else {
            let start: [usize; 3] = std::array::from_fn(|a| {
                let s = centre[a] - (patch[a] as f64 - 1.0) / 2.0;
                assert!(s >= 0.0 && s.fract() == 0.0, "a crop starts on a voxel inside the source");
                s as usize
            });
            spatial::crop(src_image, src_shape, start, &mut out.image, patch, channels);
            if let Some(l) = src_labels {
                spatial::crop(l, src_shape, start, &mut out.labels, patch, 1);
            }
        }
        self.finish(d, out);
    }

    /// Applies a draw without a spatial transform to a sample that already holds the
    /// patch (`out.image` channels × patch, `out.labels` the patch or empty): no copy.
    pub fn apply_in_place(&mut self, d: &Draw, out: &mut Sample) {
        assert!(!d.spatial(), "a spatial transform needs a separate source region");
        let pn: usize = self.patch.iter().product();
        assert_eq!(out.image.len(), pn * self.channels, "the sample does not hold the patch");
        assert!(out.labels.is_empty() || out.labels.len() == pn, "labels are not the patch's size");
        out.draw = *d;
        self.finish(d, out);
    }

    /// Everything after the spatial step.
    fn finish(&mut self, d: &Draw, out: &mut Sample) {
        let (patch, channels) = (self.patch, self.channels);
        let pn: usize = patch.iter().product();
        if let Some(sigma) = d.noise_sigma {
            let mut nrng = <rand_pcg::Pcg64Mcg as rand::SeedableRng>::seed_from_u64(d.noise_seed);
            for ch in 0..channels {
                ops::add_noise(&mut out.image[ch * pn..(ch + 1) * pn], sigma, &mut self.noise_table, &mut nrng);
            }
        }
        for ch in 0..channels {
            let x = &mut out.image[ch * pn..(ch + 1) * pn];
            if let Some(s) = d.blur_sigma[ch] {
                ops::blur(x, patch, s, &mut self.tmp);
            }
            if let Some(f) = d.brightness[ch] {
                ops::multiply(x, f);
            }
            if let Some(f) = d.contrast[ch] {
                ops::contrast(x, f);
            }
            if let Some(z) = d.low_res_zoom[ch] {
                // Python's round (half to even); z keeps its size in dummy-2D mode.
                let small: [usize; 3] = std::array::from_fn(|a| {
                    if a == 0 && self.dummy_2d {
                        patch[0]
                    } else {
                        ((patch[a] as f64 * z as f64).round_ties_even() as usize).max(1)
                    }
                });
                ops::resize_nearest(x, patch, &mut self.small, small);
                ops::resize_trilinear(&self.small, small, x, patch, &mut self.tmp, &mut self.tmp2);
            }
            if let Some(g) = d.gamma_inverted[ch] {
                ops::gamma(x, g, true, &mut self.lut);
            }
            if let Some(g) = d.gamma[ch] {
                ops::gamma(x, g, false, &mut self.lut);
            }
        }
        for axis in 0..3 {
            if d.mirror[axis] {
                for ch in 0..channels {
                    ops::mirror(&mut out.image[ch * pn..(ch + 1) * pn], patch, axis);
                }
                if !out.labels.is_empty() {
                    ops::mirror(&mut out.labels, patch, axis);
                }
            }
        }
        out.ds_labels.resize_with(self.ds_shapes.len(), Vec::new);
        if out.labels.is_empty() {
            out.ds_labels.iter_mut().for_each(Vec::clear);
            return;
        }
        for l in out.labels.iter_mut() {
            if *l == IGNORE_LABEL {
                *l = 0;
            }
        }
        for (dst, &shape) in out.ds_labels.iter_mut().zip(&self.ds_shapes) {
            ops::resize_nearest(&out.labels, patch, dst, shape);
        }
    }
}

#[cfg(test)]
mod tests;
