//! Sliding-window prediction with nnU-Net's Gaussian importance weighting.

use ndarray::{s, Array3, Array4, Axis};

/// Tile origins along one axis: `ceil((size − tile)/(step·tile)) + 1` tiles spread
/// evenly from 0 to `size − tile` (nnU-Net's `compute_steps_for_sliding_window`).
pub fn tile_starts(size: usize, tile: usize, step: f64) -> Vec<usize> {
    if size <= tile {
        return vec![0];
    }
    let stride = (tile as f64 * step).max(1.0);
    let n = ((size - tile) as f64 / stride).ceil() as usize + 1;
    let span = (size - tile) as f64;
    (0..n).map(|i| ((span / (n - 1).max(1) as f64) * i as f64).round() as usize).collect()
}

/// Gaussian importance map of a tile: σ = tile/8 per axis, peak 1, minimum clamped
/// above zero (nnU-Net's `compute_gaussian`) so every voxel gets some weight.
pub fn gaussian(tile: [usize; 3]) -> Array3<f32> {
    let sigma: [f64; 3] = std::array::from_fn(|a| tile[a] as f64 / 8.0);
    let centre: [f64; 3] = std::array::from_fn(|a| (tile[a] as f64 - 1.0) / 2.0);
    let mut g = Array3::from_shape_fn(tile, |(z, y, x)| {
        let d = [z as f64 - centre[0], y as f64 - centre[1], x as f64 - centre[2]];
        (-(0..3).map(|a| d[a] * d[a] / (2.0 * sigma[a] * sigma[a])).sum::<f64>()).exp() as f32
    });
    let max = g.iter().cloned().fold(0.0f32, f32::max);
    let positive_min = g.iter().cloned().filter(|&v| v > 0.0).fold(f32::MAX, f32::min);
    g.mapv_inplace(|v| (v / max).max(positive_min / max));
    g
}

/// Predicts class scores for a `[C][z][y][x]` volume with `predict`, which maps a
/// batch of tiles `[n][C][tile]` to scores `[n][K][tile]`. Volumes smaller than the
/// tile are padded with 0 (the normalised background) and cropped back.
///
/// Scores are accumulated one slab of tiles (along z) at a time and handed to
/// `finish(z_range, scores)` as soon as no later tile can touch those slices, so
/// memory holds about two tile heights of scores instead of the whole volume's
/// (14 classes × a 200×530×530 CT would be 3 GB).
pub fn sliding_window_slabs(
    volume: &Array4<f32>,
    tile: [usize; 3],
    step: f64,
    classes: usize,
    tiles_per_batch: usize,
    mut predict: impl FnMut(&[f32], usize) -> Vec<f32>,
    mut finish: impl FnMut(std::ops::Range<usize>, ndarray::ArrayView4<'_, f32>),
) {
    let channels = volume.shape()[0];
    let shape = [volume.shape()[1], volume.shape()[2], volume.shape()[3]];
    let padded: [usize; 3] = std::array::from_fn(|a| shape[a].max(tile[a]));
    let off: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
    let g = gaussian(tile);
    let zs = tile_starts(padded[0], tile[0], step);
    let (ys, xs) = (tile_starts(padded[1], tile[1], step), tile_starts(padded[2], tile[2], step));
    let tn: usize = tile.iter().product();
    // Rolling accumulator over padded z in [base, base + depth): one tile plus the
    // largest gap between slab origins, so a slab always fits after one shift.
    let largest_gap = zs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let depth = (tile[0] + largest_gap).min(padded[0]);
    let plane = padded[1] * padded[2];
    let mut base = 0usize;
    let mut scores = Array4::<f32>::zeros((classes, depth, padded[1], padded[2]));
    let mut weights = Array3::<f32>::zeros((depth, padded[1], padded[2]));
    let mut emitted = 0usize; // padded z below this has been finished
                              // Finished slices are normalised in place: no later tile touches them.
    let emit = |from: usize,
                to: usize,
                base: usize,
                scores: &mut Array4<f32>,
                weights: &Array3<f32>,
                finish: &mut dyn FnMut(std::ops::Range<usize>, ndarray::ArrayView4<'_, f32>)| {
        // Map padded z to volume z, keeping only real slices.
        let lo = from.max(off[0]);
        let hi = to.min(off[0] + shape[0]);
        if lo >= hi {
            return;
        }
        let region = s![.., lo - base..hi - base, off[1]..off[1] + shape[1], off[2]..off[2] + shape[2]];
        let w = weights.slice(s![lo - base..hi - base, off[1]..off[1] + shape[1], off[2]..off[2] + shape[2]]);
        let mut part = scores.slice_mut(region);
        for mut c in part.outer_iter_mut() {
            c /= &w;
        }
        finish(lo - off[0]..hi - off[0], part.view());
    };
    let tile_input = |o: [usize; 3], out: &mut Vec<f32>| {
        let inside = (0..3).all(|a| o[a] >= off[a] && o[a] + tile[a] <= off[a] + shape[a]);
        if inside {
            // The common case: whole rows straight from the volume.
            let v = volume.slice(s![
                ..,
                o[0] - off[0]..o[0] - off[0] + tile[0],
                o[1] - off[1]..o[1] - off[1] + tile[1],
                o[2] - off[2]..o[2] - off[2] + tile[2]
            ]);
            for row in v.rows() {
                out.extend(row.iter());
            }
            return;
        }
        for c in 0..channels {
            for z in o[0]..o[0] + tile[0] {
                for y in o[1]..o[1] + tile[1] {
                    for x in o[2]..o[2] + tile[2] {
                        let inside = z >= off[0]
                            && z < off[0] + shape[0]
                            && y >= off[1]
                            && y < off[1] + shape[1]
                            && x >= off[2]
                            && x < off[2] + shape[2];
                        out.push(if inside { volume[[c, z - off[0], y - off[1], x - off[2]]] } else { 0.0 });
                    }
                }
            }
        }
    };
    for &z0 in &zs {
        // Slide the window so this slab's tiles fit: finish what lies below z0.
        if z0 + tile[0] > base + depth {
            emit(emitted, z0, base, &mut scores, &weights, &mut finish);
            emitted = z0;
            // Move the still-open slices down in place and clear the rest.
            let shift = z0 - base;
            let keep = depth - shift;
            let scores_flat = scores.as_slice_mut().expect("standard layout");
            for class in scores_flat.chunks_mut(depth * plane) {
                class.copy_within(shift * plane.., 0);
                class[keep * plane..].fill(0.0);
            }
            let weights_flat = weights.as_slice_mut().expect("standard layout");
            weights_flat.copy_within(shift * plane.., 0);
            weights_flat[keep * plane..].fill(0.0);
            base = z0;
        }
        let origins: Vec<[usize; 3]> = ys.iter().flat_map(|&y| xs.iter().map(move |&x| [z0, y, x])).collect();
        for chunk in origins.chunks(tiles_per_batch.max(1)) {
            let mut batch = Vec::with_capacity(chunk.len() * channels * tn);
            for &o in chunk {
                tile_input(o, &mut batch);
            }
            let out = predict(&batch, chunk.len());
            assert_eq!(out.len(), chunk.len() * classes * tn, "the model returned the wrong number of scores");
            for (i, o) in chunk.iter().enumerate() {
                let ts = ndarray::ArrayView4::from_shape(
                    (classes, tile[0], tile[1], tile[2]),
                    &out[i * classes * tn..(i + 1) * classes * tn],
                )
                .expect("tile shape");
                let z = o[0] - base;
                let mut dst = scores.slice_mut(s![.., z..z + tile[0], o[1]..o[1] + tile[1], o[2]..o[2] + tile[2]]);
                for c in 0..classes {
                    let mut d = dst.index_axis_mut(Axis(0), c);
                    ndarray::Zip::from(&mut d)
                        .and(&ts.index_axis(Axis(0), c))
                        .and(&g)
                        .for_each(|d, &s, &w| *d += s * w);
                }
                let mut w = weights.slice_mut(s![z..z + tile[0], o[1]..o[1] + tile[1], o[2]..o[2] + tile[2]]);
                w += &g;
            }
        }
    }
    emit(emitted, padded[0], base, &mut scores, &weights, &mut finish);
}

/// Like [`sliding_window_slabs`], collecting every slab: the whole score volume
/// (for tests and small volumes).
pub fn sliding_window(
    volume: &Array4<f32>,
    tile: [usize; 3],
    step: f64,
    classes: usize,
    tiles_per_batch: usize,
    predict: impl FnMut(&[f32], usize) -> Vec<f32>,
) -> Array4<f32> {
    let mut out = Array4::<f32>::zeros((classes, volume.shape()[1], volume.shape()[2], volume.shape()[3]));
    sliding_window_slabs(volume, tile, step, classes, tiles_per_batch, predict, |zr, part| {
        out.slice_mut(s![.., zr, .., ..]).assign(&part);
    });
    out
}

/// Arg-max labels of the slab-wise scores: the full score volume never exists.
pub fn sliding_window_labels(
    volume: &Array4<f32>,
    tile: [usize; 3],
    step: f64,
    classes: usize,
    tiles_per_batch: usize,
    predict: impl FnMut(&[f32], usize) -> Vec<f32>,
) -> Array3<u8> {
    let mut labels = Array3::<u8>::zeros((volume.shape()[1], volume.shape()[2], volume.shape()[3]));
    sliding_window_slabs(volume, tile, step, classes, tiles_per_batch, predict, |zr, part| {
        let am = part.map_axis(Axis(0), |v| {
            v.iter().enumerate().fold((0usize, f32::MIN), |b, (k, &x)| if x > b.1 { (k, x) } else { b }).0 as u8
        });
        labels.slice_mut(s![zr, .., ..]).assign(&am);
    });
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_volume_with_the_requested_overlap() {
        assert_eq!(tile_starts(100, 100, 0.7), vec![0]);
        assert_eq!(tile_starts(50, 64, 0.5), vec![0]);
        let s = tile_starts(300, 128, 0.5);
        assert_eq!(*s.first().unwrap(), 0);
        assert_eq!(*s.last().unwrap(), 300 - 128);
        assert!(s.windows(2).all(|w| w[1] - w[0] <= 64));
    }

    #[test]
    fn an_identity_model_reconstructs_its_input_borders_included() {
        let vol =
            Array4::from_shape_fn((2, 23, 37, 41), |(c, z, y, x)| (c * 1000 + z * 100 + y * 10 + x) as f32 * 0.01);
        let out = sliding_window(&vol, [16, 16, 16], 0.5, 2, 3, |batch, _| batch.to_vec());
        assert_eq!(out.shape(), vol.shape());
        let max_err = out.iter().zip(vol.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_err < 1e-3, "{max_err}");
    }

    #[test]
    fn small_volumes_are_padded_and_cropped_back() {
        let vol = Array4::from_shape_fn((1, 5, 6, 7), |(_, z, y, x)| (z + y + x) as f32);
        let out = sliding_window(&vol, [8, 8, 8], 0.7, 1, 1, |b, _| b.to_vec());
        assert_eq!(out.shape(), vol.shape());
        assert!(out.iter().zip(vol.iter()).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn the_gaussian_peaks_in_the_middle_and_is_positive_everywhere() {
        let g = gaussian([8, 12, 16]);
        assert!(g.iter().all(|&v| v > 0.0 && v <= 1.0));
        assert!(g[[3, 5, 7]] > g[[0, 0, 0]] * 10.0);
    }
}

#[cfg(test)]
mod slab_tests {
    use super::*;

    #[test]
    fn slabs_equal_the_whole_volume_computation_and_labels_are_its_argmax() {
        // Two "classes": the input and its negation, so the argmax is the sign.
        let vol = Array4::from_shape_fn((1, 70, 20, 24), |(_, z, y, x)| {
            ((z as f32 * 0.3).sin() + (y * x) as f32 * 0.001) - 0.2
        });
        let model = |b: &[f32], _n: usize| -> Vec<f32> {
            let tn = 16 * 16 * 16;
            b.chunks(tn).flat_map(|t| t.iter().copied().chain(t.iter().map(|v| -v)).collect::<Vec<_>>()).collect()
        };
        let scores = sliding_window(&vol, [16, 16, 16], 0.5, 2, 2, model);
        let max_err =
            scores.index_axis(Axis(0), 0).iter().zip(vol.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_err < 1e-4, "{max_err}");
        let labels = sliding_window_labels(&vol, [16, 16, 16], 0.5, 2, 2, model);
        for (l, v) in labels.iter().zip(vol.iter()) {
            if v.abs() > 1e-3 {
                assert_eq!(*l, (*v < 0.0) as u8);
            }
        }
    }
}
