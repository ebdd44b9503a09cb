//! Helpers shared by the integration tests: volumes with some structure, and dense reference crops.
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A CT-like volume: smooth-ish values with noise, plus blob labels with a few classes.
pub struct Case {
    pub shape: [usize; 3],
    pub image: Vec<i16>,
    pub labels: Vec<u8>,
}

pub fn make_case(shape: [usize; 3], channels: usize, seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product::<usize>();
    let centres: Vec<[f64; 3]> = (0..4).map(|_| [0, 1, 2].map(|a| rng.random_range(0.0..shape[a] as f64))).collect();
    let radius = shape.iter().copied().max().unwrap_or(1) as f64 / 3.0;
    let mut labels = vec![0u8; n];
    let mut image = vec![0i16; n * channels];
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let i = (z * shape[1] + y) * shape[2] + x;
                for (k, c) in centres.iter().enumerate() {
                    let d2 = (z as f64 - c[0]).powi(2) + (y as f64 - c[1]).powi(2) + (x as f64 - c[2]).powi(2);
                    if d2 < radius * radius / (k + 1) as f64 {
                        labels[i] = [1, 2, 7, 255][k];
                    }
                }
                for ch in 0..channels {
                    let base = if labels[i] == 0 { -1000 } else { 40 * labels[i] as i16 };
                    image[ch * n + i] = base + rng.random_range(-30..30) + ch as i16 * 7 + (x as i16 % 5);
                }
            }
        }
    }
    // Extremes must survive the byte split and the f32 map.
    image[0] = i16::MIN;
    image[n - 1] = i16::MAX;
    Case { shape, image, labels }
}

/// The crop `origin .. origin + size` of a dense volume, `pad` outside it.
pub fn crop<T: Copy>(volume: &[T], shape: [usize; 3], origin: [i64; 3], size: [usize; 3], pad: T) -> Vec<T> {
    let mut out = Vec::with_capacity(size.iter().product());
    for z in 0..size[0] as i64 {
        for y in 0..size[1] as i64 {
            for x in 0..size[2] as i64 {
                let p = [origin[0] + z, origin[1] + y, origin[2] + x];
                let inside = (0..3).all(|a| p[a] >= 0 && (p[a] as usize) < shape[a]);
                out.push(if inside {
                    volume[((p[0] as usize) * shape[1] + p[1] as usize) * shape[2] + p[2] as usize]
                } else {
                    pad
                });
            }
        }
    }
    out
}
