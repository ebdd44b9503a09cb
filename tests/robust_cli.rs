//! Issue 13 (reliability), the CLI's bad-option and resource-limit items: every bad
//! value is refused up front with a message naming the flag (or file) and the allowed
//! range, never a panic, an abort, a runaway allocation or an endless loop.
//!
//! Every child runs under a guard that kills it after a timeout or past a resident
//! memory cap and fails the test, so a regression hangs or swaps nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Far above what these tiny inputs need, far below what a runaway would take.
const RSS_CAP_BYTES: u64 = 3_000_000_000;

struct Run {
    args: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn text(&self) -> String {
        format!(
            "cps3d {}\n--- status {:?}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }

    fn ok(&self) -> &Self {
        assert!(self.status.success(), "expected success:\n{}", self.text());
        self
    }

    /// Exit status 1 (our error) or 2 (clap's usage error), no panic, and every
    /// `needle` in the message.
    fn refused(&self, needles: &[&str]) -> &Self {
        let code = self.status.code();
        assert!(matches!(code, Some(1) | Some(2)), "expected a clean refusal (exit 1 or 2):\n{}", self.text());
        assert!(!self.stderr.contains("panicked"), "a panic is no error message:\n{}", self.text());
        for n in needles {
            assert!(self.stderr.contains(n), "the message should mention {n:?}:\n{}", self.text());
        }
        self
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs the CLI with a wall-clock and memory guard.
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cps3d"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Tests decide the memory budget themselves where it matters.
    cmd.env_remove("CPS3D_MAX_MEMORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cps3d starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let pid = child.id();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let rss = rss_bytes(pid);
        let why = if start.elapsed() > TIMEOUT {
            Some(format!("still running after {TIMEOUT:?}"))
        } else if rss > RSS_CAP_BYTES {
            Some(format!("resident memory {} MB passed the test's cap", rss / 1_000_000))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            panic!("cps3d {}: {why}; killed\n--- stdout\n{o}--- stderr\n{e}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run { args: args.join(" "), status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

fn cli(args: &[&str]) -> Run {
    cli_env(args, &[])
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Tiny phantoms (16×32×32, about 10 mm voxels): `t/raw`.
fn phantoms(t: &Path) -> PathBuf {
    let raw = t.join("raw");
    cli(&["synth", s(&raw), "--labeled", "2", "--unlabeled", "1", "--shape", "16,32,32", "-j", "1", "--seed", "3"])
        .ok();
    raw
}

/// Phantoms and their fingerprint: (raw, fingerprint.json).
fn fingerprinted(t: &Path) -> (PathBuf, PathBuf) {
    let raw = phantoms(t);
    let fp = t.join("fp.json");
    cli(&["fingerprint", s(&raw), "-o", s(&fp), "-j", "1"]).ok();
    (raw, fp)
}

/// Phantoms → fingerprint → plan → shards: (raw, plans.json, shards).
fn sharded(t: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (raw, fp) = fingerprinted(t);
    let plans = t.join("plans.json");
    cli(&["plan", s(&fp), "-o", s(&plans), "--patch-size", "16,32,32", "--features", "4,8,16,16"]).ok();
    let shards = t.join("shards");
    cli(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards), "-j", "1"]).ok();
    (raw, plans, shards)
}

/// The golden tiny model (an export folder: net0, net1, plans.json) copied to `dir`.
fn model(dir: &Path) -> PathBuf {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inference/model");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["net0.safetensors", "net1.safetensors", "plans.json"] {
        std::fs::copy(golden.join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

/// A run folder as `cps3d train` leaves it, with only `best.json` pointing at the
/// golden model's weights (without plans.json when `plans` is false).
fn run_folder(t: &Path, plans: bool) -> PathBuf {
    let run = t.join("run");
    let ck = model(&run.join("checkpoints/epoch_0001"));
    if !plans {
        std::fs::remove_file(ck.join("plans.json")).unwrap();
    }
    std::fs::write(run.join("best.json"), r#"{"checkpoint": "checkpoints/epoch_0001", "epoch": 1}"#).unwrap();
    run
}

fn image(raw: &Path) -> PathBuf {
    raw.join("imagesTr/phantom_0000_0000.nii.gz")
}

#[test]
fn predict_step_must_lie_in_0_1_and_move_tiles_by_a_voxel() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = phantoms(t);
    let m = model(&t.join("model"));
    let out = t.join("out");
    let predict = |step: &str| {
        cli(&["predict", "-i", s(&image(&raw)), "-o", s(&out), "-m", s(&m), "--device", "cpu", "--step", step])
    };
    // 0 and 1e-9 would compute tiles without end, inf panicked in ndarray, NaN made no
    // tiles, 2 left gaps of background between tiles.
    for bad in ["0", "-0.5", "NaN", "inf", "2", "1.0001"] {
        predict(bad).refused(&["--step", "(0, 1]"]);
    }
    // Inside (0, 1] but less than a voxel of the 16×48×48 tile.
    predict("1e-9").refused(&["--step", "voxel"]);
    assert!(!out.join("phantom_0000.nii.gz").exists(), "nothing predicted with a refused step");
    predict("1").ok();
    assert!(out.join("phantom_0000.nii.gz").is_file());
}

#[test]
fn predict_forced_spacing_must_be_positive_finite_and_fit_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = phantoms(t);
    let m = model(&t.join("model"));
    let out = t.join("out");
    let predict = |forced: &str| {
        cli(&[
            "predict",
            "-i",
            s(&image(&raw)),
            "-o",
            s(&out),
            "-m",
            s(&m),
            "--device",
            "cpu",
            "--forced-spacing",
            forced,
        ])
    };
    // 0,0 gave a network grid of [z, 1, 1].
    for bad in ["0,0", "-1,1", "1,nan", "inf,1", "1", "a,b"] {
        predict(bad).refused(&["--forced-spacing"]);
    }
    // Scans treated as 1 km voxels in-plane: a network grid of ~10^14 voxels, refused
    // before any allocation.
    predict("1000000,1000000").refused(&["memory", "--forced-spacing"]);
    predict("authors").ok();
}

#[test]
fn predict_feeds_each_plan_channel_its_own_file_or_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = phantoms(t);
    let m = model(&t.join("model"));
    let (input, out) = (t.join("input"), t.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    let predict = |i: &Path| cli(&["predict", "-i", s(i), "-o", s(&out), "-m", s(&m), "--device", "cpu"]);
    // Channel 1 without channel 0: once read as channel 0, now refused with both names.
    let stray = input.join("case_0001.nii.gz");
    std::fs::copy(image(&raw), &stray).unwrap();
    predict(&input).refused(&[
        "case",
        "lacks channel 0 (CT, file case_0000)",
        "case_0001.nii.gz",
        "no channel of the plan",
    ]);
    predict(&stray).refused(&["lacks channel 0"]);
    assert!(!out.join("case.nii.gz").exists());
    // A lone file without the suffix is the channel of a one-channel model.
    let plain = input.join("scan.nii.gz");
    std::fs::rename(&stray, &plain).unwrap();
    predict(&plain).ok();
    assert!(out.join("scan.nii.gz").is_file());
}

#[test]
fn predict_checks_that_the_output_folder_is_writable_before_predicting() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = phantoms(t);
    let m = model(&t.join("model"));
    // A folder that exists but where no file can be created, even by root.
    let r = cli(&["predict", "-i", s(&image(&raw)), "-o", "/proc/self", "-m", s(&m), "--device", "cpu"]);
    r.refused(&["/proc/self", "not writable"]);
    assert!(!r.stderr.contains("failed: phantom"), "refused before computing any case:\n{}", r.text());
    // The probe leaves nothing behind in a writable folder.
    let out = t.join("out");
    cli(&["predict", "-i", s(&image(&raw)), "-o", s(&out), "-m", s(&m), "--device", "cpu"]).ok();
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["phantom_0000.nii.gz".to_string()]);
}

#[test]
fn unknown_checkpoint_names_are_refused_and_missing_pointers_list_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = phantoms(t);
    let run = run_folder(t, true);
    let out = t.join("out");
    let predict = |ck: &str| {
        cli(&["predict", "-i", s(&image(&raw)), "-o", s(&out), "-m", s(&run), "--device", "cpu", "--checkpoint", ck])
    };
    predict("nonsense").refused(&["--checkpoint", "best", "final", "latest"]);
    cli(&["export", s(&run), "--checkpoint", "nonsense", "-o", s(&t.join("e"))]).refused(&["--checkpoint"]);
    // A run that has not finished has no final.json: say which pointers it has.
    predict("final").refused(&["final.json", "best.json"]);
    predict("best").ok();
}

#[test]
fn export_names_the_missing_plans_file() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let run = run_folder(t, false);
    let missing = run.join("checkpoints/epoch_0001/plans.json");
    cli(&["export", s(&run), "-o", s(&t.join("e"))]).refused(&[s(&missing)]);
}

#[test]
fn plans_that_do_not_match_their_weights_are_explained_not_panicked() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let raw = phantoms(t);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inference/model/plans.json"))
            .unwrap(),
    )
    .unwrap();
    let conf = golden["cps"]["configuration"].as_str().unwrap().to_string();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let c = conf.clone();
    let at = move |p: &mut serde_json::Value, key: &str, v: serde_json::Value| p["configurations"][&c][key] = v;
    let c = conf.clone();
    let net =
        move |p: &mut serde_json::Value, key: &str, v: serde_json::Value| p["configurations"][&c]["network"][key] = v;
    let edits: Vec<(&str, Edit)> = vec![
        // The total stride along z is 4: a patch of 17 broke torch's cat.
        (
            "patch not divisible by the pooling",
            Box::new({
                let at = at.clone();
                move |p| at(p, "patch_size", serde_json::json!([17, 48, 48]))
            }),
        ),
        (
            "zero patch",
            Box::new({
                let at = at.clone();
                move |p| at(p, "patch_size", serde_json::json!([0, 48, 48]))
            }),
        ),
        (
            "2D spacing in a 3D configuration",
            Box::new({
                let at = at.clone();
                move |p| at(p, "spacing", serde_json::json!([1.0, 1.0]))
            }),
        ),
        (
            "zero spacing",
            Box::new({
                let at = at.clone();
                move |p| at(p, "spacing", serde_json::json!([0.0, 1.0, 1.0]))
            }),
        ),
        ("no normalisation", Box::new(|p| p["normalization"] = serde_json::json!([]))),
        ("classes differ from the network's", Box::new(|p| p["num_classes"] = serde_json::json!(3))),
        (
            "fewer stages than strides",
            Box::new({
                let net = net.clone();
                move |p| net(p, "features_per_stage", serde_json::json!([4, 8, 16]))
            }),
        ),
        (
            "2D kernel in a 3D network",
            Box::new({
                let net = net.clone();
                move |p| net(p, "kernel_sizes", serde_json::json!([[3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]))
            }),
        ),
        (
            "zero stride",
            Box::new({
                let net = net.clone();
                move |p| net(p, "strides", serde_json::json!([[1, 1, 1], [0, 2, 2], [2, 2, 2], [1, 2, 2]]))
            }),
        ),
        // 10¹¹ parameters: torch failed allocating them.
        (
            "absurd features",
            Box::new({
                let net = net.clone();
                move |p| net(p, "features_per_stage", serde_json::json!([4, 8, 16, 65536]))
            }),
        ),
        (
            "two channels for one-channel weights",
            Box::new(|p| {
                p["channels"] = serde_json::json!({"0": "CT", "1": "CT"});
                let n = p["normalization"][0].clone();
                p["normalization"] = serde_json::json!([n.clone(), n]);
            }),
        ),
    ];
    for (i, (what, edit)) in edits.iter().enumerate() {
        let m = model(&t.join(format!("model{i}")));
        let mut p = golden.clone();
        edit(&mut p);
        std::fs::write(m.join("plans.json"), serde_json::to_string_pretty(&p).unwrap()).unwrap();
        let r = cli(&[
            "predict",
            "-i",
            s(&image(&raw)),
            "-o",
            s(&t.join(format!("out{i}"))),
            "-m",
            s(&m),
            "--device",
            "cpu",
        ]);
        assert!(r.status.code() == Some(1), "{what}: expected exit 1:\n{}", r.text());
        r.refused(&["plans.json"]);
        assert!(!r.stderr.contains("failed: phantom"), "{what}: refused at load, not per case:\n{}", r.text());
    }
}

#[test]
fn plan_options_are_range_checked_and_name_their_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, fp) = fingerprinted(t);
    let plans = t.join("plans.json");
    let plan = |extra: &[&str]| {
        let mut a = vec!["plan", s(&fp), "-o", s(&plans)];
        a.extend_from_slice(extra);
        cli(&a)
    };
    for (flag, value) in [
        // Wrote batch 18446744073709551615.
        ("--patch-size", "0,32,32"),
        ("--patch-size-2d", "32,0"),
        ("--target-spacing", "0,1,1"),
        ("--target-spacing", "-1,1,1"),
        ("--target-spacing", "nan,1,1"),
        ("--target-spacing", "inf,1,1"),
        ("--features", "0,8,16,32"),
        ("--features-2d", "8,,16"),
        ("--base-features", "0"),
        ("--max-features", "0"),
        ("--max-features-2d", "0"),
        ("--gpu-memory", "0"),
        ("--gpu-memory", "nan"),
        ("--epochs", "0"),
        ("--iterations", "0"),
        ("--lambda-ramp-epochs", "0"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--momentum", "1"),
        ("--momentum", "-0.1"),
        ("--oversample-foreground", "1.5"),
        ("--oversample-foreground", "-0.1"),
        ("--oversample-foreground", "nan"),
    ] {
        plan(&[flag, value]).refused(&[flag]);
    }
    // 1 µm voxels: the median case alone needs petabytes to preprocess.
    plan(&["--target-spacing", "0.001,0.001,0.001"]).refused(&["--target-spacing", "memory", "PB"]);
    assert!(!plans.exists(), "no plan written by a refused run");
    let p = plan(&["--patch-size", "16,32,32", "--lr", "0.05", "--momentum", "0.9", "--oversample-foreground", "1"]);
    p.ok();
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plans).unwrap()).unwrap();
    let batch = written["cps"]["labeled_batch"].as_u64().unwrap();
    assert!((2..=64).contains(&batch), "batch {batch}");
    assert_eq!(written["cps"]["optimizer"]["lr"], 0.05);
    assert_eq!(written["cps"]["optimizer"]["momentum"], 0.9);
    assert_eq!(written["cps"]["oversample_foreground"], 1.0);
    // Padded patches are said; a first stage wider than the cap (a flat network) is refused.
    let p = plan(&["--patch-size", "17,33,33", "--unlabeled-batch", "1"]);
    p.ok();
    let padded: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plans).unwrap()).unwrap();
    let patch: Vec<u64> = serde_json::from_value(padded["configurations"]["3d_fullres"]["patch_size"].clone()).unwrap();
    let list = patch.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    assert_ne!(list, "17,33,33");
    assert!(p.stderr.contains(&format!("--patch-size 17,33,33 became {list} in 3d_fullres")), "{}", p.text());
    assert!(p.stdout.contains("(+1 unlabeled for CPS)"), "the batch printed is the plan's:\n{}", p.text());
    assert!(!plan(&["--patch-size", &list]).stderr.contains("became"), "an exact patch is not remarked on");
    plan(&["--base-features", "64", "--max-features", "32"])
        .refused(&["--base-features", "64 is above --max-features 32"]);
    plan(&["--max-features-2d", "16"]).refused(&["32 (the default) is above --max-features-2d 16"]);
    // Explicit --features do not come from the base: no conflict.
    plan(&["--base-features", "64", "--max-features", "32", "--features", "8,16,32,32"]).ok();
}

#[test]
fn preprocess_refuses_cases_that_cannot_fit_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (raw, fp) = fingerprinted(t);
    let (huge, plans, shards) = (t.join("huge.json"), t.join("plans.json"), t.join("shards"));
    // A plan made where the check was switched off, preprocessed where it is not:
    // this aborted allocating petabytes.
    cli_env(&["plan", s(&fp), "-o", s(&huge), "--target-spacing", "0.001,0.001,0.001"], &[("CPS3D_MAX_MEMORY", "off")])
        .ok();
    cli(&["preprocess", s(&raw), "-p", s(&huge), "-o", s(&shards), "-j", "1"]).refused(&[
        "memory",
        "PB",
        "CPS3D_MAX_MEMORY",
    ]);
    // An ordinary plan against a 100 kB budget: refused with the numbers.
    cli(&["plan", s(&fp), "-o", s(&plans)]).ok();
    let r = cli_env(
        &["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards), "-j", "1"],
        &[("CPS3D_MAX_MEMORY", "100K")],
    );
    r.refused(&["memory", "100.0 kB", "CPS3D_MAX_MEMORY"]);
    cli_env(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards)], &[("CPS3D_MAX_MEMORY", "lots")])
        .refused(&["CPS3D_MAX_MEMORY"]);
    for j in ["0", "100000"] {
        cli(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards), "-j", j]).refused(&["--workers"]);
    }
    cli(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards), "--brick", "0,8,8"]).refused(&["--brick"]);
    assert!(!shards.join("manifest.json").exists(), "nothing preprocessed by a refused run");
    cli(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&shards), "-j", "1"]).ok();
}

#[test]
fn bench_and_tune_refuse_what_cannot_fit_or_start() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_, _, shards) = sharded(t);
    let sh = s(&shards);
    // An 8 GB machine, whatever this one has.
    let small = [("CPS3D_MAX_MEMORY", "8G")];
    let bench = |extra: &[&str]| {
        let mut a = vec!["bench", sh, "--batches", "1", "--no-augment"];
        a.extend_from_slice(extra);
        cli_env(&a, &small)
    };
    // These grew to 24 GB and were killed.
    bench(&["--labeled", "100000"]).refused(&["memory", "8.0 GB", "--labeled"]);
    bench(&["--patch", "1000,1000,1000"]).refused(&["memory", "--patch"]);
    // This panicked spawning threads.
    bench(&["--loaders", "100000"]).refused(&["--loaders", "at most"]);
    for (flag, v) in [
        ("--patch", "0,32,32"),
        ("--augmenters", "0"),
        ("--batchers", "5000"),
        ("--raw-queue", "0"),
        ("--batch-queue", "100000000"),
        ("--consumers", "0"),
        ("--open-shards", "0"),
        ("--batches", "0"),
    ] {
        bench(&[flag, v]).refused(&[flag]);
    }
    // Looped over cores² configurations.
    cli_env(&["tune", sh, "--cores", "100000", "--batches", "1"], &small).refused(&["--cores"]);
    // Training's batches too, before any network is built.
    let run = t.join("run");
    cli_env(&["train", sh, "-o", s(&run), "--patch", "512,512,512", "--devices", "cpu", "--fold", "all"], &small)
        .refused(&["memory", "8.0 GB", "--patch"]);
    assert!(!run.join("checkpoints").read_dir().is_ok_and(|mut d| d.next().is_some()), "no epoch trained");
    bench(&[]).ok();
    // One limit for every worker count, on the command line and in a train.json (train
    // allowed 256 data-path workers where bench allowed 64 per core).
    let over = (cps3d::util::max_workers() + 1).to_string();
    let limit = format!("{over} is not in 1..={}", cps3d::util::max_workers());
    bench(&["--loaders", &over]).refused(&["--loaders", &limit]);
    let run = t.join("run_workers");
    for flag in ["--loaders", "--augmenters", "--batchers", "--threads", "--data-cores"] {
        cli(&["train", sh, "-o", s(&run), "--devices", "cpu", "--fold", "all", flag, &over]).refused(&[flag, &limit]);
    }
    let config = t.join("train.json");
    let options = cps3d::training::options::TrainOptions {
        shards: shards.clone(),
        run_dir: run.clone(),
        devices: vec!["cpu".into()],
        loaders: cps3d::util::max_workers() + 1,
        ..Default::default()
    };
    std::fs::write(&config, serde_json::to_string(&options).unwrap()).unwrap();
    cli(&["train", "--config", s(&config)]).refused(&["--loaders", &limit]);
}

#[test]
fn synth_and_evaluate_refuse_shapes_and_worker_counts_they_cannot_handle() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("synth");
    let synth = |extra: &[&str]| {
        let mut a = vec!["synth", s(&out), "--labeled", "1", "--unlabeled", "0"];
        a.extend_from_slice(extra);
        cli(&a)
    };
    // Aborted on allocation.
    synth(&["--shape", "30000,30000,30000", "-j", "1"]).refused(&["--shape", "memory"]);
    // NIfTI-1 stores each dimension as an int16.
    synth(&["--shape", "40000,16,16", "-j", "1"]).refused(&["--shape", "32767"]);
    synth(&["--shape", "0,16,16"]).refused(&["--shape"]);
    for j in ["0", "100000"] {
        synth(&["--shape", "8,8,8", "-j", j]).refused(&["--workers"]);
    }
    synth(&["--shape", "8,8,8", "--spacing-xy", "0,1"]).refused(&["--spacing-xy"]);
    let pred = t.join("pred");
    std::fs::create_dir_all(&pred).unwrap();
    for j in ["0", "100000"] {
        cli(&["evaluate", "--pred", s(&pred), "--ref", s(&pred), "-j", j]).refused(&["--workers"]);
        cli(&["fingerprint", s(&pred), "-o", s(&t.join("fp.json")), "-j", j]).refused(&["--workers"]);
        cli(&["dataset", "check", s(&pred), "-j", j]).refused(&["--workers"]);
        cli(&["demo", "-o", s(&t.join("demo")), "-j", j]).refused(&["--workers"]);
    }
    synth(&["--shape", "8,8,8", "-j", "1"]).ok();
}
