//! `cps3d train`: the command line of a CPS run (new, resumed, or one rank of several).

use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::Zyx;
use cps3d::training::options::{resume_options, ResumeRequest};
use cps3d::training::run::{default_devices, train_on_ranks, Progress, Start, TrainOptions};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Shard folder from `cps3d preprocess` (not needed with --resume).
    shards: Option<PathBuf>,
    /// Run folder: logs and checkpoints. A folder holding a previous run is refused
    /// unless --overwrite (or --resume it).
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint. Devices, epochs,
    /// iterations, workers and threads may change; the data, fold, seed, patch and
    /// --supervised-only may not (refused with the reason).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Replace a previous run's results in --out.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Options from a JSON file (the `train.json` every run writes); SHARDS and
    /// --out given here take precedence.
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Epochs (default: the plan's, 1000).
    #[arg(long)]
    epochs: Option<usize>,
    /// Iterations per epoch (default: the plan's, 250).
    #[arg(long)]
    iterations: Option<usize>,
    /// Devices of the two trainers, e.g. cuda:0,cuda:1 (default: two GPUs if present,
    /// else both on one GPU, else cpu,cpu).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// One network, no CPS (the paper's supervised baseline).
    #[arg(long)]
    supervised_only: bool,
    #[arg(long)]
    seed: Option<u64>,
    /// nnU-Net's fold: 0..4 trains on four fifths of the labeled cases and validates on the
    /// rest (SHARDS/splits_final.json, made on first use as nnU-Net does); `all` trains on
    /// every labeled case and validates on them.
    #[arg(long)]
    fold: Option<String>,
    /// Batches of held-out patches per epoch for the pseudo-Dice (nnU-Net: 50).
    #[arg(long, default_value_t = 50)]
    val_iterations: usize,
    /// Skip the end-of-training validation (every held-out case predicted whole and scored
    /// into RUN_DIR/validation/).
    #[arg(long)]
    no_final_validation: bool,
    /// No mirroring in that validation (nnU-Net mirrors; 8× faster without).
    #[arg(long)]
    no_val_mirror: bool,
    /// Data-path workers.
    #[arg(long, value_parser = super::workers, allow_negative_numbers = true)]
    loaders: Option<usize>,
    #[arg(long, value_parser = super::workers, allow_negative_numbers = true)]
    augmenters: Option<usize>,
    #[arg(long, value_parser = super::workers, allow_negative_numbers = true)]
    batchers: Option<usize>,
    /// Train without augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Patch Z,Y,X (default: the plan's).
    #[arg(long)]
    patch: Option<Zyx>,
    /// CPU threads libtorch may use, shared by the trainers on the CPU (default: all cores).
    #[arg(long, value_parser = super::workers, allow_negative_numbers = true)]
    threads: Option<usize>,
    /// Seconds a trainer waits for a batch or for its sibling's labels before giving up;
    /// with several ranks also the rendezvous's and each collective's limit.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Convolutions of the trainers on the CPU in bfloat16 (float32 weights, norms and
    /// losses): about twice as fast on CPUs with AVX512-BF16, slower on others.
    #[arg(long)]
    cpu_bf16: bool,
    /// Encoder stages, from full resolution, whose activations the backward pass
    /// recomputes instead of keeping them (0 keeps everything: a few per cent faster,
    /// more memory). The outputs and gradients are the same.
    #[arg(long, default_value_t = cps3d::training::options::default_recompute_stages())]
    recompute_stages: usize,
    /// Serve live metrics for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9184; port 0
    /// picks a free one; the address is printed on stderr). Off unless given. With several
    /// ranks each serves on the port + its local rank, every series labelled `rank`.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Cores the data path may use. Given, loader and augmenter counts are tuned while
    /// training, starting from --loaders/--augmenters: loaders + augmenters ≤ cores + 1;
    /// every change goes to RUN_DIR/autotune.jsonl.
    #[arg(long, value_parser = super::workers, allow_negative_numbers = true)]
    data_cores: Option<usize>,
    /// Keep --loaders/--augmenters fixed even with --data-cores.
    #[arg(long)]
    no_autotune: bool,
    /// Seconds between autotune decisions (each change settles, then is measured, for this long).
    #[arg(long, default_value_t = 5.0, value_parser = super::planning::positive_f64)]
    autotune_interval: f64,
    /// Start N ranks on this machine (as `torchrun --standalone --nproc-per-node N`): each
    /// trains a pair of siblings on its share of every batch, gradients summed over the
    /// ranks through c10d (Gloo). Under torchrun or Slurm (RANK/WORLD_SIZE, SLURM_PROCID/
    /// SLURM_NTASKS set), `train` is one rank of theirs without this option.
    #[arg(long, value_parser = super::workers, allow_negative_numbers = true)]
    nproc_per_node: Option<usize>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let launch = cps3d::distributed::launch::Launch::from_env(|k| std::env::var(k).ok())
        .map_err(|e| anyhow::anyhow!("reading the launcher's variables: {e}"))?;
    if let Some(n) = a.nproc_per_node.filter(|&n| n > 1) {
        if launch.is_some() {
            bail!(
                "--nproc-per-node {n}: this process is already a rank of a launched run (RANK or SLURM_PROCID is set)"
            );
        }
        return super::ranks::run_local_ranks(n, a.threads.is_none());
    }
    // Every rank serves its own series, labelled with its rank, on the port + its local rank.
    super::start_rank_metrics(a.metrics_addr.as_deref(), launch.as_ref())?;

    let (opts, start) = match &a.resume {
        Some(dir) => {
            let req = ResumeRequest {
                shards: a.shards.clone(),
                devices: a.devices.clone(),
                epochs: a.epochs,
                iterations: a.iterations,
                supervised_only: a.supervised_only.then_some(true),
                fold: a.fold.clone(),
                seed: a.seed,
                patch: a.patch.as_ref().map(|p| p.0),
                no_augment: a.no_augment.then_some(true),
                loaders: a.loaders,
                augmenters: a.augmenters,
                batchers: a.batchers,
                threads: a.threads,
            };
            (resume_options(dir, &req)?, Start::Resume)
        }
        None if a.config.is_some() => {
            let path = a.config.clone().unwrap_or_default();
            let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
            let mut opts: TrainOptions =
                serde_json::from_str(&text).with_context(|| format!("{}: invalid options", path.display()))?;
            if let Some(s) = &a.shards {
                opts.shards = s.clone();
            }
            if let Some(o) = &a.out {
                opts.run_dir = o.clone();
            }
            (opts, if a.overwrite { Start::Overwrite } else { Start::New })
        }
        None => {
            let (Some(shards), Some(out)) = (a.shards.clone(), a.out.clone()) else {
                bail!("give SHARDS and --out RUN_DIR, --config FILE, or --resume RUN_DIR");
            };
            // Absolute, so the saved options work from any folder on --resume.
            let shards = std::fs::canonicalize(&shards)
                .with_context(|| format!("{}: no such shard folder", shards.display()))?;
            let defaults = TrainOptions::default();
            let opts = TrainOptions {
                shards,
                run_dir: out,
                devices: a.devices.clone().unwrap_or_else(default_devices),
                supervised_only: a.supervised_only,
                epochs: a.epochs,
                iterations: a.iterations,
                seed: a.seed.unwrap_or(0),
                fold: a.fold.clone().unwrap_or(defaults.fold),
                val_iterations: a.val_iterations,
                final_validation: !a.no_final_validation,
                val_mirror: !a.no_val_mirror,
                loaders: a.loaders.unwrap_or(defaults.loaders),
                augmenters: a.augmenters.unwrap_or(defaults.augmenters),
                batchers: a.batchers.unwrap_or(defaults.batchers),
                no_augment: a.no_augment,
                patch: a.patch.map(|p| p.0),
                threads: a.threads,
                timeout_seconds: a.timeout,
                cpu_bf16: a.cpu_bf16,
                recompute_stages: a.recompute_stages,
                data_cores: a.data_cores,
                no_autotune: a.no_autotune,
                autotune_interval_seconds: a.autotune_interval,
            };
            (opts, if a.overwrite { Start::Overwrite } else { Start::New })
        }
    };
    tracing::info!("training on {:?} into {}", opts.devices, opts.run_dir.display());
    // A bar over all steps, fed by the first trainer's step counter.
    let steps = Arc::new(AtomicUsize::new(0));
    let epochs = opts.epochs.unwrap_or(1000) as u64;
    let per_epoch = opts.iterations.unwrap_or(250) as u64;
    let pb = super::progress::bar(epochs * per_epoch, "train");
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (steps, done, pb) = (steps.clone(), done.clone(), pb.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                pb.set_position(steps.load(Ordering::Relaxed) as u64);
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        })
    };
    if start == Start::Resume {
        // Steps before the checkpoint count as done.
        if let Ok(t) = std::fs::read_to_string(opts.run_dir.join("latest.json")) {
            if let Some(e) = serde_json::from_str::<serde_json::Value>(&t).ok().and_then(|v| v["epoch"].as_u64()) {
                steps.store(((e + 1) * per_epoch) as usize, Ordering::Relaxed);
            }
        }
    }
    let result = train_on_ranks(
        &opts,
        start,
        Some(steps.clone()),
        |p| {
            let l = match p {
                Progress::Estimate(e) => {
                    tracing::info!("{e}");
                    return;
                }
                Progress::Epoch(l) => l,
            };
            pb.set_message(format!("epoch {} pseudo-Dice {:.3}", l.epoch, l.ema_pseudo_dice));
            tracing::info!(
            "epoch {}: loss {:.4?} (sup {:.4?}, cps {:.4?}), λ {:.3}, lr {:.5}, pseudo-Dice {:.4} (EMA {:.4}), step {:.2} s, data wait {:.1}% ({})",
            l.epoch,
            l.loss,
            l.sup_loss,
            l.cps_loss,
            l.lambda,
            l.lr,
            l.mean_pseudo_dice,
            l.ema_pseudo_dice,
            l.step_seconds,
            l.data_wait * 100.0,
            l.phases.shares()
        );
        },
        launch.as_ref(),
    );
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    pb.finish_and_clear();
    let logs = result.with_context(|| format!("training into {}", opts.run_dir.display()))?;
    if launch.as_ref().is_some_and(|l| l.rank != 0) {
        // Rank 0 reports the run.
        return Ok(());
    }
    println!("{} epoch(s) trained; logs and checkpoints in {}", logs.len(), opts.run_dir.display());
    let history = cps3d::training::checkpoint::read_log(&opts.run_dir.join("log.jsonl"));
    if let Some(text) = cps3d::training::run::read_failure_summary(&history) {
        println!("{text}");
    }
    let validation = opts.run_dir.join("validation/summary.json");
    let text = if opts.final_validation { std::fs::read_to_string(&validation).ok() } else { None };
    if let Some(text) = text {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        println!(
            "validation of fold {} ({} case(s), FLARE22 means):",
            v["fold"],
            v["cases"].as_array().map_or(0, |c| c.len())
        );
        for variant in v["variants"].as_array().into_iter().flatten() {
            println!(
                "  {:<9} DSC {:.4}  NSD {:.4}   {}",
                variant["name"].as_str().unwrap_or("?"),
                variant["mean_dsc"].as_f64().unwrap_or(f64::NAN),
                variant["mean_nsd"].as_f64().unwrap_or(f64::NAN),
                variant["scores"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
