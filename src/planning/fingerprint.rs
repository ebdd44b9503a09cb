//! `cps3d fingerprint`: what the planner needs to know about a dataset.
//!
//! Per case: spacing, shape, and shape after cropping to the nonzero box. Per
//! channel: intensity statistics over all voxels of labeled and unlabeled scans (the
//! 3D-CPS way) and over labeled foreground only (the nnU-Net way). One scan in memory
//! per worker; statistics are merged accumulators of fixed size.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::intensity::{AccumulatorState, IntensityAccumulator, IntensityStats};
use crate::dataset::{Case, DatasetJson, RawDataset};
use crate::error::{Error, Result};
use crate::util::Part;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseFingerprint {
    pub id: String,
    pub labeled: bool,
    /// Canonical (z, y, x), mm.
    pub spacing: [f64; 3],
    /// Canonical (z, y, x), voxels.
    pub shape: [usize; 3],
    /// Half-open [start, end) per canonical axis of the nonzero box.
    pub nonzero_box: [[usize; 2]; 3],
    pub shape_after_crop: [usize; 3],
    pub axis_codes: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelIntensity {
    pub name: String,
    /// Every voxel of every scan, labeled and unlabeled (3D-CPS).
    pub all_voxels: IntensityStats,
    /// Voxels with a label > 0 in labeled scans (nnU-Net).
    pub foreground: IntensityStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fingerprint {
    pub dataset_root: PathBuf,
    pub dataset_name: Option<String>,
    pub channels: std::collections::BTreeMap<usize, String>,
    pub labels: std::collections::BTreeMap<u8, String>,
    pub file_ending: String,
    pub num_labeled: usize,
    pub num_unlabeled: usize,
    pub cases: Vec<CaseFingerprint>,
    pub intensity: Vec<ChannelIntensity>,
    /// Median over labeled cases, as nnU-Net plans from its training set.
    pub median_spacing: [f64; 3],
    pub median_shape_after_crop: [f64; 3],
    /// Median of (cropped voxels / original voxels).
    pub median_relative_size_after_crop: f64,
    /// Cases that could not be read, with the reason.
    pub failed_cases: Vec<FailedCase>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedCase {
    pub id: String,
    pub error: String,
}

impl Fingerprint {
    pub fn labeled_cases(&self) -> impl Iterator<Item = &CaseFingerprint> {
        self.cases.iter().filter(|c| c.labeled)
    }

    pub fn read(path: &Path) -> Result<Fingerprint> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(path, e))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        crate::util::write_json_atomic(path, self)
    }
}

/// The bounding box of voxels that are nonzero in any channel (nnU-Net crops there).
pub fn nonzero_box(channels: &[ndarray::Array3<f32>]) -> [[usize; 2]; 3] {
    let shape = channels[0].shape();
    let (nz, ny, nx) = (shape[0], shape[1], shape[2]);
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    for z in 0..nz {
        for y in 0..ny {
            let mut row_lo = usize::MAX;
            let mut row_hi = 0;
            for ch in channels {
                let row = ch.slice(ndarray::s![z, y, ..]);
                let row = row.as_slice().expect("standard layout");
                if let Some(first) = row.iter().position(|&v| v != 0.0) {
                    let last = row.iter().rposition(|&v| v != 0.0).unwrap_or(first);
                    row_lo = row_lo.min(first);
                    row_hi = row_hi.max(last + 1);
                }
            }
            if row_lo != usize::MAX {
                lo = [lo[0].min(z), lo[1].min(y), lo[2].min(row_lo)];
                hi = [hi[0].max(z + 1), hi[1].max(y + 1), hi[2].max(row_hi)];
            }
        }
    }
    if lo[0] == usize::MAX {
        // All zero: keep everything rather than an empty volume.
        return [[0, nz], [0, ny], [0, nx]];
    }
    [[lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]]]
}

struct CaseResult {
    fp: CaseFingerprint,
    all: Vec<IntensityAccumulator>,
    foreground: Vec<IntensityAccumulator>,
}

fn fingerprint_case(case: &Case, n_channels: usize) -> Result<CaseResult> {
    let crate::dataset::LoadedCase { channels, geometry, labels } = case.load()?;
    let bbox = nonzero_box(&channels);
    let mut all = Vec::with_capacity(n_channels);
    let mut foreground = Vec::with_capacity(n_channels);
    for ch in &channels {
        let mut a = IntensityAccumulator::default();
        let data = ch.as_slice().expect("standard layout");
        for chunk in data.chunks(1 << 16) {
            a.add_slice(chunk);
        }
        let mut f = IntensityAccumulator::default();
        if let Some(l) = &labels {
            let fg: Vec<f32> = data.iter().zip(l.iter()).filter(|(_, &lab)| lab > 0).map(|(&v, _)| v).collect();
            f.add_slice(&fg);
        }
        all.push(a);
        foreground.push(f);
    }
    let shape = geometry.shape();
    Ok(CaseResult {
        fp: CaseFingerprint {
            id: case.id.clone(),
            labeled: case.is_labeled(),
            spacing: geometry.spacing(),
            shape,
            nonzero_box: bbox,
            shape_after_crop: [bbox[0][1] - bbox[0][0], bbox[1][1] - bbox[1][0], bbox[2][1] - bbox[2][0]],
            axis_codes: geometry.axis_codes(),
        },
        all,
        foreground,
    })
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Fingerprints a raw dataset with `workers` threads. Cases that fail are listed in
/// `failed_cases` (file and reason) and left out of the statistics.
pub fn fingerprint_dataset(root: &Path, workers: usize, on_case: impl FnMut(&str)) -> Result<Fingerprint> {
    let ds = open_dataset(root)?;
    let items: Vec<Case> = ds.cases().cloned().collect();
    let scan = scan_cases(items, ds.json.channels.len(), workers, on_case);
    finish(root, &ds.json, scan)
}

fn open_dataset(root: &Path) -> Result<RawDataset> {
    let ds = RawDataset::open(root)?;
    if let Some(e) = ds.layout_problems.first() {
        return Err(Error::invalid(
            root,
            format!("{} layout problem(s), first: {e} (run `cps3d dataset check`)", ds.layout_problems.len()),
        ));
    }
    Ok(ds)
}

/// What scanning some of the cases gives: their fingerprints, failures and the
/// per-channel accumulators.
struct Scan {
    cases: Vec<CaseFingerprint>,
    failed: Vec<FailedCase>,
    all: Vec<IntensityAccumulator>,
    fg: Vec<IntensityAccumulator>,
}

fn scan_cases(items: Vec<Case>, n_channels: usize, workers: usize, mut on_case: impl FnMut(&str)) -> Scan {
    let mut scan = Scan {
        cases: Vec::new(),
        failed: Vec::new(),
        all: vec![IntensityAccumulator::default(); n_channels],
        fg: vec![IntensityAccumulator::default(); n_channels],
    };
    cps3d_actors::pool::for_each_bounded(
        items,
        workers,
        |case: Case| (case.id.clone(), crate::dataset::catch_case_panic(&case, || fingerprint_case(&case, n_channels))),
        |r| match r {
            Ok((id, Ok(res))) => {
                for c in 0..n_channels {
                    scan.all[c].merge(&res.all[c]);
                    scan.fg[c].merge(&res.foreground[c]);
                }
                on_case(&id);
                scan.cases.push(res.fp);
            }
            Ok((id, Err(e))) => {
                on_case(&id);
                scan.failed.push(FailedCase { id, error: e.to_string() });
            }
            Err(p) => scan.failed.push(FailedCase { id: "?".into(), error: format!("worker panicked: {p}") }),
        },
    );
    scan
}

/// The fingerprint of everything scanned: sorted, medians over the labeled cases.
fn finish(root: &Path, json: &DatasetJson, scan: Scan) -> Result<Fingerprint> {
    let Scan { mut cases, failed: mut failed_cases, all, fg } = scan;
    cases.sort_by(|a, b| (!a.labeled, &a.id).cmp(&(!b.labeled, &b.id)));
    failed_cases.sort_by(|a, b| a.id.cmp(&b.id));
    let labeled: Vec<&CaseFingerprint> = cases.iter().filter(|c| c.labeled).collect();
    if labeled.is_empty() {
        return Err(Error::invalid(root, "no labeled case could be fingerprinted"));
    }
    let axis_median =
        |f: &dyn Fn(&CaseFingerprint) -> f64| median(&mut labeled.iter().map(|c| f(c)).collect::<Vec<_>>());
    let median_spacing = [0, 1, 2].map(|a| axis_median(&|c| c.spacing[a]));
    let median_shape_after_crop = [0, 1, 2].map(|a| axis_median(&|c| c.shape_after_crop[a] as f64));
    let median_relative_size_after_crop = axis_median(&|c| {
        c.shape_after_crop.iter().product::<usize>() as f64 / c.shape.iter().product::<usize>() as f64
    });
    let intensity = json
        .channels
        .iter()
        .map(|(&i, name)| ChannelIntensity {
            name: name.clone(),
            all_voxels: all[i].stats(),
            foreground: fg[i].stats(),
        })
        .collect();
    Ok(Fingerprint {
        dataset_root: root.to_path_buf(),
        dataset_name: json.name.clone(),
        channels: json.channels.clone(),
        labels: json.labels.clone(),
        file_ending: json.file_ending.clone(),
        num_labeled: labeled.len(),
        num_unlabeled: cases.len() - labeled.len(),
        cases,
        intensity,
        median_spacing,
        median_shape_after_crop,
        median_relative_size_after_crop,
        failed_cases,
    })
}

/// What `fingerprint --part` writes: the share's case fingerprints and failures and the
/// accumulators, which merge exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FingerprintPart {
    pub dataset_root: PathBuf,
    pub part: usize,
    pub parts: usize,
    /// The cases this part was given (its share of the dataset as listed then).
    pub share: Vec<String>,
    pub cases: Vec<CaseFingerprint>,
    pub failed_cases: Vec<FailedCase>,
    pub all_voxels: Vec<AccumulatorState>,
    pub foreground: Vec<AccumulatorState>,
}

/// Fingerprints part `part` of the dataset and writes it to `part.file(out)`.
pub fn fingerprint_part(
    root: &Path,
    part: Part,
    out: &Path,
    workers: usize,
    on_case: impl FnMut(&str),
) -> Result<FingerprintPart> {
    let ds = open_dataset(root)?;
    let items = ds.share(part);
    let share: Vec<String> = items.iter().map(|c| c.id.clone()).collect();
    let scan = scan_cases(items, ds.json.channels.len(), workers, on_case);
    let mut result = FingerprintPart {
        dataset_root: root.to_path_buf(),
        part: part.index,
        parts: part.count,
        share,
        cases: scan.cases,
        failed_cases: scan.failed,
        all_voxels: scan.all.iter().map(AccumulatorState::from).collect(),
        foreground: scan.fg.iter().map(AccumulatorState::from).collect(),
    };
    result.cases.sort_by(|a, b| a.id.cmp(&b.id));
    crate::util::write_json_atomic(&part.file(out), &result)?;
    Ok(result)
}

/// Merges the `count` parts written beside `out` into the fingerprint one process would
/// have made, refusing a missing part, or one made for another dataset or case list.
pub fn merge_parts(root: &Path, out: &Path) -> Result<Fingerprint> {
    let ds = open_dataset(root)?;
    let count = crate::util::part_count(out)?;
    let n_channels = ds.json.channels.len();
    let mut scan = Scan {
        cases: Vec::new(),
        failed: Vec::new(),
        all: vec![IntensityAccumulator::default(); n_channels],
        fg: vec![IntensityAccumulator::default(); n_channels],
    };
    for index in 0..count {
        let part = Part { index, count };
        let (file, p): (_, FingerprintPart) = crate::util::read_part(out, part)?;
        let expected: Vec<String> = ds.share(part).iter().map(|c| c.id.clone()).collect();
        let stale = |why: String| Error::invalid(&file, format!("stale: {why}; run part {index}/{count} again"));
        if p.part != index || p.parts != count || p.dataset_root != root {
            return Err(stale(format!("made as part {}/{} of {}", p.part, p.parts, p.dataset_root.display())));
        }
        if p.share != expected {
            return Err(stale(format!(
                "made for another case list ({} cases, now {}): the dataset changed since",
                p.share.len(),
                expected.len()
            )));
        }
        if p.all_voxels.len() != n_channels || p.foreground.len() != n_channels {
            return Err(stale(format!("{} channel(s), the dataset has {n_channels}", p.all_voxels.len())));
        }
        for c in 0..n_channels {
            let read = |s: &AccumulatorState| IntensityAccumulator::try_from(s).map_err(|e| Error::invalid(&file, e));
            scan.all[c].merge(&read(&p.all_voxels[c])?);
            scan.fg[c].merge(&read(&p.foreground[c])?);
        }
        scan.cases.extend(p.cases);
        scan.failed.extend(p.failed_cases);
    }
    finish(root, &ds.json, scan)
}
