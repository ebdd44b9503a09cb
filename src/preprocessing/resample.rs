//! Resampling to the target spacing, computing what nnU-Net v2 computes
//! (`nnunetv2/preprocessing/resampling/default_resampling.py` with the default plans:
//! images `order = 3`, labels `order = 1`, `order_z = 0`, `force_separate_z = None`).
//!
//! Output voxel `k` of an axis resized from `n_in` to `n_out` samples the input at
//! `(k + 0.5)·n_in/n_out − 0.5` (voxel centres aligned: skimage's `resize`, which calls
//! scipy's `zoom` with `grid_mode=True`).
//!
//! **Images** are interpolated with the cubic B-spline (skimage `resize(order=3,
//! mode='edge', anti_aliasing=False)`): each line is first extended by 12 copies of its
//! edge voxel on both sides (scipy pads this way before prefiltering in mode `nearest`),
//! then turned into B-spline coefficients by the recursive prefilter (pole √3 − 2, the
//! half-sample-symmetric start values scipy uses for that mode), then the spline is
//! evaluated at the sample positions. The tensor-product spline is separable, so this
//! runs one axis at a time over f32 volumes, each line in f64. The result is clipped to
//! the input's value range (skimage's `clip=True`).
//!
//! **Labels** follow `resize_segmentation` as installed with nnU-Net (batchgenerators
//! 0.25.5): every label's indicator is interpolated linearly (with scipy's exact weights
//! and summation order, because ties are decided by exact equality) and the voxel takes
//! the label with the highest score; where several labels share the top score, the
//! nearest-neighbour label wins if it is one of them, otherwise the smallest of them.
//!
//! **Anisotropy** ([`separate_axis`]): when one axis is resampled separately, each slice
//! perpendicular to it is resized in-plane as above (images clipped per slice), and the
//! separate axis takes the nearest slice, rounding like scipy's order-0 interpolation:
//! `floor(x + 0.5)`, so exact halves go up.

use ndarray::{Array3, Axis};

/// Voxels of edge padding scipy adds to each side before the spline prefilter.
const PAD: usize = 12;
/// The pole of the cubic B-spline prefilter, √3 − 2.
const POLE: f64 = -0.267_949_192_431_122_7;
/// Lines filtered together: one panel of `LANES` lines is the unit of work.
const LANES: usize = 32;
/// Terms of the prefilter's start sum that can matter: |pole|^40 ≈ 1e-23.
const INIT_TERMS: usize = 40;

/// nnU-Net's `compute_new_shape`: `int(round(old_spacing / new_spacing * old_shape))`
/// per axis, rounding halves to even as Python does.
pub fn compute_new_shape(old_shape: [usize; 3], old_spacing: [f64; 3], new_spacing: [f64; 3]) -> [usize; 3] {
    // At least one voxel (nnU-Net would go on with an empty axis and fail later).
    std::array::from_fn(|a| ((old_spacing[a] / new_spacing[a] * old_shape[a] as f64).round_ties_even() as usize).max(1))
}

/// nnU-Net's anisotropy rule (`determine_do_sep_z_and_axis` with `force_separate_z =
/// None`): if the current spacing is anisotropic (coarsest/finest > `threshold`), the
/// separate axis is its coarsest axis; otherwise, if the target spacing is, the target's
/// coarsest axis. Two or three equally coarse axes mean no separate axis.
pub fn separate_axis(current_spacing: [f64; 3], target_spacing: [f64; 3], threshold: f64) -> Option<usize> {
    let max = |s: [f64; 3]| s[0].max(s[1]).max(s[2]);
    let min = |s: [f64; 3]| s[0].min(s[1]).min(s[2]);
    let aniso = |s: [f64; 3]| max(s) / min(s) > threshold;
    let spacing = if aniso(current_spacing) {
        current_spacing
    } else if aniso(target_spacing) {
        target_spacing
    } else {
        return None;
    };
    let coarsest = max(spacing);
    let mut axes = (0..3).filter(|&a| coarsest / spacing[a] == 1.0);
    match (axes.next(), axes.next()) {
        (Some(a), None) => Some(a),
        _ => None,
    }
}

/// Input coordinate sampled by output voxel `k` when `zoom = n_in / n_out`, with scipy's
/// operation order.
fn source_coord(k: usize, zoom: f64) -> f64 {
    (k as f64 + 0.5) * zoom - 0.5
}

/// Nearest input index for every output voxel, as scipy's order-0 interpolation in mode
/// `nearest` picks it: `floor(x + 0.5)` clamped to the axis (exact halves go up).
pub fn nearest_indices(n_in: usize, n_out: usize) -> Vec<usize> {
    let zoom = n_in as f64 / n_out as f64;
    (0..n_out).map(|k| ((source_coord(k, zoom) + 0.5).floor().max(0.0) as usize).min(n_in - 1)).collect()
}

/// The cubic B-spline evaluation along one axis: for every output voxel, four indices
/// into the padded coefficient line and their weights.
fn cubic_taps(n_in: usize, n_out: usize) -> Vec<([usize; 4], [f64; 4])> {
    let zoom = n_in as f64 / n_out as f64;
    let last = (n_in + 2 * PAD - 1) as i64;
    (0..n_out)
        .map(|k| {
            let c = source_coord(k, zoom) + PAD as f64;
            let f = c.floor();
            let start = f as i64 - 1;
            let (y, z) = (c - f, 1.0 - (c - f));
            let w0 = z * z * z / 6.0;
            let w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0;
            let w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0;
            let w3 = 1.0 - w0 - w1 - w2;
            let idx = std::array::from_fn(|t| (start + t as i64).clamp(0, last) as usize);
            (idx, [w0, w1, w2, w3])
        })
        .collect()
}

/// Turns a panel of `w` edge-padded lines of length `m` (row `p` holds sample `p` of
/// every line, already multiplied by the filter gain) into B-spline coefficients.
fn prefilter(c: &mut [f64], m: usize, w: usize) {
    let z = POLE;
    let zn = z.powi(m as i32);
    // Causal start value: the half-sample-symmetric extension of the line.
    let mut sum = [0f64; LANES];
    let sum = &mut sum[..w];
    let (first, last) = (&c[..w], &c[(m - 1) * w..m * w]);
    for ((s, &a), &b) in sum.iter_mut().zip(first).zip(last) {
        *s = a + zn * b;
    }
    let mut zi = z;
    for i in 1..m.min(INIT_TERMS) {
        let (a, b) = (&c[i * w..(i + 1) * w], &c[(m - 1 - i) * w..(m - i) * w]);
        for ((s, &a), &b) in sum.iter_mut().zip(a).zip(b) {
            *s += zi * (a + zn * b);
        }
        zi *= z;
    }
    let denom = 1.0 - zn * zn;
    for (c0, &s) in c[..w].iter_mut().zip(sum.iter()) {
        *c0 += s * z / denom;
    }
    for p in 1..m {
        let (prev, cur) = c[(p - 1) * w..(p + 1) * w].split_at_mut(w);
        for (c, &q) in cur.iter_mut().zip(prev.iter()) {
            *c += z * q;
        }
    }
    let end = z / (z - 1.0);
    for c in &mut c[(m - 1) * w..m * w] {
        *c *= end;
    }
    for p in (0..m - 1).rev() {
        let (cur, next) = c[p * w..(p + 2) * w].split_at_mut(w);
        for (c, &n) in cur.iter_mut().zip(next.iter()) {
            *c = z * (n - *c);
        }
    }
}

/// Evaluates the spline of a prefiltered panel at one output position.
fn evaluate(c: &[f64], w: usize, idx: &[usize; 4], wt: &[f64; 4], dst: &mut [f32]) {
    let row = |t: usize| &c[idx[t] * w..(idx[t] + 1) * w];
    let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
    for ((((d, &a), &b), &e), &f) in dst.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
        *d = (wt[0] * a + wt[1] * b + wt[2] * e + wt[3] * f) as f32;
    }
}

/// Resizes one axis of a standard-layout volume with the cubic B-spline (no clipping).
/// `src` holds a C-order volume of `shape`; `out` receives the result (its old contents,
/// and any memory it already has, are reused: every element is overwritten).
fn cubic_axis(src: &[f32], shape: [usize; 3], axis: usize, n_out: usize, out: &mut Vec<f32>) {
    let n = shape[axis];
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let len = outer * n_out * inner;
    if out.len() >= len {
        out.truncate(len);
    } else {
        out.resize(len, 0.0);
    }
    let taps = cubic_taps(n, n_out);
    let m = n + 2 * PAD;
    let gain = (1.0 - POLE) * (1.0 - 1.0 / POLE);
    let mut panel = vec![0f64; m * LANES];
    if inner > 1 {
        // Lanes are neighbouring voxels of the same line set: whole rows of the panel
        // come from contiguous memory.
        for o in 0..outer {
            let src_o = &src[o * n * inner..(o + 1) * n * inner];
            let out_o = &mut out[o * n_out * inner..(o + 1) * n_out * inner];
            for j0 in (0..inner).step_by(LANES) {
                let w = LANES.min(inner - j0);
                let c = &mut panel[..m * w];
                for (p, row) in c.chunks_exact_mut(w).enumerate() {
                    let i = p.saturating_sub(PAD).min(n - 1);
                    for (d, &s) in row.iter_mut().zip(&src_o[i * inner + j0..i * inner + j0 + w]) {
                        *d = f64::from(s) * gain;
                    }
                }
                prefilter(c, m, w);
                for (k, (idx, wt)) in taps.iter().enumerate() {
                    evaluate(c, w, idx, wt, &mut out_o[k * inner + j0..k * inner + j0 + w]);
                }
            }
        }
    } else {
        // The last axis: lanes are separate rows, transposed into the panel.
        let mut vals = [0f32; LANES];
        for o0 in (0..outer).step_by(LANES) {
            let w = LANES.min(outer - o0);
            let c = &mut panel[..m * w];
            for l in 0..w {
                let line = &src[(o0 + l) * n..(o0 + l + 1) * n];
                let (head, tail) = (f64::from(line[0]) * gain, f64::from(line[n - 1]) * gain);
                let mut rows = c[l..].iter_mut().step_by(w);
                rows.by_ref().take(PAD).for_each(|d| *d = head);
                rows.by_ref().zip(line).for_each(|(d, &s)| *d = f64::from(s) * gain);
                rows.for_each(|d| *d = tail);
            }
            prefilter(c, m, w);
            for (k, (idx, wt)) in taps.iter().enumerate() {
                evaluate(c, w, idx, wt, &mut vals[..w]);
                for (l, &v) in vals[..w].iter().enumerate() {
                    out[(o0 + l) * n_out + k] = v;
                }
            }
        }
    }
}

/// Cubic B-spline resize of the given axes (each to its size in `new_shape`), shrinking
/// axes first so that the intermediate volumes stay small. The passes alternate between
/// two buffers, the input volume's being one of them: memory that is already mapped is
/// reused instead of faulting in fresh pages.
fn cubic_axes(vol: Array3<f32>, axes: &[usize], new_shape: [usize; 3]) -> Array3<f32> {
    let mut shape = [vol.shape()[0], vol.shape()[1], vol.shape()[2]];
    let mut order: Vec<usize> = axes.iter().copied().filter(|&a| shape[a] != new_shape[a]).collect();
    if order.is_empty() {
        return vol;
    }
    order.sort_by(|&a, &b| {
        let r = |x: usize| new_shape[x] as f64 / shape[x] as f64;
        r(a).total_cmp(&r(b))
    });
    // `select` may hand back other layouts; an owned array may start at an offset.
    let vol = if vol.is_standard_layout() { vol } else { vol.as_standard_layout().into_owned() };
    let len = vol.len();
    let mut current = match vol.into_raw_vec_and_offset() {
        (v, Some(0)) if v.len() == len => v,
        (v, offset) => v[offset.unwrap_or(0)..offset.unwrap_or(0) + len].to_vec(),
    };
    let mut spare = Vec::new();
    for axis in order {
        cubic_axis(&current, shape, axis, new_shape[axis], &mut spare);
        std::mem::swap(&mut current, &mut spare);
        shape[axis] = new_shape[axis];
    }
    drop(spare);
    current.shrink_to_fit();
    Array3::from_shape_vec(shape, current).expect("shape matches")
}

fn value_range<'a>(values: impl IntoIterator<Item = &'a f32>) -> (f32, f32) {
    values.into_iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn clip(values: &mut Array3<f32>, (lo, hi): (f32, f32)) {
    values.mapv_inplace(|v| v.max(lo).min(hi));
}

/// Resamples an image to `new_shape` as nnU-Net does (cubic B-spline; along the
/// separate axis, if any, the nearest slice). Takes the volume by value: an unchanged
/// shape costs no copy.
pub fn resample_image(data: Array3<f32>, new_shape: [usize; 3], separate: Option<usize>) -> Array3<f32> {
    let in_shape = [data.shape()[0], data.shape()[1], data.shape()[2]];
    if in_shape == new_shape {
        return data;
    }
    if in_shape.contains(&0) || new_shape.contains(&0) {
        return Array3::zeros(new_shape);
    }
    let data = if data.is_standard_layout() { data } else { data.as_standard_layout().into_owned() };
    let Some(sep) = separate else {
        let range = value_range(data.iter());
        let mut out = cubic_axes(data, &[0, 1, 2], new_shape);
        clip(&mut out, range);
        return out;
    };
    // Each slice perpendicular to `sep` is resized on its own and clipped to its own
    // range; the slices are then picked by nearest neighbour. Picking commutes with the
    // in-plane work, so it runs first when it shrinks the volume.
    let plane: Vec<usize> = (0..3).filter(|&a| a != sep).collect();
    let (n_in, n_out) = (in_shape[sep], new_shape[sep]);
    let pick = nearest_indices(n_in, n_out);
    let in_plane_changes = plane.iter().any(|&a| in_shape[a] != new_shape[a]);
    if !in_plane_changes {
        return data.select(Axis(sep), &pick);
    }
    let ranges: Vec<(f32, f32)> = data.axis_iter(Axis(sep)).map(|s| value_range(s.iter())).collect();
    let resize_and_clip = |vol: Array3<f32>, ranges: &[(f32, f32)]| {
        let mut out = cubic_axes(vol, &plane, new_shape);
        for (mut slice, &(lo, hi)) in out.axis_iter_mut(Axis(sep)).zip(ranges) {
            slice.mapv_inplace(|v| v.max(lo).min(hi));
        }
        out
    };
    if n_out == n_in {
        resize_and_clip(data, &ranges)
    } else if n_out < n_in {
        let picked_ranges: Vec<(f32, f32)> = pick.iter().map(|&i| ranges[i]).collect();
        resize_and_clip(data.select(Axis(sep), &pick), &picked_ranges)
    } else {
        resize_and_clip(data, &ranges).select(Axis(sep), &pick)
    }
}

/// Linear interpolation along one axis: the two input indices and weights of every
/// output voxel (scipy's order-1 weights), how many of them weigh more than 0 (the
/// first always does), and its nearest input index.
#[derive(Clone, Copy)]
struct LinearTap {
    idx: [usize; 2],
    w: [f64; 2],
    n: usize,
    nearest: usize,
}

/// Linear interpolation along one axis as scipy's order-1 `zoom` (grid mode, mode
/// `nearest`) computes it: for every output voxel the two input indices (clamped to the
/// axis) and the weight `t` of the second; the first weighs `1 − t` (up to rounding:
/// scipy's own first weight is `1 − frac`, and `t = 1 − (1 − frac)`).
pub fn linear_taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f64)> {
    scipy_linear(n_in, n_out).map(|(i0, i1, [_, t])| (i0, i1, t)).collect()
}

/// scipy's order-1 taps with both weights exactly as it computes them.
fn scipy_linear(n_in: usize, n_out: usize) -> impl Iterator<Item = (usize, usize, [f64; 2])> {
    let zoom = n_in as f64 / n_out as f64;
    let last = n_in as i64 - 1;
    (0..n_out).map(move |k| {
        let c = source_coord(k, zoom);
        let f = c.floor();
        let w0 = 1.0 - (c - f);
        let i0 = f as i64;
        (i0.clamp(0, last) as usize, (i0 + 1).clamp(0, last) as usize, [w0, 1.0 - w0])
    })
}

fn label_taps(n_in: usize, n_out: usize, nearest_only: bool) -> Vec<LinearTap> {
    let nearest = nearest_indices(n_in, n_out);
    if nearest_only {
        // Order 0 along this axis: one tap of weight 1, which multiplies exactly.
        return nearest.into_iter().map(|i| LinearTap { idx: [i; 2], w: [1.0, 0.0], n: 1, nearest: i }).collect();
    }
    scipy_linear(n_in, n_out)
        .zip(nearest)
        .map(|((i0, i1, w), nearest)| LinearTap { idx: [i0, i1], w, n: if w[1] == 0.0 { 1 } else { 2 }, nearest })
        .collect()
}

/// Resamples a label map to `new_shape` as nnU-Net's `resize_segmentation` (order 1)
/// does: per-label linear scores, the highest wins, exact ties go to the nearest
/// neighbour's label when it is among them, else to the smallest. Along the separate
/// axis, if any, the nearest slice.
pub fn resample_labels(labels: &Array3<u8>, new_shape: [usize; 3], separate: Option<usize>) -> Array3<u8> {
    let shape = [labels.shape()[0], labels.shape()[1], labels.shape()[2]];
    if shape == new_shape {
        return labels.clone();
    }
    if shape.contains(&0) || new_shape.contains(&0) {
        return Array3::zeros(new_shape);
    }
    let taps: [Vec<LinearTap>; 3] = std::array::from_fn(|a| label_taps(shape[a], new_shape[a], Some(a) == separate));
    let src = labels.as_standard_layout();
    let src = src.as_slice().expect("standard layout");
    let (sy, sz) = (shape[2], shape[1] * shape[2]);
    let x_unchanged = shape[2] == new_shape[2];
    let mut out = Array3::<u8>::zeros(new_shape);
    let dst = out.as_slice_mut().expect("standard layout");
    let mut dst_rows = dst.chunks_exact_mut(new_shape[2]);
    for tz in &taps[0] {
        for ty in &taps[1] {
            let dst_row = dst_rows.next().expect("one output row per (z, y)");
            // The (z, y) rows with a non-zero weight, in scipy's order (z outer). A corner
            // of weight 0 adds nothing to any score, so leaving it out changes no sum.
            let mut rows = [(0usize, 0f64); 4];
            let mut n_rows = 0;
            for iz in 0..tz.n {
                for iy in 0..ty.n {
                    rows[n_rows] = (tz.idx[iz] * sz + ty.idx[iy] * sy, tz.w[iz] * ty.w[iy]);
                    n_rows += 1;
                }
            }
            let rows = &rows[..n_rows];
            // All four rows, for the quick check below (fixed size: it unrolls).
            let all_rows: [usize; 4] = std::array::from_fn(|r| tz.idx[r / 2] * sz + ty.idx[r % 2] * sy);
            if n_rows == 1 && x_unchanged {
                // Every output voxel has a single corner: the row is copied.
                dst_row.copy_from_slice(&src[rows[0].0..rows[0].0 + shape[2]]);
                continue;
            }
            let nearest_row = tz.nearest * sz + ty.nearest * sy;
            for (d, tx) in dst_row.iter_mut().zip(&taps[2]) {
                // Most voxels lie inside one structure: all eight corners agree (corners
                // of weight 0 take part in this check; they cannot make it wrong).
                let [i0, i1] = tx.idx;
                let first = src[all_rows[0] + i0];
                let uniform = all_rows.iter().all(|&r| src[r + i0] == first && src[r + i1] == first);
                *d = if uniform { first } else { winner(src, rows, tx, src[nearest_row + tx.nearest]) };
            }
        }
    }
    out
}

/// The label of one output voxel from its corners: each label's score is the sum of its
/// corner weights `(w_z·w_y)·w_x`, accumulated in scipy's corner order.
fn winner(src: &[u8], rows: &[(usize, f64)], tx: &LinearTap, nearest: u8) -> u8 {
    let mut seen = [0u8; 8];
    let mut score = [0f64; 8];
    let mut n = 0;
    for &(r, wzy) in rows {
        for (&ix, &wx) in tx.idx[..tx.n].iter().zip(&tx.w) {
            let l = src[r + ix];
            let k = seen[..n].iter().position(|&s| s == l).unwrap_or_else(|| {
                seen[n] = l;
                n += 1;
                n - 1
            });
            score[k] += wzy * wx;
        }
    }
    let top = score[..n].iter().copied().fold(0.0, f64::max);
    let nearest_score = seen[..n].iter().position(|&s| s == nearest).map_or(0.0, |k| score[k]);
    if nearest_score == top && top > 0.0 {
        return nearest;
    }
    (0..n).filter(|&k| score[k] == top).map(|k| seen[k]).min().unwrap_or(nearest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn a_constant_stays_constant() {
        let data = Array3::from_elem((7, 9, 11), 42.5f32);
        for shape in [[14, 9, 5], [3, 20, 11], [7, 9, 11], [1, 2, 30]] {
            for sep in [None, Some(0), Some(2)] {
                let out = resample_image(data.clone(), shape, sep);
                assert_eq!(out.shape(), shape);
                assert!(out.iter().all(|&v| (v - 42.5).abs() < 1e-4));
            }
        }
    }

    #[test]
    fn a_linear_ramp_stays_linear_away_from_the_edge_padding() {
        // The cubic B-spline reproduces linear functions exactly; the edge padding (a
        // constant continuation) disturbs it near the border by O(0.268^d) at distance d,
        // so the check keeps 8 input voxels away from it.
        let data = Array3::from_shape_fn((24, 26, 28), |(z, y, x)| 2.0 * x as f32 + 3.0 * y as f32 - z as f32);
        let shape = [48, 52, 56];
        let out = resample_image(data, shape, None);
        let coord = |o: usize, n_in: usize, n_out: usize| (o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5;
        for z in 16..32 {
            for y in 16..36 {
                for x in 16..40 {
                    let want = 2.0 * coord(x, 28, 56) + 3.0 * coord(y, 26, 52) - coord(z, 24, 48);
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
    fn nearest_rounds_exact_halves_up_like_scipy() {
        // 2 → 1 samples coordinate 0.5: scipy's floor(x + 0.5) takes index 1.
        assert_eq!(nearest_indices(2, 1), vec![1]);
        // Factor-2 downsampling samples 2k + 0.5: always the odd voxel.
        assert_eq!(nearest_indices(8, 4), vec![1, 3, 5, 7]);
        assert_eq!(nearest_indices(3, 6), vec![0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn linear_taps_are_scipys_order_1_weights() {
        // 4 → 2 samples 0.5 and 2.5; 2 → 4 samples −0.25 (clamped to voxel 0), 0.25, 0.75, 1.25.
        assert_eq!(linear_taps(4, 2), vec![(0, 1, 0.5), (2, 3, 0.5)]);
        assert_eq!(linear_taps(2, 4), vec![(0, 0, 0.75), (0, 1, 0.25), (0, 1, 0.75), (1, 1, 0.25)]);
        assert_eq!(linear_taps(5, 5), (0..5).map(|i| (i, (i + 1).min(4), 0.0)).collect::<Vec<_>>());
    }

    #[test]
    fn label_ties_go_to_the_nearest_neighbour() {
        // Downsampling by 2 samples the midpoints between voxels 0|1 and 2|3: each one a
        // tie at 0.5, won by the nearest voxel (indices 1 and 3), not by the smallest
        // label (first row) nor by the largest (second row).
        let lab = Array3::from_shape_vec((1, 1, 4), vec![0u8, 1, 0, 1]).unwrap();
        assert_eq!(resample_labels(&lab, [1, 1, 2], None).into_raw_vec_and_offset().0, vec![1, 1]);
        let lab = Array3::from_shape_vec((1, 1, 4), vec![2u8, 0, 2, 0]).unwrap();
        assert_eq!(resample_labels(&lab, [1, 1, 2], None).into_raw_vec_and_offset().0, vec![0, 0]);
    }

    #[test]
    fn separate_axis_follows_the_anisotropy_rule() {
        assert_eq!(separate_axis([5.0, 0.8, 0.8], [2.0, 0.8, 0.8], 3.0), Some(0));
        assert_eq!(separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0), None);
        assert_eq!(separate_axis([1.0, 1.0, 1.0], [4.0, 1.0, 1.0], 3.0), Some(0));
        // Two equally coarse axes: none, even when the target alone would name one.
        assert_eq!(separate_axis([3.0, 3.0, 0.8], [1.5, 1.5, 0.8], 3.0), None);
        assert_eq!(separate_axis([0.24, 1.25, 1.25], [3.0, 0.8, 0.8], 3.0), None);
    }

    // --- golden values from nnU-Net 2.8.1 (scripts/reference/resample.py) ---

    fn golden() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/resample.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("golden file")).expect("golden JSON")
    }

    fn arr3<T: Copy>(v: &Value, f: impl Fn(&Value) -> T) -> [T; 3] {
        let a = v.as_array().expect("array of 3");
        assert_eq!(a.len(), 3);
        std::array::from_fn(|i| f(&a[i]))
    }

    fn shape_of(v: &Value) -> [usize; 3] {
        arr3(v, |x| x.as_u64().expect("size") as usize)
    }

    fn spacing_of(v: &Value) -> [f64; 3] {
        arr3(v, |x| x.as_f64().expect("spacing"))
    }

    fn axis_of(v: &Value) -> Option<usize> {
        v.as_u64().map(|a| a as usize)
    }

    /// The script's image: 100·sin(0.7z + 0.3y)·cos(0.4x) + 3·((x·y) mod 7), in f64, as f32.
    fn golden_image(shape: [usize; 3]) -> Array3<f32> {
        Array3::from_shape_fn(shape, |(z, y, x)| {
            let (zf, yf, xf) = (z as f64, y as f64, x as f64);
            (100.0 * (0.7 * zf + 0.3 * yf).sin() * (0.4 * xf).cos() + 3.0 * ((x * y) % 7) as f64) as f32
        })
    }

    /// The script's labels: half-space 1, cylinder 2, thin oblique planes 3, line pieces 4.
    fn golden_labels(shape: [usize; 3]) -> Array3<u8> {
        let [_, ny, nx] = shape;
        let r = ny.min(nx) / 3;
        Array3::from_shape_fn(shape, |(z, y, x)| {
            let (zi, yi, xi) = (z as i64, y as i64, x as i64);
            let mut l = 0;
            if xi + 2 * yi > 3 * zi + 8 {
                l = 1;
            }
            let (dy, dx) = (yi - (ny / 2) as i64, xi - (nx / 2) as i64);
            if dy * dy + dx * dx <= (r * r) as i64 {
                l = 2;
            }
            if (y + 2 * z) % 5 == 0 {
                l = 3;
            }
            if x == nx / 4 && y % 2 == 0 {
                l = 4;
            }
            l
        })
    }

    #[test]
    fn matches_nnunet_on_the_golden_cases() {
        let g = golden();
        let mut report = Vec::new();
        for case in g["cases"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("name");
            let shape = shape_of(&case["shape"]);
            let (spacing, target) = (spacing_of(&case["spacing"]), spacing_of(&case["target_spacing"]));
            let new_shape = compute_new_shape(shape, spacing, target);
            assert_eq!(new_shape, shape_of(&case["new_shape"]), "{name}: new shape");
            let sep = separate_axis(spacing, target, 3.0);
            assert_eq!(sep, axis_of(&case["separate_axis"]), "{name}: separate axis");

            let img = resample_image(golden_image(shape), new_shape, sep);
            assert_eq!(img.shape(), new_shape, "{name}: image shape");
            let want: Vec<f64> = case["image"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(want.len(), img.len(), "{name}: image size");
            let max_diff = img.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(max_diff <= 1e-3, "{name}: image max |Δ| = {max_diff}");

            let lab = resample_labels(&golden_labels(shape), new_shape, sep);
            let want: Vec<u8> = case["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
            let (got, _) = lab.into_raw_vec_and_offset();
            let wrong: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
            assert!(got.len() == want.len() && wrong.is_empty(), "{name}: {} label voxels differ", wrong.len());
            report.push(format!("{name}: image max |Δ| {max_diff:.2e}"));
        }
        println!("{}", report.join("\n"));
    }

    #[test]
    fn new_shapes_and_separate_axes_match_nnunet() {
        let g = golden();
        for c in g["new_shape_checks"].as_array().expect("new_shape_checks") {
            let got =
                compute_new_shape(shape_of(&c["shape"]), spacing_of(&c["spacing"]), spacing_of(&c["target_spacing"]));
            // nnU-Net's 0 (an empty axis it fails on later) is one voxel here.
            assert_eq!(got, shape_of(&c["new_shape"]).map(|v| v.max(1)), "{c}");
        }
        for c in g["separate_checks"].as_array().expect("separate_checks") {
            let got = separate_axis(spacing_of(&c["spacing"]), spacing_of(&c["target_spacing"]), 3.0);
            assert_eq!(got, axis_of(&c["separate_axis"]), "{c}");
        }
    }
}
