//! `cps3d bench` and `cps3d tune` over shards preprocessed from synthetic phantoms.

mod common;

use common::{run, stderr, stdout};

fn shards(tmp: &std::path::Path) -> std::path::PathBuf {
    let cfg = cps3d::synth::SynthConfig {
        labeled: 2,
        unlabeled: 3,
        shape: [24, 48, 48],
        seed: 2,
        workers: 2,
        ..Default::default()
    };
    common::preprocessed(tmp, cfg, &["--patch-size", "16,32,32"])
}

#[test]
fn bench_reports_throughput_per_stage_and_tune_recommends() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shards(tmp.path());
    let o = run(&["bench", out.to_str().unwrap(), "--batches", "4", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["patches"], 16);
    assert_eq!(r["patch"], serde_json::json!([16, 32, 32]));
    assert!(r["patches_per_s"].as_f64().unwrap() > 0.0);
    let stages: Vec<&str> =
        r["telemetry"]["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["loader", "augmenter", "batcher"]);
    assert!(r["telemetry"]["bottleneck"].as_str().is_some());
    let o = run(&["bench", out.to_str().unwrap(), "--batches", "2", "--no-augment", "--loaders", "2"]);
    let text = stdout(&o);
    assert!(o.status.success() && text.contains("no augmentation") && text.contains("bottleneck:"), "{text}");
    let o = run(&["tune", out.to_str().unwrap(), "--cores", "2", "--batches", "2"]);
    let text = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("recommended for 2 cores: --loaders"), "{text}");
    assert_eq!(text.lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).count(), 3, "{text}");
}

#[test]
fn bench_on_a_folder_without_shards_names_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&["bench", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("manifest.json"), "{}", stderr(&o));
}
