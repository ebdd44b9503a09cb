//! Whole-shard integrity checks, for `cps3d verify DIR`.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StorageError, Stream};
use crate::format::SHARD_EXTENSION;
use crate::reader::{Scratch, Shard};
use crate::summary::ShardSummary;

/// Opens a shard and checks everything in it: header and index (as `Shard::open` does), every
/// brick of every stream (checksum, decompression, size), and the class table against the labels
/// (each present class listed with its exact voxel count, each stored location carrying its
/// class).
pub fn verify_shard(path: impl AsRef<Path>) -> Result<ShardSummary> {
    let shard = Shard::open(path.as_ref())?;
    let mut scratch = Scratch::new();
    let grid = *shard.grid();
    for channel in 0..shard.channels() {
        for i in 0..grid.len() {
            shard.load_brick(&mut scratch, Stream::Image, channel, grid.coords(i))?;
        }
    }
    if shard.has_labels() {
        let shape = shard.shape();
        let mut labels = vec![0u8; shape.iter().product()];
        shard.read_label_region(&mut scratch, [0, 0, 0], shape, 0, &mut labels)?;
        check_classes(&shard, &labels)?;
    }
    Ok(shard.summary())
}

fn check_classes(shard: &Shard, labels: &[u8]) -> Result<()> {
    let mut counts = [0u64; 256];
    for &l in labels {
        counts[l as usize] += 1;
    }
    let table = shard.classes();
    let present = (1..256).filter(|&c| counts[c] > 0).count();
    let mismatch = |reason: String| StorageError::corrupt(shard.path(), reason);
    if present != table.len() {
        return Err(mismatch(format!("labels hold {present} classes, the class table lists {}", table.len())));
    }
    for info in table {
        let actual = counts[info.class as usize];
        if actual != info.voxels {
            return Err(mismatch(format!("class {} has {actual} voxels, the table says {}", info.class, info.voxels)));
        }
        let locations = shard.class_locations(info.class);
        for i in 0..locations.len() {
            let voxel = locations.linear(i).unwrap_or(u32::MAX) as usize;
            match labels.get(voxel) {
                Some(&l) if l == info.class => {}
                other => {
                    return Err(StorageError::BadLocation {
                        path: shard.path().to_path_buf(),
                        class: info.class,
                        index: i,
                        voxel: voxel as u64,
                        reason: format!("carries label {other:?}"),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Verifies every `*.shard` file under `dir` (recursively; hidden names such as the writer's
/// temporary files are skipped), sorted by path, each file once. A directory that cannot be
/// listed appears as an entry with its error, so the caller only has to look for `Err`s.
pub fn verify_dir(dir: impl AsRef<Path>) -> Vec<(PathBuf, Result<ShardSummary>)> {
    let (found, errors) = walk(dir.as_ref());
    let mut results: Vec<_> = found
        .into_iter()
        .map(|p| {
            let r = verify_shard(&p);
            (p, r)
        })
        .collect();
    results.extend(errors);
    results
}

/// The `*.shard` files under `dir`, recursively, sorted, each file once; hidden entries are
/// skipped.
pub fn find_shards(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let (found, errors) = walk(dir.as_ref());
    if let Some((_, Err(e))) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(found)
}

type WalkErrors = Vec<(PathBuf, Result<ShardSummary>)>;

/// Symlinks are followed (a folder of links to shards verifies too), but each directory is
/// entered once, by (device, inode): a link back up the tree would otherwise loop, or list the
/// same shards many times. A shard reached by two paths is kept under the first in sorted order.
fn walk(dir: &Path) -> (Vec<PathBuf>, WalkErrors) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let mut visited = HashSet::new();
    if let Ok(m) = fs::metadata(dir) {
        visited.insert((m.dev(), m.ino()));
    }
    collect_shards(dir, &mut visited, &mut found, &mut errors);
    found.sort();
    let mut seen = HashSet::new();
    // A dangling link has no inode: keep it, opening it reports the problem.
    found.retain(|p| fs::metadata(p).map_or(true, |m| seen.insert((m.dev(), m.ino()))));
    (found, errors)
}

fn collect_shards(dir: &Path, visited: &mut HashSet<(u64, u64)>, found: &mut Vec<PathBuf>, errors: &mut WalkErrors) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push((dir.to_path_buf(), Err(StorageError::io(dir, "listing the directory", e))));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                errors.push((dir.to_path_buf(), Err(StorageError::io(dir, "listing the directory", e))));
                continue;
            }
        };
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // Links are followed; a directory already entered is skipped.
        if let Some(m) = fs::metadata(&path).ok().filter(|m| m.is_dir()) {
            if visited.insert((m.dev(), m.ino())) {
                collect_shards(&path, visited, found, errors);
            }
        } else if path.extension().is_some_and(|e| e == SHARD_EXTENSION) {
            found.push(path);
        }
    }
}
