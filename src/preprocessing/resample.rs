//! Resampling to the target spacing, nnU-Net's way.
//!
//! Images: cubic interpolation (Keys' cubic convolution, a = −0.5: interpolating,
//! separable, no prefilter), one axis at a time. Labels: "one-hot linear": each
//! class's mask is interpolated linearly and a voxel takes the highest class whose
//! interpolated mask reaches 0.5 (what nnU-Net's `resize_segmentation` computes with
//! one resize per class, here in one pass over the 8 neighbours). When the spacing is
//! anisotropic (coarsest/finest > 3), the coarse axis is resampled on its own with
//! nearest neighbour (nnU-Net's `order_z = 0`), the others as above.
//!
//! Output voxel `i` samples input coordinate `(i + 0.5)·n_in/n_out − 0.5` (voxel
//! centres aligned, as skimage's `resize`); samples outside clamp to the edge.

use ndarray::{Array3, ArrayView3, Axis};

/// Interpolation along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    Nearest,
    Linear,
    Cubic,
}

/// nnU-Net's anisotropy rule: which axis, if any, is resampled separately.
pub fn separate_axis(current_spacing: [f64; 3], target_spacing: [f64; 3], threshold: f64) -> Option<usize> {
    let aniso = |s: [f64; 3]| {
        let max = s.iter().cloned().fold(f64::MIN, f64::max);
        let min = s.iter().cloned().fold(f64::MAX, f64::min);
        max / min > threshold
    };
    let argmax = |s: [f64; 3]| (0..3).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap_or(0);
    if aniso(current_spacing) {
        Some(argmax(current_spacing))
    } else if aniso(target_spacing) {
        Some(argmax(target_spacing))
    } else {
        None
    }
}

/// Source index and weight of each tap for every output position along one axis.
fn taps(n_in: usize, n_out: usize, interp: Interp) -> Vec<[(usize, f32); 4]> {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    (0..n_out)
        .map(|o| {
            let x = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, last as f64);
            let i0 = x.floor() as i64;
            let t = x - i0 as f64;
            match interp {
                Interp::Nearest => {
                    let i = clamp((x + 0.5).floor() as i64);
                    [(i, 1.0), (i, 0.0), (i, 0.0), (i, 0.0)]
                }
                Interp::Linear => [(clamp(i0), (1.0 - t) as f32), (clamp(i0 + 1), t as f32), (0, 0.0), (0, 0.0)],
                Interp::Cubic => {
                    let a = -0.5;
                    let w = |d: f64| {
                        let d = d.abs();
                        if d <= 1.0 {
                            (a + 2.0) * d * d * d - (a + 3.0) * d * d + 1.0
                        } else if d < 2.0 {
                            a * d * d * d - 5.0 * a * d * d + 8.0 * a * d - 4.0 * a
                        } else {
                            0.0
                        }
                    };
                    [
                        (clamp(i0 - 1), w(t + 1.0) as f32),
                        (clamp(i0), w(t) as f32),
                        (clamp(i0 + 1), w(1.0 - t) as f32),
                        (clamp(i0 + 2), w(2.0 - t) as f32),
                    ]
                }
            }
        })
        .collect()
}

/// Resamples one axis of a standard-layout array.
fn resample_axis(data: ArrayView3<'_, f32>, axis: usize, n_out: usize, interp: Interp) -> Array3<f32> {
    let n_in = data.shape()[axis];
    let mut shape = [data.shape()[0], data.shape()[1], data.shape()[2]];
    shape[axis] = n_out;
    if n_in == n_out {
        return data.to_owned();
    }
    let taps = taps(n_in, n_out, interp);
    let mut out = Array3::<f32>::zeros(shape);
    match axis {
        2 => {
            // Rows are contiguous: resample each row in place of its output row.
            for (src_row, mut dst_row) in data.rows().into_iter().zip(out.rows_mut()) {
                let src = src_row.as_slice().expect("standard layout");
                for (d, t) in dst_row.iter_mut().zip(&taps) {
                    *d = t.iter().map(|&(i, w)| src[i] * w).sum();
                }
            }
        }
        _ => {
            // Combine whole planes/rows of the source so the inner loop runs over
            // contiguous memory.
            for (o, t) in taps.iter().enumerate() {
                let mut dst = out.index_axis_mut(Axis(axis), o);
                for &(i, w) in t.iter() {
                    if w == 0.0 {
                        continue;
                    }
                    let src = data.index_axis(Axis(axis), i);
                    dst.zip_mut_with(&src, |d, &s| *d += s * w);
                }
            }
        }
    }
    out
}

/// Resamples an image to `new_shape`: cubic, except the separate axis (if any),
/// which uses nearest neighbour. Takes the volume by value: an axis that keeps its
/// size costs no copy.
pub fn resample_image(data: Array3<f32>, new_shape: [usize; 3], separate: Option<usize>) -> Array3<f32> {
    let in_shape = [data.shape()[0], data.shape()[1], data.shape()[2]];
    let mut current = if data.is_standard_layout() { data } else { data.as_standard_layout().into_owned() };
    // Shrinking axes first keeps the intermediate volumes small.
    let mut order = [0usize, 1, 2];
    order.sort_by(|&a, &b| {
        let ra = new_shape[a] as f64 / in_shape[a] as f64;
        let rb = new_shape[b] as f64 / in_shape[b] as f64;
        ra.total_cmp(&rb)
    });
    for axis in order {
        if current.shape()[axis] == new_shape[axis] {
            continue;
        }
        let interp = if Some(axis) == separate { Interp::Nearest } else { Interp::Cubic };
        current = resample_axis(current.view(), axis, new_shape[axis], interp);
    }
    current
}

/// Resamples a label map to `new_shape` with one-hot linear interpolation (nearest
/// along the separate axis, if any).
pub fn resample_labels(labels: &Array3<u8>, new_shape: [usize; 3], separate: Option<usize>) -> Array3<u8> {
    let shape = [labels.shape()[0], labels.shape()[1], labels.shape()[2]];
    if shape == new_shape {
        return labels.clone();
    }
    let interp = |a: usize| if Some(a) == separate { Interp::Nearest } else { Interp::Linear };
    let tz = taps(shape[0], new_shape[0], interp(0));
    let ty = taps(shape[1], new_shape[1], interp(1));
    let tx = taps(shape[2], new_shape[2], interp(2));
    let src = labels.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    let (sy, sz) = (shape[2], shape[1] * shape[2]);
    let mut out = Array3::<u8>::zeros(new_shape);
    let dst = out.as_slice_mut().expect("standard layout");
    let mut idx = 0;
    for z in &tz {
        for y in &ty {
            // The (z, y) neighbours of this output row and their weights, found once.
            let mut rows = [(0usize, 0f32); 4];
            let mut n_rows = 0;
            for &(iz, wz) in &z[..2] {
                for &(iy, wy) in &y[..2] {
                    if wz * wy > 0.0 {
                        rows[n_rows] = (iz * sz + iy * sy, wz * wy);
                        n_rows += 1;
                    }
                }
            }
            let rows = &rows[..n_rows];
            for x in &tx {
                let first = src[rows[0].0 + x[0].0];
                // Most voxels lie inside one structure: all neighbours agree.
                let uniform =
                    rows.iter().all(|&(r, _)| src[r + x[0].0] == first && (x[1].1 <= 0.0 || src[r + x[1].0] == first));
                if uniform {
                    dst[idx] = first;
                    idx += 1;
                    continue;
                }
                // Sum the weight of each label among the (up to 8) neighbours.
                let mut labels_seen = [0u8; 8];
                let mut weights = [0f32; 8];
                let mut n = 0usize;
                for &(r, wzy) in rows {
                    for &(ix, wx) in &x[..2] {
                        let w = wzy * wx;
                        if w <= 0.0 {
                            continue;
                        }
                        let l = src[r + ix];
                        match labels_seen[..n].iter().position(|&s| s == l) {
                            Some(k) => weights[k] += w,
                            None => {
                                labels_seen[n] = l;
                                weights[n] = w;
                                n += 1;
                            }
                        }
                    }
                }
                let mut best = 0u8;
                for k in 0..n {
                    // Highest class reaching 0.5 wins, as nnU-Net assigns classes in order.
                    if weights[k] >= 0.5 - 1e-6 && labels_seen[k] > best {
                        best = labels_seen[k];
                    }
                }
                dst[idx] = best;
                idx += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_stays_constant() {
        let data = Array3::from_elem((7, 9, 11), 42.5f32);
        for shape in [[14, 9, 5], [3, 20, 11], [7, 9, 11]] {
            for sep in [None, Some(0)] {
                let out = resample_image(data.clone(), shape, sep);
                assert_eq!(out.shape(), shape);
                assert!(out.iter().all(|&v| (v - 42.5).abs() < 1e-4));
            }
        }
    }

    #[test]
    fn a_linear_ramp_stays_linear_in_the_interior() {
        // v = 2x + 3y − z on voxel centres; upsample by 2 and check against the
        // ramp at the mapped coordinates away from the clamped border.
        let data = Array3::from_shape_fn((10, 12, 14), |(z, y, x)| 2.0 * x as f32 + 3.0 * y as f32 - z as f32);
        let shape = [20, 24, 28];
        let out = resample_image(data.clone(), shape, None);
        let coord = |o: usize, n_in: usize, n_out: usize| (o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5;
        for z in 4..16 {
            for y in 4..20 {
                for x in 4..24 {
                    let want = 2.0 * coord(x, 14, 28) + 3.0 * coord(y, 12, 24) - coord(z, 10, 20);
                    assert!((out[[z, y, x]] as f64 - want).abs() < 1e-3, "{z} {y} {x}");
                }
            }
        }
    }

    #[test]
    fn label_volumes_are_preserved() {
        // A sphere of label 3 inside a box of label 1: volume fractions survive
        // resampling to a different grid within a few percent.
        let lab = Array3::from_shape_fn((40, 48, 48), |(z, y, x)| {
            let d = ((z as f64 - 20.0).powi(2) + (y as f64 - 24.0).powi(2) + (x as f64 - 24.0).powi(2)).sqrt();
            if d < 10.0 {
                3u8
            } else if (8..40).contains(&y) && (6..42).contains(&x) {
                1
            } else {
                0
            }
        });
        let count = |a: &Array3<u8>, l: u8| a.iter().filter(|&&v| v == l).count() as f64;
        for (shape, sep) in [([60, 30, 30], None), ([20, 72, 72], None), ([13, 48, 48], Some(0))] {
            let out = resample_labels(&lab, shape, sep);
            let scale = (shape.iter().product::<usize>() as f64) / (40.0 * 48.0 * 48.0);
            for l in [1u8, 3] {
                let ratio = count(&out, l) / (count(&lab, l) * scale);
                assert!((ratio - 1.0).abs() < 0.06, "label {l} to {shape:?}: ratio {ratio}");
            }
            assert!(out.iter().all(|&v| v == 0 || v == 1 || v == 3));
        }
    }

    #[test]
    fn identical_shape_is_the_identity_and_nearest_picks_existing_values() {
        let lab = Array3::from_shape_fn((5, 6, 7), |(z, y, x)| ((z + y + x) % 4) as u8);
        assert_eq!(resample_labels(&lab, [5, 6, 7], None), lab);
        let img = lab.mapv(f32::from);
        let out = resample_image(img.clone(), [10, 6, 7], Some(0));
        for z in 0..10 {
            assert_eq!(out.index_axis(Axis(0), z), img.index_axis(Axis(0), z / 2));
        }
    }

    #[test]
    fn separate_axis_follows_the_anisotropy_rule() {
        assert_eq!(separate_axis([5.0, 0.8, 0.8], [2.0, 0.8, 0.8], 3.0), Some(0));
        assert_eq!(separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0), None);
        assert_eq!(separate_axis([1.0, 1.0, 1.0], [4.0, 1.0, 1.0], 3.0), Some(0));
    }
}
