//! SGD with Nesterov momentum and weight decay (PyTorch's semantics), with its
//! momentum buffers held here so checkpoints can save and restore them exactly
//! (tch's built-in optimizers keep their state out of reach).

use std::collections::BTreeMap;

use tch::{nn, Kind, Tensor};

pub struct Sgd {
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// Variable name → momentum buffer (absent until the first step).
    pub buffers: BTreeMap<String, Tensor>,
}

impl Sgd {
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64) -> Sgd {
        Sgd { momentum, nesterov, weight_decay, buffers: BTreeMap::new() }
    }

    /// One step over every trainable variable that has a gradient.
    pub fn step(&mut self, vs: &nn::VarStore, lr: f64) {
        tch::no_grad(|| {
            let vars = vs.variables();
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            for name in names {
                let p = &vars[name];
                let g = p.grad();
                if !g.defined() || !p.requires_grad() {
                    continue;
                }
                let d = if self.weight_decay != 0.0 { &g + p * self.weight_decay } else { g.shallow_clone() };
                let buf = match self.buffers.get_mut(name) {
                    Some(b) => {
                        let _ = b.g_mul_scalar_(self.momentum).g_add_(&d);
                        b.shallow_clone()
                    }
                    None => {
                        let b = d.detach().copy();
                        self.buffers.insert(name.clone(), b.shallow_clone());
                        b
                    }
                };
                let update = if self.nesterov { &d + &buf * self.momentum } else { buf };
                let mut p = p.shallow_clone();
                let _ = p.g_add_(&(update * -lr));
            }
        });
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`;
/// returns the norm before clipping.
pub fn clip_grad_norm(vs: &nn::VarStore, max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = vs.trainable_variables().iter().map(|v| v.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        // One host sync for the whole network (on CUDA each `double_value` waits for the
        // device): the squared norms are summed on the device first.
        let squares: Vec<Tensor> = grads.iter().map(|g| g.pow_tensor_scalar(2).sum(Kind::Float)).collect();
        let total = Tensor::stack(&squares, 0).to_kind(Kind::Double).sum(Kind::Double).sqrt().double_value(&[]);
        if total > max_norm {
            let scale = max_norm / (total + 1e-6);
            for g in &grads {
                let mut g = g.shallow_clone();
                let _ = g.g_mul_scalar_(scale);
            }
        }
        total
    })
}

pub fn zero_grad(vs: &nn::VarStore) {
    for v in vs.trainable_variables() {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn nesterov_step_matches_the_formula() {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().var("w", &[2], nn::Init::Const(1.0));
        let mut sgd = Sgd::new(0.9, true, 0.1);
        // loss = sum(3·w) -> grad 3; with decay 0.1·w: d = 3.1
        for step in 0..2 {
            zero_grad(&vs);
            (&p * 3.0).sum(Kind::Float).backward();
            let before = p.double_value(&[0]);
            sgd.step(&vs, 0.01);
            let d = 3.0 + 0.1 * before;
            let buf = if step == 0 { d } else { 0.9 * 3.1 + d };
            let want = before - 0.01 * (d + 0.9 * buf);
            assert!((p.double_value(&[0]) - want).abs() < 1e-6, "step {step}");
        }
        assert_eq!(sgd.buffers.len(), 1);
    }

    /// The per-parameter clipping this module used before (one host sync per tensor).
    fn clip_per_parameter(vs: &nn::VarStore, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let grads: Vec<Tensor> =
                vs.trainable_variables().iter().map(|v| v.grad()).filter(|g| g.defined()).collect();
            let total: f64 =
                grads.iter().map(|g| g.pow_tensor_scalar(2).sum(Kind::Float).double_value(&[])).sum::<f64>().sqrt();
            if total > max_norm {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_scalar_(max_norm / (total + 1e-6));
                }
            }
            total
        })
    }

    #[test]
    fn twenty_steps_with_one_sync_per_step_equal_the_per_parameter_steps() {
        use crate::planning::topology::{features_per_stage, pool_and_conv_props, NetworkSpec};
        let t = pool_and_conv_props(&[2.0, 1.0, 1.0], &[8, 16, 16], 4, 999_999);
        let spec = NetworkSpec::plain(3, 1, 4, features_per_stage(t.strides.len(), 8, 32), t.kernels, t.strides);
        // libtorch's RNG is global and other tests use it in parallel: both runs start from
        // one set of weights (copied) and see inputs made without it.
        let start = nn::VarStore::new(Device::Cpu);
        let _ = crate::training::network::UNet::new(&start.root(), &spec);
        let run = |one_sync: bool| {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net = crate::training::network::UNet::new(&vs.root(), &spec);
            vs.copy(&start).unwrap();
            let mut sgd = Sgd::new(0.9, true, 3e-5);
            let mut norms = Vec::new();
            for step in 0..20 {
                let x = (Tensor::arange(2 * 8 * 16 * 16, (Kind::Float, Device::Cpu)) * (0.37 + 0.01 * step as f64))
                    .sin()
                    .reshape([2, 1, 8, 16, 16]);
                zero_grad(&vs);
                // Large enough to be clipped at norm 12 in the first steps.
                (net.forward(&x)[0].pow_tensor_scalar(2).mean(Kind::Float) * 500.0).backward();
                norms.push(if one_sync { clip_grad_norm(&vs, 12.0) } else { clip_per_parameter(&vs, 12.0) });
                sgd.step(&vs, 0.05);
            }
            let mut weights: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            weights.sort_by(|a, b| a.0.cmp(&b.0));
            (norms, weights)
        };
        let (na, wa) = run(true);
        let (nb, wb) = run(false);
        assert!(na.iter().any(|&n| n > 12.0), "clipping was exercised: {na:?}");
        for (a, b) in na.iter().zip(&nb) {
            assert!((a - b).abs() <= 1e-6 * b.max(1.0), "norm {a} vs {b}");
        }
        for ((ka, a), (_, b)) in wa.iter().zip(&wb) {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d <= 1e-6, "{ka}: {d}");
        }
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs.root().var("a", &[4], nn::Init::Const(1.0));
        (&a * 100.0).sum(Kind::Float).backward();
        let before = clip_grad_norm(&vs, 12.0);
        assert!((before - 200.0).abs() < 1e-3);
        let after: f64 = a.grad().pow_tensor_scalar(2).sum(Kind::Float).double_value(&[]).sqrt();
        assert!((after - 12.0).abs() < 1e-3);
    }
}

/// Dynamic loss scaling for fp16 mixed precision (PyTorch's `GradScaler`): the loss
/// is multiplied by `scale` before backward; gradients are unscaled before clipping;
/// a step whose gradients overflowed is skipped and the scale halved; after
/// `growth_interval` clean steps the scale doubles.
pub struct LossScaler {
    pub scale: f64,
    pub growth_interval: usize,
    clean_steps: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler { scale: 65536.0, growth_interval: 2000, clean_steps: 0 }
    }
}

impl LossScaler {
    /// Clean steps since the scale last changed (checkpointed with the scale).
    pub fn clean_steps(&self) -> usize {
        self.clean_steps
    }

    pub fn set_clean_steps(&mut self, n: usize) {
        self.clean_steps = n;
    }

    /// Divides the gradients by the scale; false (and the scale halved) when any is
    /// not finite, in which case the caller skips the optimizer step.
    pub fn unscale(&mut self, vs: &nn::VarStore) -> bool {
        let finite = tch::no_grad(|| {
            let mut checks = Vec::new();
            for v in vs.trainable_variables() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(1.0 / self.scale);
                    checks.push(g.isfinite().all());
                }
            }
            // One host sync, not one per parameter.
            checks.is_empty() || Tensor::stack(&checks, 0).all().int64_value(&[]) == 1
        });
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
        }
        finite
    }
}

#[cfg(test)]
mod scaler_tests {
    use super::*;
    use tch::Device;

    #[test]
    fn overflowing_gradients_skip_the_step_and_halve_the_scale() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        let mut s = LossScaler { scale: 8.0, growth_interval: 2, clean_steps: 0 };
        (&w * 8.0).sum(Kind::Float).backward(); // scaled loss: gradient 8 per element
        assert!(s.unscale(&vs));
        assert!((w.grad().double_value(&[0]) - 1.0).abs() < 1e-9);
        zero_grad(&vs);
        (&w * f64::INFINITY).sum(Kind::Float).backward();
        assert!(!s.unscale(&vs));
        assert_eq!(s.scale, 4.0);
        for _ in 0..2 {
            zero_grad(&vs);
            (&w * 4.0).sum(Kind::Float).backward();
            assert!(s.unscale(&vs));
        }
        assert_eq!(s.scale, 8.0, "doubles after growth_interval clean steps");
    }
}
