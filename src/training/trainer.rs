//! The two CPS trainers: each a thread owning its network, optimizer and device, an
//! actor driven by typed commands. Both receive the same batch; every step each sends
//! its argmax labels (all output scales, no gradient) with the batch's number to its
//! sibling, receives the sibling's, and trains on `L = L_sup + λ·L_cps`. A
//! supervised-only mode trains one network alone.
//!
//! Nothing here waits forever: waits for a batch or for the sibling's labels poll a
//! shared [`Cancel`] token (set by the supervisor when anything fails) and time out
//! with an error naming the side that stalled.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use tch::{nn, Device, Kind, Tensor};

use super::loss::{deep_supervised, pseudo_labels, DiceCe, Scores, IGNORE_INDEX};
use super::network::UNet;
use super::records::StepPhases;
use super::sgd::{clip_grad_norm, zero_grad, LossScaler, Sgd};
use crate::planning::topology::NetworkSpec;
use cps3d_actors::datapath::Batch;

/// What the supervisor asks a trainer to do.
pub enum Command {
    /// Train `steps` steps of `epoch` on batches from `batches` with this learning rate and λ.
    Train { epoch: usize, steps: usize, lr: f64, lambda: f64, batches: Receiver<Arc<Batch>> },
    /// Predict `count` validation batches (labeled samples only) and return the
    /// per-class (tp, fp, fn) summed over them, as nnU-Net's online validation.
    Validate { count: usize, batches: Receiver<Arc<Batch>> },
    /// Write the network, optimizer and loss-scaler state to this file (safetensors).
    Save { path: PathBuf },
    /// Replace the state with that of this file.
    Load { path: PathBuf },
}

/// What a trainer answers when a command succeeded.
pub enum Reply {
    Trained(EpochStats),
    Validated(Vec<[u64; 3]>),
    Saved,
    Loaded,
}

/// Where in training a fault happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepAt {
    pub epoch: usize,
    pub step: usize,
}

/// What went wrong in a trainer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Fault {
    #[error("no batch from the data path in {0} s")]
    DataTimeout(u64),
    #[error("the data path stopped handing out batches")]
    DataStopped,
    #[error("sibling {sibling} sent no pseudo-labels for {seconds} s: it is stalled or gone")]
    ExchangeTimeout { sibling: usize, seconds: u64 },
    #[error("sibling {0} is gone")]
    SiblingGone(usize),
    #[error("the siblings were given different batches (#{mine} and #{theirs})")]
    BatchMismatch { mine: u64, theirs: u64 },
    #[error("out of memory: {0} (a smaller patch or batch, or mixed precision, needs less)")]
    OutOfMemory(String),
    #[error("panicked: {0}")]
    Panic(String),
    #[error("{0}")]
    Checkpoint(String),
    #[error("could not start: {0}")]
    Start(String),
    #[error("{0}")]
    Injected(String),
    #[error("non-finite numbers: {0}")]
    NonFinite(String),
    #[error("{0}")]
    Collective(String),
    #[error("stopped: {0}")]
    Cancelled(String),
}

/// A failed command: which sibling, on which device, where, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sibling {sibling} ({device}){}: {fault}", at.map(|a| format!(", epoch {} step {}", a.epoch, a.step)).unwrap_or_default())]
pub struct TrainerError {
    pub sibling: usize,
    pub device: String,
    pub at: Option<StepAt>,
    pub fault: Fault,
}

impl TrainerError {
    /// Whether this trainer only stopped because something else failed.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.fault, Fault::Cancelled(_))
    }
}

/// Set once by whoever sees a fault first; every wait in the trainers checks it.
#[derive(Default)]
pub struct Cancel {
    set: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Cancel {
    pub fn cancel(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason.into());
        self.set.store(true, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<String> {
        if self.set.load(Ordering::SeqCst) {
            self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
        } else {
            None
        }
    }
}

/// How often a waiting trainer looks at the cancel token.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EpochStats {
    pub steps: usize,
    pub loss: f64,
    pub sup_loss: f64,
    pub cps_loss: f64,
    pub step_seconds: f64,
    /// Share of step time spent waiting for the next batch.
    pub data_wait: f64,
    pub grad_norm: f64,
    /// Steps skipped because fp16 gradients overflowed (CUDA only).
    pub skipped_steps: usize,
    /// Seconds per step in each phase.
    pub phases: StepPhases,
}

pub struct TrainerHandle {
    pub index: usize,
    pub device: Device,
    pub commands: Sender<Command>,
    pub replies: Receiver<Result<Reply, TrainerError>>,
    pub thread: std::thread::JoinHandle<()>,
}

/// The channels between the two siblings: a step's batch number and its argmax
/// labels at every output scale.
pub struct Exchange {
    pub to_sibling: Sender<(u64, Vec<Tensor>)>,
    pub from_sibling: Receiver<(u64, Vec<Tensor>)>,
}

pub fn exchange_pair() -> (Exchange, Exchange) {
    let (a_tx, a_rx) = bounded(1);
    let (b_tx, b_rx) = bounded(1);
    (Exchange { to_sibling: a_tx, from_sibling: b_rx }, Exchange { to_sibling: b_tx, from_sibling: a_rx })
}

pub struct TrainerSetup {
    pub index: usize,
    pub spec: NetworkSpec,
    pub device: Device,
    pub seed: i64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub batch_dice: bool,
    /// fp16 autocast with loss scaling on CUDA (the plan's `cps.mixed_precision`).
    pub mixed_precision: bool,
    /// bfloat16 convolutions when on the CPU.
    pub cpu_bf16: bool,
    /// Encoder stages recomputed in the backward pass instead of keeping their
    /// activations ([`UNet::forward_recomputing`]); 0: none.
    pub recompute_stages: usize,
    pub exchange: Option<Exchange>,
    pub cancel: Arc<Cancel>,
    /// How long a wait for a batch or for the sibling's labels may last.
    pub timeout: Duration,
    /// Incremented after every step (progress bars).
    pub steps_done: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// This sibling's process group over the data-parallel ranks (None: one process).
    /// Each rank trains its slice of every global batch; the losses are the global
    /// batch's and the gradients are summed over the ranks.
    pub ranks: Option<Arc<crate::distributed::ProcessGroup>>,
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}

pub use cps3d_actors::faults::injected;

/// Starts a trainer thread and waits until it has built its network. Networks are
/// built on the thread that owns them (tch tensors are Send, not Sync);
/// `tch::manual_seed` is global, so siblings are started one after the other.
pub fn start(setup: TrainerSetup) -> Result<TrainerHandle, TrainerError> {
    let (cmd_tx, cmd_rx) = bounded::<Command>(1);
    let (rep_tx, rep_rx) = bounded::<Result<Reply, TrainerError>>(1);
    let (built_tx, built_rx) = bounded::<Result<(), String>>(1);
    let (index, device) = (setup.index, setup.device);
    let error = |fault| TrainerError { sibling: index, device: device_name(device), at: None, fault };
    let thread = std::thread::Builder::new()
        .name(format!("trainer-{}", setup.index))
        .spawn(move || {
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(arg) = injected("trainer-start") {
                    if arg == setup.index.to_string() {
                        panic!("injected start failure of sibling {arg}");
                    }
                }
                tch::manual_seed(setup.seed);
                let vs = nn::VarStore::new(setup.device);
                let mut net = UNet::new(&vs.root(), &setup.spec);
                if setup.cpu_bf16 && setup.device == Device::Cpu {
                    net.conv_kind = Some(Kind::BFloat16);
                }
                (vs, net)
            }));
            let (vs, net) = match built {
                Ok(b) => b,
                Err(p) => {
                    let _ = built_tx.send(Err(cps3d_actors::pool::panic_message(p.as_ref())));
                    return;
                }
            };
            let _ = built_tx.send(Ok(()));
            let sgd = Sgd::new(setup.momentum, setup.nesterov, setup.weight_decay);
            let mut state = TrainerState { setup, vs, net, sgd, scaler: LossScaler::default(), ranks_in_sync: false };
            for cmd in cmd_rx.iter() {
                let reply = state.handle(cmd);
                if rep_tx.send(reply).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| error(Fault::Start(format!("spawning its thread: {e}"))))?;
    match built_rx.recv() {
        Ok(Ok(())) => Ok(TrainerHandle { index, device, commands: cmd_tx, replies: rep_rx, thread }),
        Ok(Err(message)) => {
            let _ = thread.join();
            Err(error(Fault::Start(message)))
        }
        Err(_) => {
            let _ = thread.join();
            Err(error(Fault::Start("the thread ended while building the network".into())))
        }
    }
}

/// Two siblings with different He initialisations, each on its device. If the second
/// cannot start, the first is shut down and the error names the second.
pub fn start_pair(mut a: TrainerSetup, mut b: TrainerSetup) -> Result<(TrainerHandle, TrainerHandle), TrainerError> {
    let (ea, eb) = exchange_pair();
    a.exchange = Some(ea);
    b.exchange = Some(eb);
    let ha = start(a)?;
    match start(b) {
        Ok(hb) => Ok((ha, hb)),
        Err(e) => {
            drop(ha.commands);
            let _ = ha.thread.join();
            Err(e)
        }
    }
}

struct TrainerState {
    setup: TrainerSetup,
    vs: nn::VarStore,
    net: UNet,
    sgd: Sgd,
    scaler: LossScaler,
    /// Whether the ranks hold the same weights and optimizer state (set once rank 0's
    /// are broadcast: after start, and after every load).
    ranks_in_sync: bool,
}

/// Labels cross to the device as u8 (an eighth of int64's bytes) and widen there, to
/// the int64 that cross-entropy and the one-hot scatter index with.
fn tensor_u8(data: &[u8], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(data).reshape(shape).to_device(device).to_kind(Kind::Int64)
}

impl TrainerState {
    fn error(&self, at: Option<StepAt>, fault: Fault) -> TrainerError {
        TrainerError { sibling: self.setup.index, device: device_name(self.setup.device), at, fault }
    }

    fn handle(&mut self, cmd: Command) -> Result<Reply, TrainerError> {
        // Where a panic happened, for its message.
        let mut at = None;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cmd {
            Command::Train { epoch, steps, lr, lambda, batches } => {
                self.train(epoch, steps, lr, lambda, &batches, &mut at).map(Reply::Trained)
            }
            Command::Validate { count, batches } => self.validate(count, &batches).map(Reply::Validated),
            Command::Save { path } => self.save(&path).map(|_| Reply::Saved),
            Command::Load { path } => self.load(&path).map(|_| Reply::Loaded),
        }));
        match r {
            Ok(r) => r,
            Err(p) => {
                if let Some(super::loss::CollectiveFailure(e)) = p.downcast_ref::<super::loss::CollectiveFailure>() {
                    return Err(self.error(at, Fault::Collective(e.clone())));
                }
                let message = cps3d_actors::pool::panic_message(p.as_ref());
                // libtorch reports allocation failures as errors that tch turns into panics.
                let fault = if message.to_lowercase().contains("out of memory") {
                    Fault::OutOfMemory(message)
                } else {
                    Fault::Panic(message)
                };
                Err(self.error(at, fault))
            }
        }
    }

    /// Waits for the next batch, watching the cancel token.
    fn next_batch(&self, batches: &Receiver<Arc<Batch>>, at: StepAt) -> Result<Arc<Batch>, TrainerError> {
        let start = Instant::now();
        loop {
            match batches.recv_timeout(POLL) {
                Ok(b) => return Ok(b),
                Err(RecvTimeoutError::Disconnected) => return Err(self.error(Some(at), Fault::DataStopped)),
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some(reason) = self.setup.cancel.reason() {
                return Err(self.error(Some(at), Fault::Cancelled(reason)));
            }
            if start.elapsed() > self.setup.timeout {
                return Err(self.error(Some(at), Fault::DataTimeout(self.setup.timeout.as_secs())));
            }
        }
    }

    /// Sends this step's labels and waits for the sibling's, watching the cancel token.
    fn exchange(&self, index: u64, mine: Vec<Tensor>, at: StepAt) -> Result<Vec<Tensor>, TrainerError> {
        let ex = self.setup.exchange.as_ref().expect("a CPS trainer has a sibling");
        let sibling = 1 - self.setup.index;
        let start = Instant::now();
        let mut message = Some((index, mine));
        let mut theirs = None;
        while message.is_some() || theirs.is_none() {
            if let Some(m) = message.take() {
                match ex.to_sibling.send_timeout(m, POLL) {
                    Ok(()) => {}
                    Err(crossbeam_channel::SendTimeoutError::Timeout(m)) => message = Some(m),
                    Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                        return Err(self.error(Some(at), Fault::SiblingGone(sibling)))
                    }
                }
            }
            if theirs.is_none() {
                match ex.from_sibling.recv_timeout(if message.is_some() { Duration::ZERO } else { POLL }) {
                    Ok(t) => theirs = Some(t),
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(self.error(Some(at), Fault::SiblingGone(sibling)))
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
            if let Some(reason) = self.setup.cancel.reason() {
                return Err(self.error(Some(at), Fault::Cancelled(reason)));
            }
            if start.elapsed() > self.setup.timeout {
                let seconds = self.setup.timeout.as_secs();
                return Err(self.error(Some(at), Fault::ExchangeTimeout { sibling, seconds }));
            }
        }
        let (their_index, labels) = theirs.expect("received");
        if their_index != index {
            return Err(self.error(Some(at), Fault::BatchMismatch { mine: index, theirs: their_index }));
        }
        Ok(labels)
    }

    fn train(
        &mut self,
        epoch: usize,
        steps: usize,
        lr: f64,
        lambda: f64,
        batches: &Receiver<Arc<Batch>>,
        at_out: &mut Option<StepAt>,
    ) -> Result<EpochStats, TrainerError> {
        let dev = self.setup.device;
        let ranks = self.setup.ranks.clone();
        if let (Some(pg), false) = (&ranks, self.ranks_in_sync) {
            self.broadcast_state(pg).map_err(|e| self.error(Some(StepAt { epoch, step: 0 }), Fault::Collective(e)))?;
            self.ranks_in_sync = true;
        }
        let global: Option<&dyn super::loss::GlobalSum> = ranks.as_deref().map(|p| p as &dyn super::loss::GlobalSum);
        let loss = DiceCe { batch_dice: self.setup.batch_dice, ranks: global, ..Default::default() };
        let mut stats = EpochStats::default();
        let mut total = Duration::ZERO;
        let mut phases = StepPhases::default();
        for step in 0..steps {
            let at = StepAt { epoch, step };
            *at_out = Some(at);
            let t0 = Instant::now();
            let batch = self.next_batch(batches, at)?;
            let t1 = Instant::now();
            phases.data += (t1 - t0).as_secs_f64();
            let mut mark = t1;
            let mut lap = |slot: &mut f64| {
                let now = Instant::now();
                *slot += (now - mark).as_secs_f64();
                mark = now;
            };
            self.injected_fault(at)?;
            let [z, y, x] = batch.patch.map(|v| v as i64);
            let n = batch.samples() as i64;
            let bl = batch.labeled as i64;
            let input = Tensor::from_slice(&batch.image).reshape([n, batch.channels as i64, z, y, x]).to_device(dev);
            let amp = dev.is_cuda() && self.setup.mixed_precision;
            // autocast(false, …) is a plain call: autocast is never on around a step.
            let (outputs, first_stage) =
                tch::autocast(amp, || self.net.forward_recomputing(&input, self.setup.recompute_stages));
            let outputs: Vec<Tensor> = outputs.into_iter().map(|o| o.to_kind(Kind::Float)).collect();
            // Targets of the labeled samples at each output scale.
            let mut targets = vec![tensor_u8(&batch.labels, &[bl, z, y, x], dev)];
            for (l, s) in batch.ds_labels.iter().zip(&batch.ds_shapes) {
                targets.push(tensor_u8(l, &[bl, s[0] as i64, s[1] as i64, s[2] as i64], dev));
            }
            targets.truncate(outputs.len());
            lap(&mut phases.forward);
            // Softmax and log-softmax once per output, for both terms.
            let scores: Vec<Scores> = outputs.iter().map(Scores::new).collect();
            let labeled_out: Vec<Scores> = scores.iter().map(|s| s.first(bl)).collect();
            let sup = if bl > 0 {
                // Without ignored voxels (the usual batch; checked on the host, no device
                // sync) the loss needs no mask: two probability-sized tensors fewer per scale.
                let ignored = batch.labels.contains(&(IGNORE_INDEX as u8))
                    || batch.ds_labels.iter().any(|l| l.contains(&(IGNORE_INDEX as u8)));
                let sup_loss = if ignored { loss } else { DiceCe { ignore_index: None, ..loss } };
                deep_supervised(&sup_loss, &labeled_out, &targets)
            } else {
                Tensor::zeros([], (Kind::Float, dev))
            };
            let mut cps_value = 0.0;
            let mut cps_part = None;
            if self.setup.exchange.is_some() {
                lap(&mut phases.loss);
                // Pseudo-labels travel as u8 (class ids < 256: FLARE has 14), widened on arrival.
                let mine = pseudo_labels(&outputs).iter().map(|t| t.to_kind(Kind::Uint8)).collect();
                let theirs = self.exchange(batch.index, mine, at)?;
                let theirs: Vec<Tensor> = theirs.iter().map(|t| t.to_device(dev).to_kind(Kind::Int64)).collect();
                lap(&mut phases.exchange);
                // Argmax labels are classes, never the ignore label: no mask.
                let cps = deep_supervised(&DiceCe { ignore_index: None, ..loss }, &scores, &theirs);
                cps_value = cps.double_value(&[]);
                cps_part = Some(cps);
            }
            // A new tensor, not in place: `sup` is logged on its own below.
            let total_loss = match cps_part {
                Some(cps) => &sup + cps * lambda,
                None => sup.shallow_clone(),
            };
            lap(&mut phases.loss);
            zero_grad(&self.vs);
            // fp16 on CUDA: scaled loss, unscaled gradients, overflowed steps skipped.
            let finish_first_stage = || {
                if let Some(first) = first_stage {
                    tch::autocast(amp, || first.backward(&self.net));
                }
            };
            let scale_before = self.scaler.scale;
            // Every rank's loss is the global batch's, differentiated on its own samples: the
            // global gradient is the sum of the ranks' (before unscaling and clipping).
            let sum_over_ranks = |vs: &nn::VarStore| -> Result<(), TrainerError> {
                let Some(pg) = &ranks else { return Ok(()) };
                let mut grads: Vec<Tensor> =
                    vs.trainable_variables().iter().map(|v| v.grad()).filter(|g| g.defined()).collect();
                pg.all_reduce_sum_many(&mut grads).map_err(|e| self.error(Some(at), Fault::Collective(e)))
            };
            let (norm, stepped) = if amp {
                (&total_loss * self.scaler.scale).backward();
                finish_first_stage();
                sum_over_ranks(&self.vs)?;
                let ok = self.scaler.unscale(&self.vs);
                let norm = if ok { clip_grad_norm(&self.vs, self.setup.grad_clip) } else { f64::NAN };
                (norm, ok)
            } else {
                total_loss.backward();
                finish_first_stage();
                sum_over_ranks(&self.vs)?;
                (clip_grad_norm(&self.vs, self.setup.grad_clip), true)
            };
            lap(&mut phases.backward);
            // Checked before the update, on values the host has anyway: a non-finite step
            // never reaches the weights, so the last checkpoint stays good.
            let loss_value = total_loss.double_value(&[]);
            let diverged = if amp {
                // fp16 overflows are skipped (as PyTorch's GradScaler does) until the scale
                // is at its floor: then it is the network, not the scale.
                !stepped && scale_before <= 1.0
            } else {
                !(loss_value.is_finite() && norm.is_finite())
            };
            if diverged {
                let cause = self.divergence_cause(loss_value, norm, amp, &input, lr);
                return Err(self.error(Some(at), Fault::NonFinite(cause)));
            }
            if stepped {
                self.sgd.step(&self.vs, lr);
            } else {
                stats.skipped_steps += 1;
            }
            stats.loss += loss_value;
            stats.sup_loss += sup.double_value(&[]);
            stats.cps_loss += cps_value;
            if norm.is_finite() {
                stats.grad_norm += norm;
            }
            stats.steps += 1;
            lap(&mut phases.optimizer);
            let step = t0.elapsed();
            total += step;
            if let Some(m) = crate::metrics::global() {
                m.trainer.record_step(self.setup.index, step.as_secs_f64(), (t1 - t0).as_secs_f64());
            }
            if let Some(c) = &self.setup.steps_done {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let k = stats.steps.max(1) as f64;
        stats.loss /= k;
        stats.sup_loss /= k;
        stats.cps_loss /= k;
        stats.grad_norm /= k;
        stats.step_seconds = total.as_secs_f64() / k;
        stats.data_wait = phases.data / total.as_secs_f64().max(1e-9);
        stats.phases = phases.scaled(1.0 / k);
        Ok(stats)
    }

    /// What made a step non-finite, for its error: weights already broken, an image
    /// with NaNs, or a step that diverged from finite weights and data.
    fn divergence_cause(&self, loss: f64, norm: f64, amp: bool, input: &Tensor, lr: f64) -> String {
        let what = if amp {
            "fp16 gradients overflow at loss scale 1 (the floor)".to_string()
        } else if !loss.is_finite() {
            format!("the loss is {loss}")
        } else {
            format!("the gradient norm is {norm}")
        };
        let weights: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        let why = if let Some(bad) = super::checkpoint::first_non_finite(&weights) {
            format!("the weights were already broken: {bad}")
        } else if input.isfinite().logical_not().any().int64_value(&[]) != 0 {
            "the batch's images hold NaN or infinite voxels".to_string()
        } else {
            format!(
                "weights and images are finite, the step diverged: a lower learning rate (now {lr}) or a tighter \
                 gradient clip (plans.json's grad_clip_norm, now {}) keeps it finite",
                self.setup.grad_clip
            )
        };
        format!("{what} ({why}); the step was not applied and no checkpoint holds it")
    }

    /// Faults tests arm with `FAILPOINTS="trainer-step=return(SIBLING:EPOCH:STEP:KIND)"`,
    /// KIND one of `error`, `panic`, `oom`, `hang`, `abort` (the process dies as by
    /// kill -9); `…:KIND:RANK` only in that data-parallel rank (`RANK`).
    fn injected_fault(&self, at: StepAt) -> Result<(), TrainerError> {
        let Some(arg) = injected("trainer-step") else { return Ok(()) };
        let parts: Vec<&str> = arg.split(':').collect();
        let here = [self.setup.index.to_string(), at.epoch.to_string(), at.step.to_string()];
        if !(parts.len() == 4 || parts.len() == 5) || parts[..3] != here {
            return Ok(());
        }
        if parts.len() == 5 && std::env::var("RANK").as_deref() != Ok(parts[4]) {
            return Ok(());
        }
        match parts[3] {
            "error" => Err(self.error(Some(at), Fault::Injected("injected error".into()))),
            "panic" => panic!("injected panic"),
            "oom" => panic!("CUDA out of memory. Tried to allocate 2.00 GiB (injected)"),
            "abort" => std::process::abort(),
            "hang" => loop {
                // Stalls until the supervisor gives up on this trainer.
                if let Some(reason) = self.setup.cancel.reason() {
                    return Err(self.error(Some(at), Fault::Cancelled(reason)));
                }
                std::thread::sleep(POLL);
            },
            _ => Ok(()),
        }
    }

    fn validate(&self, count: usize, batches: &Receiver<Arc<Batch>>) -> Result<Vec<[u64; 3]>, TrainerError> {
        let classes = self.setup.spec.num_classes;
        let mut counts = vec![[0u64; 3]; classes];
        tch::no_grad(|| {
            for i in 0..count {
                let batch = self.next_batch(batches, StepAt { epoch: usize::MAX, step: i })?;
                let [z, y, x] = batch.patch.map(|v| v as i64);
                let n = batch.labeled as i64;
                let pn = (z * y * x) as usize;
                let input = Tensor::from_slice(&batch.image[..batch.labeled * batch.channels * pn])
                    .reshape([n, batch.channels as i64, z, y, x])
                    .to_device(self.setup.device);
                let amp = self.setup.device.is_cuda() && self.setup.mixed_precision;
                let out = tch::autocast(amp, || self.net.forward(&input));
                let pred = out[0].argmax(1, false).to_kind(Kind::Uint8).to_device(Device::Cpu);
                let pred: Vec<u8> = Vec::try_from(pred.flatten(0, -1)).unwrap_or_default();
                for (&a, &b) in pred.iter().zip(&batch.labels) {
                    let (a, b) = (a as usize, b as usize);
                    if a == b {
                        counts[a][0] += 1;
                    } else {
                        if a < classes {
                            counts[a][1] += 1;
                        }
                        if b < classes {
                            counts[b][2] += 1;
                        }
                    }
                }
            }
            // Ranks validate their slices of the same batches: the counts of all of them.
            if let Some(pg) = &self.setup.ranks {
                let flat: Vec<i64> = counts.iter().flatten().map(|&c| c as i64).collect();
                let mut t = Tensor::from_slice(&flat).to_device(pg.device());
                pg.all_reduce_sum(&mut t).map_err(|e| self.error(None, Fault::Collective(e)))?;
                let summed = Vec::<i64>::try_from(&t.to_device(Device::Cpu)).unwrap_or_default();
                for (c, v) in counts.iter_mut().flatten().zip(summed) {
                    *c = v as u64;
                }
            }
            Ok(counts)
        })
    }

    /// Rank 0's weights, momentum and loss scale on every rank.
    fn broadcast_state(&mut self, pg: &crate::distributed::ProcessGroup) -> Result<(), String> {
        let mut state: Vec<Tensor> = self.named_state().into_iter().map(|(_, t)| t).collect();
        pg.broadcast_many(&mut state, 0)?;
        // named_state holds the variables and buffers themselves (shallow), and copies of
        // the scaler's numbers: those are read back.
        let names: Vec<String> = self.named_state().into_iter().map(|(n, _)| n).collect();
        for (name, t) in names.iter().zip(&state) {
            if name == "scaler.scale" {
                self.scaler.scale = t.double_value(&[0]);
            } else if name == "scaler.clean_steps" {
                self.scaler.set_clean_steps(t.int64_value(&[0]) as usize);
            }
        }
        Ok(())
    }

    fn named_state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().map(|(k, t)| (format!("model.{k}"), t)).collect();
        v.extend(self.sgd.buffers.iter().map(|(k, t)| (format!("momentum.{k}"), t.shallow_clone())));
        // The fp16 loss scaler, so a resumed run keeps its scale.
        v.push(("scaler.scale".into(), Tensor::from_slice(&[self.scaler.scale])));
        v.push(("scaler.clean_steps".into(), Tensor::from_slice(&[self.scaler.clean_steps() as i64])));
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn save(&self, path: &Path) -> Result<(), TrainerError> {
        let state: Vec<(String, Tensor)> =
            self.named_state().into_iter().map(|(k, t)| (k, t.to_device(Device::Cpu))).collect();
        if let Some(bad) = super::checkpoint::first_non_finite(&state) {
            return Err(self.error(None, Fault::NonFinite(format!("{} not written: {bad}", path.display()))));
        }
        if let Some(arg) = injected("checkpoint-write") {
            let code = arg.parse().unwrap_or(28); // ENOSPC
            let e = std::io::Error::from_raw_os_error(code);
            return Err(self.error(None, Fault::Checkpoint(format!("cannot write {}: {e}", path.display()))));
        }
        Tensor::write_safetensors(&state, path)
            .map_err(|e| self.error(None, Fault::Checkpoint(format!("cannot write {}: {e}", path.display()))))
    }

    fn load(&mut self, path: &Path) -> Result<(), TrainerError> {
        let fail = |m: String| self.error(None, Fault::Checkpoint(format!("{}: {m}", path.display())));
        let loaded = super::checkpoint::read_finite_tensors(path).map_err(fail)?;
        let vars = self.vs.variables();
        let mut seen = 0;
        let mut buffers = std::collections::BTreeMap::new();
        let mut scaler = LossScaler::default();
        for (name, t) in loaded {
            if let Some(k) = name.strip_prefix("model.") {
                let v = vars.get(k).ok_or_else(|| fail(format!("unknown variable {k}")))?;
                if v.size() != t.size() {
                    return Err(fail(format!("{k} has shape {:?}, the network {:?}", t.size(), v.size())));
                }
                tch::no_grad(|| v.shallow_clone().copy_(&t));
                seen += 1;
            } else if let Some(k) = name.strip_prefix("momentum.") {
                buffers.insert(k.to_string(), t.to_device(self.setup.device));
            } else if name == "scaler.scale" {
                scaler.scale = t.double_value(&[0]);
            } else if name == "scaler.clean_steps" {
                scaler.set_clean_steps(t.int64_value(&[0]) as usize);
            }
        }
        if seen != vars.len() {
            return Err(fail(format!("holds {seen} of the network's {} variables", vars.len())));
        }
        self.sgd.buffers = buffers;
        self.scaler = scaler;
        self.ranks_in_sync = false;
        Ok(())
    }
}
