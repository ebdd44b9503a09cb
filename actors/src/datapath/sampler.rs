//! Which case and where: nnU-Net's sampling, and a small cache of open shards.

use std::path::PathBuf;
use std::sync::Arc;

use cps3d_storage::{Shard, StorageError};
use rand::Rng;

/// A preprocessed case: its id and shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseSource {
    pub id: String,
    pub path: PathBuf,
}

/// The least recently used shards stay mapped; the rest are unmapped, so resident
/// memory does not grow with the number of scans streamed through.
pub(crate) struct ShardCache {
    capacity: usize,
    /// (case key, shard, last use).
    open: Vec<(usize, Arc<Shard>, u64)>,
    clock: u64,
}

impl ShardCache {
    pub fn new(capacity: usize) -> ShardCache {
        ShardCache { capacity: capacity.max(1), open: Vec::new(), clock: 0 }
    }

    pub fn get(&mut self, key: usize, source: &CaseSource) -> Result<Arc<Shard>, StorageError> {
        self.clock += 1;
        if let Some(e) = self.open.iter_mut().find(|e| e.0 == key) {
            e.2 = self.clock;
            return Ok(e.1.clone());
        }
        let shard = Arc::new(Shard::open(&source.path)?);
        if self.open.len() >= self.capacity {
            let oldest = (0..self.open.len()).min_by_key(|&i| self.open[i].2).unwrap_or(0);
            self.open.swap_remove(oldest);
        }
        self.open.push((key, shard.clone(), self.clock));
        Ok(shard)
    }
}

/// Whether sample `slot` of a batch of `batch` labeled samples must contain
/// foreground: nnU-Net's `_oversample_last_XX_percent`, the last samples of every
/// batch, `slot ≥ round(batch · (1 − percent))` with Python's rounding (half to even).
pub fn forced_slot(slot: usize, batch: usize, percent: f64) -> bool {
    (slot as f64) >= (batch as f64 * (1.0 - percent)).round_ties_even()
}

/// How many of a batch's `batch` labeled samples nnU-Net forces to foreground.
pub fn forced_per_batch(batch: usize, percent: f64) -> usize {
    (0..batch).filter(|&s| forced_slot(s, batch, percent)).count()
}

/// A random stored foreground voxel: a class present in the shard uniformly, then one
/// of its stored locations uniformly (nnU-Net's choice in `get_bbox`); `None` when the
/// case has no foreground.
pub(crate) fn foreground_voxel(shard: &Shard, rng: &mut impl Rng) -> Option<[usize; 3]> {
    let classes: Vec<u8> = shard.classes().iter().filter(|c| c.sampled > 0).map(|c| c.class).collect();
    if classes.is_empty() {
        return None;
    }
    let class = classes[rng.random_range(0..classes.len())];
    let locs = shard.class_locations(class);
    if locs.is_empty() {
        return None;
    }
    locs.get(rng.random_range(0..locs.len()))
}

/// The lower corner of the enlarged region (`region`, around a patch of `patch`) in a
/// volume of `shape`, as nnU-Net's `get_bbox`: padding `region − patch` (more if the
/// volume is smaller than the region) split around the volume, the corner uniform
/// between the bounds; with a foreground voxel, the region centred there and clamped
/// only at the lower bound, as theirs. May be negative or reach past the volume
/// (padded).
pub fn region_origin(
    shape: [usize; 3],
    region: [usize; 3],
    patch: [usize; 3],
    voxel: Option<[usize; 3]>,
    rng: &mut impl Rng,
) -> [i64; 3] {
    let bounds = region_bounds(shape, region, patch);
    std::array::from_fn(|a| {
        let (lower, upper) = bounds[a];
        match voxel {
            Some(v) => lower.max(v[a] as i64 - (region[a] / 2) as i64),
            None => rng.random_range(lower..=upper),
        }
    })
}

/// The inclusive range of the region's lower corner per axis (see [`region_origin`]).
pub fn region_bounds(shape: [usize; 3], region: [usize; 3], patch: [usize; 3]) -> [(i64, i64); 3] {
    std::array::from_fn(|a| {
        let (s, r) = (shape[a] as i64, region[a] as i64);
        let mut need = r - patch[a] as i64;
        if need + s < r {
            need = r - s;
        }
        (-((need + 1) / 2), s + need / 2 + need % 2 - r)
    })
}
