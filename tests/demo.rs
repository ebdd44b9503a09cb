//! `cps3d demo` end to end, small: synthetic phantoms and the real dataset.

mod common;

use common::{run, shared_data, stderr, stdout};

fn scores(csv: &std::path::Path) -> Vec<(String, Vec<f64>)> {
    common::score_table(csv).1
}

const SMALL: &[&str] = &[
    "--shape",
    "16,40,40",
    "--patch",
    "16,32,32",
    "--features",
    "8,16,32,32",
    "--epochs",
    "2",
    "--iterations",
    "2",
    "--devices",
    "cpu,cpu",
    "-j",
    "2",
];

#[test]
fn demo_runs_every_stage_on_phantoms_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let mut args = vec!["demo", "-o", out.to_str().unwrap(), "--labeled", "3", "--unlabeled", "2", "--test", "2"];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    for stage in ["synthesize", "fingerprint", "plan", "preprocess", "train", "predict", "evaluate"] {
        assert!(text.contains(&format!("{stage}] done")), "stage {stage} missing: {text}");
    }
    for organ in ["Liver", "Gallbladder", "LK", "mean"] {
        assert!(text.contains(organ), "table row {organ} missing: {text}");
    }
    let rows = scores(&out.join("predictions/flare22_scores.csv"));
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["phantom_0000", "phantom_0001"]);
    for (name, values) in &rows {
        assert_eq!(values.len(), 26);
        assert!(values.iter().all(|v| v.is_nan() || (0.0..=1.0).contains(v)), "{name}: {values:?}");
    }
    // Predictions lie on the held-out images' grids.
    for id in ["phantom_0000", "phantom_0001"] {
        let image = cps3d::io::read_header(&out.join(format!("test_data/imagesTr/{id}_0000.nii.gz"))).unwrap();
        let pred = cps3d::io::read_header(&out.join(format!("predictions/{id}.nii.gz"))).unwrap();
        assert_eq!(cps3d::dataset::check::geometry_mismatch(&image, &pred), None);
    }
    // Pictures of each held-out case, their paths printed, and where a step's time went.
    for id in ["phantom_0000", "phantom_0001"] {
        let png = out.join(format!("predictions/preview/{id}.png"));
        assert!(png.is_file() && text.contains(png.to_str().unwrap()), "{text}");
    }
    assert!(text.contains("progress.png") && text.contains("a step's time"), "{text}");
    // The expected training time is told before the first epoch's line.
    let estimate = text.find("expected training time on this machine").unwrap_or_else(|| panic!("{text}"));
    assert!(estimate < text.find("epoch   0").unwrap_or_else(|| panic!("{text}")), "{text}");
    // The short-run recipe: nnU-Net's foreground CT statistics, SGD 0.3 with momentum 0.9, 2 + 1 samples per step.
    let plans = cps3d::planning::plan::Plans::read(&out.join("plans.json")).unwrap();
    assert_eq!(plans.normalization[0].statistics, "foreground");
    assert_eq!((plans.cps.optimizer.lr, plans.cps.optimizer.momentum), (0.3, 0.9));
    assert_eq!((plans.cps.labeled_batch, plans.cps.unlabeled_batch), (2, 1));
    let checkpoints = std::fs::read_dir(out.join("run/checkpoints")).unwrap().count();

    // A second run reuses the data, shards and the finished training.
    let o = run(&args);
    let again = stdout(&o);
    assert!(o.status.success(), "{again}{}", stderr(&o));
    assert!(again.contains("training already finished"), "{again}");
    assert_eq!(std::fs::read_dir(out.join("run/checkpoints")).unwrap().count(), checkpoints);
    assert_eq!(scores(&out.join("predictions/flare22_scores.csv")).len(), 2);
}

#[test]
fn demo_on_a_real_dataset_with_one_labeled_case() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let dataset = data.join("Dataset001_TSAbdomen");
    let mut args = vec!["demo", "-o", out.to_str().unwrap(), "--data", dataset.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(stderr(&o).contains("training and evaluating on the same case"), "{}", stderr(&o));
    let rows = scores(&out.join("predictions/flare22_scores.csv"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "tsabd");
    // The training view links the dataset's files; nothing was copied or changed.
    assert!(out.join("data/imagesUnlabeled/chest_aorta_0000.nii.gz").symlink_metadata().unwrap().is_symlink());
    let image = cps3d::io::read_header(&dataset.join("imagesTr/tsabd_0000.nii.gz")).unwrap();
    let pred = cps3d::io::read_header(&out.join("predictions/tsabd.nii.gz")).unwrap();
    assert_eq!(cps3d::dataset::check::geometry_mismatch(&image, &pred), None);
}

#[test]
fn demo_reports_a_broken_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("imagesTr")).unwrap();
    std::fs::write(data.join("dataset.json"), "{ not json").unwrap();
    let out = tmp.path().join("demo");
    let o = run(&["demo", "-o", out.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("dataset.json"), "{}", stderr(&o));
}
