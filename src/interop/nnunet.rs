//! A training run as an nnU-Net v2 trained-model folder:
//!
//! ```text
//! OUT/dataset.json                  labels, channels, file ending, and the reader: NibabelIOWithReorient
//! OUT/plans.json                    nnU-Net's plans schema for the trained configuration
//! OUT/fold_0/checkpoint_final.pth   sibling 0 (PlainConvUNet's state dict, strict-loadable)
//! OUT/fold_1/checkpoint_final.pth   sibling 1
//! ```
//!
//! `nnUNetv2_predict_from_modelfolder -m OUT -f 0 1` (or the folder placed as
//! `$nnUNet_results/DatasetXXX/nnUNetTrainer__nnUNetPlans__3d_fullres` for
//! `nnUNetv2_predict -f 0 1`) is then the sibling ensemble. Both the plans and dataset.json
//! name `NibabelIOWithReorient`: it hands the network the RAS-reoriented array, our
//! canonical order, so RAS and LPS files are predicted alike.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value as Json};

use super::pickle::Value;
use super::pth::{write_checkpoint, StateTensor, Storages};
use crate::error::{Error, Result};
use crate::planning::plan::Plans;
use crate::planning::topology::NetworkSpec;

/// nnU-Net's reader that reorients to RAS, transposed to (z, y, x): our canonical order.
pub const READER: &str = "NibabelIOWithReorient";

/// Our parameter names (tch's, `model.` stripped) → nnU-Net PlainConvUNet's, every alias
/// that its `state_dict()` lists (a block's `all_modules.{0,1}`, the decoder's reference
/// to the encoder), in its order.
pub fn plain_conv_unet_names(spec: &NetworkSpec) -> Vec<(String, String)> {
    let block = |ours: String, theirs: String| -> Vec<(String, String)> {
        let mut v = Vec::new();
        for part in ["conv", "norm"] {
            for p in ["weight", "bias"] {
                v.push((format!("{ours}.{part}.{p}"), format!("{theirs}.{part}.{p}")));
            }
        }
        for (part, index) in [("conv", 0), ("norm", 1)] {
            for p in ["weight", "bias"] {
                v.push((format!("{ours}.{part}.{p}"), format!("{theirs}.all_modules.{index}.{p}")));
            }
        }
        v
    };
    let n = spec.n_stages();
    let mut encoder = Vec::new();
    for s in 0..n {
        for c in 0..spec.n_conv_per_stage[s] {
            encoder.extend(block(format!("encoder.{s}.{c}"), format!("encoder.stages.{s}.0.convs.{c}")));
        }
    }
    let mut names = encoder.clone();
    names.extend(encoder.into_iter().map(|(o, t)| (o, format!("decoder.{t}"))));
    for d in 0..n - 1 {
        for c in 0..spec.n_conv_per_stage_decoder[d] {
            names.extend(block(format!("decoder.{d}.{c}"), format!("decoder.stages.{d}.convs.{c}")));
        }
    }
    for d in 0..n - 1 {
        for p in ["weight", "bias"] {
            names.push((format!("decoder.{d}.up.{p}"), format!("decoder.transpconvs.{d}.{p}")));
        }
    }
    for d in 0..n - 1 {
        for p in ["weight", "bias"] {
            names.push((format!("decoder.{d}.head.{p}"), format!("decoder.seg_layers.{d}.{p}")));
        }
    }
    names
}

/// The plans.json nnU-Net's predictor reads, for our trained configuration.
pub fn nnunet_plans(plans: &Plans) -> Result<Json> {
    let name = &plans.cps.configuration;
    let conf = plans.configuration(name).ok_or_else(|| Error::invalid("plans", format!("no configuration {name}")))?;
    let spec = &conf.network;
    if spec.kind != "plain" {
        return Err(Error::invalid("plans", format!("network kind {}: only \"plain\" maps onto nnU-Net", spec.kind)));
    }
    let dim = spec.dim;
    let (conv, norm) = if dim == 3 {
        ("torch.nn.modules.conv.Conv3d", "torch.nn.modules.instancenorm.InstanceNorm3d")
    } else {
        ("torch.nn.modules.conv.Conv2d", "torch.nn.modules.instancenorm.InstanceNorm2d")
    };
    let mut intensities = serde_json::Map::new();
    let mut schemes = Vec::new();
    for (c, n) in plans.normalization.iter().enumerate() {
        // Every channel as nnU-Net's CTNormalization (clip, then z-score with fixed
        // statistics): our "zscore" channels use the dataset's statistics without
        // clipping, which is CTNormalization with bounds no value reaches (nnU-Net's
        // ZScoreNormalization would z-score each case by its own statistics instead).
        let (lo, hi) = if n.scheme == "CT" { (n.clip_low, n.clip_high) } else { (-3.0e38, 3.0e38) };
        schemes.push("CTNormalization");
        intensities.insert(
            c.to_string(),
            json!({
                "mean": n.mean, "std": n.std, "percentile_00_5": lo, "percentile_99_5": hi,
                "min": lo, "max": hi, "median": n.mean,
            }),
        );
    }
    let resampling =
        |is_seg: bool, order: u32| json!({"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": null});
    let configuration = json!({
        "data_identifier": format!("nnUNetPlans_{name}"),
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": conf.batch_size,
        "patch_size": conf.patch_size,
        "median_image_size_in_voxels": conf.median_shape_after_resampling,
        "spacing": conf.spacing,
        "normalization_schemes": schemes,
        "use_mask_for_norm": vec![false; plans.normalization.len()],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling(false, 3),
        "resampling_fn_seg_kwargs": resampling(true, 1),
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resampling(false, 1),
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": spec.n_stages(),
                "features_per_stage": spec.features_per_stage,
                "conv_op": conv,
                "kernel_sizes": spec.kernel_sizes,
                "strides": spec.strides,
                "n_conv_per_stage": spec.n_conv_per_stage,
                "n_conv_per_stage_decoder": spec.n_conv_per_stage_decoder,
                "conv_bias": spec.conv_bias,
                "norm_op": norm,
                "norm_op_kwargs": {"eps": spec.norm_eps, "affine": spec.norm_affine},
                "dropout_op": null,
                "dropout_op_kwargs": null,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": true, "negative_slope": spec.negative_slope},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": conf.batch_dice,
    });
    let mut configurations = serde_json::Map::new();
    configurations.insert(name.clone(), configuration);
    Ok(json!({
        "dataset_name": dataset_name(plans),
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": plans.original_median_spacing,
        "original_median_shape_after_transp": plans.original_median_shape.map(|v| v.round() as i64),
        "image_reader_writer": READER,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "cps3d",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensities,
        "configurations": configurations,
    }))
}

fn dataset_name(plans: &Plans) -> String {
    plans.dataset_name.clone().unwrap_or_else(|| "Dataset999_cps3d".into())
}

/// dataset.json with one label per network output (gaps filled, as nnU-Net needs
/// consecutive labels) and the reorienting reader.
pub fn nnunet_dataset_json(plans: &Plans) -> Json {
    let mut labels = serde_json::Map::new();
    for c in 0..plans.num_classes {
        let name = match plans.labels.get(&(c as u8)) {
            Some(n) => n.clone(),
            None if c == 0 => "background".into(),
            None => format!("label_{c}"),
        };
        labels.insert(name, json!(c));
    }
    let channels: BTreeMap<String, String> = plans.channels.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    json!({
        "name": dataset_name(plans),
        "channel_names": channels,
        "labels": labels,
        "numTraining": 0,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": READER,
    })
}

/// Writes `out` from a checkpoint folder (`net0`/`net1.safetensors` + `plans.json`).
/// Returns how many networks (folds) were written.
pub fn export_model_folder(checkpoint: &Path, out: &Path) -> Result<usize> {
    let plans = Plans::read(&checkpoint.join("plans.json"))?;
    let mut spec = plans
        .configuration(&plans.cps.configuration)
        .ok_or_else(|| Error::invalid(checkpoint.join("plans.json"), "no trained configuration"))?
        .network
        .clone();
    spec.input_channels = plans.channels.len();
    let nn_plans = nnunet_plans(&plans)?;
    let dataset = nnunet_dataset_json(&plans);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::util::write_json_atomic(&out.join("plans.json"), &nn_plans)?;
    crate::util::write_json_atomic(&out.join("dataset.json"), &dataset)?;
    let names = plain_conv_unet_names(&spec);
    let mut written = 0;
    for fold in 0..2 {
        let src = checkpoint.join(format!("net{fold}.safetensors"));
        if !src.exists() {
            continue;
        }
        let tensors = crate::training::checkpoint::read_finite_tensors(&src).map_err(|e| Error::invalid(&src, e))?;
        let mut ours: BTreeMap<String, (Vec<usize>, Arc<Vec<f32>>)> = BTreeMap::new();
        for (name, t) in tensors {
            // Weights only: not the optimizer's or the loss scaler's state.
            let state = name.starts_with("momentum.") || name.starts_with("scaler.");
            let Some(key) = name.strip_prefix("model.").or((!state).then_some(name.as_str())) else {
                continue;
            };
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let data: Vec<f32> = Vec::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1))
                .map_err(|e| Error::invalid(&src, format!("{name}: {e}")))?;
            ours.insert(key.to_string(), (shape, Arc::new(data)));
        }
        let mut state = Vec::with_capacity(names.len());
        for (o, t) in &names {
            let (shape, data) =
                ours.get(o).ok_or_else(|| Error::invalid(&src, format!("no tensor {o} (nnU-Net's {t})")))?;
            state.push(StateTensor { name: t.clone(), shape: shape.clone(), data: data.clone() });
        }
        let used: std::collections::BTreeSet<&String> = names.iter().map(|(o, _)| o).collect();
        if let Some(extra) = ours.keys().find(|k| !used.contains(k)) {
            return Err(Error::invalid(&src, format!("tensor {extra} has no place in nnU-Net's PlainConvUNet")));
        }
        let mut storages = Storages::new();
        let weights = storages.state_dict(&state);
        let root = Value::dict([
            ("network_weights", weights),
            ("optimizer_state", Value::None),
            ("grad_scaler_state", Value::None),
            ("logging", Value::dict(Vec::<(String, Value)>::new())),
            ("_best_ema", Value::None),
            ("current_epoch", Value::Int(plans.cps.epochs as i64)),
            (
                "init_args",
                Value::dict([
                    ("plans", Value::from(&nn_plans)),
                    ("configuration", Value::str(plans.cps.configuration.clone())),
                    ("fold", Value::Int(fold as i64)),
                    ("dataset_json", Value::from(&dataset)),
                ]),
            ),
            ("trainer_name", Value::str("nnUNetTrainer")),
            ("inference_allowed_mirroring_axes", Value::int_tuple(&(0..spec.dim as i64).collect::<Vec<_>>())),
        ]);
        let dir = out.join(format!("fold_{fold}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        write_checkpoint(&dir.join("checkpoint_final.pth"), &root, &storages)?;
        written += 1;
    }
    if written == 0 {
        return Err(Error::invalid(checkpoint, "no net0.safetensors / net1.safetensors"));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planning::topology::{features_per_stage, pool_and_conv_props};

    #[test]
    fn channels_are_normalised_in_nnunet_exactly_as_here() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/inference/model/plans.json");
        let mut plans = Plans::read(Path::new(path)).unwrap();
        let ct = nnunet_plans(&plans).unwrap();
        let props = &ct["foreground_intensity_properties_per_channel"]["0"];
        assert_eq!(ct["configurations"]["3d_fullres"]["normalization_schemes"][0], "CTNormalization");
        assert_eq!(props["percentile_00_5"], plans.normalization[0].clip_low);
        assert_eq!(props["std"], plans.normalization[0].std);
        // A z-score channel (dataset statistics, no clipping) is CTNormalization whose bounds
        // no value reaches, not nnU-Net's per-case ZScoreNormalization.
        plans.normalization[0].scheme = "zscore".into();
        let z = nnunet_plans(&plans).unwrap();
        let props = &z["foreground_intensity_properties_per_channel"]["0"];
        assert_eq!(z["configurations"]["3d_fullres"]["normalization_schemes"][0], "CTNormalization");
        assert!(
            props["percentile_00_5"].as_f64().unwrap() < -1e37 && props["percentile_99_5"].as_f64().unwrap() > 1e37
        );
        assert_eq!(props["mean"], plans.normalization[0].mean);
        // Labels are consecutive, one per network output, and name the reorienting reader.
        let d = nnunet_dataset_json(&plans);
        assert_eq!(d["labels"].as_object().unwrap().len(), plans.num_classes);
        assert_eq!(d["overwrite_image_reader_writer"], READER);
    }

    #[test]
    fn every_parameter_has_its_nnunet_names_and_aliases() {
        let t = pool_and_conv_props(&[1.0; 3], &[16, 32, 32], 4, 999_999);
        let n = t.strides.len();
        let spec = NetworkSpec::plain(3, 1, 3, features_per_stage(n, 4, 16), t.kernels, t.strides);
        let names = plain_conv_unet_names(&spec);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _net = crate::training::network::UNet::new(&vs.root(), &spec);
        let ours: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
        let mapped: std::collections::BTreeSet<String> = names.iter().map(|(o, _)| o.clone()).collect();
        assert_eq!(ours, mapped, "every tch variable is exported, and nothing else");
        // Encoder parameters appear four times (own name, all_modules alias, and both again
        // under decoder.encoder); decoder conv blocks twice; transposed convs and heads once.
        let count = |o: &str| names.iter().filter(|(x, _)| x == o).count();
        assert_eq!(count("encoder.0.0.conv.weight"), 4);
        assert_eq!(count("decoder.0.1.norm.bias"), 2);
        assert_eq!(count("decoder.1.up.weight"), 1);
        assert!(names.iter().any(|(_, t)| t == "decoder.encoder.stages.2.0.convs.1.all_modules.1.weight"));
        assert!(names.iter().any(|(_, t)| t == "decoder.seg_layers.2.bias"));
        let theirs: std::collections::BTreeSet<&String> = names.iter().map(|(_, t)| t).collect();
        assert_eq!(theirs.len(), names.len(), "nnU-Net names are unique");
    }
}
