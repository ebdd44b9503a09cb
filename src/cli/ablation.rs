//! `cps3d ablation`: the paper's Table 3 on one dataset. Four arms — 2D and 3D networks,
//! each as the supervised baseline (one network) and with cross pseudo supervision (two
//! siblings) — trained with one plan, the same data, seeds and step budget, then scored on
//! the held-out cases with the FLARE22 rules. Each arm is repeated with seeds 0..N and
//! reported as mean ± sample standard deviation, so that a difference can be told from
//! noise. Every arm and seed is resumable: a finished one is read back, not recomputed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use plotters::prelude::*;
use serde_json::{json, Value};

use super::planning::{List, Yx};
use super::workflow::{self, stage, DataSource, TestSet};
use super::{MinMax, Zyx};
use cps3d::dataset::labels::FLARE22_ORGANS;
use cps3d::evaluation::{csv_header, summarize, CaseScores, OrganScore, Summary};
use cps3d::planning::plan::{plan, PlanOverrides, Plans};
use cps3d::training::run::{default_devices, parse_device, Progress, TrainOptions};

/// Names the command in a failed stage's error.
const ABLATION: &str = "ablation";

/// One column of the paper's Table 3: a configuration with or without CPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Arm {
    /// 2D network, supervised only (Baseline2D).
    #[value(name = "2d")]
    TwoD,
    /// 2D networks with cross pseudo supervision (Baseline2D+CPS).
    #[value(name = "2d_cps")]
    TwoDCps,
    /// 3D network, supervised only (Baseline3D).
    #[value(name = "3d")]
    ThreeD,
    /// 3D networks with cross pseudo supervision (Baseline3D+CPS).
    #[value(name = "3d_cps")]
    ThreeDCps,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::TwoD => "2d",
            Arm::TwoDCps => "2d_cps",
            Arm::ThreeD => "3d",
            Arm::ThreeDCps => "3d_cps",
        }
    }

    /// The plan's configuration the arm trains and predicts with.
    fn configuration(self) -> &'static str {
        match self {
            Arm::TwoD | Arm::TwoDCps => "2d",
            Arm::ThreeD | Arm::ThreeDCps => "3d_fullres",
        }
    }

    fn cps(self) -> bool {
        matches!(self, Arm::TwoDCps | Arm::ThreeDCps)
    }

    /// The paper's column heading.
    fn paper(self) -> &'static str {
        match self {
            Arm::TwoD => "Baseline2D",
            Arm::TwoDCps => "Baseline2D+CPS",
            Arm::ThreeD => "Baseline3D",
            Arm::ThreeDCps => "Baseline3D+CPS",
        }
    }

    /// The paper's mDSC (Table 3, FLARE22 validation set): context, not a target.
    fn paper_mdsc(self) -> f64 {
        match self {
            Arm::TwoD => 0.7846,
            Arm::TwoDCps => 0.8069,
            Arm::ThreeD => 0.8627,
            Arm::ThreeDCps => 0.8794,
        }
    }

    fn color(self) -> RGBColor {
        match self {
            Arm::TwoD => RGBColor(158, 202, 225),
            Arm::TwoDCps => RGBColor(33, 113, 181),
            Arm::ThreeD => RGBColor(253, 174, 107),
            Arm::ThreeDCps => RGBColor(217, 72, 1),
        }
    }
}

#[derive(Args, Debug)]
pub struct AblationArgs {
    /// Work folder: data, plan, shards, runs, predictions and the tables (reused when run again).
    #[arg(short, long, default_value = "runs/ablation")]
    out: PathBuf,
    /// A real dataset in nnU-Net layout (FLARE22 label ids) instead of synthetic phantoms;
    /// the last --test labeled cases are held out.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Synthetic labeled training cases.
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    labeled: usize,
    /// Synthetic unlabeled cases (the CPS arms' extra data).
    #[arg(long, default_value_t = 60)]
    unlabeled: usize,
    /// Held-out labeled cases to predict and score.
    #[arg(long, default_value_t = 4, value_parser = super::positive)]
    test: usize,
    /// Synthetic volume shape Z,Y,X.
    #[arg(long, default_value = "40,80,80")]
    shape: Zyx,
    /// Synthetic in-plane spacing range MIN,MAX (mm): the demo's framing, so that the
    /// small organs span a few voxels.
    #[arg(long, default_value = "3.4,3.8")]
    spacing_xy: MinMax,
    /// Synthetic slice spacing range MIN,MAX (mm).
    #[arg(long, default_value = "6,7")]
    spacing_z: MinMax,
    /// 3D training patch Z,Y,X.
    #[arg(long, default_value = "16,48,48")]
    patch: Zyx,
    /// 2D training patch Y,X.
    #[arg(long = "patch-2d", default_value = "80,80")]
    patch_2d: Yx,
    /// Features per stage of the 3D network.
    #[arg(long, default_value = "16,32,64,128")]
    features: List,
    /// Features per stage of the 2D network.
    #[arg(long = "features-2d", default_value = "16,32,64,128,128")]
    features_2d: List,
    /// Epochs of every arm (the defaults: 1500 steps, about an hour for all four arms × 3
    /// seeds on 2 CPU cores).
    #[arg(long, default_value_t = 50, value_parser = super::positive)]
    epochs: usize,
    /// Steps per epoch of every arm.
    #[arg(long, default_value_t = 30, value_parser = super::positive)]
    iterations: usize,
    /// Epochs over which λ rises from 0 to 0.5 in the CPS arms (default: all of them).
    #[arg(long, value_parser = super::positive)]
    lambda_ramp_epochs: Option<usize>,
    /// Seeds per arm: 0..N (mean ± sample standard deviation over them).
    #[arg(long, default_value_t = 3, value_parser = super::between(1, 1000))]
    seeds: usize,
    /// Arms to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "2d,2d_cps,3d,3d_cps")]
    arms: Vec<Arm>,
    /// Devices of the two trainers (default: GPUs when present, else cpu,cpu); the first predicts.
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Train with nnU-Net's augmentation (off by default: short runs converge faster without).
    #[arg(long)]
    augment: bool,
    /// SGD's learning rate and momentum, the demo's: nnU-Net's 0.01 and 0.99 need thousands
    /// of steps.
    #[arg(long, default_value_t = 0.2, value_parser = super::planning::positive_f64, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 0.9, value_parser = super::planning::momentum, allow_negative_numbers = true)]
    momentum: f64,
    /// Normalise CT with all voxels' statistics (3D-CPS's rule) instead of the foreground's
    /// (nnU-Net's, the default).
    #[arg(long)]
    all_voxel_stats: bool,
    /// Keep the trainers' convolutions in float32 on a CPU that computes bfloat16 natively
    /// (where they run in bfloat16 by default, as in the demo).
    #[arg(long)]
    float32: bool,
    /// Worker threads for synthesis, fingerprinting, preprocessing and scoring.
    #[arg(short = 'j', long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    workers: usize,
}

impl AblationArgs {
    fn ramp(&self) -> usize {
        self.lambda_ramp_epochs.unwrap_or(self.epochs)
    }

    /// What makes two runs' arms comparable; `devices`, `-j`, `--seeds` and `--arms` may
    /// change between runs into one folder, these may not.
    fn settings(&self) -> Result<Value> {
        let synthetic = self.data.is_none();
        let data = match &self.data {
            Some(d) => Value::from(
                std::fs::canonicalize(d).with_context(|| format!("--data {}", d.display()))?.display().to_string(),
            ),
            None => Value::Null,
        };
        Ok(json!({
            "data": data,
            "labeled": synthetic.then_some(self.labeled),
            "unlabeled": synthetic.then_some(self.unlabeled),
            "shape": synthetic.then_some(self.shape.0),
            "spacing-xy": synthetic.then_some([self.spacing_xy.0, self.spacing_xy.1]),
            "spacing-z": synthetic.then_some([self.spacing_z.0, self.spacing_z.1]),
            "test": self.test,
            "patch": self.patch.0,
            "patch-2d": self.patch_2d.0,
            "features": self.features.0,
            "features-2d": self.features_2d.0,
            "epochs": self.epochs,
            "iterations": self.iterations,
            "lambda-ramp-epochs": self.ramp(),
            "augment": self.augment,
            "lr": self.lr,
            "momentum": self.momentum,
            "all-voxel-stats": self.all_voxel_stats,
        }))
    }
}

/// One finished arm and seed.
struct Outcome {
    arm: Arm,
    summary: Summary,
    /// Time in the training epochs (`log.jsonl`: survives an interrupted, resumed run).
    train_seconds: f64,
    /// Loading the networks and predicting the held-out cases.
    predict_seconds: f64,
}

pub fn run(a: AblationArgs) -> Result<()> {
    let start = Instant::now();
    let mut arms = a.arms.clone();
    arms.sort();
    arms.dedup();
    if arms.is_empty() {
        bail!("--arms: no arm given (2d, 2d_cps, 3d, 3d_cps)");
    }
    let devices = a.devices.clone().unwrap_or_else(default_devices);
    if devices.is_empty() || devices.len() > 2 {
        bail!("--devices: {} given ({}); one or two, one per sibling", devices.len(), devices.join(","));
    }
    for d in &devices {
        parse_device(d)?;
    }
    let predict_device = parse_device(&devices[0])?;
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let settings = a.settings()?;
    check_settings(&a.out, &settings)?;
    let settings_path = a.out.join("settings.json");
    // The data settings are recorded before the data is made, the others once the plan has
    // accepted them: a run refused for a bad --patch must not lock the folder to it.
    if !settings_path.exists() {
        let data: serde_json::Map<String, Value> =
            DATA_SETTINGS.iter().map(|k| (k.to_string(), settings[*k].clone())).collect();
        cps3d::util::write_json_atomic(&settings_path, &data)?;
    }

    let source = DataSource {
        data: a.data.as_deref(),
        labeled: a.labeled,
        unlabeled: a.unlabeled,
        test: a.test,
        shape: a.shape.0,
        spacing_xy: Some((a.spacing_xy.0, a.spacing_xy.1)),
        spacing_z: Some((a.spacing_z.0, a.spacing_z.1)),
        seed: 0,
        workers: a.workers,
    };
    let (dataset, test) = stage(ABLATION, if a.data.is_some() { "data" } else { "synthesize" }, || {
        workflow::prepare_data(&a.out, &source)
    })?;
    let fp = stage(ABLATION, "fingerprint", || workflow::fingerprint(&a.out, &dataset, a.workers))?;
    let plans: Plans = stage(ABLATION, "plan", || {
        let overrides_3d = PlanOverrides {
            patch_size_3d: Some(a.patch.0),
            features_3d: Some(a.features.0.clone()),
            epochs: Some(a.epochs),
            iterations_per_epoch: Some(a.iterations),
            lr: Some(a.lr),
            momentum: Some(a.momentum),
            foreground_statistics: !a.all_voxel_stats,
            // As in the demo: a short run at full λ from the start lets the siblings'
            // early all-background labels hold back every organ but the largest.
            lambda_ramp_epochs: Some(a.ramp()),
            ..Default::default()
        };
        // Planned once without the 2D options first, so that a refusal names the network at fault.
        plan(&fp, &overrides_3d).context("the 3D network (--patch, --features)")?;
        let overrides = PlanOverrides {
            patch_size_2d: Some(a.patch_2d.0),
            features_2d: Some(a.features_2d.0.clone()),
            ..overrides_3d
        };
        let plans =
            workflow::make_plan(&a.out, &fp, &overrides).context("the 2D network (--patch-2d, --features-2d)")?;
        for configuration in configurations(&arms) {
            let c = plans.configuration(configuration).with_context(|| format!("the plan has no {configuration}"))?;
            println!(
                "{configuration}: spacing {:.2?} mm, patch {:?}, batch {}, features {:?}, {} parameters per network",
                c.spacing, c.patch_size, c.batch_size, c.network.features_per_stage, c.network.parameter_count
            );
        }
        Ok(plans)
    })?;
    for configuration in configurations(&arms) {
        let shards = shard_dir(&a.out, configuration);
        let name = format!("shards {}", if configuration == "2d" { "2d" } else { "3d" });
        stage(ABLATION, &name, || workflow::preprocess(&dataset, &plans, &shards, configuration, a.workers))?;
    }

    cps3d::util::write_json_atomic(&settings_path, &settings)?;
    let cpu_bf16 = workflow::cpu_bf16_for(&devices, a.float32, "");

    let total = arms.len() * a.seeds;
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    // Seed-major: after each seed every arm has a result, so an interrupted long run
    // still leaves a comparison of all arms.
    for seed in 0..a.seeds as u64 {
        for &arm in &arms {
            let label = format!("{} seed {seed}", arm.name());
            let outcome = super::no_panic(&label, || run_arm(&a, arm, seed, &devices, cpu_bf16, predict_device, &test));
            match outcome {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    eprintln!("error: [{label}] {e:#}");
                    failures.push(format!("{label}: {e:#}"));
                }
            }
            // Tables after every arm: partial results are on disk whatever happens next. A
            // table that cannot be written must not stop the arms still to train; the
            // final write below reports it.
            if let Err(e) = write_tables(&a, &arms, &outcomes, total, &fp, &test) {
                tracing::warn!("{e:#}");
            }
        }
    }
    write_tables(&a, &arms, &outcomes, total, &fp, &test)?;
    let table = markdown_table(&arms, &outcomes);
    println!("\nFLARE22 DSC of the {} held-out case(s), mean ± std over seeds:\n\n{table}", test.cases.len());
    println!(
        "tables: {}, {}; chart: {}",
        a.out.join("ablation.md").display(),
        a.out.join("ablation.csv").display(),
        a.out.join("ablation.png").display()
    );
    println!("total {:.0} s; everything is in {}", start.elapsed().as_secs_f64(), a.out.display());
    if !failures.is_empty() {
        bail!(
            "{} of {total} arm-seed(s) failed (the tables hold the others; run again to retry them): {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

/// The configurations the arms need, each once.
fn configurations(arms: &[Arm]) -> Vec<&'static str> {
    let mut c: Vec<&'static str> = arms.iter().map(|a| a.configuration()).collect();
    c.dedup();
    c
}

fn shard_dir(out: &Path, configuration: &str) -> PathBuf {
    out.join(format!("shards_{configuration}"))
}

/// The settings that shape `OUT/data` and the test set.
const DATA_SETTINGS: [&str; 7] = ["data", "labeled", "unlabeled", "shape", "spacing-xy", "spacing-z", "test"];

/// Refuses a folder whose data or finished arms were made with other settings (they
/// would be reused, and compared with arms that were not): every setting recorded in
/// `OUT/settings.json` must be the same now.
fn check_settings(out: &Path, now: &Value) -> Result<()> {
    let path = out.join("settings.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| path.display().to_string()),
    };
    let before: Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let show = |v: Option<&Value>| match v {
        None | Some(Value::Null) => "unset".to_string(),
        Some(v) => v.to_string(),
    };
    let changed: Vec<String> = now
        .as_object()
        .expect("settings are an object")
        .iter()
        .filter(|(k, v)| before.get(k.as_str()).is_some_and(|b| b != *v))
        .map(|(k, v)| format!("--{k} was {}, now {}", show(before.get(k.as_str())), show(Some(v))))
        .collect();
    if !changed.is_empty() {
        bail!(
            "{} holds data and arms made with other settings ({}); they would be reused and compared with \
             arms that were not: use another -o, or delete {} to start over",
            out.display(),
            changed.join("; "),
            out.display()
        );
    }
    Ok(())
}

/// Trains, predicts and scores one arm and seed, or reads back a finished one.
fn run_arm(
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
fn read_scores(csv: &Path) -> Result<Vec<CaseScores>> {
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

/// Mean and sample standard deviation of the finite values (NaN where there are none;
/// the deviation NaN with fewer than two).
fn mean_std(values: impl IntoIterator<Item = f64>) -> (f64, f64, usize) {
    let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let std =
        if n < 2 { f64::NAN } else { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() };
    (mean, std, n)
}

/// The table's rows: the 13 organs' DSC, then mDSC and mNSD; per arm, one value per seed.
fn rows(arm: Arm, outcomes: &[Outcome]) -> Vec<(String, Vec<f64>)> {
    let of_arm: Vec<&Summary> = outcomes.iter().filter(|o| o.arm == arm).map(|o| &o.summary).collect();
    let mut rows: Vec<(String, Vec<f64>)> = FLARE22_ORGANS
        .iter()
        .enumerate()
        .map(|(i, (_, _, short))| (short.to_string(), of_arm.iter().map(|s| s.organs[i].1).collect()))
        .collect();
    rows.push(("mDSC".into(), of_arm.iter().map(|s| s.mean_dsc).collect()));
    rows.push(("mNSD".into(), of_arm.iter().map(|s| s.mean_nsd).collect()));
    rows
}

fn cell(values: &[f64], decimals: usize) -> String {
    match mean_std(values.iter().copied()) {
        (_, _, 0) => "–".into(),
        (m, _, 1) => format!("{m:.decimals$}"),
        (m, s, _) => format!("{m:.decimals$} ± {s:.decimals$}"),
    }
}

/// The organ table in the paper's layout (rows: organs, mDSC, mNSD; columns: arms).
fn markdown_table(arms: &[Arm], outcomes: &[Outcome]) -> String {
    let per_arm: Vec<Vec<(String, Vec<f64>)>> = arms.iter().map(|&arm| rows(arm, outcomes)).collect();
    let mut t = String::from("| Organ (DSC) |");
    for arm in arms {
        t += &format!(" {} (`{}`) |", arm.paper(), arm.name());
    }
    t += &format!("\n|---|{}\n", "---|".repeat(arms.len()));
    for r in 0..per_arm.first().map_or(0, Vec::len) {
        t += &format!("| {} |", per_arm[0][r].0);
        for arm_rows in &per_arm {
            t += &format!(" {} |", cell(&arm_rows[r].1, 3));
        }
        t.push('\n');
    }
    t
}

/// `ablation.md`, `ablation.csv` and `ablation.png` from the arms and seeds finished so far.
fn write_tables(
    a: &AblationArgs,
    arms: &[Arm],
    outcomes: &[Outcome],
    total: usize,
    fp: &cps3d::planning::fingerprint::Fingerprint,
    test: &TestSet,
) -> Result<()> {
    let seeds = |arm: Arm| outcomes.iter().filter(|o| o.arm == arm).count();
    let times =
        |arm: Arm, f: fn(&Outcome) -> f64| -> Vec<f64> { outcomes.iter().filter(|o| o.arm == arm).map(f).collect() };

    let mut md = String::from("# cps3d ablation\n\n");
    let data = match &a.data {
        Some(d) => format!("`{}`", d.display()),
        None => format!("synthetic phantoms {}×{}×{}", a.shape.0[0], a.shape.0[1], a.shape.0[2]),
    };
    md += &format!(
        "Data: {data}; {} labeled + {} unlabeled training cases, {} held-out case(s) scored with the FLARE22 rules.\n",
        fp.num_labeled,
        fp.num_unlabeled,
        test.cases.len()
    );
    let mut configs = Vec::new();
    if arms.iter().any(|a| a.configuration() == "3d_fullres") {
        configs.push(format!("3D patch {:?}, features {:?}", a.patch.0, a.features.0));
    }
    if arms.iter().any(|a| a.configuration() == "2d") {
        configs.push(format!("2D patch {:?}, features {:?}", a.patch_2d.0, a.features_2d.0));
    }
    md += &format!(
        "One plan: {}. Every arm: {} epochs × {} steps, {}, λ ramp over {} epochs (CPS arms), {}; \
         cells are mean ± sample standard deviation over seeds.\n",
        configs.join("; "),
        a.epochs,
        a.iterations,
        if a.augment { "nnU-Net augmentation" } else { "no augmentation" },
        a.ramp(),
        if a.seeds == 1 { "seed 0".to_string() } else { format!("seeds 0 to {}", a.seeds - 1) }
    );
    let done = outcomes.len();
    if done < total {
        md += &format!("\n**Incomplete: {done} of {total} arm-seed(s) finished.**\n");
    }
    md += "\n";
    md += &markdown_table(arms, outcomes);
    md += "\n| Run |";
    for arm in arms {
        md += &format!(" `{}` |", arm.name());
    }
    md += &format!("\n|---|{}\n| seeds finished |", "---|".repeat(arms.len()));
    for &arm in arms {
        md += &format!(" {} |", seeds(arm));
    }
    md += "\n| training, s per seed |";
    for &arm in arms {
        md += &format!(" {} |", cell(&times(arm, |o| o.train_seconds), 0));
    }
    md += "\n| prediction, s per seed |";
    for &arm in arms {
        md += &format!(" {} |", cell(&times(arm, |o| o.predict_seconds), 0));
    }
    md += "\n| paper's mDSC (FLARE22, for context) |";
    for &arm in arms {
        md += &format!(" {:.4} |", arm.paper_mdsc());
    }
    md += "\n\nTraining time is the sum of the epochs' times in the run's `log.jsonl`; per-case scores are in \
           `predictions/{arm}/seed{s}/flare22_scores.csv`.\n";
    cps3d::util::write_atomic(&a.out.join("ablation.md"), md.as_bytes())?;

    // Machine-readable: one row per table row, a mean and a std column per arm.
    let mut csv = String::from("metric");
    for arm in arms {
        csv += &format!(",{0}_mean,{0}_std", arm.name());
    }
    csv.push('\n');
    let number = |v: f64| if v.is_finite() { format!("{v:.6}") } else { String::new() };
    let per_arm: Vec<Vec<(String, Vec<f64>)>> = arms.iter().map(|&arm| rows(arm, outcomes)).collect();
    let mut lines: Vec<(String, Vec<Vec<f64>>)> = (0..per_arm[0].len())
        .map(|r| {
            let name = per_arm[0][r].0.clone();
            let name = if r < FLARE22_ORGANS.len() { format!("{name}_DSC") } else { name };
            (name, per_arm.iter().map(|rows| rows[r].1.clone()).collect())
        })
        .collect();
    lines.push(("train_seconds".into(), arms.iter().map(|&arm| times(arm, |o| o.train_seconds)).collect()));
    lines.push(("predict_seconds".into(), arms.iter().map(|&arm| times(arm, |o| o.predict_seconds)).collect()));
    for (name, values) in &lines {
        csv += name;
        for v in values {
            let (m, s, _) = mean_std(v.iter().copied());
            csv += &format!(",{},{}", number(m), number(s));
        }
        csv.push('\n');
    }
    csv += "seeds";
    for &arm in arms {
        csv += &format!(",{},", seeds(arm));
    }
    csv.push('\n');
    cps3d::util::write_atomic(&a.out.join("ablation.csv"), csv.as_bytes())?;

    let png = a.out.join("ablation.png");
    // Drawn beside and renamed, so that the chart on disk is always whole.
    let tmp = a.out.join(".tmp-ablation.png");
    draw_chart(&tmp, arms, outcomes).map_err(|e| anyhow::anyhow!("{}: cannot draw: {e}", png.display()))?;
    std::fs::rename(&tmp, &png).with_context(|| png.display().to_string())?;
    Ok(())
}

/// Grouped bars: per organ and for mDSC, one bar per arm (mean DSC over seeds) with
/// its ± standard deviation.
fn draw_chart(path: &Path, arms: &[Arm], outcomes: &[Outcome]) -> Result<(), String> {
    let text = cps3d::training::progress::font_available();
    let per_arm: Vec<Vec<(String, Vec<f64>)>> = arms.iter().map(|&arm| rows(arm, outcomes)).collect();
    // Organs and mDSC; mNSD is another measure and stays in the tables.
    let groups = FLARE22_ORGANS.len() + 1;
    let names: Vec<String> = per_arm[0][..groups].iter().map(|r| r.0.clone()).collect();
    let root = BitMapBackend::new(path, (1400, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut b = ChartBuilder::on(&root);
    b.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 55 } else { 5 });
    if text {
        let seeds = outcomes.iter().filter(|o| o.arm == arms[0]).count();
        b.caption(format!("DSC per organ on the held-out cases (mean ± std over {seeds} seed(s))"), ("sans-serif", 22));
    }
    // Headroom above 1 keeps the legend off the bars.
    let mut chart = b.build_cartesian_2d(-0.5f64..(groups as f64 - 0.5), 0f64..1.3).map_err(|e| e.to_string())?;
    if text {
        let label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups)
            .x_label_formatter(&label)
            .y_labels(14)
            // The headroom above 1 holds the legend, not DSC values.
            .y_label_formatter(&|y| if *y <= 1.0 + 1e-9 { format!("{y:.1}") } else { String::new() })
            .light_line_style(WHITE)
            .y_desc("DSC")
            .draw()
            .map_err(|e| e.to_string())?;
    }
    let width = 0.8 / arms.len() as f64;
    for (k, (&arm, arm_rows)) in arms.iter().zip(&per_arm).enumerate() {
        let color = arm.color();
        let bars: Vec<(f64, f64, f64)> = (0..groups)
            .filter_map(|g| {
                let (m, s, _) = mean_std(arm_rows[g].1.iter().copied());
                let x0 = g as f64 - 0.4 + k as f64 * width;
                m.is_finite().then_some((x0, m, s))
            })
            .collect();
        let series = chart
            .draw_series(bars.iter().map(|&(x0, m, _)| Rectangle::new([(x0, 0.0), (x0 + width, m)], color.filled())))
            .map_err(|e| e.to_string())?;
        if text {
            series
                .label(format!("{} ({})", arm.paper(), arm.name()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        }
        let whiskers = bars.iter().filter(|b| b.2.is_finite()).flat_map(|&(x0, m, s)| {
            let (xc, cap) = (x0 + width / 2.0, width / 4.0);
            let (lo, hi) = ((m - s).max(0.0), (m + s).min(1.0));
            [vec![(xc, lo), (xc, hi)], vec![(xc - cap, lo), (xc + cap, lo)], vec![(xc - cap, hi), (xc + cap, hi)]]
        });
        chart.draw_series(whiskers.map(|p| PathElement::new(p, BLACK.stroke_width(1)))).map_err(|e| e.to_string())?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_the_sample_deviation_from_two_seeds_on() {
        let (m, s, n) = mean_std([0.8, 0.9, f64::NAN, 1.0]);
        assert_eq!(n, 3);
        assert!((m - 0.9).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12, "sample std (n - 1): {s}");
        assert_eq!(cell(&[0.8, 0.9, 1.0], 3), "0.900 ± 0.100");
        assert_eq!(cell(&[0.8125], 3), "0.812", "one seed: no ±");
        assert_eq!(cell(&[f64::NAN], 3), "–");
    }

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
