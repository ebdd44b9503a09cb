//! Inference, as nnU-Net's `inference/`: forced spacing (the paper's), crop, clip,
//! resample and z-score exactly as preprocessing does, a sliding window over every
//! network (both siblings, and several runs or folds) averaging **logits** (and their
//! mirrored copies), the logits resampled back to the input grid and only then
//! arg-maxed, largest-connected-component post-processing, and a uint8 label map with
//! the input's exact geometry. Optionally nnU-Net's `.npz` + `.pkl` probabilities.

pub mod export;
pub mod postprocess;
pub mod sliding;

use std::path::{Path, PathBuf};

use ndarray::Array3;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::dataset::Case;
use crate::error::{Error, Result};
use crate::planning::fingerprint::nonzero_box;
use crate::planning::plan::Plans;
use crate::preprocessing::crop_clip_resample;
use crate::preprocessing::resample::{compute_new_shape, separate_axis};
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
    /// Use both siblings (mean of logits) when a run has two.
    pub ensemble: bool,
    pub largest_component: bool,
    pub device: Device,
    pub tiles_per_batch: usize,
    /// Also write nnU-Net's `CASE.npz` (softmax probabilities) and `CASE.pkl`.
    pub save_probabilities: bool,
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
            save_probabilities: false,
        }
    }
}

/// The folder of a run's checkpoint (`RUN/{name}.json` points at it), or the folder
/// itself when it holds networks (an `export` folder or a checkpoint folder).
pub fn checkpoint_dir(run: &Path, name: &str) -> Result<PathBuf> {
    const POINTERS: [&str; 3] = ["best", "final", "latest"];
    if !POINTERS.contains(&name) {
        return Err(Error::invalid(run, format!("unknown checkpoint {name:?}: best, final or latest")));
    }
    let pointer = run.join(format!("{name}.json"));
    match std::fs::read_to_string(&pointer) {
        Ok(t) => {
            let v: serde_json::Value = serde_json::from_str(&t).map_err(|e| Error::json(&pointer, e))?;
            let rel = v["checkpoint"]
                .as_str()
                .ok_or_else(|| Error::invalid(&pointer, "names no checkpoint (\"checkpoint\": \"...\")"))?;
            Ok(run.join(rel))
        }
        Err(_) if run.join("net0.safetensors").exists() => Ok(run.to_path_buf()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&pointer, e)),
        Err(_) if !run.is_dir() => Err(Error::invalid(run, "no such folder (a run from `cps3d train` or an export)")),
        Err(_) => {
            let have: Vec<String> =
                POINTERS.iter().map(|p| format!("{p}.json")).filter(|p| run.join(p).is_file()).collect();
            Err(Error::invalid(
                run,
                if have.is_empty() {
                    format!(
                        "no {name}.json: neither a run folder from `cps3d train` (best.json, final.json, latest.json) \
                         nor an export folder (net0.safetensors)"
                    )
                } else {
                    // final.json appears only when training has finished.
                    format!("no {name}.json; this run has {}: choose --checkpoint accordingly", have.join(", "))
                },
            ))
        }
    }
}

/// Networks of one or more training runs (folds, siblings), ready to predict.
pub struct Model {
    pub plans: Plans,
    pub configuration: String,
    nets: Vec<(nn::VarStore, UNet)>,
    device: Device,
    mixed_precision: bool,
}

impl Model {
    /// Loads `RUN_DIR/{checkpoint}.json`'s networks (or an `export` folder).
    pub fn load(run: &Path, checkpoint: &str, device: Device, ensemble: bool) -> Result<Model> {
        Model::load_many(&[run.to_path_buf()], checkpoint, device, ensemble)
    }

    /// Every run's networks, averaged at prediction (nnU-Net's fold ensemble); the runs
    /// must share one plan's configuration (spacing, patch, classes, normalisation).
    pub fn load_many(runs: &[PathBuf], checkpoint: &str, device: Device, ensemble: bool) -> Result<Model> {
        let mut model: Option<Model> = None;
        for run in runs {
            let dir = checkpoint_dir(run, checkpoint)?;
            let plans_path =
                if dir.join("plans.json").is_file() { dir.join("plans.json") } else { run.join("plans.json") };
            let plans = Plans::read(&plans_path)?;
            check_plans(&plans, &plans_path)?;
            let configuration = plans.cps.configuration.clone();
            let conf = plans.configuration(&configuration).expect("checked");
            if let Some(m) = &model {
                let first = m.plans.configuration(&m.configuration).expect("checked");
                let same = first.spacing == conf.spacing
                    && first.patch_size == conf.patch_size
                    && m.plans.num_classes == plans.num_classes
                    && m.plans.normalization == plans.normalization
                    && first.network.features_per_stage == conf.network.features_per_stage;
                if !same {
                    return Err(Error::invalid(
                        run,
                        format!(
                            "its plan differs from {}'s (spacing, patch, classes, normalisation or network): \
                             runs ensembled together must come from one plan",
                            runs[0].display()
                        ),
                    ));
                }
            }
            let mut spec = conf.network.clone();
            spec.input_channels = plans.channels.len();
            // Inference needs the full-resolution head only.
            spec.deep_supervision = false;
            let mut nets = Vec::new();
            for i in 0..2 {
                let path = dir.join(format!("net{i}.safetensors"));
                if !path.exists() || (!ensemble && i > 0) {
                    continue;
                }
                nets.push(load_network(&path, &spec, device)?);
            }
            if nets.is_empty() {
                return Err(Error::invalid(&dir, "no net0.safetensors / net1.safetensors"));
            }
            match &mut model {
                Some(m) => m.nets.extend(nets),
                None => {
                    let mixed_precision = plans.cps.mixed_precision;
                    model = Some(Model { plans, configuration, nets, device, mixed_precision })
                }
            }
        }
        model.ok_or_else(|| Error::invalid("--model", "no run given"))
    }

    /// One network of a checkpoint folder (`name`: net0 or net1), e.g. to score a
    /// sibling alone.
    pub fn load_single(dir: &Path, name: &str, device: Device) -> Result<Model> {
        let plans = Plans::read(&dir.join("plans.json"))?;
        check_plans(&plans, &dir.join("plans.json"))?;
        let configuration = plans.cps.configuration.clone();
        let conf = plans.configuration(&configuration).expect("checked");
        let mut spec = conf.network.clone();
        spec.input_channels = plans.channels.len();
        spec.deep_supervision = false;
        let net = load_network(&dir.join(format!("{name}.safetensors")), &spec, device)?;
        let mixed_precision = plans.cps.mixed_precision;
        Ok(Model { plans, configuration, nets: vec![net], device, mixed_precision })
    }

    pub fn networks(&self) -> usize {
        self.nets.len()
    }

    fn conf(&self) -> &crate::planning::plan::ConfigurationPlan {
        self.plans.configuration(&self.configuration).expect("checked at load")
    }

    /// Whether the networks are 2D: they predict a volume slice by slice.
    pub fn is_2d(&self) -> bool {
        self.conf().network.dim == 2
    }

    /// The sliding-window tile (z, y, x): the patch, or one slice of it for a 2D network.
    pub fn tile(&self) -> [usize; 3] {
        crate::training::data::patch_zyx(&self.conf().patch_size).expect("checked at load")
    }

    /// The grid spacing the networks see for a case of `spacing` (a 2D configuration
    /// keeps the case's z spacing, as preprocessing).
    pub fn target_spacing(&self, spacing: [f64; 3]) -> [f64; 3] {
        let target = crate::preprocessing::target_spacing(&self.plans, &self.configuration).expect("checked at load");
        crate::preprocessing::case_target_spacing(target, spacing)
    }

    /// Mean logits of every network (and, with `mirror`, of nnU-Net's mirrored copies
    /// as well: 7 in 3D, 3 in-plane for a 2D network) for a batch of tiles `[n, C, tile]`
    /// on the model's device.
    pub fn logits(&self, tiles: &Tensor, mirror: bool) -> Tensor {
        let flips: Vec<Vec<i64>> = match (mirror, self.is_2d()) {
            (false, _) => vec![vec![]],
            (true, true) => vec![vec![], vec![3], vec![4], vec![3, 4]],
            (true, false) => {
                vec![vec![], vec![2], vec![3], vec![4], vec![2, 3], vec![2, 4], vec![3, 4], vec![2, 3, 4]]
            }
        };
        tch::no_grad(|| {
            let mut sum: Option<Tensor> = None;
            for (_, net) in &self.nets {
                for f in &flips {
                    let inp = if f.is_empty() { tiles.shallow_clone() } else { tiles.flip(f.as_slice()) };
                    let out = tch::autocast(self.device.is_cuda() && self.mixed_precision, || net.forward(&inp));
                    let mut p = out[0].to_kind(Kind::Float);
                    if !f.is_empty() {
                        p = p.flip(f.as_slice());
                    }
                    sum = Some(match sum {
                        Some(s) => s + p,
                        None => p,
                    });
                }
            }
            sum.expect("at least one network") / (self.nets.len() * flips.len()) as f64
        })
    }
}

/// What inference needs of a plan (a file a user can edit): its configuration, a 3D
/// spacing and patch, one normalisation per channel, and a network that builds and
/// runs on the patch (else torch panics mid-prediction).
fn check_plans(plans: &Plans, path: &Path) -> Result<()> {
    let bad = |m: String| Err(Error::invalid(path, m));
    let name = &plans.cps.configuration;
    let Some(conf) = plans.configuration(name) else {
        return bad(format!("no configuration {name} (cps.configuration)"));
    };
    let dims = conf.network.dim;
    if !(dims == 2 || dims == 3)
        || conf.spacing.len() != dims
        || conf.spacing.iter().any(|&s| !(s > 0.0 && s.is_finite()))
    {
        return bad(format!(
            "{name}: spacing {:?}: inference needs one positive, finite value per axis of its {dims}D network",
            conf.spacing
        ));
    }
    if conf.patch_size.len() != dims || conf.patch_size.contains(&0) {
        return bad(format!(
            "{name}: patch_size {:?}: inference needs one size per axis of its {dims}D network, each at least 1",
            conf.patch_size
        ));
    }
    if plans.channels.is_empty() || plans.normalization.len() != plans.channels.len() {
        return bad(format!(
            "{} channel(s) but {} normalization entries: one per channel",
            plans.channels.len(),
            plans.normalization.len()
        ));
    }
    if plans.normalization.iter().any(|n| !(n.std.is_finite() && n.mean.is_finite())) {
        return bad("normalization mean/std must be finite".into());
    }
    if conf.network.num_classes != plans.num_classes || plans.num_classes < 2 {
        return bad(format!(
            "num_classes {} but {name}'s network has {} outputs (at least 2, and the same)",
            plans.num_classes, conf.network.num_classes
        ));
    }
    let mut spec = conf.network.clone();
    spec.input_channels = plans.channels.len();
    spec.check(&conf.patch_size).map_err(|e| Error::invalid(path, format!("{name}: {e}")))?;
    conf.resampling.check().map_err(|e| Error::invalid(path, format!("{name}: {e}")))?;
    // The network's float32 weights and the file's copy of them, per network.
    let params = spec.count_parameters() as f64;
    crate::memory::check_memory(
        params * 8.0,
        &format!("{name}'s network ({params:.0} parameters)"),
        "check its features_per_stage",
    )
    .map_err(|e| Error::invalid(path, e))
}

/// Refuses options that cannot give a sensible prediction with this model, before
/// any case is computed.
pub fn check_options(model: &Model, opts: &PredictOptions) -> Result<()> {
    let s = opts.step;
    if !(s > 0.0 && s <= 1.0) {
        return Err(Error::invalid("--step", format!("{s} is not in (0, 1] (a fraction of the tile)")));
    }
    let conf = model.plans.configuration(&model.configuration).expect("checked at load");
    // (A 2D network's tiles are single slices: z moves slice by slice.)
    let smallest = conf.patch_size.iter().copied().min().unwrap_or(1).max(1);
    // Below one voxel the same tiles are computed over and over, without end.
    if s * (smallest as f64) < 1.0 {
        return Err(Error::invalid(
            "--step",
            format!(
                "{s} moves the {:?} tile by less than one voxel; use at least {}",
                conf.patch_size,
                1.0 / smallest as f64
            ),
        ));
    }
    if let Some(f) = opts.forced_spacing {
        if !(f.xy > 0.0 && f.xy.is_finite() && f.z > 0.0 && f.z.is_finite()) {
            return Err(Error::invalid("--forced-spacing", format!("{},{}: must be positive and finite", f.xy, f.z)));
        }
    }
    if opts.tiles_per_batch == 0 {
        return Err(Error::invalid("tiles_per_batch", "must be at least 1"));
    }
    Ok(())
}

/// Refuses a case whose channels do not match the plan, or whose network grid (from
/// its header and the spacing) cannot fit in memory; reads headers only.
/// The case's files are the plan's channels, in order: `CASE_0000`, `CASE_0001`, … (a
/// lone file without the suffix is channel 0 of a one-channel model). Anything else
/// would feed one channel's scan to another's weights.
fn check_channel_files(case: &Case, plan_channels: &std::collections::BTreeMap<usize, String>) -> Result<()> {
    let numbers: Vec<Option<usize>> = case
        .images
        .iter()
        .map(|p| crate::dataset::split_channel(&crate::io::nifti_stem(p)).map(|(_, ch)| ch))
        .collect();
    if numbers == [None] && plan_channels.len() == 1 {
        return Ok(());
    }
    let expected: Vec<usize> = plan_channels.keys().copied().collect();
    let found: Vec<usize> = numbers.iter().flatten().copied().collect();
    if numbers.iter().all(Option::is_some) && found == expected {
        return Ok(());
    }
    let missing: Vec<String> = expected
        .iter()
        .filter(|ch| !found.contains(ch))
        .map(|ch| format!("{ch} ({}, file {}_{ch:04})", plan_channels[ch], case.id))
        .collect();
    let unknown: Vec<&PathBuf> = case
        .images
        .iter()
        .zip(&numbers)
        .filter(|(_, n)| n.is_none_or(|ch| !plan_channels.contains_key(&ch)))
        .map(|(p, _)| p)
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("lacks channel {}", missing.join(", ")));
    }
    if !unknown.is_empty() {
        let names: Vec<String> = unknown.iter().map(|p| p.display().to_string()).collect();
        problems.push(format!("has files that are no channel of the plan: {}", names.join(", ")));
    }
    Err(Error::invalid(
        &case.images[0],
        format!(
            "case {} {} (the plan's channels: {}; files are named CASE_XXXX with XXXX the channel)",
            case.id,
            problems.join(" and "),
            plan_channels.iter().map(|(k, v)| format!("{k:04} {v}")).collect::<Vec<_>>().join(", ")
        ),
    ))
}

fn check_case(model: &Model, case: &Case, opts: &PredictOptions) -> Result<()> {
    let first = case.images.first().ok_or_else(|| Error::invalid(&case.id, "no image files"))?;
    let channels = model.plans.channels.len();
    check_channel_files(case, &model.plans.channels)?;
    if case.images.len() != channels {
        return Err(Error::invalid(
            first,
            format!("case {} has {} channel file(s), the model's plan {channels}", case.id, case.images.len()),
        ));
    }
    let header = crate::io::read_header(first)?;
    let shape = header.shape();
    let spacing = match opts.forced_spacing {
        Some(f) => f.apply(header.spacing(), shape[0]),
        None => header.spacing(),
    };
    let target = model.target_spacing(spacing);
    let tile = model.tile();
    // As compute_new_shape, in floating point: absurd spacings must not overflow.
    let grid: Vec<f64> = (0..3).map(|a| (spacing[a] / target[a] * shape[a] as f64).round().max(1.0)).collect();
    let (raw, net): (f64, f64) = (shape.iter().map(|&n| n as f64).product(), grid.iter().product());
    let (c, k) = (channels as f64, model.plans.num_classes as f64);
    // Channels as read and the label maps; the resampled, z-scored and tensor copies of
    // the grid; the score and weight slabs (two tile heights of the grid's planes).
    let slab = (2.0 * tile[0] as f64).min(grid[0]) * grid[1] * grid[2];
    let need = raw * (4.0 * c + 2.0) + net * 12.0 * c + slab * (k + 1.0) * 8.0;
    let flag = if opts.forced_spacing.is_some() { "a coarser --forced-spacing" } else { "a coarser plan spacing" };
    crate::memory::check_memory(
        need,
        &format!(
            "predicting {} ({:?} voxels at {:.3?} mm, a {:.0?} network grid at {:.3?} mm)",
            case.id, shape, spacing, grid, target
        ),
        &format!("use {flag}"),
    )
    .map_err(|e| Error::invalid(first, e))
}

/// One network from a safetensors file (`model.`-prefixed names from a checkpoint, or
/// bare names from an export); every tensor must be there.
fn load_network(
    path: &Path,
    spec: &crate::planning::topology::NetworkSpec,
    device: Device,
) -> Result<(nn::VarStore, UNet)> {
    let vs = nn::VarStore::new(device);
    let net = UNet::new(&vs.root(), spec);
    let loaded = crate::training::checkpoint::read_finite_tensors(path).map_err(|e| Error::invalid(path, e))?;
    let vars = vs.variables();
    let mut n = 0;
    for (name, t) in loaded {
        // Optimizer and loss-scaler state of a training checkpoint.
        if name.starts_with("momentum.") || name.starts_with("scaler.") {
            continue;
        }
        let key = name.strip_prefix("model.").unwrap_or(&name);
        let v = vars
            .get(key)
            .ok_or_else(|| Error::invalid(path, format!("tensor {name} is not in plans.json's network")))?;
        if v.size() != t.size() {
            return Err(Error::invalid(
                path,
                format!(
                    "{name} has shape {:?}, plans.json's network {:?}: weights and plan differ",
                    t.size(),
                    v.size()
                ),
            ));
        }
        tch::no_grad(|| v.shallow_clone().copy_(&t));
        n += 1;
    }
    if n != vars.len() {
        return Err(Error::invalid(path, format!("holds {n} of the {} tensors of plans.json's network", vars.len())));
    }
    // Prediction reads the full-resolution logits only: the lower heads are not run.
    let mut net = net;
    net.spec.deep_supervision = false;
    Ok((vs, net))
}

/// What predicting one case took.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub image: PathBuf,
    pub output: PathBuf,
    pub seconds: f64,
    pub network_shape: [usize; 3],
}

/// Predicts one case (its channel files) and writes the label map to `out` (and,
/// with `save_probabilities`, `CASE.npz` and `CASE.pkl` beside it).
pub fn predict_case(model: &Model, case: &Case, out: &Path, opts: &PredictOptions) -> Result<CaseReport> {
    check_options(model, opts)?;
    check_case(model, case, opts)?;
    let start = std::time::Instant::now();
    let loaded = Case { label: None, ..case.clone() }.load()?;
    let geometry = loaded.geometry;
    let channels = loaded.channels;
    let tile = model.tile();
    let shape = geometry.shape();
    let spacing = match opts.forced_spacing {
        Some(f) => f.apply(geometry.spacing(), shape[0]),
        None => geometry.spacing(),
    };
    let target = model.target_spacing(spacing);
    let bbox = nonzero_box(&channels);
    let cropped: [usize; 3] = std::array::from_fn(|a| bbox[a][1] - bbox[a][0]);
    let net_shape = compute_new_shape(cropped, spacing, target);
    let threshold = crate::preprocessing::resampling_of(&model.plans, &model.configuration)?.anisotropy_threshold;
    let sep = separate_axis(spacing, target, threshold);
    let norms = &model.plans.normalization;
    let c = channels.len();
    let resampled = crop_clip_resample(channels, bbox, norms, net_shape, sep);
    let mut flat = Vec::with_capacity(c * net_shape.iter().product::<usize>());
    for (i, r) in resampled.iter().enumerate() {
        let n = &norms[i.min(norms.len() - 1)];
        flat.extend(r.iter().map(|&v| n.standardize(v)));
    }
    drop(resampled);
    let [z, y, x] = net_shape.map(|v| v as i64);
    let volume = Tensor::from_slice(&flat).reshape([c as i64, z, y, x]).to_device(opts.device);
    drop(flat);
    let classes = model.plans.num_classes;
    // Back to the input grid: nnU-Net decides the separate axis with the network
    // spacing as the current one here.
    let back_sep = separate_axis(target, spacing, threshold);
    let mut to_grid = export::LogitsToGrid::new(classes, net_shape, cropped, back_sep);
    let mut cropped_labels = Array3::<u8>::zeros(cropped);
    let plane = cropped[1] * cropped[2];
    let npz = out.with_file_name(format!("{}.npz", case.id));
    let mut probabilities =
        if opts.save_probabilities { Some(export::ProbabilityWriter::new(&npz, classes)?) } else { None };
    let mut failure: Option<Error> = None;
    {
        let labels = cropped_labels.as_slice_mut().expect("standard layout");
        sliding::sliding_window_slabs(
            &volume,
            tile,
            opts.step,
            classes,
            opts.tiles_per_batch,
            |tiles| model.logits(tiles, opts.mirror),
            |zr, slab| {
                let host = Vec::<f32>::try_from(slab.to_device(Device::Cpu).contiguous().flatten(0, -1))
                    .expect("float logits");
                to_grid.push(&host, zr.len(), |oz, s| {
                    export::argmax_into(s, classes, &mut labels[oz * plane..(oz + 1) * plane]);
                    if let Some(p) = &mut probabilities {
                        if let Err(e) = p.push(s) {
                            failure.get_or_insert(e);
                        }
                    }
                });
            },
        );
    }
    drop(volume);
    if let Some(e) = failure {
        return Err(e);
    }
    assert!(to_grid.done(), "every input slice resampled");
    let mut full = Array3::<u8>::zeros(shape);
    full.slice_mut(crate::preprocessing::crop_slice(bbox)).assign(&cropped_labels);
    drop(cropped_labels);
    if opts.largest_component {
        postprocess::keep_largest_components(&mut full);
    }
    crate::io::write_labels_like(out, full.view(), &geometry)?;
    if let Some(p) = probabilities {
        p.finish(&npz, shape, bbox)?;
        write_properties(&out.with_file_name(format!("{}.pkl", case.id)), &geometry, bbox, cropped)?;
    }
    Ok(CaseReport {
        image: case.images[0].clone(),
        output: out.to_path_buf(),
        seconds: start.elapsed().as_secs_f64(),
        network_shape: net_shape,
    })
}

/// nnU-Net's `CASE.pkl` beside the probabilities, as its `NibabelIOWithReorient`
/// reader fills it: what `nnUNetv2_ensemble` needs to write a label map on the input's
/// grid (affines as nested lists, which nibabel accepts).
fn write_properties(
    path: &Path,
    geometry: &crate::io::Geometry,
    bbox: [[usize; 2]; 3],
    cropped: [usize; 3],
) -> Result<()> {
    use crate::interop::pickle::Value;
    let matrix = |a: &crate::io::geometry::Affine| {
        Value::List(a.iter().map(|row| Value::List(row.iter().map(|&v| Value::Float(v)).collect())).collect())
    };
    // The reoriented image's affine in nibabel's (i, j, k) = (x, y, z) voxel order.
    let canonical = geometry.affine();
    let mut reoriented = canonical;
    for (r, row) in reoriented.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().take(3).enumerate() {
            *v = canonical[r][2 - c];
        }
    }
    let ints = |v: &[usize]| Value::List(v.iter().map(|&x| Value::Int(x as i64)).collect());
    let props = Value::dict([
        // The file's spacing, as the reader reports it (not a forced one).
        ("spacing", Value::List(geometry.spacing().iter().map(|&v| Value::Float(v)).collect())),
        (
            "nibabel_stuff",
            Value::dict([
                ("original_affine", matrix(&geometry.file_affine)),
                ("reoriented_affine", matrix(&reoriented)),
            ]),
        ),
        ("shape_before_cropping", ints(&geometry.shape())),
        ("bbox_used_for_cropping", Value::List(bbox.iter().map(|b| ints(b)).collect())),
        ("shape_after_cropping_and_before_resampling", ints(&cropped)),
    ]);
    crate::interop::pickle::write_pickle(path, &props)
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
