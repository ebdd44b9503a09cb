use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::Zyx;
use cps3d::training::run::{default_devices, train, TrainOptions};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Shard folder from `cps3d preprocess` (not needed with --resume).
    shards: Option<PathBuf>,
    /// Run folder: logs and checkpoints.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Options from a JSON file (the `train.json` every run writes); SHARDS and
    /// --out given here take precedence.
    #[arg(long)]
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
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// nnU-Net's fold: 0..4 trains on four fifths of the labeled cases and validates on the
    /// rest (SHARDS/splits_final.json, made on first use as nnU-Net does); `all` trains on
    /// every labeled case and validates on them.
    #[arg(long, default_value = "0")]
    fold: String,
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
    #[arg(long, default_value_t = 1)]
    loaders: usize,
    #[arg(long, default_value_t = 1)]
    augmenters: usize,
    #[arg(long, default_value_t = 1)]
    batchers: usize,
    /// Train without augmentation.
    #[arg(long)]
    no_augment: bool,
    /// Patch Z,Y,X (default: the plan's).
    #[arg(long)]
    patch: Option<Zyx>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let (opts, resume) = match &a.resume {
        Some(dir) => {
            let latest = dir.join("latest.json");
            let p: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&latest)
                    .with_context(|| format!("{} (no checkpoint to resume from)", latest.display()))?,
            )?;
            let ckpt = dir.join(p["checkpoint"].as_str().context("latest.json names no checkpoint")?);
            let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json"))?)?;
            let mut opts: TrainOptions = serde_json::from_value(state["options"].clone())?;
            opts.run_dir = dir.clone();
            if let Some(e) = a.epochs {
                opts.epochs = Some(e);
            }
            (opts, true)
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
            (opts, false)
        }
        None => {
            let (Some(shards), Some(out)) = (a.shards.clone(), a.out.clone()) else {
                bail!("give SHARDS and --out RUN_DIR, --config FILE, or --resume RUN_DIR");
            };
            // Absolute, so the saved options work from any folder on --resume.
            let shards = std::fs::canonicalize(&shards)
                .with_context(|| format!("{}: no such shard folder", shards.display()))?;
            let opts = TrainOptions {
                shards,
                run_dir: out,
                devices: a.devices.clone().unwrap_or_else(default_devices),
                supervised_only: a.supervised_only,
                epochs: a.epochs,
                iterations: a.iterations,
                seed: a.seed,
                fold: a.fold.clone(),
                val_iterations: a.val_iterations,
                final_validation: !a.no_final_validation,
                val_mirror: !a.no_val_mirror,
                loaders: a.loaders,
                augmenters: a.augmenters,
                batchers: a.batchers,
                no_augment: a.no_augment,
                patch: a.patch.map(|p| p.0),
            };
            (opts, false)
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
    if resume {
        // Steps before the checkpoint count as done.
        if let Ok(t) = std::fs::read_to_string(opts.run_dir.join("latest.json")) {
            if let Some(e) = serde_json::from_str::<serde_json::Value>(&t).ok().and_then(|v| v["epoch"].as_u64()) {
                steps.store(((e + 1) * per_epoch) as usize, Ordering::Relaxed);
            }
        }
    }
    let result = train(&opts, resume, Some(steps.clone()), |l| {
        pb.set_message(format!("epoch {} pseudo-Dice {:.3}", l.epoch, l.ema_pseudo_dice));
        tracing::info!(
            "epoch {}: loss {:.4?} (sup {:.4?}, cps {:.4?}), λ {:.3}, lr {:.5}, pseudo-Dice {:.4} (EMA {:.4}), step {:.2} s, data wait {:.1}%",
            l.epoch,
            l.loss,
            l.sup_loss,
            l.cps_loss,
            l.lambda,
            l.lr,
            l.mean_pseudo_dice,
            l.ema_pseudo_dice,
            l.step_seconds,
            l.data_wait * 100.0
        );
    });
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    pb.finish_and_clear();
    let logs = result.with_context(|| format!("training into {}", opts.run_dir.display()))?;
    println!("{} epoch(s) trained; logs and checkpoints in {}", logs.len(), opts.run_dir.display());
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
