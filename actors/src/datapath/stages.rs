//! The worker loops of the three stages. Each runs on its own thread, blocks on
//! bounded channels (with the stop channel in every `select!`), and reports busy and
//! blocked time. A panic ends the thread; the coordinator starts a replacement.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{select, Sender};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use super::sampler::{forced_per_batch, forced_slot, foreground_voxel, region_origin, ShardCache};
use super::{AugmentedSample, Batch, RawSample, Shared, Stage};
use crate::augment::{Augmenter, IGNORE_LABEL};
use crate::pool::panic_message;

/// SplitMix64 over the run seed, the stage, the worker and its generation.
fn seed_for(seed: u64, stage: u64, id: usize, generation: u32) -> u64 {
    let mut z = seed ^ (stage << 56) ^ ((id as u64) << 32) ^ generation as u64;
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Starts worker `id` of `stage` (its `generation`-th incarnation).
pub(crate) fn spawn(shared: Arc<Shared>, stage: Stage, id: usize, generation: u32, retire: Arc<AtomicBool>) {
    let sh = shared.clone();
    let handle = std::thread::Builder::new()
        .name(format!("{}-{id}", stage.name()))
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| match stage {
                Stage::Loader => loader(&sh, id, generation, &retire),
                Stage::Augmenter => augmenter(&sh, id, &retire),
                Stage::Batcher => batcher(&sh),
            }));
            if let Err(p) = r {
                let msg = panic_message(p.as_ref());
                sh.telemetry.stage(stage.name()).restarts.fetch_add(1, Ordering::Relaxed);
                if !sh.stopping() {
                    if let Some(c) = sh.coordinator.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        c.worker_down(stage, id, generation, msg);
                    }
                }
            }
        })
        .expect("spawning a data-path thread");
    let mut handles = shared.handles.lock().unwrap_or_else(|e| e.into_inner());
    // Threads of crashed workers are done: their handles need not pile up.
    handles.retain(|h| !h.is_finished());
    handles.push(handle);
}

/// Sends unless the path is stopping; false when it is.
fn send<T>(sh: &Shared, tx: &Sender<T>, item: T, stats: &crate::telemetry::StageStats) -> bool {
    let t = Instant::now();
    let sent = select! {
        send(tx, item) -> r => r.is_ok(),
        recv(sh.stop_rx) -> _ => false,
    };
    stats.add_send_blocked(t);
    sent && !sh.stopping()
}

fn maybe_fault(sh: &Shared, stage: Stage, handled: u64) {
    if let Some(f) = sh.cfg.fault {
        if f.stage == stage && f.every > 0 && handled > 0 && handled % f.every == 0 {
            panic!("injected fault in {} after {handled} items", stage.name());
        }
    }
}

/// Errors on one shard before the loader stops sampling it.
const SHARD_ERROR_LIMIT: u32 = 3;
/// Failed reads in a row after which the data path gives up instead of spinning.
const CONSECUTIVE_FAILURE_LIMIT: u32 = 200;

fn loader(sh: &Shared, id: usize, generation: u32, retire: &AtomicBool) {
    let cfg = &sh.cfg;
    let stats = sh.telemetry.stage("loader");
    let mut rng = Pcg64Mcg::seed_from_u64(seed_for(cfg.seed, 1, id, generation));
    // Only to draw augmentations and size regions: it holds no buffers.
    let planner = Augmenter::new(cfg.augmentation, cfg.patch, cfg.channels, &[]).expect("validated at start");
    let mut cache = ShardCache::new(cfg.open_shards_per_loader);
    let mut scratch = cps3d_storage::Scratch::new();
    let per_batch = (cfg.labeled_batch + cfg.unlabeled_batch) as u64;
    let (mut k, mut handled, mut consecutive_failures) = (0u64, 0u64, 0u32);
    // A retired loader leaves here, between items: what it read has been sent on.
    while !sh.stopping() && !retire.load(Ordering::Relaxed) {
        let t = Instant::now();
        // Labeled and unlabeled in the batch's proportion, in a fixed order; the slot
        // decides nnU-Net's foreground oversampling.
        let slot = (k % per_batch) as usize;
        let labeled = slot < cfg.labeled_batch;
        k += 1;
        let wants_foreground = labeled && forced_slot(slot, cfg.labeled_batch, cfg.oversample_foreground);
        let list = if labeled { &cfg.labeled } else { &cfg.unlabeled };
        // Uniform over the shards still sampled; the list is built only once some are
        // excluded (shared by all loaders, and kept when a loader is restarted).
        let idx = {
            let ex = sh.exclusions.lock().unwrap_or_else(|e| e.into_inner());
            if ex.excluded.is_empty() {
                rng.random_range(0..list.len())
            } else {
                let live: Vec<usize> = (0..list.len()).filter(|i| !ex.excluded.contains(&(labeled, *i))).collect();
                if live.is_empty() {
                    let kind = if labeled { "labeled" } else { "unlabeled" };
                    let failed: Vec<String> = (0..list.len())
                        .map(|i| {
                            let last = ex.errors.get(&(labeled, i)).map(|e| e.1.as_str()).unwrap_or("");
                            format!("{} ({last})", list[i].path.display())
                        })
                        .collect();
                    drop(ex);
                    sh.fail(format!("every {kind} shard failed {SHARD_ERROR_LIMIT} times: {}", failed.join("; ")));
                    return;
                }
                live[rng.random_range(0..live.len())]
            }
        };
        let draw = planner.draw(&mut rng);
        let result = cache.get(if labeled { idx } else { idx + cfg.labeled.len() }, &list[idx]).and_then(|shard| {
            let voxel = if wants_foreground { foreground_voxel(&shard, &mut rng) } else { None };
            let origin = region_origin(shard.shape(), planner.region(), cfg.patch, voxel, &mut rng);
            // Only the part of nnU-Net's region this draw samples.
            let sb = planner.source_box(&draw);
            let rorigin: [i64; 3] = std::array::from_fn(|a| origin[a] + sb.offset[a] as i64);
            let region = sb.shape;
            let rn: usize = region.iter().product();
            let (mut image, mut labels) = sh.raw_pool.1.try_recv().unwrap_or_default();
            image.resize(rn * cfg.channels, 0.0);
            // NaN marks padding; it becomes 0 after normalisation (nnU-Net pads with 0).
            shard.read_image_region_f32(&mut scratch, rorigin, region, f32::NAN, &mut image)?;
            for (c, norm) in cfg.normalization.iter().enumerate() {
                for v in &mut image[c * rn..(c + 1) * rn] {
                    *v = if v.is_nan() { 0.0 } else { norm.apply(*v) };
                }
            }
            if labeled {
                labels.resize(rn, 0);
                shard.read_label_region(&mut scratch, rorigin, region, IGNORE_LABEL, &mut labels)?;
            } else {
                labels.clear();
            }
            Ok(RawSample {
                case: idx,
                labeled,
                wants_foreground,
                forced_foreground: voxel.is_some(),
                region,
                centre: sb.centre,
                image,
                labels,
                draw,
            })
        });
        match result {
            Ok(sample) => {
                consecutive_failures = 0;
                handled += 1;
                maybe_fault(sh, super::Stage::Loader, handled);
                stats.add_busy(t);
                stats.items.fetch_add(1, Ordering::Relaxed);
                if !send(sh, &sh.raw.0, sample, stats) {
                    return;
                }
            }
            Err(e) => {
                stats.add_busy(t);
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("loader {id}: {e}; sample skipped");
                let mut ex = sh.exclusions.lock().unwrap_or_else(|e| e.into_inner());
                let entry = ex.errors.entry((labeled, idx)).or_insert((0, String::new()));
                entry.0 += 1;
                entry.1 = e.to_string();
                let n = entry.0;
                if n >= SHARD_ERROR_LIMIT && ex.excluded.insert((labeled, idx)) {
                    tracing::warn!("loader {id}: {} failed {n} times; no longer sampled", list[idx].path.display());
                }
                drop(ex);
                consecutive_failures += 1;
                if consecutive_failures >= CONSECUTIVE_FAILURE_LIMIT {
                    sh.fail(format!("{consecutive_failures} reads in a row failed; last: {e}"));
                    return;
                }
            }
        }
    }
}

fn augmenter(sh: &Shared, _id: usize, retire: &AtomicBool) {
    let cfg = &sh.cfg;
    let stats = sh.telemetry.stage("augmenter");
    let mut aug =
        Augmenter::new(cfg.augmentation, cfg.patch, cfg.channels, &cfg.ds_scales).expect("validated at start");
    let mut handled = 0u64;
    // A retired augmenter leaves here, between items: what it augmented has been sent on.
    while !retire.load(Ordering::Relaxed) {
        let t = Instant::now();
        let raw: RawSample = select! {
            recv(sh.raw.1) -> r => match r { Ok(r) => r, Err(_) => return },
            recv(sh.stop_rx) -> _ => return,
        };
        stats.add_recv_blocked(t);
        if sh.stopping() {
            return;
        }
        let t = Instant::now();
        if crate::faults::injected("augmenter-panic").is_some() {
            panic!("injected augmenter panic");
        }
        let mut sample = sh.sample_pool.1.try_recv().unwrap_or_default();
        let mut raw = raw;
        if raw.region == cfg.patch && !raw.draw.spatial() {
            // The loader read exactly the patch: take its buffers, no copy.
            std::mem::swap(&mut sample.image, &mut raw.image);
            std::mem::swap(&mut sample.labels, &mut raw.labels);
            aug.apply_in_place(&raw.draw, &mut sample);
        } else {
            let labels = if raw.labeled { Some(raw.labels.as_slice()) } else { None };
            aug.apply(&raw.draw, raw.region, raw.centre, &raw.image, labels, &mut sample);
        }
        let _ = sh.raw_pool.0.try_send((raw.image, raw.labels));
        handled += 1;
        maybe_fault(sh, Stage::Augmenter, handled);
        stats.add_busy(t);
        stats.items.fetch_add(1, Ordering::Relaxed);
        let out = AugmentedSample {
            case: raw.case,
            labeled: raw.labeled,
            wants_foreground: raw.wants_foreground,
            forced_foreground: raw.forced_foreground,
            sample,
        };
        if !send(sh, &sh.augmented.0, out, stats) {
            return;
        }
    }
}

fn batcher(sh: &Shared) {
    let cfg = &sh.cfg;
    let stats = sh.telemetry.stage("batcher");
    let (bl, bu) = (cfg.labeled_batch, cfg.unlabeled_batch);
    // nnU-Net's batch: random labeled samples first, the foreground-forced ones last.
    let forced = forced_per_batch(bl, cfg.oversample_foreground);
    let need = [bl - forced, forced, bu];
    // Samples of a kind beyond this wait no longer: bounded even if production skews.
    let keep = 4 * (bl + bu).max(1);
    // Queues: labeled random slots, labeled forced slots, unlabeled.
    let mut queues: [VecDeque<AugmentedSample>; 3] = Default::default();
    let pn: usize = cfg.patch.iter().product();
    let mut handled = 0u64;
    loop {
        while (0..3).any(|q| queues[q].len() < need[q]) {
            let t = Instant::now();
            let s: AugmentedSample = select! {
                recv(sh.augmented.1) -> r => match r { Ok(s) => s, Err(_) => return },
                recv(sh.stop_rx) -> _ => return,
            };
            stats.add_recv_blocked(t);
            if sh.stopping() {
                return;
            }
            let q = &mut queues[if !s.labeled {
                2
            } else if s.wants_foreground {
                1
            } else {
                0
            }];
            q.push_back(s);
            if q.len() > keep {
                if let Some(old) = q.pop_front() {
                    let _ = sh.sample_pool.0.try_send(old.sample);
                }
            }
        }
        let t = Instant::now();
        let [random, forced_q, unlabeled] = &mut queues;
        let take: Vec<AugmentedSample> =
            random.drain(..need[0]).chain(forced_q.drain(..need[1])).chain(unlabeled.drain(..need[2])).collect();
        let ds_shapes = ds_shapes_of(cfg);
        // Buffers of a batch every consumer has dropped come back through the pool.
        let (mut image, mut labels, mut ds_labels) = sh.batch_pool.1.try_recv().unwrap_or_default();
        image.clear();
        labels.clear();
        ds_labels.resize_with(ds_shapes.len(), Vec::new);
        ds_labels.iter_mut().for_each(Vec::clear);
        image.reserve((bl + bu) * cfg.channels * pn);
        let mut batch = Batch {
            index: 0, // numbered when handed out, below
            patch: cfg.patch,
            channels: cfg.channels,
            labeled: bl,
            unlabeled: bu,
            image,
            labels,
            ds_labels,
            ds_shapes,
            cases: Vec::with_capacity(bl + bu),
            forced_foreground: Vec::with_capacity(bl + bu),
            recycle: Some(sh.batch_pool.0.clone()),
        };
        for s in &take {
            batch.image.extend_from_slice(&s.sample.image);
            let list = if s.labeled { &cfg.labeled } else { &cfg.unlabeled };
            batch.cases.push(list[s.case].id.clone());
            batch.forced_foreground.push(s.forced_foreground);
            if s.labeled {
                batch.labels.extend_from_slice(&s.sample.labels);
                for (d, l) in batch.ds_labels.iter_mut().zip(&s.sample.ds_labels) {
                    d.extend_from_slice(l);
                }
            }
        }
        for s in take {
            let _ = sh.sample_pool.0.try_send(s.sample);
        }
        handled += 1;
        maybe_fault(sh, Stage::Batcher, handled);
        stats.add_busy(t);
        stats.items.fetch_add(1, Ordering::Relaxed);
        // One batcher at a time hands a batch to every consumer, numbered in that order:
        // with several batchers, every consumer still sees the same sequence.
        let _turn = sh.fanout.lock().unwrap_or_else(|e| e.into_inner());
        batch.index = sh.batch_counter.fetch_add(1, Ordering::Relaxed);
        let batch = Arc::new(batch);
        for out in &sh.outputs {
            if !send(sh, out, batch.clone(), stats) {
                return;
            }
        }
    }
}

fn ds_shapes_of(cfg: &super::DataPathConfig) -> Vec<[usize; 3]> {
    cfg.ds_scales
        .iter()
        .skip(1)
        .map(|s| std::array::from_fn(|a| ((cfg.patch[a] as f64 * s[a]).round() as usize).max(1)))
        .collect()
}
