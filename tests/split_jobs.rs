//! `fingerprint` and `preprocess` split over processes (`--part I/N`, as a cluster job
//! array runs them) and merged give the bytes one process writes; a missing or stale
//! part or shard is refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{run, stderr, stdout};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?}:\n{}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn refused(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "{args:?} should fail:\n{text}");
    for n in needles {
        assert!(text.contains(n), "{args:?}: missing {n:?} in\n{text}");
    }
}

/// Every file of a folder but the part files, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains(".part-") && !n.starts_with('.'))
        .map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap()))
        .collect()
}

#[test]
fn three_parts_merged_are_one_run_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = t.join("raw");
    let cfg =
        cps3d::synth::SynthConfig { labeled: 4, unlabeled: 3, shape: [12, 24, 24], seed: 5, ..Default::default() };
    cps3d::synth::write_dataset(&cfg, &raw, |_| {}).unwrap();

    let (one, split) = (t.join("one"), t.join("split"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&split).unwrap();
    ok(&["fingerprint", s(&raw), "-o", s(&one.join("fp.json"))]);
    for i in 0..3 {
        let text =
            ok(&["fingerprint", s(&raw), "-o", s(&split.join("fp.json")), "--part", &format!("{i}/3"), "-j", "1"]);
        assert!(text.contains(&format!("fp.json.part-{i}-of-3")), "{text}");
    }
    // Before every part is there, nothing is merged.
    let part2 = split.join("fp.json.part-2-of-3");
    std::fs::rename(&part2, t.join("aside")).unwrap();
    refused(
        &["fingerprint", s(&raw), "-o", s(&split.join("fp.json")), "--merge"],
        &["fp.json.part-2-of-3", "missing: part 2 of 3"],
    );
    std::fs::rename(t.join("aside"), &part2).unwrap();
    ok(&["fingerprint", s(&raw), "-o", s(&split.join("fp.json")), "--merge"]);
    assert_eq!(std::fs::read(one.join("fp.json")).unwrap(), std::fs::read(split.join("fp.json")).unwrap());

    let plans = t.join("plans.json");
    ok(&["plan", s(&one.join("fp.json")), "-o", s(&plans), "--patch-size", "8,16,16"]);
    let (shards_one, shards_split) = (t.join("shards_one"), t.join("shards_split"));
    ok(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards_one)]);
    for i in 0..3 {
        let text = ok(&[
            "preprocess",
            s(&raw),
            "-p",
            s(&plans),
            "-o",
            s(&shards_split),
            "--part",
            &format!("{i}/3"),
            "-j",
            "1",
        ]);
        assert!(text.contains(&format!("part {i}/3")), "{text}");
    }
    assert!(!shards_split.join("manifest.json").exists(), "parts write no manifest.json");
    ok(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards_split), "--merge"]);
    let (a, b) = (files(&shards_one), files(&shards_split));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(*bytes == b[name], "{name} differs between one run and three parts");
    }
    assert_eq!(a.len(), 7 + 2, "7 shards, manifest.json and plans.json");

    // A shard a part listed but that is gone, then a dataset that changed since the parts ran.
    let victim = shards_split.join("phantom_0001.shard");
    std::fs::remove_file(&victim).unwrap();
    refused(
        &["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards_split), "--merge"],
        &["phantom_0001.shard", "missing"],
    );
    let extra = cps3d::synth::SynthConfig { labeled: 4, unlabeled: 4, ..cfg };
    cps3d::synth::write_dataset(&extra, &raw, |_| {}).unwrap();
    refused(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards_split), "--merge"], &["stale", "run part"]);
    refused(&["fingerprint", s(&raw), "-o", s(&split.join("fp.json")), "--merge"], &["stale", "the dataset changed"]);
}

#[test]
fn part_options_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    for bad in ["3/3", "1", "x/2"] {
        refused(&["fingerprint", s(&raw), "--part", bad], &["--part"]);
    }
    let o = common::cps3d()
        .args(["fingerprint", s(&raw), "--part", "slurm"])
        .env_remove("SLURM_ARRAY_TASK_ID")
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("not a job array task"), "{}", stderr(&o));
    refused(&["fingerprint", s(&raw), "--part", "0/2", "--merge"], &["cannot be used with"]);
}
