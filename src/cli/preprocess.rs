//! `cps3d preprocess`: a dataset resampled, normalised and cropped into shards (also split over jobs).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{progress, Zyx};
use cps3d::planning::plan::Plans;
use cps3d::preprocessing::{merge_parts, preprocess_dataset, PreprocessOptions};

#[derive(Args, Debug)]
pub struct PreprocessArgs {
    /// Raw dataset folder.
    dataset: PathBuf,
    /// plans.json from `cps3d plan`.
    #[arg(short, long, default_value = "plans.json")]
    plans: PathBuf,
    /// Output folder for the shards (and manifest.json, plans.json).
    #[arg(short, long, default_value = "shards")]
    out: PathBuf,
    /// Configuration of the plan to preprocess for.
    #[arg(short, long, default_value = "3d_fullres")]
    configuration: String,
    /// Worker threads (one scan in memory per worker).
    #[arg(short = 'j', long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    workers: usize,
    /// Redo cases whose shard already exists.
    #[arg(long)]
    overwrite: bool,
    /// Brick shape Z,Y,X of the shards (default: 32,32,32 in 3D, single slices 1,128,128 in 2D).
    #[arg(long)]
    brick: Option<Zyx>,
    /// zstd level of the shards.
    #[arg(long, value_parser = clap::value_parser!(i32).range(-131072..=22), allow_negative_numbers = true)]
    zstd_level: Option<i32>,
    /// Preprocess only part I of N (0-based; every N-th case from the I-th), e.g. one task
    /// of a cluster job; its case list goes to manifest.json.part-I-of-N for --merge.
    /// `slurm` takes I and N from a job array (SLURM_ARRAY_TASK_ID, _MIN, _COUNT).
    #[arg(long, conflicts_with = "merge")]
    part: Option<super::planning::PartArg>,
    /// Write manifest.json from the parts' lists once all N parts have run: the same file
    /// one process writes. Missing parts and missing or stale shards are refused by name.
    #[arg(long)]
    merge: bool,
}

pub fn run(a: PreprocessArgs) -> Result<()> {
    let plans = Plans::read(&a.plans)?;
    if a.merge {
        let m = merge_parts(&a.dataset, &plans, &a.out, &a.configuration)
            .with_context(|| format!("merging the preprocessing parts in {}", a.out.display()))?;
        println!(
            "wrote {}: {} case(s), {} failed",
            a.out.join(cps3d::preprocessing::MANIFEST).display(),
            m.cases.len(),
            m.failed.len()
        );
        for f in &m.failed {
            eprintln!("failed: {}: {}", f.id, f.error);
        }
        return Ok(());
    }
    let part = a.part.as_ref().map(|p| p.resolve()).transpose()?;
    let mut opts = PreprocessOptions {
        configuration: a.configuration.clone(),
        workers: a.workers,
        overwrite: a.overwrite,
        part,
        ..Default::default()
    };
    opts.brick_shape = a.brick.map(|b| b.0);
    if let Some(l) = a.zstd_level {
        opts.zstd_level = l;
    }
    let all = cps3d::dataset::RawDataset::open(&a.dataset).map(|d| d.cases().count()).unwrap_or(0);
    check_memory(&a, &plans, all)?;
    let total = match part {
        Some(p) => (0..all).filter(|&i| p.owns(i)).count(),
        None => all,
    };
    let pb = progress::bar(total as u64, "preprocess");
    let summary = super::no_panic("preprocess", || {
        Ok(preprocess_dataset(&a.dataset, &plans, &a.out, &opts, |id, ok| {
            if !ok {
                tracing::warn!("failed: {id}");
            }
            pb.set_message(id.to_string());
            pb.inc(1);
        })?)
    })
    .with_context(|| format!("preprocessing {} into {}", a.dataset.display(), a.out.display()))?;
    pb.finish_and_clear();
    let mb_in = summary.input_voxels as f64 / 1e6;
    println!(
        "{} written, {} already done, {} failed in {:.1} s ({:.1} cases/min, {:.1} MB/s of float32 input); shards {:.1} MB in {}",
        summary.written,
        summary.skipped_existing,
        summary.failed.len(),
        summary.seconds,
        summary.written as f64 / summary.seconds.max(1e-9) * 60.0,
        mb_in / summary.seconds.max(1e-9),
        summary.shard_bytes as f64 / 1e6,
        a.out.display()
    );
    if let Some(p) = part {
        println!(
            "part {}/{}: its case list is in {}; run `cps3d preprocess ... --merge` once all {} parts are done",
            p.index,
            p.count,
            p.file(&a.out.join(cps3d::preprocessing::MANIFEST)).display(),
            p.count
        );
    }
    if !summary.failed.is_empty() {
        for f in &summary.failed {
            eprintln!("failed: {}: {}", f.id, f.error);
        }
        bail!("{} case(s) failed; the others are in {}", summary.failed.len(), a.out.display());
    }
    Ok(())
}

/// Refuses up front what one case per worker would not fit in memory: a case that
/// does not fit aborts the process allocating, losing the other workers' cases. The
/// largest cases come from `fingerprint.json` beside the plan when it describes this
/// dataset, else the plan's median case stands for all.
fn check_memory(a: &PreprocessArgs, plans: &Plans, cases: usize) -> Result<()> {
    let fp_path = a.plans.with_file_name("fingerprint.json");
    let fp = cps3d::planning::fingerprint::Fingerprint::read(&fp_path)
        .ok()
        .filter(|fp| fp.dataset_root == plans.dataset_root && fp.cases.len() == cases);
    let workers = a.workers.min(cases.max(1));
    cps3d::planning::footprint::check_preprocess_memory(plans, &a.configuration, fp.as_ref(), workers)
        .map_err(|e| anyhow::anyhow!("{} (plan {}): {e}", a.dataset.display(), a.plans.display()))
}
