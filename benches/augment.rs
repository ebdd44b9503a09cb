//! nnU-Net's default 3D augmentation on the paper's patch (112×160×128, one channel):
//! each transform when it fires, and the full default pipeline averaged over random
//! draws. The target is ≥ 15 patches/s on one core for the full pipeline.

use std::hint::black_box;

use cps3d_actors::augment::{ops, AugmentConfig, Augmenter, Draw, Sample};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

const PATCH: [usize; 3] = [112, 160, 128];
/// The paper's deep-supervision outputs for that patch (strides 1, 2×4, (1,2,2)).
const DS: [[f64; 3]; 5] = [[1.0; 3], [0.5; 3], [0.25; 3], [0.125; 3], [0.0625; 3]];

fn ct_like(n: usize, seed: u64) -> Vec<f32> {
    // Normalised CT-like values: smooth structure plus noise.
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    (0..n).map(|i| ((i as f32 * 0.001).sin() * 1.5) + rng.random_range(-0.3..0.3)).collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("augment");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1)); // one patch per iteration
    let pn: usize = PATCH.iter().product();
    let mut aug = Augmenter::new(AugmentConfig::default(), PATCH, 1, &DS).unwrap();
    let region = aug.region();
    let rn: usize = region.iter().product();
    let src = ct_like(rn, 1);
    let src_labels: Vec<u8> = src.iter().map(|&v| if v > 1.0 { 3 } else { 0 }).collect();
    let patch = ct_like(pn, 2);
    let mut out = Sample::default();
    println!("region read for the patch: {region:?} ({:.2} × the patch's voxels)", rn as f64 / pn as f64);

    // Each draw reads from the whole enlarged region, its centre placed as nnU-Net does.
    let centre_of = |aug: &Augmenter, d: &Draw| -> [f64; 3] {
        let b = aug.source_box(d);
        std::array::from_fn(|a| b.centre[a] + b.offset[a] as f64)
    };
    let rot = Draw { rotation: Some([0.3, -0.2, 0.4]), scale: Some(1.1), ..Default::default() };
    let c = centre_of(&aug, &rot);
    g.bench_function("spatial_rotate_scale_image_and_labels", |b| {
        b.iter(|| aug.apply(&rot, region, c, &src, Some(&src_labels), &mut out))
    });
    let rot_z = Draw { rotation: Some([0.4, 0.0, 0.0]), ..Default::default() };
    let c = centre_of(&aug, &rot_z);
    g.bench_function("spatial_rotate_about_z_only", |b| {
        b.iter(|| aug.apply(&rot_z, region, c, &src, Some(&src_labels), &mut out))
    });
    let scale_only = Draw { scale: Some(1.1), ..Default::default() };
    let c = centre_of(&aug, &scale_only);
    g.bench_function("spatial_scale_only", |b| {
        b.iter(|| aug.apply(&scale_only, region, c, &src, Some(&src_labels), &mut out))
    });
    let none = Draw::default();
    let c = centre_of(&aug, &none);
    g.bench_function("crop_image_and_labels", |b| {
        b.iter(|| aug.apply(&none, region, c, &src, Some(&src_labels), &mut out))
    });

    let mut x = patch.clone();
    let mut rng = Pcg64Mcg::seed_from_u64(3);
    let mut table = vec![0.0; 1 << 14];
    g.bench_function("noise", |b| b.iter(|| ops::add_noise(&mut x, 0.2, &mut table, &mut rng)));
    let mut tmp = Vec::new();
    g.bench_function("blur_sigma_0.75", |b| {
        b.iter(|| {
            x.copy_from_slice(&patch);
            ops::blur(&mut x, PATCH, [0.75; 3], &mut tmp)
        })
    });
    // Repeated in place, a factor ≠ 1 would overflow after thousands of iterations: start
    // each from the patch.
    g.bench_function("brightness", |b| {
        b.iter(|| {
            x.copy_from_slice(&patch);
            ops::multiply(&mut x, black_box(1.01))
        })
    });
    g.bench_function("contrast", |b| {
        b.iter(|| {
            x.copy_from_slice(&patch);
            ops::contrast(&mut x, black_box(1.01))
        })
    });
    let (mut small, mut t1, mut t2) = (Vec::new(), Vec::new(), Vec::new());
    g.bench_function("low_resolution_zoom_0.75", |b| {
        b.iter(|| {
            let s = [84, 120, 96];
            ops::resize_nearest(&x, PATCH, &mut small, s);
            ops::resize_trilinear(&small, s, &mut x, PATCH, &mut t1, &mut t2);
        })
    });
    let mut lut = Vec::new();
    g.bench_function("gamma", |b| b.iter(|| ops::gamma(&mut x, black_box(1.2), false, &mut lut)));
    g.bench_function("gamma_inverted", |b| b.iter(|| ops::gamma(&mut x, black_box(0.9), true, &mut lut)));
    g.bench_function("mirror_all_axes", |b| {
        b.iter(|| {
            for a in 0..3 {
                ops::mirror(&mut x, PATCH, a);
            }
        })
    });
    let labels: Vec<u8> = patch.iter().map(|&v| (v > 1.0) as u8).collect();
    let mut ds: Vec<Vec<u8>> = vec![Vec::new(); 4];
    g.bench_function("deep_supervision_targets", |b| {
        b.iter(|| {
            for (d, s) in ds.iter_mut().zip(&DS[1..]) {
                let shape = std::array::from_fn(|a| (PATCH[a] as f64 * s[a]) as usize);
                ops::resize_nearest(&labels, PATCH, d, shape);
            }
        })
    });

    let mut rng = Pcg64Mcg::seed_from_u64(7);
    g.bench_function("full_default_pipeline", |b| b.iter(|| aug.augment(&mut rng, &src, Some(&src_labels), &mut out)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
