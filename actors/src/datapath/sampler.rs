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

/// The patch's lower corner (may be negative or reach past the volume: padded).
///
/// Foreground: a random class present in the shard, a random stored location of it,
/// the patch centred there (nnU-Net's oversampling). Otherwise uniform over the
/// positions that keep the patch inside the volume, or centred with a random offset
/// when the volume is smaller than the patch.
pub(crate) fn patch_origin(shard: &Shard, patch: [usize; 3], foreground: bool, rng: &mut impl Rng) -> ([i64; 3], bool) {
    let shape = shard.shape();
    if foreground {
        let classes: Vec<u8> = shard.classes().iter().filter(|c| c.sampled > 0).map(|c| c.class).collect();
        if !classes.is_empty() {
            let class = classes[rng.random_range(0..classes.len())];
            let locs = shard.class_locations(class);
            if let Some(v) = locs.get(rng.random_range(0..locs.len())) {
                return (std::array::from_fn(|a| v[a] as i64 - (patch[a] / 2) as i64), true);
            }
        }
    }
    let origin = std::array::from_fn(|a| {
        let (s, p) = (shape[a] as i64, patch[a] as i64);
        if s >= p {
            rng.random_range(0..=s - p)
        } else {
            // Smaller than the patch: the volume lands anywhere inside it.
            -rng.random_range(0..=p - s)
        }
    });
    (origin, false)
}
