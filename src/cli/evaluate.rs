//! `cps3d evaluate`: FLARE22 DSC and NSD of predictions against references.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use super::progress;
pub use cps3d::evaluation::write_scores;
use cps3d::evaluation::{label_files, score_pairs, CaseScores};

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Folder of predicted label maps ({CASE}.nii.gz); every one is scored.
    #[arg(long)]
    pred: PathBuf,
    /// Folder of reference label maps with the same file names.
    #[arg(long = "ref")]
    reference: PathBuf,
    /// Score table (CSV, the official script's columns). Default: PRED/flare22_scores.csv.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Parallel cases (each holds two label maps in memory).
    #[arg(short = 'j', long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    workers: usize,
}

/// Scores every prediction that has a reference; failures are reported per file.
pub fn evaluate_folders(pred: &Path, reference: &Path, workers: usize) -> Result<(Vec<CaseScores>, Vec<String>)> {
    let predictions = label_files(pred)?;
    if predictions.is_empty() {
        bail!("{}: no .nii.gz or .nii label maps to score", pred.display());
    }
    let mut references: std::collections::BTreeMap<String, PathBuf> = label_files(reference)?.into_iter().collect();
    let mut problems = Vec::new();
    let mut jobs = Vec::new();
    for (name, path) in &predictions {
        match references.remove(name) {
            Some(ref_path) => jobs.push((name.clone(), ref_path, path.clone())),
            None => problems.push(format!("{}: no reference {name}.nii.gz in {}", path.display(), reference.display())),
        }
    }
    // What is left has no prediction.
    let unscored = references.len();
    if unscored > 0 {
        tracing::warn!("{unscored} reference case(s) in {} have no prediction and are not scored", reference.display());
    }
    let pb = progress::bar(jobs.len() as u64, "evaluate");
    let (cases, failed) = super::no_panic("evaluate", || Ok(score_pairs(&jobs, workers, || pb.inc(1))))?;
    pb.finish_and_clear();
    problems.extend(failed);
    Ok((cases, problems))
}

pub fn run(a: EvaluateArgs) -> Result<()> {
    let (cases, problems) = evaluate_folders(&a.pred, &a.reference, a.workers)?;
    let csv = a.out.clone().unwrap_or_else(|| a.pred.join("flare22_scores.csv"));
    if !cases.is_empty() {
        let summary = write_scores(&cases, &csv)?;
        println!("{summary}");
        println!("scores: {}", csv.display());
    }
    for p in &problems {
        eprintln!("failed: {p}");
    }
    if !problems.is_empty() {
        bail!("{} prediction(s) could not be scored", problems.len());
    }
    Ok(())
}
