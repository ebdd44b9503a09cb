//! `cps3d predict`: sliding-window inference of a run's networks on NIfTI scans.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::progress;
use cps3d::dataset::Case;
use cps3d::inference::{check_options, predict_case, ForcedSpacing, Model, PredictOptions};

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// An image file, or a folder of images named {CASE}_{XXXX}.nii.gz (nnU-Net) or {CASE}.nii.gz.
    #[arg(short, long)]
    input: PathBuf,
    /// Output folder for {CASE}.nii.gz label maps.
    #[arg(short, long)]
    out: PathBuf,
    /// A run folder from `cps3d train` (or a folder from `cps3d export`); repeat to
    /// ensemble several runs or folds (`-m RUN1 -m RUN2`): every network's logits are averaged.
    #[arg(short, long, required = true)]
    model: Vec<PathBuf>,
    /// Which checkpoint: best, final or latest.
    #[arg(long, default_value = "best", value_parser = CHECKPOINTS)]
    checkpoint: String,
    /// Forced spacing: "paper" (0.75 mm in-plane, 0.5 mm z), "authors" (1, 1.5) or XY,Z in mm.
    #[arg(long, value_parser = forced, allow_hyphen_values = true)]
    forced_spacing: Option<ForcedSpacing>,
    /// Sliding-window step as a fraction of the tile, in (0, 1] (nnU-Net's rule).
    #[arg(long, default_value_t = 0.7, value_parser = step, allow_hyphen_values = true)]
    step: f64,
    /// Mirroring test-time augmentation (8 flips).
    #[arg(long)]
    tta: bool,
    /// Use only each run's first network instead of both siblings' mean logits.
    #[arg(long)]
    no_ensemble: bool,
    /// Also write nnU-Net's CASE.npz (softmax probabilities, [K, z, y, x] float32) and
    /// CASE.pkl, e.g. for `nnUNetv2_ensemble`.
    #[arg(long)]
    save_probabilities: bool,
    /// Keep every connected component (no largest-component post-processing).
    #[arg(long)]
    no_lcc: bool,
    /// Also draw each case's preview, OUT/preview/{CASE}.png: axial, coronal and sagittal
    /// slices through the organs with the prediction outlined over the CT.
    #[arg(long)]
    preview: bool,
    /// cpu or cuda:N (default: cuda:0 when available).
    #[arg(long)]
    device: Option<String>,
}

/// The checkpoint pointers a run folder has (`best.json`, ...).
pub(crate) const CHECKPOINTS: [&str; 3] = ["best", "final", "latest"];

fn forced(s: &str) -> Result<ForcedSpacing, String> {
    Ok(match s {
        "paper" => ForcedSpacing::PAPER,
        "authors" => ForcedSpacing::AUTHORS,
        _ => {
            let v = super::parse_list::<f64>(s, 2)
                .map_err(|e| format!("expected \"paper\", \"authors\" or XY,Z in mm: {e}"))?;
            if v.iter().any(|&x| !(x > 0.0 && x.is_finite())) {
                return Err(format!("XY,Z must each be positive and finite (mm), got \"{s}\""));
            }
            ForcedSpacing { xy: v[0], z: v[1] }
        }
    })
}

/// 0 or a tiny step never finishes, above 1 leaves gaps between tiles, NaN and inf
/// broke the tiling: nnU-Net asserts 0 < step <= 1 too.
fn step(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(format!("{s} is not in (0, 1] (a fraction of the tile)"));
    }
    Ok(v)
}

/// Creates the output folder and writes and removes a file in it, so that an
/// unwritable output fails before any case is computed.
pub(crate) fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
    let probe = dir.join(format!(".cps3d-write-test-{}", std::process::id()));
    let written = std::fs::write(&probe, b"probe");
    let _ = std::fs::remove_file(&probe);
    written.with_context(|| format!("{}: output folder not writable", dir.display()))
}

/// Cases of an input file or folder: channel files grouped by case id.
fn cases(input: &Path) -> Result<Vec<Case>> {
    let files: Vec<PathBuf> = if input.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| input.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                !n.starts_with('.') && (n.ends_with(".nii.gz") || n.ends_with(".nii"))
            })
            .collect();
        v.sort();
        v
    } else {
        vec![input.to_path_buf()]
    };
    let mut by_case: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        let stem = cps3d::io::nifti_stem(&f);
        let id = cps3d::dataset::split_channel(&stem).map_or(stem.clone(), |(id, _)| id.to_string());
        by_case.entry(id).or_default().push(f);
    }
    Ok(by_case.into_iter().map(|(id, images)| Case { id, images, label: None }).collect())
}

pub fn run(a: PredictArgs) -> Result<()> {
    check_writable(&a.out)?;
    let device = super::device_or_default(a.device.as_deref())?;
    let opts = PredictOptions {
        checkpoint: a.checkpoint.clone(),
        forced_spacing: a.forced_spacing,
        step: a.step,
        mirror: a.tta,
        ensemble: !a.no_ensemble,
        largest_component: !a.no_lcc,
        device,
        save_probabilities: a.save_probabilities,
        ..Default::default()
    };
    let names: Vec<String> = a.model.iter().map(|m| m.display().to_string()).collect();
    let model = Model::load_many(&a.model, &opts.checkpoint, device, opts.ensemble)
        .with_context(|| format!("loading {}", names.join(", ")))?;
    // Options that do not suit this model (a step below one voxel of its tile) fail
    // here, not once per case.
    check_options(&model, &opts)?;
    if a.save_probabilities {
        // nnUNetv2_ensemble reads these two from every folder it combines, as nnU-Net's
        // predictor leaves them beside its outputs.
        use cps3d::interop::nnunet::{nnunet_dataset_json, nnunet_plans};
        cps3d::util::write_json_atomic(&a.out.join("dataset.json"), &nnunet_dataset_json(&model.plans))?;
        cps3d::util::write_json_atomic(&a.out.join("plans.json"), &nnunet_plans(&model.plans)?)?;
    }
    let cases = cases(&a.input)?;
    if cases.is_empty() {
        bail!("{}: no .nii or .nii.gz images", a.input.display());
    }
    let pb = progress::bar(cases.len() as u64, "predict");
    let mut failed = Vec::new();
    for case in &cases {
        let out = a.out.join(format!("{}.nii.gz", case.id));
        match predict_case(&model, case, &out, &opts) {
            Ok(r) => {
                let rss = cps3d_actors::telemetry::peak_rss_bytes().unwrap_or(0) as f64 / 1e6;
                println!(
                    "{}: {:.2} s, grid {:?}, peak RSS so far {:.0} MB -> {}",
                    case.id,
                    r.seconds,
                    r.network_shape,
                    rss,
                    out.display()
                );
                if a.preview {
                    let png = a.out.join("preview").join(format!("{}.png", case.id));
                    match cps3d::preview::render_files(&case.images[0], &out, None, &case.id, &png) {
                        Ok(_) => println!("  preview -> {}", png.display()),
                        Err(e) => {
                            eprintln!("failed: {}: preview: {e}", case.id);
                            failed.push(case.id.clone());
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("failed: {}: {e}", case.id);
                failed.push(case.id.clone());
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    if !failed.is_empty() {
        bail!("{} of {} case(s) failed: {}", failed.len(), cases.len(), failed.join(", "));
    }
    Ok(())
}
