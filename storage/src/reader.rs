//! Memory-mapped shard reader with region reads.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Result, StorageError, Stream};
use crate::format::{
    voxel_count, BrickEntry, Grid, Header, ImageFilter, CLASS_ENTRY_LEN, HEADER_LEN, INDEX_ENTRY_LEN, LOCATION_LEN,
};
use crate::locations::{ClassInfo, ClassLocations};
use crate::summary::ShardSummary;

/// Per-thread decompression state: a zstd context and a brick buffer, both reused so that
/// steady-state reads allocate nothing. A `Scratch` can serve any number of shards.
#[derive(Default)]
pub struct Scratch {
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    brick: Vec<u8>,
    /// A brick's compressed bytes, when they are read with `pread` rather than mapped.
    compressed: Vec<u8>,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch::default()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").field("brick_capacity", &self.brick.len()).finish()
    }
}

/// An open shard. Immutable and `Send + Sync`: share it between threads with an `Arc`, each
/// thread bringing its own [`Scratch`].
pub struct Shard {
    path: PathBuf,
    /// Kept open to `fstat` it before each brick read (see [`Shard::check_unchanged`]).
    file: File,
    /// The mapping, or None when bricks are read with `pread` ([`ReadMode::Pread`]).
    map: Option<Mmap>,
    /// The file's length at open.
    len: u64,
    header: Header,
    grid: Grid,
    image_index: Vec<BrickEntry>,
    label_index: Vec<BrickEntry>,
    classes: Vec<ClassInfo>,
    /// Every class's locations, copied out of the map at open: callers hold these slices, and
    /// the footer is the first thing a truncation takes away.
    locations: Vec<u8>,
    /// Offset in `locations` of each class's first location.
    class_starts: Vec<usize>,
    metadata: String,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("shape", &self.header.shape)
            .field("brick", &self.header.brick)
            .field("has_labels", &self.header.has_labels)
            .finish_non_exhaustive()
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        crate::io_stats::closed();
    }
}

impl Shard {
    /// Maps the file and validates its header, checksum, brick index and class table. Bricks
    /// are checked when read (or all at once by [`crate::verify_shard`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Shard> {
        Shard::open_with(path, None)
    }

    /// [`Shard::open`], reading bricks as `mode` says (None: [`ReadMode::for_file`]).
    pub fn open_with(path: impl AsRef<Path>, mode: Option<ReadMode>) -> Result<Shard> {
        let path = path.as_ref();
        // Before opening: opening a FIFO would wait for a writer forever.
        let meta = std::fs::metadata(path).map_err(|e| StorageError::io(path, "opening", e))?;
        if !meta.is_file() {
            return Err(StorageError::NotAFile { path: path.into(), kind: file_kind(&meta.file_type()) });
        }
        let file = File::open(path).map_err(|e| StorageError::io(path, "opening", e))?;
        // SAFETY: shards are written once under a temporary name and renamed into place, never
        // modified afterwards; the map is only read. A shard truncated in place anyway would fault
        // a read past its new end (SIGBUS): every brick read first checks the file's length
        // (`check_unchanged`), and the header and footer are copied out at open.
        // With pread, the mapping serves only this open (header, tables and locations are
        // copied out) and is gone before the first brick is read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StorageError::io(path, "memory-mapping", e))?;
        let mode = mode.unwrap_or_else(|| ReadMode::for_file(&file));
        Shard::from_map(path.to_path_buf(), file, map, mode)
    }

    /// How this shard's bricks are read.
    pub fn read_mode(&self) -> ReadMode {
        if self.map.is_some() {
            ReadMode::Mapped
        } else {
            ReadMode::Pread
        }
    }

    fn from_map(path: PathBuf, file: File, map: Mmap, mode: ReadMode) -> Result<Shard> {
        let header = Header::parse(&path, &map)?;
        let grid = Grid::new(header.shape, header.brick);
        let bad = |reason: String| StorageError::corrupt(&path, reason);

        let footer = &map[header.footer_offset as usize..header.file_len as usize];
        let n_image = grid.len().checked_mul(header.channels);
        let n_label = if header.has_labels { grid.len() } else { 0 };
        let classes_len = header.class_count * CLASS_ENTRY_LEN;
        // Checked: a forged header with a valid checksum must still not overflow.
        let tables = n_image
            .and_then(|n| n.checked_add(n_label)?.checked_mul(INDEX_ENTRY_LEN))
            .and_then(|index| Some((index, index.checked_add(classes_len)?)))
            .filter(|&(_, tables)| (tables as u64).checked_add(header.metadata_len) <= Some(footer.len() as u64));
        let (Some(n_image), Some((index_len, _))) = (n_image, tables) else {
            return Err(bad(format!("footer of {} bytes is too short for its tables", footer.len())));
        };
        if !header.has_labels && header.class_count > 0 {
            return Err(bad("class locations without labels".into()));
        }

        let entries = |bytes: &[u8]| -> Result<Vec<BrickEntry>> {
            bytes
                .chunks_exact(INDEX_ENTRY_LEN)
                .enumerate()
                .map(|(i, b)| {
                    let e = BrickEntry::decode(b);
                    if e.offset < HEADER_LEN as u64 || e.offset.saturating_add(e.len.into()) > header.footer_offset {
                        return Err(bad(format!(
                            "brick {i} at {} (+{} bytes) lies outside the brick area",
                            e.offset, e.len
                        )));
                    }
                    Ok(e)
                })
                .collect()
        };
        let image_index = entries(&footer[..n_image * INDEX_ENTRY_LEN])?;
        let label_index = entries(&footer[n_image * INDEX_ENTRY_LEN..index_len])?;

        let voxels = voxel_count(header.shape).unwrap_or(0) as u64;
        let mut classes = Vec::with_capacity(header.class_count);
        let mut class_starts = Vec::with_capacity(header.class_count);
        let locations_at = header.footer_offset as usize + index_len + classes_len;
        let mut at = locations_at;
        for entry in footer[index_len..index_len + classes_len].chunks_exact(CLASS_ENTRY_LEN) {
            let class = entry[0];
            let sampled = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]) as usize;
            let mut total = [0u8; 8];
            total.copy_from_slice(&entry[8..16]);
            let total = u64::from_le_bytes(total);
            if class == 0 || classes.last().is_some_and(|c: &ClassInfo| c.class >= class) {
                return Err(bad(format!("class table is not strictly increasing in 1..=255 at class {class}")));
            }
            if sampled as u64 > total || total > voxels {
                return Err(bad(format!("class {class}: {sampled} locations of {total} voxels")));
            }
            classes.push(ClassInfo { class, voxels: total, sampled });
            class_starts.push(at - locations_at);
            at += sampled * LOCATION_LEN;
        }
        let metadata_at = at;
        if (metadata_at as u64).checked_add(header.metadata_len) != Some(header.file_len) {
            return Err(bad("footer size does not match its index, class table, locations and metadata".into()));
        }
        let metadata = std::str::from_utf8(&map[metadata_at..])
            .map_err(|e| bad(format!("metadata is not UTF-8: {e}")))?
            .to_owned();

        let locations = map[locations_at..metadata_at].to_vec();
        let len = map.len() as u64;
        let shard = Shard {
            path,
            file,
            map: (mode == ReadMode::Mapped).then_some(map),
            len,
            header,
            grid,
            image_index,
            label_index,
            classes,
            locations,
            class_starts,
            metadata,
        };
        crate::io_stats::opened();
        for c in &shard.classes {
            shard.check_locations(c.class)?;
        }
        Ok(shard)
    }

    /// Checks that a class's locations are strictly increasing voxel indices inside the volume.
    fn check_locations(&self, class: u8) -> Result<()> {
        let locations = self.class_locations(class);
        let voxels = self.grid.shape.iter().product::<usize>() as u64;
        let mut previous = None;
        for i in 0..locations.len() {
            let l = u64::from(locations.linear(i).unwrap_or(u32::MAX));
            let reason = if l >= voxels {
                "lies outside the volume"
            } else if previous.is_some_and(|p| p >= l) {
                "breaks the increasing order"
            } else {
                previous = Some(l);
                continue;
            };
            return Err(StorageError::BadLocation {
                path: self.path.clone(),
                class,
                index: i,
                voxel: l,
                reason: reason.into(),
            });
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Volume shape (z, y, x).
    pub fn shape(&self) -> [usize; 3] {
        self.header.shape
    }

    /// Voxel spacing (z, y, x) in mm.
    pub fn spacing(&self) -> [f64; 3] {
        self.header.spacing
    }

    pub fn brick_shape(&self) -> [usize; 3] {
        self.header.brick
    }

    /// Bricks per axis (z, y, x).
    pub fn brick_counts(&self) -> [usize; 3] {
        self.grid.counts
    }

    pub fn channels(&self) -> usize {
        self.header.channels
    }

    pub fn has_labels(&self) -> bool {
        self.header.has_labels
    }

    /// Stored image values map to intensities as `raw * scale + offset`.
    pub fn intensity_map(&self) -> (f32, f32) {
        (self.header.scale, self.header.offset)
    }

    pub fn image_filter(&self) -> ImageFilter {
        self.header.filter
    }

    pub fn zstd_level(&self) -> i32 {
        self.header.zstd_level
    }

    pub fn file_len(&self) -> u64 {
        self.header.file_len
    }

    /// The classes present in the labels (ascending), with voxel and stored-location counts.
    pub fn classes(&self) -> &[ClassInfo] {
        &self.classes
    }

    /// Stored locations of `class`; empty when the class is absent.
    pub fn class_locations(&self, class: u8) -> ClassLocations<'_> {
        let bytes = match self.classes.binary_search_by_key(&class, |c| c.class) {
            Ok(i) => {
                let start = self.class_starts[i];
                self.locations.get(start..start + self.classes[i].sampled * LOCATION_LEN).unwrap_or(&[])
            }
            Err(_) => &[],
        };
        ClassLocations::new(bytes, self.grid.shape)
    }

    /// The caller's metadata string, as written.
    pub fn metadata(&self) -> &str {
        &self.metadata
    }

    /// Sizes and counts of the shard, from its index.
    pub fn summary(&self) -> ShardSummary {
        let sum = |index: &[BrickEntry]| index.iter().map(|e| u64::from(e.len)).sum();
        let voxels = self.grid.shape.iter().product::<usize>() as u64;
        ShardSummary {
            path: self.path.clone(),
            shape: self.grid.shape,
            spacing: self.header.spacing,
            brick_shape: self.grid.brick,
            channels: self.header.channels,
            has_labels: self.header.has_labels,
            bricks: self.grid.len(),
            image_raw_bytes: voxels * 2 * self.header.channels as u64,
            image_compressed_bytes: sum(&self.image_index),
            label_raw_bytes: if self.header.has_labels { voxels } else { 0 },
            label_compressed_bytes: sum(&self.label_index),
            classes: self.classes.len(),
            locations: self.classes.iter().map(|c| c.sampled).sum(),
            file_len: self.header.file_len,
        }
    }

    /// Where a brick is stored: (file offset, compressed length), or `None` past the last brick.
    pub fn brick_location(&self, stream: Stream, channel: usize, index: usize) -> Option<(u64, u32)> {
        let i = channel.checked_mul(self.grid.len())?.checked_add(index)?;
        if index >= self.grid.len() {
            return None;
        }
        let e = match stream {
            Stream::Image => self.image_index.get(i)?,
            Stream::Labels => self.label_index.get(i)?,
        };
        Some((e.offset, e.len))
    }

    /// Reads the image (all channels, channel-major) in the box `origin .. origin + size`, which
    /// may reach outside the volume: voxels outside are set to `pad`. `out` is C-order
    /// `[channel][z][y][x]` with `channels() * size` values. Raw stored values, no intensity map.
    pub fn read_image_region(
        &self,
        scratch: &mut Scratch,
        origin: [i64; 3],
        size: [usize; 3],
        pad: i16,
        out: &mut [i16],
    ) -> Result<()> {
        let filter = self.header.filter;
        self.read_channels(scratch, origin, size, pad, out, |brick, n, first, dst: &mut [i16]| {
            decode_i16(filter, brick, n, first, dst.len(), |i, v| dst[i] = v)
        })
    }

    /// Like [`Shard::read_image_region`], but applies the intensity map (`raw * scale + offset`);
    /// `pad` is written as is (it is already an intensity).
    pub fn read_image_region_f32(
        &self,
        scratch: &mut Scratch,
        origin: [i64; 3],
        size: [usize; 3],
        pad: f32,
        out: &mut [f32],
    ) -> Result<()> {
        let (filter, scale, offset) = (self.header.filter, self.header.scale, self.header.offset);
        self.read_channels(scratch, origin, size, pad, out, |brick, n, first, dst: &mut [f32]| {
            decode_i16(filter, brick, n, first, dst.len(), |i, v| dst[i] = f32::from(v) * scale + offset)
        })
    }

    /// Reads the labels in the box `origin .. origin + size`; voxels outside the volume are set
    /// to `pad` (e.g. an "ignore" label). `out` is C-order `[z][y][x]` of `size`.
    pub fn read_label_region(
        &self,
        scratch: &mut Scratch,
        origin: [i64; 3],
        size: [usize; 3],
        pad: u8,
        out: &mut [u8],
    ) -> Result<()> {
        if !self.header.has_labels {
            return Err(StorageError::NoLabels { path: self.path.clone() });
        }
        let expected = self.region_len(size, 1)?;
        if out.len() != expected {
            return Err(StorageError::BufferSize { path: self.path.clone(), expected, actual: out.len() });
        }
        self.read_region(scratch, Stream::Labels, 0, origin, size, pad, out, |brick, _, first, dst: &mut [u8]| {
            dst.copy_from_slice(&brick[first..first + dst.len()])
        })
    }

    fn region_len(&self, size: [usize; 3], channels: usize) -> Result<usize> {
        voxel_count(size)
            .and_then(|n| n.checked_mul(channels))
            .ok_or_else(|| StorageError::invalid(format!("{}: region {size:?} is too large", self.path.display())))
    }

    fn read_channels<T: Copy>(
        &self,
        scratch: &mut Scratch,
        origin: [i64; 3],
        size: [usize; 3],
        pad: T,
        out: &mut [T],
        copy: impl Fn(&[u8], usize, usize, &mut [T]) + Copy,
    ) -> Result<()> {
        let expected = self.region_len(size, self.header.channels)?;
        if out.len() != expected {
            return Err(StorageError::BufferSize { path: self.path.clone(), expected, actual: out.len() });
        }
        let per_channel = expected / self.header.channels;
        if per_channel == 0 {
            return Ok(());
        }
        for (channel, out) in out.chunks_exact_mut(per_channel).enumerate() {
            self.read_region(scratch, Stream::Image, channel, origin, size, pad, out, copy)?;
        }
        Ok(())
    }

    /// The shared region walk: pads what lies outside, then visits each brick that overlaps the
    /// region once and hands `copy` its rows: `copy(brick bytes, brick voxels, first voxel, dst)`.
    #[allow(clippy::too_many_arguments)]
    fn read_region<T: Copy>(
        &self,
        scratch: &mut Scratch,
        stream: Stream,
        channel: usize,
        origin: [i64; 3],
        size: [usize; 3],
        pad: T,
        out: &mut [T],
        copy: impl Fn(&[u8], usize, usize, &mut [T]),
    ) -> Result<()> {
        // Overlap of the region with the volume, in volume coordinates.
        let mut lo = [0usize; 3];
        let mut hi = [0usize; 3];
        let mut inside = true;
        for a in 0..3 {
            let extent = self.grid.shape[a] as i128;
            let start = i128::from(origin[a]);
            let end = start + size[a] as i128;
            let (l, h) = (start.max(0), end.min(extent));
            if l >= h {
                out.fill(pad);
                return Ok(());
            }
            inside &= start >= 0 && end <= extent;
            (lo[a], hi[a]) = (l as usize, h as usize);
        }
        // Offset of volume voxel v along axis a inside the region: v - origin, which is >= 0 for
        // every voxel of the overlap.
        let rel = |a: usize, v: usize| (v as i128 - i128::from(origin[a])) as usize;
        if !inside {
            fill_outside(out, size, [0, 1, 2].map(|a| rel(a, lo[a])), [0, 1, 2].map(|a| rel(a, hi[a])), pad);
        }

        let b = self.grid.brick;
        for bz in lo[0] / b[0]..=(hi[0] - 1) / b[0] {
            for by in lo[1] / b[1]..=(hi[1] - 1) / b[1] {
                for bx in lo[2] / b[2]..=(hi[2] - 1) / b[2] {
                    let coords = [bz, by, bx];
                    let (bo, ext) = (self.grid.origin(coords), self.grid.extent(coords));
                    let n = ext.iter().product::<usize>();
                    let bytes = self.load_brick(scratch, stream, channel, coords)?;
                    let s = [0, 1, 2].map(|a| lo[a].max(bo[a]));
                    let e = [0, 1, 2].map(|a| hi[a].min(bo[a] + ext[a]));
                    let len = e[2] - s[2];
                    for z in s[0]..e[0] {
                        for y in s[1]..e[1] {
                            let src = ((z - bo[0]) * ext[1] + (y - bo[1])) * ext[2] + (s[2] - bo[2]);
                            let dst = (rel(0, z) * size[1] + rel(1, y)) * size[2] + rel(2, s[2]);
                            copy(bytes, n, src, &mut out[dst..dst + len]);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks and decompresses one brick into the scratch buffer; returns its raw bytes.
    pub(crate) fn load_brick<'s>(
        &self,
        scratch: &'s mut Scratch,
        stream: Stream,
        channel: usize,
        coords: [usize; 3],
    ) -> Result<&'s [u8]> {
        let index = self.grid.index(coords);
        let (entries, elem) = match stream {
            Stream::Image => (&self.image_index, 2),
            Stream::Labels => (&self.label_index, 1),
        };
        let fail = |reason: String| StorageError::BrickDecode {
            path: self.path.clone(),
            stream,
            channel,
            index,
            coords,
            reason,
        };
        let entry = entries.get(channel * self.grid.len() + index).ok_or_else(|| fail("no such brick".into()))?;
        let Scratch { decompressor, brick, compressed } = scratch;
        let start = entry.offset as usize;
        let src: &[u8] = match &self.map {
            Some(map) => {
                self.check_unchanged()?;
                map.get(start..start + entry.len as usize).ok_or_else(|| fail("beyond the file".into()))?
            }
            None => {
                // A file truncated or rewritten in place (on NFS, by another host) makes this
                // read fail or the checksum below disagree: an error, never a signal.
                use std::os::unix::fs::FileExt;
                compressed.resize(entry.len as usize, 0);
                if let Err(e) = self.file.read_exact_at(compressed, entry.offset) {
                    let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                    if now != self.len {
                        return Err(StorageError::Changed { path: self.path.clone(), expected: self.len, actual: now });
                    }
                    return Err(StorageError::io(&self.path, "reading a brick", e));
                }
                compressed
            }
        };
        let computed = xxh3_64(src);
        if computed != entry.checksum {
            return Err(StorageError::BrickChecksum {
                path: self.path.clone(),
                stream,
                channel,
                index,
                coords,
                stored: entry.checksum,
                computed,
            });
        }
        let raw_len = self.grid.extent(coords).iter().product::<usize>() * elem;
        if brick.len() < raw_len {
            brick.resize(raw_len, 0);
        }
        if decompressor.is_none() {
            let d = zstd::bulk::Decompressor::new()
                .map_err(|e| fail(format!("cannot create a zstd decompression context: {e}")))?;
            *decompressor = Some(d);
        }
        let Some(decompressor) = decompressor.as_mut() else {
            return Err(fail("no zstd decompression context".into()));
        };
        let dst = &mut brick[..raw_len];
        let n = decompressor.decompress_to_buffer(src, dst).map_err(|e| fail(format!("zstd: {e}")))?;
        if n != raw_len {
            return Err(fail(format!("decompressed to {n} bytes, expected {raw_len}")));
        }
        crate::io_stats::brick_read(u64::from(entry.len), raw_len as u64);
        Ok(&brick[..raw_len])
    }

    pub(crate) fn grid(&self) -> &Grid {
        &self.grid
    }

    /// Fails unless the file still has the length it had at open: touching a mapped page past
    /// the end of a file truncated in place kills the process (SIGBUS), so a changed length is
    /// a corrupt shard. One `fstat`, far cheaper than the decompression it guards. (A truncation
    /// between this check and the read remains possible, in a window of microseconds.)
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let actual = self.file.metadata().map_err(|e| StorageError::io(&self.path, "checking its length", e))?.len();
        if actual != self.len {
            return Err(StorageError::Changed { path: self.path.clone(), expected: self.len, actual });
        }
        Ok(())
    }
}

/// How a shard's bricks are read after it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// From a memory mapping: no copy, but a file truncated in place between the length
    /// check and the read would kill the process (SIGBUS).
    Mapped,
    /// With `pread` into a buffer: a truncated or rewritten file is an error for that shard.
    Pread,
}

/// `statfs` magic numbers of network and cluster file systems, where another host may
/// truncate or rewrite a shard while this one reads it: NFS, SMB/CIFS/SMB2, Lustre, Ceph,
/// GPFS, BeeGFS, OrangeFS, FUSE (sshfs, gcsfuse, …), 9P, AFS.
const SHARED_FILE_SYSTEMS: [i64; 13] = [
    0x6969,
    0x517B,
    0xFF53_4D42,
    0xFE53_4D42,
    0x0BD0_0BD0,
    0x00C3_6400,
    0x4750_4653,
    0x1983_0326,
    0x2003_0528,
    0x6573_5546,
    0x0102_1997,
    0x5346_414F,
    0x6B41_4653,
];

impl ReadMode {
    /// `CPS3D_SHARD_READ=mmap` or `pread` when set; otherwise pread on the shared file
    /// systems above and mapped on local ones.
    pub fn for_file(file: &File) -> ReadMode {
        match std::env::var("CPS3D_SHARD_READ").as_deref() {
            Ok("pread") => return ReadMode::Pread,
            Ok("mmap") => return ReadMode::Mapped,
            _ => {}
        }
        use std::os::fd::AsRawFd;
        // SAFETY: statfs is plain data, filled by fstatfs on a descriptor we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return ReadMode::Pread;
        }
        if SHARED_FILE_SYSTEMS.contains(&(st.f_type as i64)) {
            ReadMode::Pread
        } else {
            ReadMode::Mapped
        }
    }
}

/// What kind of file this is, for messages ("a FIFO", ...).
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

/// Sets every voxel of a `size` region outside the box `lo .. hi` (region coordinates) to `pad`,
/// leaving the box, which the bricks will fill, untouched: padding-heavy regions (small scans,
/// rotation margins) would otherwise be written twice.
fn fill_outside<T: Copy>(out: &mut [T], size: [usize; 3], lo: [usize; 3], hi: [usize; 3], pad: T) {
    let plane = size[1] * size[2];
    for (z, slice) in out.chunks_exact_mut(plane).enumerate() {
        if z < lo[0] || z >= hi[0] {
            slice.fill(pad);
            continue;
        }
        slice[..lo[1] * size[2]].fill(pad);
        slice[hi[1] * size[2]..].fill(pad);
        for row in slice[lo[1] * size[2]..hi[1] * size[2]].chunks_exact_mut(size[2]) {
            row[..lo[2]].fill(pad);
            row[hi[2]..].fill(pad);
        }
    }
}

/// Decodes `len` i16 values of a decompressed image brick of `n` voxels, starting at
/// voxel `first`, in either filter layout, handing each to `put(index, value)`.
#[inline]
fn decode_i16(filter: ImageFilter, brick: &[u8], n: usize, first: usize, len: usize, mut put: impl FnMut(usize, i16)) {
    match filter {
        ImageFilter::None => {
            for (i, b) in brick[2 * first..2 * (first + len)].chunks_exact(2).enumerate() {
                put(i, i16::from_le_bytes([b[0], b[1]]));
            }
        }
        ImageFilter::ByteSplit => {
            let (lo, hi) = (&brick[first..first + len], &brick[n + first..n + first + len]);
            for (i, (&l, &h)) in lo.iter().zip(hi).enumerate() {
                put(i, i16::from_le_bytes([l, h]));
            }
        }
    }
}
