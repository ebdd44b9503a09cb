//! CPS training on CPU with a tiny plan: the loss falls, resuming is exact, and a
//! run killed at any moment leaves a loadable checkpoint.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{run, stderr, stdout};
use cps3d::training::run::{checkpoint_tensors, train, TrainOptions};

/// Phantoms → a tiny plan (patch 16×32×32, features 8..32) → shards.
fn tiny_shards(tmp: &Path) -> PathBuf {
    let cfg = cps3d::synth::SynthConfig {
        labeled: 4,
        unlabeled: 4,
        shape: [24, 48, 48],
        seed: 3,
        workers: 2,
        ..Default::default()
    };
    common::preprocessed(tmp, cfg, &["--patch-size", "16,32,32", "--features", "8,16,32,32"])
}

fn options(shards: &Path, run_dir: &Path, epochs: usize, iterations: usize) -> TrainOptions {
    TrainOptions {
        shards: shards.to_path_buf(),
        run_dir: run_dir.to_path_buf(),
        devices: vec!["cpu".into(), "cpu".into()],
        epochs: Some(epochs),
        iterations: Some(iterations),
        seed: 5,
        ..Default::default()
    }
}

fn final_weights(run_dir: &Path) -> Vec<Vec<(String, Vec<f32>)>> {
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("final.json")).unwrap()).unwrap();
    let dir = run_dir.join(p["checkpoint"].as_str().unwrap());
    (0..2)
        .map(|i| {
            let mut v: Vec<(String, Vec<f32>)> = checkpoint_tensors(&dir.join(format!("net{i}.safetensors")))
                .unwrap()
                .into_iter()
                .map(|(k, t)| (k, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        })
        .collect()
}

#[test]
fn the_loss_falls_over_a_few_dozen_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tiny_shards(tmp.path());
    let logs = train(&options(&shards, &tmp.path().join("run"), 4, 8), false, None, |_| {}).unwrap();
    assert_eq!(logs.len(), 4);
    for net in 0..2 {
        let (first, last) = (logs[0].sup_loss[net], logs[3].sup_loss[net]);
        assert!(last < first - 0.3, "net {net}: supervised loss {first} -> {last}");
    }
    // λ ramps from 0; both siblings log a CPS term.
    assert_eq!(logs[0].lambda, 0.0);
    assert!(logs[3].lambda > 0.0 && logs.iter().all(|l| l.cps_loss.len() == 2));
    let lines = std::fs::read_to_string(tmp.path().join("run/log.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    // Only the checkpoints a pointer names are kept.
    let kept = std::fs::read_dir(tmp.path().join("run/checkpoints")).unwrap().count();
    assert!((1..=2).contains(&kept), "{kept} checkpoints kept");
}

#[test]
fn resuming_gives_the_same_parameters_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tiny_shards(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(&options(&shards, &a, 3, 3), false, None, |_| {}).unwrap();
    train(&options(&shards, &b, 1, 3), false, None, |_| {}).unwrap();
    // The first run stopped after epoch 0; continue it to 3 epochs.
    let mut more = options(&shards, &b, 3, 3);
    more.epochs = Some(3);
    let logs = train(&more, true, None, |_| {}).unwrap();
    assert_eq!(logs.first().map(|l| l.epoch), Some(1));
    let (wa, wb) = (final_weights(&a), final_weights(&b));
    assert_eq!(wa.len(), wb.len());
    for (na, nb) in wa.iter().zip(&wb) {
        assert_eq!(na.len(), nb.len());
        for ((ka, va), (kb, vb)) in na.iter().zip(nb) {
            assert_eq!(ka, kb);
            assert_eq!(va, vb, "{ka} differs after resuming");
        }
    }
}

#[test]
fn a_killed_run_leaves_a_loadable_checkpoint_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tiny_shards(tmp.path());
    let run_dir = tmp.path().join("run");
    let mut child = common::cps3d()
        .args([
            "train",
            shards.to_str().unwrap(),
            "-o",
            run_dir.to_str().unwrap(),
            "--epochs",
            "100",
            "--iterations",
            "2",
            "--devices",
            "cpu,cpu",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !run_dir.join("latest.json").exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Kill somewhere in the following epochs, likely mid-write.
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap();
    child.wait().unwrap();
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("latest.json")).unwrap()).unwrap();
    let epoch = p["epoch"].as_u64().unwrap() as usize;
    let o = run(&["train", "--resume", run_dir.to_str().unwrap(), "--epochs", &(epoch + 2).to_string()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("1 epoch(s) trained"), "{}", stdout(&o));
    let log = std::fs::read_to_string(run_dir.join("log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["epoch"].as_u64().unwrap() as usize, epoch + 1);
}

#[test]
fn supervised_baseline_trains_one_network_and_exports_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tiny_shards(tmp.path());
    let run_dir = tmp.path().join("run");
    let o = run(&[
        "train",
        shards.to_str().unwrap(),
        "-o",
        run_dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--iterations",
        "2",
        "--devices",
        "cpu,cpu",
        "--supervised-only",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let log = std::fs::read_to_string(run_dir.join("log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["loss"].as_array().unwrap().len(), 1);
    assert_eq!(last["lambda"], 0.0);
    assert!(run_dir.join("progress.png").exists());
    let out = tmp.path().join("export");
    let o = run(&["export", run_dir.to_str().unwrap(), "--checkpoint", "final", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = checkpoint_tensors(&out.join("net0.safetensors")).unwrap();
    assert!(!out.join("net1.safetensors").exists());
    let plans = cps3d::planning::plan::Plans::read(&out.join("plans.json")).unwrap();
    let count: u64 = weights.iter().map(|(_, t)| t.numel() as u64).sum();
    assert_eq!(count, plans.configurations["3d_fullres"].network.parameter_count);
    assert!(weights.iter().all(|(k, _)| !k.starts_with("momentum.") && !k.starts_with("model.")));
}
