//! Tests of the data path: batches, keyed order, crashes and redos, autotuning.

use super::*;
use cps3d_storage::{ShardInput, ShardWriter};
use std::path::Path;

/// A shard of shape `shape` whose labels hold one small cube of class 1 (rare
/// foreground) and whose image is a ramp plus the cube.
fn write_shard(dir: &Path, name: &str, shape: [usize; 3], labeled: bool, seed: usize) -> CaseSource {
    let n: usize = shape.iter().product();
    let mut image = vec![0i16; n];
    let mut labels = vec![0u8; n];
    let c = [5 + seed % 7, 9 + seed % 11, 13 + seed % 5];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let i = (z * shape[1] + y) * shape[2] + x;
                image[i] = ((z + y + x) % 200) as i16 - 100;
                if z.abs_diff(c[0]) < 2 && y.abs_diff(c[1]) < 2 && x.abs_diff(c[2]) < 2 {
                    labels[i] = 1;
                    image[i] = 500;
                }
            }
        }
    }
    let path = dir.join(format!("{name}.shard"));
    let mut input = ShardInput::new(shape, [1.0; 3], &image).with_metadata("{}");
    if labeled {
        input = input.with_labels(&labels);
    }
    ShardWriter::default().with_brick_shape([16, 16, 16]).write(&path, &input).unwrap();
    CaseSource { id: name.to_string(), path }
}

fn dataset(dir: &Path, labeled: usize, unlabeled: usize) -> (Vec<CaseSource>, Vec<CaseSource>) {
    let l = (0..labeled).map(|i| write_shard(dir, &format!("l{i}"), [40, 48, 44], true, i)).collect();
    let u = (0..unlabeled).map(|i| write_shard(dir, &format!("u{i}"), [36, 40, 40], false, i + 100)).collect();
    (l, u)
}

fn config(l: Vec<CaseSource>, u: Vec<CaseSource>) -> DataPathConfig {
    let mut c = DataPathConfig::new(l, u, [16, 20, 24]);
    c.ds_scales = vec![[1.0; 3], [0.5; 3], [0.25; 3]];
    c.normalization = vec![Normalize { clip_low: -100.0, clip_high: 400.0, mean: 0.0, std: 100.0 }];
    c.consumers = 2;
    c.log_interval = Duration::from_secs(3600);
    c
}

#[test]
fn batches_have_the_requested_shape_and_composition_and_reach_every_consumer() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 3, 4);
    let mut cfg = config(l, u);
    cfg.loaders = 2;
    cfg.augmenters = 2;
    let mut dp = DataPath::start(cfg).unwrap();
    for _ in 0..12 {
        let a = dp.next(0, Duration::from_secs(30)).expect("batch for consumer 0");
        let b = dp.next(1, Duration::from_secs(30)).expect("batch for consumer 1");
        assert!(Arc::ptr_eq(&a, &b), "both consumers share one batch");
        assert_eq!((a.labeled, a.unlabeled, a.channels), (2, 2, 1));
        assert_eq!(a.image.len(), 4 * 16 * 20 * 24);
        assert_eq!(a.labels.len(), 2 * 16 * 20 * 24);
        assert_eq!(a.ds_shapes, vec![[8, 10, 12], [4, 5, 6]]);
        assert_eq!(a.ds_labels[0].len(), 2 * 8 * 10 * 12);
        assert_eq!(a.ds_labels[1].len(), 2 * 4 * 5 * 6);
        assert!(a.labels.iter().chain(a.ds_labels.iter().flatten()).all(|&v| v <= 1), "no ignore label left");
        assert!(a.image.iter().all(|v| v.is_finite()));
        assert!(a.cases[..2].iter().all(|c| c.starts_with('l')) && a.cases[2..].iter().all(|c| c.starts_with('u')));
    }
    let t = dp.stop();
    assert!(t.stages.iter().all(|s| s.items > 0 && s.errors == 0 && s.restarts == 0), "{}", t.render());
}

#[test]
fn the_last_labeled_sample_of_every_batch_is_centred_on_foreground_as_in_nnunet() {
    // nnU-Net forces sample i of a batch of B iff i ≥ round(B·(1 − 0.33)): with 2 labeled
    // samples exactly the second, never none, whatever the number of workers.
    let tmp = tempfile::tempdir().unwrap();
    let (l, _) = dataset(tmp.path(), 4, 0);
    for (loaders, augmenters, labeled) in [(1, 1, 2), (2, 2, 2), (1, 2, 3)] {
        let mut cfg = config(l.clone(), Vec::new());
        cfg.unlabeled_batch = 0;
        cfg.labeled_batch = labeled;
        cfg.consumers = 1;
        (cfg.loaders, cfg.augmenters) = (loaders, augmenters);
        cfg.augmentation = crate::augment::AugmentConfig::none();
        let want: Vec<bool> = (0..labeled).map(|i| forced_slot(i, labeled, 0.33)).collect();
        let mut dp = DataPath::start(cfg).unwrap();
        let pn = 16 * 20 * 24;
        let (mut random_with_fg, mut random) = (0, 0);
        for _ in 0..120 {
            let b = dp.next(0, Duration::from_secs(30)).unwrap();
            assert_eq!(b.forced_foreground, want, "{loaders} loaders, {augmenters} augmenters");
            for (s, &forced) in want.iter().enumerate() {
                let has_fg = b.labels[s * pn..(s + 1) * pn].contains(&1);
                if forced {
                    assert!(has_fg, "a forced sample holds foreground");
                } else {
                    random += 1;
                    random_with_fg += has_fg as usize;
                }
            }
        }
        dp.stop();
        // A random patch rarely meets the small cube.
        assert!((random_with_fg as f64) < 0.5 * random as f64, "{random_with_fg} of {random}");
    }
}

#[test]
fn a_panicking_augmenter_is_restarted_and_the_run_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 2, 2);
    let mut cfg = config(l, u);
    cfg.consumers = 1;
    cfg.fault = Some(FaultInjection { stage: Stage::Augmenter, every: 7 });
    let mut dp = DataPath::start(cfg).unwrap();
    for i in 0..15 {
        assert!(dp.next(0, Duration::from_secs(30)).is_some(), "batch {i}");
    }
    let t = dp.stop();
    let aug = t.stages.iter().find(|s| s.name == "augmenter").unwrap();
    assert!(aug.restarts >= 3, "{}", t.render());
    assert!(dp.failure().is_none());
}

#[test]
fn a_corrupt_brick_is_reported_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut l, u) = dataset(tmp.path(), 2, 2);
    // Corrupt every image brick of a third labeled shard.
    let bad = write_shard(tmp.path(), "corrupt", [40, 48, 44], true, 3);
    let shard = cps3d_storage::Shard::open(&bad.path).unwrap();
    let bricks = shard.brick_counts().iter().product::<usize>();
    let mut bytes = std::fs::read(&bad.path).unwrap();
    for i in 0..bricks {
        let (off, len) = shard.brick_location(cps3d_storage::Stream::Image, 0, i).unwrap();
        bytes[(off + len as u64 / 2) as usize] ^= 0x5a;
    }
    drop(shard);
    std::fs::write(&bad.path, bytes).unwrap();
    l.push(bad);
    let mut cfg = config(l, u);
    cfg.consumers = 1;
    let mut dp = DataPath::start(cfg).unwrap();
    for _ in 0..20 {
        let b = dp.next(0, Duration::from_secs(30)).expect("batches keep coming");
        assert!(!b.cases.contains(&"corrupt".to_string()));
    }
    let t = dp.stop();
    let loader = t.stages.iter().find(|s| s.name == "loader").unwrap();
    assert!((1..=3).contains(&loader.errors), "errors {} (the shard is dropped after 3)", loader.errors);
    assert!(dp.failure().is_none());
}

#[test]
fn only_corrupt_shards_fail_the_run_instead_of_spinning() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = write_shard(tmp.path(), "bad", [40, 48, 44], true, 1);
    let len = std::fs::metadata(&bad.path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&bad.path).unwrap();
    f.set_len(len / 2).unwrap();
    let mut cfg = config(vec![bad], Vec::new());
    cfg.unlabeled_batch = 0;
    cfg.consumers = 1;
    let mut dp = DataPath::start(cfg).unwrap();
    assert!(dp.next(0, Duration::from_secs(20)).is_none());
    let reason = dp.failure().expect("failure reported");
    assert!(reason.contains("failed 3 times") && reason.contains("bad.shard"), "{reason}");
    dp.stop();
}

#[test]
fn with_every_unlabeled_shard_corrupt_the_failure_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, _) = dataset(tmp.path(), 2, 0);
    let bad: Vec<CaseSource> = (0..3)
        .map(|i| {
            let c = write_shard(tmp.path(), &format!("u{i}"), [36, 40, 40], false, i);
            let len = std::fs::metadata(&c.path).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&c.path).unwrap().set_len(len / 2).unwrap();
            c
        })
        .collect();
    let mut cfg = config(l, bad);
    cfg.consumers = 1;
    cfg.loaders = 2;
    let mut dp = DataPath::start(cfg).unwrap();
    let start = std::time::Instant::now();
    assert!(dp.next(0, Duration::from_secs(30)).is_none());
    assert!(start.elapsed() < Duration::from_secs(20));
    let reason = dp.failure().expect("failure reported");
    for i in 0..3 {
        assert!(reason.contains(&format!("u{i}.shard")), "{reason}");
    }
    assert!(reason.contains("every unlabeled shard"), "{reason}");
    dp.stop();
}

#[test]
fn several_batchers_hand_every_consumer_the_same_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 2, 2);
    let mut cfg = config(l, u);
    (cfg.loaders, cfg.augmenters, cfg.batchers) = (2, 2, 3);
    cfg.augmentation = crate::augment::AugmentConfig::none();
    let mut dp = DataPath::start(cfg).unwrap();
    // Two fast consumers on their own threads, as the trainers.
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let rx = dp.consumer(i);
            std::thread::spawn(move || {
                (0..150).map(|_| rx.recv_timeout(Duration::from_secs(30)).unwrap().index).collect::<Vec<u64>>()
            })
        })
        .collect();
    let seen: Vec<Vec<u64>> = readers.into_iter().map(|h| h.join().unwrap()).collect();
    dp.stop();
    assert_eq!(seen[0], seen[1], "both consumers get the same batches in the same order");
    assert!(seen[0].windows(2).all(|w| w[1] == w[0] + 1), "numbered in the order handed out");
}

#[test]
fn a_worker_that_panics_on_every_item_fails_the_path_instead_of_restarting_forever() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 2, 2);
    let mut cfg = config(l, u);
    cfg.consumers = 1;
    cfg.fault = Some(FaultInjection { stage: Stage::Augmenter, every: 1 });
    let mut dp = DataPath::start(cfg).unwrap();
    let start = std::time::Instant::now();
    assert!(dp.next(0, Duration::from_secs(60)).is_none());
    assert!(start.elapsed() < Duration::from_secs(30), "gave up in {:?}", start.elapsed());
    let reason = dp.failure().expect("failure reported");
    assert!(reason.contains("augmenter workers crashed") && reason.contains("injected fault"), "{reason}");
    dp.stop();
}

#[test]
fn stopping_mid_run_never_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 2, 2);
    for (loaders, augmenters, batchers) in [(1, 1, 1), (2, 2, 2)] {
        let mut cfg = config(l.clone(), u.clone());
        (cfg.loaders, cfg.augmenters, cfg.batchers) = (loaders, augmenters, batchers);
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let mut dp = DataPath::start(cfg).unwrap();
            dp.next(0, Duration::from_secs(30)).unwrap();
            // Nobody reads any more: every queue fills and every producer blocks.
            std::thread::sleep(Duration::from_millis(500));
            dp.stop();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(30)).expect("stop returned");
    }
}

#[test]
fn same_seed_with_one_worker_per_stage_gives_identical_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 3, 3);
    let run = |seed: u64| {
        let mut cfg = config(l.clone(), u.clone());
        cfg.consumers = 1;
        cfg.seed = seed;
        let mut dp = DataPath::start(cfg).unwrap();
        let out: Vec<(Vec<u32>, Vec<u8>, Vec<String>)> = (0..6)
            .map(|_| {
                let b = dp.next(0, Duration::from_secs(30)).unwrap();
                (b.image.iter().map(|v| v.to_bits()).collect(), b.labels.clone(), b.cases.clone())
            })
            .collect();
        dp.stop();
        out
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43));
}

#[test]
fn bad_configurations_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, _) = dataset(tmp.path(), 1, 0);
    let cfg = config(l, Vec::new());
    let e = DataPath::start(cfg).err().unwrap();
    assert!(e.contains("no unlabeled shards"), "{e}");
}

#[test]
fn workers_added_and_removed_while_running_lose_no_batch_and_consumers_stay_in_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 3, 4);
    let dp = DataPath::start(config(l, u)).unwrap();
    assert_eq!(dp.workers(), [1, 1, 1]);
    let mut next_index = 0;
    let mut take = |n: usize| {
        for _ in 0..n {
            let a = dp.next(0, Duration::from_secs(30)).expect("batch for consumer 0");
            let b = dp.next(1, Duration::from_secs(30)).expect("batch for consumer 1");
            assert!(Arc::ptr_eq(&a, &b), "both consumers get the same batch");
            assert_eq!(a.index, next_index, "batches arrive numbered without a gap");
            assert_eq!((a.labeled, a.unlabeled), (2, 2));
            next_index += 1;
        }
    };
    take(3);
    for (loaders, augmenters) in [(3, 1), (3, 2), (1, 2), (1, 1), (2, 3)] {
        dp.set_workers(Stage::Loader, loaders).unwrap();
        dp.set_workers(Stage::Augmenter, augmenters).unwrap();
        assert_eq!(dp.workers(), [loaders, augmenters, 1]);
        take(4);
        let t = dp.telemetry();
        assert_eq!((t.stages[0].workers, t.stages[1].workers), (loaders, augmenters));
    }
    assert!(dp.set_workers(Stage::Batcher, 2).unwrap_err().contains("batchers"));
    assert!(dp.set_workers(Stage::Loader, 0).unwrap_err().contains("at least one loader"));
    // Retired workers have left: only the live ones (2 + 3 + 1) and the coordinator remain.
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = || dp.shared.handles.lock().unwrap().iter().filter(|h| !h.is_finished()).count();
    while running() > 6 && Instant::now() < deadline {
        take(1);
    }
    assert_eq!(running(), 6, "retired workers' threads ended");
}

#[test]
fn the_autotuner_fills_a_starved_path_up_to_its_budget_and_keeps_batches_in_step() {
    use super::autotune::{AutotuneConfig, Autotuner};
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 3, 4);
    // Consumers that take every batch at once: always starved, so the tuner grows the path.
    // Patches large enough that the path, not the consumers' wake-ups, sets the pace even
    // on a loaded machine (small ones run at ~2000 batches/s and fill the queue then).
    let mut cfg = config(l, u);
    cfg.patch = [32, 40, 40];
    let dp = DataPath::start(cfg).unwrap();
    let cfg = AutotuneConfig { cores: 3, interval: Duration::from_millis(150) };
    let tuner = Autotuner::start(dp.control(), cfg, |_| {});
    let mut next_index = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tuner.decisions().len() < 2 && Instant::now() < deadline {
        let a = dp.next(0, Duration::from_secs(30)).unwrap();
        let b = dp.next(1, Duration::from_secs(30)).unwrap();
        assert!(Arc::ptr_eq(&a, &b) && a.index == next_index, "batch {} after {next_index}", a.index);
        next_index += 1;
    }
    let decisions = tuner.stop();
    assert!(decisions.len() >= 2, "{decisions:?}");
    for d in &decisions {
        assert!(d.to.iter().all(|&n| n >= 1) && d.to[0] + d.to[1] <= 4, "within the budget: {d:?}");
        // Grown because starved, or a change undone because it measured slower.
        assert!(d.batches_per_s > 0.0, "{d:?}");
        assert!((d.batch_queue < 0.5 && d.reason.contains("starved")) || d.reason.starts_with("undo"), "{d:?}");
    }
    let first = &decisions[0];
    assert_eq!(first.from, [1, 1]);
    assert_eq!(first.to[0] + first.to[1], 3, "a starved path under its budget grows: {first:?}");
    let w = dp.workers();
    assert_eq!([w[0], w[1]], decisions.last().unwrap().to, "the path runs what the tuner decided last");
}

#[test]
fn the_autotuner_removes_workers_the_consumers_do_not_need() {
    use super::autotune::{AutotuneConfig, Autotuner};
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 3, 4);
    let mut cfg = config(l, u);
    cfg.loaders = 2;
    cfg.augmenters = 1;
    let dp = DataPath::start(cfg).unwrap();
    // Nobody takes batches: once the batch queues are full, a loader is one too many.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dp.telemetry().stages[2].items < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let tuner =
        Autotuner::start(dp.control(), AutotuneConfig { cores: 2, interval: Duration::from_millis(150) }, |_| {});
    let deadline = Instant::now() + Duration::from_secs(30);
    while tuner.decisions().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let decisions = tuner.stop();
    let first = decisions.first().expect("a decision");
    assert_eq!((first.from, first.to), ([2, 1], [1, 1]), "{first:?}");
    assert!(first.reason.contains("full"), "{first:?}");
    // The batches still come, in order, from where they stood.
    for i in 0..3 {
        assert_eq!(dp.next(0, Duration::from_secs(30)).unwrap().index, i);
    }
}

/// The first `n` batches of a path, as (sample images, labels, cases, forced) per batch.
fn batches(cfg: DataPathConfig, n: usize) -> Vec<(Vec<Vec<f32>>, Vec<Vec<u8>>, Vec<String>, Vec<bool>)> {
    let per_sample: usize = cfg.patch.iter().product::<usize>() * cfg.channels;
    let mut dp = DataPath::start(cfg).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let b = dp.next(0, Duration::from_secs(30)).expect("a batch");
        let _ = dp.next(1, Duration::from_secs(30));
        assert_eq!(b.index, i as u64, "keyed batches come in number order");
        let images = b.image.chunks(per_sample).map(<[f32]>::to_vec).collect();
        let labels = b.labels.chunks(per_sample / b.channels).map(<[u8]>::to_vec).collect();
        out.push((images, labels, b.cases.clone(), b.forced_foreground.clone()));
    }
    dp.stop();
    out
}

#[test]
fn keyed_batches_split_over_ranks_are_the_one_process_batches_whatever_the_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let (l, u) = dataset(tmp.path(), 3, 4);
    let keyed = |rank: usize, world: usize, per_rank: (usize, usize), workers: usize| {
        let mut c = config(l.clone(), u.clone());
        (c.labeled_batch, c.unlabeled_batch) = per_rank;
        (c.loaders, c.augmenters, c.batchers) = (workers, workers, 2);
        c.seed = 42;
        c.global = Some(GlobalBatch { rank, world });
        c
    };
    let n = 6;
    let one = batches(keyed(0, 1, (2, 2), 1), n);
    let again = batches(keyed(0, 1, (2, 2), 3), n);
    assert_eq!(one, again, "the same batches with 1 or 3 loaders and augmenters");
    let ranks = [batches(keyed(0, 2, (1, 1), 2), n), batches(keyed(1, 2, (1, 1), 1), n)];
    for b in 0..n {
        let (images, labels, cases, forced) = &one[b];
        // One process: labeled slots 0, 1 then unlabeled 0, 1; rank r: labeled r, unlabeled r.
        for r in 0..2 {
            let (ri, rl, rc, rf) = &ranks[r][b];
            assert_eq!(ri, &vec![images[r].clone(), images[2 + r].clone()], "batch {b}, rank {r}: images");
            assert_eq!(rl, &vec![labels[r].clone()], "batch {b}, rank {r}: labels");
            assert_eq!(rc, &vec![cases[r].clone(), cases[2 + r].clone()], "batch {b}, rank {r}: cases");
            assert_eq!(rf, &vec![forced[r], forced[2 + r]], "batch {b}, rank {r}: foreground");
        }
        // nnU-Net's oversampling applies to the global batch: its second labeled slot.
        assert_eq!(forced[..2], [false, true], "batch {b}");
    }
    // Workers that crash now and then (restarted by the coordinator) lose the sample they
    // hold; it is made again, and the batches are the same.
    for stage in [Stage::Loader, Stage::Augmenter] {
        let mut c = keyed(0, 1, (2, 2), 2);
        c.fault = Some(FaultInjection { stage, every: 5 });
        assert_eq!(batches(c, n), one, "with a {} crashing every 5 items", stage.name());
    }
    let distinct: std::collections::BTreeSet<&String> = one.iter().flat_map(|b| &b.2).collect();
    assert!(distinct.len() > 3, "samples vary: {distinct:?}");
}
