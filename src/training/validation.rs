//! nnU-Net's "actual validation" at the end of training: every held-out case predicted
//! whole from its raw files (sliding window, step 0.5, mirroring, no post-processing,
//! as `perform_actual_validation`) and scored with the FLARE22 rules, for each sibling
//! and for their ensemble.
//!
//! ```text
//! RUN_DIR/validation/{net0,net1,ensemble}/{CASE}.nii.gz, flare22_scores.csv, flare22_scores.summary.json
//! RUN_DIR/validation/summary.json
//! ```

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::options::TrainOptions;
use crate::dataset::Case;
use crate::error::{Error, Result};
use crate::evaluation::{score_pairs, write_scores};
use crate::inference::{checkpoint_dir, predict_case, Model, PredictOptions};
use crate::preprocessing::{CaseMeta, Manifest};

/// One network variant's mean scores over the validation cases.
#[derive(Debug, Clone, Serialize)]
pub struct VariantScores {
    pub name: String,
    pub cases: usize,
    pub mean_dsc: f64,
    pub mean_nsd: f64,
    pub scores: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidationSummary {
    pub fold: String,
    pub checkpoint: String,
    pub cases: Vec<String>,
    pub variants: Vec<VariantScores>,
}

/// The raw image and label files of a held-out case, from its shard's metadata.
fn raw_case(shards: &Path, manifest: &Manifest, id: &str) -> Result<(Case, PathBuf)> {
    let entry =
        manifest.cases.iter().find(|c| c.id == id).ok_or_else(|| {
            Error::invalid(shards.join(crate::preprocessing::MANIFEST), format!("lists no case {id}"))
        })?;
    let path = shards.join(&entry.shard);
    let shard = cps3d_storage::Shard::open(&path).map_err(|e| Error::invalid(&path, e.to_string()))?;
    let meta: CaseMeta = serde_json::from_str(shard.metadata()).map_err(|e| Error::json(&path, e))?;
    let label = meta.label.ok_or_else(|| Error::invalid(&path, "is not a labeled case"))?;
    for f in meta.images.iter().chain(std::iter::once(&label)) {
        if !f.exists() {
            return Err(Error::invalid(
                f,
                format!("raw file of validation case {id} is gone (the validation predicts it from the raw scan)"),
            ));
        }
    }
    Ok((Case { id: id.to_string(), images: meta.images, label: None }, label))
}

/// Predicts and scores the validation cases of a finished run with its final checkpoint.
pub fn run_final_validation(opts: &TrainOptions, manifest: &Manifest, val_ids: &[String]) -> Result<ValidationSummary> {
    let run = &opts.run_dir;
    let out = run.join("validation");
    let device = super::options::parse_device(&opts.devices[0])?;
    let cases: Vec<(Case, PathBuf)> =
        val_ids.iter().map(|id| raw_case(&opts.shards, manifest, id)).collect::<Result<_>>()?;
    let dir = checkpoint_dir(run, "final")?;
    let siblings = (0..2).filter(|i| dir.join(format!("net{i}.safetensors")).exists()).count();
    let predict_opts = PredictOptions {
        checkpoint: "final".into(),
        step: 0.5,
        mirror: opts.val_mirror,
        largest_component: false,
        device,
        ..Default::default()
    };
    let mut variants = Vec::new();
    let names: Vec<&str> = if siblings == 2 { vec!["net0", "net1", "ensemble"] } else { vec!["net0"] };
    for name in names {
        let model = match name {
            "ensemble" => Model::load(run, "final", device, true)?,
            _ => Model::load_single(&dir, name, device)?,
        };
        let folder = out.join(name);
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        let mut jobs = Vec::new();
        for (case, label) in &cases {
            let pred = folder.join(format!("{}.nii.gz", case.id));
            let report = predict_case(&model, case, &pred, &predict_opts)?;
            tracing::info!("validation {name}: {} in {:.1} s", case.id, report.seconds);
            jobs.push((case.id.clone(), label.clone(), pred));
        }
        let (scores, problems) = score_pairs(&jobs, 2, || {});
        if let Some(p) = problems.first() {
            return Err(Error::invalid(&folder, format!("scoring failed: {p}")));
        }
        let csv = folder.join("flare22_scores.csv");
        let summary = write_scores(&scores, &csv)?;
        variants.push(VariantScores {
            name: name.to_string(),
            cases: summary.cases,
            mean_dsc: summary.mean_dsc,
            mean_nsd: summary.mean_nsd,
            scores: csv,
        });
    }
    let summary =
        ValidationSummary { fold: opts.fold.clone(), checkpoint: "final".into(), cases: val_ids.to_vec(), variants };
    crate::util::write_json_atomic(&out.join("summary.json"), &summary)?;
    Ok(summary)
}
