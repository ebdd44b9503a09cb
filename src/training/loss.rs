//! nnU-Net's Dice + cross-entropy, over deep-supervision outputs, and the CPS term.
//!
//! Dice is nnU-Net's memory-efficient soft Dice: softmax probabilities, background
//! excluded, `(2·tp + smooth) / max(2·tp + fp + fn + smooth, 1e-8)` averaged over
//! classes (and over samples unless batch Dice), negated; smooth 1e-5. Voxels with
//! the ignore label count for neither term.

use tch::{Kind, Reduction, Tensor};

pub const DICE_SMOOTH: f64 = 1e-5;
/// Label of voxels that no loss term sees (nnU-Net's padding label, −1 there).
pub const IGNORE_INDEX: i64 = 255;

/// Sums over every rank of a data-parallel run: the global value, with the gradient
/// flowing to this rank's own part only. Losses built from such sums are the loss of
/// the global batch on every rank, and summing the ranks' gradients gives its gradient
/// (nnU-Net's DDP gathers Dice's tp/fp/fn for the same reason, with `AllGatherGrad`).
pub trait GlobalSum {
    fn global_sum(&self, local: &Tensor) -> Tensor;
}

/// A collective that failed inside a loss (which returns tensors, not results): unwound
/// to the trainer, which reports it as the collective's fault.
pub struct CollectiveFailure(pub String);

/// The global sum, `local + (Σ_ranks local − local)` with the bracket detached.
impl GlobalSum for crate::distributed::ProcessGroup {
    fn global_sum(&self, local: &Tensor) -> Tensor {
        let mine = local.detach();
        let mut all = mine.to_device(self.device()).to_kind(Kind::Double).contiguous();
        // A failed collective ends the step as a trainer fault with its cause (unwound
        // without the panic hook's noise; the trainer turns it into Fault::Collective).
        if let Err(e) = self.all_reduce_sum(&mut all) {
            std::panic::resume_unwind(Box::new(CollectiveFailure(e)));
        }
        local + (all.to_device(local.device()).to_kind(local.kind()) - mine)
    }
}

#[derive(Clone, Copy)]
pub struct DiceCe<'a> {
    pub batch_dice: bool,
    pub smooth: f64,
    pub ignore_index: Option<i64>,
    /// Across data-parallel ranks: sums over the global batch (None: this batch alone).
    pub ranks: Option<&'a dyn GlobalSum>,
}

impl std::fmt::Debug for DiceCe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiceCe")
            .field("batch_dice", &self.batch_dice)
            .field("smooth", &self.smooth)
            .field("ignore_index", &self.ignore_index)
            .field("across_ranks", &self.ranks.is_some())
            .finish()
    }
}

impl Default for DiceCe<'_> {
    fn default() -> Self {
        DiceCe { batch_dice: true, smooth: DICE_SMOOTH, ignore_index: Some(IGNORE_INDEX), ranks: None }
    }
}

/// Several sums reduced in one collective: stacked, summed globally, split again.
fn global_sums(ranks: &dyn GlobalSum, parts: &[Tensor]) -> Vec<Tensor> {
    let sizes: Vec<i64> = parts.iter().map(|p| p.numel() as i64).collect();
    let flat: Vec<Tensor> = parts.iter().map(|p| p.to_kind(Kind::Float).reshape([-1])).collect();
    let total = ranks.global_sum(&Tensor::cat(&flat, 0));
    let mut offset = 0;
    parts
        .iter()
        .zip(&sizes)
        .map(|(p, &n)| {
            let part = total.narrow(0, offset, n).reshape(p.size());
            offset += n;
            part
        })
        .collect()
}

/// One output's class scores, computed once for every loss term that reads them: the
/// supervised term reads the labeled samples' ([`Scores::first`]), the CPS term all of
/// them, and autograd keeps one softmax and one log-softmax per output, not one per term.
#[derive(Debug)]
pub struct Scores {
    log_probs: Tensor,
    probs: Tensor,
}

impl Scores {
    /// `logits` [B, C, spatial…].
    pub fn new(logits: &Tensor) -> Scores {
        Scores { log_probs: logits.log_softmax(1, Kind::Float), probs: logits.softmax(1, Kind::Float) }
    }

    /// The first `n` samples' scores (views, no copy).
    pub fn first(&self, n: i64) -> Scores {
        Scores { log_probs: self.log_probs.narrow(0, 0, n), probs: self.probs.narrow(0, 0, n) }
    }
}

impl DiceCe<'_> {
    /// `logits` [B, C, spatial…], `target` [B, spatial…] (int64). Returns the scalar
    /// `CE + (−Dice)` (it goes negative as Dice approaches 1, as nnU-Net's does).
    pub fn loss(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        self.loss_of(&Scores::new(logits), target)
    }

    /// [`DiceCe::loss`] from scores already computed.
    pub fn loss_of(&self, scores: &Scores, target: &Tensor) -> Tensor {
        self.ce_of(scores, target) + self.soft_dice_of(scores, target)
    }

    pub fn ce(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        self.ce_of(&Scores::new(logits), target)
    }

    /// −mean Dice over foreground classes.
    pub fn soft_dice_loss(&self, logits: &Tensor, target: &Tensor) -> Tensor {
        self.soft_dice_of(&Scores::new(logits), target)
    }

    /// Cross-entropy as torch's: the mean negative log-likelihood over voxels not ignored.
    fn ce_of(&self, scores: &Scores, target: &Tensor) -> Tensor {
        let ignore = self.ignore_index.unwrap_or(-100);
        let Some(ranks) = self.ranks else {
            return scores.log_probs.nll_loss_nd::<Tensor>(target, None, Reduction::Mean, ignore);
        };
        // The mean over the global batch's voxels: global sum over global count.
        let sum = scores.log_probs.nll_loss_nd::<Tensor>(target, None, Reduction::Sum, ignore);
        let count = tch::no_grad(|| target.ne(ignore).sum(Kind::Float));
        let g = global_sums(ranks, &[sum, count]);
        &g[0] / &g[1]
    }

    fn soft_dice_of(&self, scores: &Scores, target: &Tensor) -> Tensor {
        let probs = &scores.probs;
        let c = probs.size()[1];
        let (t, mask) = match self.ignore_index {
            Some(ig) => {
                let keep = target.ne(ig);
                (target.where_scalarother(&keep, 0), Some(keep.unsqueeze(1)))
            }
            None => (target.shallow_clone(), None),
        };
        let dims = probs.dim() as i64;
        // A bool one-hot scattered without gradient, as nnU-Net's: the product below keeps
        // it for the backward pass, a quarter of the bytes of a float one.
        let mut onehot = tch::no_grad(|| {
            Tensor::zeros(probs.size(), (Kind::Bool, probs.device())).scatter_value(1, &t.unsqueeze(1), 1.0)
        });
        let mut p = probs.shallow_clone();
        if let Some(m) = &mask {
            // Not in place: softmax's backward needs its output unchanged.
            p = &p * m;
            onehot = onehot.logical_and(m);
        }
        // Foreground classes only.
        let p = p.narrow(1, 1, c - 1);
        let y = onehot.narrow(1, 1, c - 1);
        let axes: Vec<i64> =
            if self.batch_dice { std::iter::once(0).chain(2..dims).collect() } else { (2..dims).collect() };
        let mut tp = (&p * &y).sum_dim_intlist(axes.as_slice(), false, Kind::Float);
        let mut sum_pred = p.sum_dim_intlist(axes.as_slice(), false, Kind::Float);
        let mut sum_gt = y.sum_dim_intlist(axes.as_slice(), false, Kind::Float);
        if let (Some(ranks), true) = (self.ranks, self.batch_dice) {
            // Batch Dice of the global batch: its tp, fp + tp and fn + tp summed over ranks.
            let g = global_sums(ranks, &[tp, sum_pred, sum_gt]);
            (tp, sum_pred, sum_gt) = (g[0].shallow_clone(), g[1].shallow_clone(), g[2].shallow_clone());
        }
        let dc = (tp * 2.0 + self.smooth) / (sum_pred + sum_gt + self.smooth).clamp_min(1e-8);
        match (self.ranks, self.batch_dice) {
            (Some(ranks), false) => {
                // The mean of per-sample Dice over the global batch's samples.
                let count = Tensor::from(dc.numel() as f64).to_kind(Kind::Float).to_device(dc.device());
                let g = global_sums(ranks, &[dc.sum(Kind::Float), count]);
                -(&g[0] / &g[1])
            }
            _ => -dc.mean(Kind::Float),
        }
    }
}

/// nnU-Net's deep-supervision weights: 1/2^i, the lowest resolution 0, normalised.
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    let mut w: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    if n > 1 {
        w[n - 1] = 0.0;
    }
    let s: f64 = w.iter().sum();
    w.iter().map(|v| v / s).collect()
}

/// Weighted loss over deep-supervision outputs' scores (full resolution first) and
/// their targets; outputs with weight 0 are skipped.
pub fn deep_supervised(loss: &DiceCe<'_>, outputs: &[Scores], targets: &[Tensor]) -> Tensor {
    assert_eq!(outputs.len(), targets.len(), "one target per output");
    let w = deep_supervision_weights(outputs.len());
    let mut total = Tensor::zeros([], (Kind::Float, outputs[0].probs.device()));
    for ((o, t), &wi) in outputs.iter().zip(targets).zip(&w) {
        if wi > 0.0 {
            total += loss.loss_of(o, t) * wi;
        }
    }
    total
}

/// Hard pseudo-labels: the argmax over classes of each output, without gradient.
pub fn pseudo_labels(outputs: &[Tensor]) -> Vec<Tensor> {
    tch::no_grad(|| outputs.iter().map(|o| o.argmax(1, false)).collect())
}

/// The CPS term of one network: its outputs supervised by its sibling's argmax
/// labels at every scale, `l(T_self(x), argmax T_sibling(x))`.
pub fn cps_term(loss: &DiceCe<'_>, own_outputs: &[Scores], sibling_labels: &[Tensor]) -> Tensor {
    deep_supervised(loss, own_outputs, sibling_labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }

    #[test]
    fn cross_entropy_and_dice_match_values_worked_out_by_hand() {
        // One sample, 2 classes, 2 voxels. Logits (0, 0) and (0, ln 3): softmax
        // foreground probabilities 0.5 and 0.75. Targets 0 and 1.
        let logits = t(&[0.0, 0.0, 0.0, 3f32.ln()], &[1, 2, 2]);
        let target = Tensor::from_slice(&[0i64, 1]).reshape([1, 2]);
        let l = DiceCe { batch_dice: true, smooth: 0.0, ignore_index: None, ranks: None };
        // CE = (−ln 0.5 − ln 0.75) / 2
        let ce = ((-(0.5f64).ln()) + (-(0.75f64).ln())) / 2.0;
        assert!((l.ce(&logits, &target).double_value(&[]) - ce).abs() < 1e-6);
        // Foreground Dice: tp = 0.75, pred sum 1.25, gt sum 1 -> 1.5/2.25.
        let dice = 1.5 / 2.25;
        assert!((l.soft_dice_loss(&logits, &target).double_value(&[]) + dice).abs() < 1e-6);
        assert!((l.loss(&logits, &target).double_value(&[]) - (ce - dice)).abs() < 1e-6);
    }

    #[test]
    fn ignored_voxels_count_for_nothing() {
        let logits = t(&[0.0, 5.0, 0.0, 3f32.ln(), -5.0, 0.0], &[1, 2, 3]);
        let full = Tensor::from_slice(&[0i64, 1, 0]).reshape([1, 3]);
        let ignored = Tensor::from_slice(&[0i64, 1, IGNORE_INDEX]).reshape([1, 3]);
        let l = DiceCe { batch_dice: false, smooth: 0.0, ignore_index: Some(IGNORE_INDEX), ranks: None };
        let two = logits.narrow(2, 0, 2);
        let two_target = Tensor::from_slice(&[0i64, 1]).reshape([1, 2]);
        let a = l.loss(&logits, &ignored).double_value(&[]);
        let b = l.loss(&two, &two_target).double_value(&[]);
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        assert!((l.loss(&logits, &full).double_value(&[]) - a).abs() > 1e-3);
    }

    #[test]
    fn without_ignored_voxels_the_unmasked_loss_is_the_masked_one() {
        // The trainer drops the mask when no voxel carries the ignore label.
        tch::manual_seed(3);
        let logits = Tensor::randn([2, 5, 3, 4, 6], (Kind::Float, Device::Cpu));
        let target = Tensor::randint(5, [2, 3, 4, 6], (Kind::Int64, Device::Cpu));
        let masked = DiceCe::default();
        let unmasked = DiceCe { ignore_index: None, ..masked };
        let (a, b) =
            (masked.loss(&logits, &target).double_value(&[]), unmasked.loss(&logits, &target).double_value(&[]));
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    #[test]
    fn batch_dice_pools_samples_and_the_smooth_term_handles_empty_classes() {
        // Sample 0 has foreground, sample 1 none: per-sample Dice of sample 1 is
        // smooth/smooth = 1 only with the smoothing term.
        let logits = Tensor::zeros([2, 2, 4], (Kind::Float, Device::Cpu));
        let target = Tensor::from_slice(&[1i64, 1, 0, 0, 0, 0, 0, 0]).reshape([2, 4]);
        let per = DiceCe { batch_dice: false, smooth: 1e-5, ignore_index: None, ranks: None };
        let batch = DiceCe { batch_dice: true, ..per };
        // Sample 0: tp 1, pred 2, gt 2 -> 2/4; sample 1: tp 0, pred 2, gt 0 -> ~0.
        let d_per = -per.soft_dice_loss(&logits, &target).double_value(&[]);
        assert!((d_per - (0.5 + 1e-5 / 2.00001) / 2.0).abs() < 1e-4, "{d_per}");
        // Pooled: tp 1, pred 4, gt 2 -> 2/6.
        let d_batch = -batch.soft_dice_loss(&logits, &target).double_value(&[]);
        assert!((d_batch - 2.0 / 6.0).abs() < 1e-4, "{d_batch}");
    }

    #[test]
    fn deep_supervision_weights_follow_nnunet() {
        let w = deep_supervision_weights(4);
        // 1, 1/2, 1/4, 0 normalised by 1.75.
        for (a, b) in w.iter().zip([1.0 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0]) {
            assert!((a - b).abs() < 1e-12);
        }
        assert_eq!(deep_supervision_weights(1), vec![1.0]);
    }

    #[test]
    fn the_cps_term_uses_the_siblings_argmax_and_no_gradient_reaches_it() {
        let own = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let sibling = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let l = DiceCe::default();
        let labels = pseudo_labels(&[sibling.shallow_clone()]);
        assert!(!labels[0].requires_grad());
        let cps = cps_term(&l, &[Scores::new(&own)], &labels);
        let direct = l.loss(&own, &sibling.argmax(1, false));
        assert!((cps.double_value(&[]) - direct.double_value(&[])).abs() < 1e-6);
        // A known sibling: all class 2 everywhere gives the loss against all-2 labels.
        let fixed = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let _ = fixed.narrow(1, 2, 1).fill_(10.0);
        let all_two = Tensor::full([2, 4, 4], 2, (Kind::Int64, Device::Cpu));
        let a = cps_term(&l, &[Scores::new(&own)], &pseudo_labels(&[fixed])).double_value(&[]);
        assert!((a - l.loss(&own, &all_two).double_value(&[])).abs() < 1e-6);
        cps.backward();
        assert!(own.grad().defined() && own.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(!sibling.grad().defined(), "no gradient flows into the sibling");
    }

    /// The inputs of `scripts/reference/loss.py` (same formulas).
    fn golden_logits(batch: i64, shape: [i64; 3], classes: i64, net: i64) -> Tensor {
        let n = batch * classes * shape.iter().product::<i64>();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let i = i as f64;
                (2.0 * (0.37 * i + 0.9 * net as f64).sin() + 0.5 * (0.05 * i * (net + 1) as f64).cos()) as f32
            })
            .collect();
        Tensor::from_slice(&v).reshape([batch, classes, shape[0], shape[1], shape[2]])
    }

    fn golden_target(batch: i64, shape: [i64; 3], classes: i64) -> Tensor {
        let mut v = Vec::new();
        for b in 0..batch {
            for z in 0..shape[0] {
                for y in 0..shape[1] {
                    for x in 0..shape[2] {
                        v.push(if (x + y) % 5 == 0 { 0 } else { (z * 7 + y * 3 + x + 2 * b) % classes });
                    }
                }
            }
        }
        Tensor::from_slice(&v).reshape([batch, shape[0], shape[1], shape[2]])
    }

    #[test]
    fn dice_ce_with_deep_supervision_and_the_cps_sum_equal_nnunets_values() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/loss.json");
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let classes = g["classes"].as_i64().unwrap();
        let shapes: Vec<[i64; 3]> =
            g["shapes"].as_array().unwrap().iter().map(|s| std::array::from_fn(|a| s[a].as_i64().unwrap())).collect();
        for case in g["cases"].as_array().unwrap() {
            let l = DiceCe { batch_dice: case["batch_dice"].as_bool().unwrap(), ..Default::default() };
            let (bl, bu) = (case["labeled"].as_i64().unwrap(), case["unlabeled"].as_i64().unwrap());
            let w = deep_supervision_weights(shapes.len());
            for (a, b) in w.iter().zip(case["ds_weights"].as_array().unwrap()) {
                assert!((a - b.as_f64().unwrap()).abs() < 1e-12);
            }
            let p: Vec<Vec<Tensor>> =
                (0..2).map(|net| shapes.iter().map(|&s| golden_logits(bl + bu, s, classes, net)).collect()).collect();
            let y: Vec<Tensor> = shapes.iter().map(|&s| golden_target(bl, s, classes)).collect();
            let lambda = case["lambda"].as_f64().unwrap();
            let mut ours_total = 0.0;
            for net in 0..2 {
                // As the trainer: one set of scores per output, the labeled samples' a view.
                let scores: Vec<Scores> = p[net].iter().map(Scores::new).collect();
                let labeled: Vec<Scores> = scores.iter().map(|s| s.first(bl)).collect();
                let sup = deep_supervised(&l, &labeled, &y).double_value(&[]);
                let want = case["sup"][net].as_f64().unwrap();
                assert!(
                    (sup - want).abs() < 1e-5,
                    "batch_dice {}: net {net} sup {sup} vs nnU-Net {want}",
                    l.batch_dice
                );
                // The sibling's argmax over labeled and unlabeled samples together.
                let cps = cps_term(&l, &scores, &pseudo_labels(&p[1 - net])).double_value(&[]);
                let want = case["cps"][net].as_f64().unwrap();
                assert!((cps - want).abs() < 1e-5, "net {net} cps {cps} vs nnU-Net {want}");
                ours_total += sup + lambda * cps;
            }
            // Each trainer's L_sup + λ·L_cps sums to the authors' single loss.
            let authors = case["authors_total"].as_f64().unwrap();
            assert!((ours_total - authors).abs() < 1e-5, "{ours_total} vs {authors}");
        }
    }
}
