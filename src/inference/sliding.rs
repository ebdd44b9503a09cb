//! Sliding-window prediction with nnU-Net's Gaussian importance weighting.

use ndarray::{Array3, Array4};

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
pub fn sliding_window(
    volume: &Array4<f32>,
    tile: [usize; 3],
    step: f64,
    classes: usize,
    tiles_per_batch: usize,
    mut predict: impl FnMut(&[f32], usize) -> Vec<f32>,
) -> Array4<f32> {
    let channels = volume.shape()[0];
    let shape = [volume.shape()[1], volume.shape()[2], volume.shape()[3]];
    let padded: [usize; 3] = std::array::from_fn(|a| shape[a].max(tile[a]));
    let off: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
    let mut input = Array4::<f32>::zeros((channels, padded[0], padded[1], padded[2]));
    input
        .slice_mut(ndarray::s![.., off[0]..off[0] + shape[0], off[1]..off[1] + shape[1], off[2]..off[2] + shape[2]])
        .assign(volume);
    let g = gaussian(tile);
    let mut scores = Array4::<f32>::zeros((classes, padded[0], padded[1], padded[2]));
    let mut weights = Array3::<f32>::zeros(padded);
    let mut origins: Vec<[usize; 3]> = Vec::new();
    for &z in &tile_starts(padded[0], tile[0], step) {
        for &y in &tile_starts(padded[1], tile[1], step) {
            for &x in &tile_starts(padded[2], tile[2], step) {
                origins.push([z, y, x]);
            }
        }
    }
    let tn: usize = tile.iter().product();
    for chunk in origins.chunks(tiles_per_batch.max(1)) {
        let mut batch = Vec::with_capacity(chunk.len() * channels * tn);
        for o in chunk {
            let view = input.slice(ndarray::s![.., o[0]..o[0] + tile[0], o[1]..o[1] + tile[1], o[2]..o[2] + tile[2]]);
            batch.extend(view.iter());
        }
        let out = predict(&batch, chunk.len());
        assert_eq!(out.len(), chunk.len() * classes * tn, "the model returned the wrong number of scores");
        for (i, o) in chunk.iter().enumerate() {
            let tile_scores = ndarray::ArrayView4::from_shape(
                (classes, tile[0], tile[1], tile[2]),
                &out[i * classes * tn..(i + 1) * classes * tn],
            )
            .expect("tile shape");
            let mut dst =
                scores.slice_mut(ndarray::s![.., o[0]..o[0] + tile[0], o[1]..o[1] + tile[1], o[2]..o[2] + tile[2]]);
            for c in 0..classes {
                let mut d = dst.index_axis_mut(ndarray::Axis(0), c);
                ndarray::Zip::from(&mut d)
                    .and(&tile_scores.index_axis(ndarray::Axis(0), c))
                    .and(&g)
                    .for_each(|d, &s, &w| *d += s * w);
            }
            let mut w =
                weights.slice_mut(ndarray::s![o[0]..o[0] + tile[0], o[1]..o[1] + tile[1], o[2]..o[2] + tile[2]]);
            w += &g;
        }
    }
    for mut c in scores.outer_iter_mut() {
        c /= &weights;
    }
    scores
        .slice(ndarray::s![.., off[0]..off[0] + shape[0], off[1]..off[1] + shape[1], off[2]..off[2] + shape[2]])
        .to_owned()
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
