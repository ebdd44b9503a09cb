//! `cps3d synth`: deterministic, resumable, valid phantom datasets.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{run, stderr, stdout};
use cps3d::synth::{write_dataset, SynthConfig};

fn small(seed: u64, workers: usize) -> SynthConfig {
    SynthConfig { labeled: 3, unlabeled: 5, shape: [20, 40, 48], seed, workers, ..Default::default() }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in ["imagesTr", "labelsTr", "imagesUnlabeled"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let e = e.unwrap();
            out.insert(format!("{sub}/{}", e.file_name().to_string_lossy()), std::fs::read(e.path()).unwrap());
        }
    }
    out.insert("dataset.json".into(), std::fs::read(dir.join("dataset.json")).unwrap());
    out
}

#[test]
fn same_seed_same_bytes_whatever_the_worker_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    write_dataset(&small(7, 1), &a, |_| {}).unwrap();
    write_dataset(&small(7, 2), &b, |_| {}).unwrap();
    write_dataset(&small(8, 2), &c, |_| {}).unwrap();
    let (fa, fb, fc) = (files(&a), files(&b), files(&c));
    assert_eq!(fa.len(), 3 + 3 + 5 + 1);
    assert_eq!(fa, fb);
    assert_ne!(fa["imagesTr/phantom_0000_0000.nii.gz"], fc["imagesTr/phantom_0000_0000.nii.gz"]);
}

#[test]
fn an_interrupted_run_is_finished_by_running_again() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let first = write_dataset(&small(3, 2), &d, |_| {}).unwrap();
    assert_eq!(first.written, 8);
    let before = files(&d);
    // As if killed: one image missing, a stale temporary file left behind.
    std::fs::remove_file(d.join("imagesTr/phantom_0001_0000.nii.gz")).unwrap();
    std::fs::write(d.join("imagesTr/.tmp-999-phantom_0001_0000.nii.gz"), b"partial").unwrap();
    let second = write_dataset(&small(3, 2), &d, |_| {}).unwrap();
    assert_eq!((second.written, second.skipped_existing), (1, 7));
    std::fs::remove_file(d.join("imagesTr/.tmp-999-phantom_0001_0000.nii.gz")).unwrap();
    assert_eq!(files(&d), before);
}

#[test]
fn phantoms_are_valid_varied_and_labeled_with_flare_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let cfg = SynthConfig { labeled: 6, unlabeled: 2, shape: [24, 48, 48], seed: 1, workers: 2, ..Default::default() };
    write_dataset(&cfg, &d, |_| {}).unwrap();
    let report = cps3d::dataset::check::check_dataset(&d, 2, || {}).unwrap();
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!((report.labeled, report.unlabeled), (6, 2));
    let codes: std::collections::BTreeSet<_> = report.files.iter().map(|f| f.axis_codes.clone()).collect();
    assert!(codes.contains("RAS") && codes.contains("LPS"), "{codes:?}");
    let spacings: std::collections::BTreeSet<_> =
        report.files.iter().map(|f| (f.spacing_zyx[0] * 100.0) as i64).collect();
    assert!(spacings.len() >= 3, "spacings vary: {spacings:?}");
    for f in &report.files {
        // Anisotropic: slices thicker than the in-plane spacing.
        assert!(f.spacing_zyx[0] > f.spacing_zyx[1], "{:?}", f.spacing_zyx);
    }
    let mut seen = [false; 14];
    for i in 0..6 {
        let l = cps3d::io::read_labels(&d.join(format!("labelsTr/phantom_{i:04}.nii.gz"))).unwrap();
        for &v in l.data.iter() {
            assert!(v <= 13);
            seen[v as usize] = true;
        }
        let img = cps3d::io::read_image(&d.join(format!("imagesTr/phantom_{i:04}_0000.nii.gz"))).unwrap();
        let (lo, hi) = img.data.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!((-1024.0..-900.0).contains(&lo) && hi > 300.0 && hi <= 3071.0, "HU range {lo}..{hi}");
    }
    assert!(seen.iter().all(|&s| s), "every FLARE organ appears somewhere: {seen:?}");
    assert!(!d.join("labelsTr/unlabeled_00000.nii.gz").exists());
}

#[test]
fn spacing_ranges_are_respected_and_bad_options_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let out = run(&[
        "synth",
        d.to_str().unwrap(),
        "--labeled",
        "2",
        "--unlabeled",
        "1",
        "--shape",
        "16,32,32",
        "--spacing-xy",
        "0.7,0.9",
        "--spacing-z",
        "2.5,2.5",
        "--seed",
        "4",
        "-j",
        "1",
        "--uncompressed",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for i in 0..2 {
        let g = cps3d::io::read_header(&d.join(format!("imagesTr/phantom_{i:04}_0000.nii"))).unwrap();
        let s = g.spacing();
        assert!((s[0] - 2.5).abs() < 1e-4 && (0.7..=0.9).contains(&s[1]) && (s[1] - s[2]).abs() < 1e-6, "{s:?}");
        assert_eq!(g.shape(), [16, 32, 32]);
    }
    let bad = run(&["synth", d.to_str().unwrap(), "--shape", "4,32,32"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("too small"), "{}", stderr(&bad));
    let bad = run(&["synth", d.to_str().unwrap(), "--spacing-z", "3,1"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--spacing-z"), "{}", stderr(&bad));
    // Spacings whose files the reader would refuse (absurd, or rounding to 0 as written)
    // are refused before anything is written.
    let fresh = tmp.path().join("absurd");
    for (flag, range, needle) in [
        ("--spacing-xy", "1e30,1e30", "voxel size 1e30 mm"),
        ("--spacing-z", "2e4,3e4", "voxel size 2e4 mm"),
        ("--spacing-xy", "0.001,0.002", "voxel size 0e0 mm"),
    ] {
        let bad = run(&["synth", fresh.to_str().unwrap(), "--shape", "8,16,16", flag, range]);
        assert!(!bad.status.success(), "{flag} {range}");
        assert!(stderr(&bad).contains(needle) && stderr(&bad).contains("reader refuses"), "{}", stderr(&bad));
        assert!(!fresh.join("imagesTr").exists(), "{flag} {range}: nothing written");
    }
}

#[test]
fn info_reports_libtorch_and_devices() {
    let out = run(&["info"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("libtorch 2.13.0"), "{text}");
    assert!(text.contains("CUDA available:"), "{text}");
    let json = run(&["info", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["libtorch_version"], "2.13.0");
    assert!(v["cpu_threads"].as_i64().unwrap() >= 1);
    // Said both ways, and the same way.
    let native = v["cpu_native_bf16"].as_bool().expect("cpu_native_bf16 is a boolean");
    assert!(text.contains(if native { "bfloat16 native" } else { "bfloat16 emulated" }), "{text}");
    // The measured convolution throughput: a plausible float32 rate on any CPU of this
    // century (one thread), and a bfloat16 rate exactly where bfloat16 is native.
    let conv = &v["cpu_convolution"];
    let f32_rate = conv["float32_gflops"].as_f64().expect("float32 throughput");
    assert!((0.5..5000.0).contains(&f32_rate), "{conv}");
    assert_eq!(conv["bfloat16_gflops"].is_f64(), native, "{conv}");
    assert!(text.contains("convolution throughput, one thread") && text.contains("GFLOP/s"), "{text}");
}

#[test]
fn capping_onednn_below_avx512_bf16_is_seen_as_a_cpu_without_native_bfloat16() {
    // What README tells users to do to run as on a CPU without AVX-512.
    let out = common::cps3d().args(["info", "--json"]).env("ONEDNN_MAX_CPU_ISA", "AVX2").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cpu_native_bf16"], false, "{v}");
    assert!(v["cpu_convolution"]["bfloat16_gflops"].is_null(), "{v}");
}
