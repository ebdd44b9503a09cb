//! The one error type of the crate. Every variant that comes from a shard names its path, and
//! brick errors also name the stream, the brick's index and its (z, y, x) brick coordinates, so a
//! message alone says which file to regenerate and where it went bad.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The two brick streams of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Image,
    Labels,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Image => "image",
            Stream::Labels => "label",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    // The cause is in the message and deliberately not a `source()`, so that reports
    // printing the whole chain do not repeat it.
    #[error("{path}: {op}: {cause}")]
    Io { path: PathBuf, op: &'static str, cause: io::Error },

    #[error("{path}: not a cps3d shard (magic {found:02x?})")]
    BadMagic { path: PathBuf, found: Vec<u8> },

    #[error("{path}: unsupported shard format version {found} (this build reads version {supported})")]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },

    #[error("{path}: not a regular file ({kind}); shards are regular files")]
    NotAFile { path: PathBuf, kind: &'static str },

    #[error("{path}: truncated: expected {expected} bytes, the file has {actual}")]
    Truncated { path: PathBuf, expected: u64, actual: u64 },

    #[error(
        "{path}: corrupt shard: its length changed from {expected} to {actual} bytes while it was open \
         (rewritten or truncated in place); make it again"
    )]
    Changed { path: PathBuf, expected: u64, actual: u64 },

    #[error("{path}: corrupt header: checksum {computed:#018x} does not match the stored {stored:#018x}")]
    HeaderChecksum { path: PathBuf, stored: u64, computed: u64 },

    #[error("{path}: corrupt header: {reason}")]
    CorruptHeader { path: PathBuf, reason: String },

    #[error(
        "{path}: {stream} brick {index} (brick z,y,x = {coords:?}, channel {channel}): \
         checksum {computed:#018x} does not match the stored {stored:#018x}"
    )]
    BrickChecksum {
        path: PathBuf,
        stream: Stream,
        channel: usize,
        index: usize,
        coords: [usize; 3],
        stored: u64,
        computed: u64,
    },

    #[error("{path}: {stream} brick {index} (brick z,y,x = {coords:?}, channel {channel}): {reason}")]
    BrickDecode { path: PathBuf, stream: Stream, channel: usize, index: usize, coords: [usize; 3], reason: String },

    #[error("{path}: class {class} location {index} is voxel {voxel}, which {reason}")]
    BadLocation { path: PathBuf, class: u8, index: usize, voxel: u64, reason: String },

    #[error("{path}: the shard has no labels")]
    NoLabels { path: PathBuf },

    #[error("{path}: output buffer holds {actual} values, the region needs {expected}")]
    BufferSize { path: PathBuf, expected: usize, actual: usize },

    #[error("invalid shard input: {reason}")]
    InvalidInput { reason: String },
}

impl StorageError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        StorageError::Io { path: path.into(), op, cause: source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        StorageError::CorruptHeader { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        StorageError::InvalidInput { reason: reason.into() }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
