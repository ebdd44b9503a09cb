//! Sliding-window prediction as nnU-Net's `predict_sliding_window_return_logits`:
//! the volume padded to at least one tile (zeros, split around it), tiles at
//! `compute_steps_for_sliding_window`'s positions, each tile's **logits** weighted by a
//! Gaussian importance map centred at `tile // 2` (σ = tile/8), summed, and divided by
//! the summed weights; everything on the model's device.
//!
//! Unlike nnU-Net, which holds the logits of the whole volume, scores are accumulated
//! one slab of tile rows (along z) at a time and handed on as soon as no later tile
//! can touch those slices, so memory holds about one tile height plus one step of
//! scores instead of the whole volume's (14 classes × a 200×530×530 CT would be 3 GB).
//! nnU-Net accumulates in float16; we keep float32.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

/// Tile origins along one axis: `ceil((size − tile)/(step·tile)) + 1` tiles spread
/// evenly from 0 to `size − tile`, rounded half to even as numpy's `np.round`
/// (nnU-Net's `compute_steps_for_sliding_window`). A one-voxel tile (a 2D network's
/// slice) visits every position once, as nnU-Net's 2D predictor visits every slice.
pub fn tile_starts(size: usize, tile: usize, step: f64) -> Vec<usize> {
    // Callers validate (inference::check_options); 0 or NaN would never end.
    assert!(step > 0.0 && step <= 1.0 && tile > 0, "sliding window: step {step} not in (0, 1] or tile {tile} empty");
    if size <= tile {
        return vec![0];
    }
    if tile == 1 {
        return (0..size).collect();
    }
    let target = tile as f64 * step;
    let n = ((size - tile) as f64 / target).ceil() as usize + 1;
    let actual = (size - tile) as f64 / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round_ties_even() as usize).collect()
}

/// nnU-Net's `compute_gaussian`: a unit impulse at `tile // 2` blurred with σ = tile/8
/// (scipy's kernel, truncated at 4σ, which never cuts inside a tile), scaled to peak 1;
/// zeros (none for tiles ≥ 2) take the smallest positive value. Values are
/// exp(−d²/2σ²) per axis, multiplied.
pub fn gaussian(tile: [usize; 3]) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let sigma = n as f64 / 8.0;
        let centre = (n / 2) as f64;
        let radius = (4.0 * sigma + 0.5) as i64;
        (0..n)
            .map(|i| {
                let d = i as f64 - centre;
                if d.abs() as i64 > radius {
                    0.0
                } else {
                    (-0.5 * d * d / (sigma * sigma)).exp()
                }
            })
            .collect()
    };
    let (gz, gy, gx) = (axis(tile[0]), axis(tile[1]), axis(tile[2]));
    let mut g: Vec<f32> = Vec::with_capacity(tile.iter().product());
    for &a in &gz {
        for &b in &gy {
            g.extend(gx.iter().map(|&c| (a * b * c) as f32));
        }
    }
    let positive_min = g.iter().cloned().filter(|&v| v > 0.0).fold(f32::MAX, f32::min);
    g.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = positive_min);
    g
}

/// Predicts class logits for a `[C, z, y, x]` volume (on the model's device) with
/// `predict`, which maps a batch of tiles `[n, C, tile]` to logits `[n, K, tile]`.
/// Calls `finish(z_range, logits)` with the normalised logits `[K, z_range, y, x]` of
/// finished slices, in order, covering the volume once.
pub fn sliding_window_slabs(
    volume: &Tensor,
    tile: [usize; 3],
    step: f64,
    classes: usize,
    tiles_per_batch: usize,
    mut predict: impl FnMut(&Tensor) -> Tensor,
    mut finish: impl FnMut(Range<usize>, &Tensor),
) {
    let size = volume.size();
    assert_eq!(size.len(), 4, "volume is [C, z, y, x]");
    assert!(step > 0.0 && step <= 1.0, "sliding window: step {step} not in (0, 1]");
    assert!(tile.iter().all(|&t| t > 0) && classes > 0, "sliding window: tile {tile:?} or {classes} classes");
    let shape = [size[1] as usize, size[2] as usize, size[3] as usize];
    let device = volume.device();
    let padded: [usize; 3] = std::array::from_fn(|a| shape[a].max(tile[a]));
    // Padding split around the volume, the odd voxel after (acvl's pad_nd_image).
    let off: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
    let volume = if padded == shape {
        volume.shallow_clone()
    } else {
        let pad: Vec<i64> =
            (0..3).rev().flat_map(|a| [off[a] as i64, (padded[a] - shape[a] - off[a]) as i64]).collect();
        volume.constant_pad_nd(pad.as_slice())
    };
    let [tz, ty, tx] = tile.map(|v| v as i64);
    let g = Tensor::from_slice(&gaussian(tile)).reshape([tz, ty, tx]).to_device(device);
    let zs = tile_starts(padded[0], tile[0], step);
    let (ys, xs) = (tile_starts(padded[1], tile[1], step), tile_starts(padded[2], tile[2], step));
    // Rolling accumulator over padded z in [base, base + depth): one tile plus the
    // largest gap between slab origins, so a slab always fits after one shift.
    let largest_gap = zs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let depth = (tile[0] + largest_gap).min(padded[0]);
    let (py, px) = (padded[1] as i64, padded[2] as i64);
    let opts = (Kind::Float, device);
    let scores = Tensor::zeros([classes as i64, depth as i64, py, px], opts);
    let weights = Tensor::zeros([depth as i64, py, px], opts);
    let mut base = 0usize;
    let mut emitted = 0usize; // padded z below this has been finished
    let emit = |from: usize, to: usize, base: usize, finish: &mut dyn FnMut(Range<usize>, &Tensor)| {
        // Real slices only, and the real in-plane extent.
        let lo = from.max(off[0]);
        let hi = to.min(off[0] + shape[0]);
        if lo >= hi {
            return;
        }
        let crop = |t: &Tensor, first: i64| {
            t.narrow(first, (lo - base) as i64, (hi - lo) as i64)
                .narrow(first + 1, off[1] as i64, shape[1] as i64)
                .narrow(first + 2, off[2] as i64, shape[2] as i64)
        };
        let part = crop(&scores, 1) / crop(&weights, 0).unsqueeze(0);
        finish(lo - off[0]..hi - off[0], &part);
    };
    tch::no_grad(|| {
        for &z0 in &zs {
            // Slide the window so this slab's tiles fit: finish what lies below z0.
            if z0 + tile[0] > base + depth {
                emit(emitted, z0, base, &mut finish);
                emitted = z0;
                let shift = (z0 - base) as i64;
                let keep = depth as i64 - shift;
                if keep > 0 {
                    // Through a copy: torch refuses partially overlapping copies.
                    let tail = scores.narrow(1, shift, keep).copy();
                    scores.narrow(1, 0, keep).copy_(&tail);
                    let tail = weights.narrow(0, shift, keep).copy();
                    weights.narrow(0, 0, keep).copy_(&tail);
                }
                let _ = scores.narrow(1, keep.max(0), depth as i64 - keep.max(0)).zero_();
                let _ = weights.narrow(0, keep.max(0), depth as i64 - keep.max(0)).zero_();
                base = z0;
            }
            let origins: Vec<[usize; 3]> = ys.iter().flat_map(|&y| xs.iter().map(move |&x| [z0, y, x])).collect();
            for chunk in origins.chunks(tiles_per_batch.max(1)) {
                let tiles: Vec<Tensor> = chunk
                    .iter()
                    .map(|o| volume.narrow(1, o[0] as i64, tz).narrow(2, o[1] as i64, ty).narrow(3, o[2] as i64, tx))
                    .collect();
                let logits = predict(&Tensor::stack(&tiles, 0)).to_kind(Kind::Float);
                assert_eq!(
                    logits.size(),
                    vec![chunk.len() as i64, classes as i64, tz, ty, tx],
                    "the model returned logits of the wrong shape"
                );
                for (i, o) in chunk.iter().enumerate() {
                    let z = (o[0] - base) as i64;
                    let mut dst = scores.narrow(1, z, tz).narrow(2, o[1] as i64, ty).narrow(3, o[2] as i64, tx);
                    let _ = dst.addcmul_(&logits.get(i as i64), &g);
                    let mut w = weights.narrow(0, z, tz).narrow(1, o[1] as i64, ty).narrow(2, o[2] as i64, tx);
                    let _ = w.g_add_(&g);
                }
            }
        }
        emit(emitted, padded[0], base, &mut finish);
    });
}

/// Like [`sliding_window_slabs`], collecting every slab on the CPU: the whole logit
/// volume `[K, z, y, x]` (tests and small volumes).
pub fn sliding_window(
    volume: &Tensor,
    tile: [usize; 3],
    step: f64,
    classes: usize,
    tiles_per_batch: usize,
    predict: impl FnMut(&Tensor) -> Tensor,
) -> Tensor {
    let mut parts = Vec::new();
    sliding_window_slabs(volume, tile, step, classes, tiles_per_batch, predict, |_, part| {
        parts.push(part.to_device(Device::Cpu))
    });
    Tensor::cat(&parts, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(shape: [i64; 4], f: impl Fn(i64, i64, i64, i64) -> f32) -> Tensor {
        let mut v = Vec::new();
        for c in 0..shape[0] {
            for z in 0..shape[1] {
                for y in 0..shape[2] {
                    for x in 0..shape[3] {
                        v.push(f(c, z, y, x));
                    }
                }
            }
        }
        Tensor::from_slice(&v).reshape(shape)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn tiles_cover_the_volume_as_nnunets_steps() {
        assert_eq!(tile_starts(100, 100, 0.7), vec![0]);
        assert_eq!(tile_starts(50, 64, 0.5), vec![0]);
        // nnU-Net's own example: 110 voxels, tile 64, step 0.5 -> 0, 23, 46.
        assert_eq!(tile_starts(110, 64, 0.5), vec![0, 23, 46]);
        let s = tile_starts(300, 128, 0.5);
        assert_eq!((*s.first().unwrap(), *s.last().unwrap()), (0, 300 - 128));
        assert!(s.windows(2).all(|w| w[1] - w[0] <= 64));
        // Single slices: each once, whatever the step.
        assert_eq!(tile_starts(5, 1, 0.5), vec![0, 1, 2, 3, 4]);
        assert_eq!(tile_starts(1, 1, 0.5), vec![0]);
    }

    #[test]
    fn the_gaussian_peaks_at_tile_half_and_is_positive_everywhere() {
        let t = [8, 12, 16];
        let g = gaussian(t);
        assert!(g.iter().all(|&v| v > 0.0 && v <= 1.0));
        let at = |z: usize, y: usize, x: usize| g[(z * t[1] + y) * t[2] + x];
        // Centred at tile // 2 (4, not 3.5): symmetric about index 4, so index 0 (4 away)
        // weighs less than index 7 (3 away).
        assert_eq!(at(4, 6, 8), 1.0);
        assert_eq!(at(3, 6, 8), at(5, 6, 8));
        assert!(at(0, 6, 8) < at(7, 6, 8));
    }

    #[test]
    fn an_identity_model_reconstructs_its_input_borders_included() {
        let vol = volume([2, 23, 37, 41], |c, z, y, x| (c * 1000 + z * 100 + y * 10 + x) as f32 * 0.01);
        let out = sliding_window(&vol, [16, 16, 16], 0.5, 2, 3, |b| b.shallow_clone());
        assert_eq!(out.size(), vol.size());
        assert!(max_abs_diff(&out, &vol) < 1e-3);
    }

    #[test]
    fn small_volumes_are_padded_and_cropped_back() {
        let vol = volume([1, 5, 6, 7], |_, z, y, x| (z + y + x) as f32);
        let out = sliding_window(&vol, [8, 8, 8], 0.7, 1, 1, |b| b.shallow_clone());
        assert_eq!(out.size(), vol.size());
        assert!(max_abs_diff(&out, &vol) < 1e-5);
    }

    #[test]
    fn slabs_equal_the_weighted_mean_over_the_whole_volume() {
        // A model whose output depends on the tile position (not translation
        // invariant): the slab-wise accumulation must equal the direct Gaussian-weighted
        // mean over all tiles covering each voxel.
        let shape = [1i64, 70, 20, 24];
        let vol = volume(shape, |_, z, y, x| ((z as f32 * 0.3).sin() + (y * x) as f32 * 0.001) - 0.2);
        let tile = [16usize, 16, 16];
        let model = |b: &Tensor| b * 2.0 + b.mean_dim(&[1i64, 2, 3, 4][..], true, Kind::Float);
        let out = sliding_window(&vol, tile, 0.5, 1, 2, model);
        // Direct computation.
        let g = Tensor::from_slice(&gaussian(tile)).reshape([16, 16, 16]);
        let num = Tensor::zeros([70, 20, 24], (Kind::Float, Device::Cpu));
        let den = Tensor::zeros([70, 20, 24], (Kind::Float, Device::Cpu));
        for &z in &tile_starts(70, 16, 0.5) {
            for &y in &tile_starts(20, 16, 0.5) {
                for &x in &tile_starts(24, 16, 0.5) {
                    let t = vol.get(0).narrow(0, z as i64, 16).narrow(1, y as i64, 16).narrow(2, x as i64, 16);
                    let p = model(&t.unsqueeze(0).unsqueeze(0)).get(0).get(0);
                    let _ =
                        num.narrow(0, z as i64, 16).narrow(1, y as i64, 16).narrow(2, x as i64, 16).g_add_(&(p * &g));
                    let _ = den.narrow(0, z as i64, 16).narrow(1, y as i64, 16).narrow(2, x as i64, 16).g_add_(&g);
                }
            }
        }
        let direct = num / den;
        assert!(max_abs_diff(&out.get(0), &direct) < 1e-4);
    }
}
