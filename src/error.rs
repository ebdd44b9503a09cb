//! The library's error type: every variant names the file it is about.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Nifti { path: PathBuf, message: String },
    // The cause is part of the message and deliberately not a `source()`: reports that
    // print the whole chain would otherwise say it twice.
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },
    /// Writing failed: said so, so that a full disk is not mistaken for a bad input.
    #[error("{}: cannot write: {cause}", path.display())]
    Write { path: PathBuf, cause: std::io::Error },
    #[error("{}: invalid JSON: {cause}", path.display())]
    Json { path: PathBuf, cause: serde_json::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(path: impl AsRef<Path>, message: impl Into<String>) -> Error {
        Error::Invalid { path: path.as_ref().to_path_buf(), message: message.into() }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Io { path: path.as_ref().to_path_buf(), cause: source }
    }

    /// An I/O error while writing (or creating, syncing, renaming) `path`.
    pub fn write(path: impl AsRef<Path>, source: std::io::Error) -> Error {
        Error::Write { path: path.as_ref().to_path_buf(), cause: source }
    }

    pub fn json(path: impl AsRef<Path>, source: serde_json::Error) -> Error {
        Error::Json { path: path.as_ref().to_path_buf(), cause: source }
    }

    /// Turns the nifti crate's terse errors into a sentence about the file.
    pub fn nifti(path: impl AsRef<Path>, e: nifti::NiftiError) -> Error {
        use nifti::NiftiError as E;
        let message = match &e {
            E::Io(io) => match io.kind() {
                std::io::ErrorKind::UnexpectedEof => "file is truncated (unexpected end of data)".to_string(),
                std::io::ErrorKind::NotFound => "file not found".to_string(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                    format!("corrupt data (not a valid gzip/NIfTI stream): {io}")
                }
                _ => format!("cannot read: {io}"),
            },
            E::InvalidFormat => "not a NIfTI-1 file (bad magic or header size)".to_string(),
            E::IncompatibleLength(got, expected) => {
                format!("file is truncated: {got} bytes of voxel data where the header needs {expected} voxels")
            }
            other => format!("invalid NIfTI: {other}"),
        };
        Error::Nifti { path: path.as_ref().to_path_buf(), message }
    }

    /// The nifti crate's errors while writing `path`, worded as a write.
    pub fn nifti_write(path: impl AsRef<Path>, e: nifti::NiftiError) -> Error {
        match e {
            nifti::NiftiError::Io(io) => Error::write(path, io),
            other => Error::Nifti { path: path.as_ref().to_path_buf(), message: format!("cannot write: {other}") },
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Error::Invalid { path, .. }
            | Error::Nifti { path, .. }
            | Error::Io { path, .. }
            | Error::Write { path, .. }
            | Error::Json { path, .. } => path,
        }
    }
}
