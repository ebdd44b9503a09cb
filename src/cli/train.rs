use std::path::PathBuf;

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
    /// Share of labeled cases held out for the pseudo-Dice.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
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
        None => {
            let (Some(shards), Some(out)) = (a.shards.clone(), a.out.clone()) else {
                bail!("give SHARDS and --out RUN_DIR, or --resume RUN_DIR");
            };
            let opts = TrainOptions {
                shards,
                run_dir: out,
                devices: a.devices.clone().unwrap_or_else(default_devices),
                supervised_only: a.supervised_only,
                epochs: a.epochs,
                iterations: a.iterations,
                seed: a.seed,
                val_fraction: a.val_fraction,
                loaders: a.loaders,
                augmenters: a.augmenters,
                batchers: a.batchers,
                no_augment: a.no_augment,
                patch: a.patch.map(|p| p.0),
                ..Default::default()
            };
            (opts, false)
        }
    };
    tracing::info!("training on {:?} into {}", opts.devices, opts.run_dir.display());
    let logs = train(&opts, resume, |l| {
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
    })
    .with_context(|| format!("training into {}", opts.run_dir.display()))?;
    println!("{} epoch(s) trained; logs and checkpoints in {}", logs.len(), opts.run_dir.display());
    Ok(())
}
