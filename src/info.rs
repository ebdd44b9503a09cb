//! `cps3d info`: what libtorch this binary runs on and which devices it sees.

#[derive(Debug, Clone, serde::Serialize)]
pub struct Info {
    pub cps3d_version: &'static str,
    pub libtorch_version: &'static str,
    pub libtorch_dir: &'static str,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub cuda_device_count: i64,
    pub cuda_devices: Vec<String>,
    pub cpu_threads: i32,
    pub cpu_cores: usize,
    /// bfloat16 dot products in hardware (`train --cpu-bf16`, the demo's default).
    pub cpu_native_bf16: bool,
}

pub fn collect() -> Info {
    let cuda_available = tch::Cuda::is_available();
    let count = if cuda_available { tch::Cuda::device_count() } else { 0 };
    Info {
        cps3d_version: env!("CARGO_PKG_VERSION"),
        libtorch_version: env!("CPS3D_LIBTORCH_VERSION"),
        libtorch_dir: env!("CPS3D_LIBTORCH_DIR"),
        cuda_available,
        cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
        cuda_device_count: count,
        cuda_devices: if count > 0 { gpu_names(count as usize) } else { Vec::new() },
        cpu_threads: tch::get_num_threads(),
        cpu_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_native_bf16: crate::training::options::cpu_has_native_bf16(),
    }
}

/// tch exposes no device names; nvidia-smi, when present, lists them in CUDA order
/// (unless CUDA_VISIBLE_DEVICES reorders them, which is then said).
fn gpu_names(count: usize) -> Vec<String> {
    let listed = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(|l| l.trim().to_string()).collect::<Vec<_>>())
        .unwrap_or_default();
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    (0..count)
        .map(|i| {
            let name = if visible.is_none() { listed.get(i).cloned() } else { None };
            format!("cuda:{i}: {}", name.unwrap_or_else(|| "name unknown (nvidia-smi not available)".into()))
        })
        .collect()
}

impl std::fmt::Display for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "cps3d {}", self.cps3d_version)?;
        writeln!(f, "libtorch {} ({})", self.libtorch_version, self.libtorch_dir)?;
        if self.cuda_available {
            writeln!(
                f,
                "CUDA available: yes, {} device(s), cuDNN {}",
                self.cuda_device_count,
                if self.cudnn_available { "yes" } else { "no" }
            )?;
            for d in &self.cuda_devices {
                writeln!(f, "  {d}")?;
            }
        } else {
            writeln!(f, "CUDA available: no (training and inference run on the CPU)")?;
        }
        write!(
            f,
            "CPU: {} cores, libtorch uses {} threads, bfloat16 {}",
            self.cpu_cores,
            self.cpu_threads,
            if self.cpu_native_bf16 {
                "native (train --cpu-bf16: ~1.5x faster steps)"
            } else {
                "emulated (keep float32)"
            }
        )
    }
}
