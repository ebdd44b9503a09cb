//! Rotation and scaling in one resampling pass, from the enlarged region the loader
//! reads to the patch: trilinear for the image, nearest for labels. Outside the
//! region the image is 0 and labels are the ignore value.

/// Rotation about canonical axes z (0), y (1) and x (2), composed as R_z · R_y · R_x,
/// acting on (z, y, x) offsets.
pub fn rotation_matrix(angles: [f64; 3]) -> [[f64; 3]; 3] {
    let (sz, cz) = angles[0].sin_cos();
    let (sy, cy) = angles[1].sin_cos();
    let (sx, cx) = angles[2].sin_cos();
    // About z: mixes (y, x); about y: mixes (z, x); about x: mixes (z, y).
    let rz = [[1.0, 0.0, 0.0], [0.0, cz, -sz], [0.0, sz, cz]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rx = [[cx, -sx, 0.0], [sx, cx, 0.0], [0.0, 0.0, 1.0]];
    mul(&mul(&rz, &ry), &rx)
}

pub fn mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

/// Where the patch's centre sits in the region: the region is centred on the patch,
/// rounded down, so that the identity map is an exact centre crop.
pub fn crop_offset(region: [usize; 3], patch: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|a| (region[a] - patch[a]) / 2)
}

/// Resamples `src` (channels × region, C order) into `dst` (channels × patch):
/// output voxel `o` reads source `c_src + m · (o − c_patch)`, trilinear for the
/// image (0 outside the region) and nearest for labels (`ignore` outside), in one
/// pass over output tiles.
#[allow(clippy::too_many_arguments)]
pub fn transform(
    src: &[f32],
    labels: Option<(&[u8], &mut [u8], u8)>,
    region: [usize; 3],
    dst: &mut [f32],
    patch: [usize; 3],
    channels: usize,
    m: &[[f64; 3]; 3],
) {
    match labels {
        Some((ls, ld, ignore)) => transform_impl::<true>(src, ls, ld, ignore, region, dst, patch, channels, m),
        None => transform_impl::<false>(src, &[], &mut [], 0, region, dst, patch, channels, m),
    }
}

/// Output tile edge: a block of outputs reads a compact source footprint that
/// stays in cache, where whole rows of a rotated patch stride through many planes.
const TILE: usize = 16;

#[allow(clippy::too_many_arguments)]
fn transform_impl<const LABELS: bool>(
    src: &[f32],
    lsrc: &[u8],
    ldst: &mut [u8],
    ignore: u8,
    region: [usize; 3],
    dst: &mut [f32],
    patch: [usize; 3],
    channels: usize,
    m: &[[f64; 3]; 3],
) {
    let (rn, pn) = (region.iter().product::<usize>(), patch.iter().product::<usize>());
    assert!(src.len() >= rn * channels && dst.len() >= pn * channels);
    assert!(!LABELS || (lsrc.len() >= rn && ldst.len() >= pn));
    let off = crop_offset(region, patch);
    let cp: [f64; 3] = std::array::from_fn(|a| (patch[a] as f64 - 1.0) / 2.0);
    let cs: [f64; 3] = std::array::from_fn(|a| off[a] as f64 + cp[a]);
    let (sz, sy) = (region[1] * region[2], region[2]);
    // Coordinates (f64, so the shift costs no precision) are kept ≥ 0 by this shift so
    // that truncation is floor.
    const SHIFT: f64 = 4096.0;
    let lim = [region[0] as i32, region[1] as i32, region[2] as i32];
    let step = [m[0][2], m[1][2], m[2][2]];
    for z0 in (0..patch[0]).step_by(TILE) {
        for y0 in (0..patch[1]).step_by(TILE) {
            for x0 in (0..patch[2]).step_by(TILE) {
                let x1 = (x0 + TILE).min(patch[2]);
                for z in z0..(z0 + TILE).min(patch[0]) {
                    for y in y0..(y0 + TILE).min(patch[1]) {
                        let d = [z as f64 - cp[0], y as f64 - cp[1], x0 as f64 - cp[2]];
                        let mut p: [f64; 3] =
                            std::array::from_fn(|i| cs[i] + m[i][0] * d[0] + m[i][1] * d[1] + m[i][2] * d[2] + SHIFT);
                        let row = (z * patch[1] + y) * patch[2];
                        for x in x0..x1 {
                            let o = row + x;
                            let fz = p[0] as i32;
                            let fy = p[1] as i32;
                            let fx = p[2] as i32;
                            let (tz, ty, tx) =
                                ((p[0] - fz as f64) as f32, (p[1] - fy as f64) as f32, (p[2] - fx as f64) as f32);
                            let (iz, iy, ix) = (fz - SHIFT as i32, fy - SHIFT as i32, fx - SHIFT as i32);
                            if (iz as u32) < (lim[0] - 1) as u32
                                && (iy as u32) < (lim[1] - 1) as u32
                                && (ix as u32) < (lim[2] - 1) as u32
                            {
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
                                                let (qz, qy, qx) = (iz + dz, iy + dy, ix + dx);
                                                if (qz as u32) < lim[0] as u32
                                                    && (qy as u32) < lim[1] as u32
                                                    && (qx as u32) < lim[2] as u32
                                                {
                                                    acc += wz
                                                        * wy
                                                        * wx
                                                        * s[qz as usize * sz + qy as usize * sy + qx as usize];
                                                }
                                            }
                                        }
                                    }
                                    dst[ch * pn + o] = acc;
                                }
                            }
                            if LABELS {
                                // Nearest: the closer neighbour on each axis.
                                let (nz, ny, nx) =
                                    (iz + (tz >= 0.5) as i32, iy + (ty >= 0.5) as i32, ix + (tx >= 0.5) as i32);
                                ldst[o] = if (nz as u32) < lim[0] as u32
                                    && (ny as u32) < lim[1] as u32
                                    && (nx as u32) < lim[2] as u32
                                {
                                    lsrc[nz as usize * sz + ny as usize * sy + nx as usize]
                                } else {
                                    ignore
                                };
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

/// The centre crop of the region: what the patch is when no spatial transform fires.
pub fn crop<T: Copy>(src: &[T], region: [usize; 3], dst: &mut [T], patch: [usize; 3], channels: usize) {
    let off = crop_offset(region, patch);
    let (rn, pn) = (region.iter().product::<usize>(), patch.iter().product::<usize>());
    for ch in 0..channels {
        let mut idx = ch * pn;
        for z in 0..patch[0] {
            for y in 0..patch[1] {
                let s = ch * rn + ((z + off[0]) * region[1] + y + off[1]) * region[2] + off[2];
                dst[idx..idx + patch[2]].copy_from_slice(&src[s..s + patch[2]]);
                idx += patch[2];
            }
        }
    }
}
