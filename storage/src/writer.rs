//! Streaming, atomic shard writer.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Result, StorageError};
use crate::format::{voxel_count, BrickEntry, Grid, Header, ImageFilter, HEADER_LEN, MAX_BRICK_VOXELS};
use crate::locations::{
    sample_class_locations, ClassSample, DEFAULT_LOCATION_CAP, DEFAULT_LOCATION_MIN_FRACTION, DEFAULT_LOCATION_SEED,
};
use crate::summary::ShardSummary;

/// Default brick shape (z, y, x); see FORMAT.md, "Measured", for the numbers behind it.
pub const DEFAULT_BRICK_SHAPE: [usize; 3] = [32, 32, 32];
/// Default zstd level; see FORMAT.md, "Measured".
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// One case to write. `image` and `labels` are C-order `[z][y][x]` volumes of `shape`
/// (`image` is `[channel][z][y][x]` when `channels > 1`).
#[derive(Debug, Clone)]
pub struct ShardInput<'a> {
    pub shape: [usize; 3],
    /// Voxel spacing (z, y, x) in mm.
    pub spacing: [f64; 3],
    pub channels: usize,
    pub image: &'a [i16],
    /// Stored values map to intensities as `raw * scale + offset`.
    pub scale: f32,
    pub offset: f32,
    pub labels: Option<&'a [u8]>,
    /// Precomputed class locations (see [`sample_class_locations`]); computed from `labels` when
    /// `None`. Classes strictly increasing, locations strictly increasing within a class.
    pub class_locations: Option<&'a [ClassSample]>,
    /// Free-form UTF-8 (JSON by convention: case id, crop box, original spacing...).
    pub metadata: &'a str,
}

impl<'a> ShardInput<'a> {
    /// A single-channel image with the identity intensity map (CT in integer HU).
    pub fn new(shape: [usize; 3], spacing: [f64; 3], image: &'a [i16]) -> Self {
        ShardInput {
            shape,
            spacing,
            channels: 1,
            image,
            scale: 1.0,
            offset: 0.0,
            labels: None,
            class_locations: None,
            metadata: "",
        }
    }

    pub fn with_labels(mut self, labels: &'a [u8]) -> Self {
        self.labels = Some(labels);
        self
    }

    pub fn with_class_locations(mut self, samples: &'a [ClassSample]) -> Self {
        self.class_locations = Some(samples);
        self
    }

    pub fn with_metadata(mut self, metadata: &'a str) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_intensity_map(mut self, scale: f32, offset: f32) -> Self {
        self.scale = scale;
        self.offset = offset;
        self
    }

    pub fn with_channels(mut self, channels: usize) -> Self {
        self.channels = channels;
        self
    }
}

/// Writes shards one brick at a time: besides the caller's volumes, it holds one raw and one
/// compressed brick, the brick index and the class locations.
#[derive(Debug, Clone)]
pub struct ShardWriter {
    pub brick_shape: [usize; 3],
    pub zstd_level: i32,
    pub image_filter: ImageFilter,
    /// At most this many locations per class, unless `location_min_fraction` asks for more.
    pub location_cap: usize,
    pub location_min_fraction: f64,
    pub location_seed: u64,
}

impl Default for ShardWriter {
    fn default() -> Self {
        ShardWriter {
            brick_shape: DEFAULT_BRICK_SHAPE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            image_filter: ImageFilter::default(),
            location_cap: DEFAULT_LOCATION_CAP,
            location_min_fraction: DEFAULT_LOCATION_MIN_FRACTION,
            location_seed: DEFAULT_LOCATION_SEED,
        }
    }
}

impl ShardWriter {
    pub fn with_brick_shape(mut self, brick: [usize; 3]) -> Self {
        self.brick_shape = brick;
        self
    }

    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }

    pub fn with_image_filter(mut self, filter: ImageFilter) -> Self {
        self.image_filter = filter;
        self
    }

    pub fn with_location_cap(mut self, cap: usize) -> Self {
        self.location_cap = cap;
        self
    }

    /// Writes `input` to `path` atomically: into a hidden temporary file in the same directory,
    /// fsynced, then renamed. On any error the temporary file is removed and `path` is untouched.
    pub fn write(&self, path: &Path, input: &ShardInput<'_>) -> Result<ShardSummary> {
        self.validate(input)?;
        let samples: Cow<'_, [ClassSample]> = match (input.class_locations, input.labels) {
            (Some(given), labels) => {
                validate_samples(given, input.shape, labels)?;
                Cow::Borrowed(given)
            }
            (None, Some(labels)) => Cow::Owned(sample_class_locations(
                labels,
                self.location_cap,
                self.location_min_fraction,
                self.location_seed,
            )),
            (None, None) => Cow::Owned(Vec::new()),
        };

        let temp = TempFile::create(path)?;
        let summary = self.write_body(path, temp.file()?, input, &samples)?;
        temp.commit(path)?;
        Ok(summary)
    }

    fn validate(&self, input: &ShardInput<'_>) -> Result<()> {
        let invalid = |r: String| Err(StorageError::invalid(r));
        let [shape, brick] = [input.shape, self.brick_shape];
        if shape.contains(&0) || shape.iter().any(|&s| s > u32::MAX as usize) {
            return invalid(format!("shape {shape:?} must be 1..2^32 on every axis"));
        }
        let voxels = match voxel_count(shape) {
            Some(n) if n <= u32::MAX as usize => n,
            _ => return invalid(format!("shape {shape:?} has more than 2^32 - 1 voxels")),
        };
        if brick.contains(&0) || voxel_count(brick).is_none_or(|n| n > MAX_BRICK_VOXELS) {
            return invalid(format!("brick shape {brick:?} must be non-empty and at most {MAX_BRICK_VOXELS} voxels"));
        }
        if input.channels == 0 || input.channels > u32::MAX as usize {
            return invalid(format!("channel count {} must be at least 1", input.channels));
        }
        if Some(input.image.len()) != voxels.checked_mul(input.channels) {
            return invalid(format!(
                "image has {} values, shape {shape:?} x {} channel(s) needs {}",
                input.image.len(),
                input.channels,
                voxels.saturating_mul(input.channels)
            ));
        }
        if let Some(labels) = input.labels {
            if labels.len() != voxels {
                return invalid(format!("labels have {} values, shape {shape:?} needs {voxels}", labels.len()));
            }
        }
        if input.class_locations.is_some() && input.labels.is_none() {
            return invalid("class locations given without labels".into());
        }
        if !input.spacing.iter().all(|s| s.is_finite() && *s > 0.0) {
            return invalid(format!("spacing {:?} must be positive and finite", input.spacing));
        }
        if !(input.scale.is_finite() && input.offset.is_finite()) {
            return invalid(format!("intensity map scale {} / offset {} must be finite", input.scale, input.offset));
        }
        if !zstd::compression_level_range().contains(&self.zstd_level) {
            return invalid(format!("zstd level {} is outside {:?}", self.zstd_level, zstd::compression_level_range()));
        }
        if !(0.0..=1.0).contains(&self.location_min_fraction) {
            return invalid(format!("location_min_fraction {} must lie in [0, 1]", self.location_min_fraction));
        }
        Ok(())
    }

    fn write_body(
        &self,
        path: &Path,
        file: &File,
        input: &ShardInput<'_>,
        samples: &[ClassSample],
    ) -> Result<ShardSummary> {
        let io = |op| move |e| StorageError::io(path, op, e);
        let grid = Grid::new(input.shape, self.brick_shape);
        let voxels = grid.shape.iter().product::<usize>();
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).map_err(io("writing the temporary file"))?;

        let mut bricks = BrickSink::new(self.zstd_level, grid, path)?;
        let mut image_index = Vec::with_capacity(grid.len() * input.channels);
        for channel in input.image.chunks_exact(voxels) {
            bricks.write_stream(&mut out, &mut image_index, |raw, origin, extent| {
                gather_i16(channel, grid.shape, origin, extent, self.image_filter, raw)
            })?;
        }
        let image_compressed = bricks.written;
        let mut label_index = Vec::new();
        if let Some(labels) = input.labels {
            label_index.reserve(grid.len());
            bricks.write_stream(&mut out, &mut label_index, |raw, origin, extent| {
                gather_u8(labels, grid.shape, origin, extent, raw)
            })?;
        }
        let label_compressed = bricks.written - image_compressed;

        let footer = encode_footer(&image_index, &label_index, samples, input.metadata);
        let footer_offset = HEADER_LEN as u64 + bricks.written;
        let header = Header {
            file_len: footer_offset + footer.len() as u64,
            shape: grid.shape,
            spacing: input.spacing,
            brick: grid.brick,
            channels: input.channels,
            has_labels: input.labels.is_some(),
            filter: self.image_filter,
            scale: input.scale,
            offset: input.offset,
            zstd_level: self.zstd_level,
            class_count: samples.len(),
            footer_offset,
            footer_len: footer.len() as u64,
            metadata_len: input.metadata.len() as u64,
        };
        let mut head = header.encode();
        let checksum = Header::checksum(&head, &footer);
        Header::set_checksum(&mut head, checksum);
        out.write_all(&footer).map_err(io("writing the temporary file"))?;
        out.seek(SeekFrom::Start(0)).map_err(io("writing the temporary file"))?;
        out.write_all(&head).map_err(io("writing the temporary file"))?;
        out.flush().map_err(io("writing the temporary file"))?;
        drop(out);
        file.sync_all().map_err(io("syncing the temporary file"))?;

        Ok(ShardSummary {
            path: path.to_path_buf(),
            shape: grid.shape,
            spacing: input.spacing,
            brick_shape: grid.brick,
            channels: input.channels,
            has_labels: input.labels.is_some(),
            bricks: grid.len(),
            image_raw_bytes: (input.image.len() * 2) as u64,
            image_compressed_bytes: image_compressed,
            label_raw_bytes: input.labels.map_or(0, |l| l.len() as u64),
            label_compressed_bytes: label_compressed,
            classes: samples.len(),
            locations: samples.iter().map(|s| s.locations.len()).sum(),
            file_len: header.file_len,
        })
    }
}

/// Compresses bricks through reused buffers and appends them to the file.
struct BrickSink<'p> {
    compressor: zstd::bulk::Compressor<'static>,
    raw: Vec<u8>,
    compressed: Vec<u8>,
    grid: Grid,
    written: u64,
    path: &'p Path,
}

impl<'p> BrickSink<'p> {
    fn new(level: i32, grid: Grid, path: &'p Path) -> Result<Self> {
        let compressor = zstd::bulk::Compressor::new(level)
            .map_err(|e| StorageError::io(path, "creating a zstd compression context", e))?;
        let brick_bytes = grid.brick.iter().product::<usize>() * 2;
        Ok(BrickSink {
            compressor,
            raw: Vec::with_capacity(brick_bytes),
            compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(brick_bytes)),
            grid,
            written: 0,
            path,
        })
    }

    fn write_stream(
        &mut self,
        out: &mut impl Write,
        index: &mut Vec<BrickEntry>,
        gather: impl Fn(&mut Vec<u8>, [usize; 3], [usize; 3]),
    ) -> Result<()> {
        let path = self.path;
        let io = |op| move |e| StorageError::io(path, op, e);
        for i in 0..self.grid.len() {
            let c = self.grid.coords(i);
            self.raw.clear();
            gather(&mut self.raw, self.grid.origin(c), self.grid.extent(c));
            self.compressed.clear();
            let bound = zstd::zstd_safe::compress_bound(self.raw.len());
            self.compressed.reserve(bound);
            let len = self.compressor.compress_to_buffer(&self.raw, &mut self.compressed).map_err(io("compressing"))?;
            let bytes = &self.compressed[..len];
            out.write_all(bytes).map_err(io("writing the temporary file"))?;
            index.push(BrickEntry {
                offset: HEADER_LEN as u64 + self.written,
                len: len as u32,
                checksum: xxh3_64(bytes),
            });
            self.written += len as u64;
        }
        Ok(())
    }
}

fn rows(shape: [usize; 3], origin: [usize; 3], extent: [usize; 3]) -> impl Iterator<Item = std::ops::Range<usize>> {
    (origin[0]..origin[0] + extent[0]).flat_map(move |z| {
        (origin[1]..origin[1] + extent[1]).map(move |y| {
            let start = (z * shape[1] + y) * shape[2] + origin[2];
            start..start + extent[2]
        })
    })
}

fn gather_i16(
    volume: &[i16],
    shape: [usize; 3],
    origin: [usize; 3],
    extent: [usize; 3],
    filter: ImageFilter,
    raw: &mut Vec<u8>,
) {
    let n = extent.iter().product::<usize>();
    match filter {
        ImageFilter::None => {
            for row in rows(shape, origin, extent) {
                raw.extend(volume[row].iter().flat_map(|v| v.to_le_bytes()));
            }
        }
        ImageFilter::ByteSplit => {
            raw.resize(2 * n, 0);
            let (lo, hi) = raw.split_at_mut(n);
            let mut at = 0;
            for row in rows(shape, origin, extent) {
                let src = &volume[row];
                for ((l, h), v) in lo[at..at + src.len()].iter_mut().zip(&mut hi[at..at + src.len()]).zip(src) {
                    [*l, *h] = v.to_le_bytes();
                }
                at += src.len();
            }
        }
    }
}

fn gather_u8(volume: &[u8], shape: [usize; 3], origin: [usize; 3], extent: [usize; 3], raw: &mut Vec<u8>) {
    for row in rows(shape, origin, extent) {
        raw.extend_from_slice(&volume[row]);
    }
}

fn encode_footer(image: &[BrickEntry], labels: &[BrickEntry], samples: &[ClassSample], metadata: &str) -> Vec<u8> {
    let locations: usize = samples.iter().map(|s| s.locations.len()).sum();
    let mut f = Vec::with_capacity(
        (image.len() + labels.len()) * crate::format::INDEX_ENTRY_LEN
            + samples.len() * crate::format::CLASS_ENTRY_LEN
            + locations * crate::format::LOCATION_LEN
            + metadata.len(),
    );
    for e in image.iter().chain(labels) {
        e.encode(&mut f);
    }
    for s in samples {
        f.extend_from_slice(&[s.class, 0, 0, 0]);
        f.extend_from_slice(&(s.locations.len() as u32).to_le_bytes());
        f.extend_from_slice(&s.voxels.to_le_bytes());
    }
    for s in samples {
        for l in &s.locations {
            f.extend_from_slice(&l.to_le_bytes());
        }
    }
    f.extend_from_slice(metadata.as_bytes());
    f
}

fn validate_samples(samples: &[ClassSample], shape: [usize; 3], labels: Option<&[u8]>) -> Result<()> {
    let voxels = shape.iter().product::<usize>() as u64;
    if let Some(labels) = labels {
        // The table must describe the labels exactly: `verify_shard` holds shards to that.
        let mut counts = [0u64; 256];
        for &l in labels {
            counts[l as usize] += 1;
        }
        let present: Vec<(u8, u64)> =
            (1..=255u8).filter(|&c| counts[c as usize] > 0).map(|c| (c, counts[c as usize])).collect();
        let given: Vec<(u8, u64)> = samples.iter().map(|s| (s.class, s.voxels)).collect();
        if present != given {
            return Err(StorageError::invalid(format!(
                "class locations list (class, voxels) {given:?}, the labels hold {present:?}"
            )));
        }
    }
    let mut previous: Option<u8> = None;
    for s in samples {
        let invalid = |r: String| Err(StorageError::invalid(format!("class locations of class {}: {r}", s.class)));
        if s.class == 0 || previous.is_some_and(|p| p >= s.class) {
            return invalid("class ids must be 1..=255 and strictly increasing".into());
        }
        previous = Some(s.class);
        if s.locations.len() as u64 > s.voxels || s.voxels > voxels {
            return invalid(format!(
                "{} locations of {} class voxels in a {voxels}-voxel volume",
                s.locations.len(),
                s.voxels
            ));
        }
        if s.locations.len() > u32::MAX as usize {
            return invalid("more than 2^32 - 1 locations".into());
        }
        if !s.locations.windows(2).all(|w| w[0] < w[1]) {
            return invalid("locations must be strictly increasing".into());
        }
        for &l in &s.locations {
            let label = labels.and_then(|labels| labels.get(l as usize));
            if u64::from(l) >= voxels || label.is_some_and(|&v| v != s.class) {
                return invalid(format!("location {l} is outside the volume or carries label {label:?}"));
            }
        }
    }
    Ok(())
}

/// A temporary file that is removed unless committed.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempFile {
    fn create(target: &Path) -> Result<TempFile> {
        let name = target
            .file_name()
            .ok_or_else(|| StorageError::invalid(format!("{} does not name a file", target.display())))?;
        let dir = parent_dir(target);
        let unique = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_name = format!(".{}.{}.{unique}.tmp", name.to_string_lossy(), std::process::id());
        let path = dir.join(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StorageError::io(target, "creating the temporary file", e))?;
        Ok(TempFile { path, file: Some(file) })
    }

    fn file(&self) -> Result<&File> {
        self.file.as_ref().ok_or_else(|| StorageError::invalid("temporary file already closed"))
    }

    fn commit(mut self, target: &Path) -> Result<()> {
        drop(self.file.take());
        fs::rename(&self.path, target).map_err(|e| StorageError::io(target, "renaming the temporary file", e))?;
        // The rename is durable only once the directory entry is; some systems cannot open a
        // directory for syncing, and the data itself is already on disk, so this is best effort.
        if let Ok(dir) = File::open(parent_dir(target)) {
            let _ = dir.sync_all();
        }
        self.path.clear();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
