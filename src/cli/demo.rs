//! `cps3d demo`: the whole pipeline end to end, small enough for a laptop CPU.
//!
//! data (synthetic phantoms, or `--data` a real dataset) → fingerprint → plan (small patch and
//! network) → preprocess → CPS training → predict the held-out cases → FLARE22 evaluation.
//! Every stage writes into one folder and is resumable: a second run reuses finished work.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::workflow::{self, stage, DataSource};
use super::{planning::List, MinMax, Zyx};
use cps3d::planning::fingerprint::Fingerprint;
use cps3d::planning::plan::{PlanOverrides, Plans};
use cps3d::training::estimate::Estimate;
use cps3d::training::records::StepPhases;
use cps3d::training::run::{default_devices, Progress};

/// Names the demo in a failed stage's error.
const DEMO: &str = "demo";

/// What the README promises for the demo on 2 CPU cores.
const DEMO_BUDGET_SECONDS: f64 = 300.0;

/// Why a demo on the CPU is expected to run over its budget: what is known about this
/// machine (native bfloat16, cores, other load measured while the steps were timed).
fn over_budget_reasons(devices: &[String], cpu_bf16: bool, float32: bool, e: &Estimate) -> Vec<String> {
    let mut why = Vec::new();
    if devices.iter().any(|d| d == "cpu") {
        if !cpu_bf16 && float32 && cps3d::training::options::cpu_has_native_bf16() {
            why.push("convolutions in float32 (--float32)".to_string());
        } else if !cpu_bf16 {
            why.push(
                "convolutions in float32: no native bfloat16 here (no AVX512-BF16, or oneDNN capped by ONEDNN_MAX_CPU_ISA)"
                    .to_string(),
            );
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            why.push(format!("{cores} core: the two trainers share it (the budget is for 2 cores, one each)"));
        }
        if let Some(load) = e.other_load_cores.filter(|&l| l > 0.25) {
            why.push(format!("a loaded machine: other processes (and the hypervisor) took {load:.1} of {cores} cores while the steps were timed"));
        }
    }
    if why.is_empty() {
        why.push(format!(
            "slower steps than on the CPUs the README measured ({:.3} s/step here; its table lists them)",
            e.seconds_per_step
        ));
    }
    why
}

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
    #[arg(long, default_value_t = 20)]
    labeled: usize,
    /// Synthetic unlabeled cases (the CPS term's data).
    #[arg(long, default_value_t = 20)]
    unlabeled: usize,
    /// Held-out labeled cases to predict and score.
    #[arg(long, default_value_t = 4)]
    test: usize,
    /// Synthetic volume shape Z,Y,X.
    #[arg(long, default_value = "40,56,56")]
    shape: Zyx,
    /// Synthetic in-plane spacing range MIN,MAX (mm). The default frames the organs (a
    /// 275-300 mm field of view, 240-280 mm long at the default shape) at a resolution
    /// whose steps fit the 5-minute budget in float32 on 2 cores without AVX-512.
    #[arg(long, default_value = "4.9,5.3")]
    spacing_xy: MinMax,
    /// Synthetic slice spacing range MIN,MAX (mm).
    #[arg(long, default_value = "6,7")]
    spacing_z: MinMax,
    /// Training patch Z,Y,X.
    #[arg(long, default_value = "16,32,32")]
    patch: Zyx,
    /// Features per network stage (the paper's network: 32,64,128,256,320,320).
    #[arg(long, default_value = "16,32,64,128")]
    features: List,
    /// Labeled samples per step (the paper's 2).
    #[arg(long, default_value_t = 2, value_parser = super::positive, allow_negative_numbers = true)]
    batch_size: usize,
    /// Unlabeled samples per step (the paper's 2; 1 makes a step a quarter cheaper, which
    /// buys the steps the 5-minute budget needs on CPUs without native bfloat16).
    #[arg(long, default_value_t = 1, value_parser = super::positive, allow_negative_numbers = true)]
    unlabeled_batch: usize,
    /// Epochs of --iterations steps (default: 40 where the convolutions run in float32 on
    /// the CPU, 80 with native bfloat16 or on GPUs: what fits 5 minutes on 2 cores).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// SGD's learning rate and momentum. nnU-Net's 0.01 and 0.99 need thousands of steps:
    /// momentum 0.99 takes ~100 steps to build up; 0.3 and 0.9 learn most organs in hundreds.
    #[arg(long, default_value_t = 0.3, value_parser = super::planning::positive_f64, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 0.9, value_parser = super::planning::momentum, allow_negative_numbers = true)]
    momentum: f64,
    /// Share of the labeled samples centred on a voxel of a random class present in the
    /// case (nnU-Net's 0.33). 1.0 makes each adrenal gland the centre of one labeled sample
    /// in 13 instead of one in 39: a higher mean over three seeds, but a wider spread.
    #[arg(long, default_value_t = 0.33, value_parser = super::planning::fraction, allow_negative_numbers = true)]
    oversample_foreground: f64,
    /// Normalise CT with statistics over all voxels (3D-CPS's) instead of the foreground's
    /// (nnU-Net's): all voxels squeeze the organs into a few hundredths of a z-unit.
    #[arg(long)]
    all_voxel_stats: bool,
    /// Epochs over which λ rises from 0 to 0.5 (default: all of them).
    #[arg(long)]
    lambda_ramp_epochs: Option<usize>,
    /// Convolutions in float32 on the CPU. By default they run in bfloat16 (float32
    /// weights, norms and losses) where the CPU computes it natively (AVX512-BF16):
    /// about 1.6× more steps in the same time.
    #[arg(long)]
    float32: bool,
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

pub fn run(a: DemoArgs) -> Result<()> {
    let start = Instant::now();
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let source = DataSource {
        data: a.data.as_deref(),
        labeled: a.labeled,
        unlabeled: a.unlabeled,
        test: a.test,
        shape: a.shape.0,
        spacing_xy: Some((a.spacing_xy.0, a.spacing_xy.1)),
        spacing_z: Some((a.spacing_z.0, a.spacing_z.1)),
        seed: a.seed,
        workers: a.workers,
    };
    let (dataset, test) =
        stage(DEMO, if a.data.is_some() { "data" } else { "synthesize" }, || workflow::prepare_data(&a.out, &source))?;
    if test.cases.is_empty() {
        bail!("no held-out cases to evaluate (use --test N with N ≥ 1)");
    }
    let fp: Fingerprint = stage(DEMO, "fingerprint", || workflow::fingerprint(&a.out, &dataset, a.workers))?;
    let devices = a.devices.clone().unwrap_or_else(default_devices);
    let cpu_bf16 = workflow::cpu_bf16_for(&devices, a.float32, "");
    let float32_on_cpu = devices.iter().any(|d| d == "cpu") && !cpu_bf16;
    // Twice the steps where they are cheap enough to fit the same budget.
    let epochs = a.epochs.unwrap_or(if float32_on_cpu { 40 } else { 80 });
    let plans: Plans = stage(DEMO, "plan", || {
        let overrides = PlanOverrides {
            patch_size_3d: Some(a.patch.0),
            features_3d: Some(a.features.0.clone()),
            epochs: Some(epochs),
            iterations_per_epoch: Some(a.iterations),
            lr: Some(a.lr),
            momentum: Some(a.momentum),
            oversample_foreground: Some(a.oversample_foreground),
            foreground_statistics: !a.all_voxel_stats,
            // λ ramps over the whole short run: at full weight from the first epochs, the
            // siblings' argmax labels (background for every organ not learned yet) would
            // hold back all but the largest organs.
            lambda_ramp_epochs: Some(a.lambda_ramp_epochs.unwrap_or(epochs)),
            batch_size: Some(a.batch_size),
            unlabeled_batch: Some(a.unlabeled_batch),
            ..Default::default()
        };
        let plans = workflow::make_plan(&a.out, &fp, &overrides)?;
        let c = plans.configuration("3d_fullres").context("the plan has no 3d_fullres configuration")?;
        println!(
            "3d_fullres: spacing {:.2?} mm, patch {:?}, batch {} + {} unlabeled, features {:?}, {} parameters per network",
            c.spacing, c.patch_size, plans.cps.labeled_batch, plans.cps.unlabeled_batch, c.network.features_per_stage, c.network.parameter_count
        );
        Ok(plans)
    })?;
    let shards = a.out.join("shards");
    stage(DEMO, "preprocess", || workflow::preprocess(&dataset, &plans, &shards, "3d_fullres", a.workers))?;
    let run_dir = a.out.join("run");
    stage(DEMO, "train", || {
        // The demo scores its own held-out cases below: train on every labeled case.
        let opts = workflow::held_out_training(&shards, &run_dir, devices.clone(), a.seed, a.augment, cpu_bf16)?;
        let mut phases = Vec::new();
        let trained = workflow::train_to_end(&opts, |p| match p {
            Progress::Estimate(e) => {
                println!("  {e}");
                let demo_seconds = start.elapsed().as_secs_f64() + e.training_seconds - e.elapsed_seconds;
                if demo_seconds > DEMO_BUDGET_SECONDS {
                    let why = over_budget_reasons(&opts.devices, cpu_bf16, a.float32, e);
                    println!(
                        "  the demo will take about {:.1} min, over its {:.0}-minute budget: {}",
                        demo_seconds / 60.0,
                        DEMO_BUDGET_SECONDS / 60.0,
                        why.join("; ")
                    );
                }
            }
            Progress::Epoch(l) => {
                phases.push(l.phases);
                println!("{}", workflow::epoch_line("", l));
            }
        })?;
        if !trained {
            println!("training already finished in {} (delete it to train again)", run_dir.display());
        } else {
            let mean = StepPhases::mean(phases.iter());
            let per_step: f64 = mean.values().iter().sum();
            println!("  a step's time ({per_step:.3} s, mean over trainers and epochs): {}", mean.shares());
        }
        Ok(())
    })?;
    let predictions = a.out.join("predictions");
    stage(DEMO, "predict", || {
        let device = super::device_or_default(a.devices.as_ref().map(|d| d[0].as_str()))?;
        workflow::predict_cases(&run_dir, device, &test, &predictions, |id, seconds| println!("  {id}: {seconds:.1} s"))
    })?;
    let (_, summary) = stage(DEMO, "evaluate", || workflow::evaluate(&predictions, &test, a.workers))?;
    let previews = stage(DEMO, "preview", || workflow::preview_cases(&predictions, &test))?;
    println!("\nFLARE22 scores of the held-out cases ({}):", workflow::scores_csv(&predictions).display());
    println!("{summary}");
    println!(
        "({} CPS steps: networks learn the large organs first; small ones need thousands of steps, e.g. --epochs 200 on a GPU)",
        epochs * a.iterations
    );
    println!("pictures: prediction beside reference, axial, coronal and sagittal slices through the organs:");
    for p in &previews {
        println!("  {}", p.display());
    }
    println!("training curves: {}", run_dir.join("progress.png").display());
    println!("total {:.0} s; everything is in {}", start.elapsed().as_secs_f64(), a.out.display());
    Ok(())
}
