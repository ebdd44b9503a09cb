//! nnU-Net's plain convolutional U-Net, 2D or 3D, built from a plan's [`NetworkSpec`]:
//! per stage `n` × (conv with bias → instance norm (affine, eps 1e-5) → LeakyReLU 0.01),
//! the first conv of a stage strided; a transposed convolution (kernel = stride) up
//! each decoder level, concatenation with the skip, the stage's convs, and a 1×1 head
//! per decoder level for deep supervision. Weights He-normal, biases zero.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::planning::topology::NetworkSpec;

/// He-normal for LeakyReLU(0.01) (nnU-Net's `InitWeights_He(1e-2)`): gain √(2/(1+a²)).
fn he_normal() -> Init {
    Init::Kaiming {
        dist: nn::init::NormalOrUniform::Normal,
        fan: nn::init::FanInOut::FanIn,
        non_linearity: nn::init::NonLinearity::ExplicitGain((2.0f64 / (1.0 + 0.01 * 0.01)).sqrt()),
    }
}

#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: Vec<i64>,
    padding: Vec<i64>,
}

impl Conv {
    fn new(vs: &nn::Path, cin: usize, cout: usize, kernel: &[usize], stride: &[usize], bias: bool) -> Conv {
        let mut shape = vec![cout as i64, cin as i64];
        shape.extend(kernel.iter().map(|&k| k as i64));
        Conv {
            weight: vs.var("weight", &shape, he_normal()),
            bias: bias.then(|| vs.var("bias", &[cout as i64], Init::Const(0.0))),
            stride: stride.iter().map(|&s| s as i64).collect(),
            padding: kernel.iter().map(|&k| (k / 2) as i64).collect(),
        }
    }

    fn forward(&self, x: &Tensor, low: Option<Kind>) -> Tensor {
        let dil = vec![1i64; self.stride.len()];
        let (x, weight, bias) = cast(low, x, &self.weight, self.bias.as_ref());
        let y = match self.stride.len() {
            3 => x.conv3d(&weight, bias.as_ref(), &self.stride, &self.padding, &dil, 1),
            _ => x.conv2d(&weight, bias.as_ref(), &self.stride, &self.padding, &dil, 1),
        };
        uncast(low, y)
    }
}

#[derive(Debug)]
struct ConvTranspose {
    weight: Tensor,
    bias: Tensor,
    stride: Vec<i64>,
}

impl ConvTranspose {
    fn new(vs: &nn::Path, cin: usize, cout: usize, stride: &[usize]) -> ConvTranspose {
        let mut shape = vec![cin as i64, cout as i64];
        shape.extend(stride.iter().map(|&s| s as i64));
        ConvTranspose {
            weight: vs.var("weight", &shape, he_normal()),
            bias: vs.var("bias", &[cout as i64], Init::Const(0.0)),
            stride: stride.iter().map(|&s| s as i64).collect(),
        }
    }

    fn forward(&self, x: &Tensor, low: Option<Kind>) -> Tensor {
        let n = self.stride.len();
        let (zero, one) = (vec![0i64; n], vec![1i64; n]);
        let (x, weight, bias) = cast(low, x, &self.weight, Some(&self.bias));
        let y = match n {
            3 => x.conv_transpose3d(&weight, bias.as_ref(), &self.stride, &zero, &zero, 1, &one),
            _ => x.conv_transpose2d(&weight, bias.as_ref(), &self.stride, &zero, &zero, 1, &one),
        };
        uncast(low, y)
    }
}

/// A convolution's input, weight and bias in the low-precision kind, if any. The casts
/// are part of the graph, so gradients reach the float32 weights (autocast's rule:
/// float32 master weights, convolutions in the low precision).
fn cast(low: Option<Kind>, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> (Tensor, Tensor, Option<Tensor>) {
    match low {
        Some(k) => (x.to_kind(k), weight.to_kind(k), bias.map(|b| b.to_kind(k))),
        None => (x.shallow_clone(), weight.shallow_clone(), bias.map(Tensor::shallow_clone)),
    }
}

/// A low-precision convolution's output back in float32, where norms and losses run.
fn uncast(low: Option<Kind>, y: Tensor) -> Tensor {
    if low.is_some() {
        y.to_kind(Kind::Float)
    } else {
        y
    }
}

/// conv → instance norm (group norm with one group per channel) → LeakyReLU.
#[derive(Debug)]
struct ConvBlock {
    conv: Conv,
    norm: nn::GroupNorm,
    negative_slope: f64,
}

impl ConvBlock {
    fn new(
        vs: &nn::Path,
        spec: &NetworkSpec,
        cin: usize,
        cout: usize,
        kernel: &[usize],
        stride: &[usize],
    ) -> ConvBlock {
        let conv = Conv::new(&(vs / "conv"), cin, cout, kernel, stride, spec.conv_bias);
        let cfg = nn::GroupNormConfig { eps: spec.norm_eps, affine: spec.norm_affine, ..Default::default() };
        let norm = nn::group_norm(vs / "norm", cout as i64, cout as i64, cfg);
        ConvBlock { conv, norm, negative_slope: spec.negative_slope }
    }

    fn forward(&self, x: &Tensor, low: Option<Kind>) -> Tensor {
        use tch::nn::Module;
        let h = self.norm.forward(&self.conv.forward(x, low));
        if self.negative_slope == 0.01 {
            // In place, as nnU-Net's LeakyReLU(inplace=True): the norm's backward needs its
            // input, not its output, so one buffer fewer per block.
            let mut h = h;
            let _ = h.leaky_relu_();
            h
        } else {
            leaky_relu(&h, self.negative_slope)
        }
    }
}

/// LeakyReLU with the plan's slope (tch exposes only torch's default, 0.01).
fn leaky_relu(h: &Tensor, negative_slope: f64) -> Tensor {
    if negative_slope == 0.01 {
        // torch's default slope: the fused kernel.
        h.leaky_relu()
    } else {
        h.relu() - (-h).relu() * negative_slope
    }
}

#[derive(Debug)]
struct Decoder {
    up: ConvTranspose,
    blocks: Vec<ConvBlock>,
    head: Conv,
}

#[derive(Debug)]
pub struct UNet {
    encoder: Vec<Vec<ConvBlock>>,
    /// Lowest resolution first.
    decoder: Vec<Decoder>,
    pub spec: NetworkSpec,
    /// Convolutions in this kind (bfloat16 on CPUs that compute it natively: twice the
    /// float32 rate); `None`: float32 throughout.
    pub conv_kind: Option<Kind>,
}

impl UNet {
    pub fn new(vs: &nn::Path, spec: &NetworkSpec) -> UNet {
        let n = spec.n_stages();
        let mut encoder = Vec::with_capacity(n);
        let mut cin = spec.input_channels;
        for s in 0..n {
            let f = spec.features_per_stage[s];
            let k = &spec.kernel_sizes[s];
            let ones = vec![1; spec.dim];
            let stage = vs / "encoder" / s;
            let blocks = (0..spec.n_conv_per_stage[s])
                .map(|b| {
                    let stride = if b == 0 { &spec.strides[s] } else { &ones };
                    ConvBlock::new(&(&stage / b), spec, if b == 0 { cin } else { f }, f, k, stride)
                })
                .collect();
            encoder.push(blocks);
            cin = f;
        }
        let mut decoder = Vec::with_capacity(n - 1);
        for d in 0..n - 1 {
            let below = spec.features_per_stage[n - 1 - d];
            let skip = spec.features_per_stage[n - 2 - d];
            let k = &spec.kernel_sizes[n - 2 - d];
            let ones = vec![1; spec.dim];
            let stage = vs / "decoder" / d;
            let up = ConvTranspose::new(&(&stage / "up"), below, skip, &spec.strides[n - 1 - d]);
            let blocks = (0..spec.n_conv_per_stage_decoder[d])
                .map(|b| ConvBlock::new(&(&stage / b), spec, if b == 0 { 2 * skip } else { skip }, skip, k, &ones))
                .collect();
            let head = Conv::new(&(&stage / "head"), skip, spec.num_classes, &ones, &ones, true);
            decoder.push(Decoder { up, blocks, head });
        }
        UNet { encoder, decoder, spec: spec.clone(), conv_kind: None }
    }

    /// Logits at every decoder level, full resolution first (nnU-Net's order); only
    /// the full-resolution one without deep supervision.
    ///
    /// A 2D network also takes the pipeline's volumes `[n, C, z, y, x]`: each slice is
    /// predicted on its own (z folded into the batch) and the logits come back as
    /// `[n, K, z, y', x']`, so batches and sliding windows are the same for 2D and 3D.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        if self.spec.dim == 2 && x.dim() == 5 {
            let [n, c, z, y, xs] = <[i64; 5]>::try_from(x.size()).expect("five dimensions");
            let slices = x.permute([0, 2, 1, 3, 4]).reshape([n * z, c, y, xs]);
            return self
                .forward(&slices)
                .into_iter()
                .map(|o| {
                    let [_, k, oy, ox] = <[i64; 4]>::try_from(o.size()).expect("four dimensions");
                    o.reshape([n, z, k, oy, ox]).permute([0, 2, 1, 3, 4])
                })
                .collect();
        }
        let mut skips = Vec::with_capacity(self.encoder.len());
        let mut h = x.shallow_clone();
        for stage in &self.encoder {
            for b in stage {
                h = b.forward(&h, self.conv_kind);
            }
            skips.push(h.shallow_clone());
        }
        let mut outputs = Vec::with_capacity(self.decoder.len());
        let n = skips.len();
        for (d, dec) in self.decoder.iter().enumerate() {
            h = Tensor::cat(&[dec.up.forward(&h, self.conv_kind), skips[n - 2 - d].shallow_clone()], 1);
            for b in &dec.blocks {
                h = b.forward(&h, self.conv_kind);
            }
            if self.spec.deep_supervision || d == self.decoder.len() - 1 {
                outputs.push(dec.head.forward(&h, self.conv_kind));
            }
        }
        outputs.reverse();
        outputs
    }
}

/// Trainable parameters of a variable store.
pub fn count_parameters(vs: &nn::VarStore) -> u64 {
    vs.trainable_variables().iter().map(|t| t.numel() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planning::topology::{features_per_stage, pool_and_conv_props};
    use tch::Device;

    fn spec(spacing: &[f64], patch: &[usize], max_features: usize, classes: usize) -> NetworkSpec {
        let t = pool_and_conv_props(spacing, patch, 4, 999_999);
        let n = t.strides.len();
        NetworkSpec::plain(spacing.len(), 1, classes, features_per_stage(n, 32, max_features), t.kernels, t.strides)
    }

    #[test]
    fn the_papers_networks_have_their_exact_parameter_counts() {
        for (s, want) in [
            (spec(&[1.0; 3], &[112, 160, 128], 320, 14), 30_795_654u64),
            (spec(&[1.0; 2], &[512, 512], 480, 14), 41_287_490),
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let _net = UNet::new(&vs.root(), &s);
            assert_eq!(count_parameters(&vs), want);
            assert_eq!(s.parameter_count, want, "the plan's count agrees with tch's");
        }
    }

    #[test]
    fn the_plans_negative_slope_is_used() {
        let x = Tensor::from_slice(&[-2.0f32, -0.5, 0.0, 1.5]);
        let default: Vec<f32> = Vec::try_from(leaky_relu(&x, 0.01)).unwrap();
        assert_eq!(default, vec![-0.02, -0.005, 0.0, 1.5]);
        let steep: Vec<f32> = Vec::try_from(leaky_relu(&x, 0.3)).unwrap();
        for (a, b) in steep.iter().zip([-0.6f32, -0.15, 0.0, 1.5]) {
            assert!((a - b).abs() < 1e-6, "{steep:?}");
        }
        // And reaches the network: the same weights, another slope, other outputs.
        let mut s = spec(&[1.0; 3], &[8, 16, 16], 16, 3);
        let out = |s: &NetworkSpec| {
            tch::manual_seed(3);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = UNet::new(&vs.root(), s);
            tch::manual_seed(4);
            net.forward(&Tensor::randn([1, 1, 8, 16, 16], (Kind::Float, Device::Cpu))).remove(0)
        };
        let a = out(&s);
        s.negative_slope = 0.3;
        let b = out(&s);
        assert!((a - b).abs().max().double_value(&[]) > 1e-3);
    }

    #[test]
    fn bfloat16_convolutions_stay_close_to_float32_and_train_the_float32_weights() {
        let s = spec(&[2.0, 1.0, 1.0], &[8, 16, 16], 32, 4);
        tch::manual_seed(11);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut net = UNet::new(&vs.root(), &s);
        let x = Tensor::randn([2, 1, 8, 16, 16], (Kind::Float, Device::Cpu));
        let full = tch::no_grad(|| net.forward(&x));
        net.conv_kind = Some(Kind::BFloat16);
        let low = net.forward(&x);
        for (f, l) in full.iter().zip(&low) {
            assert_eq!(l.kind(), Kind::Float, "outputs come back in float32");
            let scale = f.abs().max().double_value(&[]);
            let d = (f - l).abs().max().double_value(&[]);
            // bfloat16 keeps 8 bits of mantissa: a few per cent; the same float32 path: 0.
            assert!(d > 0.0 && d < 0.05 * scale, "{d} of {scale}");
        }
        low.iter()
            .map(|o| o.sum(Kind::Float))
            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b)
            .backward();
        for v in vs.trainable_variables() {
            assert_eq!(v.kind(), Kind::Float);
            assert_eq!(v.grad().kind(), Kind::Float);
        }
        assert!(vs.trainable_variables().iter().all(|v| v.grad().defined()), "every weight gets a gradient");
    }

    #[test]
    fn outputs_have_the_deep_supervision_shapes() {
        let s = spec(&[2.0, 1.0, 1.0], &[16, 32, 32], 64, 3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), &s);
        let x = Tensor::randn([2, 1, 16, 32, 32], (Kind::Float, Device::Cpu));
        let out = net.forward(&x);
        assert_eq!(out.len(), s.n_stages() - 1);
        assert_eq!(out[0].size(), vec![2, 3, 16, 32, 32]);
        // Each lower output is the cumulative stride smaller.
        let mut cum = [1i64; 3];
        for (i, o) in out.iter().enumerate() {
            let sz = o.size();
            for a in 0..3 {
                assert_eq!(sz[2 + a], [16, 32, 32][a] / cum[a], "output {i}");
            }
            for a in 0..3 {
                cum[a] *= s.strides[i + 1][a] as i64;
            }
        }
        assert!(out.iter().all(|o| o.isfinite().all().int64_value(&[]) == 1));
    }

    #[test]
    fn a_2d_network_predicts_each_slice_of_a_volume_on_its_own() {
        tch::manual_seed(7);
        let s = spec(&[1.0, 1.0], &[32, 48], 32, 4);
        assert_eq!(s.dim, 2);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = UNet::new(&vs.root(), &s);
        let volume = Tensor::randn([2, 1, 3, 32, 48], (Kind::Float, Device::Cpu));
        let out = net.forward(&volume);
        assert_eq!(out[0].size(), vec![2, 4, 3, 32, 48]);
        // Deep-supervision outputs keep z: slices are never pooled together.
        assert_eq!(out[1].size()[2], 3);
        for n in 0..2 {
            for z in 0..3 {
                let slice = volume.get(n).select(1, z).unsqueeze(0);
                let alone = net.forward(&slice);
                assert_eq!(alone[0].size(), vec![1, 4, 32, 48]);
                for (o, a) in out.iter().zip(&alone) {
                    let d = (o.get(n).select(1, z) - a.get(0)).abs().max().double_value(&[]);
                    // float32 convolutions over a batch of 6 slices or of 1 sum in different
                    // orders (1e-5 was exceeded once in CI); a mixed-up slice differs by ~1.
                    assert!(d < 1e-4, "slice {n},{z}: {d}");
                }
            }
        }
    }
}
