//! Damaged shards are detected, by the reader and by `verify_shard`, with errors that name the
//! shard and the brick; nothing panics and no wrong data comes back.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use cps3d_storage::{verify_dir, verify_shard, Scratch, Shard, ShardInput, ShardWriter, StorageError, Stream};

use common::{crop, make_case};

const SHAPE: [usize; 3] = [20, 24, 28];
const BRICK: [usize; 3] = [8, 8, 8];

fn write_case(dir: &Path, name: &str, shape: [usize; 3], brick: [usize; 3]) -> PathBuf {
    let case = make_case(shape, 1, 5);
    let path = dir.join(name);
    let input = ShardInput::new(shape, [1.0; 3], &case.image).with_labels(&case.labels).with_metadata("{\"case\":1}");
    ShardWriter::default().with_brick_shape(brick).write(&path, &input).unwrap();
    path
}

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0x5a;
    fs::write(path, bytes).unwrap();
}

/// Reads everything there is to read: the whole volume of each stream.
fn read_all(path: &Path) -> Result<(), StorageError> {
    let shard = Shard::open(path)?;
    let shape = shard.shape();
    let n = shape.iter().product();
    let mut scratch = Scratch::new();
    shard.read_image_region(&mut scratch, [0; 3], shape, 0, &mut vec![0; n])?;
    if shard.has_labels() {
        shard.read_label_region(&mut scratch, [0; 3], shape, 0, &mut vec![0; n])?;
    }
    Ok(())
}

#[test]
fn a_flipped_brick_byte_is_reported_with_its_brick() {
    for stream in [Stream::Image, Stream::Labels] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_case(dir.path(), "bad.shard", SHAPE, BRICK);
        let shard = Shard::open(&path).unwrap();
        // Brick (1, 2, 3) of the 3 x 3 x 4 grid.
        let index = (3 + 2) * 4 + 3;
        let (offset, len) = shard.brick_location(stream, 0, index).unwrap();
        drop(shard);
        flip(&path, offset + u64::from(len) / 2);

        let shard = Shard::open(&path).unwrap();
        let mut scratch = Scratch::new();
        let (origin, size) = ([10, 18, 26], [4, 4, 4]);
        let err = match stream {
            Stream::Image => shard.read_image_region(&mut scratch, origin, size, 0, &mut [0; 64]).unwrap_err(),
            Stream::Labels => shard.read_label_region(&mut scratch, origin, size, 0, &mut [0; 64]).unwrap_err(),
        };
        let check = |err: &StorageError| match err {
            StorageError::BrickChecksum { path: p, stream: s, index: i, coords, .. } => {
                assert_eq!((p, *s, *i, *coords), (&path, stream, index, [1, 2, 3]));
                let msg = err.to_string();
                assert!(msg.contains("bad.shard") && msg.contains(&format!("brick {index}")), "{msg}");
                assert!(msg.contains("[1, 2, 3]"), "{msg}");
            }
            other => panic!("expected a brick checksum error, got {other}"),
        };
        check(&err);
        check(&verify_shard(&path).unwrap_err());

        // Regions that miss the brick still read, and correctly.
        let case = make_case(SHAPE, 1, 5);
        let mut out = vec![0i16; 8 * 8 * 8];
        shard.read_image_region(&mut scratch, [0, 0, 0], [8, 8, 8], 0, &mut out).unwrap();
        assert_eq!(out, crop(&case.image, SHAPE, [0, 0, 0], [8, 8, 8], 0));
    }
}

#[test]
fn truncated_files_are_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_case(dir.path(), "t.shard", SHAPE, BRICK);
    let full = fs::read(&path).unwrap();
    for keep in [full.len() - 1, full.len() / 2, 200, 100, 3, 0] {
        fs::write(&path, &full[..keep]).unwrap();
        for err in [Shard::open(&path).unwrap_err(), verify_shard(&path).unwrap_err()] {
            match &err {
                StorageError::Truncated { path: p, expected, actual } => {
                    assert_eq!(p, &path);
                    assert_eq!(*actual, keep as u64);
                    assert!(*expected > *actual);
                }
                other => panic!("{keep} bytes: expected a truncation error, got {other}"),
            }
            assert!(err.to_string().contains("t.shard"), "{err}");
        }
    }
}

#[test]
fn wrong_magic_and_unsupported_version_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_case(dir.path(), "m.shard", SHAPE, BRICK);
    flip(&path, 0);
    for err in [Shard::open(&path).unwrap_err(), verify_shard(&path).unwrap_err()] {
        assert!(matches!(err, StorageError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("not a cps3d shard"), "{err}");
    }
    fs::write(&path, "just some text, not a shard at all .................................").unwrap();
    assert!(matches!(Shard::open(&path).unwrap_err(), StorageError::BadMagic { .. }));

    let path = write_case(dir.path(), "v.shard", SHAPE, BRICK);
    let mut bytes = fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(&path, bytes).unwrap();
    for err in [Shard::open(&path).unwrap_err(), verify_shard(&path).unwrap_err()] {
        match err {
            StorageError::UnsupportedVersion { found: 2, supported: 1, .. } => {}
            other => panic!("expected an unsupported version, got {other}"),
        }
    }
}

#[test]
fn corrupt_header_fields_fail_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_case(dir.path(), "h.shard", SHAPE, BRICK);
    let len = fs::metadata(&path).unwrap().len();
    // Shape, spacing, the scale, the checksum itself, the brick index and the metadata's last byte.
    for at in [24, 40, 80, 125, len - 800, len - 1] {
        let original = fs::read(&path).unwrap();
        flip(&path, at);
        for err in [Shard::open(&path).unwrap_err(), verify_shard(&path).unwrap_err()] {
            assert!(matches!(err, StorageError::HeaderChecksum { .. }), "byte {at}: {err}");
            assert!(err.to_string().contains("corrupt header"), "{err}");
        }
        fs::write(&path, original).unwrap();
    }
}

/// Every single-byte change anywhere in a small shard is caught by opening and reading it all,
/// and by `verify_shard`: nothing in the file goes unchecked.
#[test]
fn every_byte_of_the_file_is_protected() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_case(dir.path(), "all.shard", [5, 6, 7], [4, 4, 4]);
    let original = fs::read(&path).unwrap();
    let probe = dir.path().join("probe.shard");
    for at in 0..original.len() {
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        fs::write(&probe, &bytes).unwrap();
        assert!(read_all(&probe).is_err(), "flipping byte {at} went unnoticed by the reader");
        assert!(verify_shard(&probe).is_err(), "flipping byte {at} went unnoticed by verify");
    }
}

#[test]
fn verify_dir_lists_good_and_bad_shards() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_case(dir.path(), "a.shard", [9, 9, 9], [4, 4, 4]);
    fs::create_dir(dir.path().join("unlabeled")).unwrap();
    let nested = write_case(&dir.path().join("unlabeled"), "c.shard", [9, 9, 9], [4, 4, 4]);
    let bad = write_case(dir.path(), "b.shard", [9, 9, 9], [4, 4, 4]);
    let len = fs::metadata(&bad).unwrap().len();
    fs::write(&bad, &fs::read(&bad).unwrap()[..len as usize - 10]).unwrap();
    fs::write(dir.path().join("notes.txt"), "not a shard").unwrap();
    fs::write(dir.path().join(".b.shard.123.0.tmp"), "leftover").unwrap();

    let results = verify_dir(dir.path());
    let paths: Vec<&PathBuf> = results.iter().map(|(p, _)| p).collect();
    assert_eq!(paths, [&good, &bad, &nested]);
    assert!(results[0].1.is_ok());
    assert!(matches!(results[1].1, Err(StorageError::Truncated { .. })));
    let summary = results[2].1.as_ref().unwrap();
    assert_eq!(summary.shape, [9, 9, 9]);
    assert_eq!(summary.file_len, fs::metadata(&nested).unwrap().len());

    let missing = verify_dir(dir.path().join("nope"));
    assert_eq!(missing.len(), 1);
    assert!(matches!(missing[0].1, Err(StorageError::Io { .. })));
}
