//! nnU-Net's cross-validation split (`splits_final.json`), reproduced bit for bit.
//!
//! nnU-Net sorts the labeled case ids and cuts them with scikit-learn's
//! `KFold(n_splits=5, shuffle=True, random_state=12345)`, which shuffles `0..n` with numpy's
//! legacy `RandomState` (MT19937). A run that should be comparable with nnU-Net's folds must
//! draw exactly the same numbers, so the generator and the shuffle are re-implemented here
//! rather than taken from a crate. `tests/golden/splits.json` (written by
//! `scripts/reference/splits.py` from nnU-Net itself) pins the result.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The seed and fold count nnU-Net uses for `splits_final.json`.
pub const NNUNET_SEED: u32 = 12345;
pub const NNUNET_FOLDS: usize = 5;
/// Where nnU-Net keeps the split: beside the preprocessed data.
pub const SPLITS_FILE: &str = "splits_final.json";

const N: usize = 624;
const M: usize = 397;

/// MT19937 as numpy's legacy `RandomState(int)` seeds and reads it (32-bit outputs).
struct Mt19937 {
    key: [u32; N],
    pos: usize,
}

impl Mt19937 {
    /// Reference `init_genrand`: numpy's legacy integer seeding uses exactly this.
    fn new(seed: u32) -> Mt19937 {
        let mut key = [0u32; N];
        key[0] = seed;
        for i in 1..N {
            let prev = key[i - 1];
            key[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        // Start exhausted so the first draw regenerates the whole block, as the reference does.
        Mt19937 { key, pos: N }
    }

    fn regenerate(&mut self) {
        for i in 0..N {
            let y = (self.key[i] & 0x8000_0000) | (self.key[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.key[i] = self.key[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.pos = 0;
    }

    /// `genrand_int32`.
    fn next_u32(&mut self) -> u32 {
        if self.pos == N {
            self.regenerate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Uniform integer in `0..=max` the way numpy's `random_interval` draws it: mask the
    /// 32-bit output to the smallest all-ones mask covering `max` and reject values above
    /// `max`. (Lemire's method or a modulo would give other numbers.)
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            // numpy consumes no draw here.
            return 0;
        }
        let mask = u32::MAX >> max.leading_zeros();
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }
}

/// numpy's legacy `RandomState.shuffle` of a 1-D array: Fisher–Yates from the last element
/// down to index 1, swapping `i` with `interval(i)`.
fn legacy_shuffle(values: &mut [usize], rng: &mut Mt19937) {
    for i in (1..values.len()).rev() {
        // numpy switches to 64-bit draws above u32::MAX; no dataset gets near that.
        let max = u32::try_from(i).expect("shuffle of more than 2^32 elements");
        values.swap(i, rng.interval(max) as usize);
    }
}

/// scikit-learn's `KFold(n_splits, shuffle=True, random_state=seed).split(range(n))`:
/// `(train, test)` index lists per fold, each in increasing order.
///
/// The shuffled `0..n` is cut into `n_splits` consecutive chunks, the first `n % n_splits`
/// one longer; fold k tests on chunk k. sklearn returns both sides through a boolean mask, so
/// they come back sorted, not in shuffled order.
///
/// # Panics
/// If `n_splits < 2` or `n < n_splits` (sklearn raises `ValueError`); see
/// [`generate_crossval_split`] for the checked version.
pub fn kfold(n: usize, n_splits: usize, seed: u32) -> Vec<(Vec<usize>, Vec<usize>)> {
    assert!(n_splits >= 2, "k-fold needs n_splits >= 2, got {n_splits}");
    assert!(n >= n_splits, "k-fold with n_splits={n_splits} needs at least that many samples, got {n}");
    let mut order: Vec<usize> = (0..n).collect();
    legacy_shuffle(&mut order, &mut Mt19937::new(seed));

    let mut folds = Vec::with_capacity(n_splits);
    let mut start = 0;
    for k in 0..n_splits {
        let size = n / n_splits + usize::from(k < n % n_splits);
        let mut in_test = vec![false; n];
        for &i in &order[start..start + size] {
            in_test[i] = true;
        }
        start += size;
        let (test, train): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| in_test[i]);
        folds.push((train, test));
    }
    folds
}

/// One fold of `splits_final.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// nnU-Net's `generate_crossval_split`. `sorted_ids` must already be sorted (byte order, as
/// nnU-Net's `np.sort`): the folds are defined on positions in that list.
pub fn generate_crossval_split(sorted_ids: &[String], seed: u32, n_splits: usize) -> Result<Vec<Split>> {
    check_enough_cases(sorted_ids.len(), n_splits).map_err(|m| Error::invalid("cross-validation split", m))?;
    Ok(kfold(sorted_ids.len(), n_splits, seed)
        .into_iter()
        .map(|(train, val)| Split {
            train: train.into_iter().map(|i| sorted_ids[i].clone()).collect(),
            val: val.into_iter().map(|i| sorted_ids[i].clone()).collect(),
        })
        .collect())
}

fn check_enough_cases(n: usize, n_splits: usize) -> std::result::Result<(), String> {
    if n_splits < 2 {
        return Err(format!("cross-validation needs at least 2 folds, got {n_splits}"));
    }
    if n < n_splits {
        let cases = if n == 1 { "case" } else { "cases" };
        return Err(format!(
            "{n_splits}-fold cross-validation needs at least {n_splits} labeled cases, but there {} {n} \
             (nnU-Net fails here too); use `--fold all` to train on all {n} labeled {cases}",
            if n == 1 { "is" } else { "are" },
        ));
    }
    Ok(())
}

/// Reads `splits_final.json` at `path`, or creates it as nnU-Net does (seed 12345, 5 folds)
/// when it does not exist. A file that exists is used as is (it may be hand-made, with any
/// number of folds) but must only name cases from `sorted_ids`.
pub fn read_or_create_splits(path: &Path, sorted_ids: &[String]) -> Result<Vec<Split>> {
    if path.exists() {
        return read_splits(path, sorted_ids);
    }
    check_enough_cases(sorted_ids.len(), NNUNET_FOLDS).map_err(|m| Error::invalid(path, m))?;
    let splits = generate_crossval_split(sorted_ids, NNUNET_SEED, NNUNET_FOLDS)?;
    crate::util::write_json_atomic(path, &splits)?;
    Ok(splits)
}

fn read_splits(path: &Path, sorted_ids: &[String]) -> Result<Vec<Split>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let splits: Vec<Split> = serde_json::from_str(&text).map_err(|e| {
        if e.is_data() {
            // Valid JSON, wrong shape: say what shape is expected.
            Error::invalid(path, format!("expected a list of {{\"train\": [ids], \"val\": [ids]}} folds: {e}"))
        } else {
            Error::json(path, e)
        }
    })?;
    let known: HashSet<&str> = sorted_ids.iter().map(String::as_str).collect();
    for (k, split) in splits.iter().enumerate() {
        for (side, ids) in [("train", &split.train), ("val", &split.val)] {
            if let Some(unknown) = ids.iter().find(|id| !known.contains(id.as_str())) {
                return Err(Error::invalid(
                    path,
                    format!(
                        "fold {k} \"{side}\" names case \"{unknown}\", which is not among the {} labeled cases",
                        sorted_ids.len()
                    ),
                ));
            }
        }
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Golden {
        seed: u32,
        n_splits: usize,
        cases: Vec<GoldenCase>,
    }

    #[derive(Deserialize)]
    struct GoldenCase {
        name: String,
        sorted_ids: Vec<String>,
        splits: Vec<Split>,
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:03}")).collect()
    }

    #[test]
    fn mt19937_matches_reference_outputs() {
        // Reference MT19937 with its default seed 5489, and numpy's RandomState(12345).
        assert_eq!(Mt19937::new(5489).next_u32(), 3_499_211_612);
        let mut rng = Mt19937::new(12345);
        let first: Vec<u32> = (0..3).map(|_| rng.next_u32()).collect();
        assert_eq!(first, [3_992_670_690, 3_823_185_381, 1_358_822_685]);
    }

    #[test]
    fn matches_nnunet_golden_splits() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/splits.json");
        let text = std::fs::read_to_string(path).expect("tests/golden/splits.json (scripts/reference/splits.py)");
        let golden: Golden = serde_json::from_str(&text).unwrap();
        assert!(golden.cases.len() >= 14);
        for case in &golden.cases {
            let mut sorted = case.sorted_ids.clone();
            sorted.sort();
            assert_eq!(sorted, case.sorted_ids, "{}: Rust sort order differs from numpy's", case.name);
            let ours = generate_crossval_split(&case.sorted_ids, golden.seed, golden.n_splits).unwrap();
            assert_eq!(ours, case.splits, "{}", case.name);
        }
    }

    #[test]
    fn folds_partition_the_cases() {
        for n in [5, 7, 23, 100] {
            let folds = kfold(n, 5, 12345);
            let mut all_val: Vec<usize> = folds.iter().flat_map(|(_, v)| v.clone()).collect();
            all_val.sort();
            assert_eq!(all_val, (0..n).collect::<Vec<_>>());
            for (train, val) in &folds {
                assert_eq!(train.len() + val.len(), n);
                assert!(train.iter().all(|i| !val.contains(i)));
            }
        }
    }

    #[test]
    fn too_few_cases_is_a_clear_error() {
        let err = generate_crossval_split(&ids(3), 12345, 5).unwrap_err().to_string();
        assert!(err.contains("there are 3"), "{err}");
        assert!(err.contains("--fold all"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("splits_final.json");
        let err = read_or_create_splits(&path, &ids(3)).unwrap_err().to_string();
        assert!(err.contains("splits_final.json") && err.contains("--fold all"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("splits_final.json");
        let created = read_or_create_splits(&path, &ids(12)).unwrap();
        assert!(path.exists());
        assert_eq!(created, generate_crossval_split(&ids(12), NNUNET_SEED, NNUNET_FOLDS).unwrap());
        assert_eq!(read_or_create_splits(&path, &ids(12)).unwrap(), created);
    }

    #[test]
    fn existing_file_wins_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("splits_final.json");

        // A hand-made file with other folds is used as is.
        let custom = vec![Split { train: vec!["case_000".into()], val: vec!["case_001".into()] }];
        crate::util::write_json_atomic(&path, &custom).unwrap();
        assert_eq!(read_or_create_splits(&path, &ids(6)).unwrap(), custom);

        let unknown = vec![Split { train: vec!["case_000".into()], val: vec!["liver_7".into()] }];
        crate::util::write_json_atomic(&path, &unknown).unwrap();
        let err = read_or_create_splits(&path, &ids(6)).unwrap_err().to_string();
        assert!(err.contains("splits_final.json") && err.contains("liver_7"), "{err}");

        std::fs::write(&path, r#"[{"train": ["case_000"]}]"#).unwrap();
        let err = read_or_create_splits(&path, &ids(6)).unwrap_err().to_string();
        assert!(err.contains("splits_final.json") && err.contains("val"), "{err}");

        std::fs::write(&path, "[{").unwrap();
        let err = read_or_create_splits(&path, &ids(6)).unwrap_err().to_string();
        assert!(err.contains("splits_final.json") && err.contains("invalid JSON"), "{err}");
    }
}
