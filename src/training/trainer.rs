//! The two CPS trainers: each a thread owning its network, optimizer and device.
//! Both receive the same batch; every step each sends its argmax labels (all output
//! scales, no gradient) to its sibling, receives the sibling's, and trains on
//! `L = L_sup + λ·L_cps`. A supervised-only mode trains one network alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use tch::{nn, Device, Kind, Tensor};

use super::loss::{deep_supervised, pseudo_labels, DiceCe};
use super::network::UNet;
use super::sgd::{clip_grad_norm, zero_grad, LossScaler, Sgd};
use crate::planning::topology::NetworkSpec;
use cps3d_actors::datapath::Batch;

/// What the coordinator asks a trainer to do.
pub enum Command {
    /// Train on `steps` batches from `batches` with this learning rate and λ.
    Train { steps: usize, lr: f64, lambda: f64, batches: Receiver<Arc<Batch>> },
    /// Predict `count` validation batches (labeled samples only) and return the
    /// per-class (tp, fp, fn) summed over them, as nnU-Net's online validation.
    Validate { count: usize, batches: Receiver<Arc<Batch>> },
    /// Write the network and optimizer state to this file (safetensors).
    Save { path: std::path::PathBuf },
    /// Replace the state with that of this file.
    Load { path: std::path::PathBuf },
    /// Flattened parameters, for tests.
    Parameters,
}

/// What a trainer answers.
pub enum Reply {
    Trained(EpochStats),
    Validated(Vec<[u64; 3]>),
    Saved,
    Loaded,
    Parameters(Vec<f32>),
    Failed(String),
}

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
}

pub struct TrainerHandle {
    pub commands: Sender<Command>,
    pub replies: Receiver<Reply>,
    pub thread: std::thread::JoinHandle<()>,
}

impl TrainerHandle {
    pub fn call(&self, cmd: Command) -> Result<Reply, String> {
        self.commands.send(cmd).map_err(|_| "the trainer thread is gone".to_string())?;
        match self.replies.recv() {
            Ok(Reply::Failed(e)) => Err(e),
            Ok(r) => Ok(r),
            Err(_) => Err("the trainer thread stopped (it may have panicked; see the log)".into()),
        }
    }
}

/// The channels between the two siblings (argmax labels at every output scale).
pub struct Exchange {
    pub to_sibling: Sender<Vec<Tensor>>,
    pub from_sibling: Receiver<Vec<Tensor>>,
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
    pub exchange: Option<Exchange>,
    /// Incremented after every step (progress bars).
    pub steps_done: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

/// Starts a trainer thread. Networks are built on the thread that owns them (tch
/// tensors are Send, not Sync); `tch::manual_seed` is global, so the caller builds
/// the siblings one after the other (see [`start_pair`]).
pub fn start(setup: TrainerSetup, built: Sender<()>) -> TrainerHandle {
    let (cmd_tx, cmd_rx) = bounded::<Command>(1);
    let (rep_tx, rep_rx) = bounded::<Reply>(1);
    let thread = std::thread::Builder::new()
        .name(format!("trainer-{}", setup.index))
        .spawn(move || {
            tch::manual_seed(setup.seed);
            let vs = nn::VarStore::new(setup.device);
            let net = UNet::new(&vs.root(), &setup.spec);
            let _ = built.send(());
            let mut state = TrainerState { setup, vs, net, sgd: None, scaler: LossScaler::default() };
            let mom = (state.setup.momentum, state.setup.nesterov, state.setup.weight_decay);
            state.sgd = Some(Sgd::new(mom.0, mom.1, mom.2));
            for cmd in cmd_rx.iter() {
                let reply = state.handle(cmd);
                if rep_tx.send(reply).is_err() {
                    break;
                }
            }
        })
        .expect("spawning a trainer thread");
    TrainerHandle { commands: cmd_tx, replies: rep_rx, thread }
}

/// Two siblings with different He initialisations, each on its device.
pub fn start_pair(mut a: TrainerSetup, mut b: TrainerSetup) -> (TrainerHandle, TrainerHandle) {
    let (ea, eb) = exchange_pair();
    a.exchange = Some(ea);
    b.exchange = Some(eb);
    let (tx, rx) = bounded(1);
    let ha = start(a, tx.clone());
    let _ = rx.recv();
    let hb = start(b, tx);
    let _ = rx.recv();
    (ha, hb)
}

struct TrainerState {
    setup: TrainerSetup,
    vs: nn::VarStore,
    net: UNet,
    sgd: Option<Sgd>,
    scaler: LossScaler,
}

fn tensor_u8(data: &[u8], shape: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(data).reshape(shape).to_kind(Kind::Int64).to_device(device)
}

impl TrainerState {
    fn handle(&mut self, cmd: Command) -> Reply {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cmd {
            Command::Train { steps, lr, lambda, batches } => self.train(steps, lr, lambda, &batches),
            Command::Validate { count, batches } => self.validate(count, &batches).map(Reply::Validated),
            Command::Save { path } => self.save(&path).map(|_| Reply::Saved),
            Command::Load { path } => self.load(&path).map(|_| Reply::Loaded),
            Command::Parameters => Ok(Reply::Parameters(self.flat_parameters())),
        }));
        match r {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => Reply::Failed(e),
            Err(p) => Reply::Failed(format!(
                "trainer {} panicked: {}",
                self.setup.index,
                cps3d_actors::pool::panic_message(p.as_ref())
            )),
        }
    }

    fn train(&mut self, steps: usize, lr: f64, lambda: f64, batches: &Receiver<Arc<Batch>>) -> Result<Reply, String> {
        let dev = self.setup.device;
        let loss = DiceCe { batch_dice: self.setup.batch_dice, ..Default::default() };
        let mut stats = EpochStats::default();
        let (mut wait, mut total) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..steps {
            let t0 = Instant::now();
            let batch = batches
                .recv_timeout(Duration::from_secs(600))
                .map_err(|_| "no batch from the data path in 600 s".to_string())?;
            let t1 = Instant::now();
            wait += t1 - t0;
            let [z, y, x] = batch.patch.map(|v| v as i64);
            let n = batch.samples() as i64;
            let bl = batch.labeled as i64;
            let input = Tensor::from_slice(&batch.image).reshape([n, batch.channels as i64, z, y, x]).to_device(dev);
            let amp = dev.is_cuda() && self.setup.mixed_precision;
            let outputs = if amp { tch::autocast(true, || self.net.forward(&input)) } else { self.net.forward(&input) };
            let outputs: Vec<Tensor> = outputs.into_iter().map(|o| o.to_kind(Kind::Float)).collect();
            // Targets of the labeled samples at each output scale.
            let mut targets = vec![tensor_u8(&batch.labels, &[bl, z, y, x], dev)];
            for (l, s) in batch.ds_labels.iter().zip(&batch.ds_shapes) {
                targets.push(tensor_u8(l, &[bl, s[0] as i64, s[1] as i64, s[2] as i64], dev));
            }
            targets.truncate(outputs.len());
            let labeled_out: Vec<Tensor> = outputs.iter().map(|o| o.narrow(0, 0, bl)).collect();
            let sup = if bl > 0 {
                deep_supervised(&loss, &labeled_out, &targets)
            } else {
                Tensor::zeros([], (Kind::Float, dev))
            };
            let mut cps_value = 0.0;
            let mut cps_part = None;
            if let Some(ex) = &self.setup.exchange {
                let mine = pseudo_labels(&outputs);
                ex.to_sibling.send(mine).map_err(|_| "the sibling trainer is gone".to_string())?;
                let theirs = ex.from_sibling.recv().map_err(|_| "the sibling trainer is gone".to_string())?;
                let theirs: Vec<Tensor> = theirs.iter().map(|t| t.to_device(dev)).collect();
                let cps = deep_supervised(&loss, &outputs, &theirs);
                cps_value = cps.double_value(&[]);
                cps_part = Some(cps);
            }
            // A new tensor, not in place: `sup` is logged on its own below.
            let total_loss = match cps_part {
                Some(cps) => &sup + cps * lambda,
                None => sup.shallow_clone(),
            };
            zero_grad(&self.vs);
            // fp16 on CUDA: scaled loss, unscaled gradients, overflowed steps skipped.
            let (norm, stepped) = if amp {
                (&total_loss * self.scaler.scale).backward();
                let ok = self.scaler.unscale(&self.vs);
                let norm = if ok { clip_grad_norm(&self.vs, self.setup.grad_clip) } else { f64::NAN };
                (norm, ok)
            } else {
                total_loss.backward();
                (clip_grad_norm(&self.vs, self.setup.grad_clip), true)
            };
            if stepped {
                self.sgd.as_mut().expect("optimizer").step(&self.vs, lr);
            } else {
                stats.skipped_steps += 1;
            }
            stats.loss += total_loss.double_value(&[]);
            stats.sup_loss += sup.double_value(&[]);
            stats.cps_loss += cps_value;
            if norm.is_finite() {
                stats.grad_norm += norm;
            }
            stats.steps += 1;
            total += t0.elapsed();
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
        stats.data_wait = wait.as_secs_f64() / total.as_secs_f64().max(1e-9);
        Ok(Reply::Trained(stats))
    }

    fn validate(&self, count: usize, batches: &Receiver<Arc<Batch>>) -> Result<Vec<[u64; 3]>, String> {
        let classes = self.setup.spec.num_classes;
        let mut counts = vec![[0u64; 3]; classes];
        tch::no_grad(|| {
            for _ in 0..count {
                let batch = batches
                    .recv_timeout(Duration::from_secs(600))
                    .map_err(|_| "no validation batch from the data path in 600 s".to_string())?;
                let [z, y, x] = batch.patch.map(|v| v as i64);
                let n = batch.labeled as i64;
                let pn = (z * y * x) as usize;
                let input = Tensor::from_slice(&batch.image[..batch.labeled * batch.channels * pn])
                    .reshape([n, batch.channels as i64, z, y, x])
                    .to_device(self.setup.device);
                let out = if self.setup.device.is_cuda() && self.setup.mixed_precision {
                    tch::autocast(true, || self.net.forward(&input))
                } else {
                    self.net.forward(&input)
                };
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
            Ok(counts)
        })
    }

    fn named_state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().map(|(k, t)| (format!("model.{k}"), t)).collect();
        if let Some(sgd) = &self.sgd {
            v.extend(sgd.buffers.iter().map(|(k, t)| (format!("momentum.{k}"), t.shallow_clone())));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let state: Vec<(String, Tensor)> =
            self.named_state().into_iter().map(|(k, t)| (k, t.to_device(Device::Cpu))).collect();
        Tensor::write_safetensors(&state, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn load(&mut self, path: &std::path::Path) -> Result<(), String> {
        let loaded = Tensor::read_safetensors(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let vars = self.vs.variables();
        let mut seen = 0;
        let sgd = self.sgd.as_mut().expect("optimizer");
        sgd.buffers.clear();
        for (name, t) in loaded {
            if let Some(k) = name.strip_prefix("model.") {
                let v = vars.get(k).ok_or_else(|| format!("{}: unknown variable {k}", path.display()))?;
                if v.size() != t.size() {
                    return Err(format!(
                        "{}: {k} has shape {:?}, the network {:?}",
                        path.display(),
                        t.size(),
                        v.size()
                    ));
                }
                tch::no_grad(|| v.shallow_clone().copy_(&t));
                seen += 1;
            } else if let Some(k) = name.strip_prefix("momentum.") {
                sgd.buffers.insert(k.to_string(), t.to_device(self.setup.device));
            }
        }
        if seen != vars.len() {
            return Err(format!("{}: holds {seen} of the network's {} variables", path.display(), vars.len()));
        }
        Ok(())
    }

    fn flat_parameters(&self) -> Vec<f32> {
        let mut names: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (_, t) in names {
            let v: Vec<f32> = Vec::try_from(t.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default();
            out.extend(v);
        }
        out
    }
}
