//! Inference against nnU-Net's own predictor (`scripts/reference/inference.py` wrote
//! `tests/golden/inference.json` from the nnU-Net model folder that `cps3d export
//! --nnunet` makes of the committed tiny model in `tests/golden/inference/model`):
//! - the exported checkpoints are byte for byte the files PyTorch loaded;
//! - sliding-window logits (one network; both networks with mirroring) equal nnU-Net's
//!   `predict_sliding_window_return_logits`;
//! - whole-scan predictions of a RAS and an LPS file (both siblings, no mirroring,
//!   step 0.5, no post-processing) agree with `nnUNetPredictor.predict_from_files`;
//! - the `--save-probabilities` files carry nnU-Net's probabilities, and nnU-Net's own
//!   ensembling turns our `.npz` + `.pkl` into our label map.
//!
//! With `CPS3D_WRITE_GOLDEN_INFERENCE=1` the test (re)writes the inputs the script
//! reads into `tests/golden/inference/` (not committed) instead of checking.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use cps3d::dataset::Case;
use cps3d::inference::{predict_case, sliding, Model, PredictOptions};
use cps3d::io::{self, Geometry};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

/// `inference` (the 3D model) or `inference_2d` (the 2D model): the committed model,
/// the folder the script reads and the golden file's name.
fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The fixed network input of the logits check (same formula in the script).
fn volume(shape: [usize; 3]) -> Vec<f32> {
    let mut v = Vec::with_capacity(shape.iter().product());
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let (z, y, x) = (z as f64, y as f64, x as f64);
                v.push(
                    (1.5 * (0.21 * z + 0.13 * y).sin() * (0.17 * x).cos() + 0.3 * (0.05 * x * y).cos() - 0.4) as f32,
                );
            }
        }
    }
    v
}

const VOLUME: [usize; 3] = [22, 44, 46];

/// A phantom written once as RAS and once as LPS (the same scan).
fn write_inputs(dir: &Path) -> Vec<PathBuf> {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = cps3d::synth::SynthConfig {
        labeled: 1,
        unlabeled: 0,
        shape: [24, 48, 48],
        seed: 77,
        workers: 1,
        // The phantom the goldens were recorded on (before fat planes).
        fat_planes: false,
        ..Default::default()
    };
    cps3d::synth::write_dataset(&cfg, tmp.path(), |_| {}).unwrap();
    let img = io::read_image(&tmp.path().join("imagesTr/phantom_0000_0000.nii.gz")).unwrap();
    let data = img.data.mapv(|v| v as i16);
    std::fs::create_dir_all(dir).unwrap();
    let mut paths = Vec::new();
    for (name, ras) in [("ras_0000.nii.gz", true), ("lps_0000.nii.gz", false)] {
        let g = Geometry::new_with_layout(img.geometry.shape(), img.geometry.spacing(), [4.0, -12.0, 30.0], ras);
        let p = dir.join(name);
        io::write_volume(&p, data.view(), &g).unwrap();
        paths.push(p);
    }
    paths
}

fn golden(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn decode_f32(b64: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn decode_labels(b64: &str) -> Vec<u8> {
    let z = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(&z[..]).read_to_end(&mut out).unwrap();
    out
}

/// Our logits at the golden positions: `[position][class]`.
fn our_logits(model: &Model, mirror: bool, positions: &[[usize; 3]], classes: usize) -> Vec<Vec<f32>> {
    let tile = model.tile();
    let [z, y, x] = VOLUME.map(|v| v as i64);
    let vol = Tensor::from_slice(&volume(VOLUME)).reshape([1, z, y, x]);
    let logits = sliding::sliding_window(&vol, tile, 0.5, classes, 2, |t| model.logits(t, mirror)).to_kind(Kind::Float);
    positions
        .iter()
        .map(|p| {
            (0..classes)
                .map(|k| logits.double_value(&[k as i64, p[0] as i64, p[1] as i64, p[2] as i64]) as f32)
                .collect()
        })
        .collect()
}

#[test]
fn inference_matches_nnunets_predictor_on_our_exported_model() {
    matches_nnunets_predictor("inference", false);
}

/// The 2D configuration: nnU-Net predicts each slice with in-plane tiles and mirrors
/// y and x only.
#[test]
fn inference_2d_matches_nnunets_predictor_on_our_exported_model() {
    matches_nnunets_predictor("inference_2d", true);
}

fn matches_nnunets_predictor(name: &str, two_d: bool) {
    let golden_dir = || golden_dir(name);
    let model_dir = golden_dir().join("model");
    let tmp = tempfile::tempdir().unwrap();
    let write = std::env::var_os("CPS3D_WRITE_GOLDEN_INFERENCE").is_some();
    let export = if write { golden_dir().join("nnunet_model") } else { tmp.path().join("nnunet_model") };
    let inputs_dir = if write { golden_dir().join("inputs") } else { tmp.path().join("inputs") };
    cps3d::interop::nnunet::export_model_folder(&model_dir, &export).unwrap();
    let inputs = write_inputs(&inputs_dir);
    let ours = if write { golden_dir().join("ours") } else { tmp.path().join("ours") };
    std::fs::create_dir_all(&ours).unwrap();
    let ensemble = Model::load(&model_dir, "final", Device::Cpu, true).unwrap();
    assert_eq!(ensemble.is_2d(), two_d);
    let opts = PredictOptions { step: 0.5, largest_component: false, save_probabilities: true, ..Default::default() };
    for input in &inputs {
        let id = input.file_name().unwrap().to_string_lossy().trim_end_matches("_0000.nii.gz").to_string();
        let case = Case { id: id.clone(), images: vec![input.clone()], label: None };
        predict_case(&ensemble, &case, &ours.join(format!("{id}.nii.gz")), &opts).unwrap();
    }
    if write {
        // A .gitignore keeps the generated folders out of commits.
        std::fs::write(golden_dir().join(".gitignore"), "nnunet_model/\ninputs/\nours/\n").unwrap();
        eprintln!("wrote the inputs of scripts/reference/inference.py into {}", golden_dir().display());
        return;
    }
    let g = golden(name);
    // 1. The exported folder is exactly what nnU-Net loaded.
    for (rel, want) in g["sha256"].as_object().unwrap() {
        assert_eq!(sha256(&export.join(rel)), want.as_str().unwrap(), "{rel} differs from the file nnU-Net read");
    }
    for input in &inputs {
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(sha256(input), g["inputs"][&name].as_str().unwrap(), "{name}");
    }
    // 2. Sliding-window logits.
    let classes = g["classes"].as_u64().unwrap() as usize;
    let positions: Vec<[usize; 3]> =
        g["positions"].as_array().unwrap().iter().map(|p| [0, 1, 2].map(|a| p[a].as_u64().unwrap() as usize)).collect();
    let net0 = Model::load_single(&model_dir, "net0", Device::Cpu).unwrap();
    for (key, model, mirror) in [("logits_fold0", &net0, false), ("logits_folds01_mirrored", &ensemble, true)] {
        let got = our_logits(model, mirror, &positions, classes);
        let max_diff = |want: &[f32]| -> (f32, f32) {
            let mut d = 0.0f32;
            let mut m = 0.0f32;
            for (p, row) in got.iter().enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    d = d.max((v - want[p * classes + k]).abs());
                    m = m.max(want[p * classes + k].abs());
                }
            }
            (d, m)
        };
        // nnU-Net's algorithm at our precision (float32 accumulation): the same numbers.
        let (d32, max_abs) = max_diff(&decode_f32(g[format!("{key}_float32_accumulation")].as_str().unwrap()));
        // nnU-Net as it runs (float16 accumulation): within its own float16 error.
        let (d16, _) = max_diff(&decode_f32(g[key].as_str().unwrap()));
        let envelope = g[format!("{key}_float16_vs_float32_max")].as_f64().unwrap() as f32;
        eprintln!(
            "{key}: max |Δ| {d32:.2e} against nnU-Net with float32 accumulation, {d16:.2e} against nnU-Net's float16 \
             (its own float16 error here: {envelope:.2e}; logits up to {max_abs:.1})"
        );
        assert!(d32 <= 1e-4 * max_abs.max(1.0), "{key}: {d32}");
        assert!(d16 <= envelope + 1e-4 * max_abs.max(1.0), "{key}: {d16}");
    }
    // 3. Whole-scan predictions, RAS and LPS.
    for input in &inputs {
        let id = input.file_name().unwrap().to_string_lossy().trim_end_matches("_0000.nii.gz").to_string();
        let pred = io::read_labels(&ours.join(format!("{id}.nii.gz"))).unwrap();
        let want = decode_labels(g["predictions"][&id]["labels_canonical"].as_str().unwrap());
        let got = pred.data.as_slice().unwrap();
        assert_eq!(got.len(), want.len());
        let equal = got.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / got.len() as f64;
        let organs: Vec<u8> = (1..=13u8).filter(|&c| want.contains(&c) || got.contains(&c)).collect();
        assert!(!organs.is_empty(), "the model predicts some organ");
        for c in organs {
            let (a, b) = (got.iter().filter(|&&v| v == c).count(), want.iter().filter(|&&v| v == c).count());
            let both = got.iter().zip(&want).filter(|(x, y)| **x == c && **y == c).count();
            let dice = 2.0 * both as f64 / (a + b) as f64;
            assert!(dice >= 0.99, "{id}: organ {c} Dice {dice} against nnU-Net");
        }
        eprintln!("{id}: {:.4}% of voxels equal to nnU-Net's", equal * 100.0);
        assert!(equal >= 0.998, "{id}: {equal}");
        // 4. Probabilities where nnU-Net's are recorded, and nnU-Net's ensembling of our files.
        let probs = read_npz(&ours.join(format!("{id}.npz")));
        let shape = pred.data.shape().to_vec();
        let samples = g["predictions"][&id]["probabilities"].as_array().unwrap();
        let mut max_diff = 0.0f64;
        for s in samples {
            let (z, y, x, k) = (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
                s[2].as_u64().unwrap() as usize,
                s[3].as_u64().unwrap() as usize,
            );
            let v = probs[((k * shape[0] + z) * shape[1] + y) * shape[2] + x] as f64;
            max_diff = max_diff.max((v - s[4].as_f64().unwrap()).abs());
        }
        assert!(max_diff < 0.01, "{id}: probabilities differ by {max_diff}");
        assert_eq!(g["predictions"][&id]["nnunet_ensemble_of_our_npz_equals_our_labels"], true);
    }
}

/// `probabilities` of an `.npz` written by us, as a flat `[K, z, y, x]` array.
fn read_npz(path: &Path) -> Vec<f32> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut entry = zip.by_name("probabilities.npy").unwrap();
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
