//! Preprocessing, as nnU-Net's `preprocessing/`: per case, reorient (reading does),
//! crop to the nonzero box, clip CT to the plan's percentiles, resample to the plan's
//! spacing (cubic B-spline images, one-hot linear labels), and write one shard holding
//! the image (int16), the labels and per-class foreground locations.
//!
//! nnU-Net normalises (clip, then z-score) *before* resampling; z-scoring is linear, so
//! clipping in HU, resampling and z-scoring in the loader computes the same values, and
//! CT shards keep whole HU (rounding costs ≤ 0.5 HU). Runs are resumable: a finished
//! shard (written atomically) is skipped on a rerun.

pub mod resample;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{s, Array3};

use serde::{Deserialize, Serialize};

use crate::dataset::{Case, RawDataset};
use crate::error::{Error, Result};
use crate::io::{geometry, geometry::Affine};
use crate::planning::fingerprint::nonzero_box;
use crate::planning::plan::{Normalization, Plans};
use resample::{compute_new_shape, resample_image, resample_labels, separate_axis};

pub const MANIFEST: &str = "manifest.json";

/// The shard layout this build writes and reads. 2: canonical RAS order, CT clipped
/// before B-spline resampling. Older shards must be made again (`preprocess --overwrite`).
pub const SHARD_VERSION: u32 = 2;

/// What a shard's metadata records about its case (JSON in the shard).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaseMeta {
    /// [`SHARD_VERSION`]; absent (older shards) fails to parse, so they are redone.
    pub version: u32,
    pub id: String,
    pub labeled: bool,
    pub images: Vec<PathBuf>,
    pub label: Option<PathBuf>,
    /// Canonical (z, y, x) shape and spacing of the raw scan.
    pub original_shape: [usize; 3],
    pub original_spacing: [f64; 3],
    pub original_axis_codes: String,
    /// Half-open [start, end) per canonical axis of the nonzero crop.
    pub crop_box: [[usize; 2]; 3],
    pub shape: [usize; 3],
    /// The plan's target spacing, and the spacing the rounded shape really gives.
    pub target_spacing: [f64; 3],
    pub spacing: [f64; 3],
    /// Shard voxel (z, y, x) to world RAS+ mm.
    pub affine: Affine,
    /// Whether one axis was resampled separately (nearest), and which.
    pub separate_axis: Option<usize>,
    pub normalization: Vec<Normalization>,
}

/// One case of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestCase {
    pub id: String,
    pub labeled: bool,
    pub shard: String,
    pub shape: [usize; 3],
}

/// `manifest.json` in the shard folder: which shards make the training set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`SHARD_VERSION`] of the shards listed (1 when absent: made before the field).
    #[serde(default = "first_version")]
    pub version: u32,
    pub configuration: String,
    /// The configuration's target spacing ((z, y, x), or (y, x) for 2D).
    pub spacing: Vec<f64>,
    pub num_classes: usize,
    pub normalization: Vec<Normalization>,
    pub cases: Vec<ManifestCase>,
    pub failed: Vec<FailedCase>,
}

fn first_version() -> u32 {
    1
}

impl Manifest {
    /// Reads a manifest; shards of an older layout are refused with what to do.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
        if m.version != SHARD_VERSION {
            return Err(Error::invalid(
                path,
                format!(
                    "shards of layout version {} (this build reads {SHARD_VERSION}: canonical RAS order, CT clipped \
                     before B-spline resampling); run `cps3d preprocess ... --overwrite` again",
                    m.version
                ),
            ));
        }
        // Shards are named inside the folder: a path (`../x`, `/x`, `a/b`) would be
        // followed out of it, to whatever file lies there.
        for c in &m.cases {
            let mut parts = Path::new(&c.shard).components();
            let plain = matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None));
            if !plain {
                return Err(Error::invalid(
                    path,
                    format!(
                        "case {}: shard \"{}\" is not a file name in the shard folder (the manifest names its \
                         shards, it does not point elsewhere)",
                        c.id, c.shard
                    ),
                ));
            }
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailedCase {
    pub id: String,
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    pub configuration: String,
    pub workers: usize,
    /// `None`: the configuration's default ([`default_brick_shape`]).
    pub brick_shape: Option<[usize; 3]>,
    pub zstd_level: i32,
    /// Redo cases whose shard exists.
    pub overwrite: bool,
    /// Only this share of the cases; their list goes to a part manifest for
    /// [`merge_parts`] instead of `manifest.json`.
    pub part: Option<crate::util::Part>,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        PreprocessOptions {
            configuration: "3d_fullres".into(),
            workers: 1,
            brick_shape: None,
            zstd_level: cps3d_storage::DEFAULT_ZSTD_LEVEL,
            overwrite: false,
            part: None,
        }
    }
}

/// Bricks of 2D shards are single slices: a 2D sample reads one slice, and a 32³ brick
/// would decompress 32 slices for it (`cps3d bench`, 512×512 slices, batches of 12 + 12:
/// 416 vs 166 patches/s with augmentation, 1718 vs 165 without, for 7% larger shards).
pub const SLICE_BRICK_SHAPE: [usize; 3] = [1, 128, 128];

/// The brick shape a configuration's shards get unless told otherwise.
pub fn default_brick_shape(configuration: &str) -> [usize; 3] {
    if configuration == "2d" {
        SLICE_BRICK_SHAPE
    } else {
        cps3d_storage::DEFAULT_BRICK_SHAPE
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PreprocessSummary {
    pub written: usize,
    pub skipped_existing: usize,
    pub failed: Vec<FailedCase>,
    pub seconds: f64,
    /// Bytes of raw input voxels read (as float32 in memory) and of shards written.
    pub input_voxels: u64,
    pub shard_bytes: u64,
}

/// (written now, shard shape, input bytes read, shard bytes written) of one case.
type CaseOutcome = (bool, [usize; 3], u64, u64);

/// A case after crop and resampling, before it is written.
pub struct Preprocessed {
    pub meta: CaseMeta,
    /// `[channel][z][y][x]`.
    pub image: Vec<Array3<f32>>,
    pub labels: Option<Array3<u8>>,
}

/// A configuration's resampling settings, refused unless they are the implemented ones.
pub fn resampling_of<'a>(plans: &'a Plans, configuration: &str) -> Result<&'a crate::planning::plan::Resampling> {
    let c = plans
        .configuration(configuration)
        .ok_or_else(|| Error::invalid("plans", format!("no configuration \"{configuration}\"")))?;
    c.resampling.check().map_err(|e| Error::invalid("plans.json", format!("configuration {configuration}: {e}")))?;
    Ok(&c.resampling)
}

/// The target spacing of a configuration as (z, y, x); NaN along z for a 2D
/// configuration, whose slices keep their own spacing (see [`case_target_spacing`]).
pub fn target_spacing(plans: &Plans, configuration: &str) -> Result<[f64; 3]> {
    let c = plans.configuration(configuration).ok_or_else(|| {
        Error::invalid(
            "plans",
            format!("no configuration \"{configuration}\" (have: {:?})", plans.configurations.keys()),
        )
    })?;
    match c.spacing.as_slice() {
        [z, y, x] => Ok([*z, *y, *x]),
        // 2D: slices keep their own z spacing; only y, x are resampled.
        [y, x] => Ok([f64::NAN, *y, *x]),
        other => Err(Error::invalid("plans", format!("spacing {other:?} is neither 2D nor 3D"))),
    }
}

/// The spacing one case is resampled to: a 2D configuration keeps the case's own z
/// spacing (nnU-Net: `[spacing[0]] + configuration.spacing`).
pub fn case_target_spacing(target: [f64; 3], spacing: [f64; 3]) -> [f64; 3] {
    [if target[0].is_nan() { spacing[0] } else { target[0] }, target[1], target[2]]
}

/// Reads, crops and resamples one case.
pub fn preprocess_case(case: &Case, plans: &Plans, configuration: &str) -> Result<Preprocessed> {
    let target = target_spacing(plans, configuration)?;
    // Non-finite voxels are refused by the reader.
    let crate::dataset::LoadedCase { channels, geometry, labels } = case.load()?;
    if let (Some(l), Some(p)) = (&labels, &case.label) {
        let max_label = plans.num_classes.saturating_sub(1) as u8;
        if let Some(&v) = l.iter().find(|&&v| v > max_label) {
            return Err(Error::invalid(p, format!("label value {v} is above the plan's largest class {max_label}")));
        }
    }
    let bbox = nonzero_box(&channels);
    let cropped_shape = [bbox[0][1] - bbox[0][0], bbox[1][1] - bbox[1][0], bbox[2][1] - bbox[2][0]];
    let spacing = geometry.spacing();
    let target = case_target_spacing(target, spacing);
    // In floating point first: a spacing far from the plan's must be refused with its
    // numbers, not overflow a shape or abort allocating.
    let grid: Vec<f64> = (0..3).map(|a| (spacing[a] / target[a] * cropped_shape[a] as f64).round().max(1.0)).collect();
    let raw: f64 = geometry.shape().iter().map(|&n| n as f64).product();
    let need = crate::planning::footprint::preprocess_case_bytes(channels.len(), raw, grid.iter().product());
    crate::memory::check_memory(
        need,
        &format!(
            "preprocessing {} ({:?} voxels at {:.3?} mm, {:.0?} voxels at the plan's {:.3?} mm)",
            case.id, cropped_shape, spacing, grid, target
        ),
        "plan a coarser --target-spacing",
    )
    .map_err(|e| Error::invalid(&case.images[0], e))?;
    let new_shape = compute_new_shape(cropped_shape, spacing, target);
    let sep = separate_axis(spacing, target, resampling_of(plans, configuration)?.anisotropy_threshold);
    let image = crop_clip_resample(channels, bbox, &plans.normalization, new_shape, sep);
    let labels = labels.map(|l| {
        let full = cropped_shape == geometry.shape();
        resample_labels(&if full { l } else { l.slice(crop_slice(bbox)).to_owned() }, new_shape, sep)
    });

    // Shard voxel o maps to raw canonical voxel crop_start + (o + 0.5)·n_in/n_out − 0.5.
    let mut to_raw = geometry::identity();
    for a in 0..3 {
        let f = cropped_shape[a] as f64 / new_shape[a] as f64;
        to_raw[a][a] = f;
        to_raw[a][3] = bbox[a][0] as f64 + 0.5 * f - 0.5;
    }
    let affine = geometry::matmul(&geometry.affine(), &to_raw);
    let meta = CaseMeta {
        version: SHARD_VERSION,
        id: case.id.clone(),
        labeled: case.is_labeled(),
        images: case.images.clone(),
        label: case.label.clone(),
        original_shape: geometry.shape(),
        original_spacing: spacing,
        original_axis_codes: geometry.axis_codes(),
        crop_box: bbox,
        shape: new_shape,
        target_spacing: target,
        spacing: geometry::column_norms(&affine),
        affine,
        separate_axis: sep,
        normalization: plans.normalization.clone(),
    };
    Ok(Preprocessed { meta, image, labels })
}

/// The slice of a crop box.
pub fn crop_slice(
    bbox: [[usize; 2]; 3],
) -> ndarray::SliceInfo<[ndarray::SliceInfoElem; 3], ndarray::Ix3, ndarray::Ix3> {
    s![bbox[0][0]..bbox[0][1], bbox[1][0]..bbox[1][1], bbox[2][0]..bbox[2][1]]
}

/// Per channel: the crop, CT clipped to the plan's percentiles, resampled to
/// `new_shape` (nnU-Net's order; the z-score comes later). Preprocessing and inference
/// share it, so a scan reaches the network the same way in both.
pub fn crop_clip_resample(
    channels: Vec<Array3<f32>>,
    bbox: [[usize; 2]; 3],
    norms: &[Normalization],
    new_shape: [usize; 3],
    sep: Option<usize>,
) -> Vec<Array3<f32>> {
    channels
        .into_iter()
        .enumerate()
        .map(|(c, ch)| {
            let full = (0..3).all(|a| bbox[a][0] == 0 && bbox[a][1] == ch.shape()[a]);
            // Without a crop the volume moves on as it is: no copy.
            let mut x = if full { ch } else { ch.slice(crop_slice(bbox)).to_owned() };
            let n = &norms[c.min(norms.len() - 1)];
            x.mapv_inplace(|v| n.clip(v));
            resample_image(x, new_shape, sep)
        })
        .collect()
}

/// CT is stored in whole HU (rounding costs at most 0.5 HU, far below CT noise);
/// other modalities through a linear map of their range onto int16.
fn to_i16(image: &[Array3<f32>], ct: bool) -> (Vec<i16>, f32, f32) {
    let values = || image.iter().flat_map(|c| c.iter().copied());
    // Round half away from zero with a truncating cast (no libm call per voxel).
    let round = |v: f32| (v.clamp(-32768.0, 32767.0) + 0.5f32.copysign(v)) as i32 as i16;
    if ct {
        return (values().map(round).collect(), 1.0, 0.0);
    }
    let (lo, hi) = values().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let scale = ((hi - lo) / 65535.0).max(f32::MIN_POSITIVE);
    let offset = lo + 32768.0 * scale;
    (values().map(|v| round((v - offset) / scale)).collect(), scale, offset)
}

fn shard_path(out: &Path, id: &str) -> PathBuf {
    out.join(format!("{id}.{}", cps3d_storage::SHARD_EXTENSION))
}

/// The shape of a shard that opens, has this build's layout and was made for this
/// plan's target spacing and clipping (the shard holds clipped values): such a case is
/// done.
fn done_shape(path: &Path, target: [f64; 3], norms: &[Normalization]) -> Option<[usize; 3]> {
    let shard = cps3d_storage::Shard::open(path).ok()?;
    let meta = serde_json::from_str::<CaseMeta>(shard.metadata()).ok()?;
    let same_spacing = (0..3).all(|a| target[a].is_nan() || (meta.target_spacing[a] - target[a]).abs() < 1e-9);
    let clip = |n: &Normalization| (n.scheme.clone(), n.clip_low.to_bits(), n.clip_high.to_bits());
    let same_clip = meta.normalization.iter().map(clip).eq(norms.iter().map(clip));
    (meta.version == SHARD_VERSION && same_spacing && same_clip).then(|| shard.shape())
}

fn write_case(p: &Preprocessed, path: &Path, opts: &PreprocessOptions) -> Result<u64> {
    let ct = p.meta.normalization.iter().all(|n| n.scheme == "CT");
    let (raw, scale, offset) = to_i16(&p.image, ct);
    let labels = p.labels.as_ref().map(|l| l.as_standard_layout().into_owned());
    let labels_flat = labels.as_ref().map(|l| l.as_slice().expect("standard layout"));
    let meta = serde_json::to_string(&p.meta).map_err(|e| Error::json(path, e))?;
    let mut input = cps3d_storage::ShardInput::new(p.meta.shape, p.meta.spacing, &raw)
        .with_channels(p.image.len())
        .with_intensity_map(scale, offset)
        .with_metadata(&meta);
    if let Some(l) = labels_flat {
        input = input.with_labels(l);
    }
    let writer = cps3d_storage::ShardWriter::default()
        .with_brick_shape(opts.brick_shape.unwrap_or_else(|| default_brick_shape(&opts.configuration)))
        .with_zstd_level(opts.zstd_level);
    let summary = writer.write(path, &input).map_err(|e| Error::invalid(path, e.to_string()))?;
    Ok(summary.file_len)
}

/// Removes temporary shard files (`.{name}.{pid}.{n}.tmp`) left by a killed run: only
/// those whose process is gone, so a run writing into the same folder is not disturbed.
fn remove_stale_temporaries(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let pid = name.rsplit('.').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if pid.is_some() && !alive {
            tracing::info!("removing {} left by an interrupted run", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Preprocesses every case of a raw dataset into `out`. A bad case is reported with
/// its file and reason and the others go on; the manifest lists the shards present.
pub fn preprocess_dataset(
    root: &Path,
    plans: &Plans,
    out: &Path,
    opts: &PreprocessOptions,
    mut on_case: impl FnMut(&str, bool),
) -> Result<PreprocessSummary> {
    let start = Instant::now();
    // Absolute, so that shards name their raw files from anywhere (final validation).
    let root = &std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
    let ds = RawDataset::open(root)?;
    if let Some(e) = ds.layout_problems.first() {
        return Err(Error::invalid(
            root,
            format!("{} layout problem(s), first: {e} (run `cps3d dataset check`)", ds.layout_problems.len()),
        ));
    }
    let target = target_spacing(plans, &opts.configuration)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Parts of one split run together (on other nodes too): they share the folder, and
    // none sweeps temporaries, whose writers' pids it cannot see.
    let _lock = match opts.part {
        None => crate::util::FolderLock::exclusive(out, "preprocessing")?,
        Some(_) => crate::util::FolderLock::shared(out, "preprocessing a part")?,
    };
    if opts.part.is_none() {
        // After the lock: they may be another writer's files in flight.
        remove_stale_temporaries(out);
    }
    crate::util::write_json_atomic(&out.join("plans.json"), plans)?;
    let cases: Vec<Case> = match opts.part {
        None => ds.cases().cloned().collect(),
        Some(part) => ds.share(part),
    };
    let share: Vec<String> = cases.iter().map(|c| c.id.clone()).collect();
    let mut summary = PreprocessSummary::default();
    let mut done: Vec<ManifestCase> = Vec::new();
    cps3d_actors::pool::for_each_bounded(
        cases,
        opts.workers,
        |case: Case| -> (Case, Result<CaseOutcome>) {
            let path = shard_path(out, &case.id);
            if let Some(shape) = (!opts.overwrite).then(|| done_shape(&path, target, &plans.normalization)).flatten() {
                return (case, Ok((false, shape, 0, 0)));
            }
            let r = crate::dataset::catch_case_panic(&case, || {
                let p = preprocess_case(&case, plans, &opts.configuration)?;
                let input_bytes = p.meta.original_shape.iter().product::<usize>() as u64 * 4 * p.image.len() as u64;
                let bytes = write_case(&p, &path, opts)?;
                Ok((true, p.meta.shape, input_bytes, bytes))
            });
            (case, r)
        },
        |r| match r {
            Ok((case, Ok((written, shape, input, bytes)))) => {
                if written {
                    summary.written += 1;
                } else {
                    summary.skipped_existing += 1;
                }
                summary.input_voxels += input;
                summary.shard_bytes += bytes;
                on_case(&case.id, true);
                done.push(ManifestCase {
                    shard: shard_path(Path::new(""), &case.id).to_string_lossy().into_owned(),
                    labeled: case.is_labeled(),
                    id: case.id,
                    shape,
                });
            }
            Ok((case, Err(e))) => {
                on_case(&case.id, false);
                summary.failed.push(FailedCase { id: case.id, error: e.to_string() });
            }
            Err(panic) => {
                summary.failed.push(FailedCase { id: "?".into(), error: format!("worker panicked: {panic}") })
            }
        },
    );
    let manifest = manifest_of(plans, &opts.configuration, done, summary.failed.clone());
    summary.failed = manifest.failed.clone();
    match opts.part {
        None => crate::util::write_json_atomic(&out.join(MANIFEST), &manifest)?,
        Some(part) => {
            let record = ManifestPart { part: part.index, parts: part.count, share, manifest };
            crate::util::write_json_atomic(&part.file(&out.join(MANIFEST)), &record)?;
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The manifest of these cases, sorted as one run sorts them.
fn manifest_of(
    plans: &Plans,
    configuration: &str,
    mut done: Vec<ManifestCase>,
    mut failed: Vec<FailedCase>,
) -> Manifest {
    done.sort_by(|a, b| (!a.labeled, &a.id).cmp(&(!b.labeled, &b.id)));
    failed.sort_by(|a, b| a.id.cmp(&b.id));
    Manifest {
        version: SHARD_VERSION,
        configuration: configuration.to_string(),
        spacing: plans.configurations[configuration].spacing.clone(),
        num_classes: plans.num_classes,
        normalization: plans.normalization.clone(),
        cases: done,
        failed,
    }
}

/// What `preprocess --part I/N` leaves beside the shards: `manifest.json.part-I-of-N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestPart {
    pub part: usize,
    pub parts: usize,
    /// The cases this part was given (its share of the dataset as listed then).
    pub share: Vec<String>,
    pub manifest: Manifest,
}

/// Writes `manifest.json` from the parts of a split run, as one run writes it: every
/// part present and made for this dataset's case list and this plan, and every shard
/// it lists present and made for this plan; anything else is refused by name.
pub fn merge_parts(root: &Path, plans: &Plans, out: &Path, configuration: &str) -> Result<Manifest> {
    let root = &std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
    let ds = RawDataset::open(root)?;
    let target = target_spacing(plans, configuration)?;
    let _lock = crate::util::FolderLock::exclusive(out, "merging preprocessing parts")?;
    let manifest_path = out.join(MANIFEST);
    let count = crate::util::part_count(&manifest_path)?;
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for index in 0..count {
        let part = crate::util::Part { index, count };
        let (file, p): (_, ManifestPart) = crate::util::read_part(&manifest_path, part)?;
        let stale = |why: String| Error::invalid(&file, format!("stale: {why}; run part {index}/{count} again"));
        let expected: Vec<String> = ds.share(part).iter().map(|c| c.id.clone()).collect();
        if p.part != index || p.parts != count || p.share != expected {
            return Err(stale(format!(
                "made as part {}/{} for {} case(s); this dataset's part {index}/{count} has {}",
                p.part,
                p.parts,
                p.share.len(),
                expected.len()
            )));
        }
        let m = &p.manifest;
        let clip = |n: &Normalization| (n.scheme.clone(), n.clip_low.to_bits(), n.clip_high.to_bits());
        if m.configuration != configuration
            || m.spacing != plans.configurations[configuration].spacing
            || !m.normalization.iter().map(clip).eq(plans.normalization.iter().map(clip))
        {
            return Err(stale(format!(
                "made for another plan (configuration {}, spacing {:?})",
                m.configuration, m.spacing
            )));
        }
        for c in &m.cases {
            let path = shard_path(out, &c.id);
            match done_shape(&path, target, &plans.normalization) {
                Some(shape) if shape == c.shape => {}
                Some(shape) => {
                    return Err(Error::invalid(
                        &path,
                        format!("stale: shape {shape:?}, part {index} wrote {:?}", c.shape),
                    ))
                }
                None => {
                    return Err(Error::invalid(
                        &path,
                        format!(
                        "missing or not made for this plan, though part {index}/{count} lists it: run that part again"
                    ),
                    ))
                }
            }
        }
        done.extend(p.manifest.cases);
        failed.extend(p.manifest.failed);
    }
    let manifest = manifest_of(plans, configuration, done, failed);
    crate::util::write_json_atomic(&manifest_path, &manifest)?;
    Ok(manifest)
}
