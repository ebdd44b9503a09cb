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

/// The seed of sample `slot` (of the global batch) of batch `batch`: keyed batches draw
/// each sample from its own stream, whichever worker makes it.
fn sample_seed(seed: u64, batch: u64, slot: usize) -> u64 {
    seed_for(seed ^ batch.wrapping_mul(0xD6E8_FEB8_6659_FD93), 3, slot, 0)
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
                Stage::Batcher if sh.cfg.global.is_some() => keyed_batcher(&sh),
                Stage::Batcher => batcher(&sh),
            }));
            if let Err(p) = r {
                let msg = panic_message(p.as_ref());
                let lost = sh.in_hand.lock().unwrap_or_else(|e| e.into_inner()).remove(&(stage.index(), id));
                if let Some(n) = lost {
                    sh.redo.lock().unwrap_or_else(|e| e.into_inner()).push_front(n);
                }
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
    let mut keyed_rng;
    // A retired loader leaves here, between items: what it read has been sent on.
    while !sh.stopping() && !retire.load(Ordering::Relaxed) {
        let t = Instant::now();
        // Labeled and unlabeled in the batch's proportion, in a fixed order; the slot
        // decides nnU-Net's foreground oversampling.
        let (key, labeled, wants_foreground, rng) = match cfg.global {
            None => {
                let slot = (k % per_batch) as usize;
                let labeled = slot < cfg.labeled_batch;
                k += 1;
                (None, labeled, labeled && forced_slot(slot, cfg.labeled_batch, cfg.oversample_foreground), &mut rng)
            }
            Some(g) => {
                // This rank's next sample, or one to do again; its place in the global batch
                // decides everything drawn for it.
                let redo = sh.redo.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let n = redo.unwrap_or_else(|| sh.next_sample.fetch_add(1, Ordering::Relaxed));
                hold(sh, Stage::Loader, id, Some(n));
                let (batch, local) = (n / per_batch, (n % per_batch) as usize);
                let labeled = local < cfg.labeled_batch;
                let slot = if labeled {
                    g.rank * cfg.labeled_batch + local
                } else {
                    g.world * cfg.labeled_batch + g.rank * cfg.unlabeled_batch + (local - cfg.labeled_batch)
                };
                keyed_rng = Pcg64Mcg::seed_from_u64(sample_seed(cfg.seed, batch, slot));
                let global_labeled = g.world * cfg.labeled_batch;
                let forced = labeled && forced_slot(slot, global_labeled, cfg.oversample_foreground);
                (Some(n), labeled, forced, &mut keyed_rng)
            }
        };
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
        let draw = planner.draw(&mut *rng);
        let result = cache.get(if labeled { idx } else { idx + cfg.labeled.len() }, &list[idx]).and_then(|shard| {
            let voxel = if wants_foreground { foreground_voxel(&shard, &mut *rng) } else { None };
            let origin = region_origin(shard.shape(), planner.region(), cfg.patch, voxel, &mut *rng);
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
                key,
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
                hold(sh, Stage::Loader, id, None);
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
                if let Some(n) = key {
                    // The slot must still be filled: again, from the shards still sampled.
                    hold(sh, Stage::Loader, id, None);
                    sh.redo.lock().unwrap_or_else(|e| e.into_inner()).push_front(n);
                }
                consecutive_failures += 1;
                if consecutive_failures >= CONSECUTIVE_FAILURE_LIMIT {
                    sh.fail(format!("{consecutive_failures} reads in a row failed; last: {e}"));
                    return;
                }
            }
        }
    }
}

/// Records the keyed sample a worker holds (None: it has handed it on).
fn hold(sh: &Shared, stage: Stage, id: usize, n: Option<u64>) {
    if sh.cfg.global.is_none() {
        return;
    }
    let mut held = sh.in_hand.lock().unwrap_or_else(|e| e.into_inner());
    match n {
        Some(n) => held.insert((stage.index(), id), n),
        None => held.remove(&(stage.index(), id)),
    };
}

fn augmenter(sh: &Shared, id: usize, retire: &AtomicBool) {
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
        if let Some(n) = raw.key {
            hold(sh, Stage::Augmenter, id, Some(n));
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
            key: raw.key,
            case: raw.case,
            labeled: raw.labeled,
            wants_foreground: raw.wants_foreground,
            forced_foreground: raw.forced_foreground,
            sample,
        };
        if !send(sh, &sh.augmented.0, out, stats) {
            return;
        }
        hold(sh, Stage::Augmenter, id, None);
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
        let mut batch = assemble(sh, take);
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

/// A batch of these samples, in this order, numbered later.
fn assemble(sh: &Shared, take: Vec<AugmentedSample>) -> Batch {
    let cfg = &sh.cfg;
    let (bl, bu) = (cfg.labeled_batch, cfg.unlabeled_batch);
    let pn: usize = cfg.patch.iter().product();
    let ds_shapes = ds_shapes_of(cfg);
    // Buffers of a batch every consumer has dropped come back through the pool.
    let (mut image, mut labels, mut ds_labels) = sh.batch_pool.1.try_recv().unwrap_or_default();
    image.clear();
    labels.clear();
    ds_labels.resize_with(ds_shapes.len(), Vec::new);
    ds_labels.iter_mut().for_each(Vec::clear);
    image.reserve((bl + bu) * cfg.channels * pn);
    let mut batch = Batch {
        index: 0, // numbered by the batcher that hands it out
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
    batch
}

/// How long the keyed batcher waits for the next batch's missing samples, while later
/// ones arrive, before it has them made again (a worker that crashed took them along).
const REDO_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The batcher of keyed batches: samples go to their batch and slot, and batches are
/// handed out complete and in number order, each numbered by its place in the epoch.
fn keyed_batcher(sh: &Shared) {
    let cfg = &sh.cfg;
    let stats = sh.telemetry.stage("batcher");
    let per_batch = (cfg.labeled_batch + cfg.unlabeled_batch) as u64;
    let mut pending: std::collections::BTreeMap<u64, Vec<Option<AugmentedSample>>> = Default::default();
    let (mut next, mut handled) = (0u64, 0u64);
    let mut waiting_since = Instant::now();
    loop {
        let t = Instant::now();
        let got: Option<AugmentedSample> = select! {
            recv(sh.augmented.1) -> r => match r { Ok(s) => Some(s), Err(_) => return },
            recv(sh.stop_rx) -> _ => return,
            default(std::time::Duration::from_millis(200)) => None,
        };
        stats.add_recv_blocked(t);
        if sh.stopping() {
            return;
        }
        if let Some(s) = got {
            let n = s.key.expect("keyed batches carry their sample number");
            let (b, slot) = (n / per_batch, (n % per_batch) as usize);
            let place = (b >= next).then(|| pending.entry(b).or_insert_with(|| (0..per_batch).map(|_| None).collect()));
            match place {
                Some(v) if v[slot].is_none() => v[slot] = Some(s),
                // A sample made twice (it was slow, not lost): the first one counts.
                _ => {
                    let _ = sh.sample_pool.0.try_send(s.sample);
                }
            }
        }
        while pending.get(&next).is_some_and(|v| v.iter().all(Option::is_some)) {
            let t = Instant::now();
            let samples: Vec<AugmentedSample> =
                pending.remove(&next).unwrap_or_default().into_iter().flatten().collect();
            let mut batch = assemble(sh, samples);
            batch.index = next;
            handled += 1;
            maybe_fault(sh, Stage::Batcher, handled);
            stats.add_busy(t);
            stats.items.fetch_add(1, Ordering::Relaxed);
            let batch = Arc::new(batch);
            for out in &sh.outputs {
                if !send(sh, out, batch.clone(), stats) {
                    return;
                }
            }
            next += 1;
            waiting_since = Instant::now();
        }
        let later_arrived = pending.keys().next_back().is_some_and(|&b| b > next);
        if later_arrived && waiting_since.elapsed() > REDO_AFTER {
            let have = pending.get(&next);
            let missing: Vec<u64> = (0..per_batch)
                .filter(|&s| have.is_none_or(|v| v[s as usize].is_none()))
                .map(|s| next * per_batch + s)
                .collect();
            tracing::warn!("batch {next}: {} sample(s) missing for {REDO_AFTER:?}; making them again", missing.len());
            sh.redo.lock().unwrap_or_else(|e| e.into_inner()).extend(missing);
            waiting_since = Instant::now();
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
