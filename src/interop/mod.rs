//! Files for the Python side of nnU-Net, written without Python: PyTorch checkpoints
//! (`checkpoint_final.pth`), pickles (`CASE.pkl`) and NumPy archives (`CASE.npz`).
//!
//! `scripts/reference/interop_check.py` loads files written by these writers with torch, pickle
//! and NumPy and records their hashes and contents in `tests/golden/interop.json`; the tests in
//! `golden.rs` check that we still write exactly those bytes.

pub mod nnunet;
pub mod npz;
pub mod pickle;
pub mod pth;

#[cfg(test)]
mod golden;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

pub use npz::{write_npz_f32, write_npz_f32_slice};
pub use pickle::{to_bytes, write_pickle, TensorRef, Value};
pub use pth::{write_checkpoint, StateTensor, Storages};

/// Writes a file through `write` into a temporary file beside `path`, syncs it and renames it
/// into place, so that readers never see a partial file. `write` gets the open file and hands it
/// back when done (zip writers own their output while writing).
pub(crate) fn write_file_atomically(path: &Path, write: impl FnOnce(File) -> Result<File>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The counter keeps threads of one process that write the same path apart.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp: PathBuf = path.with_file_name(format!(".tmp-{}-{n}-{name}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let file = write(file)?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A zip error as an error about `path`.
pub(crate) fn zip_error(path: &Path, e: zip::result::ZipError) -> Error {
    match e {
        zip::result::ZipError::Io(io) => Error::io(path, io),
        other => Error::invalid(path, format!("cannot write the zip archive: {other}")),
    }
}

/// Entry options that make the archive's bytes depend on its contents only: a fixed time stamp
/// (1980-01-01, the zip epoch) and fixed permissions.
pub(crate) fn zip_options() -> zip::write::SimpleFileOptions {
    zip::write::SimpleFileOptions::default().last_modified_time(zip::DateTime::default()).unix_permissions(0o644)
}
