//! Hostile file systems: a shard truncated while it is open, symlink loops and FIFOs under a shard
//! folder. Each must end in an error or a finite answer, never a crash or a hang.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use cps3d_storage::{find_shards, verify_dir, ReadMode, Scratch, Shard, ShardInput, ShardWriter, StorageError};

use common::make_case;

fn write_case(dir: &Path, name: &str, shape: [usize; 3]) -> PathBuf {
    let case = make_case(shape, 1, 7);
    let path = dir.join(name);
    let input = ShardInput::new(shape, [1.0; 3], &case.image).with_labels(&case.labels).with_metadata("{}");
    ShardWriter::default().with_brick_shape([8, 8, 8]).write(&path, &input).unwrap();
    path
}

/// Runs `f` on another thread and fails the test if it has not finished after `secs`: a hang
/// must fail, not stall the suite.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

const CHILD_ENV: &str = "CPS3D_STORAGE_TRUNCATE_CHILD";

/// The child half of `a_shard_truncated_while_mapped_is_an_error_not_sigbus`: opens the shard,
/// truncates it, reads. A SIGBUS kills this process, which the parent sees.
#[test]
fn truncate_while_mapped_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else { return };
    let path = PathBuf::from(path);
    let shard = Shard::open(&path).unwrap();
    let shape = shard.shape();
    let n: usize = shape.iter().product();
    let classes: Vec<u8> = shard.classes().iter().map(|c| c.class).collect();
    assert!(!classes.is_empty());
    // Keep the header only: every brick and the footer now lie past the end of the file.
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(200).unwrap();
    let mut scratch = Scratch::new();
    let image = shard.read_image_region(&mut scratch, [0; 3], shape, 0, &mut vec![0; n]);
    let labels = shard.read_label_region(&mut scratch, [0; 3], shape, 0, &mut vec![0; n]);
    // The class locations were read at open; they must still be readable (not mapped bytes).
    let located: usize = classes.iter().map(|&c| shard.class_locations(c).iter().count()).sum();
    println!("image: {image:?}");
    println!("labels: {labels:?}");
    println!("locations read: {located}");
    assert!(matches!(image, Err(StorageError::Changed { expected, actual: 200, .. }) if expected == shard.file_len()));
    assert!(matches!(labels, Err(StorageError::Changed { .. })));
    let message = image.unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()) && message.contains("changed"), "{message}");
    println!("CHILD OK");
}

#[test]
fn a_shard_truncated_while_mapped_is_an_error_not_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    // Large enough that bricks lie many pages past the truncation point.
    let path = write_case(dir.path(), "big.shard", [48, 64, 64]);
    assert!(fs::metadata(&path).unwrap().len() > 64 * 1024);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "truncate_while_mapped_child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed ({:?}; a signal means SIGBUS): {text}", out.status);
    assert!(text.contains("CHILD OK"), "{text}");
}

/// Shards on NFS, Lustre and the like are read with pread: what another host does to the
/// file while it is open (truncate it, rewrite it in place) is an error for that shard.
#[test]
fn pread_reads_the_same_voxels_and_turns_truncation_and_rewrites_into_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_case(dir.path(), "nfs.shard", [24, 32, 32]);
    let mapped = Shard::open_with(&path, Some(ReadMode::Mapped)).unwrap();
    let pread = Shard::open_with(&path, Some(ReadMode::Pread)).unwrap();
    assert_eq!((mapped.read_mode(), pread.read_mode()), (ReadMode::Mapped, ReadMode::Pread));
    let n = 24 * 32 * 32;
    let (mut a, mut b) = (vec![0i16; n], vec![0i16; n]);
    mapped.read_image_region(&mut Scratch::new(), [0; 3], [24, 32, 32], 0, &mut a).unwrap();
    pread.read_image_region(&mut Scratch::new(), [0; 3], [24, 32, 32], 0, &mut b).unwrap();
    assert_eq!(a, b);
    drop(mapped);
    // Rewritten in place, same length: every brick's checksum now disagrees.
    let len = fs::metadata(&path).unwrap().len();
    let mut bytes = fs::read(&path).unwrap();
    for v in &mut bytes[200..(len as usize - 200)] {
        *v ^= 0x5A;
    }
    fs::write(&path, &bytes).unwrap();
    let r = pread.read_image_region(&mut Scratch::new(), [0; 3], [24, 32, 32], 0, &mut b);
    assert!(matches!(r, Err(StorageError::BrickChecksum { .. })), "{r:?}");
    // Truncated: no signal, the length change named.
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(200).unwrap();
    let r = pread.read_label_region(&mut Scratch::new(), [0; 3], [24, 32, 32], 0, &mut vec![0u8; n]);
    assert!(matches!(r, Err(StorageError::Changed { expected, actual: 200, .. }) if expected == len), "{r:?}");
}

#[test]
fn a_shard_grown_while_open_is_an_error_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_case(dir.path(), "a.shard", [16, 16, 16]);
    let shard = Shard::open(&path).unwrap();
    let len = shard.file_len();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len + 10).unwrap();
    let n = 16 * 16 * 16;
    let r = shard.read_image_region(&mut Scratch::new(), [0; 3], [16; 3], 0, &mut vec![0; n]);
    assert!(matches!(r, Err(StorageError::Changed { expected, actual, .. }) if expected == len && actual == len + 10));
}

#[test]
fn symlink_loops_end_and_count_each_shard_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("shards");
    fs::create_dir_all(root.join("unlabeled")).unwrap();
    let a = write_case(&root, "a.shard", [9, 9, 9]);
    let b = write_case(&root, "b.shard", [9, 9, 9]);
    let c = write_case(&root.join("unlabeled"), "c.shard", [9, 9, 9]);
    // Two loops make the walk exponential when links are followed blindly.
    std::os::unix::fs::symlink("..", root.join("unlabeled/up")).unwrap();
    std::os::unix::fs::symlink(".", root.join("unlabeled/here")).unwrap();
    std::os::unix::fs::symlink("..", root.join("unlabeled/up2")).unwrap();
    // A link to a shard elsewhere is found (a folder of links verifies), a link to one already
    // listed is not counted again.
    let elsewhere = write_case(dir.path(), "d.shard", [9, 9, 9]);
    std::os::unix::fs::symlink(&elsewhere, root.join("d.shard")).unwrap();
    std::os::unix::fs::symlink(&a, root.join("unlabeled/a_again.shard")).unwrap();

    let r = root.clone();
    let found = within(30, "find_shards", move || find_shards(&r)).unwrap();
    assert_eq!(found, [a.clone(), b.clone(), root.join("d.shard"), c.clone()]);
    let r = root.clone();
    let results = within(30, "verify_dir", move || verify_dir(&r));
    assert_eq!(results.len(), 4, "{results:?}");
    assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
}

#[test]
fn a_fifo_named_like_a_shard_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("x.shard");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success(), "mkfifo");
    let p = fifo.clone();
    let r = within(20, "Shard::open on a FIFO", move || Shard::open(&p));
    let message = r.unwrap_err().to_string();
    assert!(message.contains(&fifo.display().to_string()) && message.contains("not a regular file"), "{message}");
    let d = dir.path().to_path_buf();
    let results = within(20, "verify_dir with a FIFO", move || verify_dir(&d));
    assert_eq!(results.len(), 1);
    assert!(results[0].1.is_err());
}
