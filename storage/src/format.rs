//! On-disk layout: the fixed-size header, the brick grid and the footer's tables. FORMAT.md is the
//! byte-by-byte description; this module is its only implementation.

use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use crate::error::{Result, StorageError};

/// First eight bytes of every shard.
pub const MAGIC: [u8; 8] = *b"CPS3DSHD";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header at offset 0; bricks start right after it.
pub const HEADER_LEN: usize = 128;
/// File extension of shards (without the dot).
pub const SHARD_EXTENSION: &str = "shard";

pub(crate) const INDEX_ENTRY_LEN: usize = 20;
pub(crate) const CLASS_ENTRY_LEN: usize = 16;
pub(crate) const LOCATION_LEN: usize = 4;
const CHECKSUM_AT: usize = 120;

const DTYPE_I16: u8 = 1;
const DTYPE_U8: u8 = 1;

/// How image bricks are laid out before compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFilter {
    /// Little-endian i16 values, one after the other.
    None,
    /// All low bytes of the brick, then all high bytes: CT's high bytes are nearly constant, so
    /// zstd sees long runs instead of an alternating pattern.
    #[default]
    ByteSplit,
}

impl ImageFilter {
    fn code(self) -> u8 {
        match self {
            ImageFilter::None => 0,
            ImageFilter::ByteSplit => 1,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(ImageFilter::None),
            1 => Some(ImageFilter::ByteSplit),
            _ => None,
        }
    }
}

/// The fixed header's fields (everything but magic, version, header length and checksum).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    pub file_len: u64,
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
    pub brick: [usize; 3],
    pub channels: usize,
    pub has_labels: bool,
    pub filter: ImageFilter,
    pub scale: f32,
    pub offset: f32,
    pub zstd_level: i32,
    pub class_count: usize,
    pub footer_offset: u64,
    pub footer_len: u64,
    pub metadata_len: u64,
}

impl Header {
    /// The header bytes with a zero checksum field (the checksum covers exactly these 120 bytes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let mut w = ByteWriter { buf: &mut b, at: 0 };
        w.put(&MAGIC);
        w.put(&FORMAT_VERSION.to_le_bytes());
        w.put(&(HEADER_LEN as u32).to_le_bytes());
        w.put(&self.file_len.to_le_bytes());
        for s in self.shape {
            w.put(&(s as u32).to_le_bytes());
        }
        for s in self.spacing {
            w.put(&s.to_le_bytes());
        }
        for s in self.brick {
            w.put(&(s as u32).to_le_bytes());
        }
        w.put(&(self.channels as u32).to_le_bytes());
        w.put(&[DTYPE_I16, if self.has_labels { DTYPE_U8 } else { 0 }, self.filter.code(), 0]);
        w.put(&self.scale.to_le_bytes());
        w.put(&self.offset.to_le_bytes());
        w.put(&self.zstd_level.to_le_bytes());
        w.put(&(self.class_count as u32).to_le_bytes());
        w.put(&self.footer_offset.to_le_bytes());
        w.put(&self.footer_len.to_le_bytes());
        w.put(&self.metadata_len.to_le_bytes());
        debug_assert_eq!(w.at, CHECKSUM_AT);
        b
    }

    /// Checksum of the header (checksum field excluded) followed by the footer.
    pub fn checksum(header: &[u8], footer: &[u8]) -> u64 {
        let mut h = Xxh3::new();
        h.update(&header[..CHECKSUM_AT]);
        h.update(footer);
        h.digest()
    }

    pub fn set_checksum(bytes: &mut [u8; HEADER_LEN], checksum: u64) {
        bytes[CHECKSUM_AT..].copy_from_slice(&checksum.to_le_bytes());
    }

    /// Parses and validates the header of a mapped file: magic, version, length, checksum, then
    /// the fields' consistency. Checks run from the cheapest, most specific diagnosis onwards so
    /// that a wrong file type or version is not reported as a checksum error.
    pub fn parse(path: &Path, file: &[u8]) -> Result<Header> {
        let actual = file.len() as u64;
        let magic_len = file.len().min(MAGIC.len());
        if file[..magic_len] != MAGIC[..magic_len] {
            return Err(StorageError::BadMagic { path: path.into(), found: file[..magic_len].to_vec() });
        }
        if file.len() < HEADER_LEN {
            return Err(StorageError::Truncated { path: path.into(), expected: HEADER_LEN as u64, actual });
        }
        let mut r = ByteReader { buf: &file[..HEADER_LEN], at: MAGIC.len() };
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(StorageError::UnsupportedVersion {
                path: path.into(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let header_len = r.u32();
        let file_len = r.u64();
        let shape = [r.u32() as usize, r.u32() as usize, r.u32() as usize];
        let spacing = [r.f64(), r.f64(), r.f64()];
        let brick = [r.u32() as usize, r.u32() as usize, r.u32() as usize];
        let channels = r.u32() as usize;
        let [image_dtype, label_dtype, filter_code, reserved] = [r.u8(), r.u8(), r.u8(), r.u8()];
        let scale = r.f32();
        let offset = r.f32();
        let zstd_level = r.i32();
        let class_count = r.u32() as usize;
        let footer_offset = r.u64();
        let footer_len = r.u64();
        let metadata_len = r.u64();
        let stored = r.u64();

        // The checksum needs the footer; if the header points outside the file, either the file
        // lost its tail or the header itself is damaged.
        let footer_end = footer_offset.checked_add(footer_len);
        let footer = match footer_end {
            Some(end) if footer_offset >= HEADER_LEN as u64 && end <= actual => {
                &file[footer_offset as usize..end as usize]
            }
            _ if file_len > actual => {
                return Err(StorageError::Truncated { path: path.into(), expected: file_len, actual })
            }
            _ => {
                return Err(StorageError::corrupt(
                    path,
                    format!("footer at {footer_offset} (+{footer_len} bytes) lies outside the {actual}-byte file"),
                ))
            }
        };
        let computed = Header::checksum(file, footer);
        if computed != stored {
            return Err(StorageError::HeaderChecksum { path: path.into(), stored, computed });
        }

        let bad = |reason: String| Err(StorageError::corrupt(path, reason));
        if file_len != actual {
            return if file_len > actual {
                Err(StorageError::Truncated { path: path.into(), expected: file_len, actual })
            } else {
                bad(format!("{} trailing bytes after the declared end at {file_len}", actual - file_len))
            };
        }
        if footer_end != Some(file_len) {
            return bad("the footer does not end the file".into());
        }
        if header_len as usize != HEADER_LEN {
            return bad(format!("header length {header_len}, expected {HEADER_LEN}"));
        }
        if image_dtype != DTYPE_I16 {
            return bad(format!("unknown image dtype code {image_dtype}"));
        }
        let has_labels = match label_dtype {
            0 => false,
            DTYPE_U8 => true,
            other => return bad(format!("unknown label dtype code {other}")),
        };
        let Some(filter) = ImageFilter::from_code(filter_code) else {
            return bad(format!("unknown image filter code {filter_code}"));
        };
        if reserved != 0 {
            return bad(format!("reserved byte is {reserved}, expected 0"));
        }
        if shape.contains(&0) || brick.contains(&0) || channels == 0 {
            return bad(format!("empty shape {shape:?}, brick {brick:?} or channel count {channels}"));
        }
        if voxel_count(shape).is_none_or(|n| n > u32::MAX as usize) {
            return bad(format!("shape {shape:?} has more than 2^32 - 1 voxels"));
        }
        if voxel_count(brick).is_none_or(|n| n > MAX_BRICK_VOXELS) {
            return bad(format!("brick shape {brick:?} is larger than {MAX_BRICK_VOXELS} voxels"));
        }
        if class_count > 255 {
            return bad(format!("{class_count} classes listed, at most 255 exist"));
        }
        if !spacing.iter().all(|s| s.is_finite() && *s > 0.0) {
            return bad(format!("spacing {spacing:?} is not positive and finite"));
        }
        if !(scale.is_finite() && offset.is_finite()) {
            return bad(format!("intensity map scale {scale} / offset {offset} is not finite"));
        }
        Ok(Header {
            file_len,
            shape,
            spacing,
            brick,
            channels,
            has_labels,
            filter,
            scale,
            offset,
            zstd_level,
            class_count,
            footer_offset,
            footer_len,
            metadata_len,
        })
    }
}

/// Bricks are compressed one call at a time, and the compressed length is stored as u32:
/// 2^28 i16 voxels (512 MiB raw) keeps the bound well inside it.
pub(crate) const MAX_BRICK_VOXELS: usize = 1 << 28;

pub(crate) fn voxel_count(shape: [usize; 3]) -> Option<usize> {
    shape[0].checked_mul(shape[1])?.checked_mul(shape[2])
}

/// The regular brick grid over a volume; edge bricks are clipped to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grid {
    pub shape: [usize; 3],
    pub brick: [usize; 3],
    pub counts: [usize; 3],
}

impl Grid {
    pub fn new(shape: [usize; 3], brick: [usize; 3]) -> Grid {
        let counts = [0, 1, 2].map(|a| shape[a].div_ceil(brick[a]));
        Grid { shape, brick, counts }
    }

    pub fn len(&self) -> usize {
        self.counts[0] * self.counts[1] * self.counts[2]
    }

    pub fn index(&self, c: [usize; 3]) -> usize {
        (c[0] * self.counts[1] + c[1]) * self.counts[2] + c[2]
    }

    pub fn coords(&self, index: usize) -> [usize; 3] {
        let x = index % self.counts[2];
        let rest = index / self.counts[2];
        [rest / self.counts[1], rest % self.counts[1], x]
    }

    /// First voxel of a brick.
    pub fn origin(&self, c: [usize; 3]) -> [usize; 3] {
        [0, 1, 2].map(|a| c[a] * self.brick[a])
    }

    /// The brick's extent after clipping to the volume.
    pub fn extent(&self, c: [usize; 3]) -> [usize; 3] {
        [0, 1, 2].map(|a| self.brick[a].min(self.shape[a] - c[a] * self.brick[a]))
    }
}

/// One entry of a brick index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BrickEntry {
    pub offset: u64,
    pub len: u32,
    pub checksum: u64,
}

impl BrickEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.checksum.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> BrickEntry {
        let mut r = ByteReader { buf: b, at: 0 };
        BrickEntry { offset: r.u64(), len: r.u32(), checksum: r.u64() }
    }
}

struct ByteWriter<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl ByteWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

/// Reads little-endian fields from a slice whose length the caller has already checked.
pub(crate) struct ByteReader<'a> {
    pub buf: &'a [u8],
    pub at: usize,
}

impl ByteReader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    pub fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.take())
    }
    pub fn f64(&mut self) -> f64 {
        f64::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_round_trips_indices_and_clips_edges() {
        let g = Grid::new([5, 7, 9], [2, 3, 4]);
        assert_eq!(g.counts, [3, 3, 3]);
        for i in 0..g.len() {
            assert_eq!(g.index(g.coords(i)), i);
        }
        assert_eq!(g.extent([2, 2, 2]), [1, 1, 1]);
        assert_eq!(g.extent([0, 1, 1]), [2, 3, 4]);
    }

    #[test]
    fn header_encodes_every_field_before_the_checksum() {
        let h = Header {
            file_len: 1000,
            shape: [3, 4, 5],
            spacing: [1.5, 0.8, 0.8],
            brick: [2, 2, 2],
            channels: 1,
            has_labels: true,
            filter: ImageFilter::ByteSplit,
            scale: 1.0,
            offset: 0.0,
            zstd_level: 3,
            class_count: 2,
            footer_offset: 900,
            footer_len: 100,
            metadata_len: 7,
        };
        let mut file = vec![0u8; 1000];
        let mut bytes = h.encode();
        let checksum = Header::checksum(&bytes, &file[900..]);
        Header::set_checksum(&mut bytes, checksum);
        file[..HEADER_LEN].copy_from_slice(&bytes);
        assert_eq!(Header::parse(Path::new("x"), &file).unwrap(), h);
    }
}
