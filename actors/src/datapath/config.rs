//! What a data path is asked to do: its cases, patch, batch composition, worker counts,
//! queue capacities, normalisation, augmentation and seed ([`DataPathConfig`]), checked
//! before any worker starts.

use std::path::PathBuf;
use std::time::Duration;

use super::sampler::CaseSource;
use crate::augment::{AugmentConfig, Augmenter};

/// Normalisation of one channel: clip, then z-score (nnU-Net's CT scheme).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub clip_low: f32,
    pub clip_high: f32,
    pub mean: f32,
    pub std: f32,
}

impl Normalize {
    #[inline]
    pub fn apply(&self, v: f32) -> f32 {
        (v.clamp(self.clip_low, self.clip_high) - self.mean) / self.std.max(1e-8)
    }
}

/// Which stage a fault is injected into (tests of supervision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Loader,
    Augmenter,
    Batcher,
}

impl Stage {
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Loader => "loader",
            Stage::Augmenter => "augmenter",
            Stage::Batcher => "batcher",
        }
    }
}

/// Panics a worker of `stage` on every `every`-th item it handles (fault injection).
#[derive(Debug, Clone, Copy)]
pub struct FaultInjection {
    pub stage: Stage,
    pub every: u64,
}

#[derive(Debug, Clone)]
pub struct DataPathConfig {
    pub labeled: Vec<CaseSource>,
    pub unlabeled: Vec<CaseSource>,
    /// (z, y, x).
    pub patch: [usize; 3],
    pub channels: usize,
    pub labeled_batch: usize,
    pub unlabeled_batch: usize,
    pub augmentation: AugmentConfig,
    /// Deep-supervision scales, finest first (the plan's).
    pub ds_scales: Vec<[f64; 3]>,
    pub normalization: Vec<Normalize>,
    /// nnU-Net's foreground oversampling (0.33): the last
    /// `labeled_batch − round(labeled_batch · (1 − p))` labeled samples of every batch
    /// are centred on a stored foreground voxel.
    pub oversample_foreground: f64,
    pub loaders: usize,
    pub augmenters: usize,
    pub batchers: usize,
    /// Capacities in items: raw samples, augmented samples, batches per consumer.
    pub raw_queue: usize,
    pub augmented_queue: usize,
    pub batch_queue: usize,
    /// How many consumers receive every batch (2 for the two CPS trainers).
    pub consumers: usize,
    pub seed: u64,
    /// Shards each loader keeps mapped (least recently used are unmapped), so that
    /// resident memory does not grow with the number of scans.
    pub open_shards_per_loader: usize,
    pub log_interval: Duration,
    pub fault: Option<FaultInjection>,
    /// Batches keyed by number: each sample a function of (seed, batch, slot of the global
    /// batch) whatever the workers' timing, and this process streaming only its rank's
    /// slice of every global batch (see [`GlobalBatch`]). None: samples as they come.
    pub global: Option<GlobalBatch>,
}

/// This process's share of a global batch of `world` ranks: `labeled_batch` and
/// `unlabeled_batch` are per rank, and rank r streams labeled slots r·L..(r+1)·L and
/// unlabeled slots r·U..(r+1)·U of every global batch of world·L + world·U samples. A run
/// on N ranks therefore sees the samples of one process with the N-fold batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalBatch {
    pub rank: usize,
    pub world: usize,
}

impl DataPathConfig {
    pub fn new(labeled: Vec<CaseSource>, unlabeled: Vec<CaseSource>, patch: [usize; 3]) -> DataPathConfig {
        DataPathConfig {
            labeled,
            unlabeled,
            patch,
            channels: 1,
            labeled_batch: 2,
            unlabeled_batch: 2,
            augmentation: AugmentConfig::default(),
            ds_scales: vec![[1.0; 3]],
            normalization: vec![Normalize { clip_low: f32::MIN, clip_high: f32::MAX, mean: 0.0, std: 1.0 }],
            oversample_foreground: 0.33,
            loaders: 1,
            augmenters: 1,
            batchers: 1,
            raw_queue: 4,
            augmented_queue: 4,
            batch_queue: 2,
            consumers: 1,
            seed: 0,
            open_shards_per_loader: 16,
            log_interval: Duration::from_secs(5),
            fault: None,
            global: None,
        }
    }

    /// Bytes the queues can hold at most, roughly (for sizing capacities in memory terms).
    pub fn queue_bytes(&self) -> u64 {
        let patch: u64 = self.patch.iter().map(|&p| p as u64).product();
        let region: u64 =
            AugmentConfig::source_region(&self.augmentation, self.patch).iter().map(|&p| p as u64).product();
        let c = self.channels as u64;
        let raw = region * (4 * c + 1);
        let aug = patch * (4 * c + 1);
        let batch =
            (self.labeled_batch + self.unlabeled_batch) as u64 * patch * 4 * c + self.labeled_batch as u64 * patch;
        self.raw_queue as u64 * raw
            + self.augmented_queue as u64 * aug
            + self.batch_queue as u64 * batch * self.consumers as u64
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.labeled.is_empty() && self.labeled_batch > 0 {
            return Err("no labeled shards, but the batch asks for labeled samples".into());
        }
        if self.unlabeled.is_empty() && self.unlabeled_batch > 0 {
            return Err("no unlabeled shards, but the batch asks for unlabeled samples".into());
        }
        if self.labeled_batch + self.unlabeled_batch == 0 {
            return Err("empty batch".into());
        }
        if self.loaders == 0 || self.augmenters == 0 || self.batchers == 0 || self.consumers == 0 {
            return Err("every stage needs at least one worker and one consumer".into());
        }
        if self.normalization.len() != self.channels {
            return Err(format!("{} normalisations for {} channels", self.normalization.len(), self.channels));
        }
        Augmenter::new(self.augmentation, self.patch, self.channels, &self.ds_scales).map_err(|e| e.to_string())?;
        if let Some(g) = self.global {
            if g.world == 0 || g.rank >= g.world {
                return Err(format!("rank {} of a world of {}", g.rank, g.world));
            }
        }
        Ok(())
    }
}

/// Manifest-free helper: the shards of a folder as case sources.
pub fn shard_sources(paths: &[(String, PathBuf, bool)]) -> (Vec<CaseSource>, Vec<CaseSource>) {
    let mut labeled = Vec::new();
    let mut unlabeled = Vec::new();
    for (id, path, is_labeled) in paths {
        let c = CaseSource { id: id.clone(), path: path.clone() };
        if *is_labeled {
            labeled.push(c);
        } else {
            unlabeled.push(c);
        }
    }
    (labeled, unlabeled)
}
