//! `cps3d demo`: the whole pipeline end to end, small enough for a laptop CPU.
//!
//! data (synthetic phantoms, or `--data` a real dataset) → fingerprint → plan (small patch and
//! network) → preprocess → CPS training → predict the held-out cases → FLARE22 evaluation.
//! Every stage writes into one folder and is resumable: a second run reuses finished work.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{planning::List, Zyx};
use cps3d::dataset::{Case, RawDataset, IMAGES_TR, IMAGES_UNLABELED, LABELS_TR};
use cps3d::inference::{predict_case, Model, PredictOptions};
use cps3d::planning::fingerprint::{fingerprint_dataset, Fingerprint};
use cps3d::planning::plan::{plan, PlanOverrides, Plans};
use cps3d::preprocessing::{preprocess_dataset, PreprocessOptions};
use cps3d::synth::{write_dataset, SynthConfig};
use cps3d::training::run::{default_devices, train, Start, TrainOptions};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Work folder: data, plans, shards, run, predictions and scores (reused when run again).
    #[arg(short, long, default_value = "runs/demo")]
    out: PathBuf,
    /// A real dataset in nnU-Net layout (FLARE22 label ids) instead of synthetic phantoms.
    /// The last --test labeled cases are held out; with a single labeled case it is trained
    /// on and evaluated on (and the scores say nothing about generalisation).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Synthetic labeled training cases.
    #[arg(long, default_value_t = 6)]
    labeled: usize,
    /// Synthetic unlabeled cases (the CPS term's data).
    #[arg(long, default_value_t = 6)]
    unlabeled: usize,
    /// Held-out labeled cases to predict and score.
    #[arg(long, default_value_t = 2)]
    test: usize,
    /// Synthetic volume shape Z,Y,X.
    #[arg(long, default_value = "32,80,80")]
    shape: Zyx,
    /// Training patch Z,Y,X.
    #[arg(long, default_value = "16,48,48")]
    patch: Zyx,
    /// Features per network stage (the paper's network: 32,64,128,256,320,320).
    #[arg(long, default_value = "16,32,64,128")]
    features: List,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Epochs over which λ rises from 0 to 0.5 (default: all of them).
    #[arg(long)]
    lambda_ramp_epochs: Option<usize>,
    /// Devices of the two trainers (default: GPUs when present, else cpu,cpu).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Train with nnU-Net's augmentation (off by default: a few hundred steps converge faster without).
    #[arg(long)]
    augment: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads for synthesis, fingerprinting and preprocessing.
    #[arg(short = 'j', long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    workers: usize,
}

/// Prints a stage's line with its wall time.
fn stage<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let out = f().with_context(|| format!("demo stage \"{name}\""))?;
    println!("[{name:>11}] done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(out)
}

/// Held-out cases to predict (channel files) and the folder of their reference labels.
struct TestSet {
    cases: Vec<Case>,
    labels: PathBuf,
}

fn link(from: &Path, to: &Path) -> Result<()> {
    if to.symlink_metadata().is_ok() {
        std::fs::remove_file(to).with_context(|| to.display().to_string())?;
    }
    let from = std::fs::canonicalize(from).with_context(|| from.display().to_string())?;
    std::os::unix::fs::symlink(&from, to).with_context(|| format!("linking {} to {}", to.display(), from.display()))
}

/// Synthetic phantoms: a training dataset and a separately seeded test dataset.
fn synthetic(a: &DemoArgs) -> Result<(PathBuf, TestSet)> {
    let train_dir = a.out.join("data");
    let test_dir = a.out.join("test_data");
    let base = SynthConfig { shape: a.shape.0, workers: a.workers, ..Default::default() };
    let train_cfg = SynthConfig { labeled: a.labeled, unlabeled: a.unlabeled, seed: a.seed, ..base.clone() };
    let test_cfg = SynthConfig { labeled: a.test, unlabeled: 0, seed: a.seed.wrapping_add(1_000_003), ..base };
    write_dataset(&train_cfg, &train_dir, |_| {})?;
    write_dataset(&test_cfg, &test_dir, |_| {})?;
    let test = RawDataset::open(&test_dir)?;
    Ok((train_dir, TestSet { cases: test.labeled.clone(), labels: test_dir.join(LABELS_TR) }))
}

/// A real dataset: a linked training view without the held-out cases, and the test set.
fn real(a: &DemoArgs, data: &Path) -> Result<(PathBuf, TestSet)> {
    let ds = RawDataset::open(data)?;
    if let Some(p) = ds.layout_problems.first() {
        bail!("{} has layout problems (run `cps3d dataset check`), first: {p}", data.display());
    }
    let n = ds.labeled.len();
    if n == 0 {
        bail!("{}: no labeled cases to train on", data.display());
    }
    let held_out = a.test.min(n - 1);
    let (train_cases, test_cases) = if held_out == 0 {
        tracing::warn!(
            "{} has {n} labeled case(s): training and evaluating on the same case, so the scores only show that the pipeline works",
            data.display()
        );
        (&ds.labeled[..], &ds.labeled[..])
    } else {
        ds.labeled.split_at(n - held_out)
    };
    let view = a.out.join("data");
    let test_labels = a.out.join("test_labels");
    for d in [view.join(IMAGES_TR), view.join(LABELS_TR), view.join(IMAGES_UNLABELED), test_labels.clone()] {
        std::fs::create_dir_all(&d).with_context(|| d.display().to_string())?;
    }
    let ending = &ds.json.file_ending;
    for case in train_cases {
        for img in &case.images {
            link(img, &view.join(IMAGES_TR).join(img.file_name().context("image file name")?))?;
        }
        if let Some(label) = &case.label {
            link(label, &view.join(LABELS_TR).join(format!("{}{ending}", case.id)))?;
        }
    }
    for case in &ds.unlabeled {
        for img in &case.images {
            link(img, &view.join(IMAGES_UNLABELED).join(img.file_name().context("image file name")?))?;
        }
    }
    for case in test_cases {
        if let Some(label) = &case.label {
            link(label, &test_labels.join(format!("{}{ending}", case.id)))?;
        }
    }
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("dataset.json"))
            .with_context(|| data.join("dataset.json").display().to_string())?,
    )?;
    json["numTraining"] = train_cases.len().into();
    cps3d::util::write_json_atomic(&view.join("dataset.json"), &json)?;
    Ok((view, TestSet { cases: test_cases.to_vec(), labels: test_labels }))
}

pub fn run(a: DemoArgs) -> Result<()> {
    let start = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let (dataset, test) = match &a.data {
        Some(data) => stage("data", || real(&a, data))?,
        None => stage("synthesize", || synthetic(&a))?,
    };
    if test.cases.is_empty() {
        bail!("no held-out cases to evaluate (use --test N with N ≥ 1)");
    }
    let fingerprint_path = a.out.join("fingerprint.json");
    let fp: Fingerprint = stage("fingerprint", || {
        let fp = fingerprint_dataset(&dataset, a.workers, |_| {})?;
        if let Some(f) = fp.failed_cases.first() {
            bail!("{} case(s) could not be read, first: {}: {}", fp.failed_cases.len(), f.id, f.error);
        }
        fp.write(&fingerprint_path)?;
        Ok(fp)
    })?;
    let plans: Plans = stage("plan", || {
        let overrides = PlanOverrides {
            patch_size_3d: Some(a.patch.0),
            features_3d: Some(a.features.0.clone()),
            epochs: Some(a.epochs),
            iterations_per_epoch: Some(a.iterations),
            // λ ramps over the whole short run: at full weight from the first epochs, the
            // siblings' argmax labels (background for every organ not learned yet) would
            // hold back all but the largest organs.
            lambda_ramp_epochs: Some(a.lambda_ramp_epochs.unwrap_or(a.epochs)),
            ..Default::default()
        };
        let plans = plan(&fp, &overrides)?;
        plans.write(&a.out.join("plans.json"))?;
        let c = plans.configuration("3d_fullres").context("the plan has no 3d_fullres configuration")?;
        println!(
            "3d_fullres: spacing {:.2?} mm, patch {:?}, batch {} + {} unlabeled, features {:?}, {} parameters per network",
            c.spacing, c.patch_size, c.batch_size, c.batch_size, c.network.features_per_stage, c.network.parameter_count
        );
        Ok(plans)
    })?;
    let shards = a.out.join("shards");
    stage("preprocess", || {
        let opts = PreprocessOptions { workers: a.workers, ..Default::default() };
        let summary = preprocess_dataset(&dataset, &plans, &shards, &opts, |_, _| {})?;
        if let Some(f) = summary.failed.first() {
            bail!("{} case(s) failed, first: {}: {}", summary.failed.len(), f.id, f.error);
        }
        Ok(())
    })?;
    let run_dir = a.out.join("run");
    stage("train", || {
        if run_dir.join("final.json").is_file() {
            println!("training already finished in {} (delete it to train again)", run_dir.display());
            return Ok(());
        }
        let resume = run_dir.join("latest.json").is_file();
        let opts = TrainOptions {
            shards: std::fs::canonicalize(&shards)?,
            run_dir: run_dir.clone(),
            devices: a.devices.clone().unwrap_or_else(default_devices),
            seed: a.seed,
            no_augment: !a.augment,
            // The demo scores its own held-out cases below: train on every labeled case.
            fold: "all".into(),
            val_iterations: 5,
            final_validation: false,
            ..Default::default()
        };
        train(&opts, if resume { Start::Resume } else { Start::Overwrite }, None, |l| {
            println!(
                "  epoch {:>3}: loss {:.3?} (CPS {:.3?}), λ {:.2}, pseudo-Dice {:.3}, {:.2} s/step",
                l.epoch, l.loss, l.cps_loss, l.lambda, l.mean_pseudo_dice, l.step_seconds
            );
        })?;
        Ok(())
    })?;
    let predictions = a.out.join("predictions");
    stage("predict", || {
        let device = super::device_or_default(a.devices.as_ref().map(|d| d[0].as_str()))?;
        let opts = PredictOptions { checkpoint: "final".into(), device, ..Default::default() };
        let model = Model::load(&run_dir, &opts.checkpoint, device, opts.ensemble)?;
        std::fs::create_dir_all(&predictions).with_context(|| predictions.display().to_string())?;
        for case in &test.cases {
            let out = predictions.join(format!("{}.nii.gz", case.id));
            let r = predict_case(&model, case, &out, &opts)?;
            println!("  {}: {:.1} s", case.id, r.seconds);
        }
        Ok(())
    })?;
    let summary = stage("evaluate", || {
        let (cases, problems) = super::evaluate::evaluate_folders(&predictions, &test.labels, a.workers)?;
        if let Some(p) = problems.first() {
            bail!("{p}");
        }
        Ok(super::evaluate::write_scores(&cases, &predictions.join("flare22_scores.csv"))?)
    })?;
    println!("\nFLARE22 scores of the held-out cases ({}):", predictions.join("flare22_scores.csv").display());
    println!("{summary}");
    println!(
        "({} CPS steps: networks learn the large organs first; small ones need thousands of steps, e.g. --epochs 200 on a GPU)",
        a.epochs * a.iterations
    );
    println!("total {:.0} s; everything is in {}", start.elapsed().as_secs_f64(), a.out.display());
    Ok(())
}
