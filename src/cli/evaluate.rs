use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::progress;
use cps3d::evaluation::{label_files, score_files, summarize, to_csv, CaseScores, Summary};

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
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let pb = progress::bar(jobs.len() as u64, "evaluate");
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, ref_path, pred_path)) = jobs.get(i) else { break };
                // A bug on one case must not take the other cases' scores with it.
                let outcome = std::panic::catch_unwind(|| score_files(ref_path, pred_path)).unwrap_or_else(|_| {
                    Err(cps3d::Error::invalid(pred_path, "scoring panicked (a bug in cps3d; the other cases go on)"))
                });
                results.lock().expect("no worker panics holding the lock").push((name.clone(), outcome));
                pb.inc(1);
            });
        }
    });
    pb.finish_and_clear();
    let mut cases = Vec::new();
    for (name, outcome) in results.into_inner().expect("workers finished") {
        match outcome {
            Ok((organs, warnings)) => {
                warnings.iter().for_each(|w| tracing::warn!("{w}"));
                cases.push(CaseScores { name, organs });
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((cases, problems))
}

/// Writes the CSV and the summary JSON beside it; returns the summary.
pub fn write_scores(cases: &[CaseScores], csv: &Path) -> Result<Summary> {
    let summary = summarize(cases);
    if let Some(dir) = csv.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    cps3d::util::write_atomic(csv, to_csv(cases).as_bytes())?;
    cps3d::util::write_json_atomic(&csv.with_extension("summary.json"), &summary)?;
    Ok(summary)
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
