//! `cps3d dataset check` on the real dataset and on copies broken on purpose.

mod common;

use std::path::{Path, PathBuf};

use common::{copy_dir, run, shared_data, stderr, stdout};
use cps3d::io::{self, Geometry};

/// A dataset to break: the real one when present, and always a synthetic one.
fn sources(tmp: &Path) -> Vec<(PathBuf, &'static str, &'static str)> {
    let mut v = Vec::new();
    if let Some(d) = shared_data() {
        v.push((d.join("Dataset001_TSAbdomen"), "tsabd_0000", "tsabd"));
    }
    let synth = tmp.join("synth");
    let cfg =
        cps3d::synth::SynthConfig { labeled: 2, unlabeled: 1, shape: [16, 32, 32], seed: 5, ..Default::default() };
    cps3d::synth::write_dataset(&cfg, &synth, |_| {}).unwrap();
    v.push((synth, "phantom_0000_0000", "phantom_0000"));
    v
}

/// Copies `src` to a fresh folder, applies `breakage`, runs the check and returns
/// (exit success, stdout + stderr).
fn check_broken(src: &Path, dest: &Path, breakage: impl FnOnce(&Path)) -> (bool, String) {
    copy_dir(src, dest);
    breakage(dest);
    let out = run(&["dataset", "check", dest.to_str().unwrap(), "-j", "2"]);
    (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
}

#[test]
fn real_dataset_passes() {
    let Some(data) = shared_data() else { return };
    let out = run(&["dataset", "check", data.join("Dataset001_TSAbdomen").to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("1 labeled and 2 unlabeled cases"), "{text}");
    assert!(text.contains("OK: no problems found"), "{text}");
    // Mixed layouts and dtypes are reported as they are.
    assert!(text.contains("int32") && text.contains("int16") && text.contains("RAS") && text.contains("LPS"), "{text}");
}

#[test]
fn synthetic_dataset_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let srcs = sources(tmp.path());
    let (synth, ..) = srcs.last().unwrap();
    let out = run(&["dataset", "check", synth.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn truncated_gz_is_reported_with_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (src, image, _)) in sources(tmp.path()).into_iter().enumerate() {
        let (ok, text) = check_broken(&src, &tmp.path().join(format!("t{i}")), |d| {
            let p = d.join(format!("imagesTr/{image}.nii.gz"));
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        });
        assert!(!ok, "{text}");
        assert!(text.contains(&format!("imagesTr/{image}.nii.gz: file is truncated")), "{text}");
    }
}

#[test]
fn shape_mismatch_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (src, _, label)) in sources(tmp.path()).into_iter().enumerate() {
        let (ok, text) = check_broken(&src, &tmp.path().join(format!("s{i}")), |d| {
            let p = d.join(format!("labelsTr/{label}.nii.gz"));
            let v = io::read_labels(&p).unwrap();
            let [z, y, x] = v.geometry.shape();
            let cropped = v.data.slice(ndarray::s![..z - 1, .., ..]).to_owned();
            let g = Geometry::new_with_layout([z - 1, y, x], v.geometry.spacing(), [0.0; 3], true);
            io::write_volume(&p, cropped.view(), &g).unwrap();
        });
        assert!(!ok, "{text}");
        assert!(text.contains(&format!("labelsTr/{label}.nii.gz: shape")), "{text}");
        assert!(text.contains("differs from its image's"), "{text}");
    }
}

#[test]
fn label_value_42_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (src, _, label)) in sources(tmp.path()).into_iter().enumerate() {
        let (ok, text) = check_broken(&src, &tmp.path().join(format!("l{i}")), |d| {
            let p = d.join(format!("labelsTr/{label}.nii.gz"));
            let mut v = io::read_labels(&p).unwrap();
            v.data[[3, 4, 5]] = 42;
            io::write_labels_like(&p, v.data.view(), &v.geometry).unwrap();
        });
        assert!(!ok, "{text}");
        assert!(
            text.contains(&format!("labelsTr/{label}.nii.gz: label value(s) 42 not in dataset.json's labels")),
            "{text}"
        );
    }
}

#[test]
fn missing_label_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (src, _, label)) in sources(tmp.path()).into_iter().enumerate() {
        let (ok, text) = check_broken(&src, &tmp.path().join(format!("m{i}")), |d| {
            std::fs::remove_file(d.join(format!("labelsTr/{label}.nii.gz"))).unwrap();
        });
        assert!(!ok, "{text}");
        assert!(text.contains(&format!("labelsTr/{label}.nii.gz: missing")), "{text}");
    }
}

#[test]
fn invalid_json_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (src, ..)) in sources(tmp.path()).into_iter().enumerate() {
        let (ok, text) = check_broken(&src, &tmp.path().join(format!("j{i}")), |d| {
            std::fs::write(d.join("dataset.json"), "{ \"name\": \"x\", \"labels\": ").unwrap();
        });
        assert!(!ok, "{text}");
        assert!(text.contains("dataset.json: invalid JSON"), "{text}");
    }
}

#[test]
fn json_without_labels_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, ..) = sources(tmp.path()).pop().unwrap();
    let (ok, text) = check_broken(&src, &tmp.path().join("nl"), |d| {
        std::fs::write(d.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}"#).unwrap();
    });
    assert!(!ok, "{text}");
    assert!(text.contains("dataset.json: missing field \"labels\""), "{text}");
}

#[test]
fn nan_voxel_in_float_image_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (src, image, _)) in sources(tmp.path()).into_iter().enumerate() {
        let (ok, text) = check_broken(&src, &tmp.path().join(format!("n{i}")), |d| {
            let p = d.join(format!("imagesTr/{image}.nii.gz"));
            let mut v = io::read_image(&p).unwrap();
            v.data[[2, 3, 4]] = f32::NAN;
            v.data[[2, 3, 5]] = f32::INFINITY;
            io::write_volume(&p, v.data.view(), &v.geometry).unwrap();
            assert_eq!(io::read_header(&p).unwrap().header.datatype, 16, "written as float32");
        });
        assert!(!ok, "{text}");
        assert!(text.contains(&format!("imagesTr/{image}.nii.gz: 1 NaN and 1 infinite voxel(s)")), "{text}");
    }
}

#[test]
fn every_bad_file_is_listed_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, ..) = sources(tmp.path()).pop().unwrap();
    let (ok, text) = check_broken(&src, &tmp.path().join("multi"), |d| {
        std::fs::remove_file(d.join("labelsTr/phantom_0000.nii.gz")).unwrap();
        let p = d.join("imagesUnlabeled/unlabeled_00000_0000.nii.gz");
        std::fs::write(&p, b"not a nifti file at all, just text").unwrap();
        std::fs::write(d.join("imagesTr/notes.txt"), b"stray").unwrap();
    });
    assert!(!ok, "{text}");
    assert!(text.contains("labelsTr/phantom_0000.nii.gz: missing"), "{text}");
    assert!(text.contains("imagesUnlabeled/unlabeled_00000_0000.nii.gz:"), "{text}");
    assert!(text.contains("2 problem(s) in 2 file(s)"), "{text}");
    assert!(text.contains("notes.txt: not named"), "{text}");
}

#[test]
fn geometry_mismatch_of_origin_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _, label) = sources(tmp.path()).pop().unwrap();
    let (ok, text) = check_broken(&src, &tmp.path().join("o"), |d| {
        let p = d.join(format!("labelsTr/{label}.nii.gz"));
        let v = io::read_labels(&p).unwrap();
        let mut g = v.geometry.clone();
        g.header.srow_x[3] += 5.0; // shift the label map 5 mm
        g.file_affine[0][3] += 5.0;
        io::write_labels_like(&p, v.data.view(), &g).unwrap();
    });
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("labelsTr/{label}.nii.gz: origin")), "{text}");
}
