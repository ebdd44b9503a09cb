//! Intensity transforms, low-resolution simulation, mirroring and deep-supervision
//! targets, each on one channel of a `[z][y][x]` volume, in place or into reused
//! buffers, single-threaded.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Gaussian noise of standard deviation `sigma`. Samples come from a table of
/// `table.len()` (a power of two) fresh Gaussian draws indexed by random bits, so a
/// voxel costs a table lookup instead of a Gaussian draw.
pub fn add_noise(x: &mut [f32], sigma: f32, table: &mut [f32], rng: &mut impl Rng) {
    debug_assert!(table.len().is_power_of_two());
    for t in table.iter_mut() {
        let n: f32 = StandardNormal.sample(rng);
        *t = n * sigma;
    }
    let bits = table.len().trailing_zeros();
    let mask = (table.len() - 1) as u64;
    let per_draw = (64 / bits) as usize;
    for chunk in x.chunks_mut(per_draw) {
        let mut r = rng.next_u64();
        for v in chunk {
            *v += table[(r & mask) as usize];
            r >>= bits;
        }
    }
}

const MAX_RADIUS: usize = 16;

/// Separable Gaussian blur with one sigma per axis (voxels), kernels truncated at
/// 3σ, borders reflected. `tmp` must hold a volume.
pub fn blur(x: &mut [f32], shape: [usize; 3], sigma: [f32; 3], tmp: &mut Vec<f32>) {
    let n = x.len();
    tmp.resize(n, 0.0);
    for (axis, &s) in sigma.iter().enumerate() {
        if s <= 0.0 || shape[axis] < 2 {
            continue;
        }
        // Truncated at 3σ (σ ≤ 5 voxels fits the fixed kernel: no allocation).
        let radius = ((3.0 * s).ceil() as usize).clamp(1, MAX_RADIUS);
        let mut kbuf = [0f32; 2 * MAX_RADIUS + 1];
        let kernel = &mut kbuf[..2 * radius + 1];
        for (i, k) in kernel.iter_mut().enumerate() {
            *k = (-0.5 * ((i as f32 - radius as f32) / s).powi(2)).exp();
        }
        let sum: f32 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= sum);
        let kernel: &[f32] = kernel;
        let len = shape[axis];
        let reflect = |i: i64| -> usize {
            let last = len as i64 - 1;
            let mut i = i;
            // Mirror about the edge voxels (torch/numpy "reflect").
            while i < 0 || i > last {
                if i < 0 {
                    i = -i;
                }
                if i > last {
                    i = 2 * last - i;
                }
            }
            i as usize
        };
        if axis == 2 {
            // Along rows: the interior as one shifted multiply-add per tap (vectorises),
            // reflection only at the ends.
            for (row, out) in x.chunks(len).zip(tmp.chunks_mut(len)) {
                let interior = radius..len.saturating_sub(radius);
                if interior.start < interior.end {
                    let o = &mut out[interior.clone()];
                    o.fill(0.0);
                    for (k, &w) in kernel.iter().enumerate() {
                        let src = &row[interior.start + k - radius..interior.end + k - radius];
                        for (d, &v) in o.iter_mut().zip(src) {
                            *d += w * v;
                        }
                    }
                }
                for i in (0..len).filter(|i| !interior.contains(i)) {
                    out[i] = kernel
                        .iter()
                        .enumerate()
                        .map(|(k, &w)| w * row[reflect(i as i64 + k as i64 - radius as i64)])
                        .sum();
                }
            }
            x.copy_from_slice(&tmp[..n]);
            continue;
        }
        let stride: usize = shape[axis + 1..].iter().product();
        let outer: usize = shape[..axis].iter().product();
        let block = len * stride;
        tmp[..n].fill(0.0);
        for o in 0..outer {
            let base = o * block;
            for i in 0..len {
                let dst = &mut tmp[base + i * stride..base + (i + 1) * stride];
                for (k, &w) in kernel.iter().enumerate() {
                    let j = reflect(i as i64 + k as i64 - radius as i64);
                    let src = &x[base + j * stride..base + (j + 1) * stride];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += w * s;
                    }
                }
            }
        }
        x.copy_from_slice(&tmp[..n]);
    }
}

pub fn multiply(x: &mut [f32], factor: f32) {
    for v in x {
        *v *= factor;
    }
}

/// Sum, sum of squares, min and max in one pass; blocks of 8 independent lanes so
/// the compiler can vectorise (f32 within a block, f64 across blocks).
fn moments(x: &[f32]) -> (f64, f64, f32, f32) {
    let (mut s, mut s2) = (0f64, 0f64);
    let (mut lo, mut hi) = ([f32::MAX; 8], [f32::MIN; 8]);
    for block in x.chunks(4096) {
        let (mut bs, mut bs2) = ([0f32; 8], [0f32; 8]);
        let mut lanes = block.chunks_exact(8);
        for c in &mut lanes {
            for i in 0..8 {
                let v = c[i];
                bs[i] += v;
                bs2[i] += v * v;
                lo[i] = if v < lo[i] { v } else { lo[i] };
                hi[i] = if v > hi[i] { v } else { hi[i] };
            }
        }
        for &v in lanes.remainder() {
            bs[0] += v;
            bs2[0] += v * v;
            lo[0] = lo[0].min(v);
            hi[0] = hi[0].max(v);
        }
        s += bs.iter().map(|&v| v as f64).sum::<f64>();
        s2 += bs2.iter().map(|&v| v as f64).sum::<f64>();
    }
    (s, s2, lo.iter().cloned().fold(f32::MAX, f32::min), hi.iter().cloned().fold(f32::MIN, f32::max))
}

fn mean_min_max(x: &[f32]) -> (f64, f32, f32) {
    let (s, _, lo, hi) = moments(x);
    (s / x.len().max(1) as f64, lo, hi)
}

/// Mean and (sample) standard deviation, as torch's `std`.
fn mean_std_of(s: f64, s2: f64, n: usize) -> (f64, f64) {
    let n = n.max(2) as f64;
    let mean = s / n;
    (mean, ((s2 - n * mean * mean) / (n - 1.0)).max(0.0).sqrt())
}

/// Scales the distance from the mean by `factor`, then clips to the original range.
pub fn contrast(x: &mut [f32], factor: f32) {
    let (mean, lo, hi) = mean_min_max(x);
    if lo > hi {
        // No finite value to take a range from (all NaN): nothing to scale.
        return;
    }
    let mean = mean as f32;
    for v in x {
        *v = ((*v - mean) * factor + mean).clamp(lo, hi);
    }
}

/// `x ← ((x − min)/range)^gamma · range + min`, optionally on the inverted image,
/// then mean and standard deviation restored. The power comes from a 4096-entry
/// table with linear interpolation (`lut` is reused).
pub fn gamma(x: &mut [f32], g: f32, invert: bool, lut: &mut Vec<f32>) {
    const N: usize = 4096;
    let sign = if invert { -1.0f32 } else { 1.0 };
    // Statistics of the (possibly inverted) image, from the original in one pass.
    let (s, s2, lo0, hi0) = moments(x);
    let (lo, hi) = if invert { (-hi0, -lo0) } else { (lo0, hi0) };
    let (mean, std) = mean_std_of(s * sign as f64, s2, x.len());
    let range = (hi - lo).max(1e-7);
    lut.clear();
    lut.extend((0..=N + 1).map(|i| ((i.min(N)) as f32 / N as f32).powf(g) * range + lo));
    let scale = N as f32 / range;
    let (mut t_s, mut t_s2) = (0f64, 0f64);
    for block in x.chunks_mut(4096) {
        let (mut bs, mut bs2) = (0f32, 0f32);
        for v in block.iter_mut() {
            let t = ((sign * *v - lo) * scale).clamp(0.0, N as f32);
            let i = t as usize;
            let f = t - i as f32;
            let y = lut[i] + (lut[i + 1] - lut[i]) * f;
            bs += y;
            bs2 += y * y;
            *v = y;
        }
        t_s += bs as f64;
        t_s2 += bs2 as f64;
    }
    // Restore mean and std, and undo the inversion, in the same pass.
    let (m2, s2b) = mean_std_of(t_s, t_s2, x.len());
    let k = (std / s2b.max(1e-7)) as f32;
    let (a, b) = (sign * k, sign * (mean as f32 - m2 as f32 * k));
    for v in x.iter_mut() {
        *v = *v * a + b;
    }
}

/// Reverses the volume along `axis` in place.
pub fn mirror<T: Copy>(x: &mut [T], shape: [usize; 3], axis: usize) {
    let [nz, ny, nx] = shape;
    match axis {
        2 => x.chunks_mut(nx).for_each(|row| row.reverse()),
        1 => {
            for plane in x.chunks_mut(ny * nx) {
                for y in 0..ny / 2 {
                    let (a, b) = plane.split_at_mut((ny - 1 - y) * nx);
                    a[y * nx..(y + 1) * nx].swap_with_slice(&mut b[..nx]);
                }
            }
        }
        _ => {
            let plane = ny * nx;
            for z in 0..nz / 2 {
                let (a, b) = x.split_at_mut((nz - 1 - z) * plane);
                a[z * plane..(z + 1) * plane].swap_with_slice(&mut b[..plane]);
            }
        }
    }
}

/// torch's "nearest-exact": output `o` takes input `floor((o + 0.5)·n_in/n_out)`.
fn nearest_index(o: usize, n_in: usize, n_out: usize) -> usize {
    (((o as f64 + 0.5) * n_in as f64 / n_out as f64) as usize).min(n_in - 1)
}

/// Nearest-exact resize of a volume (labels for deep supervision, or the low-res step).
pub fn resize_nearest<T: Copy>(src: &[T], shape: [usize; 3], dst: &mut Vec<T>, out: [usize; 3]) {
    dst.clear();
    for oz in 0..out[0] {
        let z = nearest_index(oz, shape[0], out[0]);
        for oy in 0..out[1] {
            let y = nearest_index(oy, shape[1], out[1]);
            let row = &src[(z * shape[1] + y) * shape[2]..(z * shape[1] + y + 1) * shape[2]];
            dst.extend((0..out[2]).map(|ox| row[nearest_index(ox, shape[2], out[2])]));
        }
    }
}

/// Linear tap (align_corners = false) of output `o` when resizing `n_in` to `n_out`.
#[inline]
fn linear_tap(o: usize, n_in: usize, n_out: usize) -> (usize, usize, f32) {
    let x = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
    let i0 = (x as usize).min(n_in - 1);
    let i1 = (i0 + 1).min(n_in - 1);
    (i0, i1, (x - i0 as f64) as f32)
}

/// Trilinear upsampling of `small` (shape `s`) into `x` (shape `shape`), separable;
/// `a` and `b` are reused intermediates.
pub fn resize_trilinear(
    small: &[f32],
    s: [usize; 3],
    x: &mut [f32],
    shape: [usize; 3],
    a: &mut Vec<f32>,
    b: &mut Vec<f32>,
) {
    // Along x.
    a.clear();
    for row in small.chunks(s[2]) {
        a.extend((0..shape[2]).map(|o| {
            let (i0, i1, t) = linear_tap(o, s[2], shape[2]);
            row[i0] + (row[i1] - row[i0]) * t
        }));
    }
    // Along y: planes of s[1] rows of shape[2].
    let nx = shape[2];
    b.clear();
    for plane in a.chunks(s[1] * nx) {
        for o in 0..shape[1] {
            let (i0, i1, t) = linear_tap(o, s[1], shape[1]);
            let (r0, r1) = (&plane[i0 * nx..(i0 + 1) * nx], &plane[i1 * nx..(i1 + 1) * nx]);
            b.extend(r0.iter().zip(r1).map(|(&u, &v)| u + (v - u) * t));
        }
    }
    // Along z, into x.
    let plane = shape[1] * nx;
    for o in 0..shape[0] {
        let (i0, i1, t) = linear_tap(o, s[0], shape[0]);
        let (p0, p1) = (&b[i0 * plane..(i0 + 1) * plane], &b[i1 * plane..(i1 + 1) * plane]);
        for ((d, &u), &v) in x[o * plane..(o + 1) * plane].iter_mut().zip(p0).zip(p1) {
            *d = u + (v - u) * t;
        }
    }
}
