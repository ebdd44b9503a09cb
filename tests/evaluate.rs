//! `cps3d evaluate`: the FLARE22 official scores, the rules on real label maps, bad input.

mod common;

use common::{run, shared_data, stderr, stdout};
use cps3d::evaluation::{score_case, OrganScore};
use cps3d::io::nifti::read_labels_file_order;
use ndarray::{s, Array3};

#[test]
fn reproduces_the_official_flare22_scores() {
    let Some(data) = shared_data() else { return };
    let metrics = data.join("metrics");
    let tmp = tempfile::tempdir().unwrap();
    let (pred, reference) = (tmp.path().join("pred"), tmp.path().join("ref"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&reference).unwrap();
    std::fs::copy(metrics.join("tssm_prediction.nii.gz"), pred.join("tssm.nii.gz")).unwrap();
    std::fs::copy(metrics.join("tssm_reference.nii.gz"), reference.join("tssm.nii.gz")).unwrap();
    let csv = tmp.path().join("scores.csv");
    let o = run(&[
        "evaluate",
        "--pred",
        pred.to_str().unwrap(),
        "--ref",
        reference.to_str().unwrap(),
        "-o",
        csv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("Gallbladder"), "summary table printed: {}", stdout(&o));

    let (header, rows) = common::score_table(&csv);
    let (official_header, official) = common::score_table(&metrics.join("tssm_flare22_official_scores.csv"));
    assert_eq!(header, official_header);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "tssm");
    for (i, (got, want)) in rows[0].1.iter().zip(&official[0].1).enumerate() {
        assert!(
            (got - want).abs() < 1e-9,
            "column {}: {got} vs official {want}",
            header.split(',').nth(i + 1).unwrap()
        );
    }
    assert!(csv.with_extension("summary.json").is_file());
}

#[test]
fn anisotropic_las_label_map_matches_deepmind_surface_distance() {
    // AMOS case 0013: 512×512×82 at 0.781×0.781×5 mm, LAS. The prediction is the reference
    // shifted by (+2, -1, +1) voxels along the file's axes. Expected values: the official
    // FLARE22 rules over DeepMind's surface-distance package (with scipy), on the same arrays.
    let Some(data) = shared_data() else { return };
    let (reference, geometry) = read_labels_file_order(&data.join("metrics/amos0013_reference.nii.gz")).unwrap();
    let mut prediction = Array3::<u8>::zeros(reference.raw_dim());
    prediction.slice_mut(s![2.., ..-1, 1..]).assign(&reference.slice(s![..-2, 1.., ..-1]));
    let p = geometry.header.pixdim;
    let scores = score_case(reference.view(), prediction.view(), [p[1] as f64, p[2] as f64, p[3] as f64]);
    let expected = [
        (0.9289, 0.9857),
        (0.8472, 0.8668),
        (0.8686, 0.8014),
        (0.6658, 0.9805),
        (0.8692, 0.9536),
        (0.8076, 0.9189),
        (0.5155, 0.8271),
        (0.4689, 0.8314),
        (0.7035, 0.6616),
        (0.6493, 0.9016),
        (0.8447, 0.9656),
        (0.6519, 1.0),
        (0.8332, 0.8281),
    ];
    for (organ, (got, (dsc, nsd))) in scores.iter().zip(expected).enumerate() {
        assert_eq!(*got, OrganScore { dsc, nsd }, "organ {}", organ + 1);
    }
}

#[test]
fn bad_predictions_are_reported_and_the_rest_scored() {
    let tmp = tempfile::tempdir().unwrap();
    let (pred, reference) = (tmp.path().join("pred"), tmp.path().join("ref"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&reference).unwrap();
    let geometry = cps3d::io::nifti::Geometry::new_with_layout([12, 10, 8], [2.0, 1.0, 1.0], [0.0; 3], true);
    let mut labels = Array3::<u8>::zeros((12, 10, 8));
    labels.slice_mut(s![3..9, 2..8, 2..6]).fill(1);
    for name in ["good", "truncated", "wrong_shape"] {
        cps3d::io::nifti::write_labels_like(&reference.join(format!("{name}.nii.gz")), labels.view(), &geometry)
            .unwrap();
    }
    cps3d::io::nifti::write_labels_like(&pred.join("good.nii.gz"), labels.view(), &geometry).unwrap();
    cps3d::io::nifti::write_labels_like(&pred.join("orphan.nii.gz"), labels.view(), &geometry).unwrap();
    let small = cps3d::io::nifti::Geometry::new_with_layout([6, 10, 8], [2.0, 1.0, 1.0], [0.0; 3], true);
    cps3d::io::nifti::write_labels_like(&pred.join("wrong_shape.nii.gz"), labels.slice(s![..6, .., ..]), &small)
        .unwrap();
    let bytes = std::fs::read(reference.join("good.nii.gz")).unwrap();
    std::fs::write(pred.join("truncated.nii.gz"), &bytes[..bytes.len() / 2]).unwrap();

    let o = run(&["evaluate", "--pred", pred.to_str().unwrap(), "--ref", reference.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("truncated.nii.gz") && err.contains("truncated"), "{err}");
    assert!(err.contains("wrong_shape.nii.gz") && err.contains("shape"), "{err}");
    assert!(err.contains("orphan.nii.gz") && err.contains("no reference"), "{err}");
    let (_, rows) = common::score_table(&pred.join("flare22_scores.csv"));
    assert_eq!(rows.len(), 1, "the good case is still scored");
    assert_eq!(rows[0].0, "good");
    assert_eq!((rows[0].1[0], rows[0].1[13]), (1.0, 1.0));
}
