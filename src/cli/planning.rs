//! `cps3d fingerprint` and `cps3d plan`: the dataset's statistics and nnU-Net's plans from them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{progress, Zyx};
use cps3d::planning::fingerprint::{fingerprint_dataset, fingerprint_part, merge_parts, Fingerprint};
use cps3d::planning::footprint::check_preprocess_memory;
use cps3d::planning::plan::{plan, PlanOverrides, Plans};
use cps3d::util::Part;

#[derive(Args, Debug)]
pub struct FingerprintArgs {
    /// Raw dataset folder (dataset.json, imagesTr/, labelsTr/, imagesUnlabeled/).
    dataset: PathBuf,
    /// Output file.
    #[arg(short, long, default_value = "fingerprint.json")]
    out: PathBuf,
    /// Worker threads (one scan in memory per worker).
    #[arg(short = 'j', long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    workers: usize,
    /// Fingerprint only part I of N (0-based; every N-th case from the I-th) into
    /// OUT.part-I-of-N, for --merge to combine; `slurm` takes I and N from a job array
    /// (SLURM_ARRAY_TASK_ID, _MIN, _COUNT).
    #[arg(long, conflicts_with = "merge")]
    part: Option<PartArg>,
    /// Combine the parts beside OUT (all N of them, made for this dataset's current case
    /// list) into OUT: the same file one process writes.
    #[arg(long)]
    merge: bool,
}

/// `--part I/N` or `--part slurm`.
#[derive(Debug, Clone)]
pub(crate) enum PartArg {
    Given(Part),
    Slurm,
}

impl std::str::FromStr for PartArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "slurm" {
            Ok(PartArg::Slurm)
        } else {
            s.parse().map(PartArg::Given)
        }
    }
}

impl PartArg {
    pub(crate) fn resolve(&self) -> Result<Part> {
        match self {
            PartArg::Given(p) => Ok(*p),
            PartArg::Slurm => cps3d::util::slurm_array_part(|k| std::env::var(k).ok())
                .map_err(|e| anyhow::anyhow!("--part slurm: {e}"))?
                .context(
                    "--part slurm: SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set (not a job array task)",
                ),
        }
    }
}

pub fn fingerprint(a: FingerprintArgs) -> Result<()> {
    if let Some(part) = &a.part {
        let part = part.resolve()?;
        let file = part.file(&a.out);
        let p = fingerprint_part(&a.dataset, part, &a.out, a.workers, |_| {})
            .with_context(|| format!("fingerprinting part {}/{} of {}", part.index, part.count, a.dataset.display()))?;
        println!(
            "wrote {} ({} of {} case(s) of its share fingerprinted)",
            file.display(),
            p.cases.len(),
            p.share.len()
        );
        for f in &p.failed_cases {
            eprintln!("failed: {}: {}", f.id, f.error);
        }
        if !p.failed_cases.is_empty() {
            bail!("{} case(s) could not be fingerprinted (recorded in {})", p.failed_cases.len(), file.display());
        }
        return Ok(());
    }
    let fp = if a.merge {
        merge_parts(&a.dataset, &a.out).with_context(|| format!("merging the parts of {}", a.out.display()))?
    } else {
        let total = cps3d::dataset::RawDataset::open(&a.dataset).map(|d| d.cases().count()).unwrap_or(0);
        let pb = progress::bar(total as u64, "fingerprint");
        let fp = fingerprint_dataset(&a.dataset, a.workers, |id| {
            pb.set_message(id.to_string());
            pb.inc(1)
        })
        .with_context(|| format!("fingerprinting {}", a.dataset.display()))?;
        pb.finish_and_clear();
        fp
    };
    fp.write(&a.out)?;
    print_fingerprint(&fp);
    println!("wrote {}", a.out.display());
    if !fp.failed_cases.is_empty() {
        for f in &fp.failed_cases {
            eprintln!("failed: {}: {}", f.id, f.error);
        }
        bail!("{} case(s) could not be fingerprinted (left out of {})", fp.failed_cases.len(), a.out.display());
    }
    Ok(())
}

fn print_fingerprint(fp: &Fingerprint) {
    println!(
        "{} labeled + {} unlabeled cases; median spacing (z,y,x) {:.3?} mm; median shape after crop {:.0?}",
        fp.num_labeled, fp.num_unlabeled, fp.median_spacing, fp.median_shape_after_crop
    );
    for ch in &fp.intensity {
        for (what, s) in [("all voxels", &ch.all_voxels), ("foreground", &ch.foreground)] {
            println!(
                "  {} {:<10}: n={} mean {:.2} std {:.2} min {:.1} p0.5 {:.1} p50 {:.1} p99.5 {:.1} max {:.1}",
                ch.name, what, s.count, s.mean, s.std, s.min, s.percentile_00_5, s.median, s.percentile_99_5, s.max
            );
        }
    }
}

/// A comma-separated list of whole numbers, each at least 1 (features per stage).
#[derive(Debug, Clone)]
pub struct List(pub Vec<usize>);

impl std::str::FromStr for List {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|p| match p.trim().parse::<usize>() {
                Ok(0) => Err(format!("every entry must be at least 1, got \"{s}\"")),
                Ok(n) => Ok(n),
                Err(_) => Err(format!("\"{p}\" is not a whole number")),
            })
            .collect::<Result<_, _>>()
            .map(List)
    }
}

/// Y,X, each at least 1.
#[derive(Debug, Clone, Copy)]
pub struct Yx(pub [usize; 2]);

impl std::str::FromStr for Yx {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v = super::parse_list::<usize>(s, 2)?;
        if v.contains(&0) {
            return Err(format!("Y,X must each be at least 1, got \"{s}\""));
        }
        Ok(Yx([v[0], v[1]]))
    }
}

/// Z,Y,X in mm, each positive and finite.
#[derive(Debug, Clone, Copy)]
pub struct SpacingZyx(pub [f64; 3]);

impl std::str::FromStr for SpacingZyx {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v = super::parse_list::<f64>(s, 3)?;
        if v.iter().any(|&x| !(x > 0.0 && x.is_finite())) {
            return Err(format!("Z,Y,X must each be positive and finite (mm), got \"{s}\""));
        }
        Ok(SpacingZyx([v[0], v[1], v[2]]))
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// fingerprint.json from `cps3d fingerprint`.
    fingerprint: PathBuf,
    /// Output file.
    #[arg(short, long, default_value = "plans.json")]
    out: PathBuf,
    /// Target spacing Z,Y,X in mm (default: nnU-Net's rule on the fingerprint).
    #[arg(long, allow_hyphen_values = true)]
    target_spacing: Option<SpacingZyx>,
    /// 3D patch Z,Y,X (padded up to what the pooling needs; no memory-driven shrinking).
    #[arg(long)]
    patch_size: Option<Zyx>,
    /// 2D patch Y,X.
    #[arg(long)]
    patch_size_2d: Option<Yx>,
    /// 3D features per stage, e.g. 32,64,128,256,320,320.
    #[arg(long)]
    features: Option<List>,
    /// 2D features per stage.
    #[arg(long)]
    features_2d: Option<List>,
    /// Features of the first stage (doubling per stage up to the maximum).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    base_features: Option<usize>,
    /// Maximum 3D features per stage (nnU-Net: 320).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    max_features: Option<usize>,
    /// Maximum 2D features per stage (nnU-Net v2: 512; v1 and the paper: 480).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    max_features_2d: Option<usize>,
    /// GPU memory target in GB for patch and batch size (nnU-Net: 8).
    #[arg(long, value_parser = super::positive_f64, allow_negative_numbers = true)]
    gpu_memory: Option<f64>,
    /// Normalise with labeled-foreground statistics (nnU-Net) instead of all voxels (3D-CPS).
    #[arg(long)]
    foreground_stats: bool,
    /// Training epochs (default 1000).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    epochs: Option<usize>,
    /// Iterations per epoch (default 250).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    iterations: Option<usize>,
    /// Epochs over which λ rises from 0 to 0.5 (default: a tenth of the epochs).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    lambda_ramp_epochs: Option<usize>,
    /// λ = 0.5 from the start (the authors' code) instead of the paper's ramp.
    #[arg(long)]
    constant_lambda: bool,
    /// Reduce-on-plateau learning rate (the paper) instead of poly 0.9 (nnU-Net).
    #[arg(long)]
    plateau_lr: bool,
    /// SGD's initial learning rate (nnU-Net: 0.01).
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// SGD's momentum, in [0, 1) (nnU-Net: 0.99).
    #[arg(long, value_parser = momentum, allow_negative_numbers = true)]
    momentum: Option<f64>,
    /// Share of the labeled samples centred on a voxel of a random class present in
    /// the case, in [0, 1] (nnU-Net: 0.33).
    #[arg(long, value_parser = fraction, allow_negative_numbers = true)]
    oversample_foreground: Option<f64>,
    /// Switch all training augmentation off (it can also be edited per transform in plans.json).
    #[arg(long)]
    no_augmentation: bool,
    /// Labeled samples per step, instead of nnU-Net's rule (at least 2).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    batch_size: Option<usize>,
    /// Unlabeled samples per step (default: as many as labeled, the paper's 2 + 2).
    #[arg(long, value_parser = super::positive, allow_negative_numbers = true)]
    unlabeled_batch: Option<usize>,
}

pub(crate) fn positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("\"{s}\" is not a positive number")),
    }
}

pub(crate) fn momentum(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("\"{s}\" is not a momentum in [0, 1)")),
    }
}

pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("\"{s}\" is not a fraction in [0, 1]")),
    }
}

pub fn run_plan(a: PlanArgs) -> Result<()> {
    let fp = Fingerprint::read(&a.fingerprint)?;
    let o = PlanOverrides {
        target_spacing: a.target_spacing.map(|s| s.0),
        patch_size_3d: a.patch_size.map(|p| p.0),
        patch_size_2d: a.patch_size_2d.map(|p| p.0),
        features_3d: a.features.map(|f| f.0),
        features_2d: a.features_2d.map(|f| f.0),
        base_features: a.base_features,
        max_features_3d: a.max_features,
        max_features_2d: a.max_features_2d,
        gpu_memory_gb: a.gpu_memory,
        foreground_statistics: a.foreground_stats,
        epochs: a.epochs,
        iterations_per_epoch: a.iterations,
        lr: a.lr,
        momentum: a.momentum,
        oversample_foreground: a.oversample_foreground,
        lambda_ramp_epochs: a.lambda_ramp_epochs,
        constant_lambda: a.constant_lambda,
        plateau_lr: a.plateau_lr,
        no_augmentation: a.no_augmentation,
        batch_size: a.batch_size,
        unlabeled_batch: a.unlabeled_batch,
    };
    let plans = plan(&fp, &o).with_context(|| format!("planning from {}", a.fingerprint.display()))?;
    // A plan whose median case cannot be preprocessed here would abort `preprocess`.
    check_preprocess_memory(&plans, &plans.cps.configuration, None, 1)
        .map_err(|e| anyhow::anyhow!("planning from {}: {e}", a.fingerprint.display()))?;
    plans.write(&a.out)?;
    print_plans(&plans);
    for (flag, asked, name) in [
        ("--patch-size", a.patch_size.map(|p| p.0.to_vec()), "3d_fullres"),
        ("--patch-size-2d", a.patch_size_2d.map(|p| p.0.to_vec()), "2d"),
    ] {
        let (Some(asked), Some(c)) = (asked, plans.configuration(name)) else { continue };
        if asked != c.patch_size {
            let multiples: Vec<usize> =
                (0..asked.len()).map(|ax| c.network.strides.iter().map(|s| s[ax]).product()).collect();
            let list = |v: &[usize]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
            tracing::warn!(
                "{flag} {} became {} in {name}: its network pools each axis down by {}, so the patch is padded up \
                 to multiples of that (as nnU-Net does)",
                list(&asked),
                list(&c.patch_size),
                list(&multiples)
            );
        }
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

fn print_plans(p: &Plans) {
    for (name, c) in &p.configurations {
        println!(
            "{name}: spacing {:.3?} mm, median shape {:?}, patch {:?}, batch {} (+{} unlabeled for CPS), {} stages, features {:?}, {} parameters",
            c.spacing,
            c.median_shape_after_resampling,
            c.patch_size,
            p.batch_sizes(name).0,
            p.batch_sizes(name).1,
            c.network.n_stages(),
            c.network.features_per_stage,
            c.network.parameter_count
        );
        println!("    strides {:?}", c.network.strides);
        println!("    kernels {:?}", c.network.kernel_sizes);
    }
    for (i, n) in p.normalization.iter().enumerate() {
        println!(
            "channel {i}: {} normalisation from {}: clip [{:.1}, {:.1}], mean {:.2}, std {:.2}",
            n.scheme, n.statistics, n.clip_low, n.clip_high, n.mean, n.std
        );
    }
}
