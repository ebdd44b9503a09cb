//! What a run leaves on disk, written so that nothing is lost beyond the current epoch:
//!
//! ```text
//! RUN_DIR/.lock                one training process at a time
//! RUN_DIR/log.jsonl            one line per epoch, each epoch exactly once
//! RUN_DIR/checkpoints/epoch_NNNN/{net0,net1}.safetensors, state.json, plans.json
//! RUN_DIR/latest.json, best.json, final.json   which checkpoint is which
//! ```
//!
//! An epoch is committed by its checkpoint (written under a temporary name, renamed
//! whole, then the pointers replaced atomically); its log line is appended after, and
//! the checkpoint's `state.json` carries that line too, so a run killed between the
//! two gets it back on resume, and a killed run's partial epoch is never logged.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::options::TrainOptions;
use super::records::{nan, EpochLog};
use super::schedule::LrState;
use crate::error::{Error, Result};

/// Everything a resumed run needs besides the networks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub epoch: usize,
    #[serde(deserialize_with = "nan::scalar")]
    pub ema: f64,
    #[serde(deserialize_with = "nan::scalar")]
    pub best_ema: f64,
    #[serde(flatten)]
    pub lr: LrState,
    pub options: TrainOptions,
    /// This epoch's log line (restored into `log.jsonl` if the run died before it).
    #[serde(default)]
    pub log: Option<EpochLog>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pointer {
    pub checkpoint: String,
    pub epoch: usize,
}

/// The latest checkpoint's state and folder, if the run has one.
pub fn latest(run: &Path) -> Result<Option<(State, PathBuf)>> {
    let pointer = run.join("latest.json");
    let text = match std::fs::read_to_string(&pointer) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&pointer, e)),
    };
    let p: Pointer = serde_json::from_str(&text).map_err(|e| Error::json(&pointer, e))?;
    let dir = run.join(&p.checkpoint);
    let state_path = dir.join("state.json");
    let s: State = serde_json::from_str(&std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?)
        .map_err(|e| Error::json(&state_path, e))?;
    Ok(Some((s, dir)))
}

/// Whether `run` holds a previous run's results (which a new run would destroy).
pub fn has_results(run: &Path) -> bool {
    ["log.jsonl", "latest.json", "final.json"].iter().any(|f| run.join(f).exists())
        || std::fs::read_dir(run.join("checkpoints")).is_ok_and(|mut d| d.next().is_some())
}

/// Removes a previous run's results (`train --overwrite`).
pub fn clear_results(run: &Path) -> Result<()> {
    for f in ["log.jsonl", "latest.json", "best.json", "final.json", "progress.png"] {
        match std::fs::remove_file(run.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(run.join(f), e)),
        }
    }
    for d in ["checkpoints", "validation"] {
        if run.join(d).exists() {
            std::fs::remove_dir_all(run.join(d)).map_err(|e| Error::io(run.join(d), e))?;
        }
    }
    Ok(())
}

/// Every epoch logged so far (a resumed run continues the same log).
pub fn read_log(path: &Path) -> Vec<EpochLog> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// Appends one JSON line (an epoch's log line, an autotune decision) and syncs it.
pub fn append_log<T: serde::Serialize + ?Sized>(path: &Path, log: &T) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(log).map_err(|e| Error::json(path, e))?;
    writeln!(f, "{line}").and_then(|_| f.sync_data()).map_err(|e| Error::io(path, e))
}

/// Makes `log.jsonl` hold each epoch up to the checkpoint's exactly once: lines of
/// epochs after it (whose checkpoint never landed), repeated lines and a torn last
/// line go; the checkpoint's own line comes back if the run died before writing it.
pub fn repair_log(path: &Path, state: &State) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut by_epoch: std::collections::BTreeMap<usize, String> = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Ok(l) = serde_json::from_str::<EpochLog>(line) {
            if l.epoch <= state.epoch {
                by_epoch.insert(l.epoch, line.to_string());
            }
        }
    }
    if let Some(l) = &state.log {
        by_epoch.entry(l.epoch).or_insert(serde_json::to_string(l).map_err(|e| Error::json(path, e))?);
    }
    let mut repaired = by_epoch.into_values().collect::<Vec<_>>().join("\n");
    if !repaired.is_empty() {
        repaired.push('\n');
    }
    if repaired != text {
        tracing::info!("{}: repaired to one line per epoch up to epoch {}", path.display(), state.epoch);
        crate::util::write_atomic(path, repaired.as_bytes())?;
    }
    Ok(())
}

/// Moves the pointers to a checkpoint folder that is complete under its final name;
/// removes older checkpoints that no pointer names.
pub fn commit(run: &Path, name: &str, epoch: usize, best: bool, last: bool) -> Result<()> {
    let pointer = Pointer { checkpoint: name.to_string(), epoch };
    crate::util::write_json_atomic(&run.join("latest.json"), &pointer)?;
    if best {
        crate::util::write_json_atomic(&run.join("best.json"), &pointer)?;
    }
    if last {
        crate::util::write_json_atomic(&run.join("final.json"), &pointer)?;
    }
    let keep: Vec<String> = ["latest.json", "best.json", "final.json"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(run.join(p)).ok())
        .filter_map(|t| serde_json::from_str::<Pointer>(&t).ok())
        .map(|p| p.checkpoint)
        .collect();
    for entry in std::fs::read_dir(run.join("checkpoints")).map_err(|e| Error::io(run, e))?.flatten() {
        let rel = format!("checkpoints/{}", entry.file_name().to_string_lossy());
        if !keep.contains(&rel) && !rel.contains(".tmp-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Syncs every file of a folder, then renames it to its final name.
pub fn seal(tmp: &Path, final_dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))?.flatten() {
        if let Ok(f) = std::fs::File::open(entry.path()) {
            f.sync_all().map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    let _ = std::fs::remove_dir_all(final_dir);
    std::fs::rename(tmp, final_dir).map_err(|e| Error::io(final_dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(epoch: usize) -> EpochLog {
        EpochLog {
            epoch,
            lr: 0.01,
            lambda: 0.0,
            loss: vec![1.0],
            sup_loss: vec![1.0],
            cps_loss: vec![0.0],
            pseudo_dice: vec![],
            mean_pseudo_dice: 0.0,
            ema_pseudo_dice: 0.0,
            step_seconds: 0.1,
            data_wait: 0.0,
            epoch_seconds: 1.0,
            phases: Default::default(),
            read_failures: vec![],
        }
    }

    #[test]
    fn the_log_holds_each_checkpointed_epoch_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        // A log as an old build could leave it: epoch 1 twice, an epoch past the
        // checkpoint, a torn last line, and the checkpoint's epoch (2) missing.
        let mut text = String::new();
        for e in [0, 1, 1, 3] {
            text.push_str(&serde_json::to_string(&log(e)).unwrap());
            text.push('\n');
        }
        text.push_str("{\"epoch\": 4, \"lr\"");
        std::fs::write(&path, text).unwrap();
        let state = State {
            epoch: 2,
            ema: 0.0,
            best_ema: 0.0,
            lr: LrState { lr: 0.01, plateau_best: 0.0, plateau_wait: 0 },
            options: TrainOptions::default(),
            log: Some(log(2)),
        };
        repair_log(&path, &state).unwrap();
        let epochs: Vec<usize> = read_log(&path).iter().map(|l| l.epoch).collect();
        assert_eq!(epochs, [0, 1, 2]);
        // Repairing again changes nothing.
        let before = std::fs::read(&path).unwrap();
        repair_log(&path, &state).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn nan_pseudo_dice_survives_the_log_and_the_state() {
        // A class absent from validation has a NaN pseudo-Dice, which JSON stores as null.
        let mut l = log(3);
        l.pseudo_dice = vec![vec![0.5, f64::NAN], vec![f64::NAN, 0.25]];
        l.mean_pseudo_dice = f64::NAN;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        append_log(&path, &l).unwrap();
        let back = read_log(&path);
        assert_eq!(back.len(), 1, "the line is read back, not skipped");
        assert!(back[0].pseudo_dice[0][1].is_nan() && back[0].mean_pseudo_dice.is_nan());
        assert_eq!(back[0].pseudo_dice[1][1], 0.25);
        let state: serde_json::Value = serde_json::json!({
            "epoch": 3, "ema": null, "best_ema": null, "options": TrainOptions::default(),
            "log": serde_json::to_value(&l).unwrap(),
        });
        let mut state = state.as_object().unwrap().clone();
        let lr = LrState { lr: 0.01, plateau_best: f64::NAN, plateau_wait: 0 };
        state.extend(serde_json::to_value(lr).unwrap().as_object().unwrap().clone());
        let s: State = serde_json::from_value(serde_json::Value::Object(state)).unwrap();
        assert!(s.ema.is_nan() && s.lr.plateau_best.is_nan() && s.log.unwrap().pseudo_dice[0][1].is_nan());
    }
}

/// Reads a safetensors file of weights, refusing one that holds a NaN or an infinity
/// (naming the tensor): such weights would train on, or predict, nonsense with exit 0.
pub fn read_finite_tensors(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| e.to_string())?;
    match first_non_finite(&tensors) {
        Some(bad) => Err(format!("{bad}: these weights are unusable (an earlier checkpoint is not)")),
        None => Ok(tensors),
    }
}

/// The first floating-point tensor holding a NaN or an infinity, said with how many, or
/// None when all are finite. One host sync for all of them (they share a device).
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> Option<String> {
    let floats: Vec<&(String, Tensor)> = tensors.iter().filter(|(_, t)| t.is_floating_point()).collect();
    if floats.is_empty() {
        return None;
    }
    let counts: Vec<Tensor> = floats.iter().map(|(_, t)| t.isfinite().logical_not().sum(Kind::Int64)).collect();
    let counts = Tensor::stack(&counts, 0).to_device(tch::Device::Cpu);
    let counts = Vec::<i64>::try_from(&counts).unwrap_or_default();
    floats.iter().zip(counts).find(|(_, n)| *n > 0).map(|((name, t), n)| {
        let total = t.numel();
        let first = t.flatten(0, -1).isfinite().logical_not().nonzero().int64_value(&[0, 0]);
        let value = t.flatten(0, -1).double_value(&[first]);
        format!(
            "tensor {name} holds {n} non-finite value{} of {total} (element {first} is {value})",
            if n == 1 { "" } else { "s" }
        )
    })
}

#[cfg(test)]
mod finite_tests {
    use super::*;

    #[test]
    fn the_first_non_finite_tensor_is_named_with_its_count_and_first_element() {
        let ok = Tensor::from_slice(&[1.0f32, 2.0]);
        let bad = Tensor::from_slice(&[0.0f32, f32::NAN, f32::INFINITY, 3.0]);
        let ints = Tensor::from_slice(&[7i64]);
        let all = vec![("a".to_string(), ok.shallow_clone()), ("i".into(), ints), ("b".into(), bad)];
        let m = first_non_finite(&all).expect("b is not finite");
        assert!(m.contains("tensor b holds 2 non-finite values of 4 (element 1 is NaN)"), "{m}");
        assert_eq!(first_non_finite(&all[..2]), None);
        let inf = vec![("c".to_string(), Tensor::from_slice(&[f64::NEG_INFINITY]))];
        assert!(first_non_finite(&inf).unwrap().contains("1 non-finite value of 1 (element 0 is -inf)"));
    }
}
