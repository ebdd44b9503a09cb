//! Streaming intensity statistics in bounded memory.
//!
//! 3D-CPS normalises with statistics over *all* voxels of labeled and unlabeled
//! scans; its reference code keeps every 10th voxel of every scan in one list, which
//! is what blows up RAM over 2000 scans. Here each statistic is a fixed-size
//! accumulator: exact sums for mean and variance, an exact histogram for integer
//! values (every CT stored as integers, i.e. almost all of them), and a
//! relative-error log-bucket sketch (DDSketch-style, 0.1%) for anything else.
//! Accumulators merge, so workers fill their own and the results are added.

use std::collections::BTreeMap;

/// Integer values in this range are counted exactly.
const INT_MIN: i64 = -32768;
const INT_BINS: usize = 65536;
/// Relative accuracy of the sketch for non-integer values.
const SKETCH_ALPHA: f64 = 0.001;
/// Non-integers smaller than this in magnitude count as zero in the sketch.
const SKETCH_MIN_MAGNITUDE: f64 = 1e-9;

#[derive(Clone, Debug)]
pub struct IntensityAccumulator {
    count: u64,
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
        // Sums per slice in f64, then folded in: cheap and accurate enough for 1e11 voxels.
        let (mut s, mut s2, mut n) = (0.0f64, 0.0f64, 0u64);
        let (mut lo, mut hi) = (self.min, self.max);
        for &v in values {
            if !v.is_finite() {
                continue;
            }
            let d = v as f64;
            s += d;
            s2 += d * d;
            n += 1;
            lo = lo.min(d);
            hi = hi.max(d);
            self.bin(v);
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

    #[inline]
    fn bin(&mut self, v: f32) {
        let r = v.round();
        if r == v && (r as i64) >= INT_MIN && (r as i64) < INT_MIN + INT_BINS as i64 {
            if self.int_hist.is_empty() {
                self.int_hist = vec![0; INT_BINS];
            }
            self.int_hist[(r as i64 - INT_MIN) as usize] += 1;
            return;
        }
        let d = v as f64;
        let m = d.abs();
        if m < SKETCH_MIN_MAGNITUDE {
            self.zero += 1;
            return;
        }
        let key = (m.ln() / self.ln_gamma).ceil() as i32;
        let map = if d > 0.0 { &mut self.positive } else { &mut self.negative };
        *map.entry(key).or_insert(0) += 1;
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
        let mean = self.sum / n;
        // Population std, as numpy's default.
        let var = (self.sum_sq / n - mean * mean).max(0.0);
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
    fn non_finite_values_are_skipped() {
        let mut a = IntensityAccumulator::default();
        a.add_slice(&[1.0, f32::NAN, 3.0, f32::INFINITY]);
        let s = a.stats();
        assert_eq!(s.count, 2);
        assert_eq!(s.mean, 2.0);
    }
}
