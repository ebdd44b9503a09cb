//! Resampling a CT-sized volume to the target spacing on one core: a 150×512×512 f32
//! image with smooth content resized to 0.8× along z and 0.7× in-plane (120×358×358).
//!
//! - `bspline_nnunet`: the current `resample_image` (nnU-Net's cubic B-spline with the
//!   spline prefilter, one axis at a time);
//! - `keys_cubic_baseline`: the previous implementation (Keys' cubic convolution,
//!   a = −0.5, no prefilter), kept here only as the baseline;
//! - `labels_nnunet`: `resample_labels` on a label map of the same size.

use std::hint::black_box;

use cps3d::preprocessing::resample::{resample_image, resample_labels};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ndarray::{Array3, ArrayView3, Axis};

const SHAPE: [usize; 3] = [150, 512, 512];
const TARGET: [usize; 3] = [120, 358, 358];

fn smooth_volume() -> Array3<f32> {
    Array3::from_shape_fn(SHAPE, |(z, y, x)| {
        let (z, y, x) = (z as f32, y as f32, x as f32);
        400.0 * (0.05 * z + 0.013 * y).sin() * (0.021 * x).cos() + 150.0 * (0.004 * (x + y)).sin() - 300.0
    })
}

/// The previous cubic path: Keys' cubic convolution (a = −0.5), edge-clamped taps.
mod keys_cubic_baseline {
    use super::*;

    fn taps(n_in: usize, n_out: usize) -> Vec<[(usize, f32); 4]> {
        let scale = n_in as f64 / n_out as f64;
        let last = n_in as i64 - 1;
        let clamp = |i: i64| i.clamp(0, last) as usize;
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
        (0..n_out)
            .map(|o| {
                let x = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, last as f64);
                let i0 = x.floor() as i64;
                let t = x - i0 as f64;
                [
                    (clamp(i0 - 1), w(t + 1.0) as f32),
                    (clamp(i0), w(t) as f32),
                    (clamp(i0 + 1), w(1.0 - t) as f32),
                    (clamp(i0 + 2), w(2.0 - t) as f32),
                ]
            })
            .collect()
    }

    fn resample_axis(data: ArrayView3<'_, f32>, axis: usize, n_out: usize) -> Array3<f32> {
        let mut shape = [data.shape()[0], data.shape()[1], data.shape()[2]];
        let taps = taps(shape[axis], n_out);
        shape[axis] = n_out;
        let mut out = Array3::<f32>::zeros(shape);
        if axis == 2 {
            for (src_row, mut dst_row) in data.rows().into_iter().zip(out.rows_mut()) {
                let src = src_row.as_slice().expect("standard layout");
                for (d, t) in dst_row.iter_mut().zip(&taps) {
                    *d = t.iter().map(|&(i, w)| src[i] * w).sum();
                }
            }
        } else {
            for (o, t) in taps.iter().enumerate() {
                let mut dst = out.index_axis_mut(Axis(axis), o);
                for &(i, w) in t.iter() {
                    if w != 0.0 {
                        dst.zip_mut_with(&data.index_axis(Axis(axis), i), |d, &s| *d += s * w);
                    }
                }
            }
        }
        out
    }

    pub fn resample(data: Array3<f32>, new_shape: [usize; 3]) -> Array3<f32> {
        let in_shape = [data.shape()[0], data.shape()[1], data.shape()[2]];
        let mut order = [0usize, 1, 2];
        order.sort_by(|&a, &b| {
            (new_shape[a] as f64 / in_shape[a] as f64).total_cmp(&(new_shape[b] as f64 / in_shape[b] as f64))
        });
        let mut current = data;
        for axis in order {
            if current.shape()[axis] != new_shape[axis] {
                current = resample_axis(current.view(), axis, new_shape[axis]);
            }
        }
        current
    }
}

fn bench(c: &mut Criterion) {
    let volume = smooth_volume();
    let labels = volume.mapv(|v| {
        if v > 200.0 {
            2u8
        } else if v > -100.0 {
            1
        } else {
            0
        }
    });
    let mut g = c.benchmark_group("resample_150x512x512_to_120x358x358");
    g.sample_size(10);
    g.throughput(Throughput::Elements(volume.len() as u64)); // input voxels per second
    g.bench_function("bspline_nnunet", |b| {
        b.iter_batched(|| volume.clone(), |v| black_box(resample_image(v, TARGET, None)), BatchSize::LargeInput)
    });
    g.bench_function("keys_cubic_baseline", |b| {
        b.iter_batched(
            || volume.clone(),
            |v| black_box(keys_cubic_baseline::resample(v, TARGET)),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("labels_nnunet", |b| b.iter(|| black_box(resample_labels(&labels, TARGET, None))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
