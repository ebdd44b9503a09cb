//! What a training run is asked to do: options, devices, the thread budget, and which
//! options a resumed run may change (devices, epochs, iterations, workers) and which
//! it may not (the data, the fold, the seed, the patch, one network or two).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub shards: PathBuf,
    pub run_dir: PathBuf,
    /// One device per trainer (both may be the same).
    pub devices: Vec<String>,
    pub supervised_only: bool,
    pub epochs: Option<usize>,
    pub iterations: Option<usize>,
    pub seed: u64,
    /// nnU-Net's fold: "0".."4" (splits_final.json) or "all".
    #[serde(default = "default_fold")]
    pub fold: String,
    /// Batches of held-out patches per epoch for the pseudo-Dice (nnU-Net: 50).
    #[serde(default = "default_val_iterations")]
    pub val_iterations: usize,
    /// At the end, predict every held-out case whole and score it (nnU-Net's
    /// `perform_actual_validation`).
    #[serde(default = "default_true")]
    pub final_validation: bool,
    /// Mirroring in that validation (nnU-Net: on).
    #[serde(default = "default_true")]
    pub val_mirror: bool,
    pub loaders: usize,
    pub augmenters: usize,
    pub batchers: usize,
    pub no_augment: bool,
    pub patch: Option<[usize; 3]>,
    /// CPU threads for libtorch, shared by the trainers on the CPU (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// How long a trainer waits for a batch or for its sibling's labels, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Convolutions of the trainers on the CPU in bfloat16 (float32 weights, norms and
    /// losses): CPU autocast, the counterpart of fp16 autocast on CUDA.
    #[serde(default)]
    pub cpu_bf16: bool,
    /// Encoder stages, from full resolution, whose activations the backward pass
    /// recomputes instead of keeping them from the forward pass (0: keep everything).
    #[serde(default = "default_recompute_stages")]
    pub recompute_stages: usize,
    /// Cores the data path may use. Given, the loader and augmenter counts are tuned
    /// while training (unless `no_autotune`): loaders + augmenters ≤ cores + 1.
    #[serde(default)]
    pub data_cores: Option<usize>,
    #[serde(default)]
    pub no_autotune: bool,
    /// Seconds between autotune decisions.
    #[serde(default = "default_autotune_interval")]
    pub autotune_interval_seconds: f64,
}

fn default_autotune_interval() -> f64 {
    5.0
}

fn default_fold() -> String {
    "0".into()
}

fn default_val_iterations() -> usize {
    50
}

fn default_true() -> bool {
    true
}

/// The first two: at the 48×96×96 plan of the README's benchmark, −1.8 GB peak for
/// +1% step time; deeper stages hold little.
pub fn default_recompute_stages() -> usize {
    2
}

fn default_timeout() -> u64 {
    600
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            shards: PathBuf::new(),
            run_dir: PathBuf::new(),
            devices: default_devices(),
            supervised_only: false,
            epochs: None,
            iterations: None,
            seed: 0,
            fold: default_fold(),
            val_iterations: default_val_iterations(),
            final_validation: true,
            val_mirror: true,
            loaders: 1,
            augmenters: 1,
            batchers: 1,
            no_augment: false,
            patch: None,
            threads: None,
            timeout_seconds: default_timeout(),
            cpu_bf16: false,
            recompute_stages: default_recompute_stages(),
            data_cores: None,
            no_autotune: false,
            autotune_interval_seconds: default_autotune_interval(),
        }
    }
}

/// Whether this CPU computes bfloat16 dot products natively (AVX512-BF16), where
/// bfloat16 convolutions run at about twice the float32 rate; elsewhere they are
/// emulated and slower than float32 (15× slower per step with AVX2 kernels).
/// oneDNN, which runs the convolutions, can be capped below the CPU's instruction set
/// (`ONEDNN_MAX_CPU_ISA`, or the older `DNNL_MAX_CPU_ISA`, e.g. `AVX2` to run as on a CPU
/// without AVX-512): a cap below `AVX512_CORE_BF16` makes bfloat16 emulated here too.
pub fn cpu_has_native_bf16() -> bool {
    let cap = std::env::var("ONEDNN_MAX_CPU_ISA").or_else(|_| std::env::var("DNNL_MAX_CPU_ISA")).ok();
    cpu_has_bf16_instructions() && cap.as_deref().is_none_or(onednn_isa_allows_bf16)
}

/// Whether oneDNN capped at `isa` (a `ONEDNN_MAX_CPU_ISA` value, any case) may use
/// AVX512-BF16: the caps from `AVX512_CORE_BF16` up (and `ALL`, `DEFAULT`, empty: no cap).
pub fn onednn_isa_allows_bf16(isa: &str) -> bool {
    let isa = isa.trim().to_ascii_uppercase();
    let below = ["SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"];
    !below.contains(&isa.as_str())
}

fn cpu_has_bf16_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Two GPUs if present, else both trainers on one GPU, else the CPU.
pub fn default_devices() -> Vec<String> {
    match tch::Cuda::device_count() {
        0 => vec!["cpu".into(), "cpu".into()],
        1 => vec!["cuda:0".into(), "cuda:0".into()],
        _ => vec!["cuda:0".into(), "cuda:1".into()],
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => match s.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) if (i as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(i)),
            Some(i) => Err(Error::invalid(
                "--devices",
                format!("cuda:{i} requested, {} CUDA device(s) visible", tch::Cuda::device_count()),
            )),
            None => Err(Error::invalid("--devices", format!("\"{s}\" is not cpu or cuda:N"))),
        },
    }
}

impl TrainOptions {
    /// The trainers' devices: one per sibling (two, or one with `--supervised-only`;
    /// a single device serves both siblings).
    pub fn trainer_devices(&self) -> Result<Vec<Device>> {
        let wanted = if self.supervised_only { 1 } else { 2 };
        if self.devices.is_empty() || self.devices.len() > 2 {
            return Err(Error::invalid(
                "--devices",
                format!(
                    "{} device(s) given ({}): one or two, one per sibling",
                    self.devices.len(),
                    self.devices.join(",")
                ),
            ));
        }
        let devices: Vec<Device> = self.devices.iter().map(|d| parse_device(d)).collect::<Result<_>>()?;
        Ok((0..wanted).map(|i| *devices.get(i).unwrap_or(&devices[0])).collect())
    }

    /// Refuses numbers that cannot work, naming the flag.
    pub fn check(&self) -> Result<()> {
        let positive = |name: &str, v: Option<usize>| match v {
            Some(0) => Err(Error::invalid(name, "must be at least 1")),
            _ => Ok(()),
        };
        positive("--epochs", self.epochs)?;
        positive("--iterations", self.iterations)?;

        if !(self.autotune_interval_seconds > 0.0 && self.autotune_interval_seconds.is_finite()) {
            return Err(Error::invalid("--autotune-interval", "must be a positive number of seconds"));
        }
        // The command line's rule, also for a train.json written by hand.
        let counts = [
            ("--loaders", Some(self.loaders)),
            ("--augmenters", Some(self.augmenters)),
            ("--batchers", Some(self.batchers)),
            ("--threads", self.threads),
            ("--data-cores", self.data_cores),
        ];
        for (name, v) in counts {
            if let Some(v) = v {
                crate::util::check_workers(v).map_err(|e| Error::invalid(name, e))?;
            }
        }
        if self.timeout_seconds == 0 {
            return Err(Error::invalid("--timeout", "must be at least 1 second"));
        }
        self.trainer_devices().map(|_| ())
    }

    /// The autotuner's core budget, when it runs.
    pub fn autotune_cores(&self) -> Option<usize> {
        self.data_cores.filter(|_| !self.no_autotune)
    }

    /// libtorch's CPU threads: the budget split among the trainers on the CPU (both run
    /// at once, and libtorch's pool is shared), so that they do not oversubscribe the
    /// cores. `None` when no trainer runs on the CPU.
    pub fn torch_threads(&self, devices: &[Device]) -> Option<usize> {
        let on_cpu = devices.iter().filter(|d| **d == Device::Cpu).count();
        if on_cpu == 0 {
            return None;
        }
        let budget = self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Some((budget / on_cpu).max(1))
    }
}

/// What `train --resume` may ask for; `None` keeps the run's own value.
#[derive(Debug, Clone, Default)]
pub struct ResumeRequest {
    pub shards: Option<PathBuf>,
    pub devices: Option<Vec<String>>,
    pub epochs: Option<usize>,
    pub iterations: Option<usize>,
    pub supervised_only: Option<bool>,
    pub fold: Option<String>,
    pub seed: Option<u64>,
    pub patch: Option<[usize; 3]>,
    pub no_augment: Option<bool>,
    pub loaders: Option<usize>,
    pub augmenters: Option<usize>,
    pub batchers: Option<usize>,
    pub threads: Option<usize>,
}

/// The options of the run in `run_dir` (its `train.json`) with what a resume may change
/// applied; a change that would make it another run is refused with the reason.
pub fn resume_options(run_dir: &Path, req: &ResumeRequest) -> Result<TrainOptions> {
    let path = run_dir.join("train.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut o: TrainOptions = serde_json::from_str(&text).map_err(|e| Error::json(&path, e))?;
    o.run_dir = run_dir.to_path_buf();
    let fixed = |name: &str, same: bool, why: &str| -> Result<()> {
        if same {
            Ok(())
        } else {
            Err(Error::invalid(
                run_dir,
                format!("{name} cannot change when resuming ({why}); start a new run (--out) instead"),
            ))
        }
    };
    if !o.shards.is_dir() {
        return Err(Error::invalid(
            &o.shards,
            format!(
                "the shard folder this run trains on is gone (moved or deleted); put it back there, or set \
                 \"shards\" in {} to where it is now",
                path.display()
            ),
        ));
    }
    if let Some(s) = &req.shards {
        let same = std::fs::canonicalize(s).ok().as_deref() == Some(o.shards.as_path()) || *s == o.shards;
        fixed("SHARDS", same, &format!("the run trains on {}", o.shards.display()))?;
    }
    if let Some(v) = req.supervised_only {
        fixed("--supervised-only", v == o.supervised_only, "it decides whether there are one or two networks")?;
    }
    if let Some(v) = &req.fold {
        fixed("--fold", *v == o.fold, &format!("the run holds out fold {}", o.fold))?;
    }
    if let Some(v) = req.seed {
        fixed("--seed", v == o.seed, "it decides every batch")?;
    }
    if let Some(v) = req.patch {
        fixed("--patch", Some(v) == o.patch, "the networks were trained on the run's patch")?;
    }
    if let Some(v) = req.no_augment {
        fixed("--no-augment", v == o.no_augment, "the batches would change")?;
    }
    if let Some(d) = &req.devices {
        // A run started on two GPUs may go on on one, or on the CPU.
        o.devices = d.clone();
    }
    o.epochs = req.epochs.or(o.epochs);
    o.iterations = req.iterations.or(o.iterations);
    o.loaders = req.loaders.unwrap_or(o.loaders);
    o.augmenters = req.augmenters.unwrap_or(o.augmenters);
    o.batchers = req.batchers.unwrap_or(o.batchers);
    o.threads = req.threads.or(o.threads);
    o.check()?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_budget_is_split_between_the_trainers_on_the_cpu() {
        let opts = TrainOptions { threads: Some(8), ..Default::default() };
        assert_eq!(opts.torch_threads(&[Device::Cpu, Device::Cpu]), Some(4));
        assert_eq!(opts.torch_threads(&[Device::Cpu]), Some(8));
        // A trainer on a GPU takes no CPU threads from the budget.
        assert_eq!(opts.torch_threads(&[Device::Cuda(0), Device::Cpu]), Some(8));
        assert_eq!(opts.torch_threads(&[Device::Cuda(0), Device::Cuda(1)]), None);
        // Never below one thread each.
        let one = TrainOptions { threads: Some(1), ..Default::default() };
        assert_eq!(one.torch_threads(&[Device::Cpu, Device::Cpu]), Some(1));
    }
}

#[cfg(test)]
mod isa_cap_tests {
    use super::onednn_isa_allows_bf16;

    #[test]
    fn a_onednn_cap_below_avx512_bf16_makes_bfloat16_emulated() {
        for capped in ["AVX2", "avx2", "AVX512_CORE", "AVX512_CORE_VNNI", "SSE41", "AVX2_VNNI"] {
            assert!(!onednn_isa_allows_bf16(capped), "{capped}");
        }
        for open in ["AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10_1_512", "ALL", "DEFAULT", ""] {
            assert!(onednn_isa_allows_bf16(open), "{open}");
        }
    }
}
