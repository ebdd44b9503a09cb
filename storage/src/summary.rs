//! [`ShardSummary`]: the sizes and counts of one shard, as its writer, its reader and
//! `verify` report them.

use std::path::PathBuf;

/// Sizes and counts of one shard.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSummary {
    pub path: PathBuf,
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
    pub brick_shape: [usize; 3],
    pub channels: usize,
    pub has_labels: bool,
    /// Bricks per channel and stream.
    pub bricks: usize,
    pub image_raw_bytes: u64,
    pub image_compressed_bytes: u64,
    pub label_raw_bytes: u64,
    pub label_compressed_bytes: u64,
    /// Classes present in the labels.
    pub classes: usize,
    /// Class locations stored, all classes together.
    pub locations: usize,
    pub file_len: u64,
}

impl ShardSummary {
    /// Raw image + label bytes over the file's size.
    pub fn compression_ratio(&self) -> f64 {
        (self.image_raw_bytes + self.label_raw_bytes) as f64 / self.file_len as f64
    }

    pub fn image_ratio(&self) -> f64 {
        self.image_raw_bytes as f64 / self.image_compressed_bytes.max(1) as f64
    }

    pub fn label_ratio(&self) -> f64 {
        self.label_raw_bytes as f64 / self.label_compressed_bytes.max(1) as f64
    }
}
