//! `cps3d train`: epochs of the data path feeding the two trainers, validation,
//! JSONL logs and atomic checkpoints, and resuming from the last one.
//!
//! ```text
//! RUN_DIR/plans.json           the plan trained
//! RUN_DIR/log.jsonl            one line per epoch
//! RUN_DIR/checkpoints/epoch_NNNN/{net0,net1}.safetensors, state.json
//! RUN_DIR/latest.json, best.json, final.json   which checkpoint is which
//! RUN_DIR/validation/          the held-out cases predicted whole and scored (end of training)
//! ```
//!
//! Labeled cases are split as nnU-Net does: `SHARDS/splits_final.json` (5 folds of
//! sklearn's `KFold(5, shuffle=True, random_state=12345)` over the sorted ids, made on
//! first use) and `--fold 0..4`, or `--fold all` to train on every labeled case (then
//! validated on the training cases, as nnU-Net).
//!
//! A checkpoint folder is written under a temporary name and renamed whole, and the
//! pointer files are replaced atomically: a run killed at any moment leaves the
//! previous checkpoint loadable and loses at most the current epoch. Each epoch's
//! batches come from a data path seeded by (run seed, epoch), so with one worker per
//! stage a resumed run sees exactly the batches the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

use super::data::{datapath_config, read_shard_folder, DataKnobs};
use super::trainer::{start, start_pair, Command, EpochStats, Reply, TrainerHandle, TrainerSetup};
use crate::error::{Error, Result};
use crate::planning::plan::{LambdaSchedule, LrSchedule, Plans};
use cps3d_actors::datapath::DataPath;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub shards: PathBuf,
    pub run_dir: PathBuf,
    /// One device per trainer (both may be the same).
    pub devices: Vec<String>,
    pub supervised_only: bool,
    pub epochs: Option<usize>,
    pub iterations: Option<usize>,
    pub seed: u64,
    /// nnU-Net's fold: "0".."4" (splits_final.json) or "all".
    #[serde(default = "default_fold")]
    pub fold: String,
    /// Batches of held-out patches per epoch for the pseudo-Dice (nnU-Net: 50).
    #[serde(default = "default_val_iterations")]
    pub val_iterations: usize,
    /// At the end, predict every held-out case whole and score it (nnU-Net's
    /// `perform_actual_validation`).
    #[serde(default = "default_true")]
    pub final_validation: bool,
    /// Mirroring in that validation (nnU-Net: on).
    #[serde(default = "default_true")]
    pub val_mirror: bool,
    pub loaders: usize,
    pub augmenters: usize,
    pub batchers: usize,
    pub no_augment: bool,
    pub patch: Option<[usize; 3]>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            shards: PathBuf::new(),
            run_dir: PathBuf::new(),
            devices: default_devices(),
            supervised_only: false,
            epochs: None,
            iterations: None,
            seed: 0,
            fold: default_fold(),
            val_iterations: default_val_iterations(),
            final_validation: true,
            val_mirror: true,
            loaders: 1,
            augmenters: 1,
            batchers: 1,
            no_augment: false,
            patch: None,
        }
    }
}

fn default_fold() -> String {
    "0".into()
}

fn default_val_iterations() -> usize {
    50
}

fn default_true() -> bool {
    true
}

/// Two GPUs if present, else both trainers on one GPU, else the CPU.
pub fn default_devices() -> Vec<String> {
    match tch::Cuda::device_count() {
        0 => vec!["cpu".into(), "cpu".into()],
        1 => vec!["cuda:0".into(), "cuda:0".into()],
        _ => vec!["cuda:0".into(), "cuda:1".into()],
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => match s.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) if (i as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(i)),
            Some(i) => Err(Error::invalid(
                "--devices",
                format!("cuda:{i} requested, {} CUDA device(s) visible", tch::Cuda::device_count()),
            )),
            None => Err(Error::invalid("--devices", format!("\"{s}\" is not cpu or cuda:N"))),
        },
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub lambda: f64,
    pub loss: Vec<f64>,
    pub sup_loss: Vec<f64>,
    pub cps_loss: Vec<f64>,
    /// Per network, per foreground class (NaN where the class is absent from validation).
    pub pseudo_dice: Vec<Vec<f64>>,
    pub mean_pseudo_dice: f64,
    pub ema_pseudo_dice: f64,
    pub step_seconds: f64,
    pub data_wait: f64,
    pub epoch_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    epoch: usize,
    ema: f64,
    best_ema: f64,
    lr: f64,
    plateau_best: f64,
    plateau_wait: usize,
    options: TrainOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pointer {
    checkpoint: String,
    epoch: usize,
}

fn lambda_at(plans: &Plans, epoch: usize) -> f64 {
    match plans.cps.lambda_schedule {
        LambdaSchedule::Constant => plans.cps.lambda_max,
        LambdaSchedule::LinearRamp { ramp_epochs } => {
            plans.cps.lambda_max * (epoch as f64 / ramp_epochs.max(1) as f64).min(1.0)
        }
    }
}

/// The (training, validation) labeled case ids of `fold`, as nnU-Net's `do_split`.
pub fn split_for_fold(
    shards: &Path,
    manifest: &crate::preprocessing::Manifest,
    fold: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut ids: Vec<String> = manifest.cases.iter().filter(|c| c.labeled).map(|c| c.id.clone()).collect();
    ids.sort();
    if fold == "all" {
        return Ok((ids.clone(), ids));
    }
    let k: usize = fold.parse().map_err(|_| {
        Error::invalid("--fold", format!("\"{fold}\" is neither a fold number (0, 1, ...) nor \"all\""))
    })?;
    let path = shards.join(super::splits::SPLITS_FILE);
    let splits = super::splits::read_or_create_splits(&path, &ids)?;
    let split = splits.get(k).ok_or_else(|| {
        Error::invalid(&path, format!("has {} fold(s); fold {k} asked for (or use --fold all)", splits.len()))
    })?;
    Ok((split.train.clone(), split.val.clone()))
}

fn dice_per_class(counts: &[[u64; 3]]) -> Vec<f64> {
    counts
        .iter()
        .skip(1)
        .map(|&[tp, fp, fn_]| if tp + fp + fn_ == 0 { f64::NAN } else { 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64 })
        .collect()
}

fn mean_finite(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().cloned().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        0.0
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}

fn ask(t: &TrainerHandle, c: Command) -> Result<Reply> {
    t.call(c).map_err(|e| Error::invalid("trainer", e))
}

/// Trains (or resumes, when `resume` and the run folder has a checkpoint).
///
/// `steps_done`, when given, counts the first trainer's steps (for progress bars).
pub fn train(
    opts: &TrainOptions,
    resume: bool,
    steps_done: Option<Arc<std::sync::atomic::AtomicUsize>>,
    mut on_epoch: impl FnMut(&EpochLog),
) -> Result<Vec<EpochLog>> {
    let run = &opts.run_dir;
    std::fs::create_dir_all(run.join("checkpoints")).map_err(|e| Error::io(run, e))?;
    let (manifest, mut plans) = read_shard_folder(&opts.shards)?;
    if let Some(e) = opts.epochs {
        // A ramp left at the plan's default (a tenth of training) follows the new length.
        if let LambdaSchedule::LinearRamp { ramp_epochs } = &mut plans.cps.lambda_schedule {
            if *ramp_epochs == (plans.cps.epochs / 10).max(1) {
                *ramp_epochs = (e / 10).max(1);
            }
        }
        plans.cps.epochs = e;
    }
    if let Some(i) = opts.iterations {
        plans.cps.iterations_per_epoch = i;
    }
    let conf = plans
        .configuration(&manifest.configuration)
        .ok_or_else(|| {
            Error::invalid(&opts.shards, format!("plans.json has no configuration {}", manifest.configuration))
        })?
        .clone();
    let mut spec = conf.network.clone();
    spec.input_channels = plans.channels.len();
    let patch = opts.patch.unwrap_or([conf.patch_size[0], conf.patch_size[1], conf.patch_size[2]]);
    if plans.cps.optimizer.kind != "sgd" {
        return Err(Error::invalid(
            opts.shards.join("plans.json"),
            format!(
                "optimizer \"{}\": only \"sgd\" (Nesterov SGD, the paper's) is implemented",
                plans.cps.optimizer.kind
            ),
        ));
    }
    let (train_ids, val_ids) = split_for_fold(&opts.shards, &manifest, &opts.fold)?;
    if train_ids.is_empty() {
        return Err(Error::invalid(&opts.shards, "no labeled case to train on"));
    }
    crate::util::write_json_atomic(&run.join("plans.json"), &plans)?;
    crate::util::write_json_atomic(&run.join("train.json"), opts)?;
    tracing::info!("fold {}: {} training and {} validation case(s)", opts.fold, train_ids.len(), val_ids.len());

    let devices: Vec<Device> = opts.devices.iter().map(|d| parse_device(d)).collect::<Result<_>>()?;
    let setup = |index: usize, device: Device| TrainerSetup {
        index,
        spec: spec.clone(),
        device,
        seed: (opts.seed as i64).wrapping_mul(1_000_003).wrapping_add(index as i64 + 1),
        momentum: plans.cps.optimizer.momentum,
        nesterov: plans.cps.optimizer.nesterov,
        weight_decay: plans.cps.optimizer.weight_decay,
        grad_clip: plans.cps.grad_clip_norm,
        batch_dice: conf.batch_dice,
        mixed_precision: plans.cps.mixed_precision,
        exchange: None,
        steps_done: if index == 0 { steps_done.clone() } else { None },
    };
    let trainers: Vec<TrainerHandle> = if opts.supervised_only {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let t = start(setup(0, devices[0]), tx);
        let _ = rx.recv();
        vec![t]
    } else {
        let d1 = *devices.get(1).unwrap_or(&devices[0]);
        let (a, b) = start_pair(setup(0, devices[0]), setup(1, d1));
        vec![a, b]
    };

    let mut state = State {
        epoch: 0,
        ema: 0.0,
        best_ema: f64::MIN,
        lr: plans.cps.optimizer.lr,
        plateau_best: f64::MIN,
        plateau_wait: 0,
        options: opts.clone(),
    };
    let mut start_epoch = 0;
    if resume {
        if let Ok(text) = std::fs::read_to_string(run.join("latest.json")) {
            let p: Pointer = serde_json::from_str(&text).map_err(|e| Error::json(run.join("latest.json"), e))?;
            let dir = run.join(&p.checkpoint);
            let s: State = serde_json::from_str(
                &std::fs::read_to_string(dir.join("state.json")).map_err(|e| Error::io(dir.join("state.json"), e))?,
            )
            .map_err(|e| Error::json(dir.join("state.json"), e))?;
            for (i, t) in trainers.iter().enumerate() {
                ask(t, Command::Load { path: dir.join(format!("net{i}.safetensors")) })?;
            }
            start_epoch = s.epoch + 1;
            state = State { options: opts.clone(), ..s };
            tracing::info!("resuming {} after epoch {}", run.display(), state.epoch);
        }
    }

    let mut knobs = DataKnobs {
        loaders: opts.loaders,
        augmenters: opts.augmenters,
        batchers: opts.batchers,
        no_augment: opts.no_augment,
        patch: Some(patch),
        consumers: trainers.len(),
        ..Default::default()
    };
    if opts.supervised_only {
        knobs.unlabeled = Some(0);
    }
    let mut logs = Vec::new();
    for epoch in start_epoch..plans.cps.epochs {
        let t_epoch = Instant::now();
        let lr = match plans.cps.lr_schedule {
            LrSchedule::Poly { exponent } => {
                plans.cps.optimizer.lr * (1.0 - epoch as f64 / plans.cps.epochs as f64).powf(exponent)
            }
            LrSchedule::Plateau { .. } => state.lr,
        };
        let lambda = if opts.supervised_only { 0.0 } else { lambda_at(&plans, epoch) };
        knobs.seed = opts.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut cfg = datapath_config(&opts.shards, &knobs)?;
        cfg.labeled.retain(|c| train_ids.contains(&c.id));
        let mut dp = DataPath::start(cfg).map_err(|e| Error::invalid(&opts.shards, e))?;
        for (i, t) in trainers.iter().enumerate() {
            t.commands
                .send(Command::Train { steps: plans.cps.iterations_per_epoch, lr, lambda, batches: dp.consumer(i) })
                .map_err(|_| Error::invalid("trainer", "the trainer thread is gone"))?;
        }
        let mut stats: Vec<EpochStats> = Vec::new();
        let mut failure = None;
        for t in &trainers {
            match t.replies.recv() {
                Ok(Reply::Trained(s)) => stats.push(s),
                Ok(Reply::Failed(e)) => failure = Some(e),
                _ => failure = Some("a trainer thread stopped".into()),
            }
        }
        dp.stop();
        if let Some(e) = failure {
            return Err(Error::invalid(run, format!("epoch {epoch}: {e}")));
        }
        let dice = validate_epoch(&trainers, &opts.shards, &val_ids, &knobs, opts.val_iterations, epoch)?;
        let mean = mean_finite(&dice.iter().map(|d| mean_finite(d)).collect::<Vec<_>>());
        state.ema = if epoch == 0 { mean } else { 0.9 * state.ema + 0.1 * mean };
        if let LrSchedule::Plateau { factor, patience, min_lr } = plans.cps.lr_schedule {
            if state.ema > state.plateau_best {
                state.plateau_best = state.ema;
                state.plateau_wait = 0;
            } else {
                state.plateau_wait += 1;
                if state.plateau_wait > patience {
                    state.lr = (state.lr * factor).max(min_lr);
                    state.plateau_wait = 0;
                }
            }
        }
        let log = EpochLog {
            epoch,
            lr,
            lambda,
            loss: stats.iter().map(|s| s.loss).collect(),
            sup_loss: stats.iter().map(|s| s.sup_loss).collect(),
            cps_loss: stats.iter().map(|s| s.cps_loss).collect(),
            pseudo_dice: dice,
            mean_pseudo_dice: mean,
            ema_pseudo_dice: state.ema,
            step_seconds: stats.iter().map(|s| s.step_seconds).fold(0.0, f64::max),
            data_wait: stats.iter().map(|s| s.data_wait).sum::<f64>() / stats.len().max(1) as f64,
            epoch_seconds: t_epoch.elapsed().as_secs_f64(),
        };
        append_jsonl(&run.join("log.jsonl"), &log)?;
        let history = read_log(&run.join("log.jsonl"));
        if let Err(e) = super::progress::draw(&run.join("progress.png"), &history) {
            tracing::warn!("{}: could not draw: {e}", run.join("progress.png").display());
        }
        state.epoch = epoch;
        let improved = state.ema > state.best_ema;
        if improved {
            state.best_ema = state.ema;
        }
        checkpoint(run, &trainers, &state, improved, epoch + 1 == plans.cps.epochs)?;
        on_epoch(&log);
        logs.push(log);
    }
    for t in trainers {
        drop(t.commands);
        let _ = t.thread.join();
    }
    if opts.final_validation && !val_ids.is_empty() && run.join("final.json").exists() {
        super::validation::run_final_validation(opts, &manifest, &val_ids)?;
    }
    Ok(logs)
}

/// nnU-Net's online validation: `iterations` batches of held-out patches (sampled as
/// its validation loader does: random cases, the same foreground oversampling, no
/// augmentation), every trainer predicting the same batches; per network the Dice of
/// each class from (tp, fp, fn) summed over all of them (NaN where a class never
/// appears).
fn validate_epoch(
    trainers: &[TrainerHandle],
    shards: &Path,
    val_ids: &[String],
    knobs: &DataKnobs,
    iterations: usize,
    epoch: usize,
) -> Result<Vec<Vec<f64>>> {
    if val_ids.is_empty() || iterations == 0 {
        return Ok(vec![Vec::new(); trainers.len()]);
    }
    let mut k = knobs.clone();
    k.no_augment = true;
    k.unlabeled = Some(0);
    k.seed = knobs.seed ^ 0x5EED_0000_0000_0000 ^ epoch as u64;
    let mut cfg = datapath_config(shards, &k)?;
    cfg.labeled.retain(|c| val_ids.contains(&c.id));
    cfg.unlabeled.clear();
    let mut dp = DataPath::start(cfg).map_err(|e| Error::invalid(shards, e))?;
    // Both trainers consume the same batches at once: asking one after the other would
    // fill the other's queue and stall the data path.
    for (i, t) in trainers.iter().enumerate() {
        t.commands
            .send(Command::Validate { count: iterations, batches: dp.consumer(i) })
            .map_err(|_| Error::invalid("trainer", "the trainer thread is gone"))?;
    }
    let mut dice = Vec::new();
    let mut failure = None;
    for t in trainers {
        match t.replies.recv() {
            Ok(Reply::Validated(c)) => dice.push(dice_per_class(&c)),
            Ok(Reply::Failed(e)) => failure = Some(e),
            _ => failure = Some("a trainer thread stopped".into()),
        }
    }
    dp.stop();
    match failure {
        Some(e) => Err(Error::invalid("validation", format!("epoch {epoch}: {e}"))),
        None => Ok(dice),
    }
}

/// Every epoch logged so far (a resumed run continues the same log).
pub fn read_log(path: &Path) -> Vec<EpochLog> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

fn append_jsonl(path: &Path, log: &EpochLog) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(log).map_err(|e| Error::json(path, e))?;
    writeln!(f, "{line}").and_then(|_| f.sync_data()).map_err(|e| Error::io(path, e))
}

/// Writes `checkpoints/epoch_NNNN` under a temporary name, renames it whole, then
/// moves the pointers; older checkpoints that no pointer names are removed.
fn checkpoint(run: &Path, trainers: &[TrainerHandle], state: &State, best: bool, last: bool) -> Result<()> {
    let name = format!("checkpoints/epoch_{:04}", state.epoch);
    let tmp = run.join(format!("checkpoints/.tmp-epoch_{:04}", state.epoch));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (i, t) in trainers.iter().enumerate() {
        ask(t, Command::Save { path: tmp.join(format!("net{i}.safetensors")) })?;
    }
    crate::util::write_json_atomic(&tmp.join("state.json"), state)?;
    std::fs::copy(run.join("plans.json"), tmp.join("plans.json")).map_err(|e| Error::io(run.join("plans.json"), e))?;
    for entry in std::fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))?.flatten() {
        if let Ok(f) = std::fs::File::open(entry.path()) {
            let _ = f.sync_all();
        }
    }
    let final_dir = run.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let pointer = Pointer { checkpoint: name.clone(), epoch: state.epoch };
    crate::util::write_json_atomic(&run.join("latest.json"), &pointer)?;
    if best {
        crate::util::write_json_atomic(&run.join("best.json"), &pointer)?;
    }
    if last {
        crate::util::write_json_atomic(&run.join("final.json"), &pointer)?;
    }
    // Keep what latest, best and final point at.
    let keep: Vec<String> = ["latest.json", "best.json", "final.json"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(run.join(p)).ok())
        .filter_map(|t| serde_json::from_str::<Pointer>(&t).ok())
        .map(|p| p.checkpoint)
        .collect();
    for entry in std::fs::read_dir(run.join("checkpoints")).map_err(|e| Error::io(run, e))?.flatten() {
        let rel = format!("checkpoints/{}", entry.file_name().to_string_lossy());
        if !keep.contains(&rel) && !rel.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Flattened parameters of every trainer (tests of resume).
pub fn parameters_of(trainers: &[TrainerHandle]) -> Result<Vec<Vec<f32>>> {
    trainers
        .iter()
        .map(|t| match ask(t, Command::Parameters)? {
            Reply::Parameters(p) => Ok(p),
            _ => Err(Error::invalid("trainer", "unexpected reply")),
        })
        .collect()
}

/// Loads the network weights of a checkpoint file (for tests and export checks).
pub fn checkpoint_tensors(path: &Path) -> Result<Vec<(String, tch::Tensor)>> {
    tch::Tensor::read_safetensors(path).map_err(|e| Error::invalid(path, e.to_string()))
}
