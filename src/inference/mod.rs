//! Inference, as nnU-Net's `inference/`: forced spacing, crop, resample, normalise,
//! sliding window over one or both siblings (mean of softmax), optional mirroring,
//! back to the original grid, largest-connected-component post-processing, and a
//! uint8 label map with the input's exact geometry.

pub mod postprocess;
pub mod sliding;

use std::path::{Path, PathBuf};

use ndarray::{s, Array3, Array4, Axis};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::dataset::Case;
use crate::error::{Error, Result};
use crate::planning::fingerprint::nonzero_box;
use crate::planning::plan::Plans;
use crate::preprocessing::resample::{resample_image, resample_labels, separate_axis};
use crate::training::network::UNet;

/// The paper's rule: the scan's spacing is replaced before preprocessing, by the
/// slice count S: S < 150 → in-plane forced, z kept; 150..=600 → all forced;
/// S > 600 → in-plane forced, z = max(0.8, 600/S)·z_forced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForcedSpacing {
    pub xy: f64,
    pub z: f64,
}

impl ForcedSpacing {
    /// The paper's defaults.
    pub const PAPER: ForcedSpacing = ForcedSpacing { xy: 0.75, z: 0.5 };
    /// The authors' code.
    pub const AUTHORS: ForcedSpacing = ForcedSpacing { xy: 1.0, z: 1.5 };

    /// Spacing (z, y, x) to treat a scan of `slices` slices as having.
    pub fn apply(&self, spacing: [f64; 3], slices: usize) -> [f64; 3] {
        let z = if slices < 150 {
            spacing[0]
        } else if slices <= 600 {
            self.z
        } else {
            (600.0 / slices as f64).max(0.8) * self.z
        };
        [z, self.xy, self.xy]
    }
}

#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub checkpoint: String,
    pub forced_spacing: Option<ForcedSpacing>,
    pub step: f64,
    pub mirror: bool,
    /// Use both siblings (mean of softmax) when the run has two.
    pub ensemble: bool,
    pub largest_component: bool,
    pub device: Device,
    pub tiles_per_batch: usize,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions {
            checkpoint: "best".into(),
            forced_spacing: None,
            step: 0.7,
            mirror: false,
            ensemble: true,
            largest_component: true,
            device: Device::Cpu,
            tiles_per_batch: 2,
        }
    }
}

/// Networks of a training run, ready to predict.
pub struct Model {
    pub plans: Plans,
    pub configuration: String,
    nets: Vec<(nn::VarStore, UNet)>,
    device: Device,
}

impl Model {
    /// Loads `RUN_DIR/{checkpoint}.json`'s networks (or an `export` folder).
    pub fn load(run: &Path, checkpoint: &str, device: Device, ensemble: bool) -> Result<Model> {
        let dir = match std::fs::read_to_string(run.join(format!("{checkpoint}.json"))) {
            Ok(t) => {
                let v: serde_json::Value =
                    serde_json::from_str(&t).map_err(|e| Error::json(run.join(format!("{checkpoint}.json")), e))?;
                run.join(v["checkpoint"].as_str().unwrap_or_default())
            }
            Err(_) => run.to_path_buf(), // an `export` folder
        };
        let plans = Plans::read(&dir.join("plans.json")).or_else(|_| Plans::read(&run.join("plans.json")))?;
        let configuration = plans.cps.configuration.clone();
        let conf = plans
            .configuration(&configuration)
            .ok_or_else(|| Error::invalid(run, format!("plans.json has no configuration {configuration}")))?;
        let mut spec = conf.network.clone();
        spec.input_channels = plans.channels.len();
        let mut nets = Vec::new();
        for i in 0..2 {
            let path = dir.join(format!("net{i}.safetensors"));
            if !path.exists() || (!ensemble && i > 0) {
                continue;
            }
            let vs = nn::VarStore::new(device);
            let net = UNet::new(&vs.root(), &spec);
            let loaded = Tensor::read_safetensors(&path).map_err(|e| Error::invalid(&path, e.to_string()))?;
            let vars = vs.variables();
            let mut n = 0;
            for (name, t) in loaded {
                let key = name.strip_prefix("model.").unwrap_or(&name);
                if name.starts_with("momentum.") {
                    continue;
                }
                let v = vars.get(key).ok_or_else(|| Error::invalid(&path, format!("unknown tensor {name}")))?;
                tch::no_grad(|| v.shallow_clone().copy_(&t));
                n += 1;
            }
            if n != vars.len() {
                return Err(Error::invalid(&path, format!("holds {n} of the network's {} tensors", vars.len())));
            }
            nets.push((vs, net));
        }
        if nets.is_empty() {
            return Err(Error::invalid(&dir, "no net0.safetensors / net1.safetensors"));
        }
        Ok(Model { plans, configuration, nets, device })
    }

    pub fn networks(&self) -> usize {
        self.nets.len()
    }

    /// Mean softmax of the networks (and mirrored copies) for a batch of tiles.
    fn scores(&self, batch: &[f32], n: usize, tile: [usize; 3], channels: usize, mirror: bool) -> Vec<f32> {
        let [z, y, x] = tile.map(|v| v as i64);
        let input = Tensor::from_slice(batch).reshape([n as i64, channels as i64, z, y, x]).to_device(self.device);
        tch::no_grad(|| {
            let flips: Vec<Vec<i64>> = if mirror {
                vec![vec![], vec![2], vec![3], vec![4], vec![2, 3], vec![2, 4], vec![3, 4], vec![2, 3, 4]]
            } else {
                vec![vec![]]
            };
            let mut sum: Option<Tensor> = None;
            for (_, net) in &self.nets {
                for f in &flips {
                    let inp = if f.is_empty() { input.shallow_clone() } else { input.flip(f.as_slice()) };
                    let out = if self.device.is_cuda() {
                        tch::autocast(true, || net.forward(&inp))
                    } else {
                        net.forward(&inp)
                    };
                    let mut p = out[0].to_kind(Kind::Float).softmax(1, Kind::Float);
                    if !f.is_empty() {
                        p = p.flip(f.as_slice());
                    }
                    sum = Some(match sum {
                        Some(s) => s + p,
                        None => p,
                    });
                }
            }
            let total = (self.nets.len() * flips.len()) as f64;
            let mean = sum.expect("at least one network") / total;
            Vec::<f32>::try_from(mean.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default()
        })
    }
}

/// What predicting one case took.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub image: PathBuf,
    pub output: PathBuf,
    pub seconds: f64,
    pub network_shape: [usize; 3],
}

/// Predicts one case (its channel files) and writes the label map to `out`.
pub fn predict_case(model: &Model, case: &Case, out: &Path, opts: &PredictOptions) -> Result<CaseReport> {
    let start = std::time::Instant::now();
    let loaded = Case { label: None, ..case.clone() }.load()?;
    let geometry = loaded.geometry;
    let channels = loaded.channels;
    let conf = model.plans.configuration(&model.configuration).expect("checked at load");
    let target = [conf.spacing[0], conf.spacing[1], conf.spacing[2]];
    let tile = [conf.patch_size[0], conf.patch_size[1], conf.patch_size[2]];
    let shape = geometry.shape();
    let spacing = match opts.forced_spacing {
        Some(f) => f.apply(geometry.spacing(), shape[0]),
        None => geometry.spacing(),
    };
    let bbox = nonzero_box(&channels);
    let crop = s![bbox[0][0]..bbox[0][1], bbox[1][0]..bbox[1][1], bbox[2][0]..bbox[2][1]];
    let cropped: [usize; 3] = std::array::from_fn(|a| bbox[a][1] - bbox[a][0]);
    let net_shape: [usize; 3] =
        std::array::from_fn(|a| ((cropped[a] as f64 * spacing[a] / target[a]).round() as usize).max(1));
    let sep = separate_axis(spacing, target, crate::planning::plan::ANISO_THRESHOLD);
    let norms = &model.plans.normalization;
    let c = channels.len();
    let mut volume = Array4::<f32>::zeros((c, net_shape[0], net_shape[1], net_shape[2]));
    for (i, ch) in channels.into_iter().enumerate() {
        let r = resample_image(ch.slice(crop).to_owned(), net_shape, sep);
        let n = &norms[i.min(norms.len() - 1)];
        volume.index_axis_mut(Axis(0), i).assign(&r.mapv(|v| n.apply(v)));
    }
    let classes = model.plans.num_classes;
    let labels = sliding::sliding_window_labels(&volume, tile, opts.step, classes, opts.tiles_per_batch, |b, n| {
        model.scores(b, n, tile, c, opts.mirror)
    });
    drop(volume);
    // Back to the original (cropped) grid, then into the full volume.
    let back = resample_labels(&labels, cropped, sep);
    let mut full = Array3::<u8>::zeros(shape);
    full.slice_mut(crop).assign(&back);
    if opts.largest_component {
        postprocess::keep_largest_components(&mut full);
    }
    crate::io::write_labels_like(out, full.view(), &geometry)?;
    Ok(CaseReport {
        image: case.images[0].clone(),
        output: out.to_path_buf(),
        seconds: start.elapsed().as_secs_f64(),
        network_shape: net_shape,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_spacing_follows_the_slice_count_rule() {
        let f = ForcedSpacing { xy: 0.75, z: 0.5 };
        assert_eq!(f.apply([2.5, 0.8, 0.8], 100), [2.5, 0.75, 0.75]);
        assert_eq!(f.apply([1.0, 0.8, 0.8], 150), [0.5, 0.75, 0.75]);
        assert_eq!(f.apply([1.0, 0.8, 0.8], 600), [0.5, 0.75, 0.75]);
        assert_eq!(f.apply([0.6, 0.8, 0.8], 1000), [0.8 * 0.5, 0.75, 0.75]);
        assert!((f.apply([0.6, 0.8, 0.8], 700)[0] - 600.0 / 700.0 * 0.5).abs() < 1e-12);
    }
}
