//! What flows through a data path: the samples between its stages (with their recycled
//! buffers), the [`Batch`] its consumers get (labeled samples, then unlabeled, contiguous),
//! and the [`ReadFailure`]s of shards it could not read.

use crossbeam_channel::Sender;

use crate::augment::{Draw, Sample};

/// One batch: labeled samples first, then unlabeled; contiguous, ready to become a
/// tensor without copying.
#[derive(Debug, Default)]
pub struct Batch {
    pub index: u64,
    pub patch: [usize; 3],
    pub channels: usize,
    pub labeled: usize,
    pub unlabeled: usize,
    /// `[labeled + unlabeled][channel][z][y][x]`.
    pub image: Vec<f32>,
    /// `[labeled][z][y][x]`.
    pub labels: Vec<u8>,
    /// Per deep-supervision scale after the first: `[labeled][z][y][x]` of `ds_shapes[i]`.
    pub ds_labels: Vec<Vec<u8>>,
    pub ds_shapes: Vec<[usize; 3]>,
    /// Per sample: shard id and whether it was centred on foreground.
    pub cases: Vec<String>,
    pub forced_foreground: Vec<bool>,
    /// Where the buffers go when the last consumer drops the batch.
    pub recycle: Option<Sender<BatchBuffers>>,
}

/// A batch's large buffers: image, labels, deep-supervision labels.
pub type BatchBuffers = (Vec<f32>, Vec<u8>, Vec<Vec<u8>>);

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(tx) = self.recycle.take() {
            let bufs = (
                std::mem::take(&mut self.image),
                std::mem::take(&mut self.labels),
                std::mem::take(&mut self.ds_labels),
            );
            let _ = tx.try_send(bufs);
        }
    }
}

impl Batch {
    pub fn samples(&self) -> usize {
        self.labeled + self.unlabeled
    }
}

/// Image and label buffers of a raw sample, recycled.
pub(crate) type RawBuffers = (Vec<f32>, Vec<u8>);

/// A region read from a shard, with the augmentation drawn for it.
pub(crate) struct RawSample {
    /// Its number among this rank's samples (keyed batches only).
    pub key: Option<u64>,
    pub case: usize,
    pub labeled: bool,
    /// The batch slot nnU-Net forces to foreground.
    pub wants_foreground: bool,
    /// Whether it got it (a case without foreground falls back to a random box).
    pub forced_foreground: bool,
    /// The box read (part of nnU-Net's enlarged region) and the patch centre in it.
    pub region: [usize; 3],
    pub centre: [f64; 3],
    pub image: Vec<f32>,
    pub labels: Vec<u8>,
    pub draw: Draw,
}

pub(crate) struct AugmentedSample {
    pub key: Option<u64>,
    pub case: usize,
    pub labeled: bool,
    pub wants_foreground: bool,
    pub forced_foreground: bool,
    pub sample: Sample,
}

/// A shard that could not be read while the path ran.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReadFailure {
    pub case: String,
    pub path: std::path::PathBuf,
    pub failures: u32,
    pub last_error: String,
    /// No longer sampled (it failed too often).
    pub excluded: bool,
}
