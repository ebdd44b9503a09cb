//! cps3d's shard format: one file per case holding the CT image (i16) and its label map (u8) as
//! zstd-compressed bricks, a brick index with per-brick checksums, per-class foreground
//! locations for oversampling, and a metadata string. FORMAT.md describes the bytes.
//!
//! - [`ShardWriter`] writes a shard a brick at a time and atomically.
//! - [`Shard`] memory-maps one and reads arbitrary boxes (padded outside the volume),
//!   decompressing only the bricks a box touches; share it between threads, one [`Scratch`] each.
//! - [`verify_shard`] / [`verify_dir`] check every byte.

mod error;
mod format;
mod io_stats;
mod locations;
mod reader;
mod summary;
mod verify;
mod writer;

pub use error::{Result, StorageError, Stream};
pub use format::{ImageFilter, FORMAT_VERSION, HEADER_LEN, MAGIC, SHARD_EXTENSION};
pub use io_stats::{io_stats, IoStats};
pub use locations::{
    locations_to_keep, sample_class_locations, ClassInfo, ClassLocations, ClassSample, DEFAULT_LOCATION_CAP,
    DEFAULT_LOCATION_MIN_FRACTION, DEFAULT_LOCATION_SEED,
};
pub use reader::{file_kind, ReadMode, Scratch, Shard};
pub use summary::ShardSummary;
pub use verify::{find_shards, verify_dir, verify_shard};
pub use writer::{ShardInput, ShardWriter, DEFAULT_BRICK_SHAPE, DEFAULT_ZSTD_LEVEL};
