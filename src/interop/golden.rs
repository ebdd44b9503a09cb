//! Checks our writers against what PyTorch, pickle and NumPy read from their output.
//!
//! `CPS3D_WRITE_GOLDEN_INTEROP=1 cargo test --release -p cps3d --lib interop` writes the fixture
//! files into `tests/golden/interop/` (git-ignored; nothing binary is committed), then
//! `scripts/reference/interop_check.py` loads them with torch/pickle/NumPy and records each file's
//! sha256 and the values read in `tests/golden/interop.json`. The normal test writes the same
//! fixtures into a temporary folder and checks that (a) their sha256 equal the recorded ones, so
//! we still write exactly the bytes Python accepted, and (b) the recorded values are our inputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value as J};
use sha2::{Digest, Sha256};

use super::npz::{write_f32s, write_npz_f32};
use super::pickle::{write_pickle, Value};
use super::pth::{write_checkpoint, StateTensor, Storages};

enum Fixture {
    Checkpoint { root: Value, storages: Storages },
    Pickle(Value),
    Npz { name: &'static str, shape: Vec<usize>, data: Vec<f32> },
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Exactly representable, varied values for storage `key`.
fn values(key: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 + key * 11) % 101) as f32 / 128.0 - 0.375).collect()
}

/// The state dict of `PlainConvUNet(1, 3, (4, 8, 16), Conv3d, 3, ((1,1,1), (2,2,2), (2,2,2)),
/// (2, 2, 2), 3, (2, 2), True, InstanceNorm3d, {'eps': 1e-5, 'affine': True}, None, None,
/// LeakyReLU, {'inplace': True})` (dynamic_network_architectures 0.4.4), in its key order, with
/// its aliases: `...convs.N.all_modules.0.*` is `...convs.N.conv.*`, `...all_modules.1.*` is
/// `...norm.*`, and every `decoder.encoder.*` is the `encoder.*` of the same name.
fn tiny_unet_state_dict() -> Vec<StateTensor> {
    let features = [4usize, 8, 16];
    let (in_channels, classes) = (1usize, 3usize);
    let mut next_key = 0;
    let mut new = |shape: Vec<usize>| {
        next_key += 1;
        Arc::new(values(next_key, shape.iter().product()))
    };
    let mut out = Vec::new();
    // conv + norm with their `all_modules` aliases.
    let mut conv_block = |out: &mut Vec<StateTensor>, prefix: String, cin: usize, cout: usize| {
        let w = (vec![cout, cin, 3, 3, 3], new(vec![cout, cin, 3, 3, 3]));
        let b = (vec![cout], new(vec![cout]));
        let nw = (vec![cout], new(vec![cout]));
        let nb = (vec![cout], new(vec![cout]));
        let names = [
            ("conv.weight", &w),
            ("conv.bias", &b),
            ("norm.weight", &nw),
            ("norm.bias", &nb),
            ("all_modules.0.weight", &w),
            ("all_modules.0.bias", &b),
            ("all_modules.1.weight", &nw),
            ("all_modules.1.bias", &nb),
        ];
        for (name, (shape, data)) in names {
            out.push(StateTensor { name: format!("{prefix}.{name}"), shape: shape.clone(), data: data.clone() });
        }
    };
    for (s, &f) in features.iter().enumerate() {
        let cin = if s == 0 { in_channels } else { features[s - 1] };
        conv_block(&mut out, format!("encoder.stages.{s}.0.convs.0"), cin, f);
        conv_block(&mut out, format!("encoder.stages.{s}.0.convs.1"), f, f);
    }
    let encoder: Vec<StateTensor> = out.clone();
    out.extend(encoder.into_iter().map(|t| StateTensor { name: format!("decoder.{}", t.name), ..t }));
    for s in 0..2 {
        let f = features[1 - s];
        conv_block(&mut out, format!("decoder.stages.{s}.convs.0"), 2 * f, f);
        conv_block(&mut out, format!("decoder.stages.{s}.convs.1"), f, f);
    }
    let mut plain = |out: &mut Vec<StateTensor>, name: String, shape: Vec<usize>| {
        out.push(StateTensor { name, data: new(shape.clone()), shape });
    };
    for s in 0..2 {
        let (fin, fout) = (features[2 - s], features[1 - s]);
        plain(&mut out, format!("decoder.transpconvs.{s}.weight"), vec![fin, fout, 2, 2, 2]);
        plain(&mut out, format!("decoder.transpconvs.{s}.bias"), vec![fout]);
    }
    for s in 0..2 {
        plain(&mut out, format!("decoder.seg_layers.{s}.weight"), vec![classes, features[1 - s], 1, 1, 1]);
        plain(&mut out, format!("decoder.seg_layers.{s}.bias"), vec![classes]);
    }
    out
}

/// nnU-Net v2 plans for the tiny network, enough for `nnUNetPredictor` to rebuild it.
fn tiny_plans() -> J {
    // Text, not json!: the macro hits the recursion limit on this much nesting.
    serde_json::from_str(
        r#"{
          "dataset_name": "Dataset999_Tiny",
          "plans_name": "nnUNetPlans",
          "original_median_spacing_after_transp": [2.5, 0.8, 0.8],
          "original_median_shape_after_transp": [64, 64, 64],
          "image_reader_writer": "SimpleITKIO",
          "transpose_forward": [0, 1, 2],
          "transpose_backward": [0, 1, 2],
          "configurations": {
            "3d_fullres": {
              "data_identifier": "nnUNetPlans_3d_fullres",
              "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2,
              "patch_size": [16, 16, 16],
              "median_image_size_in_voxels": [64, 64, 64],
              "spacing": [2.5, 0.8, 0.8],
              "normalization_schemes": ["CTNormalization"],
              "use_mask_for_norm": [false],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": false, "order": 3, "order_z": 0, "force_separate_z": null},
              "resampling_fn_seg_kwargs": {"is_seg": true, "order": 1, "order_z": 0, "force_separate_z": null},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": false, "order": 1, "order_z": 0, "force_separate_z": null},
              "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                  "n_stages": 3,
                  "features_per_stage": [4, 8, 16],
                  "conv_op": "torch.nn.modules.conv.Conv3d",
                  "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
                  "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                  "n_conv_per_stage": [2, 2, 2],
                  "n_conv_per_stage_decoder": [2, 2],
                  "conv_bias": true,
                  "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                  "norm_op_kwargs": {"eps": 1e-05, "affine": true},
                  "dropout_op": null,
                  "dropout_op_kwargs": null,
                  "nonlin": "torch.nn.LeakyReLU",
                  "nonlin_kwargs": {"inplace": true}
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]
              },
              "batch_dice": false
            }
          },
          "experiment_planner_used": "ExperimentPlanner",
          "label_manager": "LabelManager",
          "foreground_intensity_properties_per_channel": {
            "0": {
              "max": 1000.0,
              "mean": 50.5,
              "median": 45.0,
              "min": -1000.0,
              "percentile_00_5": -900.0,
              "percentile_99_5": 900.0,
              "std": 100.25
            }
          }
        }"#,
    )
    .unwrap()
}

fn checkpoint_final() -> Fixture {
    let mut storages = Storages::new();
    let weights = storages.state_dict(&tiny_unet_state_dict());
    let dataset_json = json!({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 1,
        "file_ending": ".nii.gz"
    });
    let root = Value::dict([
        ("network_weights", weights),
        ("optimizer_state", Value::None),
        ("grad_scaler_state", Value::None),
        ("logging", Value::Dict(vec![])),
        ("_best_ema", Value::None),
        ("current_epoch", Value::Int(1000)),
        (
            "init_args",
            Value::dict([
                ("plans", Value::from(&tiny_plans())),
                ("configuration", Value::str("3d_fullres")),
                ("fold", Value::Int(0)),
                ("dataset_json", Value::from(&dataset_json)),
            ]),
        ),
        ("trainer_name", Value::str("nnUNetTrainer")),
        ("inference_allowed_mirroring_axes", Value::int_tuple(&[0, 1, 2])),
    ]);
    Fixture::Checkpoint { root, storages }
}

/// Tensors that are views: offsets, transposed strides, 0-d, empty, inside lists and tuples.
fn views() -> Fixture {
    let mut storages = Storages::new();
    let a = Arc::new(values(1, 24));
    let empty = Arc::new(Vec::new());
    let root = Value::dict([
        ("full", storages.tensor(&a, &[2, 3, 4])),
        ("rows", storages.view(&a, 4, &[3, 4], &[4, 1])),
        ("transposed", storages.view(&a, 0, &[4, 3, 2], &[1, 4, 12])),
        ("scalar", storages.view(&a, 5, &[], &[])),
        ("empty", storages.tensor(&empty, &[0, 3])),
        ("list", Value::List(vec![storages.tensor(&Arc::new(values(2, 3)), &[3]), Value::Int(7)])),
        ("tuple", Value::Tuple(vec![storages.view(&a, 23, &[1], &[1])])),
    ]);
    Fixture::Checkpoint { root, storages }
}

/// nnU-Net's per-case properties plus values at the edges of each pickle opcode.
fn properties() -> Fixture {
    let ints = [0, 255, 256, 65535, 65536, -1, -128, i32::MAX as i64, 1 << 31, i32::MIN as i64, i32::MIN as i64 - 1];
    let ints: Vec<Value> = ints.into_iter().chain([i64::MAX, i64::MIN]).map(Value::Int).collect();
    let floats = [0.0, -0.0, 1e-300, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 0.1, -123.456];
    let tuples = (0..5).map(|n| Value::int_tuple(&(1..=n).collect::<Vec<i64>>())).collect();
    let root = Value::dict([
        (
            "sitk_stuff",
            Value::dict([
                ("spacing", Value::float_tuple(&[0.8, 0.8, 2.5])),
                ("origin", Value::float_tuple(&[-200.0, -150.5, 30.0])),
                ("direction", Value::float_tuple(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])),
            ]),
        ),
        ("spacing", Value::List(vec![Value::Float(2.5), Value::Float(0.8), Value::Float(0.8)])),
        ("shape_before_cropping", Value::int_tuple(&[120, 512, 512])),
        (
            "bbox_used_for_cropping",
            Value::List(
                [[0, 120], [10, 500], [12, 490]].iter().map(|r| Value::List(r.map(Value::Int).to_vec())).collect(),
            ),
        ),
        ("shape_after_cropping_and_before_resampling", Value::int_tuple(&[120, 490, 478])),
        ("ints", Value::List(ints)),
        ("floats", Value::List(floats.into_iter().map(Value::Float).collect())),
        ("strings", Value::List(["", "ünïcødé ✓ 🫁", "a\nb\u{0}c"].into_iter().map(Value::str).collect())),
        ("tuples", Value::List(tuples)),
        ("empties", Value::List(vec![Value::List(vec![]), Value::Dict(vec![]), Value::Tuple(vec![])])),
        ("bools", Value::List(vec![Value::Bool(true), Value::Bool(false), Value::None])),
        ("int_keys", Value::Dict(vec![(Value::Int(1), Value::str("one")), (Value::Int(-2), Value::str("minus two"))])),
        ("tuple_key", Value::Dict(vec![(Value::int_tuple(&[1, 2]), Value::str("pair"))])),
        ("ordered", Value::OrderedDict(vec![("b".into(), Value::Int(1)), ("a".into(), Value::Int(2))])),
    ]);
    Fixture::Pickle(root)
}

fn fixtures() -> Vec<(&'static str, Fixture)> {
    let probabilities: Vec<f32> = (0..3 * 4 * 5 * 6).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    vec![
        ("checkpoint_final.pth", checkpoint_final()),
        ("views.pth", views()),
        ("properties.pkl", properties()),
        ("probabilities.npz", Fixture::Npz { name: "probabilities", shape: vec![3, 4, 5, 6], data: probabilities }),
        ("vector.npz", Fixture::Npz { name: "x", shape: vec![7], data: values(3, 7) }),
        ("empty.npz", Fixture::Npz { name: "empty", shape: vec![2, 0, 3], data: vec![] }),
    ]
}

fn write(fixture: &Fixture, path: &Path) {
    match fixture {
        Fixture::Checkpoint { root, storages } => write_checkpoint(path, root, storages).unwrap(),
        Fixture::Pickle(v) => write_pickle(path, v).unwrap(),
        // Odd-sized pieces, as a streaming caller would write them.
        Fixture::Npz { name, shape, data } => {
            write_npz_f32(path, name, shape, |w| data.chunks(13).try_for_each(|c| write_f32s(w, c))).unwrap()
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The typed JSON form that interop_check.py records for what it read (see `typed` there).
fn typed(v: &Value, storages: Option<&Storages>, groups: &mut Vec<usize>) -> J {
    let pairs = |entries: Vec<(J, J)>| J::Array(entries.into_iter().map(|(k, v)| json!([k, v])).collect());
    match v {
        Value::None => J::Null,
        Value::Bool(b) => json!({ "bool": b }),
        Value::Int(i) => json!({ "int": i }),
        Value::Float(x) => json!({ "float_bits": x.to_bits() }),
        Value::Str(s) => json!({ "str": s }),
        Value::List(items) => json!({ "list": items.iter().map(|i| typed(i, storages, groups)).collect::<Vec<_>>() }),
        Value::Tuple(items) => json!({ "tuple": items.iter().map(|i| typed(i, storages, groups)).collect::<Vec<_>>() }),
        Value::Dict(entries) => json!({
            "dict": pairs(entries.iter().map(|(k, v)| (typed(k, storages, groups), typed(v, storages, groups))).collect())
        }),
        Value::OrderedDict(entries) => json!({
            "OrderedDict": pairs(entries.iter().map(|(k, v)| (json!({ "str": k }), typed(v, storages, groups))).collect())
        }),
        Value::Tensor(t) => {
            let data = storages.expect("tensor outside a checkpoint").get(t.storage).unwrap();
            // The elements in C order of the view, as `t.contiguous()` gives them.
            let mut elements = Vec::new();
            let numel: usize = t.shape.iter().product();
            for flat in 0..numel {
                let (mut rest, mut at) = (flat, t.offset);
                for d in (0..t.shape.len()).rev() {
                    at += (rest % t.shape[d]) * t.stride[d];
                    rest /= t.shape[d];
                }
                elements.push(data[at]);
            }
            // Storages numbered by first appearance, as the script numbers their data_ptr; the
            // script gives empty storages (data_ptr 0) the group -1.
            let group = if data.is_empty() {
                -1
            } else {
                match groups.iter().position(|&k| k == t.storage) {
                    Some(g) => g as i64,
                    None => {
                        groups.push(t.storage);
                        groups.len() as i64 - 1
                    }
                }
            };
            json!({ "tensor": {
                "dtype": "float32",
                "shape": t.shape,
                "stride": t.stride,
                "storage_offset": t.offset,
                "storage_numel": t.storage_numel,
                "storage_group": group,
                "sha256": sha256_hex(&f32_bytes(&elements)),
                "sum": elements.iter().map(|&x| x as f64).sum::<f64>(),
            }})
        }
    }
}

/// What the script recorded for an npz holding our array.
fn npz_expected(name: &str, shape: &[usize], data: &[f32]) -> J {
    json!({ "arrays": { name: {
        "dtype": "float32",
        "shape": shape,
        "sha256": sha256_hex(&f32_bytes(data)),
        "sum": data.iter().map(|&x| x as f64).sum::<f64>(),
        "deflated": true,
    }}})
}

/// Equal, except that floats under key "sum" may differ by rounding (summation order).
fn assert_same(recorded: &J, expected: &J, at: &str) {
    match (recorded, expected) {
        (J::Object(r), J::Object(e)) => {
            let (mut rk, mut ek): (Vec<_>, Vec<_>) = (r.keys().collect(), e.keys().collect());
            rk.sort();
            ek.sort();
            assert_eq!(rk, ek, "{at}: keys differ");
            for (k, ev) in e {
                if k == "sum" {
                    let (a, b) = (r[k].as_f64().unwrap(), ev.as_f64().unwrap());
                    assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{at}.sum: Python read {a}, we wrote {b}");
                } else {
                    assert_same(&r[k], ev, &format!("{at}.{k}"));
                }
            }
        }
        (J::Array(r), J::Array(e)) => {
            assert_eq!(r.len(), e.len(), "{at}: lengths differ");
            for (i, (rv, ev)) in r.iter().zip(e).enumerate() {
                assert_same(rv, ev, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(recorded, expected, "{at}"),
    }
}

#[test]
fn files_match_what_python_read() {
    if std::env::var("CPS3D_WRITE_GOLDEN_INTEROP").is_ok_and(|v| v == "1") {
        let dir = golden_dir().join("interop");
        std::fs::create_dir_all(&dir).unwrap();
        // The fixtures are rebuilt by this test: keep them out of git.
        std::fs::write(dir.join(".gitignore"), "*\n").unwrap();
        for (name, fixture) in fixtures() {
            write(&fixture, &dir.join(name));
        }
        eprintln!("wrote {}; now run scripts/reference/interop_check.py", dir.display());
        return;
    }

    let golden_path = golden_dir().join("interop.json");
    let golden: J = serde_json::from_str(
        &std::fs::read_to_string(&golden_path)
            .unwrap_or_else(|e| panic!("{}: {e} (see scripts/reference/interop_check.py)", golden_path.display())),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = fixtures();
    let recorded_names: Vec<&String> = golden["files"].as_object().unwrap().keys().collect();
    assert_eq!(recorded_names.len(), fixtures.len(), "fixtures and {} disagree", golden_path.display());
    for (name, fixture) in &fixtures {
        let record = &golden["files"][*name];
        assert!(record.is_object(), "{name} has no record in {}", golden_path.display());
        let path = tmp.path().join(name);
        write(fixture, &path);
        assert_eq!(
            sha256_hex(&std::fs::read(&path).unwrap()),
            record["sha256"].as_str().unwrap(),
            "{name}: we no longer write the bytes that Python read; if the change is intended, \
             regenerate with scripts/reference/interop_check.py"
        );
        match fixture {
            Fixture::Checkpoint { root, storages } => {
                assert_same(&record["read"], &typed(root, Some(storages), &mut Vec::new()), name);
                for (check, ok) in record["checks"].as_object().unwrap() {
                    assert!(ok == true || ok == "skipped", "{name}: check {check} failed in Python: {ok}");
                }
            }
            Fixture::Pickle(v) => assert_same(&record["read"], &typed(v, None, &mut Vec::new()), name),
            Fixture::Npz { name: array, shape, data } => {
                let expected = npz_expected(array, shape, data);
                assert_same(&record["arrays"], &expected["arrays"], name)
            }
        }
    }
}
