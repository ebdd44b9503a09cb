//! `cps3d train`: the data path feeding the two trainer actors epoch after epoch,
//! validation, logs, checkpoints, resuming, and the final validation.
//!
//! Labeled cases are split as nnU-Net does: `SHARDS/splits_final.json` (5 folds of
//! sklearn's `KFold(5, shuffle=True, random_state=12345)` over the sorted ids, made on
//! first use) and `--fold 0..4`, or `--fold all` to train on every labeled case (then
//! validated on the training cases, as nnU-Net). Each epoch's batches come from a data
//! path seeded by (run seed, epoch), so with one worker per stage a resumed run sees
//! exactly the batches the uninterrupted run would have. What lands on disk, and why a
//! killed run loses at most its current epoch: see [`super::checkpoint`].

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tch::Device;

use super::checkpoint::{self, State};
use super::data::{datapath_config, read_shard_folder, DataKnobs};
use super::estimate::{Estimate, StepTimer};
use super::records::{EpochLog, StepPhases};
use super::schedule::{lambda_at, LrState};
use super::supervisor::{RoundError, Trainers};
use super::trainer::{injected, Cancel, Command, Reply, TrainerSetup};
use crate::error::{Error, Result};
use crate::planning::plan::{LambdaSchedule, Plans};
use crate::util::mean_finite;
use crate::util::FolderLock;
use cps3d_actors::datapath::autotune::{AutotuneConfig, Autotuner};
use cps3d_actors::datapath::{DataPath, GlobalBatch, ReadFailure};

pub use super::checkpoint::read_log;
pub use super::options::{default_devices, parse_device, TrainOptions};

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run; refused if the folder holds a previous run's results.
    New,
    /// A new run replacing a previous run's results in the folder.
    Overwrite,
    /// Continue from the latest checkpoint (a new run if there is none).
    Resume,
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

/// The plan a run trains: the shards' (a new run, with the run's overrides applied and
/// written to `RUN_DIR/plans.json`) or the run's own (a resumed run).
fn run_plans(opts: &TrainOptions, manifest_configuration: &str, plans: Plans, resumed: bool) -> Result<Plans> {
    let mut plans = if resumed { Plans::read(&opts.run_dir.join("plans.json"))? } else { plans };
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
    if plans.cps.optimizer.kind != "sgd" {
        return Err(Error::invalid(
            opts.shards.join("plans.json"),
            format!(
                "optimizer \"{}\": only \"sgd\" (Nesterov SGD, the paper's) is implemented",
                plans.cps.optimizer.kind
            ),
        ));
    }
    if plans.configuration(manifest_configuration).is_none() {
        return Err(Error::invalid(&opts.shards, format!("plans.json has no configuration {manifest_configuration}")));
    }
    // The run's plan names the configuration its networks are (prediction and export read
    // it there), with that configuration's batch when it is not the one the plan trains.
    if plans.cps.configuration != manifest_configuration {
        (plans.cps.labeled_batch, plans.cps.unlabeled_batch) = plans.batch_sizes(manifest_configuration);
        plans.cps.configuration = manifest_configuration.to_string();
    }
    Ok(plans)
}

/// Checks that the patch fits the network: every axis divisible by the product of the
/// strides along it (the decoder's skips must line up). A 2D network's patch is one
/// slice, (1, y, x).
fn check_patch(patch: [usize; 3], strides: &[Vec<usize>]) -> Result<()> {
    let two_d = strides.first().is_some_and(|s| s.len() == 2);
    if two_d && patch[0] != 1 {
        return Err(Error::invalid(
            "--patch",
            format!("{patch:?}: a 2D network trains on single slices, so the patch must be 1,Y,X"),
        ));
    }
    for a in 0..3 {
        let divisor: usize = match (two_d, a) {
            (true, 0) => 1,
            (true, _) => strides.iter().map(|s| s[a - 1]).product(),
            (false, _) => strides.iter().map(|s| s[a]).product(),
        };
        if patch[a] == 0 || patch[a] % divisor != 0 {
            return Err(Error::invalid(
                "--patch",
                format!(
                    "{patch:?}: axis {a} ({}) must be a positive multiple of {divisor}, the network's total stride along it",
                    patch[a]
                ),
            ));
        }
    }
    Ok(())
}

/// What a training run tells while it runs, in this order: the estimate (once, a few
/// steps into the first epoch this invocation trains), then each epoch's log.
pub enum Progress<'a> {
    Estimate(&'a Estimate),
    Epoch(&'a EpochLog),
}

/// Trains (or resumes, or overwrites). `steps_done`, when given, counts the first
/// trainer's steps (for progress bars).
pub fn train(
    opts: &TrainOptions,
    start: Start,
    steps_done: Option<Arc<std::sync::atomic::AtomicUsize>>,
    on_progress: impl FnMut(Progress<'_>),
) -> Result<Vec<EpochLog>> {
    train_on_ranks(opts, start, steps_done, on_progress, None)
}

/// [`train`] as one of `launch.world_size` data-parallel ranks (None: alone). Each rank
/// holds a pair of siblings and trains its slice of every global batch (the plan's batch
/// split evenly); sibling k's gradients are summed over the ranks in process group
/// `sibling{k}` (c10d Gloo). Only rank 0 writes the run folder.
pub fn train_on_ranks(
    opts: &TrainOptions,
    start: Start,
    steps_done: Option<Arc<std::sync::atomic::AtomicUsize>>,
    mut on_progress: impl FnMut(Progress<'_>),
    launch: Option<&crate::distributed::launch::Launch>,
) -> Result<Vec<EpochLog>> {
    let started = Instant::now();
    opts.check()?;
    let run = &opts.run_dir;
    let global = GlobalBatch { rank: launch.map_or(0, |l| l.rank), world: launch.map_or(1, |l| l.world_size) };
    let writer = global.rank == 0;
    let _run_lock = if writer {
        std::fs::create_dir_all(run.join("checkpoints")).map_err(|e| Error::io(run, e))?;
        Some(FolderLock::exclusive(run, "training")?)
    } else {
        None
    };
    // Training reads the shards; a preprocess rewriting them must wait.
    let _shard_lock = FolderLock::shared(&opts.shards, "reading the shards")?;
    let previous = if start == Start::Resume { checkpoint::latest(run)? } else { None };
    if start == Start::Resume && previous.is_none() {
        // Starting again would append epochs 0, 1, … to a log that already has them.
        let logged = read_log(&run.join("log.jsonl")).len();
        if logged > 0 {
            return Err(Error::invalid(
                run,
                format!(
                    "--resume: log.jsonl has {logged} epoch(s) but there is no checkpoint to resume from (latest.json \
                     and checkpoints/ are gone); start again with --overwrite"
                ),
            ));
        }
    }
    if writer && start == Start::New && checkpoint::has_results(run) {
        return Err(Error::invalid(
            run,
            "holds a previous run (log.jsonl, checkpoints): continue it with --resume, or replace it with --overwrite",
        ));
    }
    if writer && start == Start::Overwrite {
        checkpoint::clear_results(run)?;
    }
    let (manifest, shard_plans) = read_shard_folder(&opts.shards)?;
    let plans = run_plans(opts, &manifest.configuration, shard_plans, previous.is_some())?;
    let conf = plans.configuration(&manifest.configuration).expect("checked").clone();
    let mut spec = conf.network.clone();
    spec.input_channels = plans.channels.len();
    let plan_patch = super::data::patch_zyx(&conf.patch_size).ok_or_else(|| {
        Error::invalid(&opts.shards, format!("patch_size {:?} is neither 2D nor 3D", conf.patch_size))
    })?;
    let patch = opts.patch.unwrap_or(plan_patch);
    check_patch(patch, &spec.strides)?;
    let (train_ids, val_ids) = split_for_fold(&opts.shards, &manifest, &opts.fold)?;
    if train_ids.is_empty() {
        return Err(Error::invalid(&opts.shards, "no labeled case to train on"));
    }
    if writer {
        crate::util::write_json_atomic(&run.join("plans.json"), &plans)?;
        crate::util::write_json_atomic(&run.join("train.json"), opts)?;
    }
    // The plan's batch is the global batch: each rank streams its share of it.
    let (labeled, unlabeled) = (plans.cps.labeled_batch, plans.cps.unlabeled_batch);
    let unlabeled = if opts.supervised_only { 0 } else { unlabeled };
    if labeled % global.world != 0 || unlabeled % global.world != 0 {
        return Err(Error::invalid(
            &opts.shards,
            format!(
                "a batch of {labeled} labeled + {unlabeled} unlabeled samples does not split over {} ranks; plan a \
                 batch that does (plan --batch-size/--unlabeled-batch)",
                global.world
            ),
        ));
    }
    let per_rank = (labeled / global.world, unlabeled / global.world);
    tracing::info!("fold {}: {} training and {} validation case(s)", opts.fold, train_ids.len(), val_ids.len());

    let mut devices = opts.trainer_devices()?;
    let siblings_share_device = devices.len() > 1 && devices.windows(2).all(|w| w[0] == w[1]);
    // Each sibling's c10d backend, chosen once (none for one process).
    let backends = match launch {
        None => Vec::new(),
        Some(_) => devices
            .iter()
            .map(|&d| crate::distributed::backend_for(d, siblings_share_device))
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(|e| Error::invalid(run, e))?,
    };
    if let Some(l) = launch {
        // Slurm binds GPUs per task (--gpus-per-task) through CUDA_VISIBLE_DEVICES; torchrun never does.
        let bound = l.launcher == "slurm" && std::env::var_os("CUDA_VISIBLE_DEVICES").is_some();
        let may_share = backends.iter().all(|&b| b == crate::distributed::Backend::Gloo);
        devices = l
            .rank_devices(&devices, tch::Cuda::device_count().max(0) as usize, bound, may_share)
            .map_err(|e| Error::invalid("--devices", e))?;
    }
    // The batches' host memory, before any network is built (a huge --patch grew until killed).
    let knobs = data_knobs(opts, patch, devices.len(), global, per_rank);
    let cfg = datapath_config(&opts.shards, &knobs)?;
    let what =
        format!("the data path (patch {patch:?}, {} sample(s) per batch)", cfg.labeled_batch + cfg.unlabeled_batch);
    crate::memory::check_memory(super::data::datapath_bytes(&cfg), &what, "use a smaller --patch")
        .map_err(|e| Error::invalid(&opts.shards, e))?;
    if let Some(n) = opts.torch_threads(&devices) {
        tch::set_num_threads(n as i32);
    }
    let cancel = Arc::new(Cancel::default());
    // One store at rank 0, one process group per sibling over all ranks.
    let timeout = std::time::Duration::from_secs(opts.timeout_seconds);
    let (_store, groups) = match launch {
        None => (None, Vec::new()),
        Some(l) => {
            let fail = |e: String| Error::invalid(run, e);
            let (addr, port) = (&l.master_addr, l.master_port);
            let store = crate::distributed::Store::connect(addr, port, l.rank, l.world_size, l.agent_store, timeout)
                .map_err(fail)?;
            // A restarted set of workers (torchrun) must not meet the last one's keys.
            let group = |i: usize| format!("cps3d/{}/sibling{i}", l.restart);
            let roster = crate::distributed::roster::Roster::join(
                addr,
                port,
                l.rank,
                l.world_size,
                &format!("cps3d/{}", l.restart),
            )
            .map_err(fail)?;
            let groups = (0..devices.len())
                .map(|i| {
                    crate::distributed::ProcessGroup::new(backends[i], &store, &group(i), devices[i], timeout)
                        .map(|g| Arc::new(g.with_roster(roster.clone())))
                })
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(fail)?;
            let on: Vec<String> = groups.iter().map(|g| format!("{:?} on {:?}", g.backend(), g.device())).collect();
            tracing::info!(
                "rank {} of {} ({}, store at {}:{}): training its share of every batch, {} + {}, siblings on {:?}, \
                 reducing over {}",
                l.rank,
                l.world_size,
                l.launcher,
                l.master_addr,
                l.master_port,
                per_rank.0,
                per_rank.1,
                devices,
                on.join(", ")
            );
            (Some(store), groups)
        }
    };
    // The first trainer's steps are counted for the estimate, whether or not the caller counts them.
    let steps_done = steps_done.unwrap_or_default();
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
        cpu_bf16: opts.cpu_bf16,
        recompute_stages: opts.recompute_stages,
        exchange: None,
        cancel: cancel.clone(),
        timeout: std::time::Duration::from_secs(opts.timeout_seconds),
        steps_done: (index == 0).then(|| steps_done.clone()),
        ranks: groups.get(index).cloned(),
    };
    let trainers = Trainers::start(&devices, cancel.clone(), setup).map_err(|e| Error::invalid(run, e.to_string()))?;
    let timing = Timing { started, steps_done: &steps_done };
    let mut progress = |p: Progress<'_>| {
        if writer {
            on_progress(p)
        }
    };
    let result = epochs(opts, &plans, &trainers, previous, &knobs, writer, &train_ids, &val_ids, timing, &mut progress);
    trainers.shutdown();
    let logs = result?;
    if writer && opts.final_validation && !val_ids.is_empty() && run.join("final.json").exists() {
        super::validation::run_final_validation(opts, &manifest, &val_ids)?;
    }
    Ok(logs)
}

/// Training's data path: keyed batches (the same samples whatever the worker counts,
/// and on any number of ranks), this rank's `per_rank` share of each.
fn data_knobs(
    opts: &TrainOptions,
    patch: [usize; 3],
    consumers: usize,
    global: GlobalBatch,
    per_rank: (usize, usize),
) -> DataKnobs {
    DataKnobs {
        loaders: opts.loaders,
        augmenters: opts.augmenters,
        batchers: opts.batchers,
        no_augment: opts.no_augment,
        patch: Some(patch),
        consumers,
        labeled: Some(per_rank.0),
        unlabeled: Some(per_rank.1),
        global: Some(global),
        ..Default::default()
    }
}

/// When training started and the first trainer's step counter: what the estimate reads.
struct Timing<'a> {
    started: Instant,
    steps_done: &'a std::sync::atomic::AtomicUsize,
}

/// The epoch loop, from the checkpoint's epoch (if any) to the plan's last.
#[allow(clippy::too_many_arguments)]
fn epochs(
    opts: &TrainOptions,
    plans: &Plans,
    trainers: &Trainers,
    previous: Option<(State, std::path::PathBuf)>,
    knobs: &DataKnobs,
    writer: bool,
    train_ids: &[String],
    val_ids: &[String],
    timing: Timing<'_>,
    on_progress: &mut impl FnMut(Progress<'_>),
) -> Result<Vec<EpochLog>> {
    let run = &opts.run_dir;
    let fail = |e: RoundError| Error::invalid(run, e.to_string());
    let mut state =
        State { epoch: 0, ema: 0.0, best_ema: f64::MIN, lr: LrState::new(plans), options: opts.clone(), log: None };
    let mut first_epoch = 0;
    if let Some((s, dir)) = previous {
        trainers.round(|i| Command::Load { path: dir.join(format!("net{i}.safetensors")) }, None).map_err(fail)?;
        if writer {
            checkpoint::repair_log(&run.join("log.jsonl"), &s)?;
        }
        first_epoch = s.epoch + 1;
        state = State { options: opts.clone(), ..s };
        tracing::info!("resuming {} after epoch {}", run.display(), state.epoch);
    }
    let mut knobs = knobs.clone();
    let mut logs = Vec::new();
    let count = || timing.steps_done.load(std::sync::atomic::Ordering::Relaxed);
    let steps_per_epoch = plans.cps.iterations_per_epoch;
    let mut step_timer = StepTimer::new(timing.started, count(), steps_per_epoch);
    let epochs_here = plans.cps.epochs.saturating_sub(first_epoch);
    // Validation: forward passes over the labeled samples of `val_iterations` batches, a
    // third of a training step's cost per sample.
    let validation_steps = if val_ids.is_empty() {
        0.0
    } else {
        let (l, u) = (plans.cps.labeled_batch as f64, plans.cps.unlabeled_batch as f64);
        let u = if opts.supervised_only { 0.0 } else { u };
        opts.val_iterations as f64 * l / (l + u).max(1.0) / 3.0
    };
    for epoch in first_epoch..plans.cps.epochs {
        let t_epoch = Instant::now();
        let lr = state.lr.lr_at(plans, epoch);
        let lambda = if opts.supervised_only { 0.0 } else { lambda_at(plans, epoch) };
        knobs.seed = opts.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut cfg = datapath_config(&opts.shards, &knobs)?;
        cfg.labeled.retain(|c| train_ids.contains(&c.id));
        let mut dp = DataPath::start(cfg).map_err(|e| Error::invalid(&opts.shards, e))?;
        crate::metrics::watch_datapath(dp.telemetry_handle());
        let tuner = opts.autotune_cores().map(|cores| {
            let interval = std::time::Duration::from_secs_f64(opts.autotune_interval_seconds);
            let cfg = AutotuneConfig { cores, interval };
            Autotuner::start(dp.control(), cfg, move |d| {
                if let Some(m) = crate::metrics::global() {
                    m.autotune_decisions.inc();
                }
                tracing::debug!("epoch {epoch}: autotune {d:?}");
            })
        });
        if let Some(m) = crate::metrics::global() {
            m.trainer.record_epoch_start(epoch, lr, lambda);
        }
        let steps = plans.cps.iterations_per_epoch;
        let trained = trainers.round_watching(
            |i| Command::Train { epoch, steps, lr, lambda, batches: dp.consumer(i) },
            Some(&dp),
            || {
                if let Some(e) = step_timer.poll(count(), epochs_here * steps_per_epoch, epochs_here, validation_steps)
                {
                    on_progress(Progress::Estimate(&e));
                }
            },
        );
        if let Some(t) = tuner {
            let decisions = t.stop();
            // The next epoch's data path starts where this one's tuning ended.
            let w = dp.workers();
            (knobs.loaders, knobs.augmenters) = (w[0], w[1]);
            for d in decisions.iter().filter(|_| writer) {
                checkpoint::append_log(
                    &run.join("autotune.jsonl"),
                    &serde_json::json!({ "epoch": epoch, "decision": d }),
                )?;
            }
        }
        dp.stop();
        let mut read_failures = dp.read_failures();
        let stats: Vec<_> = trained
            .map_err(fail)?
            .into_iter()
            .filter_map(|r| if let Reply::Trained(s) = r { Some(s) } else { None })
            .collect();
        let per_step = stats.iter().map(|s| s.step_seconds).fold(0.0, f64::max);
        if let Some(e) =
            step_timer.at_epoch_end(count(), per_step, epochs_here * steps_per_epoch, epochs_here, validation_steps)
        {
            on_progress(Progress::Estimate(&e));
        }
        let (dice, validation_failures) =
            validate_epoch(trainers, &opts.shards, val_ids, &knobs, opts.val_iterations, epoch).map_err(
                |e| match e {
                    RoundOrIo::Round(r) => fail(r),
                    RoundOrIo::Other(e) => e,
                },
            )?;
        read_failures.extend(validation_failures);
        for f in &read_failures {
            tracing::warn!(
                "epoch {epoch}: {} failed to read {} time(s){}: {}",
                f.path.display(),
                f.failures,
                if f.excluded { ", left out for the rest of the epoch" } else { "" },
                f.last_error
            );
        }
        let mean = mean_finite(&dice.iter().map(|d| mean_finite(d)).collect::<Vec<_>>());
        state.ema = if epoch == 0 { mean } else { 0.9 * state.ema + 0.1 * mean };
        state.lr.update(plans, state.ema);
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
            phases: StepPhases::mean(stats.iter().map(|s| &s.phases)),
            read_failures,
        };
        if let Some(m) = crate::metrics::global() {
            let losses: Vec<[f64; 3]> =
                log.loss.iter().zip(&log.sup_loss).zip(&log.cps_loss).map(|((t, s), c)| [*t, *s, *c]).collect();
            m.trainer.record_epoch(&losses, &log.pseudo_dice);
        }
        state.epoch = epoch;
        state.log = Some(log.clone());
        let improved = state.ema > state.best_ema;
        if improved {
            state.best_ema = state.ema;
        }
        if !writer {
            // Rank 0 keeps the run's record; the others only train.
            logs.push(log);
            continue;
        }
        save_checkpoint(run, trainers, &state, improved, epoch + 1 == plans.cps.epochs).map_err(|e| match e {
            RoundOrIo::Round(r) => fail(r),
            RoundOrIo::Other(e) => e,
        })?;
        if injected("after-checkpoint").is_some() {
            // Tests: die as kill -9 would, between the checkpoint and the log line.
            std::process::abort();
        }
        checkpoint::append_log(&run.join("log.jsonl"), &log)?;
        let history = read_log(&run.join("log.jsonl"));
        if let Err(e) = super::progress::draw(&run.join("progress.png"), &history) {
            tracing::warn!("{}: could not draw: {e}", run.join("progress.png").display());
        }
        on_progress(Progress::Epoch(&log));
        logs.push(log);
    }
    Ok(logs)
}

/// A failure of a trainer round (reported with the run folder) or of the I/O around it.
enum RoundOrIo {
    Round(RoundError),
    Other(Error),
}

/// Writes `checkpoints/epoch_NNNN` under a temporary name, renames it whole, then
/// moves the pointers.
fn save_checkpoint(
    run: &Path,
    trainers: &Trainers,
    state: &State,
    best: bool,
    last: bool,
) -> std::result::Result<(), RoundOrIo> {
    let name = format!("checkpoints/epoch_{:04}", state.epoch);
    let tmp = run.join(format!("checkpoints/.tmp-epoch_{:04}", state.epoch));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| RoundOrIo::Other(Error::io(&tmp, e)))?;
    let saved = trainers.round(|i| Command::Save { path: tmp.join(format!("net{i}.safetensors")) }, None);
    if let Err(e) = saved {
        // The previous checkpoint stays the latest; the partial one goes.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(RoundOrIo::Round(e));
    }
    let other = |e| RoundOrIo::Other(e);
    crate::util::write_json_atomic(&tmp.join("state.json"), state).map_err(other)?;
    std::fs::copy(run.join("plans.json"), tmp.join("plans.json"))
        .map_err(|e| RoundOrIo::Other(Error::io(run.join("plans.json"), e)))?;
    checkpoint::seal(&tmp, &run.join(&name)).map_err(other)?;
    checkpoint::commit(run, &name, state.epoch, best, last).map_err(other)
}

/// nnU-Net's online validation: `iterations` batches of held-out patches (sampled as
/// its validation loader does: random cases, the same foreground oversampling, no
/// augmentation), every trainer predicting the same batches; per network the Dice of
/// each class from (tp, fp, fn) summed over all of them (NaN where a class never
/// appears).
fn validate_epoch(
    trainers: &Trainers,
    shards: &Path,
    val_ids: &[String],
    knobs: &DataKnobs,
    iterations: usize,
    epoch: usize,
) -> std::result::Result<(Vec<Vec<f64>>, Vec<ReadFailure>), RoundOrIo> {
    if val_ids.is_empty() || iterations == 0 {
        return Ok((vec![Vec::new(); trainers.len()], Vec::new()));
    }
    let mut k = knobs.clone();
    k.no_augment = true;
    // The plan's labeled batch as the global batch, each rank predicting its slice and the
    // trainers summing the counts over the ranks: all reach the same pseudo-Dice, and the
    // same learning rate from it. (A batch that does not split: every rank all of it.)
    let global = knobs.global.unwrap_or(GlobalBatch { rank: 0, world: 1 });
    let labeled = knobs.labeled.unwrap_or(0) * global.world;
    let global = if labeled > 0 && labeled % global.world == 0 { global } else { GlobalBatch { rank: 0, world: 1 } };
    (k.labeled, k.unlabeled, k.global) = (Some(labeled / global.world), Some(0), Some(global));
    k.seed = knobs.seed ^ 0x5EED_0000_0000_0000 ^ epoch as u64;
    let mut cfg = datapath_config(shards, &k).map_err(RoundOrIo::Other)?;
    cfg.labeled.retain(|c| val_ids.contains(&c.id));
    cfg.unlabeled.clear();
    let mut dp = DataPath::start(cfg).map_err(|e| RoundOrIo::Other(Error::invalid(shards, e)))?;
    // Both trainers consume the same batches at once: asking one after the other would
    // fill the other's queue and stall the data path.
    let replies = trainers.round(|i| Command::Validate { count: iterations, batches: dp.consumer(i) }, Some(&dp));
    dp.stop();
    let dice = replies
        .map_err(RoundOrIo::Round)?
        .into_iter()
        .filter_map(|r| if let Reply::Validated(c) = r { Some(dice_per_class(&c)) } else { None })
        .collect();
    Ok((dice, dp.read_failures()))
}

/// What a run's final summary says about shards that failed to read (None when all
/// read): each case once, with the epochs it failed in and its last error.
pub fn read_failure_summary(logs: &[EpochLog]) -> Option<String> {
    let mut by_case: std::collections::BTreeMap<&str, (u32, Vec<usize>, &ReadFailure)> = Default::default();
    for log in logs {
        for f in &log.read_failures {
            let e = by_case.entry(&f.case).or_insert((0, Vec::new(), f));
            e.0 += f.failures;
            if !e.1.contains(&log.epoch) {
                e.1.push(log.epoch);
            }
            e.2 = f;
        }
    }
    if by_case.is_empty() {
        return None;
    }
    let mut text = format!(
        "{} case(s) could not always be read, so training saw them less or not at all (a shard that fails 3 \
         times is left out for the rest of its epoch):",
        by_case.len()
    );
    for (case, (n, epochs, last)) in &by_case {
        let (first, end) = (epochs[0], epochs[epochs.len() - 1]);
        let when = if first == end {
            format!("epoch {first}")
        } else {
            format!("{} epochs from {first} to {end}", epochs.len())
        };
        text.push_str(&format!("\n  {case}: {n} failed read(s) in {when}; last: {}", last.last_error));
    }
    text.push_str("\n  `cps3d verify SHARDS` checks every shard; delete a broken one and run `cps3d preprocess` again (it redoes only missing shards)");
    Some(text)
}

/// Loads the network weights of a checkpoint file (for tests and export checks).
pub fn checkpoint_tensors(path: &Path) -> Result<Vec<(String, tch::Tensor)>> {
    checkpoint::read_finite_tensors(path).map_err(|e| Error::invalid(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_the_network_cannot_take_is_explained() {
        let strides = vec![vec![1, 1, 1], vec![2, 2, 2], vec![2, 2, 2], vec![1, 2, 2]];
        assert!(check_patch([16, 32, 32], &strides).is_ok());
        let e = check_patch([17, 33, 33], &strides).unwrap_err().to_string();
        assert!(e.contains("axis 0 (17)") && e.contains("multiple of 4"), "{e}");
        assert!(check_patch([16, 36, 32], &strides).unwrap_err().to_string().contains("multiple of 8"));
        let strides_2d = vec![vec![1, 1], vec![2, 2], vec![2, 2]];
        assert!(check_patch([1, 32, 48], &strides_2d).is_ok());
        assert!(check_patch([1, 34, 48], &strides_2d).unwrap_err().to_string().contains("multiple of 4"));
        assert!(check_patch([4, 32, 48], &strides_2d).unwrap_err().to_string().contains("1,Y,X"));
    }
}
