//! Fingerprint → plan → preprocess, end to end, on real and synthetic data; resuming
//! after a kill; bad cases; geometry of the resampled grid.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{run, shared_data, stderr, stdout};
use cps3d::io::{self, geometry, Geometry};
use cps3d::planning::fingerprint::{fingerprint_dataset, Fingerprint};
use cps3d::planning::plan::{plan, PlanOverrides, Plans};
use cps3d::preprocessing::{preprocess_case, preprocess_dataset, Manifest, PreprocessOptions};
use cps3d_storage::{Scratch, Shard};
use ndarray::Array3;

fn synth(dir: &Path, labeled: usize, unlabeled: usize, shape: [usize; 3]) {
    let cfg = cps3d::synth::SynthConfig { labeled, unlabeled, shape, seed: 9, workers: 2, ..Default::default() };
    cps3d::synth::write_dataset(&cfg, dir, |_| {}).unwrap();
}

#[test]
fn real_dataset_end_to_end_and_a_patch_read_back() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ds = data.join("Dataset001_TSAbdomen");
    let (fp, pl, out) = (tmp.path().join("fp.json"), tmp.path().join("plans.json"), tmp.path().join("shards"));
    let o = run(&["fingerprint", ds.to_str().unwrap(), "-o", fp.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fingerprint = Fingerprint::read(&fp).unwrap();
    assert_eq!((fingerprint.num_labeled, fingerprint.num_unlabeled), (1, 2));
    // All voxels of all three scans; foreground only of the labeled one.
    assert_eq!(fingerprint.intensity[0].all_voxels.count, 112 * 101 * 122 + 164 * 126 * 120 + 112 * 102 * 122);
    assert!(fingerprint.intensity[0].foreground.count < 112 * 101 * 122);
    let o = run(&["plan", fp.to_str().unwrap(), "-o", pl.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("3d_fullres"), "{}", stdout(&o));
    let o = run(&["preprocess", ds.to_str().unwrap(), "-p", pl.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = run(&["verify", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    let manifest = Manifest::read(&out.join("manifest.json")).unwrap();
    assert_eq!(manifest.cases.len(), 3);
    assert!(manifest.cases[0].labeled && manifest.cases[0].id == "tsabd");
    // The shard holds exactly what preprocessing computed.
    let plans = Plans::read(&pl).unwrap();
    let raw = cps3d::dataset::RawDataset::open(&ds).unwrap();
    let p = preprocess_case(&raw.labeled[0], &plans, "3d_fullres").unwrap();
    let shard = Shard::open(out.join("tsabd.shard")).unwrap();
    assert_eq!(shard.shape(), p.meta.shape);
    let (origin, size) = ([10i64, -5, 20], [48usize, 64, 64]);
    let mut img = vec![0i16; size.iter().product()];
    let mut lab = vec![0u8; size.iter().product()];
    let mut scratch = Scratch::new();
    shard.read_image_region(&mut scratch, origin, size, 0, &mut img).unwrap();
    shard.read_label_region(&mut scratch, origin, size, 255, &mut lab).unwrap();
    let labels = p.labels.as_ref().unwrap();
    let [nz, ny, nx] = p.meta.shape;
    let mut i = 0;
    for z in 0..size[0] as i64 {
        for y in 0..size[1] as i64 {
            for x in 0..size[2] as i64 {
                let (gz, gy, gx) = (origin[0] + z, origin[1] + y, origin[2] + x);
                let inside =
                    (0..nz as i64).contains(&gz) && (0..ny as i64).contains(&gy) && (0..nx as i64).contains(&gx);
                if inside {
                    let (gz, gy, gx) = (gz as usize, gy as usize, gx as usize);
                    assert_eq!(img[i], p.image[0][[gz, gy, gx]].round() as i16);
                    assert_eq!(lab[i], labels[[gz, gy, gx]]);
                } else {
                    assert_eq!((img[i], lab[i]), (0, 255));
                }
                i += 1;
            }
        }
    }
    // Oversampling locations really point at their class.
    for c in shard.classes() {
        for v in shard.class_locations(c.class).iter().take(200) {
            assert_eq!(labels[[v[0], v[1], v[2]]], c.class);
        }
    }
}

#[test]
fn fingerprint_statistics_match_a_direct_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 2, 2, [16, 32, 32]);
    let fp = fingerprint_dataset(&d, 2, |_| {}).unwrap();
    let mut all = Vec::new();
    let mut fg = Vec::new();
    for case in cps3d::dataset::RawDataset::open(&d).unwrap().cases() {
        let img = io::read_image(&case.images[0]).unwrap();
        all.extend(img.data.iter().map(|&v| v as f64));
        if let Some(l) = &case.label {
            let lab = io::read_labels(l).unwrap();
            fg.extend(img.data.iter().zip(lab.data.iter()).filter(|(_, &l)| l > 0).map(|(&v, _)| v as f64));
        }
    }
    for (stats, values) in [(&fp.intensity[0].all_voxels, &mut all), (&fp.intensity[0].foreground, &mut fg)] {
        values.sort_by(f64::total_cmp);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let pct = |q: f64| {
            let pos = q * (n - 1.0);
            let lo = pos.floor() as usize;
            values[lo] + (values[(lo + 1).min(values.len() - 1)] - values[lo]) * (pos - lo as f64)
        };
        assert_eq!(stats.count, values.len() as u64);
        assert!((stats.mean - mean).abs() < 1e-6);
        assert_eq!(stats.percentile_00_5, pct(0.005));
        assert_eq!(stats.median, pct(0.5));
        assert_eq!(stats.percentile_99_5, pct(0.995));
        assert_eq!(stats.min, values[0]);
    }
}

#[test]
fn a_landmark_keeps_its_world_coordinates() {
    // A bright 3-voxel cube centred at a known world point, in anisotropic RAS and
    // LPS files; resampled to 1.2 mm isotropic it must stay at that point.
    let tmp = tempfile::tempdir().unwrap();
    for ras in [true, false] {
        let d = tmp.path().join(if ras { "ras" } else { "lps" });
        for sub in ["imagesTr", "labelsTr"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let shape = [20, 40, 44];
        let g = Geometry::new_with_layout(shape, [3.0, 0.9, 0.9], [15.0, -30.0, 100.0], ras);
        let mut img = Array3::<i16>::from_elem(shape, -1000);
        let mut lab = Array3::<u8>::zeros(shape);
        for z in 9..12 {
            for y in 14..17 {
                for x in 30..33 {
                    img[[z, y, x]] = 1000;
                    lab[[z, y, x]] = 1;
                }
            }
        }
        let landmark = geometry::apply(&g.affine(), [10.0, 15.0, 31.0]);
        io::write_volume(&d.join("imagesTr/lm_0000.nii.gz"), img.view(), &g).unwrap();
        io::write_volume(&d.join("labelsTr/lm.nii.gz"), lab.view(), &g).unwrap();
        std::fs::write(
            d.join("dataset.json"),
            r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "mark": 1}, "numTraining": 1, "file_ending": ".nii.gz"}"#,
        )
        .unwrap();
        let fp = fingerprint_dataset(&d, 1, |_| {}).unwrap();
        let mut plans =
            plan(&fp, &PlanOverrides { target_spacing: Some([1.2, 1.2, 1.2]), ..Default::default() }).unwrap();
        // The cube is under 0.5% of the voxels: the 99.5th percentile would clip it away
        // before resampling (as nnU-Net would); keep it to follow it.
        plans.normalization[0].clip_high = 3071.0;
        let raw = cps3d::dataset::RawDataset::open(&d).unwrap();
        let p = preprocess_case(&raw.labeled[0], &plans, "3d_fullres").unwrap();
        // Intensity-weighted centroid of the bright voxels.
        let (mut sum, mut w) = ([0.0f64; 3], 0.0f64);
        for ((z, y, x), &v) in p.image[0].indexed_iter() {
            if v > 0.0 {
                let v = v as f64;
                sum = [sum[0] + z as f64 * v, sum[1] + y as f64 * v, sum[2] + x as f64 * v];
                w += v;
            }
        }
        let c = [sum[0] / w, sum[1] / w, sum[2] / w];
        let world = geometry::apply(&p.meta.affine, c);
        for a in 0..3 {
            assert!((world[a] - landmark[a]).abs() < 0.6, "ras={ras}: {world:?} vs {landmark:?}");
        }
        for s in p.meta.spacing {
            assert!((s - 1.2).abs() < 0.1, "{:?}", p.meta.spacing);
        }
        // The label moved with the image.
        let labels = p.labels.as_ref().unwrap();
        let (mut ls, mut ln) = ([0.0f64; 3], 0.0);
        for ((z, y, x), &l) in labels.indexed_iter() {
            if l == 1 {
                ls = [ls[0] + z as f64, ls[1] + y as f64, ls[2] + x as f64];
                ln += 1.0;
            }
        }
        let lw = geometry::apply(&p.meta.affine, [ls[0] / ln, ls[1] / ln, ls[2] / ln]);
        for a in 0..3 {
            assert!((lw[a] - landmark[a]).abs() < 0.8, "labels ras={ras}: {lw:?} vs {landmark:?}");
        }
    }
}

#[test]
fn a_bad_case_is_reported_and_the_others_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 3, 2, [16, 32, 32]);
    let fp = fingerprint_dataset(&d, 2, |_| {}).unwrap();
    let fp_path = tmp.path().join("fp.json");
    fp.write(&fp_path).unwrap();
    let plans_path = tmp.path().join("plans.json");
    assert!(run(&["plan", fp_path.to_str().unwrap(), "-o", plans_path.to_str().unwrap()]).status.success());
    // Corrupt one unlabeled scan after planning.
    let bad = d.join("imagesUnlabeled/unlabeled_00001_0000.nii.gz");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let out = tmp.path().join("shards");
    let o = run(&[
        "preprocess",
        d.to_str().unwrap(),
        "-p",
        plans_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-j",
        "2",
    ]);
    assert!(!o.status.success());
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("4 written, 0 already done, 1 failed"), "{text}");
    assert!(text.contains("unlabeled_00001_0000.nii.gz: file is truncated"), "{text}");
    let m = Manifest::read(&out.join("manifest.json")).unwrap();
    assert_eq!(m.cases.len(), 4);
    assert_eq!(m.failed.len(), 1);
}

#[test]
fn a_killed_run_resumes_and_every_shard_is_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 4, 12, [40, 96, 96]);
    let fp = fingerprint_dataset(&d, 2, |_| {}).unwrap();
    // A fine target spacing makes each case slow enough to be caught mid-run.
    let o = PlanOverrides { target_spacing: Some([1.5, 1.0, 1.0]), ..Default::default() };
    let plans = plan(&fp, &o).unwrap();
    let plans_path = tmp.path().join("plans.json");
    plans.write(&plans_path).unwrap();
    let out = tmp.path().join("shards");
    let mut child = common::cps3d()
        .args([
            "preprocess",
            d.to_str().unwrap(),
            "-p",
            plans_path.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "-j",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let count_shards = || {
        std::fs::read_dir(&out)
            .map(|r| r.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".shard")).count())
            .unwrap_or(0)
    };
    let start = Instant::now();
    while count_shards() < 2 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let after_kill = count_shards();
    assert!((2..16).contains(&after_kill), "killed mid-way: {after_kill} shards");
    // Whatever is there under a final name is whole.
    for (p, r) in cps3d_storage::verify_dir(&out) {
        assert!(r.is_ok(), "{}: {:?}", p.display(), r.err());
    }
    let summary =
        preprocess_dataset(&d, &plans, &out, &PreprocessOptions { workers: 2, ..Default::default() }, |_, _| {})
            .unwrap();
    assert_eq!(summary.skipped_existing, after_kill);
    assert_eq!(summary.written, 16 - after_kill);
    assert!(summary.failed.is_empty());
    let results = cps3d_storage::verify_dir(&out);
    assert_eq!(results.len(), 16);
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files of the killed run remain: {leftovers:?}");
    assert!(results.iter().all(|(_, r)| r.is_ok()));
    assert_eq!(Manifest::read(&out.join("manifest.json")).unwrap().cases.len(), 16);
    // Shards hold clipped HU: another clipping in the plan makes every case again.
    let mut reclipped = plans.clone();
    reclipped.normalization[0].clip_high -= 10.0;
    let summary =
        preprocess_dataset(&d, &reclipped, &out, &PreprocessOptions { workers: 2, ..Default::default() }, |_, _| {})
            .unwrap();
    assert_eq!((summary.written, summary.skipped_existing), (16, 0));
}

#[test]
fn verify_lists_a_corrupt_shard_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 2, 1, [16, 32, 32]);
    let fp = fingerprint_dataset(&d, 2, |_| {}).unwrap();
    let plans = plan(&fp, &PlanOverrides::default()).unwrap();
    let out = tmp.path().join("shards");
    preprocess_dataset(&d, &plans, &out, &PreprocessOptions::default(), |_, _| {}).unwrap();
    let o = run(&["verify", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("3 shard(s) checked, 0 bad"), "{}", stdout(&o));
    // Flip one byte inside the first image brick of one shard.
    let victim = out.join("phantom_0001.shard");
    let (off, len) = Shard::open(&victim).unwrap().brick_location(cps3d_storage::Stream::Image, 0, 0).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[(off + len as u64 / 2) as usize] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let o = run(&["verify", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("BAD") && text.contains("phantom_0001.shard: image brick 0"), "{text}");
    assert!(text.contains("1 bad shard(s)"), "{text}");
    // A truncated shard is reported too.
    let t = out.join("unlabeled_00000.shard");
    let n = std::fs::metadata(&t).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&t).unwrap().set_len(n / 2).unwrap();
    let o = run(&["verify", out.to_str().unwrap()]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("unlabeled_00000.shard: truncated"), "{text}");
    assert!(text.contains("2 bad shard(s)"), "{text}");
}

/// nnU-Net's own preprocessing of the real scans (`scripts/reference/preprocess.py`
/// wrote `tests/golden/preprocess.json`): crop, clip, cubic B-spline resampling (with
/// and without a separate z axis), one-hot linear labels, RAS and LPS files. Our float
/// values before the int16 rounding of the shard must equal nnU-Net's (as HU).
#[test]
fn real_scans_are_preprocessed_as_nnunet_does() {
    let Some(data) = shared_data() else { return };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/preprocess.json")).unwrap(),
    )
    .unwrap();
    let ds = data.join("Dataset001_TSAbdomen");
    let raw = cps3d::dataset::RawDataset::open(&ds).unwrap();
    let fp = fingerprint_dataset(&ds, 1, |_| {}).unwrap();
    let stats = &golden["statistics"];
    for case in golden["cases"].as_array().unwrap() {
        let spacing: Vec<f64> =
            case["target_spacing"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let mut plans = plan(
            &fp,
            &PlanOverrides { target_spacing: Some([spacing[0], spacing[1], spacing[2]]), ..Default::default() },
        )
        .unwrap();
        let n = &mut plans.normalization[0];
        n.scheme = "CT".into();
        n.mean = stats["mean"].as_f64().unwrap();
        n.std = stats["std"].as_f64().unwrap();
        n.clip_low = stats["percentile_00_5"].as_f64().unwrap();
        n.clip_high = stats["percentile_99_5"].as_f64().unwrap();
        let image = case["image"].as_str().unwrap();
        let c = raw.cases().find(|c| c.images[0].ends_with(image)).expect("the golden case in the dataset");
        let p = preprocess_case(c, &plans, "3d_fullres").unwrap();
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(p.meta.shape.to_vec(), shape, "{name}");
        let bbox: Vec<[usize; 2]> = case["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| [b[0].as_u64().unwrap() as usize, b[1].as_u64().unwrap() as usize])
            .collect();
        assert_eq!(p.meta.crop_box.to_vec(), bbox, "{name}");
        let positions = case["positions"].as_array().unwrap();
        let want = case["hu"].as_array().unwrap();
        let mut max_diff = 0.0f64;
        for (pos, w) in positions.iter().zip(want) {
            let i = [0, 1, 2].map(|a| pos[a].as_u64().unwrap() as usize);
            max_diff = max_diff.max((p.image[0][i] as f64 - w.as_f64().unwrap()).abs());
        }
        eprintln!("{name}: shape {shape:?}, max |Δ| {max_diff:.4} HU at {} positions", positions.len());
        assert!(max_diff < 0.01, "{name}: {max_diff} HU from nnU-Net's value");
        if let (Some(labels), Some(want)) = (&p.labels, case["labels"].as_array()) {
            let differing = positions
                .iter()
                .zip(want)
                .filter(|(pos, w)| {
                    let i = [0, 1, 2].map(|a| pos[a].as_u64().unwrap() as usize);
                    labels[i] as u64 != w.as_u64().unwrap()
                })
                .count();
            let counts: Vec<u64> = (0..14u8).map(|c| labels.iter().filter(|&&l| l == c).count() as u64).collect();
            let want_counts: Vec<u64> =
                case["label_counts"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(differing, 0, "{name}: labels differ at sampled positions");
            assert_eq!(counts, want_counts, "{name}: label voxel counts");
        }
    }
}

#[test]
fn preprocessing_into_a_folder_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 1, 1, [16, 32, 32]);
    let fp = fingerprint_dataset(&d, 1, |_| {}).unwrap();
    let plans = plan(&fp, &PlanOverrides::default()).unwrap();
    let out = tmp.path().join("shards");
    preprocess_dataset(&d, &plans, &out, &PreprocessOptions::default(), |_, _| {}).unwrap();
    let before = cps3d_storage::verify_dir(&out).len();
    // A training run reads the shards under a shared lock: rewriting them under it is refused.
    let reader = cps3d::util::FolderLock::shared(&out, "reading the shards").unwrap();
    let overwrite = PreprocessOptions { overwrite: true, ..Default::default() };
    let e = preprocess_dataset(&d, &plans, &out, &overwrite, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("preprocessing") && e.contains("another cps3d process holds"), "{e}");
    assert_eq!(cps3d_storage::verify_dir(&out).len(), before);
    drop(reader);
    // Two preprocessing runs into one folder: the second is refused while the first holds it.
    let first = cps3d::util::FolderLock::exclusive(&out, "preprocessing").unwrap();
    assert!(preprocess_dataset(&d, &plans, &out, &overwrite, |_, _| {}).is_err());
    drop(first);
    let summary = preprocess_dataset(&d, &plans, &out, &overwrite, |_, _| {}).unwrap();
    assert_eq!(summary.written, before);
}
