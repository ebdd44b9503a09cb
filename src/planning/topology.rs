//! nnU-Net v2's network topology rules: pooling per axis, kernel sizes, patch
//! divisibility, the feature-map-size memory estimate, and the plain conv U-Net's
//! parameter count.

use serde::{Deserialize, Serialize};

/// Pooling and convolution layout for one patch and spacing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub num_pool_per_axis: Vec<usize>,
    /// One stride per stage; the first is all ones.
    pub strides: Vec<Vec<usize>>,
    /// One kernel per stage (the bottleneck's is all 3s).
    pub kernels: Vec<Vec<usize>>,
    /// The patch, padded up so that it divides by 2^pools on each axis.
    pub patch: Vec<usize>,
    pub divisible_by: Vec<usize>,
}

/// Pools an axis while its feature map stays ≥ `min_fm` after pooling and its
/// spacing is within 2× of the finest; a kernel of 1 on an axis until its spacing is
/// within 2× of the finest, then 3 (nnU-Net's `get_pool_and_conv_props`).
pub fn pool_and_conv_props(spacing: &[f64], patch: &[usize], min_fm: usize, max_numpool: usize) -> Topology {
    let dim = spacing.len();
    let mut current_spacing = spacing.to_vec();
    let mut current_size: Vec<f64> = patch.iter().map(|&p| p as f64).collect();
    let mut strides = vec![vec![1; dim]];
    let mut kernels = Vec::new();
    let mut num_pool = vec![0usize; dim];
    let mut kernel = vec![1usize; dim];
    loop {
        let mut valid: Vec<usize> = (0..dim).filter(|&i| current_size[i] >= 2.0 * min_fm as f64).collect();
        if valid.is_empty() {
            break;
        }
        let min_valid_spacing = valid.iter().map(|&i| current_spacing[i]).fold(f64::INFINITY, f64::min);
        valid.retain(|&i| current_spacing[i] / min_valid_spacing < 2.0);
        valid.retain(|&i| num_pool[i] < max_numpool);
        if valid.len() == 1 && current_size[valid[0]] < 3.0 * min_fm as f64 {
            break;
        }
        if valid.is_empty() {
            break;
        }
        let min_spacing = current_spacing.iter().cloned().fold(f64::INFINITY, f64::min);
        for d in 0..dim {
            if kernel[d] != 3 && current_spacing[d] / min_spacing < 2.0 {
                kernel[d] = 3;
            }
        }
        let mut stride = vec![1usize; dim];
        for &v in &valid {
            stride[v] = 2;
            num_pool[v] += 1;
            current_spacing[v] *= 2.0;
            current_size[v] = (current_size[v] / 2.0).ceil();
        }
        strides.push(stride);
        kernels.push(kernel.clone());
    }
    let divisible_by: Vec<usize> = num_pool.iter().map(|&n| 1usize << n).collect();
    let patch = pad_shape(patch, &divisible_by);
    kernels.push(vec![3; dim]);
    Topology { num_pool_per_axis: num_pool, strides, kernels, patch, divisible_by }
}

/// The smallest shape ≥ `shape` divisible by `by` on every axis.
pub fn pad_shape(shape: &[usize], by: &[usize]) -> Vec<usize> {
    shape.iter().zip(by).map(|(&s, &b)| s.div_ceil(b) * b).collect()
}

/// Most features of one stage a plan may ask for (nnU-Net's largest use 512).
pub const MAX_FEATURES: usize = 65536;

/// A plain conv U-Net as the plan describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// "plain": nnU-Net's PlainConvUNet.
    pub kind: String,
    pub dim: usize,
    pub input_channels: usize,
    pub num_classes: usize,
    pub features_per_stage: Vec<usize>,
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    pub n_conv_per_stage: Vec<usize>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub conv_bias: bool,
    pub norm: String,
    pub norm_eps: f64,
    pub norm_affine: bool,
    pub negative_slope: f64,
    pub deep_supervision: bool,
    /// Trainable parameters, counted from the layout (checked again when built in tch).
    pub parameter_count: u64,
}

impl NetworkSpec {
    #[allow(clippy::too_many_arguments)]
    pub fn plain(
        dim: usize,
        input_channels: usize,
        num_classes: usize,
        features: Vec<usize>,
        kernels: Vec<Vec<usize>>,
        strides: Vec<Vec<usize>>,
    ) -> NetworkSpec {
        let n = features.len();
        let mut spec = NetworkSpec {
            kind: "plain".into(),
            dim,
            input_channels,
            num_classes,
            features_per_stage: features,
            kernel_sizes: kernels,
            strides,
            n_conv_per_stage: vec![2; n],
            n_conv_per_stage_decoder: vec![2; n - 1],
            conv_bias: true,
            norm: "instance".into(),
            norm_eps: 1e-5,
            norm_affine: true,
            negative_slope: 0.01,
            deep_supervision: true,
            parameter_count: 0,
        };
        spec.parameter_count = spec.count_parameters();
        spec
    }

    pub fn n_stages(&self) -> usize {
        self.features_per_stage.len()
    }

    /// Whether the layout builds a network that runs on `patch`: one entry per stage in
    /// every list, `dim` entries per kernel and stride, odd kernels, and a patch that
    /// divides by the total stride (else skip connections and upsampled maps differ in
    /// size, which panics inside torch). Plans are files a user can edit.
    pub fn check(&self, patch: &[usize]) -> Result<(), String> {
        let n = self.n_stages();
        let d = self.dim;
        if d != 2 && d != 3 {
            return Err(format!("network dim {d}: only 2 or 3"));
        }
        // The cap keeps the parameter count far from u64 overflow.
        if n == 0 || self.features_per_stage.iter().any(|&f| f == 0 || f > MAX_FEATURES) {
            return Err(format!(
                "features_per_stage {:?}: need at least one stage, each in 1..={MAX_FEATURES}",
                self.features_per_stage
            ));
        }
        if self.input_channels == 0 || self.num_classes == 0 {
            return Err(format!(
                "network with {} input channel(s) and {} class(es)",
                self.input_channels, self.num_classes
            ));
        }
        for (name, len) in [
            ("kernel_sizes", self.kernel_sizes.len()),
            ("strides", self.strides.len()),
            ("n_conv_per_stage", self.n_conv_per_stage.len()),
        ] {
            if len != n {
                return Err(format!("network {name} lists {len} stage(s), features_per_stage {n}"));
            }
        }
        if self.n_conv_per_stage_decoder.len() != n - 1 {
            return Err(format!(
                "network n_conv_per_stage_decoder lists {} stage(s), where {n} stages need {}",
                self.n_conv_per_stage_decoder.len(),
                n - 1
            ));
        }
        if self.n_conv_per_stage.iter().chain(&self.n_conv_per_stage_decoder).any(|&c| c == 0) {
            return Err("network n_conv_per_stage and n_conv_per_stage_decoder must be at least 1".into());
        }
        for (s, (k, st)) in self.kernel_sizes.iter().zip(&self.strides).enumerate() {
            if k.len() != d || st.len() != d {
                return Err(format!("network stage {s}: kernel {k:?} and stride {st:?} need {d} entries each"));
            }
            if k.iter().any(|&k| k % 2 == 0) || st.contains(&0) {
                return Err(format!("network stage {s}: kernel {k:?} must be odd and stride {st:?} at least 1"));
            }
        }
        let eps_ok = self.norm_eps > 0.0 && self.norm_eps.is_finite();
        if !eps_ok || !self.negative_slope.is_finite() {
            return Err(format!(
                "network norm_eps {} must be positive and negative_slope {} finite",
                self.norm_eps, self.negative_slope
            ));
        }
        let total: Vec<usize> =
            (0..d).map(|a| self.strides.iter().fold(1usize, |acc, st| acc.saturating_mul(st[a]))).collect();
        if patch.len() != d || patch.contains(&0) {
            return Err(format!("patch {patch:?}: need {d} sizes, each at least 1"));
        }
        if patch.iter().zip(&total).any(|(&p, &t)| p % t != 0) {
            return Err(format!(
                "patch {patch:?} does not divide by the network's total stride {total:?} \
                 (the product of its strides per axis)"
            ));
        }
        Ok(())
    }

    /// Parameters of conv (+bias) → instance norm (affine) → LeakyReLU blocks, transposed
    /// convolutions (kernel = stride, with bias) and 1×1 heads (with bias) at every
    /// decoder level.
    pub fn count_parameters(&self) -> u64 {
        let bias = |c: usize| if self.conv_bias { c as u64 } else { 0 };
        let norm = |c: usize| if self.norm_affine { 2 * c as u64 } else { 0 };
        let conv = |k: &[usize], cin: usize, cout: usize| {
            k.iter().product::<usize>() as u64 * cin as u64 * cout as u64 + bias(cout) + norm(cout)
        };
        let mut p = 0u64;
        let mut cin = self.input_channels;
        for s in 0..self.n_stages() {
            let f = self.features_per_stage[s];
            let k = &self.kernel_sizes[s];
            p += conv(k, cin, f);
            for _ in 1..self.n_conv_per_stage[s] {
                p += conv(k, f, f);
            }
            cin = f;
        }
        let n = self.n_stages();
        for s in 0..n - 1 {
            let below = self.features_per_stage[n - 1 - s];
            let skip = self.features_per_stage[n - 2 - s];
            let stride: usize = self.strides[n - 1 - s].iter().product();
            p += stride as u64 * below as u64 * skip as u64 + skip as u64; // transposed conv, with bias
            let k = &self.kernel_sizes[n - 2 - s];
            p += conv(k, 2 * skip, skip);
            for _ in 1..self.n_conv_per_stage_decoder[s] {
                p += conv(k, skip, skip);
            }
            p += skip as u64 * self.num_classes as u64 + self.num_classes as u64;
            // 1×1 head
        }
        p
    }

    /// nnU-Net's memory proxy: the number of feature-map elements the network
    /// produces for one patch (`compute_conv_feature_map_size`).
    pub fn feature_map_elements(&self, patch: &[usize]) -> u64 {
        let prod = |v: &[usize]| v.iter().map(|&x| x as u64).product::<u64>();
        let mut size: Vec<usize> = patch.to_vec();
        let mut total = 0u64;
        let n = self.n_stages();
        let mut skip_sizes = Vec::new();
        for s in 0..n {
            let out: Vec<usize> = size.iter().zip(&self.strides[s]).map(|(a, b)| a / b).collect();
            total += self.n_conv_per_stage[s] as u64 * self.features_per_stage[s] as u64 * prod(&out);
            size = out;
            if s < n - 1 {
                skip_sizes.push(size.clone());
            }
        }
        for s in 0..n - 1 {
            let skip = &skip_sizes[n - 2 - s];
            let c = self.features_per_stage[n - 2 - s] as u64;
            total += self.n_conv_per_stage_decoder[s] as u64 * c * prod(skip); // convs
            total += c * prod(skip); // transposed conv output
            if self.deep_supervision || s == n - 2 {
                total += self.num_classes as u64 * prod(skip);
            }
        }
        total
    }
}

/// Features per stage: `min(base·2^i, max)`.
pub fn features_per_stage(n_stages: usize, base: usize, max: usize) -> Vec<usize> {
    (0..n_stages).map(|i| (base << i).min(max)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_3d_network_has_30_795_654_parameters() {
        let t = pool_and_conv_props(&[1.0, 1.0, 1.0], &[112, 160, 128], 4, 999_999);
        assert_eq!(t.patch, vec![112, 160, 128]);
        assert_eq!(t.strides.len(), 6);
        assert_eq!(t.strides[5], vec![1, 2, 2]);
        assert!(t.kernels.iter().all(|k| k == &vec![3, 3, 3]));
        let net = NetworkSpec::plain(3, 1, 14, features_per_stage(6, 32, 320), t.kernels, t.strides);
        assert_eq!(net.features_per_stage, vec![32, 64, 128, 256, 320, 320]);
        assert_eq!(net.parameter_count, 30_795_654);
    }

    #[test]
    fn paper_2d_network_has_41_287_490_parameters() {
        let t = pool_and_conv_props(&[1.0, 1.0], &[512, 512], 4, 999_999);
        assert_eq!(t.strides.len(), 8);
        let net = NetworkSpec::plain(2, 1, 14, features_per_stage(8, 32, 480), t.kernels, t.strides);
        assert_eq!(net.parameter_count, 41_287_490);
    }

    #[test]
    fn anisotropic_spacing_keeps_1_kernels_and_skips_pooling_z() {
        // 5 mm slices, 0.8 mm in-plane: z pools only once in-plane has caught up.
        let t = pool_and_conv_props(&[5.0, 0.8, 0.8], &[40, 224, 224], 4, 999_999);
        assert_eq!(t.strides[1], vec![1, 2, 2]);
        assert_eq!(t.strides[2], vec![1, 2, 2]);
        assert_eq!(t.kernels[0], vec![1, 3, 3]);
        // After two pools in-plane spacing is 3.2 mm: z (5 mm) is within 2×, so it pools.
        assert_eq!(t.strides[3], vec![2, 2, 2]);
        assert_eq!(t.kernels[2], vec![3, 3, 3]);
    }

    #[test]
    fn check_accepts_planned_networks_and_names_what_is_wrong() {
        let t = pool_and_conv_props(&[1.0, 1.0, 1.0], &[16, 48, 48], 4, 999_999);
        let net = NetworkSpec::plain(3, 1, 14, features_per_stage(t.strides.len(), 4, 16), t.kernels, t.strides);
        assert_eq!(net.check(&t.patch), Ok(()));
        let e = net.check(&[17, 48, 48]).unwrap_err();
        assert!(e.contains("does not divide by the network's total stride [4, 8, 8]"), "{e}");
        let mut short = net.clone();
        short.features_per_stage.pop();
        assert!(short.check(&t.patch).unwrap_err().contains("kernel_sizes lists 4 stage(s), features_per_stage 3"));
        let mut even = net.clone();
        even.kernel_sizes[1] = vec![3, 2, 3];
        assert!(even.check(&t.patch).unwrap_err().contains("must be odd"));
    }

    #[test]
    fn pad_shape_rounds_up() {
        assert_eq!(pad_shape(&[113, 160, 1], &[16, 32, 1]), vec![128, 160, 1]);
    }
}
