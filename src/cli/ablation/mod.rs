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
use cps3d::evaluation::Summary;
use cps3d::planning::plan::{plan, PlanOverrides, Plans};
use cps3d::training::run::{default_devices, parse_device};

mod arms;
mod chart;
mod table;

use arms::run_arm;
use table::{markdown_table, write_tables};

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
            if let Err(e) = write_results(&a, &arms, &outcomes, total, &fp, &test) {
                tracing::warn!("{e:#}");
            }
        }
    }
    write_results(&a, &arms, &outcomes, total, &fp, &test)?;
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

/// The tables and the chart of the arms and seeds finished so far.
fn write_results(
    a: &AblationArgs,
    arms: &[Arm],
    outcomes: &[Outcome],
    total: usize,
    fp: &cps3d::planning::fingerprint::Fingerprint,
    test: &TestSet,
) -> Result<()> {
    write_tables(a, arms, outcomes, total, fp, test)?;
    chart::write_chart(&a.out, arms, outcomes)
}
