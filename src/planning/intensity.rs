//! Streaming intensity statistics in bounded memory.
//!
//! 3D-CPS normalises with statistics over *all* voxels of labeled and unlabeled
//! scans; its reference code keeps every 10th voxel of every scan in one list, which
//! is what blows up RAM over 2000 scans. Here each statistic is a fixed-size
//! accumulator: exact sums for mean and variance, an exact histogram for integer
//! values (every CT stored as integers, i.e. almost all of them), and a
//! relative-error log-bucket sketch (DDSketch-style, 0.1%) for anything else.
//! Accumulators merge, so workers fill their own and the results are added. The sums of
//! integer values come from the histogram, exactly: merging in any order, or over any
//! split of the cases (`fingerprint --part`), gives the same bits.

use std::collections::BTreeMap;

/// Integer values in this range are counted exactly.
const INT_MIN: i64 = -32768;
const INT_BINS: usize = 65536;
/// Relative accuracy of the sketch for non-integer values.
const SKETCH_ALPHA: f64 = 0.001;
/// Non-integers smaller than this in magnitude count as zero in the sketch.
const SKETCH_MIN_MAGNITUDE: f64 = 1e-9;

#[derive(Clone, Debug, PartialEq)]
pub struct IntensityAccumulator {
    count: u64,
    /// Sums of the values not counted in `int_hist` (non-integers, or beyond its range).
    sum: f64,
    sum_sq: f64,
    min: f64,
    max: f64,
    /// Allocated on first use (512 KB).
    int_hist: Vec<u64>,
    positive: BTreeMap<i32, u64>,
    negative: BTreeMap<i32, u64>,
    zero: u64,
    ln_gamma: f64,
}

impl Default for IntensityAccumulator {
    fn default() -> Self {
        let gamma = (1.0 + SKETCH_ALPHA) / (1.0 - SKETCH_ALPHA);
        IntensityAccumulator {
            count: 0,
            sum: 0.0,
            sum_sq: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            int_hist: Vec::new(),
            positive: BTreeMap::new(),
            negative: BTreeMap::new(),
            zero: 0,
            ln_gamma: gamma.ln(),
        }
    }
}

/// An accumulator as `fingerprint --part` writes it: every count, the histogram sparse.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccumulatorState {
    pub count: u64,
    pub sum: f64,
    pub sum_sq: f64,
    /// Absent (null) when empty.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// (value, count) of the integer histogram's non-empty bins.
    pub integers: Vec<(i64, u64)>,
    /// (bucket key, count) of the sketch for positive and negative non-integers.
    pub positive: Vec<(i32, u64)>,
    pub negative: Vec<(i32, u64)>,
    pub zero: u64,
}

impl From<&IntensityAccumulator> for AccumulatorState {
    fn from(a: &IntensityAccumulator) -> Self {
        AccumulatorState {
            count: a.count,
            sum: a.sum,
            sum_sq: a.sum_sq,
            min: a.min.is_finite().then_some(a.min),
            max: a.max.is_finite().then_some(a.max),
            integers: a
                .int_hist
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| (i as i64 + INT_MIN, c))
                .collect(),
            positive: a.positive.iter().map(|(&k, &c)| (k, c)).collect(),
            negative: a.negative.iter().map(|(&k, &c)| (k, c)).collect(),
            zero: a.zero,
        }
    }
}

impl TryFrom<&AccumulatorState> for IntensityAccumulator {
    type Error = String;
    fn try_from(s: &AccumulatorState) -> Result<Self, String> {
        let mut a = IntensityAccumulator {
            count: s.count,
            sum: s.sum,
            sum_sq: s.sum_sq,
            min: s.min.unwrap_or(f64::INFINITY),
            max: s.max.unwrap_or(f64::NEG_INFINITY),
            zero: s.zero,
            positive: s.positive.iter().copied().collect(),
            negative: s.negative.iter().copied().collect(),
            ..Default::default()
        };
        if !s.integers.is_empty() {
            a.int_hist = vec![0; INT_BINS];
            for &(v, c) in &s.integers {
                let i = v - INT_MIN;
                if !(0..INT_BINS as i64).contains(&i) {
                    return Err(format!("histogram value {v} is outside {INT_MIN}..{}", INT_MIN + INT_BINS as i64));
                }
                a.int_hist[i as usize] += c;
            }
        }
        let counted = a.int_hist.iter().sum::<u64>()
            + a.positive.values().sum::<u64>()
            + a.negative.values().sum::<u64>()
            + a.zero;
        if counted != a.count {
            return Err(format!("the histogram holds {counted} values, the count says {}", a.count));
        }
        Ok(a)
    }
}

/// The summary written to fingerprint.json and used for normalisation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntensityStats {
    pub count: u64,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub percentile_00_5: f64,
    pub median: f64,
    pub percentile_99_5: f64,
}

impl IntensityAccumulator {
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds a run of values. Non-finite values never get here (the NIfTI reader refuses
    /// such files); they are skipped anyway so they cannot poison the sums.
    pub fn add_slice(&mut self, values: &[f32]) {
        // Non-integer sums per slice in f64, then folded in: accurate enough for 1e11 voxels.
        let (mut s, mut s2, mut n) = (0.0f64, 0.0f64, 0u64);
        let (mut lo, mut hi) = (self.min, self.max);
        for &v in values {
            if !v.is_finite() {
                continue;
            }
            let d = v as f64;
            n += 1;
            lo = lo.min(d);
            hi = hi.max(d);
            if !self.bin(v) {
                s += d;
                s2 += d * d;
            }
        }
        self.sum += s;
        self.sum_sq += s2;
        self.count += n;
        self.min = lo;
        self.max = hi;
    }

    pub fn add(&mut self, v: f32) {
        self.add_slice(std::slice::from_ref(&v));
    }

    /// Counts `v`; true when it went into the exact integer histogram.
    #[inline]
    fn bin(&mut self, v: f32) -> bool {
        let r = v.round();
        if r == v && (r as i64) >= INT_MIN && (r as i64) < INT_MIN + INT_BINS as i64 {
            if self.int_hist.is_empty() {
                self.int_hist = vec![0; INT_BINS];
            }
            self.int_hist[(r as i64 - INT_MIN) as usize] += 1;
            return true;
        }
        let d = v as f64;
        let m = d.abs();
        if m < SKETCH_MIN_MAGNITUDE {
            self.zero += 1;
            return false;
        }
        let key = (m.ln() / self.ln_gamma).ceil() as i32;
        let map = if d > 0.0 { &mut self.positive } else { &mut self.negative };
        *map.entry(key).or_insert(0) += 1;
        false
    }

    /// Exact sums of the histogram's values and of their squares.
    fn integer_sums(&self) -> (i128, i128) {
        let (mut s, mut s2) = (0i128, 0i128);
        for (i, &c) in self.int_hist.iter().enumerate() {
            if c > 0 {
                let v = i as i128 + INT_MIN as i128;
                s += v * c as i128;
                s2 += v * v * c as i128;
            }
        }
        (s, s2)
    }

    pub fn merge(&mut self, other: &IntensityAccumulator) {
        self.count += other.count;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if !other.int_hist.is_empty() {
            if self.int_hist.is_empty() {
                self.int_hist = vec![0; INT_BINS];
            }
            for (a, b) in self.int_hist.iter_mut().zip(&other.int_hist) {
                *a += b;
            }
        }
        for (k, c) in &other.positive {
            *self.positive.entry(*k).or_insert(0) += c;
        }
        for (k, c) in &other.negative {
            *self.negative.entry(*k).or_insert(0) += c;
        }
        self.zero += other.zero;
    }

    /// (value, count) pairs in ascending value order.
    fn ordered_counts(&self) -> Vec<(f64, u64)> {
        let gamma = self.ln_gamma.exp();
        let rep = |k: i32| 2.0 * gamma.powi(k) / (gamma + 1.0);
        let mut v: Vec<(f64, u64)> = Vec::new();
        for (i, &c) in self.int_hist.iter().enumerate() {
            if c > 0 {
                v.push(((i as i64 + INT_MIN) as f64, c));
            }
        }
        for (&k, &c) in &self.positive {
            v.push((rep(k), c));
        }
        for (&k, &c) in &self.negative {
            v.push((-rep(k), c));
        }
        if self.zero > 0 {
            v.push((0.0, self.zero));
        }
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    /// Quantiles at `qs` (0..=1), with numpy's default linear interpolation between
    /// order statistics; exact for integer-valued data.
    pub fn quantiles(&self, qs: &[f64]) -> Vec<f64> {
        if self.count == 0 {
            return vec![f64::NAN; qs.len()];
        }
        let counts = self.ordered_counts();
        // Value of the k-th smallest element (0-based).
        let kth = |k: u64| -> f64 {
            let mut seen = 0u64;
            for &(v, c) in &counts {
                seen += c;
                if k < seen {
                    return v;
                }
            }
            counts.last().map(|x| x.0).unwrap_or(f64::NAN)
        };
        qs.iter()
            .map(|&q| {
                let pos = q.clamp(0.0, 1.0) * (self.count - 1) as f64;
                let lo = pos.floor() as u64;
                let frac = pos - lo as f64;
                let a = kth(lo);
                if frac == 0.0 {
                    a
                } else {
                    a + (kth(lo + 1) - a) * frac
                }
            })
            .collect()
    }

    pub fn stats(&self) -> IntensityStats {
        let n = self.count.max(1) as f64;
        let (int_sum, int_sum_sq) = self.integer_sums();
        let mean = (int_sum as f64 + self.sum) / n;
        // Population std, as numpy's default.
        let var = ((int_sum_sq as f64 + self.sum_sq) / n - mean * mean).max(0.0);
        let q = self.quantiles(&[0.005, 0.5, 0.995]);
        IntensityStats {
            count: self.count,
            mean,
            std: var.sqrt(),
            min: if self.count > 0 { self.min } else { f64::NAN },
            max: if self.count > 0 { self.max } else { f64::NAN },
            percentile_00_5: q[0],
            median: q[1],
            percentile_99_5: q[2],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy.percentile with linear interpolation, on a sorted copy.
    fn reference_quantile(sorted: &[f64], q: f64) -> f64 {
        let pos = q * (sorted.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(sorted.len() - 1);
        sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
    }

    #[test]
    fn integer_data_gives_exact_statistics() {
        let values: Vec<f32> = (0..10_007).map(|i| ((i * 7919) % 4001) as f32 - 1024.0).collect();
        let mut a = IntensityAccumulator::default();
        let (left, right) = values.split_at(3000);
        a.add_slice(left);
        let mut b = IntensityAccumulator::default();
        b.add_slice(right);
        a.merge(&b);
        let s = a.stats();
        let mut sorted: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        let std = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / sorted.len() as f64).sqrt();
        assert_eq!(s.count, values.len() as u64);
        assert!((s.mean - mean).abs() < 1e-9 && (s.std - std).abs() < 1e-6);
        assert_eq!(s.min, sorted[0]);
        assert_eq!(s.max, *sorted.last().unwrap());
        for (got, q) in [(s.percentile_00_5, 0.005), (s.median, 0.5), (s.percentile_99_5, 0.995)] {
            assert!((got - reference_quantile(&sorted, q)).abs() < 1e-9, "q {q}: {got}");
        }
    }

    #[test]
    fn float_data_is_within_the_sketch_accuracy() {
        let values: Vec<f32> = (0..20_000).map(|i| ((i as f32) * 0.37).sin() * 3.3 + 0.05).collect();
        let mut a = IntensityAccumulator::default();
        a.add_slice(&values);
        let mut sorted: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        sorted.sort_by(f64::total_cmp);
        for q in [0.005, 0.1, 0.5, 0.9, 0.995] {
            let got = a.quantiles(&[q])[0];
            let want = reference_quantile(&sorted, q);
            assert!((got - want).abs() <= 0.003 * want.abs() + 1e-3, "q {q}: {got} vs {want}");
        }
    }

    #[test]
    fn memory_does_not_grow_with_the_number_of_values() {
        let mut a = IntensityAccumulator::default();
        for round in 0..50 {
            let v: Vec<f32> = (0..100_000).map(|i| ((i + round) % 3000) as f32 - 1000.0).collect();
            a.add_slice(&v);
        }
        assert_eq!(a.int_hist.len(), INT_BINS);
        assert!(a.positive.is_empty() && a.negative.is_empty());
        assert_eq!(a.count(), 5_000_000);
    }

    #[test]
    fn merging_in_any_order_or_through_the_written_state_gives_the_same_bits() {
        // Large integers: f64 sums of their squares would round differently per order.
        let chunks: Vec<Vec<f32>> = (0..6)
            .map(|k| (0..50_000).map(|i| (((i * 7919 + k * 104_729) % 6001) as f32) - 3000.5 + 0.5).collect())
            .collect();
        let mut mixed = chunks.clone();
        mixed[2].extend([0.25f32, -7.5, 1e-12]);
        let parts: Vec<IntensityAccumulator> = mixed
            .iter()
            .map(|c| {
                let mut a = IntensityAccumulator::default();
                a.add_slice(c);
                a
            })
            .collect();
        let merged = |order: &[usize]| {
            let mut a = IntensityAccumulator::default();
            for &i in order {
                let back = IntensityAccumulator::try_from(&AccumulatorState::from(&parts[i])).unwrap();
                assert_eq!(back, parts[i], "the written state reads back the same");
                a.merge(&back);
            }
            a.stats()
        };
        let forward = merged(&[0, 1, 2, 3, 4, 5]);
        for order in [[5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]] {
            let other = merged(&order);
            assert_eq!(forward.mean.to_bits(), other.mean.to_bits());
            assert_eq!(forward.std.to_bits(), other.std.to_bits());
        }
        let mut bad = AccumulatorState::from(&parts[0]);
        bad.count += 1;
        assert!(IntensityAccumulator::try_from(&bad).unwrap_err().contains("the count says"));
    }

    #[test]
    fn non_finite_values_are_skipped() {
        let mut a = IntensityAccumulator::default();
        a.add_slice(&[1.0, f32::NAN, 3.0, f32::INFINITY]);
        let s = a.stats();
        assert_eq!(s.count, 2);
        assert_eq!(s.mean, 2.0);
    }
}
