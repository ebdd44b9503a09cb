//! Training under faults: every fault stops the run within seconds, exits non-zero
//! naming its cause (which sibling, which epoch and step, what), and loses nothing
//! beyond the current epoch. Faults that cannot be provoked from outside are armed
//! through fail points (`FAILPOINTS`, active in test builds). Every run here has a
//! wall-clock guard: a hang fails the test instead of stalling the suite.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, stdout};

/// Runs `cps3d` with `FAILPOINTS` set, killing it (and failing the test) after `limit`.
fn run_guarded(args: &[&str], failpoints: Option<&str>, limit: Duration) -> (Output, Duration) {
    let mut cmd = common::cps3d();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("cps3d starts");
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("cps3d {args:?} still running after {limit:?} (a hang)\n{}{}", stdout(&out), stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn train_args<'a>(shards: &'a Path, run: &'a Path, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        shards.to_str().unwrap(),
        "-o",
        run.to_str().unwrap(),
        "--epochs",
        epochs,
        "--iterations",
        "3",
        "--devices",
        "cpu,cpu",
        "--val-iterations",
        "2",
        "--no-final-validation",
    ]
}

fn latest_epoch(run: &Path) -> Option<u64> {
    let t = std::fs::read_to_string(run.join("latest.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&t).ok()?["epoch"].as_u64()
}

fn logged_epochs(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_trainer_fault_stops_both_siblings_and_names_sibling_step_and_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    for (n, (spec, expect)) in [
        ("1:0:1:error", vec!["sibling 1 (cpu), epoch 0 step 1", "injected error"]),
        ("0:1:2:panic", vec!["sibling 0 (cpu), epoch 1 step 2", "panicked: injected panic"]),
        ("1:1:0:oom", vec!["sibling 1 (cpu), epoch 1 step 0", "out of memory", "smaller patch"]),
    ]
    .into_iter()
    .enumerate()
    {
        let run = tmp.path().join(format!("run{n}"));
        let fp = format!("trainer-step=return({spec})");
        let (o, took) = run_guarded(&train_args(&sh, &run, "3"), Some(&fp), Duration::from_secs(90));
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(!o.status.success(), "{spec}: {text}");
        for e in &expect {
            assert!(text.contains(e), "{spec}: missing {e:?} in\n{text}");
        }
        assert!(took < Duration::from_secs(60), "{spec}: took {took:?}");
        // Nothing beyond the current epoch is lost: the epochs before the fault are
        // checkpointed and logged once, the faulty one is neither.
        let epoch: u64 = spec.split(':').nth(1).unwrap().parse().unwrap();
        assert_eq!(latest_epoch(&run), epoch.checked_sub(1), "{spec}");
        assert_eq!(logged_epochs(&run), (0..epoch).collect::<Vec<_>>(), "{spec}");
    }
    // The run that failed in epoch 1 resumes from its epoch-0 checkpoint and finishes.
    let run = tmp.path().join("run1");
    let (o, _) =
        run_guarded(&["train", "--resume", run.to_str().unwrap(), "--epochs", "3"], None, Duration::from_secs(90));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(logged_epochs(&run), [0, 1, 2]);
}

#[test]
fn a_stalled_sibling_is_named_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let mut args = train_args(&sh, &run, "2");
    args.extend(["--timeout", "3"]);
    let (o, took) = run_guarded(&args, Some("trainer-step=return(1:0:1:hang)"), Duration::from_secs(60));
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success());
    assert!(
        text.contains("sibling 0 (cpu), epoch 0 step 1") && text.contains("sibling 1 sent no pseudo-labels for 3 s"),
        "{text}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn a_second_device_that_cannot_start_is_named_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let (o, took) = run_guarded(&train_args(&sh, &run, "2"), Some("trainer-start=return(1)"), Duration::from_secs(60));
    let text = stderr(&o);
    assert!(!o.status.success());
    assert!(text.contains("sibling 1 (cpu): could not start") && text.contains("injected start failure"), "{text}");
    assert!(took < Duration::from_secs(30));
    // A device that does not exist is refused before anything starts.
    let mut args = train_args(&sh, &run, "2");
    let i = args.iter().position(|a| *a == "cpu,cpu").unwrap();
    args[i] = "cpu,cuda:7";
    let (o, _) = run_guarded(&args, None, Duration::from_secs(30));
    assert!(!o.status.success() && stderr(&o).contains("cuda:7"), "{}", stderr(&o));
    args[i] = "cpu,cpu,cpu";
    let (o, _) = run_guarded(&args, None, Duration::from_secs(30));
    assert!(!o.status.success() && stderr(&o).contains("one or two"), "{}", stderr(&o));
    // A patch the network cannot take (it panicked inside torch) is explained.
    let mut args = train_args(&sh, &run, "2");
    args.extend(["--patch", "17,33,33"]);
    let (o, _) = run_guarded(&args, None, Duration::from_secs(30));
    assert!(!o.status.success() && stderr(&o).contains("must be a positive multiple of"), "{}", stderr(&o));
}

#[test]
fn data_path_faults_end_training_quickly_with_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    // An augmenter that panics on every item: not restarted forever.
    let run = tmp.path().join("run_aug");
    let (o, took) = run_guarded(&train_args(&sh, &run, "2"), Some("augmenter-panic=return"), Duration::from_secs(60));
    let text = stderr(&o);
    assert!(!o.status.success());
    assert!(text.contains("augmenter workers crashed") && text.contains("injected augmenter panic"), "{text}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // One unlabeled shard corrupt: training goes on without it, and says so in its summary
    // and in the epochs' log lines.
    let victim = sh.join("unlabeled_00001.shard");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&victim).unwrap().set_len(len / 2).unwrap();
    let run = tmp.path().join("run_one_corrupt");
    let (o, _) = run_guarded(&train_args(&sh, &run, "2"), None, Duration::from_secs(120));
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(text.contains("1 case(s) could not always be read") && text.contains("unlabeled_00001: "), "{text}");
    assert!(text.contains("cps3d verify"), "{text}");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    assert!(log.lines().any(|l| l.contains("\"read_failures\"") && l.contains("unlabeled_00001.shard")), "{log}");
    // Every unlabeled shard corrupt: the run ends at once and names them.
    for entry in std::fs::read_dir(&sh).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("unlabeled_") && name.ends_with(".shard") {
            let len = std::fs::metadata(entry.path()).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(entry.path()).unwrap().set_len(len / 2).unwrap();
        }
    }
    let run = tmp.path().join("run_corrupt");
    let (o, took) = run_guarded(&train_args(&sh, &run, "2"), None, Duration::from_secs(120));
    let text = stderr(&o);
    assert!(!o.status.success());
    assert!(text.contains("every unlabeled shard failed"), "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("unlabeled_{i:05}.shard")), "{text}");
    }
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn checkpoints_survive_a_full_disk_and_a_kill_between_checkpoint_and_log() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    // The second epoch's checkpoint cannot be written (ENOSPC): the first stays the
    // latest, nothing half-written is left, and the epoch is not logged.
    let run = tmp.path().join("run_full");
    let (o, _) =
        run_guarded(&train_args(&sh, &run, "3"), Some("checkpoint-write=2*off->return(28)"), Duration::from_secs(90));
    let text = stderr(&o);
    assert!(!o.status.success());
    assert!(text.contains("No space left on device") && text.contains("cannot write"), "{text}");
    assert_eq!(latest_epoch(&run), Some(0));
    assert_eq!(logged_epochs(&run), [0]);
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["epoch_0000"]);
    // Killed (abort) right after the first checkpoint, before its log line: on resume the
    // line comes back from the checkpoint, and every epoch is logged exactly once.
    let run = tmp.path().join("run_killed");
    let (o, _) = run_guarded(&train_args(&sh, &run, "3"), Some("after-checkpoint=return"), Duration::from_secs(90));
    assert!(!o.status.success());
    assert_eq!(latest_epoch(&run), Some(0));
    assert_eq!(logged_epochs(&run), Vec::<u64>::new());
    let (o, _) = run_guarded(&["train", "--resume", run.to_str().unwrap()], None, Duration::from_secs(90));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(logged_epochs(&run), [0, 1, 2]);
}

#[test]
fn run_folders_are_protected() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let (o, _) = run_guarded(&train_args(&sh, &run, "1"), None, Duration::from_secs(60));
    assert!(o.status.success(), "{}", stderr(&o));
    // A second run into the same folder would destroy the first: refused.
    let (o, _) = run_guarded(&train_args(&sh, &run, "1"), None, Duration::from_secs(60));
    assert!(!o.status.success() && stderr(&o).contains("--resume") && stderr(&o).contains("--overwrite"));
    assert_eq!(logged_epochs(&run), [0]);
    // Resuming may not change the data, the fold, or one network for two.
    for (flag, value) in [("--fold", "2"), ("--seed", "9")] {
        let (o, _) =
            run_guarded(&["train", "--resume", run.to_str().unwrap(), flag, value], None, Duration::from_secs(30));
        assert!(!o.status.success() && stderr(&o).contains(&format!("{flag} cannot change")), "{}", stderr(&o));
    }
    let (o, _) =
        run_guarded(&["train", "--resume", run.to_str().unwrap(), "--supervised-only"], None, Duration::from_secs(30));
    assert!(!o.status.success() && stderr(&o).contains("--supervised-only cannot change"), "{}", stderr(&o));
    // Devices and epochs may: two trainers on one CPU device string.
    let (o, _) = run_guarded(
        &["train", "--resume", run.to_str().unwrap(), "--epochs", "2", "--devices", "cpu"],
        None,
        Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(logged_epochs(&run), [0, 1]);
    let train_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train.json")).unwrap()).unwrap();
    assert_eq!(train_json["devices"], serde_json::json!(["cpu"]));
    // --overwrite replaces it.
    let mut args = train_args(&sh, &run, "1");
    args.push("--overwrite");
    let (o, _) = run_guarded(&args, None, Duration::from_secs(60));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(logged_epochs(&run), [0]);
    // Two runs into one folder at once: the second is refused while the first holds it.
    let run2 = tmp.path().join("run2");
    let mut first = common::cps3d()
        .args(train_args(&sh, &run2, "100"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while latest_epoch(&run2).is_none() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut args = train_args(&sh, &run2, "1");
    args.push("--overwrite");
    let (o, _) = run_guarded(&args, None, Duration::from_secs(30));
    let _ = first.kill();
    let _ = first.wait();
    assert!(!o.status.success() && stderr(&o).contains("another cps3d process holds"), "{}", stderr(&o));
}

#[test]
fn several_batchers_keep_the_siblings_on_the_same_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let mut args = train_args(&sh, &run, "2");
    args.extend(["--batchers", "3", "--loaders", "2", "--augmenters", "2", "--no-augment"]);
    let (o, _) = run_guarded(&args, None, Duration::from_secs(90));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(logged_epochs(&run), [0, 1]);
}

/// Sets one element of the first `model.` tensor of a checkpoint file to NaN; its name.
fn poison_checkpoint(file: &Path) -> String {
    let tensors = tch::Tensor::read_safetensors(file).unwrap();
    let (name, t) = tensors.iter().find(|(n, _)| n.starts_with("model.")).unwrap();
    let _ = t.view(-1).get(3).fill_(f64::NAN);
    tch::Tensor::write_safetensors(&tensors, file).unwrap();
    name.clone()
}

#[test]
fn non_finite_numbers_stop_training_and_are_never_saved_or_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    // A learning rate that explodes: the first non-finite step stops the run, naming
    // sibling, epoch, step and cause, before any weight or checkpoint holds it.
    let wild = tmp.path().join("shards_wild_lr");
    common::copy_dir(&sh, &wild);
    let plans_file = wild.join("plans.json");
    let mut plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plans_file).unwrap()).unwrap();
    plans["cps"]["optimizer"]["lr"] = serde_json::json!(1e12);
    std::fs::write(&plans_file, plans.to_string()).unwrap();
    let run = tmp.path().join("run_wild");
    let (o, took) = run_guarded(&train_args(&wild, &run, "2"), None, Duration::from_secs(90));
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "{text}");
    for e in ["non-finite numbers", "epoch 0 step", "the step diverged", "lower learning rate", "not applied"] {
        assert!(text.contains(e), "missing {e:?} in\n{text}");
    }
    assert!(text.contains("sibling 0 (cpu)") || text.contains("sibling 1 (cpu)"), "{text}");
    assert!(!text.contains("loss [NaN"), "{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_eq!(latest_epoch(&run), None);
    assert_eq!(logged_epochs(&run), Vec::<u64>::new());

    // A NaN weight in a checkpoint: resume, predict and export refuse it, naming the tensor.
    let run = tmp.path().join("run");
    let mut args = train_args(&sh, &run, "1");
    args.extend(["--fold", "all"]);
    let (o, _) = run_guarded(&args, None, Duration::from_secs(90));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let name = poison_checkpoint(&run.join("checkpoints/epoch_0000/net1.safetensors"));
    let log_before = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let (o, _) =
        run_guarded(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2"], None, Duration::from_secs(90));
    let text = stderr(&o);
    assert!(!o.status.success(), "{}{text}", stdout(&o));
    assert!(
        text.contains(&format!("tensor {name} holds 1 non-finite value")) && text.contains("net1.safetensors"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(run.join("log.jsonl")).unwrap(), log_before, "the log is kept");
    assert_eq!(latest_epoch(&run), Some(0));
    let image = tmp.path().join("raw/imagesTr/phantom_0000_0000.nii.gz");
    let pred = tmp.path().join("pred");
    let (o, _) = run_guarded(
        &["predict", "-i", image.to_str().unwrap(), "-o", pred.to_str().unwrap(), "-m", run.to_str().unwrap()],
        None,
        Duration::from_secs(90),
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains(&format!("tensor {name} holds 1 non-finite value")), "{}", stderr(&o));
    assert!(!pred.join("phantom_0000.nii.gz").exists());
    let exported = tmp.path().join("exported");
    let (o, _) = run_guarded(
        &["export", run.to_str().unwrap(), "-o", exported.to_str().unwrap()],
        None,
        Duration::from_secs(90),
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains(&format!("tensor {name} holds 1 non-finite value")), "{}", stderr(&o));
}

#[test]
fn resuming_names_a_shard_folder_that_is_gone_and_goes_on_where_train_json_points() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let (o, _) = run_guarded(&train_args(&sh, &run, "1"), None, Duration::from_secs(90));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let moved = tmp.path().join("moved_shards");
    std::fs::rename(&sh, &moved).unwrap();
    let resume = ["train", "--resume", run.to_str().unwrap(), "--epochs", "2"];
    let (o, _) = run_guarded(&resume, None, Duration::from_secs(90));
    let text = stderr(&o);
    assert!(!o.status.success());
    // Said as what it is, not as "RUN/.lock: No such file or directory".
    assert!(text.contains(&format!("{}: the shard folder this run trains on is gone", sh.display())), "{text}");
    assert!(text.contains("train.json") && !text.contains(".lock"), "{text}");
    let train_json = run.join("train.json");
    let mut options: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&train_json).unwrap()).unwrap();
    options["shards"] = serde_json::json!(moved);
    std::fs::write(&train_json, options.to_string()).unwrap();
    let (o, _) = run_guarded(&resume, None, Duration::from_secs(90));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(logged_epochs(&run), [0, 1]);
}
