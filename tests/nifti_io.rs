//! NIfTI reading and writing: geometry kept exactly, canonical orientation, dtypes, scaling.

mod common;

use std::path::Path;

use common::shared_data;
use cps3d::io::geometry::{apply, axis_codes, max_abs_diff};
use cps3d::io::{self, Geometry};
use ndarray::Array3;

/// Reads `path`, writes a label map on its grid, reads that back: geometry and
/// voxels must agree exactly.
fn round_trip_on_grid_of(path: &Path, tmp: &Path, expect_codes: &str) {
    let img = io::read_image(path).unwrap();
    assert_eq!(img.geometry.axis_codes(), expect_codes, "{}", path.display());
    // A label map that depends on position, so any axis mix-up shows.
    let labels = Array3::from_shape_fn(img.data.raw_dim(), |(z, y, x)| ((z * 7 + y * 3 + x) % 14) as u8);
    let out = tmp.join("labels.nii.gz");
    io::write_labels_like(&out, labels.view(), &img.geometry).unwrap();
    let back = io::read_labels(&out).unwrap();
    assert_eq!(back.data, labels, "{}: voxels moved", path.display());
    assert_eq!(back.geometry.file_shape, img.geometry.file_shape);
    assert!(max_abs_diff(&back.geometry.file_affine, &img.geometry.file_affine) < 1e-4);
    assert!(max_abs_diff(&back.geometry.affine(), &img.geometry.affine()) < 1e-4);
    assert_eq!(back.geometry.axis_codes(), expect_codes);
    // Both transforms are written, and they agree.
    let h = &back.geometry.header;
    assert!(h.sform_code > 0 && h.qform_code > 0, "sform {} qform {}", h.sform_code, h.qform_code);
    let q = cps3d::io::geometry::qform_affine(h);
    let s = cps3d::io::geometry::sform_affine(h);
    assert!(max_abs_diff(&q, &s) < 1e-3, "qform {q:?} vs sform {s:?}");
    assert_eq!(h.datatype, 2, "uint8");
}

#[test]
fn real_ras_and_lps_files_round_trip() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ds = data.join("Dataset001_TSAbdomen");
    round_trip_on_grid_of(&ds.join("imagesTr/tsabd_0000.nii.gz"), tmp.path(), "RAS");
    round_trip_on_grid_of(&ds.join("imagesUnlabeled/chest_aorta_0000.nii.gz"), tmp.path(), "LPS");
    round_trip_on_grid_of(&ds.join("imagesUnlabeled/chest_pulm_0000.nii.gz"), tmp.path(), "LPS");
    // qform only, qfac -1: the sform written on export must reproduce it.
    round_trip_on_grid_of(&data.join("metrics/amos0013_reference.nii.gz"), tmp.path(), "LAS");
}

#[test]
fn real_files_have_the_documented_geometry() {
    let Some(data) = shared_data() else { return };
    let ds = data.join("Dataset001_TSAbdomen");
    let g = io::read_header(&ds.join("imagesTr/tsabd_0000.nii.gz")).unwrap();
    assert_eq!(g.file_shape, [122, 101, 112]);
    assert_eq!(g.shape(), [112, 101, 122]);
    assert_eq!(g.datatype(), Some(nifti::NiftiType::Int32));
    for s in g.spacing() {
        assert!((s - 3.0).abs() < 1e-6);
    }
    let amos = io::read_header(&data.join("metrics/amos0013_reference.nii.gz")).unwrap();
    assert_eq!(amos.source, cps3d::io::geometry::AffineSource::Qform);
    assert_eq!(amos.header.pixdim[0], -1.0);
    assert_eq!(amos.shape(), [82, 512, 512]);
    let sp = amos.spacing();
    assert!((sp[0] - 5.0).abs() < 1e-4 && (sp[1] - 0.781).abs() < 1e-3, "{sp:?}");
    // Labels are read as whole numbers.
    let l = io::read_labels(&ds.join("labelsTr/tsabd.nii.gz")).unwrap();
    assert!(*l.data.iter().max().unwrap() <= 13);
}

#[test]
fn canonical_index_and_file_index_name_the_same_world_point() {
    let Some(data) = shared_data() else { return };
    for rel in [
        "Dataset001_TSAbdomen/imagesTr/tsabd_0000.nii.gz",
        "Dataset001_TSAbdomen/imagesUnlabeled/chest_aorta_0000.nii.gz",
        "metrics/amos0013_reference.nii.gz",
    ] {
        let g = io::read_header(&data.join(rel)).unwrap();
        let c2f = g.orientation.canonical_to_file(g.file_shape);
        let [nz, ny, nx] = g.shape();
        for idx in [[0.0, 0.0, 0.0], [nz as f64 - 1.0, 2.0, nx as f64 - 1.0], [3.0, ny as f64 - 1.0, 5.0]] {
            let world_canonical = apply(&g.affine(), idx);
            let world_file = apply(&g.file_affine, apply(&c2f, idx));
            for k in 0..3 {
                assert!((world_canonical[k] - world_file[k]).abs() < 1e-6);
            }
        }
        // Canonical axes point right, anterior, superior (nibabel's closest canonical).
        let a = g.affine();
        assert!(a[0][2] > 0.0 && a[1][1] > 0.0 && a[2][0] > 0.0, "{rel}: {a:?}");
    }
}

#[test]
fn ras_and_lps_files_of_the_same_scan_read_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Array3::from_shape_fn((6, 7, 8), |(z, y, x)| (z * 100 + y * 10 + x) as i16);
    let mut read = Vec::new();
    for (name, ras) in [("ras.nii.gz", true), ("lps.nii", false)] {
        let g = Geometry::new_with_layout([6, 7, 8], [2.5, 0.8, 0.8], [10.0, -20.0, 30.0], ras);
        let p = tmp.path().join(name);
        io::write_volume(&p, data.view(), &g).unwrap();
        let v = io::read_image(&p).unwrap();
        assert_eq!(v.geometry.axis_codes(), if ras { "RAS" } else { "LPS" });
        read.push(v);
    }
    assert_eq!(read[0].data, read[1].data);
    assert_eq!(read[0].data, data.mapv(f32::from));
    assert!(max_abs_diff(&read[0].geometry.affine(), &read[1].geometry.affine()) < 1e-5);
    // The centre voxel sits where it was put.
    let c = apply(&read[0].geometry.affine(), [2.5, 3.0, 3.5]);
    assert!((c[0] - 10.0).abs() < 1e-4 && (c[1] + 20.0).abs() < 1e-4 && (c[2] - 30.0).abs() < 1e-4, "{c:?}");
}

fn write_typed<T: nifti::DataElement + bytemuck::Pod>(dir: &Path, name: &str, data: &Array3<T>) -> std::path::PathBuf {
    let g = Geometry::new_with_layout([3, 4, 5], [1.0, 1.0, 1.0], [0.0; 3], false);
    let p = dir.join(name);
    io::write_volume(&p, data.view(), &g).unwrap();
    p
}

#[test]
fn every_supported_datatype_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f = |z: usize, y: usize, x: usize| (z * 20 + y * 5 + x) as f64;
    let expected = Array3::from_shape_fn((3, 4, 5), |(z, y, x)| f(z, y, x) as f32);
    let paths = [
        (write_typed(d, "u8.nii.gz", &Array3::from_shape_fn((3, 4, 5), |(z, y, x)| f(z, y, x) as u8)), 2),
        (write_typed(d, "i16.nii.gz", &Array3::from_shape_fn((3, 4, 5), |(z, y, x)| f(z, y, x) as i16 - 1000)), 4),
        (write_typed(d, "i32.nii", &Array3::from_shape_fn((3, 4, 5), |(z, y, x)| f(z, y, x) as i32)), 8),
        (write_typed(d, "u16.nii.gz", &Array3::from_shape_fn((3, 4, 5), |(z, y, x)| f(z, y, x) as u16)), 512),
        (write_typed(d, "f32.nii.gz", &expected), 16),
        (write_typed(d, "f64.nii.gz", &Array3::from_shape_fn((3, 4, 5), |(z, y, x)| f(z, y, x))), 64),
    ];
    for (p, code) in paths {
        let v = io::read_image(&p).unwrap();
        assert_eq!(v.geometry.header.datatype, code, "{}", p.display());
        let want = if code == 4 { expected.mapv(|x| x - 1000.0) } else { expected.clone() };
        assert_eq!(v.data, want, "{}", p.display());
    }
}

#[test]
fn scl_slope_and_inter_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = Array3::from_shape_fn((3, 4, 5), |(z, y, x)| (z * 20 + y * 5 + x) as i16);
    let p = write_typed(tmp.path(), "scaled.nii", &raw);
    // scl_slope and scl_inter sit at bytes 112 and 116 of the NIfTI-1 header.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[112..116].copy_from_slice(&2.0f32.to_le_bytes());
    bytes[116..120].copy_from_slice(&(-1024.0f32).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let v = io::read_image(&p).unwrap();
    assert_eq!(v.data, raw.mapv(|r| r as f32 * 2.0 - 1024.0));
}

#[test]
fn non_integer_or_out_of_range_labels_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vals = Array3::<f32>::zeros((3, 4, 5));
    vals[[1, 1, 1]] = 2.5;
    let p = write_typed(tmp.path(), "frac.nii.gz", &vals);
    let e = io::read_labels(&p).unwrap_err().to_string();
    assert!(e.contains("frac.nii.gz") && e.contains("label value 2.5"), "{e}");
    vals[[1, 1, 1]] = 300.0;
    let p = write_typed(tmp.path(), "big.nii.gz", &vals);
    let e = io::read_labels(&p).unwrap_err().to_string();
    assert!(e.contains("big.nii.gz") && e.contains("label value 300"), "{e}");
}

#[test]
fn unreadable_files_name_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.nii.gz");
    let e = io::read_image(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.nii.gz: file not found"), "{e}");
    let junk = tmp.path().join("junk.nii");
    std::fs::write(&junk, vec![7u8; 400]).unwrap();
    let e = io::read_image(&junk).unwrap_err().to_string();
    assert!(e.starts_with(&junk.display().to_string()), "{e}");
    let raw = Array3::<i16>::zeros((3, 4, 5));
    let p = write_typed(tmp.path(), "short.nii", &raw);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = io::read_image(&p).unwrap_err().to_string();
    assert!(e.contains("short.nii: file is truncated"), "{e}");
}

#[test]
fn writing_is_atomic_and_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Geometry::new_with_layout([3, 4, 5], [1.0; 3], [0.0; 3], true);
    let wrong = Array3::<u8>::zeros((3, 4, 6));
    let p = tmp.path().join("x.nii.gz");
    let e = io::write_volume(&p, wrong.view(), &g).unwrap_err().to_string();
    assert!(e.contains("x.nii.gz") && e.contains("cannot write"), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // Writing into a missing folder fails cleanly too.
    let p = tmp.path().join("no/such/dir/x.nii.gz");
    assert!(io::write_volume(&p, Array3::<u8>::zeros((3, 4, 5)).view(), &g).is_err());
    assert_eq!(axis_codes(&g.file_affine), "RAS");
}
