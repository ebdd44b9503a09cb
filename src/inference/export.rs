//! From network-grid logits to the input's grid, as nnU-Net's
//! `convert_predicted_logits_to_segmentation_with_correct_shape`: the **logits** are
//! resampled to the cropped input shape (linear, `order=1`; nearest along nnU-Net's
//! separate axis), then arg-maxed; outside the crop is background. Slab by slab: a
//! few resampled slices are in memory, never the whole score volume.
//!
//! With `--save-probabilities`, the softmax of the resampled logits is written as
//! nnU-Net does (`CASE.npz` with `probabilities` `[K, z, y, x]` float32, background 1
//! outside the crop, and `CASE.pkl` with the properties its ensembling reads), through
//! per-class temporary files so that memory stays bounded.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::preprocessing::resample::{linear_taps, nearest_indices};

/// One output position's source: two indices and the weight of the second.
#[derive(Debug, Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    t: f32,
}

fn axis_taps(n_in: usize, n_out: usize, nearest: bool) -> Vec<Tap> {
    if nearest {
        nearest_indices(n_in, n_out).into_iter().map(|i| Tap { i0: i, i1: i, t: 0.0 }).collect()
    } else {
        linear_taps(n_in, n_out).into_iter().map(|(i0, i1, t)| Tap { i0, i1, t: t as f32 }).collect()
    }
}

/// Streams network-grid logit slices (along z, in order) into input-grid slices.
pub struct LogitsToGrid {
    classes: usize,
    src: [usize; 3],
    dst: [usize; 3],
    taps: [Vec<Tap>; 3],
    /// In-plane resampled source slices still needed: (source z, `[K][y][x]`).
    pending: VecDeque<(usize, Vec<f32>)>,
    received: usize,
    next_out: usize,
    scratch: Vec<f32>,
}

impl LogitsToGrid {
    /// `separate`: the axis resampled with nearest neighbour (nnU-Net's `order_z = 0`).
    pub fn new(classes: usize, src: [usize; 3], dst: [usize; 3], separate: Option<usize>) -> LogitsToGrid {
        let taps = std::array::from_fn(|a| axis_taps(src[a], dst[a], separate == Some(a)));
        LogitsToGrid {
            classes,
            src,
            dst,
            taps,
            pending: VecDeque::new(),
            received: 0,
            next_out: 0,
            scratch: Vec::new(),
        }
    }

    /// Takes `[K][zr][y][x]` network-grid logits (the next `zr` slices) and calls
    /// `out(z, slice)` with every input-grid slice `[K][y][x]` now complete, in order.
    pub fn push(&mut self, logits: &[f32], zr: usize, mut out: impl FnMut(usize, &[f32])) {
        let [_, sy, sx] = self.src;
        let plane = sy * sx;
        assert_eq!(logits.len(), self.classes * zr * plane, "logit slab of the wrong size");
        for dz in 0..zr {
            let z = self.received + dz;
            // A source slice no output reads is skipped (strong downsampling along z).
            let needed = self.taps[0][self.next_out..].iter().any(|t| t.i0 == z || t.i1 == z);
            if needed {
                let slice = self.in_plane(logits, zr, dz);
                self.pending.push_back((z, slice));
            }
            self.emit(z, &mut out);
        }
        self.received += zr;
    }

    /// Whether every input-grid slice has been produced.
    pub fn done(&self) -> bool {
        self.next_out == self.dst[0]
    }

    fn emit(&mut self, last_received: usize, out: &mut impl FnMut(usize, &[f32])) {
        let [_, dy, dx] = self.dst;
        let n = self.classes * dy * dx;
        while self.next_out < self.dst[0] {
            let t = self.taps[0][self.next_out];
            if t.i1.max(t.i0) > last_received {
                break;
            }
            let find = |z: usize| self.pending.iter().find(|(s, _)| *s == z).map(|(_, v)| v.as_slice());
            let (a, b) = (find(t.i0).expect("tapped slice kept"), find(t.i1).expect("tapped slice kept"));
            self.scratch.resize(n, 0.0);
            if t.t == 0.0 || t.i0 == t.i1 {
                self.scratch.copy_from_slice(a);
            } else {
                for ((d, &u), &v) in self.scratch.iter_mut().zip(a).zip(b) {
                    *d = u + (v - u) * t.t;
                }
            }
            out(self.next_out, &self.scratch);
            self.next_out += 1;
            // Drop slices no later output reads.
            let lowest = self.taps[0].get(self.next_out).map(|t| t.i0.min(t.i1)).unwrap_or(usize::MAX);
            while self.pending.front().is_some_and(|(s, _)| *s < lowest) {
                self.pending.pop_front();
            }
        }
    }

    /// Source slice `dz` of the slab resampled in-plane: along x, then y.
    fn in_plane(&self, logits: &[f32], zr: usize, dz: usize) -> Vec<f32> {
        let [_, sy, sx] = self.src;
        let [_, dy, dx] = self.dst;
        let (ty, tx) = (&self.taps[1], &self.taps[2]);
        let mut rows = vec![0f32; sy * dx];
        let mut res = vec![0f32; self.classes * dy * dx];
        for k in 0..self.classes {
            let src = &logits[(k * zr + dz) * sy * sx..(k * zr + dz + 1) * sy * sx];
            for (row, dst) in src.chunks(sx).zip(rows.chunks_mut(dx)) {
                for (d, t) in dst.iter_mut().zip(tx) {
                    *d = row[t.i0] + (row[t.i1] - row[t.i0]) * t.t;
                }
            }
            let plane = &mut res[k * dy * dx..(k + 1) * dy * dx];
            for (dst, t) in plane.chunks_mut(dx).zip(ty) {
                let (r0, r1) = (&rows[t.i0 * dx..(t.i0 + 1) * dx], &rows[t.i1 * dx..(t.i1 + 1) * dx]);
                for ((d, &u), &v) in dst.iter_mut().zip(r0).zip(r1) {
                    *d = u + (v - u) * t.t;
                }
            }
        }
        res
    }
}

/// The class of every voxel of a `[K][n]` slice: the first largest logit (as torch's
/// argmax).
pub fn argmax_into(slice: &[f32], classes: usize, labels: &mut [u8]) {
    let n = labels.len();
    assert_eq!(slice.len(), classes * n);
    labels.fill(0);
    let mut best: Vec<f32> = slice[..n].to_vec();
    for k in 1..classes {
        for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(&slice[k * n..(k + 1) * n]) {
            if v > *b {
                *b = v;
                *l = k as u8;
            }
        }
    }
}

/// Per-voxel softmax of a `[K][n]` slice, in place.
pub fn softmax_in_place(slice: &mut [f32], classes: usize) {
    let n = slice.len() / classes;
    for i in 0..n {
        let max = (0..classes).map(|k| slice[k * n + i]).fold(f32::MIN, f32::max);
        let mut sum = 0.0f32;
        for k in 0..classes {
            let e = (slice[k * n + i] - max).exp();
            slice[k * n + i] = e;
            sum += e;
        }
        for k in 0..classes {
            slice[k * n + i] /= sum;
        }
    }
}

/// Softmax probabilities of the cropped region, spilled per class to temporary files,
/// then written as nnU-Net's `.npz` on the full grid.
pub struct ProbabilityWriter {
    classes: usize,
    files: Vec<BufWriter<std::fs::File>>,
    /// Every temporary file, removed when the writer goes, whatever happened.
    paths: TemporaryFiles,
}

/// Paths removed on drop.
struct TemporaryFiles(Vec<PathBuf>);

impl Drop for TemporaryFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl ProbabilityWriter {
    pub fn new(out_npz: &Path, classes: usize) -> Result<ProbabilityWriter> {
        let dir = out_npz.parent().unwrap_or(Path::new("."));
        let stem = out_npz.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut paths = TemporaryFiles(Vec::with_capacity(classes));
        let mut files = Vec::with_capacity(classes);
        for k in 0..classes {
            let path = dir.join(format!(".{stem}.{}.class{k}.tmp", std::process::id()));
            let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            paths.0.push(path);
            files.push(BufWriter::new(f));
        }
        Ok(ProbabilityWriter { classes, files, paths })
    }

    /// Appends one cropped-grid slice of logits (turned into probabilities here).
    pub fn push(&mut self, logits: &[f32]) -> Result<()> {
        let mut p = logits.to_vec();
        softmax_in_place(&mut p, self.classes);
        let n = p.len() / self.classes;
        for (k, (w, path)) in self.files.iter_mut().zip(&self.paths.0).enumerate() {
            crate::interop::npz::write_f32s(w, &p[k * n..(k + 1) * n]).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    /// Writes `path` (`probabilities`, `[K, z, y, x]` on the full grid `shape`, the
    /// crop `bbox` filled from the spilled slices, background 1 elsewhere) and removes
    /// the temporary files.
    pub fn finish(self, path: &Path, shape: [usize; 3], bbox: [[usize; 2]; 3]) -> Result<()> {
        let ProbabilityWriter { classes, files, paths } = self;
        let mut readers = Vec::with_capacity(classes);
        for (w, p) in files.into_iter().zip(&paths.0) {
            w.into_inner().map_err(|e| Error::io(p, e.into_error()))?;
            let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
            readers.push(BufReader::new(f));
        }
        let full = [classes, shape[0], shape[1], shape[2]];
        let crop_x = bbox[2][1] - bbox[2][0];
        let result = crate::interop::npz::write_npz_f32(path, "probabilities", &full, |w: &mut dyn Write| {
            let mut row = vec![0f32; shape[2]];
            let mut bytes = vec![0u8; crop_x * 4];
            for (k, r) in readers.iter_mut().enumerate() {
                let outside = if k == 0 { 1.0 } else { 0.0 };
                for z in 0..shape[0] {
                    for y in 0..shape[1] {
                        row.fill(outside);
                        let inside = (bbox[0][0]..bbox[0][1]).contains(&z) && (bbox[1][0]..bbox[1][1]).contains(&y);
                        if inside {
                            r.read_exact(&mut bytes)?;
                            for (d, b) in row[bbox[2][0]..bbox[2][1]].iter_mut().zip(bytes.chunks_exact(4)) {
                                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                            }
                        }
                        crate::interop::npz::write_f32s(w, &row)?;
                    }
                }
            }
            Ok(())
        });
        // `paths` goes here and takes the temporary files with it.
        drop(readers);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed result equals resampling the whole volume at once, axis by axis.
    #[test]
    fn streaming_equals_whole_volume_resampling() {
        let (k, src, dst) = (3usize, [7usize, 5, 6], [17usize, 9, 4]);
        let n: usize = src.iter().product();
        let logits: Vec<f32> = (0..k * n).map(|i| ((i * 37 % 101) as f32 * 0.1).sin()).collect();
        for sep in [None, Some(0)] {
            let whole = {
                let taps: [Vec<Tap>; 3] = std::array::from_fn(|a| axis_taps(src[a], dst[a], sep == Some(a)));
                let at = |c: usize, z: usize, y: usize, x: usize| logits[((c * src[0] + z) * src[1] + y) * src[2] + x];
                let lerp1 = |c: usize, z: usize, y: usize, tx: Tap| {
                    at(c, z, y, tx.i0) + (at(c, z, y, tx.i1) - at(c, z, y, tx.i0)) * tx.t
                };
                let lerp2 = |c: usize, z: usize, ty: Tap, tx: Tap| {
                    let (a, b) = (lerp1(c, z, ty.i0, tx), lerp1(c, z, ty.i1, tx));
                    a + (b - a) * ty.t
                };
                let mut v = Vec::new();
                for z in 0..dst[0] {
                    for c in 0..k {
                        for y in 0..dst[1] {
                            for x in 0..dst[2] {
                                let (tz, ty, tx) = (taps[0][z], taps[1][y], taps[2][x]);
                                let (a, b) = (lerp2(c, tz.i0, ty, tx), lerp2(c, tz.i1, ty, tx));
                                v.push(a + (b - a) * tz.t);
                            }
                        }
                    }
                }
                v
            };
            // Feed the slices in uneven slabs.
            let mut r = LogitsToGrid::new(k, src, dst, sep);
            let mut got = Vec::new();
            let mut z = 0;
            for zr in [2, 1, 3, 1] {
                let mut slab = Vec::new();
                for c in 0..k {
                    for dz in 0..zr {
                        let s = ((c * src[0] + z + dz) * src[1]) * src[2];
                        slab.extend_from_slice(&logits[s..s + src[1] * src[2]]);
                    }
                }
                r.push(&slab, zr, |oz, s| {
                    assert_eq!(oz, got.len() / (k * dst[1] * dst[2]));
                    got.extend_from_slice(s);
                });
                z += zr;
            }
            assert!(r.done());
            assert_eq!(got.len(), whole.len());
            let max = got.iter().zip(&whole).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(max < 1e-5, "{sep:?}: {max}");
        }
    }

    #[test]
    fn probability_files_leave_no_temporary_files_behind() {
        let dir = tempfile::tempdir().unwrap();
        let npz = dir.path().join("case.npz");
        // Abandoned midway (an error elsewhere): the spilled classes go.
        let mut w = ProbabilityWriter::new(&npz, 2).unwrap();
        w.push(&[0.0, 1.0, 2.0, 3.0]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Finished: only the .npz is left.
        let mut w = ProbabilityWriter::new(&npz, 2).unwrap();
        w.push(&[0.0, 1.0, 2.0, 3.0]).unwrap();
        w.finish(&npz, [1, 2, 2], [[0, 1], [0, 1], [0, 2]]).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["case.npz"]);
    }

    #[test]
    fn argmax_takes_the_first_largest_and_softmax_sums_to_one() {
        let slice = [0.0, 2.0, 1.0, 2.0, 0.5, 1.0];
        let mut l = [9u8; 2];
        argmax_into(&slice, 3, &mut l);
        assert_eq!(l, [1, 0]);
        let mut p = slice.to_vec();
        softmax_in_place(&mut p, 3);
        assert!(((p[0] + p[2] + p[4]) - 1.0).abs() < 1e-6 && ((p[1] + p[3] + p[5]) - 1.0).abs() < 1e-6);
    }
}
