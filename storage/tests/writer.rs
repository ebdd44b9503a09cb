//! Class locations and the writer's atomicity.

mod common;

use std::fs;
use std::path::Path;

use cps3d_storage::{
    locations_to_keep, sample_class_locations, verify_shard, ClassSample, Shard, ShardInput, ShardWriter, StorageError,
};

use common::make_case;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

#[test]
fn stored_locations_carry_their_class_and_respect_the_cap() {
    let shape = [40, 50, 60];
    let n = 40 * 50 * 60;
    // Class 1: every other voxel (60,000); class 2: 3,000 voxels; class 3: a single voxel.
    let mut labels: Vec<u8> = (0..n).map(|i| if i % 2 == 0 { 1 } else { 0 }).collect();
    for i in 0..3_000 {
        labels[2 * i + 1] = 2;
    }
    labels[n - 1] = 3;
    let image = vec![0i16; n];
    let dir = tempfile::tempdir().unwrap();
    for cap in [10_000, 500, 0] {
        let path = dir.path().join(format!("cap{cap}.shard"));
        let input = ShardInput::new(shape, [1.0; 3], &image).with_labels(&labels);
        ShardWriter::default().with_location_cap(cap).write(&path, &input).unwrap();
        let shard = Shard::open(&path).unwrap();
        let counts: Vec<(u8, u64, usize)> = shard.classes().iter().map(|c| (c.class, c.voxels, c.sampled)).collect();
        let keep = |v| locations_to_keep(v, cap, 0.01) as usize;
        assert_eq!(counts, [(1, 60_000, keep(60_000)), (2, 3_000, keep(3_000)), (3, 1, keep(1))]);
        if cap == 10_000 {
            assert_eq!(keep(60_000), 10_000);
            assert_eq!(keep(3_000), 3_000, "all kept below the cap");
        }
        if cap == 500 {
            assert_eq!(keep(60_000), 600, "1% of the class wins over a smaller cap");
        }
        for info in shard.classes() {
            let locations = shard.class_locations(info.class);
            assert_eq!(locations.len(), info.sampled);
            for [z, y, x] in locations.iter() {
                assert_eq!(labels[(z * shape[1] + y) * shape[2] + x], info.class);
            }
        }
        assert!(shard.class_locations(4).is_empty());
        verify_shard(&path).unwrap();
    }
}

#[test]
fn precomputed_locations_are_stored_as_given() {
    let case = make_case([20, 21, 22], 1, 8);
    let samples = sample_class_locations(&case.labels, 50, 0.0, 99);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.shard");
    let input =
        ShardInput::new(case.shape, [1.0; 3], &case.image).with_labels(&case.labels).with_class_locations(&samples);
    ShardWriter::default().write(&path, &input).unwrap();
    let shard = Shard::open(&path).unwrap();
    for s in &samples {
        let stored = shard.class_locations(s.class);
        let linear: Vec<u32> = (0..stored.len()).map(|i| stored.linear(i).unwrap()).collect();
        assert_eq!(linear, s.locations);
    }

    // A location that does not carry its class is refused before anything is written.
    let mut wrong = samples.clone();
    let background = case.labels.iter().position(|&l| l == 0).unwrap() as u32;
    wrong[0].locations = vec![background];
    let input =
        ShardInput::new(case.shape, [1.0; 3], &case.image).with_labels(&case.labels).with_class_locations(&wrong);
    let err = ShardWriter::default().write(&dir.path().join("w.shard"), &input).unwrap_err();
    assert!(matches!(err, StorageError::InvalidInput { .. }), "{err}");
    let missing = vec![ClassSample { class: 1, voxels: 1, locations: vec![] }];
    let input =
        ShardInput::new(case.shape, [1.0; 3], &case.image).with_labels(&case.labels).with_class_locations(&missing);
    assert!(ShardWriter::default().write(&dir.path().join("w.shard"), &input).is_err());
    assert_eq!(names(dir.path()), ["p.shard"]);
}

#[test]
fn failed_writes_leave_nothing_behind() {
    let case = make_case([8, 9, 10], 1, 2);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("x.shard");
    let input = ShardInput::new(case.shape, [1.0; 3], &case.image).with_labels(&case.labels);

    for bad in [ShardWriter::default().with_brick_shape([0, 4, 4]), ShardWriter::default().with_zstd_level(99)] {
        assert!(matches!(bad.write(&target, &input).unwrap_err(), StorageError::InvalidInput { .. }));
    }
    let short = ShardInput::new(case.shape, [1.0; 3], &case.image[1..]);
    assert!(matches!(ShardWriter::default().write(&target, &short).unwrap_err(), StorageError::InvalidInput { .. }));
    let nan = ShardInput::new(case.shape, [f64::NAN, 1.0, 1.0], &case.image);
    assert!(ShardWriter::default().write(&target, &nan).is_err());
    assert!(names(dir.path()).is_empty());

    // An I/O failure after the temporary file is written: the rename onto a non-empty directory.
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), "x").unwrap();
    let err = ShardWriter::default().write(&target, &input).unwrap_err();
    assert!(matches!(err, StorageError::Io { op: "renaming the temporary file", .. }), "{err}");
    assert_eq!(names(dir.path()), ["x.shard"]);
    assert!(target.is_dir());

    // A missing directory fails before creating anything.
    let err = ShardWriter::default().write(&dir.path().join("no/such/dir.shard"), &input).unwrap_err();
    assert!(matches!(err, StorageError::Io { .. }), "{err}");
    assert_eq!(names(dir.path()), ["x.shard"]);
}

#[test]
fn rewriting_replaces_the_old_shard_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.shard");
    let a = make_case([8, 8, 8], 1, 1);
    let b = make_case([5, 6, 7], 1, 2);
    ShardWriter::default().write(&path, &ShardInput::new(a.shape, [1.0; 3], &a.image).with_metadata("a")).unwrap();
    let old = Shard::open(&path).unwrap();
    ShardWriter::default().write(&path, &ShardInput::new(b.shape, [1.0; 3], &b.image).with_metadata("b")).unwrap();
    // The old mapping still sees the old file; a new open sees the new one.
    assert_eq!((old.shape(), old.metadata()), ([8, 8, 8], "a"));
    let new = Shard::open(&path).unwrap();
    assert_eq!((new.shape(), new.metadata()), ([5, 6, 7], "b"));
    assert_eq!(names(dir.path()), ["r.shard"]);
}
