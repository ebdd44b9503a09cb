//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `../shared/data` beside the checkout (or `$CPS3D_SHARED_DATA`), where the real CT
/// files live. `None`, with a loud message, when it is absent: those tests then
/// check nothing, and say so.
pub fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CPS3D_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    if dir.join("Dataset001_TSAbdomen/dataset.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: real CT data not found at {} (set CPS3D_SHARED_DATA); this test checked nothing",
            dir.display()
        );
        None
    }
}

pub fn cps3d() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cps3d"))
}

pub fn run(args: &[&str]) -> Output {
    let out = cps3d().args(args).output().expect("cps3d runs");
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copies a directory tree (the real dataset into a temporary folder, to break it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            let mut perms = std::fs::metadata(&target).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            std::fs::set_permissions(&target, perms).unwrap();
        }
    }
}

/// Synthetic phantoms → fingerprint → plan (with `plan_args`) → shards, through the
/// CLI; returns the shard folder (plans.json and fingerprint.json beside it).
pub fn preprocessed(tmp: &Path, cfg: cps3d::synth::SynthConfig, plan_args: &[&str]) -> PathBuf {
    let d = tmp.join("raw");
    cps3d::synth::write_dataset(&cfg, &d, |_| {}).unwrap();
    let (fp, pl, out) = (tmp.join("fp.json"), tmp.join("plans.json"), tmp.join("shards"));
    let mut plan = vec!["plan", fp.to_str().unwrap(), "-o", pl.to_str().unwrap()];
    plan.extend_from_slice(plan_args);
    for args in [
        vec!["fingerprint", d.to_str().unwrap(), "-o", fp.to_str().unwrap()],
        plan,
        vec!["preprocess", d.to_str().unwrap(), "-p", pl.to_str().unwrap(), "-o", out.to_str().unwrap()],
    ] {
        let o = run(&args);
        assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    }
    out
}

/// Five labeled phantoms (the fewest nnU-Net's five folds allow) and three unlabeled.
fn tiny_phantoms() -> cps3d::synth::SynthConfig {
    cps3d::synth::SynthConfig {
        labeled: 5,
        unlabeled: 3,
        shape: [24, 48, 48],
        seed: 3,
        workers: 2,
        ..Default::default()
    }
}

/// Phantoms → a tiny plan (patch 16×32×32, features 8..32) → shards.
pub fn tiny_shards(tmp: &Path) -> PathBuf {
    preprocessed(tmp, tiny_phantoms(), &["--patch-size", "16,32,32", "--features", "8,16,32,32"])
}

/// Like [`tiny_shards`], for the 2D configuration (patch 32×32, features 8..32):
/// the same phantoms and plan, preprocessed with `-c 2d` into `shards_2d`.
pub fn tiny_shards_2d(tmp: &Path) -> PathBuf {
    let plan = [
        "--patch-size",
        "16,32,32",
        "--features",
        "8,16,32,32",
        "--patch-size-2d",
        "32,32",
        "--features-2d",
        "8,16,32,32",
    ];
    preprocessed(tmp, tiny_phantoms(), &plan);
    let (raw, plans, out) = (tmp.join("raw"), tmp.join("plans.json"), tmp.join("shards_2d"));
    let args =
        ["preprocess", raw.to_str().unwrap(), "-p", plans.to_str().unwrap(), "-o", out.to_str().unwrap(), "-c", "2d"];
    let o = run(&args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    // 2D shards default to single-slice bricks (what a 2D sample reads).
    let shard = cps3d_storage::Shard::open(out.join("phantom_0000.shard")).unwrap();
    assert_eq!(shard.brick_shape()[0], 1, "2D shards are stored slice by slice");
    out
}

/// A FLARE22 score table (`cps3d evaluate`'s CSV): its header and (case name, 26 scores) rows.
pub fn score_table(csv: &Path) -> (String, Vec<(String, Vec<f64>)>) {
    let text = std::fs::read_to_string(csv).unwrap_or_else(|e| panic!("{}: {e}", csv.display()));
    let mut lines = text.lines();
    let header = lines.next().expect("a header line").to_string();
    let rows = lines
        .map(|l| {
            let mut cells = l.split(',');
            let name = cells.next().unwrap().to_string();
            (name, cells.map(|c| if c == "NaN" { f64::NAN } else { c.parse().unwrap() }).collect())
        })
        .collect();
    (header, rows)
}
