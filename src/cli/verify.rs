//! `cps3d verify DIR`: checks every shard (and the manifest) of a preprocessed folder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use super::progress;
use cps3d::planning::plan::{Normalization, Plans};
use cps3d::preprocessing::{CaseMeta, Manifest, MANIFEST};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A shard folder (searched recursively for *.shard) or one shard file.
    dir: PathBuf,
}

/// Checks every brick, the class locations and the header of every shard, and, in a folder
/// with `manifest.json`, the shards against it and `plans.json`; lists the bad ones and exits
/// non-zero if there is any.
pub fn run(a: VerifyArgs) -> Result<()> {
    let paths = if a.dir.is_file() { vec![a.dir.clone()] } else { cps3d_storage::find_shards(&a.dir)? };
    if paths.is_empty() {
        bail!("{}: no *.shard files found", a.dir.display());
    }
    let pb = progress::bar(paths.len() as u64, "verify");
    let mut bad = Vec::new();
    let (mut raw, mut stored) = (0u64, 0u64);
    for p in &paths {
        match cps3d_storage::verify_shard(p) {
            Ok(s) => {
                raw += s.image_raw_bytes + s.label_raw_bytes;
                stored += s.file_len;
                pb.suspend(|| {
                    println!(
                        "ok   {}  {:?} (z,y,x)  {} classes  {:.1}x compressed",
                        p.display(),
                        s.shape,
                        s.classes,
                        s.compression_ratio()
                    )
                });
            }
            Err(e) => {
                pb.suspend(|| println!("BAD  {e}"));
                bad.push(p.clone());
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    println!(
        "{} shard(s) checked, {} bad; {:.1} MB of voxels in {:.1} MB ({:.1}x)",
        paths.len(),
        bad.len(),
        raw as f64 / 1e6,
        stored as f64 / 1e6,
        raw as f64 / stored.max(1) as f64
    );
    let manifest = a.dir.join(MANIFEST);
    let problems = if a.dir.is_dir() && manifest.exists() { check_manifest(&a.dir, &paths) } else { Vec::new() };
    for p in &problems {
        println!("BAD  {p}");
    }
    if !bad.is_empty() || !problems.is_empty() {
        let mut listed: Vec<String> = bad.iter().map(|p| p.display().to_string()).collect();
        listed.extend(problems.iter().cloned());
        bail!(
            "{} bad shard(s), {} disagreement(s) with manifest.json: {}",
            bad.len(),
            problems.len(),
            listed.join("; ")
        );
    }
    Ok(())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn same_spacing(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| close(x, y))
}

/// What the stored values depend on: the scheme and its clipping.
fn clipping(n: &[Normalization]) -> Vec<(String, f64, f64)> {
    n.iter().map(|n| (n.scheme.clone(), n.clip_low, n.clip_high)).collect()
}

/// Disagreements between the shards found, `manifest.json` and `plans.json` (two runs with
/// different plans into one folder leave them): every listed case has its shard, of the listed
/// shape, made for the manifest's spacing and clipping; the plan is the manifest's; shards that
/// are not listed are named. A printed line summarises the manifest.
fn check_manifest(dir: &Path, found: &[PathBuf]) -> Vec<String> {
    let manifest_path = dir.join(MANIFEST);
    let m = match Manifest::read(&manifest_path) {
        Ok(m) => m,
        Err(e) => return vec![e.to_string()],
    };
    let mut problems = Vec::new();
    let plans_path = dir.join("plans.json");
    match Plans::read(&plans_path) {
        Err(e) => problems.push(format!("{e} (preprocess copies the plan beside the shards)")),
        Ok(plans) => match plans.configuration(&m.configuration) {
            None => problems.push(format!(
                "{}: no configuration \"{}\", which manifest.json was made with",
                plans_path.display(),
                m.configuration
            )),
            Some(c) => {
                if !same_spacing(&c.spacing, &m.spacing) {
                    problems.push(format!(
                        "{}: configuration {} has spacing {:?} mm, manifest.json says {:?}",
                        plans_path.display(),
                        m.configuration,
                        c.spacing,
                        m.spacing
                    ));
                }
                if plans.num_classes != m.num_classes {
                    problems.push(format!(
                        "{}: {} classes, manifest.json says {}",
                        plans_path.display(),
                        plans.num_classes,
                        m.num_classes
                    ));
                }
                if clipping(&plans.normalization) != clipping(&m.normalization) {
                    problems.push(format!(
                        "{}: normalisation {:?} differs from manifest.json's {:?}",
                        plans_path.display(),
                        clipping(&plans.normalization),
                        clipping(&m.normalization)
                    ));
                }
            }
        },
    }
    let mut listed = BTreeSet::new();
    for case in &m.cases {
        let path = dir.join(&case.shard);
        listed.insert(path.clone());
        if !path.exists() {
            problems.push(format!("{}: missing: manifest.json lists case \"{}\"", path.display(), case.id));
            continue;
        }
        // A shard that does not open is already reported by the brick check.
        let Ok(shard) = cps3d_storage::Shard::open(&path) else { continue };
        let mut bad = |what: String| problems.push(format!("{}: {what}", path.display()));
        if shard.shape() != case.shape {
            bad(format!("shape {:?} (z,y,x), manifest.json says {:?}", shard.shape(), case.shape));
        }
        if shard.has_labels() != case.labeled {
            bad(format!("has labels: {}, manifest.json says labeled: {}", shard.has_labels(), case.labeled));
        }
        let meta = match serde_json::from_str::<CaseMeta>(shard.metadata()) {
            Ok(meta) => meta,
            Err(e) => {
                bad(format!("metadata is not this build's case record ({e}); run preprocess --overwrite"));
                continue;
            }
        };
        if meta.id != case.id {
            bad(format!("holds case \"{}\", manifest.json lists it as \"{}\"", meta.id, case.id));
        }
        // 2D configurations resample y, x only: z keeps the scan's spacing.
        let target = &meta.target_spacing[3 - m.spacing.len().min(3)..];
        if !same_spacing(target, &m.spacing) {
            bad(format!("made for target spacing {target:?} mm, manifest.json says {:?}", m.spacing));
        }
        if !same_spacing(&shard.spacing(), &meta.spacing) {
            bad(format!("header spacing {:?} mm differs from its metadata's {:?}", shard.spacing(), meta.spacing));
        }
        if clipping(&meta.normalization) != clipping(&m.normalization) {
            bad(format!(
                "made with normalisation {:?}, manifest.json says {:?}",
                clipping(&meta.normalization),
                clipping(&m.normalization)
            ));
        }
    }
    for p in found {
        if !listed.contains(p) {
            problems.push(format!("{}: not listed in manifest.json (left by another run?)", p.display()));
        }
    }
    println!(
        "{}: {} case(s), configuration {}, spacing {:?} mm: {}",
        manifest_path.display(),
        m.cases.len(),
        m.configuration,
        m.spacing,
        if problems.is_empty() {
            "the shards agree".to_string()
        } else {
            format!("{} disagreement(s)", problems.len())
        }
    );
    problems
}
