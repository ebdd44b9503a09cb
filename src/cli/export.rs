use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run folder from `cps3d train`.
    run: PathBuf,
    /// Which checkpoint: latest, best or final.
    #[arg(long, default_value = "best")]
    checkpoint: String,
    /// Output folder: net0.safetensors, net1.safetensors (weights only) and plans.json.
    #[arg(short, long)]
    out: PathBuf,
}

/// Writes each network's weights as a plain safetensors file (names as in the
/// network, no optimizer state) that `safetensors.torch.load_file` reads.
pub fn run(a: ExportArgs) -> Result<()> {
    let pointer = a.run.join(format!("{}.json", a.checkpoint));
    let p: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&pointer).with_context(|| format!("{} (no such checkpoint)", pointer.display()))?,
    )?;
    let dir = a.run.join(p["checkpoint"].as_str().context("the pointer names no checkpoint")?);
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
    std::fs::copy(dir.join("plans.json"), a.out.join("plans.json")).context("copying plans.json")?;
    anyhow::ensure!(written > 0, "{}: no network weights found", dir.display());
    Ok(())
}
