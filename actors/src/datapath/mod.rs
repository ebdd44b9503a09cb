//! The streaming data path: loader → augmenter → batcher workers joined by bounded
//! crossbeam channels, supervised by an actix coordinator.
//!
//! ```text
//! shards ─> Loader ×L ─[raw]─> Augmenter ×A ─[augmented]─> Batcher ×B ─[batches]─┬─> consumer 1
//!                                                                                  └─> consumer 2
//! ```
//!
//! A full channel blocks its producer: memory is bounded by the capacities times the
//! item sizes, whatever the number of scans. Loaders draw the augmentation of each
//! sample up front, so they read only the region that draw needs (the bare patch for
//! the ~64% of samples without rotation or scaling). Each batch reaches every
//! consumer as the same `Arc`, never copied.

pub mod autotune;
mod sampler;
mod stages;
mod supervisor;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::augment::Sample;
use crate::telemetry::{QueueStats, Snapshot, StageStats, Telemetry};

mod batch;
mod config;

pub(crate) use batch::{AugmentedSample, RawBuffers, RawSample};
pub use batch::{Batch, BatchBuffers, ReadFailure};
pub use config::{shard_sources, DataPathConfig, FaultInjection, GlobalBatch, Normalize, Stage};
pub use sampler::{forced_per_batch, forced_slot, region_bounds, region_origin, CaseSource};

/// Read failures per shard (`(labeled, index)`): how many and the last error, and the
/// shards no longer sampled.
#[derive(Default)]
pub(crate) struct Exclusions {
    pub errors: std::collections::HashMap<(bool, usize), (u32, String)>,
    pub excluded: std::collections::HashSet<(bool, usize)>,
}

/// Everything the workers share. Master copies of every channel end live here, so
/// no channel disconnects while a crashed worker is being replaced.
pub(crate) struct Shared {
    pub cfg: DataPathConfig,
    pub stop: AtomicBool,
    pub stop_rx: Receiver<()>,
    pub raw: (Sender<RawSample>, Receiver<RawSample>),
    pub augmented: (Sender<AugmentedSample>, Receiver<AugmentedSample>),
    pub outputs: Vec<Sender<Arc<Batch>>>,
    /// Recycled buffers, so steady state allocates nothing per sample.
    pub raw_pool: (Sender<RawBuffers>, Receiver<RawBuffers>),
    pub sample_pool: (Sender<Sample>, Receiver<Sample>),
    pub batch_pool: (Sender<BatchBuffers>, Receiver<BatchBuffers>),
    pub telemetry: Arc<Telemetry>,
    pub batch_counter: AtomicU64,
    /// Keyed batches: the next sample number to claim, and numbers to do again (their
    /// sample was lost with a crashed worker; a duplicate is dropped by the batcher).
    pub next_sample: AtomicU64,
    pub redo: Mutex<std::collections::VecDeque<u64>>,
    /// Keyed batches: the sample number each (stage, worker id) holds, so that a worker's
    /// crash has its sample made again at once.
    pub in_hand: Mutex<std::collections::HashMap<(usize, usize), u64>>,
    /// Held while a batch is handed to every consumer (see the batcher).
    pub fanout: Mutex<()>,
    /// Shards that failed, and those no longer sampled: shared by the loaders.
    pub exclusions: Mutex<Exclusions>,
    pub handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub fatal: Mutex<Option<String>>,
    pub coordinator: Mutex<Option<supervisor::CoordinatorHandle>>,
    /// Per stage, the live workers by id, each with the flag that retires it (set when
    /// the stage shrinks; the worker leaves after handing on its current item).
    pub live: Mutex<[std::collections::BTreeMap<usize, Arc<AtomicBool>>; 3]>,
    /// Per stage, the next worker id (ids are never reused, so each worker's RNG stream is new).
    pub next_id: [AtomicU64; 3],
}

impl Shared {
    /// The retire flag of a live worker; `None` once it has been retired.
    pub(crate) fn retire_flag(&self, stage: Stage, id: usize) -> Option<Arc<AtomicBool>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())[stage.index()].get(&id).cloned()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn fail(&self, reason: String) {
        tracing::error!("data path stopped: {reason}");
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(reason);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A running data path. Dropping it stops it.
pub struct DataPath {
    shared: Arc<Shared>,
    stop_tx: Option<Sender<()>>,
    consumers: Vec<Receiver<Arc<Batch>>>,
}

impl DataPath {
    pub fn start(mut cfg: DataPathConfig) -> Result<DataPath, String> {
        cfg.validate()?;
        if cfg.global.is_some() {
            // Keyed batches are put together in number order, by one batcher (it only copies).
            cfg.batchers = 1;
        }
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let mut outputs = Vec::new();
        let mut consumers = Vec::new();
        for _ in 0..cfg.consumers {
            let (tx, rx) = bounded(cfg.batch_queue.max(1));
            outputs.push(tx);
            consumers.push(rx);
        }
        let telemetry = Arc::new(Telemetry::new(
            vec![
                StageStats::new("loader", cfg.loaders),
                StageStats::new("augmenter", cfg.augmenters),
                StageStats::new("batcher", cfg.batchers),
            ],
            vec![
                QueueStats::new("raw", cfg.raw_queue.max(1)),
                QueueStats::new("augmented", cfg.augmented_queue.max(1)),
                QueueStats::new("batches", cfg.batch_queue.max(1)),
            ],
        ));
        let pool_cap = cfg.raw_queue + cfg.loaders + cfg.augmenters + 2;
        let shared_batch_cap = cfg.batch_queue * cfg.consumers + cfg.batchers + 2;
        let sample_cap =
            cfg.augmented_queue + cfg.augmenters + cfg.batchers * (cfg.labeled_batch + cfg.unlabeled_batch) + 2;
        let shared = Arc::new(Shared {
            raw: bounded(cfg.raw_queue.max(1)),
            augmented: bounded(cfg.augmented_queue.max(1)),
            outputs,
            raw_pool: bounded(pool_cap),
            sample_pool: bounded(sample_cap),
            batch_pool: bounded(shared_batch_cap),
            cfg,
            stop: AtomicBool::new(false),
            stop_rx,
            telemetry,
            batch_counter: AtomicU64::new(0),
            next_sample: AtomicU64::new(0),
            redo: Mutex::new(Default::default()),
            in_hand: Mutex::new(Default::default()),
            fanout: Mutex::new(()),
            exclusions: Mutex::new(Exclusions::default()),
            handles: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            coordinator: Mutex::new(None),
            live: Mutex::new(Default::default()),
            next_id: Default::default(),
        });
        let coordinator = supervisor::start(shared.clone())?;
        *shared.coordinator.lock().unwrap_or_else(|e| e.into_inner()) = Some(coordinator);
        let path = DataPath { shared, stop_tx: Some(stop_tx), consumers };
        for (stage, n) in [
            (Stage::Loader, path.shared.cfg.loaders),
            (Stage::Augmenter, path.shared.cfg.augmenters),
            (Stage::Batcher, path.shared.cfg.batchers),
        ] {
            path.grow(stage, n);
        }
        Ok(path)
    }

    /// A handle that changes worker counts while the path runs (see [`Control::set_workers`]).
    pub fn control(&self) -> Control {
        Control { shared: self.shared.clone() }
    }

    fn grow(&self, stage: Stage, n: usize) {
        self.control().grow(stage, n);
    }

    /// Live workers of each stage: loaders, augmenters, batchers.
    pub fn workers(&self) -> [usize; 3] {
        self.control().workers()
    }

    /// See [`Control::set_workers`].
    pub fn set_workers(&self, stage: Stage, n: usize) -> Result<(), String> {
        self.control().set_workers(stage, n)
    }

    /// The receiving end for consumer `i` (each consumer sees every batch).
    pub fn consumer(&self, i: usize) -> Receiver<Arc<Batch>> {
        self.consumers[i].clone()
    }

    /// Waits for the next batch of consumer `i`; `None` when the path stopped or
    /// failed (see [`DataPath::failure`]) or on timeout.
    pub fn next(&self, i: usize, timeout: Duration) -> Option<Arc<Batch>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(b) = self.consumers[i].recv_timeout(Duration::from_millis(100)) {
                return Some(b);
            }
            if self.shared.stopping() || Instant::now() >= deadline {
                return None;
            }
        }
    }

    pub fn telemetry(&self) -> Snapshot {
        self.shared.telemetry.summary()
    }

    /// The live counters, which outlive the path (monitoring reads them at any time).
    pub fn telemetry_handle(&self) -> Arc<Telemetry> {
        self.shared.telemetry.clone()
    }

    /// Shards that failed to read so far, in case order: how often, the last error, and
    /// whether they are no longer sampled. Training reports them, so that a case left
    /// out is said, not only logged.
    pub fn read_failures(&self) -> Vec<ReadFailure> {
        let ex = self.shared.exclusions.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ReadFailure> = ex
            .errors
            .iter()
            .map(|(&(labeled, idx), (n, e))| {
                let list = if labeled { &self.shared.cfg.labeled } else { &self.shared.cfg.unlabeled };
                ReadFailure {
                    case: list[idx].id.clone(),
                    path: list[idx].path.clone(),
                    failures: *n,
                    last_error: e.clone(),
                    excluded: ex.excluded.contains(&(labeled, idx)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.case.cmp(&b.case));
        out
    }

    pub fn failure(&self) -> Option<String> {
        self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops every worker: in-flight items are dropped, blocked sends and receives
    /// wake up, threads are joined. Returns the final telemetry.
    pub fn stop(&mut self) -> Snapshot {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.stop_tx.take(); // disconnects the stop channel: every select wakes
        if let Some(c) = self.shared.coordinator.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.shutdown();
        }
        loop {
            let handles: Vec<_> = std::mem::take(&mut *self.shared.handles.lock().unwrap_or_else(|e| e.into_inner()));
            if handles.is_empty() {
                break;
            }
            for h in handles {
                let _ = h.join();
            }
        }
        self.shared.telemetry.summary()
    }
}

/// Changes a running path's worker counts; usable from another thread (the autotuner).
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// Starts workers of `stage` until it has `n`.
    fn grow(&self, stage: Stage, n: usize) {
        let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        while live[stage.index()].len() < n {
            let id = self.shared.next_id[stage.index()].fetch_add(1, Ordering::Relaxed) as usize;
            let retire = Arc::new(AtomicBool::new(false));
            live[stage.index()].insert(id, retire.clone());
            stages::spawn(self.shared.clone(), stage, id, 0, retire);
        }
    }

    /// Live workers of each stage: loaders, augmenters, batchers.
    pub fn workers(&self) -> [usize; 3] {
        let live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
        [live[0].len(), live[1].len(), live[2].len()]
    }

    /// Changes the number of loader or augmenter workers while the path runs. New
    /// workers start at once; removed ones (the newest) finish and hand on the item
    /// they hold, then leave, so no sample is lost. Batches are numbered and fanned out
    /// by the batchers whatever the other stages do: every consumer still sees the same
    /// contiguous sequence.
    pub fn set_workers(&self, stage: Stage, n: usize) -> Result<(), String> {
        if stage == Stage::Batcher {
            return Err("the number of batchers is fixed while the path runs".into());
        }
        if n == 0 {
            return Err(format!("a running data path needs at least one {}", stage.name()));
        }
        if self.shared.stopping() {
            return Err("the data path has stopped".into());
        }
        {
            let mut live = self.shared.live.lock().unwrap_or_else(|e| e.into_inner());
            while live[stage.index()].len() > n {
                if let Some((_, retire)) = live[stage.index()].pop_last() {
                    retire.store(true, Ordering::Relaxed);
                }
            }
        }
        self.grow(stage, n);
        self.shared.telemetry.stage(stage.name()).workers.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// The path's live counters.
    pub fn telemetry(&self) -> &Telemetry {
        &self.shared.telemetry
    }

    /// Capacity of each consumer's batch queue.
    pub fn batch_queue_capacity(&self) -> usize {
        self.shared.cfg.batch_queue.max(1)
    }

    pub fn stopping(&self) -> bool {
        self.shared.stopping()
    }
}

impl Drop for DataPath {
    fn drop(&mut self) {
        if self.stop_tx.is_some() {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests;
