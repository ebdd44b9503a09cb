//! Small helpers shared by the pipeline stages.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes JSON atomically: temporary file in the same folder, fsync, rename.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::json(path, e))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes a file atomically: temporary file in the same folder, fsync, rename; no
/// partial file is left behind on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{}-{name}", std::process::id()));
    // Errors name the file asked for, not the temporary one.
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::write(path, e))?;
        f.write_all(bytes).map_err(|e| Error::write(path, e))?;
        f.sync_all().map_err(|e| Error::write(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::write(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An exclusive lock on a folder (`DIR/.lock`), held while the value lives: a second
/// process is refused at once instead of both writing into it.
pub struct FolderLock {
    _file: std::fs::File,
}

impl FolderLock {
    pub fn exclusive(dir: &Path, what: &str) -> Result<FolderLock> {
        Self::take(dir, what, true)
    }

    /// A shared lock: readers together, but not while a writer holds it.
    pub fn shared(dir: &Path, what: &str) -> Result<FolderLock> {
        Self::take(dir, what, false)
    }

    fn take(dir: &Path, what: &str, exclusive: bool) -> Result<FolderLock> {
        use fs4::fs_std::FileExt;
        let path = dir.join(".lock");
        if !dir.is_dir() {
            return Err(Error::invalid(dir, format!("{what}: no such folder")));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let taken = if exclusive { FileExt::try_lock_exclusive(&file) } else { FileExt::try_lock_shared(&file) };
        match taken {
            Ok(true) => Ok(FolderLock { _file: file }),
            Ok(false) => Err(Error::invalid(
                dir,
                format!("{what}: another cps3d process holds {} (wait for it, or use another folder)", path.display()),
            )),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// Keeps freed memory in the process instead of returning it to the kernel at once.
///
/// A training step allocates and frees the same tens of megabytes of activations every
/// time; with glibc's defaults (buffers over its adaptive mmap threshold mapped and
/// unmapped, heap tops trimmed) each step faults all of them in again: 2.5 M page
/// faults and ~6% of the CPU time in 60 demo steps, 0.18 M with these settings. Peak
/// memory is unchanged; what a step frees is reused by the next. Returns whether glibc
/// accepted every setting (elsewhere: nothing to do, `true`).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads start.
        unsafe {
            // 32 MiB: glibc's largest mmap threshold (larger values are refused).
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_TOP_PAD, 256 << 20) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most worker threads one pool may start: beyond 64 per core they only cost
/// memory, and tens of thousands fail to spawn. One limit for every worker count
/// (`-j`, data-path actors, libtorch threads), from the command line or a `train.json`.
pub fn max_workers() -> usize {
    (64 * cores()).min(1024)
}

/// `n` when it is a worker count in 1..=[`max_workers`], else why not.
pub fn check_workers(n: usize) -> std::result::Result<usize, String> {
    let max = max_workers();
    if n == 0 || n > max {
        return Err(format!(
            "{n} is not in 1..={max}: at least 1, at most 64 per core ({} cores here) and 1024 in all",
            cores()
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocator_accepts_the_settings_that_keep_freed_memory() {
        assert!(keep_freed_memory());
    }

    #[test]
    fn a_locked_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let held = FolderLock::exclusive(dir.path(), "training").unwrap();
        let e = FolderLock::exclusive(dir.path(), "training").err().unwrap().to_string();
        assert!(e.contains("another cps3d process holds") && e.contains(".lock"), "{e}");
        assert!(FolderLock::shared(dir.path(), "reading").is_err());
        drop(held);
        let _a = FolderLock::shared(dir.path(), "reading").unwrap();
        let _b = FolderLock::shared(dir.path(), "reading").unwrap();
        assert!(FolderLock::exclusive(dir.path(), "writing").is_err());
        let gone = dir.path().join("gone");
        let e = FolderLock::shared(&gone, "reading the shards").err().unwrap().to_string();
        assert_eq!(e, format!("{}: reading the shards: no such folder", gone.display()));
    }
}
