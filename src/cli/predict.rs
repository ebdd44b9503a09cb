use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::progress;
use cps3d::dataset::Case;
use cps3d::inference::{predict_case, ForcedSpacing, Model, PredictOptions};

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
    #[arg(long, default_value = "best")]
    checkpoint: String,
    /// Forced spacing: "paper" (0.75 mm in-plane, 0.5 mm z), "authors" (1, 1.5) or XY,Z in mm.
    #[arg(long)]
    forced_spacing: Option<String>,
    /// Sliding-window step as a fraction of the tile.
    #[arg(long, default_value_t = 0.7)]
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
    /// cpu or cuda:N (default: cuda:0 when available).
    #[arg(long)]
    device: Option<String>,
}

fn forced(s: &str) -> Result<ForcedSpacing> {
    Ok(match s {
        "paper" => ForcedSpacing::PAPER,
        "authors" => ForcedSpacing::AUTHORS,
        _ => {
            let v = super::parse_list::<f64>(s, 2).map_err(anyhow::Error::msg)?;
            ForcedSpacing { xy: v[0], z: v[1] }
        }
    })
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
        let name = f.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let stem = name.trim_end_matches(".gz").trim_end_matches(".nii").to_string();
        let id = match stem.rsplit_once('_') {
            Some((id, ch)) if ch.len() == 4 && ch.bytes().all(|b| b.is_ascii_digit()) => id.to_string(),
            _ => stem,
        };
        by_case.entry(id).or_default().push(f);
    }
    Ok(by_case.into_iter().map(|(id, images)| Case { id, images, label: None }).collect())
}

pub fn run(a: PredictArgs) -> Result<()> {
    let device = super::device_or_default(a.device.as_deref())?;
    let opts = PredictOptions {
        checkpoint: a.checkpoint.clone(),
        forced_spacing: a.forced_spacing.as_deref().map(forced).transpose()?,
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
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
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
