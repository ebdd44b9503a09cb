//! Rotation and scaling in one resampling pass from the region the loader read to the
//! patch, as batchgeneratorsv2's `SpatialTransform` with nnU-Net's settings: the image
//! trilinear with zeros outside the source; labels as one-hot scores (each label's
//! indicator interpolated trilinearly, ×1000 and rounded to float16 as theirs), the
//! highest score winning, the lower label on a tie unless the nearest neighbour's label
//! shares the top score (their `seg_tiebreak='nearest'`). Outside the source labels are
//! the ignore value, nnU-Net's padding label −1, which sorts below every class.

use half::f16;

/// The rotation about array axis 0 (z), then 1 (y), then 2 (x), each in
/// batchgeneratorsv2's form, composed `R₂(α₂)·R₁(α₁)·R₀(α₀)` as `create_affine_matrix_3d`
/// does; it acts on (z, y, x) offsets.
pub fn rotation_matrix(angles: [f64; 3]) -> [[f64; 3]; 3] {
    let (s0, c0) = angles[0].sin_cos();
    let (s1, c1) = angles[1].sin_cos();
    let (s2, c2) = angles[2].sin_cos();
    let r0 = [[1.0, 0.0, 0.0], [0.0, c0, -s0], [0.0, s0, c0]];
    let r1 = [[c1, 0.0, s1], [0.0, 1.0, 0.0], [-s1, 0.0, c1]];
    let r2 = [[c2, -s2, 0.0], [s2, c2, 0.0], [0.0, 0.0, 1.0]];
    mul(&mul(&r2, &r1), &r0)
}

pub fn mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

/// Label order for ties: the ignore value stands for nnU-Net's −1, below every class.
#[inline]
fn rank(label: u8, ignore: u8) -> i16 {
    if label == ignore {
        -1
    } else {
        label as i16
    }
}

/// Resamples `src` (channels × `src_shape`, C order) into `dst` (channels × patch):
/// output voxel `o` reads source coordinate `centre + m · (o − c_patch)`, `c_patch`
/// the patch centre `(P − 1)/2`, in one pass over output tiles.
#[allow(clippy::too_many_arguments)]
pub fn transform(
    src: &[f32],
    labels: Option<(&[u8], &mut [u8], u8)>,
    src_shape: [usize; 3],
    dst: &mut [f32],
    patch: [usize; 3],
    channels: usize,
    m: &[[f64; 3]; 3],
    centre: [f64; 3],
) {
    match labels {
        Some((ls, ld, ignore)) => {
            transform_impl::<true>(src, ls, ld, ignore, src_shape, dst, patch, channels, m, centre)
        }
        None => transform_impl::<false>(src, &[], &mut [], 0, src_shape, dst, patch, channels, m, centre),
    }
}

/// Output tile edge: a block of outputs reads a compact source footprint that
/// stays in cache, where whole rows of a rotated patch stride through many planes.
const TILE: usize = 16;

/// Scale of the one-hot scores before their float16 rounding (batchgeneratorsv2's
/// `scale_factor`): the rounding merges near-ties into ties, settled as theirs.
const SCORE_SCALE: f32 = 1000.0;

#[allow(clippy::too_many_arguments)]
fn transform_impl<const LABELS: bool>(
    src: &[f32],
    lsrc: &[u8],
    ldst: &mut [u8],
    ignore: u8,
    src_shape: [usize; 3],
    dst: &mut [f32],
    patch: [usize; 3],
    channels: usize,
    m: &[[f64; 3]; 3],
    centre: [f64; 3],
) {
    let (rn, pn) = (src_shape.iter().product::<usize>(), patch.iter().product::<usize>());
    assert!(src.len() >= rn * channels && dst.len() >= pn * channels);
    assert!(!LABELS || (lsrc.len() >= rn && ldst.len() >= pn));
    let cp: [f64; 3] = std::array::from_fn(|a| (patch[a] as f64 - 1.0) / 2.0);
    let (sz, sy) = (src_shape[1] * src_shape[2], src_shape[2]);
    // Coordinates (f64, so the shift costs no precision) are kept ≥ 0 by this shift so
    // that truncation is floor.
    const SHIFT: f64 = 4096.0;
    let lim = [src_shape[0] as i32, src_shape[1] as i32, src_shape[2] as i32];
    let inside = |q: [i32; 3]| (0..3).all(|a| (q[a] as u32) < lim[a] as u32);
    let step = [m[0][2], m[1][2], m[2][2]];
    for z0 in (0..patch[0]).step_by(TILE) {
        for y0 in (0..patch[1]).step_by(TILE) {
            for x0 in (0..patch[2]).step_by(TILE) {
                let x1 = (x0 + TILE).min(patch[2]);
                for z in z0..(z0 + TILE).min(patch[0]) {
                    for y in y0..(y0 + TILE).min(patch[1]) {
                        let d = [z as f64 - cp[0], y as f64 - cp[1], x0 as f64 - cp[2]];
                        let mut p: [f64; 3] = std::array::from_fn(|i| {
                            centre[i] + m[i][0] * d[0] + m[i][1] * d[1] + m[i][2] * d[2] + SHIFT
                        });
                        let row = (z * patch[1] + y) * patch[2];
                        for x in x0..x1 {
                            let o = row + x;
                            let fz = p[0] as i32;
                            let fy = p[1] as i32;
                            let fx = p[2] as i32;
                            let (tz, ty, tx) =
                                ((p[0] - fz as f64) as f32, (p[1] - fy as f64) as f32, (p[2] - fx as f64) as f32);
                            let (iz, iy, ix) = (fz - SHIFT as i32, fy - SHIFT as i32, fx - SHIFT as i32);
                            let all_inside = (iz as u32) < (lim[0] - 1) as u32
                                && (iy as u32) < (lim[1] - 1) as u32
                                && (ix as u32) < (lim[2] - 1) as u32;
                            if all_inside {
                                // All 8 neighbours inside: the common case.
                                let b = iz as usize * sz + iy as usize * sy + ix as usize;
                                for ch in 0..channels {
                                    // One bounds check covers all 8 reads.
                                    let s = &src[ch * rn + b..ch * rn + b + sz + sy + 2];
                                    let c00 = s[0] + (s[1] - s[0]) * tx;
                                    let c01 = s[sy] + (s[sy + 1] - s[sy]) * tx;
                                    let c10 = s[sz] + (s[sz + 1] - s[sz]) * tx;
                                    let c11 = s[sz + sy] + (s[sz + sy + 1] - s[sz + sy]) * tx;
                                    let c0 = c00 + (c01 - c00) * ty;
                                    let c1 = c10 + (c11 - c10) * ty;
                                    dst[ch * pn + o] = c0 + (c1 - c0) * tz;
                                }
                            } else {
                                for ch in 0..channels {
                                    let s = &src[ch * rn..(ch + 1) * rn];
                                    let mut acc = 0.0f32;
                                    for (dz, wz) in [(0i32, 1.0 - tz), (1, tz)] {
                                        for (dy, wy) in [(0i32, 1.0 - ty), (1, ty)] {
                                            for (dx, wx) in [(0i32, 1.0 - tx), (1, tx)] {
                                                let q = [iz + dz, iy + dy, ix + dx];
                                                if inside(q) {
                                                    acc += wz
                                                        * wy
                                                        * wx
                                                        * s[q[0] as usize * sz + q[1] as usize * sy + q[2] as usize];
                                                }
                                            }
                                        }
                                    }
                                    dst[ch * pn + o] = acc;
                                }
                            }
                            if LABELS {
                                ldst[o] =
                                    one_hot_label(lsrc, [iz, iy, ix], [tz, ty, tx], lim, [sz, sy], ignore, all_inside);
                            }
                            p[0] += step[0];
                            p[1] += step[1];
                            p[2] += step[2];
                        }
                    }
                }
            }
        }
    }
}

/// The label of one output voxel from its 8 trilinear neighbours (see the module doc);
/// `all_inside`: every neighbour lies in the source (the common case, read directly).
#[inline]
#[allow(clippy::too_many_arguments)]
fn one_hot_label(
    src: &[u8],
    i: [i32; 3],
    t: [f32; 3],
    lim: [i32; 3],
    strides: [usize; 2],
    ignore: u8,
    all_inside: bool,
) -> u8 {
    let at = |q: [i32; 3]| -> u8 {
        if (0..3).all(|a| (q[a] as u32) < lim[a] as u32) {
            src[q[0] as usize * strides[0] + q[1] as usize * strides[1] + q[2] as usize]
        } else {
            ignore
        }
    };
    // grid_sample's corner order: z, then y, then x.
    let labels: [u8; 8] = if all_inside {
        let b = i[0] as usize * strides[0] + i[1] as usize * strides[1] + i[2] as usize;
        let (sz, sy) = (strides[0], strides[1]);
        let s = &src[b..b + sz + sy + 2];
        [s[0], s[1], s[sy], s[sy + 1], s[sz], s[sz + 1], s[sz + sy], s[sz + sy + 1]]
    } else {
        std::array::from_fn(|k| at([i[0] + (k >> 2) as i32, i[1] + ((k >> 1) & 1) as i32, i[2] + (k & 1) as i32]))
    };
    // Most voxels lie inside one structure: the label needs no scores.
    if labels.iter().all(|&l| l == labels[0]) {
        return labels[0];
    }
    // grid_sample's weights, x · y · z.
    let mut weights = [0f32; 8];
    for (k, w) in weights.iter_mut().enumerate() {
        let wz = if k >> 2 == 1 { t[0] } else { 1.0 - t[0] };
        let wy = if (k >> 1) & 1 == 1 { t[1] } else { 1.0 - t[1] };
        let wx = if k & 1 == 1 { t[2] } else { 1.0 - t[2] };
        *w = wx * wy * wz;
    }
    // Score of each label present among the corners, float16 as theirs.
    let mut seen = [0u8; 8];
    let mut score = [0f32; 8];
    let mut n = 0;
    for (&l, &w) in labels.iter().zip(&weights) {
        let s = SCORE_SCALE * w;
        match seen[..n].iter().position(|&u| u == l) {
            Some(j) => score[j] += s,
            None => {
                seen[n] = l;
                score[n] = s;
                n += 1;
            }
        }
    }
    let mut best = 0;
    for j in 0..n {
        score[j] = f16::from_f32(score[j]).to_f32();
        let better =
            score[j] > score[best] || (score[j] == score[best] && rank(seen[j], ignore) < rank(seen[best], ignore));
        if better {
            best = j;
        }
    }
    // grid_sample's nearest: the coordinate rounded half to even.
    let nearest = at(std::array::from_fn(|a| (i[a] as f64 + t[a] as f64).round_ties_even() as i32));
    match seen[..n].iter().position(|&u| u == nearest) {
        Some(j) if score[j] == score[best] => nearest,
        _ => seen[best],
    }
}

/// Copies the patch starting at `start` out of `src` (`src_shape`): what the patch is
/// when no spatial transform fires.
pub fn crop<T: Copy>(
    src: &[T],
    src_shape: [usize; 3],
    start: [usize; 3],
    dst: &mut [T],
    patch: [usize; 3],
    channels: usize,
) {
    assert!((0..3).all(|a| start[a] + patch[a] <= src_shape[a]), "crop {start:?}+{patch:?} outside {src_shape:?}");
    let (rn, pn) = (src_shape.iter().product::<usize>(), patch.iter().product::<usize>());
    for ch in 0..channels {
        let mut idx = ch * pn;
        for z in 0..patch[0] {
            for y in 0..patch[1] {
                let s = ch * rn + ((z + start[0]) * src_shape[1] + y + start[1]) * src_shape[2] + start[2];
                dst[idx..idx + patch[2]].copy_from_slice(&src[s..s + patch[2]]);
                idx += patch[2];
            }
        }
    }
}
