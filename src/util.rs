//! Small helpers shared by the pipeline stages.

use std::path::{Path, PathBuf};

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

/// Part `index` of `count` (0-based) of a job split over processes: `--part I/N`, or a
/// Slurm job array's task among its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl Part {
    /// Whether the `i`-th case (in the dataset's order) is this part's: round robin,
    /// so that every part gets labeled and unlabeled cases alike.
    pub fn owns(&self, i: usize) -> bool {
        i % self.count == self.index
    }

    /// The file a part writes beside `out`: `OUT.part-I-of-N`.
    pub fn file(&self, out: &Path) -> PathBuf {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".part-{}-of-{}", self.index, self.count));
        out.with_file_name(name)
    }
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Part, String> {
        let bad = || format!("\"{s}\" is not I/N with 0 <= I < N (e.g. 0/3)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Part { index, count })
    }
}

/// How many parts the split whose part files lie beside `out` has (`OUT.part-I-of-N`):
/// refused when there are none, or parts of several splits.
pub fn part_count(out: &Path) -> Result<usize> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stem = format!("{}.part-", out.file_name().unwrap_or_default().to_string_lossy());
    let mut counts = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((_, n)) = name.strip_prefix(&stem).and_then(|rest| rest.split_once("-of-")) {
            if let Ok(n) = n.parse::<usize>() {
                counts.insert(n);
            }
        }
    }
    match counts.len() {
        0 => Err(Error::invalid(out, format!("no part files ({stem}I-of-N) to merge in {}", dir.display()))),
        1 => Ok(*counts.first().expect("one")),
        _ => Err(Error::invalid(
            out,
            format!(
                "parts of several splits (of {}) beside it: remove the stale ones",
                counts.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Part `part`'s file beside `out` and what it holds; a part whose file is not there
/// was not run, or did not finish (parts are written atomically).
pub fn read_part<T: serde::de::DeserializeOwned>(out: &Path, part: Part) -> Result<(PathBuf, T)> {
    let file = part.file(out);
    if !file.exists() {
        let (index, count) = (part.index, part.count);
        return Err(Error::invalid(&file, format!("missing: part {index} of {count} was not run or did not finish")));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let value = serde_json::from_str(&text).map_err(|e| Error::json(&file, e))?;
    Ok((file, value))
}

/// The part a Slurm job array task is (`SLURM_ARRAY_TASK_ID` counted from
/// `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`), if this is one.
pub fn slurm_array_part(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Option<Part>, String> {
    let number = |k: &str| -> std::result::Result<Option<usize>, String> {
        get(k).map(|v| v.trim().parse().map_err(|_| format!("{k}={v:?} is not a whole number"))).transpose()
    };
    let (Some(id), Some(count)) = (number("SLURM_ARRAY_TASK_ID")?, number("SLURM_ARRAY_TASK_COUNT")?) else {
        return Ok(None);
    };
    let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let index =
        id.checked_sub(min).ok_or_else(|| format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))?;
    if count == 0 || index >= count {
        return Err(format!(
            "SLURM_ARRAY_TASK_ID {id} (from {min}) is not one of {count} tasks: use --array=0-{} (no step)",
            count.saturating_sub(1)
        ));
    }
    Ok(Some(Part { index, count }))
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

#[cfg(test)]
mod part_tests {
    use super::*;

    #[test]
    fn parts_are_read_from_flags_and_slurm_arrays() {
        assert_eq!("2/3".parse::<Part>().unwrap(), Part { index: 2, count: 3 });
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2"] {
            assert!(bad.parse::<Part>().is_err(), "{bad}");
        }
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(slurm_array_part(env(&[])).unwrap(), None);
        let p = slurm_array_part(env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]));
        assert_eq!(p.unwrap(), Some(Part { index: 1, count: 3 }));
        let stepped = slurm_array_part(env(&[("SLURM_ARRAY_TASK_ID", "8"), ("SLURM_ARRAY_TASK_COUNT", "3")]));
        assert!(stepped.unwrap_err().contains("--array=0-2"));
        let owned: Vec<usize> = (0..7).filter(|&i| Part { index: 1, count: 3 }.owns(i)).collect();
        assert_eq!(owned, [1, 4]);
        assert_eq!(Part { index: 1, count: 3 }.file(Path::new("a/fp.json")), Path::new("a/fp.json.part-1-of-3"));
    }
}

/// The mean of the finite values (0 when there are none): pseudo-Dice over organs, some
/// of them absent (NaN) from a validation.
pub fn mean_finite(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().cloned().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        0.0
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}
