//! The pipeline steps `cps3d demo` and `cps3d ablation` share: the data (synthetic phantoms
//! with a separately seeded test set, or a real dataset with its last labeled cases held
//! out), fingerprint, plan, preprocess, training with resume, prediction of the held-out
//! cases and their FLARE22 scores. Every step writes into the work folder and reuses what
//! an earlier run finished there.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use cps3d::dataset::{Case, RawDataset, IMAGES_TR, IMAGES_UNLABELED, LABELS_TR};
use cps3d::evaluation::{CaseScores, Summary};
use cps3d::inference::{predict_case, Model, PredictOptions};
use cps3d::planning::fingerprint::{fingerprint_dataset, Fingerprint};
use cps3d::planning::plan::{plan, PlanOverrides, Plans};
use cps3d::preprocessing::{preprocess_dataset, PreprocessOptions};
use cps3d::synth::{write_dataset, SynthConfig};
use cps3d::training::options::cpu_has_native_bf16;
use cps3d::training::records::EpochLog;
use cps3d::training::run::{train, Progress, Start, TrainOptions};

/// Where the training data comes from and how many cases to hold out.
pub struct DataSource<'a> {
    /// A real dataset in nnU-Net layout; `None`: synthetic phantoms.
    pub data: Option<&'a Path>,
    /// Synthetic labeled training cases.
    pub labeled: usize,
    /// Synthetic unlabeled cases.
    pub unlabeled: usize,
    /// Held-out labeled cases.
    pub test: usize,
    /// Synthetic volume shape Z,Y,X.
    pub shape: [usize; 3],
    /// Synthetic in-plane and slice spacing ranges (mm); `None`: a whole abdomen's field of view.
    pub spacing_xy: Option<(f64, f64)>,
    pub spacing_z: Option<(f64, f64)>,
    /// Seed of the synthetic training set (the test set's is derived from it).
    pub seed: u64,
    pub workers: usize,
}

/// Held-out cases to predict (channel files) and the folder of their reference labels.
pub struct TestSet {
    pub cases: Vec<Case>,
    pub labels: PathBuf,
}

/// Runs one step, then prints its line with its wall time; errors name `command` and the step.
pub fn stage<T>(command: &str, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let out = f().with_context(|| format!("{command} stage \"{name}\""))?;
    println!("[{name:>11}] done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(out)
}

fn link(from: &Path, to: &Path) -> Result<()> {
    if to.symlink_metadata().is_ok() {
        std::fs::remove_file(to).with_context(|| to.display().to_string())?;
    }
    let from = std::fs::canonicalize(from).with_context(|| from.display().to_string())?;
    std::os::unix::fs::symlink(&from, to).with_context(|| format!("linking {} to {}", to.display(), from.display()))
}

/// The training dataset (`OUT/data`) and the held-out test set, from `src` (synthetic
/// with `--test 0`: no test case).
pub fn prepare_data(out: &Path, src: &DataSource) -> Result<(PathBuf, TestSet)> {
    match src.data {
        Some(data) => real(out, src, data),
        None => synthetic(out, src),
    }
}

/// Synthetic phantoms: a training dataset and a separately seeded test dataset.
fn synthetic(out: &Path, src: &DataSource) -> Result<(PathBuf, TestSet)> {
    let train_dir = out.join("data");
    let test_dir = out.join("test_data");
    let base = SynthConfig {
        shape: src.shape,
        spacing_xy: src.spacing_xy,
        spacing_z: src.spacing_z,
        workers: src.workers,
        ..Default::default()
    };
    let train_cfg = SynthConfig { labeled: src.labeled, unlabeled: src.unlabeled, seed: src.seed, ..base.clone() };
    let test_cfg = SynthConfig { labeled: src.test, unlabeled: 0, seed: src.seed.wrapping_add(1_000_003), ..base };
    write_dataset(&train_cfg, &train_dir, |_| {})?;
    write_dataset(&test_cfg, &test_dir, |_| {})?;
    let test = RawDataset::open(&test_dir)?;
    Ok((train_dir, TestSet { cases: test.labeled.clone(), labels: test_dir.join(LABELS_TR) }))
}

/// A real dataset: a linked training view without the held-out cases, and the test set.
fn real(out: &Path, src: &DataSource, data: &Path) -> Result<(PathBuf, TestSet)> {
    let ds = RawDataset::open(data)?;
    if let Some(p) = ds.layout_problems.first() {
        bail!("{} has layout problems (run `cps3d dataset check`), first: {p}", data.display());
    }
    let n = ds.labeled.len();
    if n == 0 {
        bail!("{}: no labeled cases to train on", data.display());
    }
    let held_out = src.test.min(n - 1);
    let (train_cases, test_cases) = if held_out == 0 {
        tracing::warn!(
            "{} has {n} labeled case(s): training and evaluating on the same case, so the scores only show that the pipeline works",
            data.display()
        );
        (&ds.labeled[..], &ds.labeled[..])
    } else {
        ds.labeled.split_at(n - held_out)
    };
    let view = out.join("data");
    let test_labels = out.join("test_labels");
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

/// Fingerprints `dataset` into `OUT/fingerprint.json`; an unreadable case is an error.
pub fn fingerprint(out: &Path, dataset: &Path, workers: usize) -> Result<Fingerprint> {
    let fp = fingerprint_dataset(dataset, workers, |_| {})?;
    if let Some(f) = fp.failed_cases.first() {
        bail!("{} case(s) could not be read, first: {}: {}", fp.failed_cases.len(), f.id, f.error);
    }
    fp.write(&out.join("fingerprint.json"))?;
    Ok(fp)
}

/// Plans from the fingerprint with `overrides`, written to `OUT/plans.json`.
pub fn make_plan(out: &Path, fp: &Fingerprint, overrides: &PlanOverrides) -> Result<Plans> {
    let plans = plan(fp, overrides)?;
    plans.write(&out.join("plans.json"))?;
    Ok(plans)
}

/// Shards of one configuration (`3d_fullres` or `2d`); cases with a complete shard are kept.
pub fn preprocess(dataset: &Path, plans: &Plans, shards: &Path, configuration: &str, workers: usize) -> Result<()> {
    let opts = PreprocessOptions { configuration: configuration.into(), workers, ..Default::default() };
    let summary = preprocess_dataset(dataset, plans, shards, &opts, |_, _| {})?;
    if let Some(f) = summary.failed.first() {
        bail!("{} case(s) failed, first: {}: {}", summary.failed.len(), f.id, f.error);
    }
    Ok(())
}

/// Whether the held-out runs' convolutions on the CPU are bfloat16: where the CPU computes
/// them natively, unless `float32`. Says which, when a trainer is on the CPU.
pub fn cpu_bf16_for(devices: &[String], float32: bool, indent: &str) -> bool {
    let bf16 = !float32 && cpu_has_native_bf16();
    if devices.iter().any(|d| d == "cpu") {
        let kind = if bf16 { "bfloat16 (native on this CPU; --float32 to keep float32)" } else { "float32" };
        println!("{indent}convolutions on the CPU in {kind}");
    }
    bf16
}

/// Training options of a run scored on held-out cases: every labeled case trained on
/// (`--fold all`), no final validation, augmentation only on request, bfloat16
/// convolutions on the CPU if `cpu_bf16`, every activation kept (these small networks
/// need well under a gigabyte; recomputing would only cost time).
pub fn held_out_training(
    shards: &Path,
    run_dir: &Path,
    devices: Vec<String>,
    seed: u64,
    augment: bool,
    cpu_bf16: bool,
) -> Result<TrainOptions> {
    Ok(TrainOptions {
        shards: std::fs::canonicalize(shards).with_context(|| shards.display().to_string())?,
        run_dir: run_dir.to_path_buf(),
        devices,
        seed,
        no_augment: !augment,
        fold: "all".into(),
        val_iterations: 5,
        final_validation: false,
        cpu_bf16,
        recompute_stages: 0,
        ..Default::default()
    })
}

/// An epoch's line: `prefix` (e.g. the arm and seed), losses, λ, pseudo-Dice, step time.
pub fn epoch_line(prefix: &str, l: &EpochLog) -> String {
    format!(
        "  {prefix}epoch {:>3}: loss {:.3?} (CPS {:.3?}), λ {:.2}, pseudo-Dice {:.3}, {:.2} s/step",
        l.epoch, l.loss, l.cps_loss, l.lambda, l.mean_pseudo_dice, l.step_seconds
    )
}

/// Trains `opts.run_dir` to the end: continues from `latest.json` when the folder has
/// one. Returns `false`, without training, when the run has already finished
/// (`final.json`).
pub fn train_to_end(opts: &TrainOptions, on_progress: impl FnMut(Progress<'_>)) -> Result<bool> {
    if opts.run_dir.join("final.json").is_file() {
        // Redrawn, so that a finished run's figure follows this build's layout.
        let logs = cps3d::training::checkpoint::read_log(&opts.run_dir.join("log.jsonl"));
        if let Err(e) = cps3d::training::progress::draw(&opts.run_dir.join("progress.png"), &logs) {
            tracing::warn!("{}: redrawing progress.png: {e}", opts.run_dir.display());
        }
        return Ok(false);
    }
    let resume = opts.run_dir.join("latest.json").is_file();
    train(opts, if resume { Start::Resume } else { Start::Overwrite }, None, on_progress)?;
    Ok(true)
}

/// Predicts every held-out case with the run's final checkpoint (both siblings of a CPS
/// run, the one network of a supervised run) into `predictions/{CASE}.nii.gz`.
/// `on_case` gets each case's id and seconds.
pub fn predict_cases(
    run_dir: &Path,
    device: tch::Device,
    test: &TestSet,
    predictions: &Path,
    mut on_case: impl FnMut(&str, f64),
) -> Result<()> {
    let opts = PredictOptions { checkpoint: "final".into(), device, ..Default::default() };
    if device == tch::Device::Cpu {
        // Training split the cores between the two trainers; one network predicts now.
        tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    }
    let model = Model::load(run_dir, &opts.checkpoint, device, opts.ensemble)?;
    std::fs::create_dir_all(predictions).with_context(|| predictions.display().to_string())?;
    for case in &test.cases {
        let out = predictions.join(format!("{}.nii.gz", case.id));
        let r = predict_case(&model, case, &out, &opts)?;
        on_case(&case.id, r.seconds);
    }
    Ok(())
}

/// Preview pictures of the held-out cases, prediction beside reference, into
/// `predictions/preview/{CASE}.png`; returns their paths.
pub fn preview_cases(predictions: &Path, test: &TestSet) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for case in &test.cases {
        let prediction = predictions.join(format!("{}.nii.gz", case.id));
        let reference = test.labels.join(format!("{}.nii.gz", case.id));
        let png = predictions.join("preview").join(format!("{}.png", case.id));
        let image = case.images.first().with_context(|| format!("{}: no image", case.id))?;
        cps3d::preview::render_files(
            image,
            &prediction,
            reference.is_file().then_some(reference.as_path()),
            &case.id,
            &png,
        )?;
        written.push(png);
    }
    Ok(written)
}

/// FLARE22 scores of `predictions` against the test labels, written to
/// `predictions/flare22_scores.csv` (and its summary); any case that cannot be scored is
/// an error.
pub fn evaluate(predictions: &Path, test: &TestSet, workers: usize) -> Result<(Vec<CaseScores>, Summary)> {
    let (cases, problems) = super::evaluate::evaluate_folders(predictions, &test.labels, workers)?;
    if let Some(p) = problems.first() {
        bail!("{p}");
    }
    let summary = super::evaluate::write_scores(&cases, &scores_csv(predictions))?;
    Ok((cases, summary))
}

/// The score table `evaluate` writes in a predictions folder.
pub fn scores_csv(predictions: &Path) -> PathBuf {
    predictions.join("flare22_scores.csv")
}
