//! Tests of the augmentations against batchgeneratorsv2's golden values and their own rules.

use super::*;
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;

fn ramp(shape: [usize; 3]) -> Vec<f32> {
    let mut v = Vec::with_capacity(shape.iter().product());
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                v.push((z * 10_000 + y * 100 + x) as f32);
            }
        }
    }
    v
}

fn at<T: Copy>(v: &[T], shape: [usize; 3], z: usize, y: usize, x: usize) -> T {
    v[(z * shape[1] + y) * shape[2] + x]
}

/// Only the spatial transform, always firing with exactly the given parameters.
fn apply_spatial(
    patch: [usize; 3],
    region: [usize; 3],
    rotation: [f64; 3],
    scale: f64,
    img: &[f32],
    lab: &[u8],
) -> Sample {
    let mut a = Augmenter::new(AugmentConfig::none(), patch, 1, &[]).unwrap();
    let d = Draw { rotation: Some(rotation), scale: Some(scale), ..Default::default() };
    let mut s = Sample::default();
    let centre = std::array::from_fn(|i| (region[i] as f64 - 1.0) / 2.0);
    a.apply(&d, region, centre, img, Some(lab), &mut s);
    s
}

#[test]
fn rotation_by_90_degrees_about_each_axis_is_the_array_rotation() {
    let n = 9;
    let shape = [n, n, n];
    let img = ramp(shape);
    let lab: Vec<u8> = (0..n * n * n).map(|i| (i % 13) as u8).collect();
    let q = std::f64::consts::FRAC_PI_2;
    for axis in 0..3 {
        let mut angles = [0.0; 3];
        angles[axis] = q;
        let s = apply_spatial(shape, shape, angles, 1.0, &img, &lab);
        let m = spatial::rotation_matrix(angles);
        let c = (n as f64 - 1.0) / 2.0;
        for z in 0..n {
            for y in 0..n {
                for x in 0..n {
                    let o = [z as f64 - c, y as f64 - c, x as f64 - c];
                    let src: Vec<usize> =
                        (0..3).map(|i| ((0..3).map(|j| m[i][j] * o[j]).sum::<f64>() + c).round() as usize).collect();
                    let want = at(&img, shape, src[0], src[1], src[2]);
                    assert!((at(&s.image, shape, z, y, x) - want).abs() < 1e-2, "axis {axis}");
                    assert_eq!(at(&s.labels, shape, z, y, x), at(&lab, shape, src[0], src[1], src[2]));
                }
            }
        }
        // And it really is a 90° turn of the array: about z, (y, x) -> (x, n-1-y) or its inverse.
        if axis == 0 {
            let turned = at(&s.image, shape, 4, 0, 0);
            assert!(turned == at(&img, shape, 4, 0, n - 1) || turned == at(&img, shape, 4, n - 1, 0));
        }
    }
}

#[test]
fn scale_one_and_rotation_zero_are_the_identity_crop() {
    let region = [12, 15, 14];
    let patch = [8, 9, 10];
    assert!((0..3).all(|a| (region[a] - patch[a]) % 2 == 0));
    let img = ramp(region);
    let lab: Vec<u8> = (0..region.iter().product::<usize>()).map(|i| (i % 7) as u8).collect();
    // An even region − patch difference: the centre falls on a voxel.
    let s = apply_spatial(patch, region, [0.0; 3], 1.0, &img, &lab);
    let mut crop_img = vec![0.0; patch.iter().product()];
    let mut crop_lab = vec![0u8; patch.iter().product()];
    let off = [2, 3, 2];
    spatial::crop(&img, region, off, &mut crop_img, patch, 1);
    spatial::crop(&lab, region, off, &mut crop_lab, patch, 1);
    assert_eq!(s.image, crop_img);
    assert_eq!(s.labels, crop_lab);
    assert_eq!(crop_img[0], at(&img, region, off[0], off[1], off[2]));
}

#[test]
fn mirroring_twice_is_the_identity() {
    let shape = [5, 6, 7];
    let orig = ramp(shape);
    for axis in 0..3 {
        let mut v = orig.clone();
        ops::mirror(&mut v, shape, axis);
        assert_ne!(v, orig);
        assert_eq!(
            at(&v, shape, 0, 0, 0),
            at(
                &orig,
                shape,
                if axis == 0 { 4 } else { 0 },
                if axis == 1 { 5 } else { 0 },
                if axis == 2 { 6 } else { 0 }
            )
        );
        ops::mirror(&mut v, shape, axis);
        assert_eq!(v, orig);
    }
}

fn stats(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    (m, (x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt())
}

fn noise_volume(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let mut v = vec![0.0; n];
    let mut table = vec![0.0; 1 << 14];
    ops::add_noise(&mut v, 1.0, &mut table, &mut rng);
    for x in v.iter_mut() {
        *x = *x * 0.3 + 1.5;
    }
    v
}

#[test]
fn brightness_contrast_and_gamma_change_statistics_as_documented() {
    let base = noise_volume(32 * 32 * 32, 1);
    let (m0, s0) = stats(&base);
    let mut b = base.clone();
    ops::multiply(&mut b, 1.2);
    let (m, s) = stats(&b);
    assert!((m - 1.2 * m0).abs() < 1e-4 && (s - 1.2 * s0).abs() < 1e-4);
    // Contrast keeps the mean and scales the spread (clipping to the old range aside).
    let mut c = base.clone();
    ops::contrast(&mut c, 0.8);
    let (m, s) = stats(&c);
    assert!((m - m0).abs() < 1e-4 && (s - 0.8 * s0).abs() < 1e-3, "{m} {s}");
    let (lo, hi) = base.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let mut c = base.clone();
    ops::contrast(&mut c, 1.25);
    assert!(c.iter().all(|&v| v >= lo && v <= hi));
    // Gamma, plain and inverted, keeps mean and std but changes the shape.
    let mut lut = Vec::new();
    for invert in [false, true] {
        let mut g = base.clone();
        ops::gamma(&mut g, 1.5, invert, &mut lut);
        let (m, s) = stats(&g);
        assert!((m - m0).abs() < 1e-3 && (s - s0).abs() < 1e-3, "invert {invert}: {m} {s} vs {m0} {s0}");
        assert!(g.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-2));
    }
}

#[test]
fn noise_has_the_drawn_variance_and_blur_keeps_a_constant() {
    let mut rng = Pcg64Mcg::seed_from_u64(3);
    let mut table = vec![0.0; 1 << 14];
    let mut v = vec![2.0f32; 64 * 64 * 64];
    ops::add_noise(&mut v, 0.25, &mut table, &mut rng);
    let (m, s) = stats(&v);
    assert!((m - 2.0).abs() < 0.01 && (s * s - 0.0625).abs() < 0.0625 * 0.03, "{m} {}", s * s);
    let mut c = vec![3.5f32; 10 * 11 * 12];
    let mut tmp = Vec::new();
    ops::blur(&mut c, [10, 11, 12], [0.5, 0.75, 1.0], &mut tmp);
    assert!(c.iter().all(|&x| (x - 3.5).abs() < 1e-5));
    // Blur smooths: a spike spreads and keeps its mass.
    let mut spike = vec![0.0f32; 9 * 9 * 9];
    spike[4 * 81 + 4 * 9 + 4] = 1.0;
    ops::blur(&mut spike, [9, 9, 9], [1.0, 1.0, 1.0], &mut tmp);
    assert!((spike.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    assert!(spike[4 * 81 + 4 * 9 + 4] < 0.1 && spike[4 * 81 + 4 * 9 + 5] > 0.0);
}

#[test]
fn low_resolution_of_a_constant_is_the_constant() {
    let shape = [8, 10, 12];
    let mut x = vec![7.0f32; 960];
    let (mut small, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    ops::resize_nearest(&x.clone(), shape, &mut small, [4, 5, 6]);
    ops::resize_trilinear(&small, [4, 5, 6], &mut x, shape, &mut a, &mut b);
    assert!(x.iter().all(|&v| (v - 7.0).abs() < 1e-5));
}

/// A labeled cube inside a region: the labels stay in the label set, no ignore value
/// survives, and the cube moves with its image.
#[test]
fn labels_stay_aligned_with_the_image_under_the_full_pipeline() {
    let patch = [24, 28, 32];
    let mut a = Augmenter::new(AugmentConfig::default(), patch, 1, &[[1.0; 3], [0.5; 3], [0.25; 3]]).unwrap();
    let region = a.region();
    let rn: usize = region.iter().product();
    let mut img = vec![0.0f32; rn];
    let mut lab = vec![0u8; rn];
    for z in 0..region[0] {
        for y in 0..region[1] {
            for x in 0..region[2] {
                let i = (z * region[1] + y) * region[2] + x;
                let c = [region[0] / 2, region[1] / 2, region[2] / 2];
                let inside = (z as i64 - c[0] as i64).abs() < 6
                    && (y as i64 - c[1] as i64).abs() < 7
                    && (x as i64 - c[2] as i64).abs() < 5;
                if inside {
                    img[i] = 10.0;
                    lab[i] = 3;
                }
                // The outer ring stands for padding outside the scan.
                if z == 0 || y == 0 {
                    lab[i] = IGNORE_LABEL;
                }
            }
        }
    }
    let mut rng = Pcg64Mcg::seed_from_u64(11);
    let mut s = Sample::default();
    let mut fired_spatial = 0;
    for _ in 0..60 {
        a.augment(&mut rng, &img, Some(&lab), &mut s);
        fired_spatial += s.draw.spatial() as usize;
        assert!(s.labels.iter().all(|&l| l == 0 || l == 3));
        // Where the label says cube, the image is bright (intensity transforms keep
        // the order of values except noise; the cube's mean stays well above the rest).
        let (mut cube, mut n_cube, mut rest, mut n_rest) = (0.0f64, 0, 0.0f64, 0);
        for (&l, &v) in s.labels.iter().zip(&s.image) {
            if l == 3 {
                cube += v as f64;
                n_cube += 1;
            } else {
                rest += v as f64;
                n_rest += 1;
            }
        }
        assert!(n_cube > 0, "the cube is in the patch");
        let (cube, rest) = (cube / n_cube as f64, rest / n_rest as f64);
        assert!(cube.abs() > rest.abs() + 1.0, "cube {cube} rest {rest} draw {:?}", s.draw);
        assert_eq!(s.ds_labels.len(), 2);
        assert_eq!(s.ds_labels[0].len(), 12 * 14 * 16);
        assert_eq!(s.ds_labels[1].len(), 6 * 7 * 8);
        assert!(s.ds_labels.iter().flatten().all(|&l| l == 0 || l == 3));
    }
    assert!(fired_spatial > 5);
}

#[test]
fn same_seed_same_output_bit_for_bit() {
    let patch = [16, 20, 24];
    let mut a = Augmenter::new(AugmentConfig::default(), patch, 1, &[[1.0; 3], [0.5; 3]]).unwrap();
    let region = a.region();
    let img = noise_volume(region.iter().product(), 5);
    let lab: Vec<u8> = img.iter().map(|&v| (v > 1.6) as u8).collect();
    let run = |a: &mut Augmenter| {
        let mut rng = Pcg64Mcg::seed_from_u64(99);
        let mut out = Vec::new();
        let mut s = Sample::default();
        for _ in 0..20 {
            a.augment(&mut rng, &img, Some(&lab), &mut s);
            out.push((s.image.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s.labels.clone()));
        }
        out
    };
    assert_eq!(run(&mut a), run(&mut a));
}

#[test]
fn each_transform_fires_at_its_configured_probability() {
    let a = Augmenter::new(AugmentConfig::default(), [8, 8, 8], 1, &[]).unwrap();
    let mut rng = Pcg64Mcg::seed_from_u64(2024);
    let n = 10_000;
    let mut counts = [0usize; 12];
    for _ in 0..n {
        let d = a.draw(&mut rng);
        let fired = [
            d.rotation.is_some(),
            d.scale.is_some(),
            d.noise_sigma.is_some(),
            d.blur_sigma[0].is_some(),
            d.brightness[0].is_some(),
            d.contrast[0].is_some(),
            d.low_res_zoom[0].is_some(),
            d.gamma_inverted[0].is_some(),
            d.gamma[0].is_some(),
            d.mirror[0],
            d.mirror[1],
            d.mirror[2],
        ];
        for (c, f) in counts.iter_mut().zip(fired) {
            *c += f as usize;
        }
        if let Some(r) = d.rotation {
            assert!(r.iter().all(|a| a.abs() <= 30f64.to_radians() + 1e-12));
        }
        if let Some(s) = d.scale {
            assert!((0.7..=1.4).contains(&s));
        }
    }
    // Blur and low resolution fire per sample and then per channel with p 0.5.
    let expected = [0.2, 0.2, 0.1, 0.1, 0.15, 0.15, 0.125, 0.1, 0.3, 0.5, 0.5, 0.5];
    for (i, (&c, &p)) in counts.iter().zip(&expected).enumerate() {
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        let got = c as f64 / n as f64;
        assert!((got - p).abs() < 4.0 * sd, "transform {i}: fired {got}, expected {p}");
    }
}

#[test]
fn factors_straddling_one_fall_below_one_half_the_time() {
    let mut rng = Pcg64Mcg::seed_from_u64(8);
    let r = Range::new(0.7, 1.5);
    let below = (0..10_000).filter(|_| draw_factor(&mut rng, r) < 1.0).count();
    assert!((4800..5200).contains(&below), "{below}");
}

#[test]
fn the_source_region_is_the_patch_without_spatial_augmentation() {
    // nnU-Net's own numbers are checked in tests/nnunet_reference.rs.
    let patch = [112, 160, 128];
    let region = AugmentConfig::default().source_region(patch);
    assert!((0..3).all(|a| region[a] > patch[a]), "{region:?}");
    assert_eq!(AugmentConfig::none().source_region(patch), patch);
}

#[test]
fn the_source_box_is_enough_for_the_draw() {
    // Sampling from the smaller box a draw needs gives the same patch as sampling from
    // the whole enlarged region.
    let patch = [20, 24, 28];
    let mut a = Augmenter::new(AugmentConfig::default(), patch, 1, &[]).unwrap();
    let full = a.region();
    let img_full = noise_volume(full.iter().product(), 4);
    let lab_full: Vec<u8> = img_full.iter().map(|&v| (v > 1.5) as u8).collect();
    let mut rng = Pcg64Mcg::seed_from_u64(5);
    let (mut s1, mut s2) = (Sample::default(), Sample::default());
    let mut smaller = 0;
    for _ in 0..200 {
        let d = a.draw(&mut rng);
        let b = a.source_box(&d);
        if !d.spatial() {
            assert_eq!(b.shape, patch);
        }
        smaller += (b.shape.iter().product::<usize>() < full.iter().product::<usize>()) as usize;
        let mut img = Vec::new();
        let mut lab = Vec::new();
        for z in 0..b.shape[0] {
            for y in 0..b.shape[1] {
                let s = ((z + b.offset[0]) * full[1] + y + b.offset[1]) * full[2] + b.offset[2];
                img.extend_from_slice(&img_full[s..s + b.shape[2]]);
                lab.extend_from_slice(&lab_full[s..s + b.shape[2]]);
            }
        }
        let centre_full = std::array::from_fn(|i| b.centre[i] + b.offset[i] as f64);
        a.apply(&d, full, centre_full, &img_full, Some(&lab_full), &mut s1);
        a.apply(&d, b.shape, b.centre, &img, Some(&lab), &mut s2);
        assert_eq!(s1.labels, s2.labels, "{d:?}");
        for (x, y) in s1.image.iter().zip(&s2.image) {
            assert!((x - y).abs() < 1e-4, "{d:?}");
        }
    }
    assert!(smaller > 150, "{smaller}");
}

#[test]
fn contrast_of_a_patch_without_finite_values_leaves_it_alone() {
    let mut x = vec![f32::NAN; 8];
    ops::contrast(&mut x, 1.2);
    assert!(x.iter().all(|v| v.is_nan()));
}
