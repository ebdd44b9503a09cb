//! `cps3d dataset check`: a raw dataset's layout, geometry and labels checked before anything is run.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;

use super::progress;

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Validate a raw dataset: dataset.json, image/label pairs, geometry, label values,
    /// NaN/Inf, readability. Lists every bad file; exits non-zero if any.
    Check {
        /// The dataset folder (holding dataset.json, imagesTr/, labelsTr/).
        dir: PathBuf,
        /// Worker threads (one case in memory per worker).
        #[arg(short = 'j', long, default_value_t = super::default_workers())]
        #[arg(value_parser = super::workers, allow_negative_numbers = true)]
        workers: usize,
    },
}

pub fn run(cmd: DatasetCommand) -> Result<()> {
    match cmd {
        DatasetCommand::Check { dir, workers } => {
            let total = cps3d::dataset::RawDataset::open(&dir).map(|d| d.cases().count()).unwrap_or(0);
            let pb = progress::bar(total as u64, "checking");
            let report = cps3d::dataset::check::check_dataset(&dir, workers, || pb.inc(1))?;
            pb.finish_and_clear();
            print!("{}", report.render());
            if !report.is_ok() {
                let bad = report.bad_files();
                bail!(
                    "dataset check failed: {} problem(s) in {} file(s): {}",
                    report.problems.len(),
                    bad.len(),
                    bad.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                );
            }
            Ok(())
        }
    }
}
