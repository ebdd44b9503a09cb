//! `cps3d predict`: label maps on the input's exact grid, with and without forced
//! spacing, for RAS and LPS inputs; bad inputs reported and skipped.

mod common;

use common::{run, stderr, stdout};

#[test]
fn predictions_land_on_the_input_grid_and_bad_files_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cfg = cps3d::synth::SynthConfig {
        labeled: 3,
        unlabeled: 2,
        shape: [24, 48, 48],
        seed: 8,
        workers: 2,
        ..Default::default()
    };
    let sh = common::preprocessed(t, cfg, &["--patch-size", "16,32,32", "--features", "8,16,32,32"]);
    let (d, rd) = (t.join("raw"), t.join("run"));
    let o = run(&[
        "train",
        sh.to_str().unwrap(),
        "-o",
        rd.to_str().unwrap(),
        "--epochs",
        "1",
        "--iterations",
        "2",
        "--devices",
        "cpu,cpu",
        "--fold",
        "all",
        "--val-iterations",
        "2",
        "--no-final-validation",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let inputs = d.join("imagesTr");
    for (name, extra) in
        [("plain", vec![]), ("forced", vec!["--forced-spacing", "1.0,1.5"]), ("tta", vec!["--tta", "--no-ensemble"])]
    {
        let out = t.join(name);
        let mut args = vec![
            "predict",
            "-i",
            inputs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-m",
            rd.to_str().unwrap(),
            "--checkpoint",
            "final",
        ];
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{name}: {}{}", stdout(&o), stderr(&o));
        let mut layouts = std::collections::BTreeSet::new();
        for i in 0..3 {
            let img = cps3d::io::read_header(&inputs.join(format!("phantom_{i:04}_0000.nii.gz"))).unwrap();
            let pred = cps3d::io::read_labels(&out.join(format!("phantom_{i:04}.nii.gz"))).unwrap();
            assert_eq!(cps3d::dataset::check::geometry_mismatch(&img, &pred.geometry), None, "{name} case {i}");
            assert_eq!(pred.geometry.header.datatype, 2);
            assert!(pred.data.iter().all(|&v| v <= 13));
            layouts.insert(img.axis_codes());
        }
        assert!(!layouts.is_empty());
    }
    // Runs ensemble: the same run twice averages identical logits (the labels of one run);
    // a run of another plan is refused.
    let twice = t.join("twice");
    let o = run(&[
        "predict",
        "-i",
        inputs.join("phantom_0000_0000.nii.gz").to_str().unwrap(),
        "-o",
        twice.to_str().unwrap(),
        "-m",
        rd.to_str().unwrap(),
        "-m",
        rd.to_str().unwrap(),
        "--checkpoint",
        "final",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let a = cps3d::io::read_labels(&twice.join("phantom_0000.nii.gz")).unwrap();
    let b = cps3d::io::read_labels(&t.join("plain/phantom_0000.nii.gz")).unwrap();
    assert_eq!(a.data, b.data);
    // nnU-Net's probability outputs, with the dataset.json and plans.json its ensembling reads.
    let probs = t.join("probs");
    let o = run(&[
        "predict",
        "-i",
        inputs.join("phantom_0000_0000.nii.gz").to_str().unwrap(),
        "-o",
        probs.to_str().unwrap(),
        "-m",
        rd.to_str().unwrap(),
        "--checkpoint",
        "final",
        "--save-probabilities",
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let mut names: Vec<String> =
        std::fs::read_dir(&probs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["dataset.json", "phantom_0000.nii.gz", "phantom_0000.npz", "phantom_0000.pkl", "plans.json"]);
    let other = t.join("other_plan");
    let o = run(&["export", rd.to_str().unwrap(), "--checkpoint", "final", "-o", other.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut plans: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("plans.json")).unwrap()).unwrap();
    plans["configurations"]["3d_fullres"]["patch_size"] = serde_json::json!([8, 16, 16]);
    std::fs::write(other.join("plans.json"), plans.to_string()).unwrap();
    let o = run(&[
        "predict",
        "-i",
        inputs.to_str().unwrap(),
        "-o",
        t.join("mixed").to_str().unwrap(),
        "-m",
        rd.to_str().unwrap(),
        "-m",
        other.to_str().unwrap(),
        "--checkpoint",
        "final",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("must come from one plan"), "{}", stderr(&o));
    // A truncated input is reported; the others are still written.
    let bad_dir = t.join("with_bad");
    std::fs::create_dir_all(&bad_dir).unwrap();
    std::fs::copy(inputs.join("phantom_0000_0000.nii.gz"), bad_dir.join("good_0000.nii.gz")).unwrap();
    let bytes = std::fs::read(inputs.join("phantom_0001_0000.nii.gz")).unwrap();
    std::fs::write(bad_dir.join("bad_0000.nii.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let out = t.join("out_bad");
    let o = run(&[
        "predict",
        "-i",
        bad_dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-m",
        rd.to_str().unwrap(),
        "--checkpoint",
        "final",
    ]);
    assert!(!o.status.success());
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("bad_0000.nii.gz: file is truncated") && text.contains("1 of 2 case(s) failed"), "{text}");
    assert!(out.join("good.nii.gz").exists());
}
