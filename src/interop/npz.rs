//! NumPy `.npz` archives as `np.savez_compressed` writes them: one deflated zip entry
//! `{name}.npy` per array, holding a `.npy` v1.0 file. The array's bytes are streamed through
//! the compressor, so arrays larger than memory can be written.

use std::io::{BufWriter, Write};
use std::path::Path;

use zip::CompressionMethod;

use super::{write_file_atomically, zip_error, zip_options};
use crate::error::{Error, Result};

/// Deflate level. NumPy uses zlib's default (6); level 1 compresses float probabilities nearly
/// as well at several times the speed, and any level reads the same.
pub const DEFLATE_LEVEL: i64 = 1;

/// The `.npy` v1.0 header of a C-order little-endian float32 array of shape `shape`.
pub fn npy_header_f32(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + dict + '\n', padded to 64 bytes as NumPy does.
    let unpadded = 10 + dict.len() + 1;
    dict.extend(std::iter::repeat_n(' ', unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let len = u16::try_from(dict.len()).expect("a .npy v1.0 header holds at most 65535 bytes");
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header
}

/// Writes `{name}.npy` into a new `.npz` at `path` (atomically): a float32 array of shape
/// `shape` whose bytes (C order, little-endian) `fill` writes, in as many pieces as it likes.
/// It must write exactly `4 * shape.product()` bytes.
pub fn write_npz_f32<F>(path: &Path, name: &str, shape: &[usize], fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    if name.is_empty() {
        return Err(Error::invalid(path, "the array in an .npz needs a name"));
    }
    let header = npy_header_f32(shape);
    let data_len = shape.iter().try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
    let Some(data_len) = data_len else {
        return Err(Error::invalid(path, format!("array shape {shape:?} is too large")));
    };
    let entry_len = header.len() as u64 + data_len;
    write_file_atomically(path, |file| {
        let mut zip = zip::ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
        // Zip64 when the entry could reach 4 GiB; the margin covers deflate's worst-case growth.
        let large = entry_len >= (u32::MAX as u64) - (u32::MAX as u64 / 64);
        let options = zip_options()
            .compression_method(CompressionMethod::Deflated)
            .compression_level(Some(DEFLATE_LEVEL))
            .large_file(large);
        zip.start_file(format!("{name}.npy"), options).map_err(|e| zip_error(path, e))?;
        zip.write_all(&header).map_err(|e| Error::io(path, e))?;
        // Buffered so that element-sized writes do not each reach the compressor.
        let mut sink = BufWriter::with_capacity(1 << 20, Counted { inner: &mut zip, bytes: 0 });
        fill(&mut sink).map_err(|e| Error::io(path, e))?;
        let written = sink.into_inner().map_err(|e| Error::io(path, e.into_error()))?.bytes;
        if written != data_len {
            return Err(Error::invalid(
                path,
                format!("{written} bytes of array data were written where shape {shape:?} needs {data_len}"),
            ));
        }
        let buffered = zip.finish().map_err(|e| zip_error(path, e))?;
        buffered.into_inner().map_err(|e| Error::io(path, e.into_error()))
    })
}

/// [`write_npz_f32`] for an array in memory.
pub fn write_npz_f32_slice(path: &Path, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    let numel: usize = shape.iter().product();
    if numel != data.len() {
        return Err(Error::invalid(
            path,
            format!("shape {shape:?} needs {numel} values but {} were given", data.len()),
        ));
    }
    write_npz_f32(path, name, shape, |w| write_f32s(w, data))
}

/// Writes `data` as little-endian float32 bytes.
pub fn write_f32s(w: &mut dyn Write, data: &[f32]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        w.write_all(bytemuck::cast_slice(data))
    } else {
        data.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
    }
}

struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn headers_match_numpy() {
        // np.lib.format.header_data_from_array_1_0 + _wrap_header, without NumPy's spare room for
        // growing the first axis (which readers ignore).
        let h = npy_header_f32(&[2, 3]);
        assert_eq!(h.len() % 64, 0);
        assert!(h.starts_with(b"\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(h.ends_with(b" \n"));
        assert!(String::from_utf8_lossy(&npy_header_f32(&[7])).contains("'shape': (7,), }"));
        assert!(String::from_utf8_lossy(&npy_header_f32(&[])).contains("'shape': (), }"));
    }

    #[test]
    fn streamed_pieces_make_one_array() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.npz");
        let data: Vec<f32> = (0..120).map(|i| i as f32 * 0.5).collect();
        write_npz_f32(&path, "probabilities", &[2, 3, 4, 5], |w| data.chunks(7).try_for_each(|c| write_f32s(w, c)))
            .unwrap();
        let mut archive = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
        let mut entry = archive.by_name("probabilities.npy").unwrap();
        assert_eq!(entry.compression(), CompressionMethod::Deflated);
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        let header = npy_header_f32(&[2, 3, 4, 5]);
        assert_eq!(&bytes[..header.len()], header.as_slice());
        assert_eq!(&bytes[header.len()..], bytemuck::cast_slice::<f32, u8>(&data));
    }

    #[test]
    fn short_fills_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.npz");
        let e = write_npz_f32(&path, "x", &[4], |w| write_f32s(w, &[1.0; 3])).unwrap_err();
        assert!(e.to_string().contains("12 bytes of array data were written where shape [4] needs 16"), "{e}");
        assert_eq!(e.path(), path);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "files left behind");
        let e = write_npz_f32_slice(&path, "x", &[4], &[1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("needs 4 values"), "{e}");
    }
}
