//! `cps3d export`: a run's networks as safetensors, or as an nnU-Net v2 results folder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run folder from `cps3d train`.
    run: PathBuf,
    /// Which checkpoint: latest, best or final.
    #[arg(long, default_value = "best", value_parser = super::predict::CHECKPOINTS)]
    checkpoint: String,
    /// Output folder: net0.safetensors, net1.safetensors (weights only) and plans.json; with
    /// --nnunet an nnU-Net v2 trained-model folder.
    #[arg(short, long)]
    out: PathBuf,
    /// Write an nnU-Net v2 trained-model folder instead: dataset.json, plans.json (nnU-Net's
    /// schema) and fold_0/fold_1/checkpoint_final.pth (the siblings), so that
    /// `nnUNetv2_predict_from_modelfolder -m OUT -f 0 1` predicts with the sibling ensemble.
    #[arg(long)]
    nnunet: bool,
}

/// Writes each network's weights as a plain safetensors file (names as in the
/// network, no optimizer state) that `safetensors.torch.load_file` reads.
pub fn run(a: ExportArgs) -> Result<()> {
    let dir = cps3d::inference::checkpoint_dir(&a.run, &a.checkpoint)?;
    let plans = dir.join("plans.json");
    if !plans.is_file() {
        anyhow::bail!("{}: missing: the checkpoint's plan, which every export needs", plans.display());
    }
    if a.nnunet {
        let n = cps3d::interop::nnunet::export_model_folder(&dir, &a.out)
            .with_context(|| format!("exporting {} as an nnU-Net model folder", dir.display()))?;
        let folds: Vec<String> = (0..n).map(|f| f.to_string()).collect();
        println!(
            "{}: nnU-Net v2 model folder, {n} fold(s) (the siblings); predict with\n  nnUNetv2_predict_from_modelfolder -i IMAGES -o OUT -m {} -f {}",
            a.out.display(),
            a.out.display(),
            folds.join(" ")
        );
        return Ok(());
    }
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let mut written = 0;
    for i in 0..2 {
        let src = dir.join(format!("net{i}.safetensors"));
        if !src.exists() {
            continue;
        }
        let weights: Vec<(String, tch::Tensor)> = cps3d::training::run::checkpoint_tensors(&src)?
            .into_iter()
            .filter_map(|(k, t)| k.strip_prefix("model.").map(|k| (k.to_string(), t)))
            .collect();
        let dst = a.out.join(format!("net{i}.safetensors"));
        tch::Tensor::write_safetensors(&weights, &dst).with_context(|| dst.display().to_string())?;
        println!("{}: {} tensors", dst.display(), weights.len());
        written += 1;
    }
    let copy = a.out.join("plans.json");
    std::fs::copy(&plans, &copy).with_context(|| format!("copying {} to {}", plans.display(), copy.display()))?;
    anyhow::ensure!(written > 0, "{}: no network weights found", dir.display());
    Ok(())
}
