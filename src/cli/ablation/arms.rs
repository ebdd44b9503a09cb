//! One arm and seed of the ablation: trained, predicted on the held-out cases and scored
//! (or read back when a previous run finished it).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::super::workflow::{self, TestSet};
use super::{shard_dir, AblationArgs, Arm, Outcome};
use cps3d::dataset::labels::FLARE22_ORGANS;
use cps3d::evaluation::{csv_header, summarize, CaseScores, OrganScore};
use cps3d::training::run::{Progress, TrainOptions};

/// Trains, predicts and scores one arm and seed, or reads back a finished one.
pub(super) fn run_arm(
    a: &AblationArgs,
    arm: Arm,
    seed: u64,
    devices: &[String],
    cpu_bf16: bool,
    predict_device: tch::Device,
    test: &TestSet,
) -> Result<Outcome> {
    let label = format!("[{} seed {seed}]", arm.name());
    let run_dir = a.out.join("runs").join(arm.name()).join(format!("seed{seed}"));
    let predictions = a.out.join("predictions").join(arm.name()).join(format!("seed{seed}"));
    let csv = workflow::scores_csv(&predictions);
    let timing_path = predictions.join("timing.json");
    if run_dir.join("final.json").is_file() && csv.is_file() {
        match read_scores(&csv) {
            Ok(cases) => {
                let timing: Value = std::fs::read_to_string(&timing_path)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or(Value::Null);
                let seconds = |k: &str| timing[k].as_f64().unwrap_or(f64::NAN);
                let summary = summarize(&cases);
                println!(
                    "{label} reused: mDSC {:.4}, mNSD {:.4} ({})",
                    summary.mean_dsc,
                    summary.mean_nsd,
                    csv.display()
                );
                return Ok(Outcome {
                    arm,
                    summary,
                    train_seconds: seconds("train_seconds"),
                    predict_seconds: seconds("predict_seconds"),
                });
            }
            Err(e) => tracing::warn!("{}: {e:#}; predicting and scoring again", csv.display()),
        }
    }
    // Scores of an earlier, unfinished attempt must not pass for this run's.
    if csv.exists() {
        std::fs::remove_file(&csv).with_context(|| csv.display().to_string())?;
    }
    let shards = shard_dir(&a.out, arm.configuration());
    // The held-out cases are scored below: train on every labeled case.
    let opts = TrainOptions {
        supervised_only: !arm.cps(),
        ..workflow::held_out_training(&shards, &run_dir, devices.to_vec(), seed, a.augment, cpu_bf16)?
    };
    let prefix = format!("{} seed {seed} ", arm.name());
    let trained = workflow::train_to_end(&opts, |p| match p {
        Progress::Estimate(e) => println!("  {prefix}{e}"),
        Progress::Epoch(l) => println!("{}", workflow::epoch_line(&prefix, l)),
    })?;
    if !trained {
        println!("{label} training already finished in {}", run_dir.display());
    }
    let train_seconds = epoch_seconds(&run_dir.join("log.jsonl"));
    let t = Instant::now();
    workflow::predict_cases(&run_dir, predict_device, test, &predictions, |_, _| {})?;
    let predict_seconds = t.elapsed().as_secs_f64();
    cps3d::util::write_json_atomic(
        &timing_path,
        &json!({ "train_seconds": train_seconds, "predict_seconds": predict_seconds }),
    )?;
    let (_, summary) = workflow::evaluate(&predictions, test, a.workers)?;
    println!(
        "{label} trained in {train_seconds:.0} s, predicted {} case(s) in {predict_seconds:.0} s: mDSC {:.4}, mNSD {:.4}",
        test.cases.len(),
        summary.mean_dsc,
        summary.mean_nsd
    );
    Ok(Outcome { arm, summary, train_seconds, predict_seconds })
}

/// The sum of the epochs' times in a run's `log.jsonl`.
fn epoch_seconds(log: &Path) -> f64 {
    cps3d::training::checkpoint::read_log(log).iter().map(|l| l.epoch_seconds).sum()
}

/// Reads a score table `write_scores` wrote (the official script's CSV layout).
pub(super) fn read_scores(csv: &Path) -> Result<Vec<CaseScores>> {
    let text = std::fs::read_to_string(csv)?;
    let mut lines = text.lines();
    if lines.next() != Some(csv_header().as_str()) {
        bail!("not a FLARE22 score table (unexpected header)");
    }
    let n = FLARE22_ORGANS.len();
    let mut cases = Vec::new();
    for (i, line) in lines.enumerate() {
        let mut cells = line.split(',');
        let name = cells.next().unwrap_or_default().to_string();
        let values: Vec<f64> = cells
            .map(|c| if c == "NaN" { Ok(f64::NAN) } else { c.parse::<f64>() })
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("line {}: a score is not a number", i + 2))?;
        if values.len() != 2 * n {
            bail!("line {}: {} scores, expected {}", i + 2, values.len(), 2 * n);
        }
        let organs = (0..n).map(|o| OrganScore { dsc: values[o], nsd: values[n + o] }).collect();
        cases.push(CaseScores { name, organs });
    }
    if cases.is_empty() {
        bail!("no scored case");
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_tables_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let organs = |d: f64| (0..13).map(move |o| OrganScore { dsc: d, nsd: if o == 4 { f64::NAN } else { d / 2.0 } });
        let cases = vec![
            CaseScores { name: "a".into(), organs: organs(0.5).collect() },
            CaseScores { name: "b".into(), organs: organs(0.25).collect() },
        ];
        let csv = dir.path().join("flare22_scores.csv");
        cps3d::evaluation::write_scores(&cases, &csv).unwrap();
        let back = read_scores(&csv).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].name, "b");
        assert_eq!(back[1].organs[0], OrganScore { dsc: 0.25, nsd: 0.125 });
        assert!(back[0].organs[4].nsd.is_nan());
        assert_eq!(summarize(&back).mean_dsc, summarize(&cases).mean_dsc);

        std::fs::write(&csv, "Name,Liver\na,1\n").unwrap();
        assert!(read_scores(&csv).unwrap_err().to_string().contains("header"));
    }
}
