//! CPS training on CPU with a tiny plan: the loss falls, resuming is exact, and a
//! run killed at any moment leaves a loadable checkpoint.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{run, stderr, stdout};
use cps3d::training::run::{checkpoint_tensors, train, Progress, Start, TrainOptions};

fn options(shards: &Path, run_dir: &Path, epochs: usize, iterations: usize) -> TrainOptions {
    TrainOptions {
        shards: shards.to_path_buf(),
        run_dir: run_dir.to_path_buf(),
        devices: vec!["cpu".into(), "cpu".into()],
        epochs: Some(epochs),
        iterations: Some(iterations),
        seed: 5,
        val_iterations: 3,
        final_validation: false,
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
    let shards = common::tiny_shards(tmp.path());
    let logs = train(&options(&shards, &tmp.path().join("run"), 4, 8), Start::New, None, |_| {}).unwrap();
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
    // Where a step's time went: every computing phase took time, and the phases add up to
    // the step (the slower trainer's step time bounds the mean over trainers).
    for l in &logs {
        let p = l.phases;
        assert!(p.forward > 0.0 && p.backward > 0.0 && p.loss > 0.0 && p.optimizer > 0.0 && p.exchange > 0.0, "{p:?}");
        let sum: f64 = p.values().iter().sum();
        assert!(
            sum <= l.step_seconds * 1.001 && sum > 0.5 * l.step_seconds,
            "phases {sum} s vs step {} s",
            l.step_seconds
        );
    }
    let read_back = cps3d::training::checkpoint::read_log(&tmp.path().join("run/log.jsonl"));
    // JSON keeps them to the last digit or so (serde_json's default float parsing).
    for (a, b) in read_back[3].phases.values().iter().zip(logs[3].phases.values()) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} read back as {b}");
    }
    // Only the checkpoints a pointer names are kept.
    let kept = std::fs::read_dir(tmp.path().join("run/checkpoints")).unwrap().count();
    assert!((1..=2).contains(&kept), "{kept} checkpoints kept");
}

#[test]
fn bfloat16_convolutions_on_the_cpu_learn_like_float32_and_reach_the_trainers() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let (f32_run, bf16_run) = (tmp.path().join("f32"), tmp.path().join("bf16"));
    let full = train(&options(&shards, &f32_run, 4, 8), Start::New, None, |_| {}).unwrap();
    let low =
        train(&TrainOptions { cpu_bf16: true, ..options(&shards, &bf16_run, 4, 8) }, Start::New, None, |_| {}).unwrap();
    for net in 0..2 {
        let (first, last) = (low[0].sup_loss[net], low[3].sup_loss[net]);
        assert!(last < first - 0.3, "net {net}: supervised loss {first} -> {last}");
        // Same seed, same batches: the first epoch's loss differs only by rounding.
        assert!((first - full[0].sup_loss[net]).abs() < 0.05, "{first} vs {}", full[0].sup_loss[net]);
    }
    let (wf, wb) = (final_weights(&f32_run), final_weights(&bf16_run));
    let differs = wf.iter().zip(&wb).flat_map(|(a, b)| a.iter().zip(b)).any(|((_, va), (_, vb))| va != vb);
    assert!(differs, "the bfloat16 run's weights equal the float32 run's: the option did not reach the networks");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16_run.join("train.json")).unwrap()).unwrap();
    assert_eq!(saved["cpu_bf16"], true, "a resumed run keeps its precision");
}

#[test]
fn recomputing_the_first_stages_trains_as_keeping_their_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let (kept_run, recomputed_run) = (tmp.path().join("kept"), tmp.path().join("recomputed"));
    let kept =
        train(&TrainOptions { recompute_stages: 0, ..options(&shards, &kept_run, 2, 6) }, Start::New, None, |_| {})
            .unwrap();
    let recomputed = train(&options(&shards, &recomputed_run, 2, 6), Start::New, None, |_| {}).unwrap();
    for (k, r) in kept.iter().zip(&recomputed) {
        for net in 0..2 {
            assert!((k.sup_loss[net] - r.sup_loss[net]).abs() < 1e-4, "{} vs {}", k.sup_loss[net], r.sup_loss[net]);
        }
    }
    // Bit-identical on the CPU here; a tolerance for kernels that pick another algorithm
    // without a graph. Had the recomputed stages' gradients been lost, they would differ
    // by the learning rate's order (checked by disabling `FirstStages::backward`).
    for (a, b) in final_weights(&kept_run).iter().zip(&final_weights(&recomputed_run)) {
        for ((name, va), (_, vb)) in a.iter().zip(b) {
            let d = va.iter().zip(vb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-6, "{name}: {d}");
        }
    }
}

#[test]
fn with_a_data_core_budget_the_data_path_is_tuned_during_training_and_the_decisions_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let run_dir = tmp.path().join("run");
    // Two loaders for trainers that cannot keep up with one: the batch queue stays full.
    let opts = TrainOptions {
        loaders: 2,
        data_cores: Some(2),
        autotune_interval_seconds: 0.2,
        ..options(&shards, &run_dir, 2, 12)
    };
    let logs = train(&opts, Start::New, None, |_| {}).unwrap();
    assert_eq!(logs.len(), 2);
    let text = std::fs::read_to_string(run_dir.join("autotune.jsonl")).expect("autotune.jsonl");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let d = &first["decision"];
    assert_eq!((d["from"].clone(), d["to"].clone()), (serde_json::json!([2, 1]), serde_json::json!([1, 1])), "{text}");
    assert!(d["reason"].as_str().unwrap().contains("full") && d["batches_per_s"].as_f64().unwrap() > 0.0, "{text}");
    // Off, nothing is tuned and nothing logged.
    let fixed = TrainOptions { no_autotune: true, ..opts.clone() };
    let fixed_dir = tmp.path().join("fixed");
    train(&TrainOptions { run_dir: fixed_dir.clone(), ..fixed }, Start::New, None, |_| {}).unwrap();
    assert!(!fixed_dir.join("autotune.jsonl").exists());
}

#[test]
fn resuming_gives_the_same_parameters_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(&options(&shards, &a, 3, 3), Start::New, None, |_| {}).unwrap();
    train(&options(&shards, &b, 1, 3), Start::New, None, |_| {}).unwrap();
    // The first run stopped after epoch 0; continue it to 3 epochs.
    let mut more = options(&shards, &b, 3, 3);
    more.epochs = Some(3);
    let logs = train(&more, Start::Resume, None, |_| {}).unwrap();
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
    let shards = common::tiny_shards(tmp.path());
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
            "--val-iterations",
            "2",
            "--no-final-validation",
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
    let shards = common::tiny_shards(tmp.path());
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
        "--val-iterations",
        "2",
        "--no-final-validation",
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

#[test]
fn folds_follow_splits_final_json_and_the_held_out_case_is_validated_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let run_dir = tmp.path().join("run");
    let o = run(&[
        "train",
        shards.to_str().unwrap(),
        "-o",
        run_dir.to_str().unwrap(),
        "--fold",
        "0",
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--devices",
        "cpu,cpu",
        "--val-iterations",
        "2",
        "--no-val-mirror",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    // nnU-Net's split file, beside the shards: five folds, each case validated once.
    let splits: Vec<cps3d::training::splits::Split> =
        serde_json::from_str(&std::fs::read_to_string(shards.join("splits_final.json")).unwrap()).unwrap();
    assert_eq!(splits.len(), 5);
    let mut validated: Vec<String> = splits.iter().flat_map(|s| s.val.clone()).collect();
    validated.sort();
    assert_eq!(validated, (0..5).map(|i| format!("phantom_{i:04}")).collect::<Vec<_>>());
    // The held-out case predicted whole, per sibling and ensembled, and scored.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("validation/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["fold"], "0");
    let cases: Vec<String> =
        summary["cases"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    assert_eq!(cases, splits[0].val);
    let variants: Vec<&str> =
        summary["variants"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(variants, ["net0", "net1", "ensemble"]);
    for v in ["net0", "net1", "ensemble"] {
        let (_, rows) = common::score_table(&run_dir.join(format!("validation/{v}/flare22_scores.csv")));
        assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), splits[0].val, "{v}");
        let pred = cps3d::io::read_labels(&run_dir.join(format!("validation/{v}/{}.nii.gz", cases[0]))).unwrap();
        let raw = cps3d::io::read_header(&tmp.path().join(format!("raw/labelsTr/{}.nii.gz", cases[0]))).unwrap();
        assert_eq!(cps3d::dataset::check::geometry_mismatch(&raw, &pred.geometry), None);
    }
    assert!(stdout(&o).contains("validation of fold \"0\""), "{}", stdout(&o));
    // Fold "all" trains (and validates) on every labeled case; an unknown fold is refused.
    let manifest = cps3d::preprocessing::Manifest::read(&shards.join("manifest.json")).unwrap();
    let (train_ids, val_ids) = cps3d::training::run::split_for_fold(&shards, &manifest, "all").unwrap();
    assert_eq!((train_ids.len(), val_ids.len()), (5, 5));
    let (train_ids, val_ids) = cps3d::training::run::split_for_fold(&shards, &manifest, "3").unwrap();
    assert_eq!((train_ids, val_ids), (splits[3].train.clone(), splits[3].val.clone()));
    let e = cps3d::training::run::split_for_fold(&shards, &manifest, "7").unwrap_err().to_string();
    assert!(e.contains("splits_final.json") && e.contains("fold 7"), "{e}");
    // The final validation reads the raw scans: gone, it says which file and why.
    std::fs::rename(tmp.path().join("raw"), tmp.path().join("moved")).unwrap();
    let opts = TrainOptions { run_dir: run_dir.clone(), ..options(&shards, &run_dir, 1, 2) };
    let e =
        cps3d::training::validation::run_final_validation(&opts, &manifest, &splits[0].val).unwrap_err().to_string();
    assert!(e.contains(&format!("{}_0000.nii.gz", splits[0].val[0])) && e.contains("is gone"), "{e}");
}

#[test]
fn plan_settings_that_cannot_be_honoured_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let path = shards.join("plans.json");
    let mut plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    plans["cps"]["optimizer"]["kind"] = "adam".into();
    std::fs::write(&path, plans.to_string()).unwrap();
    let e = train(&options(&shards, &tmp.path().join("run"), 1, 1), Start::New, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("plans.json") && e.contains("adam") && e.contains("sgd"), "{e}");
    // Shards of an older layout (no version in the manifest) are refused with what to do.
    let manifest = shards.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("version");
    std::fs::write(&manifest, m.to_string()).unwrap();
    let e = cps3d::preprocessing::Manifest::read(&manifest).unwrap_err().to_string();
    assert!(e.contains("manifest.json") && e.contains("--overwrite"), "{e}");
}

#[test]
fn the_2d_configuration_streams_slices_trains_with_cps_and_predicts_on_the_input_grid() {
    use cps3d::training::data::{datapath_config, DataKnobs};
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards_2d(tmp.path());
    let plans = cps3d::planning::plan::Plans::read(&shards.join("plans.json")).unwrap();
    let conf = &plans.configurations["2d"];
    // The data path: single slices (1, y, x), the 2D configuration's own batch for both
    // halves, deep-supervision targets pooled in-plane only.
    let cfg = datapath_config(&shards, &DataKnobs::default()).unwrap();
    assert_eq!(cfg.patch, [1, 32, 32]);
    assert_eq!((cfg.labeled_batch, cfg.unlabeled_batch), (conf.batch_size, conf.batch_size));
    assert_ne!(conf.batch_size, plans.cps.labeled_batch, "the 2D batch is the 2D configuration's");
    let mut dp = cps3d_actors::datapath::DataPath::start(cfg).unwrap();
    let batch = dp.next(0, Duration::from_secs(30)).expect("a batch");
    assert_eq!(batch.patch, [1, 32, 32]);
    assert_eq!(batch.image.len(), 2 * conf.batch_size * 32 * 32);
    assert_eq!(batch.labels.len(), conf.batch_size * 32 * 32);
    assert_eq!(batch.ds_shapes, [[1, 16, 16], [1, 8, 8]]);
    dp.stop();
    // CPS training; the final validation predicts every training case whole with the
    // 2D networks (step 0.5, in-plane mirroring).
    let run_dir = tmp.path().join("run");
    let opts = TrainOptions { fold: "all".into(), final_validation: true, ..options(&shards, &run_dir, 2, 3) };
    let logs = train(&opts, Start::New, None, |_| {}).unwrap();
    assert_eq!(logs.len(), 2);
    assert!(logs.iter().all(|l| l.cps_loss.len() == 2 && l.loss.iter().all(|v| v.is_finite())));
    assert!(logs[1].lambda > 0.0);
    let run_plans = cps3d::planning::plan::Plans::read(&run_dir.join("plans.json")).unwrap();
    assert_eq!(run_plans.cps.configuration, "2d");
    assert_eq!(run_plans.cps.labeled_batch, conf.batch_size);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("validation/summary.json")).unwrap()).unwrap();
    assert!(summary.to_string().contains("ensemble"), "{summary}");
    // Predictions on the input's exact grid, RAS and LPS files alike.
    let model = cps3d::inference::Model::load(&run_dir, "final", tch::Device::Cpu, true).unwrap();
    assert!(model.is_2d());
    assert_eq!(model.tile(), [1, 32, 32]);
    let raw = cps3d::dataset::RawDataset::open(&tmp.path().join("raw")).unwrap();
    let mut layouts = std::collections::BTreeSet::new();
    for case in raw.labeled.iter().take(3) {
        let out = tmp.path().join("pred").join(format!("{}.nii.gz", case.id));
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let o = cps3d::inference::PredictOptions { step: 0.5, mirror: true, ..Default::default() };
        let r = cps3d::inference::predict_case(&model, case, &out, &o).unwrap();
        let img = cps3d::io::read_header(&case.images[0]).unwrap();
        let pred = cps3d::io::read_labels(&out).unwrap();
        assert_eq!(cps3d::dataset::check::geometry_mismatch(&img, &pred.geometry), None, "{}", case.id);
        // In-plane resampling only: the network grid keeps the scan's slices.
        assert_eq!(r.network_shape[0], img.shape()[0]);
        layouts.insert(img.axis_codes());
    }
    assert!(layouts.contains("RAS") && layouts.contains("LPS"), "{layouts:?}");
}

#[test]
fn the_expected_training_time_is_told_before_the_first_epoch_and_holds_within_2x() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let mut events = Vec::new();
    let started = Instant::now();
    let logs = train(&options(&shards, &tmp.path().join("run"), 3, 12), Start::New, None, |p| match p {
        Progress::Estimate(e) => events.push(("estimate", Some(e.clone()))),
        Progress::Epoch(_) => events.push(("epoch", None)),
    })
    .unwrap();
    let measured = started.elapsed().as_secs_f64();
    assert_eq!(logs.len(), 3);
    let names: Vec<&str> = events.iter().map(|e| e.0).collect();
    assert_eq!(names, ["estimate", "epoch", "epoch", "epoch"], "the estimate comes once, before the first epoch");
    let e = events[0].1.clone().unwrap();
    assert_eq!((e.steps, e.epochs, e.steps_timed), (36, 3, 3), "{e:?}");
    assert!(e.elapsed_seconds < measured && e.seconds_per_step > 0.0, "{e:?}");
    let ratio = e.training_seconds / measured;
    eprintln!("estimated {:.2} s before the first epoch, trained in {measured:.2} s", e.training_seconds);
    assert!((0.5..=2.0).contains(&ratio), "estimated {:.2} s, measured {measured:.2} s ({e:?})", e.training_seconds);
}

#[test]
fn resuming_a_run_whose_checkpoints_are_gone_is_refused_and_its_log_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let run_dir = tmp.path().join("run");
    train(&options(&shards, &run_dir, 1, 2), Start::New, None, |_| {}).unwrap();
    let log = std::fs::read_to_string(run_dir.join("log.jsonl")).unwrap();
    for f in ["latest.json", "best.json", "final.json"] {
        let _ = std::fs::remove_file(run_dir.join(f));
    }
    std::fs::remove_dir_all(run_dir.join("checkpoints")).unwrap();
    let e = train(&options(&shards, &run_dir, 2, 2), Start::Resume, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("no checkpoint to resume from") && e.contains("1 epoch(s)") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read_to_string(run_dir.join("log.jsonl")).unwrap(), log, "the log is left as it was");
}
