//! Issue 13 (reliability), the input/output items: hostile files in a dataset (a FIFO, a header
//! that crashes the NIfTI crate, NaN voxels or scaling, no usable voxel size, odd folders and
//! names), write errors worded as writes, and `verify` against the manifest. Each bad input is
//! refused with the file and the problem; children run under a timeout, so a hang fails.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::copy_dir;
use cps3d::io::{self, Geometry};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the binary (through `sh -c` when `shell_prefix` is set) and returns (success, stdout +
/// stderr); kills it and fails the test after [`TIMEOUT`].
fn run_guarded(args: &[&str], shell_prefix: Option<&str>) -> (bool, String) {
    let bin = env!("CARGO_BIN_EXE_cps3d");
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = match shell_prefix {
        None => {
            let mut c = Command::new(bin);
            c.args(args);
            c
        }
        Some(prefix) => {
            let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("{prefix} exec '{bin}' {}", quoted.join(" ")));
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cps3d {args:?} did not finish within {TIMEOUT:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    for p in [&out_path, &err_path] {
        std::fs::File::open(p).unwrap().read_to_string(&mut text).unwrap();
    }
    assert!(!text.contains("panicked"), "a panic is no error message: {text}");
    (status.success(), text)
}

fn run(args: &[&str]) -> (bool, String) {
    run_guarded(args, None)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small synthetic dataset: 2 labeled and 2 unlabeled phantoms.
fn dataset(dir: &Path, file_ending: &str) -> PathBuf {
    let cfg = cps3d::synth::SynthConfig {
        labeled: 2,
        unlabeled: 2,
        shape: [12, 24, 24],
        seed: 3,
        file_ending: file_ending.into(),
        ..Default::default()
    };
    let d = dir.join("raw");
    cps3d::synth::write_dataset(&cfg, &d, |_| {}).unwrap();
    d
}

/// fingerprint + plan of an intact dataset, so that preprocess can run after breaking it.
fn plan_for(raw: &Path, dir: &Path) -> PathBuf {
    let (fp, plans) = (dir.join("fp.json"), dir.join("plans.json"));
    let (ok, text) = run(&["fingerprint", s(raw), "-o", s(&fp)]);
    assert!(ok, "{text}");
    let (ok, text) = run(&["plan", s(&fp), "-o", s(&plans), "--patch-size", "8,16,16"]);
    assert!(ok, "{text}");
    plans
}

const VICTIM: &str = "imagesUnlabeled/unlabeled_00001_0000";

/// `dataset check`, `fingerprint` and `preprocess` all refuse the victim with `needle`, and go on
/// with the other cases.
fn refused_everywhere(raw: &Path, plans: &Path, victim: &Path, needle: &str) {
    let name = victim.display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let (ok, text) = run(&["dataset", "check", s(raw), "-j", "2"]);
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("{name}: {needle}")) || text.contains(&name) && text.contains(needle), "{text}");
    // The other files were read.
    assert!(text.contains("unlabeled_00000_0000"), "{text}");

    let fp = tmp.path().join("fp.json");
    let (ok, text) = run(&["fingerprint", s(raw), "-o", s(&fp), "-j", "2"]);
    assert!(!ok, "{text}");
    assert!(text.contains(&name) && text.contains(needle), "{text}");
    assert!(text.contains("2 labeled + 1 unlabeled cases"), "{text}");

    let out = tmp.path().join("shards");
    let (ok, text) = run(&["preprocess", s(raw), "-p", s(plans), "-o", s(&out), "-j", "2"]);
    assert!(!ok, "{text}");
    assert!(text.contains(&name) && text.contains(needle), "{text}");
    for id in ["phantom_0000", "phantom_0001", "unlabeled_00000"] {
        assert!(out.join(format!("{id}.shard")).is_file(), "{id} should be preprocessed: {text}");
    }
}

#[test]
fn a_fifo_named_like_a_case_file_is_refused_not_waited_on() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = dataset(tmp.path(), ".nii.gz");
    let plans = plan_for(&raw, tmp.path());
    let victim = raw.join(format!("{VICTIM}.nii.gz"));
    std::fs::remove_file(&victim).unwrap();
    assert!(Command::new("mkfifo").arg(&victim).status().unwrap().success());
    refused_everywhere(&raw, &plans, &victim, "not a regular file (a FIFO)");
}

/// Rewrites a `.nii.gz` file's header through `patch(header bytes)`.
fn patch_gz_header(path: &Path, patch: impl FnOnce(&mut [u8])) {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut bytes).unwrap();
    patch(&mut bytes[..348]);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).unwrap();
    std::fs::write(path, enc.finish().unwrap()).unwrap();
}

fn put_i16(h: &mut [u8], at: usize, v: i16) {
    h[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_f32(h: &mut [u8], at: usize, v: f32) {
    h[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

// NIfTI-1 header offsets.
const DATATYPE: usize = 70;
const BITPIX: usize = 72;
const PIXDIM: usize = 76;
const VOX_OFFSET: usize = 108;
const SCL_SLOPE: usize = 112;
const QFORM_CODE: usize = 252;
const SFORM_CODE: usize = 254;
const SROW_X: usize = 280;
const SROW_Y: usize = 296;
const SROW_Z: usize = 312;

#[test]
fn bitpix_disagreeing_with_the_datatype_names_the_file_instead_of_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = dataset(tmp.path(), ".nii.gz");
    let plans = plan_for(&raw, tmp.path());
    let victim = raw.join(format!("{VICTIM}.nii.gz"));
    let datatype = io::read_header(&victim).unwrap().header.datatype;
    patch_gz_header(&victim, |h| put_i16(h, BITPIX, 8));
    let e = io::read_image(&victim).unwrap_err().to_string();
    assert!(e.contains(&victim.display().to_string()) && e.contains("bitpix 8"), "{e}");
    assert!(e.contains(&format!("datatype {datatype}")), "{e}");
    refused_everywhere(&raw, &plans, &victim, "bitpix 8");
}

#[test]
fn nan_scaling_and_non_finite_voxels_are_refused_with_the_file_and_voxel() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = dataset(tmp.path(), ".nii.gz");
    let plans = plan_for(&raw, tmp.path());
    let victim = raw.join(format!("{VICTIM}.nii.gz"));

    // scl_slope = NaN would turn every voxel into NaN (fingerprint dropped them silently).
    let original = std::fs::read(&victim).unwrap();
    for (slope, word) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        patch_gz_header(&victim, |h| put_f32(h, SCL_SLOPE, slope));
        let e = io::read_image(&victim).unwrap_err().to_string();
        assert!(e.contains(&victim.display().to_string()) && e.contains(&format!("scl_slope {word}")), "{e}");
        std::fs::write(&victim, &original).unwrap();
    }
    patch_gz_header(&victim, |h| put_f32(h, SCL_SLOPE, f32::NAN));
    refused_everywhere(&raw, &plans, &victim, "scl_slope NaN");

    // An infinite voxel in a float image: the file and the first bad voxel are named.
    std::fs::write(&victim, &original).unwrap();
    let mut v = io::read_image(&victim).unwrap();
    v.data[[3, 4, 5]] = f32::INFINITY;
    v.data[[7, 1, 2]] = f32::NAN;
    io::write_volume(&victim, v.data.view(), &v.geometry).unwrap();
    // The first in the file's own order (i fastest), as NIfTI tools index it.
    let file = io::nifti::to_file_layout(v.data.view(), &v.geometry.orientation);
    let (ni, nj, nk) = file.dim();
    let first = (0..nk)
        .flat_map(|k| (0..nj).flat_map(move |j| (0..ni).map(move |i| (i, j, k))))
        .find(|&(i, j, k)| !file[[i, j, k]].is_finite())
        .unwrap();
    let value = file[[first.0, first.1, first.2]];
    let e = io::read_image(&victim).unwrap_err().to_string();
    assert!(e.contains("1 NaN and 1 infinite voxel(s)"), "{e}");
    assert!(e.contains(&format!("first at voxel (i, j, k) = {first:?} of the file: {value}")), "{e}");
    // predict reads through Case::load: the same refusal.
    let case = cps3d::dataset::Case { id: "u".into(), images: vec![victim.clone()], label: None };
    let e = case.load().err().expect("a case with an infinite voxel is refused").to_string();
    assert!(e.contains(&victim.display().to_string()) && e.contains("infinite"), "{e}");
    refused_everywhere(&raw, &plans, &victim, "1 NaN and 1 infinite voxel(s)");
}

/// An uncompressed NIfTI written from a tiny volume, then patched.
fn patched_nii(dir: &Path, name: &str, patch: impl FnOnce(&mut [u8])) -> PathBuf {
    let p = dir.join(name);
    let g = Geometry::new_with_layout([4, 5, 6], [2.0, 1.0, 1.0], [0.0; 3], true);
    let data = ndarray::Array3::<i16>::from_elem([4, 5, 6], 7);
    io::write_volume(&p, data.view(), &g).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    patch(&mut bytes[..348]);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn voxel_sizes_from_pixdim_alone_must_be_positive() {
    let tmp = tempfile::tempdir().unwrap();
    let no_transform = |h: &mut [u8]| {
        put_i16(h, QFORM_CODE, 0);
        put_i16(h, SFORM_CODE, 0);
    };
    let ok = patched_nii(tmp.path(), "ok.nii", no_transform);
    assert_eq!(io::read_header(&ok).unwrap().spacing(), [2.0, 1.0, 1.0]);
    for (i, bad) in [0.0f32, -1.5, f32::NAN].into_iter().enumerate() {
        let p = patched_nii(tmp.path(), &format!("bad{i}.nii"), |h| {
            no_transform(h);
            put_f32(h, PIXDIM + 4 * 2, bad);
        });
        for e in [io::read_header(&p).unwrap_err(), io::read_image(&p).unwrap_err()] {
            let e = e.to_string();
            assert!(e.contains(&p.display().to_string()) && e.contains("pixdim"), "{e}");
            assert!(e.contains("no sform or qform"), "{e}");
        }
    }
}

#[test]
fn header_fields_are_checked_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    type Patch = Box<dyn Fn(&mut [u8])>;
    let cases: Vec<(&str, Patch, &str)> = vec![
        ("bitpix.nii", Box::new(|h| put_i16(h, BITPIX, 32)), "bitpix 32"),
        ("datatype.nii", Box::new(|h| put_i16(h, DATATYPE, 1234)), "datatype"),
        ("offset.nii", Box::new(|h| put_f32(h, VOX_OFFSET, 100.0)), "vox_offset"),
        ("offset_nan.nii", Box::new(|h| put_f32(h, VOX_OFFSET, f32::NAN)), "vox_offset"),
        ("dim.nii", Box::new(|h| put_i16(h, 42, -3)), "dim"),
        ("long.nii", Box::new(|h| put_i16(h, 46, 400)), "truncated"),
        // A .hdr/.img pair's header in a .nii: the crate went looking for a sibling .img.
        ("pair.nii", Box::new(|h| h[344..348].copy_from_slice(b"ni1\0")), "a .hdr/.img pair's header"),
        ("magic.nii", Box::new(|h| h[344..348].copy_from_slice(b"abc\0")), "bad magic"),
    ];
    for (name, patch, needle) in cases {
        let p = patched_nii(tmp.path(), name, patch);
        let e = io::read_image(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains(needle), "{name}: {e}");
    }
}

#[test]
fn an_images_unlabeled_that_is_no_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = dataset(tmp.path(), ".nii.gz");
    let gone = tmp.path().join("gone");
    type Make<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Make)> = vec![
        ("a dangling symbolic link", Box::new(|iu| std::os::unix::fs::symlink(&gone, iu).unwrap())),
        ("a regular file", Box::new(|iu| std::fs::write(iu, b"oops").unwrap())),
    ];
    for (what, make) in cases {
        let d = tmp.path().join(what.replace(' ', "_"));
        copy_dir(&raw, &d);
        let iu = d.join("imagesUnlabeled");
        std::fs::remove_dir_all(&iu).unwrap();
        make(&iu);
        let (ok, text) = run(&["dataset", "check", s(&d)]);
        assert!(!ok, "{what}: {text}");
        assert!(text.contains(&format!("{}: {what}", iu.display())), "{what}: {text}");
        let (ok, text) = run(&["fingerprint", s(&d), "-o", s(&tmp.path().join("fp.json"))]);
        assert!(!ok && text.contains(what), "{what}: {text}");
    }
}

#[test]
fn a_non_utf8_file_name_is_reported_as_such() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let raw = dataset(tmp.path(), ".nii.gz");
    let good = raw.join("imagesUnlabeled/unlabeled_00000_0000.nii.gz");
    let odd = raw.join("imagesUnlabeled").join(std::ffi::OsStr::from_bytes(b"caf\xe9_0000.nii.gz"));
    std::fs::copy(&good, &odd).unwrap();
    let (ok, text) = run(&["dataset", "check", s(&raw)]);
    assert!(!ok, "{text}");
    assert!(text.contains("caf\u{FFFD}_0000.nii.gz: file name is not valid UTF-8"), "{text}");
    assert!(!text.contains("not found"), "{text}");
}

#[test]
fn write_errors_say_cannot_write() {
    let tmp = tempfile::tempdir().unwrap();
    let enospc = cps3d::error::Error::write("out/plans.json", std::io::Error::from_raw_os_error(28));
    assert_eq!(enospc.to_string(), "out/plans.json: cannot write: No space left on device (os error 28)");

    // The NIfTI writer and the atomic JSON writer, into a folder that does not exist.
    let missing = tmp.path().join("no/such/folder");
    let g = Geometry::new_with_layout([2, 2, 2], [1.0; 3], [0.0; 3], true);
    let p = missing.join("x.nii.gz");
    let e = io::write_volume(&p, ndarray::Array3::<u8>::zeros([2, 2, 2]).view(), &g).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: cannot write: ", p.display())), "{e}");
    let p = missing.join("x.json");
    let e = cps3d::util::write_json_atomic(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: cannot write: ", p.display())), "{e}");

    // A full disk, as the file size limit gives it (EFBIG instead of ENOSPC), end to end: the
    // signal it would send is ignored, so the write itself fails.
    let limit = Some("trap '' XFSZ; ulimit -f 1;");
    let out = tmp.path().join("synth");
    let (ok, text) =
        run_guarded(&["synth", s(&out), "--labeled", "1", "--unlabeled", "0", "--shape", "8,16,16"], limit);
    assert!(!ok, "{text}");
    assert!(text.contains("cannot write") && text.contains("File too large"), "{text}");
    assert!(!text.contains("cannot read"), "{text}");
    let raw = dataset(tmp.path(), ".nii.gz");
    let fp = tmp.path().join("fp.json");
    let (ok, text) = run_guarded(&["fingerprint", s(&raw), "-o", s(&fp)], limit);
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("{}: cannot write: File too large", fp.display())), "{text}");
}

/// Runs `verify` on a copy of `shards` broken by `breakage`.
fn verify_broken(shards: &Path, dest: &Path, breakage: impl FnOnce(&Path)) -> (bool, String) {
    copy_dir(shards, dest);
    breakage(dest);
    run(&["verify", s(dest)])
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn verify_checks_shards_against_the_manifest_and_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg =
        cps3d::synth::SynthConfig { labeled: 2, unlabeled: 1, shape: [12, 24, 24], seed: 4, ..Default::default() };
    let shards = common::preprocessed(tmp.path(), cfg, &["--patch-size", "8,16,16"]);
    let (ok, text) = run(&["verify", s(&shards)]);
    assert!(ok, "{text}");
    assert!(text.contains("3 shard(s) checked, 0 bad"), "{text}");
    assert!(text.contains("manifest.json: 3 case(s)"), "{text}");

    // A symlink loop inside: the walk ends and counts each shard once.
    let (ok, text) = verify_broken(&shards, &tmp.path().join("loop"), |d| {
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink(".", d.join("sub/again")).unwrap();
        std::os::unix::fs::symlink("..", d.join("sub/up")).unwrap();
    });
    assert!(ok && text.contains("3 shard(s) checked, 0 bad"), "{text}");

    let (ok, text) = verify_broken(&shards, &tmp.path().join("extra"), |d| {
        std::fs::copy(d.join("phantom_0000.shard"), d.join("stray.shard")).unwrap();
    });
    assert!(!ok, "{text}");
    assert!(text.contains("stray.shard: not listed in manifest.json"), "{text}");

    let (ok, text) = verify_broken(&shards, &tmp.path().join("missing"), |d| {
        std::fs::remove_file(d.join("phantom_0001.shard")).unwrap();
    });
    assert!(!ok, "{text}");
    assert!(text.contains("phantom_0001.shard: missing: manifest.json lists case \"phantom_0001\""), "{text}");

    let (ok, text) = verify_broken(&shards, &tmp.path().join("shape"), |d| {
        edit_json(&d.join("manifest.json"), |m| m["cases"][0]["shape"] = serde_json::json!([1, 2, 3]));
    });
    assert!(!ok, "{text}");
    assert!(text.contains("phantom_0000.shard: shape") && text.contains("manifest.json says [1, 2, 3]"), "{text}");

    // Another plan's spacing (as a second preprocess run with another plan leaves it).
    let (ok, text) = verify_broken(&shards, &tmp.path().join("spacing"), |d| {
        edit_json(&d.join("plans.json"), |p| {
            p["configurations"]["3d_fullres"]["spacing"] = serde_json::json!([9.0, 9.0, 9.0])
        });
        edit_json(&d.join("manifest.json"), |m| m["spacing"] = serde_json::json!([9.0, 9.0, 9.0]));
    });
    assert!(!ok, "{text}");
    assert!(text.contains("phantom_0000.shard: made for target spacing"), "{text}");

    let (ok, text) = verify_broken(&shards, &tmp.path().join("plan"), |d| {
        edit_json(&d.join("plans.json"), |p| {
            p["configurations"]["3d_fullres"]["spacing"] = serde_json::json!([9.0, 9.0, 9.0])
        });
    });
    assert!(!ok, "{text}");
    assert!(text.contains("plans.json: configuration 3d_fullres has spacing [9.0, 9.0, 9.0]"), "{text}");

    // A manifest naming a shard outside its folder: a real shard lies there, and was read.
    let outside = tmp.path().join("outside");
    let (ok, text) = verify_broken(&shards, &outside, |d| {
        std::fs::rename(d.join("phantom_0001.shard"), tmp.path().join("elsewhere.shard")).unwrap();
        edit_json(&d.join("manifest.json"), |m| m["cases"][1]["shard"] = serde_json::json!("../elsewhere.shard"));
    });
    assert!(!ok, "{text}");
    let needle = "case phantom_0001: shard \"../elsewhere.shard\" is not a file name in the shard folder";
    assert!(text.contains(needle), "{text}");
    let (ok, text) =
        run(&["train", s(&outside), "-o", s(&tmp.path().join("run")), "--epochs", "1", "--iterations", "1"]);
    assert!(!ok && text.contains(needle), "{text}");
}

/// A label map with distinct values everywhere, written by the project's writer.
fn distinct_labels(path: &Path) -> ndarray::Array3<u8> {
    let g = Geometry::new_with_layout([4, 5, 6], [2.0, 1.0, 1.0], [0.0; 3], true);
    let data = ndarray::Array3::<u8>::from_shape_fn([4, 5, 6], |(z, y, x)| (z * 30 + y * 6 + x) as u8);
    io::write_volume(path, data.view(), &g).unwrap();
    io::read_labels(path).unwrap().data
}

/// The uncompressed bytes of a `.nii` or `.nii.gz` file, and writing them back the same way.
fn nifti_bytes(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    if !s(path).ends_with(".gz") {
        return raw;
    }
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut bytes).unwrap();
    bytes
}

fn write_nifti_bytes(path: &Path, bytes: &[u8]) {
    if s(path).ends_with(".gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        std::fs::write(path, enc.finish().unwrap()).unwrap();
    } else {
        std::fs::write(path, bytes).unwrap();
    }
}

#[test]
fn voxels_are_read_from_vox_offset_past_padding_and_an_offset_past_the_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["padded.nii", "padded.nii.gz"] {
        let path = dir.path().join(name);
        let expected = distinct_labels(&path);
        // Valid NIfTI-1 (nibabel reads it): 48 bytes of padding after the 4-byte extension
        // flag (0: no extension), the data from byte 400.
        let bytes = nifti_bytes(&path);
        let voxel_start = f32::from_le_bytes(bytes[VOX_OFFSET..VOX_OFFSET + 4].try_into().unwrap()) as usize;
        let mut padded = bytes[..voxel_start].to_vec();
        padded.resize(400, 0);
        put_f32(&mut padded, VOX_OFFSET, 400.0);
        padded.extend_from_slice(&bytes[voxel_start..]);
        write_nifti_bytes(&path, &padded);
        let read = io::read_labels(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(read.data, expected, "{name}: voxels must be read from vox_offset 400");

        // An offset whose voxels would run past the end of the data.
        put_f32(&mut padded, VOX_OFFSET, 4000.0);
        write_nifti_bytes(&path, &padded);
        let e = io::read_labels(&path).unwrap_err().to_string();
        // .nii: the header check sees the file's length; .nii.gz: the reader, at the end of the stream.
        let why = if name.ends_with(".gz") { "past the end of the data" } else { "file is truncated" };
        assert!(e.contains(name) && e.contains(why) && e.contains("4000"), "{e}");
    }
}

#[test]
fn a_gzip_stream_whose_crc_does_not_match_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.nii.gz");
    distinct_labels(&path);
    // The stored CRC32 (the trailer's first 4 bytes) no longer matches the data: gzip -t
    // fails, and so must the reader, which otherwise stops after the voxel bytes.
    let mut raw = std::fs::read(&path).unwrap();
    let crc = raw.len() - 8;
    raw[crc] ^= 0x01;
    std::fs::write(&path, &raw).unwrap();
    let e = io::read_labels(&path).unwrap_err().to_string();
    assert!(e.contains("labels.nii.gz") && e.contains("corrupt gzip stream"), "{e}");
    // A wrong length in the trailer is found the same way.
    let bad_member = dir.path().join("two_members.nii.gz");
    distinct_labels(&bad_member);
    let mut raw = std::fs::read(&bad_member).unwrap();
    let isize_at = raw.len() - 4;
    raw[isize_at] ^= 0x10; // the length field of the trailer
    std::fs::write(&bad_member, &raw).unwrap();
    let e = io::read_labels(&bad_member).unwrap_err().to_string();
    assert!(e.contains("two_members.nii.gz") && e.contains("corrupt gzip stream"), "{e}");
}

#[test]
fn absurd_voxel_sizes_are_refused_at_check_time_and_far_ones_when_preprocessing() {
    let tmp = tempfile::tempdir().unwrap();
    // Pixdim alone: the ends of the accepted range pass (as float32), beyond them not.
    let no_transform = |h: &mut [u8]| {
        put_i16(h, QFORM_CODE, 0);
        put_i16(h, SFORM_CODE, 0);
    };
    for (i, (v, ok)) in [(1e-4f32, true), (1e4, true), (1e-30, false), (2e4, false)].into_iter().enumerate() {
        let p = patched_nii(tmp.path(), &format!("pixdim{i}.nii"), |h| {
            no_transform(h);
            put_f32(h, PIXDIM + 4, v);
        });
        match io::read_header(&p) {
            Ok(g) => assert!(ok && (g.spacing()[2] - v as f64).abs() <= 1e-6 * v as f64, "{v}"),
            Err(e) => {
                let e = e.to_string();
                assert!(!ok, "{v}: {e}");
                assert!(e.contains(&p.display().to_string()) && e.contains(&format!("voxel size {v:e} mm")), "{e}");
                assert!(e.contains("pixdim gives voxel sizes"), "{e}");
            }
        }
    }
    // A 1e30 mm voxel in a dataset's sform: check, fingerprint and preprocess refuse the file
    // (preprocess used to panic on "capacity overflow") and go on with the others.
    let raw = dataset(tmp.path(), ".nii.gz");
    let plans = plan_for(&raw, tmp.path());
    let victim = raw.join(format!("{VICTIM}.nii.gz"));
    patch_gz_header(&victim, |h| put_f32(h, SROW_Y + 4, 1e30));
    refused_everywhere(&raw, &plans, &victim, "voxel size 1e30 mm is outside");

    // 9 m voxels are (barely) a scan's, but resampled to the plan's ~15 mm they would need
    // terabytes: preprocess refuses that case with its numbers, the others are done.
    let raw = dataset(&tmp.path().join("far"), ".nii.gz");
    let victim = raw.join(format!("{VICTIM}.nii.gz"));
    patch_gz_header(&victim, |h| {
        for (row, col) in [(SROW_X, 0), (SROW_Y, 1), (SROW_Z, 2)] {
            put_f32(h, row + 4 * col, 9000.0);
        }
    });
    let (ok, text) = run(&["dataset", "check", s(&raw)]);
    assert!(ok, "9000 mm is a voxel size: {text}");
    let out = tmp.path().join("far_shards");
    let (ok, text) = run(&["preprocess", s(&raw), "-p", s(&plans), "-o", s(&out), "-j", "1"]);
    assert!(!ok, "{text}");
    assert!(text.contains(&victim.display().to_string()) && text.contains("unlabeled_00001"), "{text}");
    assert!(text.contains("of memory") && text.contains("coarser --target-spacing"), "{text}");
    for id in ["phantom_0000", "phantom_0001", "unlabeled_00000"] {
        assert!(out.join(format!("{id}.shard")).is_file(), "{id} should be preprocessed: {text}");
    }
}
