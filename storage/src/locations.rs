//! Per-class foreground voxel locations, which the loader uses to centre patches on rare classes
//! (nnU-Net's oversampling) without decompressing any label brick.

use crate::format::LOCATION_LEN;

/// Default upper bound on the locations kept per class.
pub const DEFAULT_LOCATION_CAP: usize = 10_000;
/// Default lower bound on the fraction of a class's voxels kept (wins over the cap).
pub const DEFAULT_LOCATION_MIN_FRACTION: f64 = 0.01;
/// Default seed of the sampling RNG: fixed so that rewriting a case gives the same file.
pub const DEFAULT_LOCATION_SEED: u64 = 0x00C0_FFEE_5EED;

/// The sampled locations of one class, as C-order linear voxel indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSample {
    /// Class id, 1..=255 (0 is background and has no locations).
    pub class: u8,
    /// How many voxels of the volume carry this class (before sampling).
    pub voxels: u64,
    /// Strictly increasing linear indices `(z * ny + y) * nx + x`.
    pub locations: Vec<u32>,
}

/// What a shard says about one class present in its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassInfo {
    pub class: u8,
    /// Voxels of this class in the whole volume.
    pub voxels: u64,
    /// Locations stored for it.
    pub sampled: usize,
}

/// How many locations to keep for a class of `voxels` voxels: all of them up to `cap`, beyond
/// it `cap` or `min_fraction` of them, whichever is more (nnU-Net's rule).
pub fn locations_to_keep(voxels: u64, cap: usize, min_fraction: f64) -> u64 {
    if voxels <= cap as u64 {
        return voxels;
    }
    let fraction = (voxels as f64 * min_fraction).ceil() as u64;
    (cap as u64).max(fraction).min(voxels)
}

/// Samples each present class's locations from a label volume in one pass: every voxel of a
/// class is kept with the probability that leaves exactly the target count (selection sampling),
/// so the result is uniform, sorted, and fixed by `seed`.
pub fn sample_class_locations(labels: &[u8], cap: usize, min_fraction: f64, seed: u64) -> Vec<ClassSample> {
    let mut counts = [0u64; 256];
    for &l in labels {
        counts[l as usize] += 1;
    }
    let mut wanted = [0u64; 256];
    let mut samples: Vec<Option<ClassSample>> = (0..256).map(|_| None).collect();
    for class in 1..256 {
        if counts[class] > 0 {
            wanted[class] = locations_to_keep(counts[class], cap, min_fraction);
            samples[class] = Some(ClassSample {
                class: class as u8,
                voxels: counts[class],
                locations: Vec::with_capacity(wanted[class] as usize),
            });
        }
    }
    let mut unseen = counts;
    let mut rng = SplitMix64(seed);
    for (i, &l) in labels.iter().enumerate() {
        let c = l as usize;
        if c == 0 || wanted[c] == 0 {
            continue;
        }
        // Keep with probability wanted / unseen; when the two are equal every voxel is kept.
        let keep = wanted[c] == unseen[c] || ((rng.next() as u128 * unseen[c] as u128) >> 64) < wanted[c] as u128;
        unseen[c] -= 1;
        if keep {
            wanted[c] -= 1;
            if let Some(s) = samples[c].as_mut() {
                s.locations.push(i as u32);
            }
        }
    }
    samples.into_iter().flatten().collect()
}

/// A small, well-mixed generator; the exact stream only has to be stable across builds.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A view of one class's stored locations inside a mapped shard.
#[derive(Debug, Clone, Copy)]
pub struct ClassLocations<'a> {
    bytes: &'a [u8],
    shape: [usize; 3],
}

impl<'a> ClassLocations<'a> {
    pub(crate) fn new(bytes: &'a [u8], shape: [usize; 3]) -> Self {
        ClassLocations { bytes, shape }
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / LOCATION_LEN
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The `i`-th location as a linear C-order index.
    pub fn linear(&self, i: usize) -> Option<u32> {
        let b = self.bytes.get(i * LOCATION_LEN..(i + 1) * LOCATION_LEN)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The `i`-th location as (z, y, x).
    pub fn get(&self, i: usize) -> Option<[usize; 3]> {
        self.linear(i).map(|l| unravel(l as usize, self.shape))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = [usize; 3]> + 'a {
        let shape = self.shape;
        self.bytes
            .chunks_exact(LOCATION_LEN)
            .map(move |b| unravel(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, shape))
    }
}

pub(crate) fn unravel(linear: usize, shape: [usize; 3]) -> [usize; 3] {
    let x = linear % shape[2];
    let rest = linear / shape[2];
    [rest / shape[1], rest % shape[1], x]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rule_matches_nnunet() {
        assert_eq!(locations_to_keep(50, 100, 0.01), 50);
        assert_eq!(locations_to_keep(5_000, 100, 0.01), 100);
        assert_eq!(locations_to_keep(50_000, 100, 0.01), 500);
        assert_eq!(locations_to_keep(10, 0, 0.01), 1);
    }

    #[test]
    fn sampling_is_exact_sorted_and_deterministic() {
        let labels: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let a = sample_class_locations(&labels, 1_000, 0.01, 42);
        let b = sample_class_locations(&labels, 1_000, 0.01, 42);
        assert_eq!(a, b);
        assert_eq!(a.len(), 6);
        for s in &a {
            assert_eq!(s.voxels, 100_000 / 7 + u64::from(u32::from(s.class) < 100_000 % 7));
            assert_eq!(s.locations.len(), 1_000);
            assert!(s.locations.windows(2).all(|w| w[0] < w[1]));
            assert!(s.locations.iter().all(|&l| labels[l as usize] == s.class));
        }
        // Spread over the whole volume, not bunched at its start.
        assert!(a[0].locations.last().copied().unwrap_or(0) > 90_000);
    }
}
