//! `cps3d synth`: synthetic CT datasets in nnU-Net's raw layout, for tests, the demo
//! and scale tests. Deterministic from a seed whatever the number of workers, and
//! streaming: each worker holds one scan at a time.

pub mod phantom;

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::dataset::labels::flare22_labels_json;
use crate::dataset::{IMAGES_TR, IMAGES_UNLABELED, LABELS_TR};
use crate::error::{Error, Result};
use crate::io::nifti::{write_volume_with, WriterOptionsFlavour};
use phantom::PhantomGrid;

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub labeled: usize,
    pub unlabeled: usize,
    /// (z, y, x) voxels.
    pub shape: [usize; 3],
    /// In-plane and slice spacing ranges (mm). `None`: drawn so that the field of view
    /// is that of an abdominal CT (330-420 mm in-plane, 200-320 mm along z).
    pub spacing_xy: Option<(f64, f64)>,
    pub spacing_z: Option<(f64, f64)>,
    pub seed: u64,
    pub workers: usize,
    /// gzip level of the `.nii.gz` files (1 = fastest).
    pub gzip_level: u32,
    /// ".nii.gz" or ".nii".
    pub file_ending: String,
    /// Fat around the adrenal glands and the esophagus (see [`phantom::PhantomGrid`]).
    pub fat_planes: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            labeled: 4,
            unlabeled: 4,
            shape: [64, 128, 128],
            spacing_xy: None,
            spacing_z: None,
            seed: 0,
            workers: 1,
            gzip_level: 1,
            file_ending: ".nii.gz".into(),
            fat_planes: true,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SynthSummary {
    pub written: usize,
    pub skipped_existing: usize,
    /// Uncompressed voxel bytes generated (image int16 + labels uint8).
    pub voxel_bytes: u64,
    pub file_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
struct Job {
    id: String,
    seed: u64,
    image: PathBuf,
    label: Option<PathBuf>,
}

/// SplitMix64: decorrelates per-case seeds derived from one run seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn case_rng(seed: u64) -> rand_pcg::Pcg64Mcg {
    rand_pcg::Pcg64Mcg::seed_from_u64(mix(seed))
}

pub fn labeled_case_id(i: usize) -> String {
    format!("phantom_{i:04}")
}

pub fn unlabeled_case_id(i: usize) -> String {
    format!("unlabeled_{i:05}")
}

/// Default in-plane field of view and scan length (mm), as abdominal CTs have.
const FIELD_OF_VIEW_MM: (f64, f64) = (330.0, 420.0);
const SCAN_LENGTH_MM: (f64, f64) = (200.0, 320.0);

fn draw_grid(cfg: &SynthConfig, rng: &mut impl Rng) -> PhantomGrid {
    let [nz, ny, nx] = cfg.shape;
    let sxy = match cfg.spacing_xy {
        Some((a, b)) if b > a => rng.random_range(a..b),
        Some((a, _)) => a,
        None => rng.random_range(FIELD_OF_VIEW_MM.0..FIELD_OF_VIEW_MM.1) / nx.max(ny) as f64,
    };
    let sz = match cfg.spacing_z {
        Some((a, b)) if b > a => rng.random_range(a..b),
        Some((a, _)) => a,
        None => rng.random_range(SCAN_LENGTH_MM.0..SCAN_LENGTH_MM.1) / nz as f64,
    };
    PhantomGrid { shape: [nz, ny, nx], spacing: as_written(sz, sxy), fat_planes: cfg.fat_planes }
}

/// Spacing (z, y, x) rounded as scanners write it (0.01 mm in-plane, 0.05 mm slices).
fn as_written(sz: f64, sxy: f64) -> [f64; 3] {
    let sxy = (sxy * 100.0).round() / 100.0;
    let sz = ((sz * 20.0).round() / 20.0).max(0.05);
    [sz, sxy, sxy]
}

/// The default range of a spacing: a field of view of `fov` mm over `n` voxels.
fn default_range(fov: (f64, f64), n: usize) -> (f64, f64) {
    (fov.0 / n as f64, fov.1 / n as f64)
}

/// Bytes one worker holds for a case of `voxels`: float32 HU, uint8 labels, the int16
/// image, and the file-order copies written out (the labels and image again).
fn case_bytes(voxels: f64) -> f64 {
    voxels * 10.0
}

fn validate(cfg: &SynthConfig, out: &Path) -> Result<()> {
    let [z, y, x] = cfg.shape;
    if cfg.shape.iter().any(|&n| n < 8) {
        return Err(Error::invalid(out, format!("--shape {z},{y},{x} too small: at least 8 voxels per axis")));
    }
    // NIfTI-1 stores each dimension as an int16.
    if cfg.shape.iter().any(|&n| n > i16::MAX as usize) {
        return Err(Error::invalid(
            out,
            format!("--shape {z},{y},{x}: NIfTI-1 files hold at most 32767 voxels per axis"),
        ));
    }
    let voxels: f64 = cfg.shape.iter().map(|&n| n as f64).product();
    let at_once = cfg.workers.max(1).min(cfg.labeled + cfg.unlabeled).max(1);
    crate::memory::check_memory(
        at_once as f64 * case_bytes(voxels),
        &format!("--shape {z},{y},{x} with {at_once} case(s) at a time (-j)"),
        "use a smaller --shape or fewer workers (-j)",
    )
    .map_err(|e| Error::invalid(out, e))?;
    for (name, r) in [("--spacing-xy", cfg.spacing_xy), ("--spacing-z", cfg.spacing_z)] {
        if let Some((a, b)) = r {
            if !(a > 0.0 && b >= a && b.is_finite()) {
                return Err(Error::invalid(out, format!("{name} {a},{b}: need 0 < MIN <= MAX")));
            }
        }
    }
    // Every spacing drawn lies between the ranges' ends as written: those must make files
    // the reader accepts (a range that rounds to 0 or leaves its voxel sizes would not).
    let xy = cfg.spacing_xy.unwrap_or(default_range(FIELD_OF_VIEW_MM, x.max(y)));
    let z_range = cfg.spacing_z.unwrap_or(default_range(SCAN_LENGTH_MM, z));
    for (sz, sxy) in [(z_range.0, xy.0), (z_range.1, xy.1)] {
        let written = as_written(sz, sxy).map(|v| v as f32 as f64);
        if let Some(problem) = crate::io::geometry::voxel_size_problem(&written) {
            return Err(Error::invalid(
                out,
                format!(
                    "--spacing-xy {},{} / --spacing-z {},{} would write voxel sizes {written:?} mm (z, y, x; rounded \
                     as written), which the reader refuses: {problem}",
                    xy.0, xy.1, z_range.0, z_range.1
                ),
            ));
        }
    }
    if cfg.file_ending != ".nii.gz" && cfg.file_ending != ".nii" {
        return Err(Error::invalid(out, format!("file ending {} not supported", cfg.file_ending)));
    }
    if cfg.labeled == 0 {
        return Err(Error::invalid(out, "a dataset needs at least one labeled case"));
    }
    Ok(())
}

/// Writes a synthetic dataset into `out`. Cases whose files already exist are
/// skipped (files are written atomically, so an existing file is complete): an
/// interrupted run is finished by running it again. `on_case` gets each finished case.
pub fn write_dataset(cfg: &SynthConfig, out: &Path, mut on_case: impl FnMut(&str)) -> Result<SynthSummary> {
    validate(cfg, out)?;
    let start = Instant::now();
    for dir in [IMAGES_TR, LABELS_TR, IMAGES_UNLABELED] {
        let d = out.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let ending = cfg.file_ending.as_str();
    let labeled = (0..cfg.labeled).map(|i| {
        let id = labeled_case_id(i);
        Job {
            seed: cfg.seed ^ mix(i as u64),
            image: out.join(IMAGES_TR).join(format!("{id}_0000{ending}")),
            label: Some(out.join(LABELS_TR).join(format!("{id}{ending}"))),
            id,
        }
    });
    let unlabeled = (0..cfg.unlabeled).map(|i| {
        let id = unlabeled_case_id(i);
        Job {
            seed: cfg.seed ^ mix((1u64 << 40) + i as u64),
            image: out.join(IMAGES_UNLABELED).join(format!("{id}_0000{ending}")),
            label: None,
            id,
        }
    });
    let level = cfg.gzip_level;
    let mut summary = SynthSummary::default();
    let mut first_error: Option<Error> = None;
    // A pool whose threads cannot be spawned panics in std: an error instead.
    let pool = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cps3d_actors::pool::for_each_bounded(
            labeled.chain(unlabeled),
            cfg.workers,
            |job: Job| -> Result<(String, bool, u64, u64)> {
                let done = job.image.exists() && job.label.as_ref().is_none_or(|l| l.exists());
                if done {
                    return Ok((job.id, false, 0, 0));
                }
                let mut rng = case_rng(job.seed);
                let grid = draw_grid(cfg, &mut rng);
                let p = phantom::generate(grid, &mut rng);
                // Regenerable from the seed: atomic, but no fsync per file.
                let flavour = WriterOptionsFlavour::Scratch(level);
                let mut voxel_bytes = p.image.len() as u64 * 2;
                if let Some(label) = &job.label {
                    // Label first: the image's presence then marks a finished case.
                    write_volume_with(label, p.labels.view(), &p.geometry, flavour)?;
                    voxel_bytes += p.labels.len() as u64;
                }
                write_volume_with(&job.image, p.image.view(), &p.geometry, flavour)?;
                let mut file_bytes = std::fs::metadata(&job.image).map(|m| m.len()).unwrap_or(0);
                if let Some(label) = &job.label {
                    file_bytes += std::fs::metadata(label).map(|m| m.len()).unwrap_or(0);
                }
                Ok((job.id, true, voxel_bytes, file_bytes))
            },
            |r| match r {
                Ok(Ok((id, written, vb, fb))) => {
                    if written {
                        summary.written += 1;
                    } else {
                        summary.skipped_existing += 1;
                    }
                    summary.voxel_bytes += vb;
                    summary.file_bytes += fb;
                    on_case(&id);
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(panic) => {
                    first_error.get_or_insert(Error::invalid(out, format!("phantom worker panicked: {panic}")));
                }
            },
        )
    }));
    if let Err(p) = pool {
        let msg = cps3d_actors::pool::panic_message(p.as_ref());
        return Err(Error::invalid(out, format!("{} worker(s) (-j): {msg}", cfg.workers)));
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let json = serde_json::json!({
        "name": "SynthPhantoms",
        "description": format!(
            "cps3d synthetic abdominal CT phantoms (seed {}, shape {:?} z,y,x): {} labeled, {} unlabeled",
            cfg.seed, cfg.shape, cfg.labeled, cfg.unlabeled
        ),
        "channel_names": { "0": "CT" },
        "labels": flare22_labels_json(),
        "numTraining": cfg.labeled,
        "numUnlabeled": cfg.unlabeled,
        "file_ending": cfg.file_ending,
    });
    crate::util::write_json_atomic(&out.join("dataset.json"), &json)?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}
