//! nnU-Net's default 3D training augmentation, per sample, consistently on the image
//! and its labels, in reused buffers.
//!
//! Order (nnU-Net v2's `get_training_transforms`): rotation/scaling (one resampling
//! pass from the enlarged region, else a centre crop), Gaussian noise, Gaussian blur,
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
    pub rotation: Option<[f64; 3]>,
    pub scale: Option<f64>,
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

    /// The source-from-patch matrix: the rotation, divided by the scale.
    pub fn matrix(&self) -> [[f64; 3]; 3] {
        let r = spatial::rotation_matrix(self.rotation.unwrap_or([0.0; 3]));
        let s = self.scale.unwrap_or(1.0);
        std::array::from_fn(|i| std::array::from_fn(|j| r[i][j] / s))
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
    channels: usize,
    /// Output shapes of the deep-supervision targets after the first.
    ds_shapes: Vec<[usize; 3]>,
    tmp: Vec<f32>,
    tmp2: Vec<f32>,
    small: Vec<f32>,
    noise_table: Vec<f32>,
    lut: Vec<f32>,
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

    /// The region (z, y, x) the loader must read around the patch centre.
    pub fn region(&self) -> [usize; 3] {
        self.region
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
            if rng.random_bool(c.spatial.p_rotation) {
                d.rotation = Some(std::array::from_fn(|a| {
                    let m = c.spatial.rotation_degrees[a] as f64;
                    if m > 0.0 {
                        rng.random_range(-m..=m).to_radians()
                    } else {
                        0.0
                    }
                }));
            }
            if rng.random_bool(c.spatial.p_scaling) {
                d.scale = Some(uniform(rng, c.spatial.scaling) as f64);
            }
        }
        if c.noise.enabled && rng.random_bool(c.noise.p) {
            d.noise_sigma = Some(uniform(rng, c.noise.variance).sqrt());
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

    /// The region (centred on the patch) this draw samples from: the patch itself
    /// when no spatial transform fires (64% of samples with nnU-Net's settings),
    /// else the bounding box of the rotated and scaled patch plus the interpolation
    /// margin, capped at [`Self::region`]. A loader that draws first reads only this.
    pub fn required_region(&self, d: &Draw) -> [usize; 3] {
        if !d.spatial() {
            return self.patch;
        }
        let m = d.matrix();
        let half: [f64; 3] = std::array::from_fn(|a| (self.patch[a] as f64 - 1.0) / 2.0);
        std::array::from_fn(|i| {
            let extent: f64 = (0..3).map(|j| (m[i][j] * half[j]).abs()).sum();
            // R = P + 2k ≥ 2·extent + 3 keeps the centre exact and the +1 neighbour inside.
            let need = 2.0 * extent + 3.0;
            let k = ((need - self.patch[i] as f64) / 2.0).ceil().max(0.0) as usize;
            (self.patch[i] + 2 * k).min(self.region[i])
        })
    }

    /// Draws and applies, from a source of the full [`Self::region`]: `src_image` is
    /// `[channel][z][y][x]`, `src_labels` `[z][y][x]` with [`IGNORE_LABEL`] outside the scan.
    pub fn augment(&mut self, rng: &mut impl Rng, src_image: &[f32], src_labels: Option<&[u8]>, out: &mut Sample) {
        let d = self.draw(rng);
        let region = self.region;
        self.apply(&d, region, src_image, src_labels, out);
    }

    /// Applies a draw to a source region of shape `region` centred on the patch (at
    /// least the patch; [`Self::required_region`] is enough).
    pub fn apply(
        &mut self,
        d: &Draw,
        region: [usize; 3],
        src_image: &[f32],
        src_labels: Option<&[u8]>,
        out: &mut Sample,
    ) {
        let (patch, channels) = (self.patch, self.channels);
        assert!((0..3).all(|a| region[a] >= patch[a]), "source region {region:?} smaller than the patch {patch:?}");
        let pn: usize = patch.iter().product();
        let rn: usize = region.iter().product();
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
            spatial::transform(src_image, labels, region, &mut out.image, patch, channels, &m);
        } else {
            spatial::crop(src_image, region, &mut out.image, patch, channels);
            if let Some(l) = src_labels {
                spatial::crop(l, region, &mut out.labels, patch, 1);
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
                let small: [usize; 3] = std::array::from_fn(|a| ((patch[a] as f32 * z).round() as usize).max(1));
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
