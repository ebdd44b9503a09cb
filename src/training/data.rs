//! From a shard folder (manifest + plans) to the data path's configuration.

use std::path::Path;

use cps3d_actors::augment::AugmentConfig;
use cps3d_actors::datapath::{CaseSource, DataPathConfig, GlobalBatch, Normalize};

use crate::error::{Error, Result};
use crate::planning::plan::Plans;
use crate::preprocessing::{Manifest, MANIFEST};

/// The data-path knobs a user sets (actor counts, queues, batch composition).
#[derive(Debug, Clone)]
pub struct DataKnobs {
    pub loaders: usize,
    pub augmenters: usize,
    pub batchers: usize,
    pub raw_queue: usize,
    pub augmented_queue: usize,
    pub batch_queue: usize,
    pub patch: Option<[usize; 3]>,
    pub labeled: Option<usize>,
    pub unlabeled: Option<usize>,
    pub no_augment: bool,
    pub consumers: usize,
    pub open_shards: usize,
    pub seed: u64,
    /// Keyed batches: this rank's slice of every global batch (`labeled`/`unlabeled` are
    /// then per rank). None: samples as the workers make them.
    pub global: Option<GlobalBatch>,
}

impl Default for DataKnobs {
    fn default() -> Self {
        DataKnobs {
            loaders: 1,
            augmenters: 1,
            batchers: 1,
            raw_queue: 4,
            augmented_queue: 4,
            batch_queue: 2,
            patch: None,
            labeled: None,
            unlabeled: None,
            no_augment: false,
            consumers: 2,
            open_shards: 16,
            seed: 0,
            global: None,
        }
    }
}

/// Reads `manifest.json` and `plans.json` of a shard folder.
pub fn read_shard_folder(shards: &Path) -> Result<(Manifest, Plans)> {
    let manifest = Manifest::read(&shards.join(MANIFEST))?;
    let plans = Plans::read(&shards.join("plans.json"))?;
    Ok((manifest, plans))
}

pub fn datapath_config(shards: &Path, k: &DataKnobs) -> Result<DataPathConfig> {
    let (manifest, plans) = read_shard_folder(shards)?;
    let conf = plans.configuration(&manifest.configuration).ok_or_else(|| {
        Error::invalid(shards.join("plans.json"), format!("no configuration {}", manifest.configuration))
    })?;
    let plan_patch = patch_zyx(&conf.patch_size).ok_or_else(|| {
        Error::invalid(
            shards.join("plans.json"),
            format!("configuration {}: patch_size {:?} is neither 2D nor 3D", manifest.configuration, conf.patch_size),
        )
    })?;
    let source = |c: &crate::preprocessing::ManifestCase| CaseSource { id: c.id.clone(), path: shards.join(&c.shard) };
    let labeled: Vec<CaseSource> = manifest.cases.iter().filter(|c| c.labeled).map(source).collect();
    let unlabeled: Vec<CaseSource> = manifest.cases.iter().filter(|c| !c.labeled).map(source).collect();
    let patch = k.patch.unwrap_or(plan_patch);
    let mut cfg = DataPathConfig::new(labeled, unlabeled, patch);
    cfg.channels = plans.channels.len();
    let (labeled_batch, unlabeled_batch) = plans.batch_sizes(&manifest.configuration);
    cfg.labeled_batch = k.labeled.unwrap_or(labeled_batch);
    cfg.unlabeled_batch = k.unlabeled.unwrap_or(unlabeled_batch);
    if cfg.unlabeled.is_empty() && k.unlabeled.is_none() {
        tracing::warn!("no unlabeled shards: batches hold labeled samples only");
        cfg.unlabeled_batch = 0;
    }
    cfg.augmentation = if k.no_augment { AugmentConfig::none() } else { plans.augmentation };
    cfg.ds_scales = conf
        .deep_supervision_scales
        .iter()
        .map(|s| if s.len() == 2 { [1.0, s[0], s[1]] } else { [s[0], s[1], s[2]] })
        .collect();
    cfg.normalization = manifest.normalization.iter().map(normalize).collect();
    cfg.oversample_foreground = plans.cps.oversample_foreground;
    (cfg.loaders, cfg.augmenters, cfg.batchers) = (k.loaders, k.augmenters, k.batchers);
    (cfg.raw_queue, cfg.augmented_queue, cfg.batch_queue) = (k.raw_queue, k.augmented_queue, k.batch_queue);
    cfg.consumers = k.consumers;
    cfg.open_shards_per_loader = k.open_shards;
    cfg.seed = k.seed;
    cfg.global = k.global;
    Ok(cfg)
}

/// A configuration's patch as the data path streams it, (z, y, x): a 2D configuration's
/// (y, x) patch is one slice, (1, y, x), as nnU-Net's loader samples 2D patches.
pub fn patch_zyx(patch: &[usize]) -> Option<[usize; 3]> {
    match *patch {
        [y, x] => Some([1, y, x]),
        [z, y, x] => Some([z, y, x]),
        _ => None,
    }
}

/// The loader's normalisation of a shard channel: the z-score only, since CT shards are
/// clipped before resampling (as nnU-Net, whose B-spline overshoot is not clipped again).
pub fn normalize(n: &crate::planning::plan::Normalization) -> Normalize {
    Normalize { clip_low: f32::NEG_INFINITY, clip_high: f32::INFINITY, mean: n.mean as f32, std: n.std as f32 }
}

/// Bytes the data path's samples and batches can take at once: every buffer its
/// queues, workers and recycling pools can hold (as `DataPath::start` sizes the
/// pools), plus one batch per consumer. `queue_bytes` counts the queues alone.
pub fn datapath_bytes(cfg: &DataPathConfig) -> f64 {
    let f = |v: usize| v as f64;
    let patch: f64 = cfg.patch.iter().map(|&p| p as f64).product();
    let region: f64 = cfg.augmentation.source_region(cfg.patch).iter().map(|&p| p as f64).product();
    let c = f(cfg.channels);
    let raw = region * (4.0 * c + 1.0);
    let sample = patch * (4.0 * c + 1.0);
    let samples = f(cfg.labeled_batch) + f(cfg.unlabeled_batch);
    // Image, labels and the coarser deep-supervision labels (at most 1/7 more).
    let batch = samples * patch * 4.0 * c + f(cfg.labeled_batch) * patch * 8.0 / 7.0;
    let raw_items = f(cfg.raw_queue) + f(cfg.loaders) + f(cfg.augmenters) + 2.0;
    let sample_items = f(cfg.augmented_queue) + f(cfg.augmenters) + f(cfg.batchers) * samples + 2.0;
    let batch_items = f(cfg.batch_queue) * f(cfg.consumers) + f(cfg.batchers) + 2.0 + f(cfg.consumers);
    raw_items * raw + sample_items * sample + batch_items * batch
}
