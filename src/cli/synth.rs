//! `cps3d synth OUT`: writes a synthetic CT dataset of phantoms in nnU-Net layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::{progress, MinMax, Zyx};
use cps3d::synth::{write_dataset, SynthConfig};

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output dataset folder (created; existing complete cases are kept).
    out: PathBuf,
    /// Labeled cases (imagesTr + labelsTr).
    #[arg(long, default_value_t = 4, value_parser = super::positive, allow_negative_numbers = true)]
    labeled: usize,
    /// Unlabeled cases (imagesUnlabeled).
    #[arg(long, default_value_t = 4)]
    unlabeled: usize,
    /// Volume shape Z,Y,X in voxels.
    #[arg(long, default_value = "64,128,128")]
    shape: Zyx,
    /// In-plane spacing range MIN,MAX in mm (default: a 330-420 mm field of view).
    #[arg(long)]
    spacing_xy: Option<MinMax>,
    /// Slice spacing range MIN,MAX in mm (default: a 200-320 mm scan length).
    #[arg(long)]
    spacing_z: Option<MinMax>,
    /// Random seed: the same seed gives the same files, whatever -j.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads (one scan in memory per worker).
    #[arg(short = 'j', long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    workers: usize,
    /// gzip level for .nii.gz output (1 fastest, 9 smallest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    gzip_level: u32,
    /// Write uncompressed .nii files.
    #[arg(long)]
    uncompressed: bool,
    /// Phantoms as before cps3d 0.1's fat planes: adrenal glands and esophagus without the
    /// fat that makes them visible in CT.
    #[arg(long)]
    no_fat_planes: bool,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        labeled: a.labeled,
        unlabeled: a.unlabeled,
        shape: a.shape.0,
        spacing_xy: a.spacing_xy.map(|r| (r.0, r.1)),
        spacing_z: a.spacing_z.map(|r| (r.0, r.1)),
        seed: a.seed,
        fat_planes: !a.no_fat_planes,
        workers: a.workers,
        gzip_level: a.gzip_level,
        file_ending: if a.uncompressed { ".nii".into() } else { ".nii.gz".into() },
    };
    let pb = progress::bar((cfg.labeled + cfg.unlabeled) as u64, "synth");
    let summary = write_dataset(&cfg, &a.out, |id| {
        pb.set_message(id.to_string());
        pb.inc(1);
    })
    .with_context(|| format!("synthesising into {}", a.out.display()))?;
    pb.finish_and_clear();
    let mb = summary.voxel_bytes as f64 / 1e6;
    tracing::info!(
        "wrote {} cases ({} already present) to {} in {:.1} s: {:.0} MB of voxels ({:.1} MB/s), {:.0} MB on disk",
        summary.written,
        summary.skipped_existing,
        a.out.display(),
        summary.seconds,
        mb,
        mb / summary.seconds.max(1e-9),
        summary.file_bytes as f64 / 1e6
    );
    Ok(())
}
