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
    /// c10d process groups for multi-rank training: NCCL (CUDA) was compiled in.
    pub nccl: bool,
    pub cpu_threads: i32,
    pub cpu_cores: usize,
    /// bfloat16 dot products in hardware (`train --cpu-bf16`, the demo's default).
    pub cpu_native_bf16: bool,
    /// Measured convolution throughput on one CPU thread (see [`ConvThroughput`]).
    pub cpu_convolution: ConvThroughput,
}

/// GFLOP/s of one 3×3×3 convolution's forward and backward passes (data and weight
/// gradients: 3 × 2·N·C_out·C_in·27·voxels FLOPs) on one CPU thread, as each demo
/// trainer runs: the demo's full-resolution layer (a batch of 4 patches of 16×48×48
/// voxels, 16 → 16 channels, channels-last as the networks run). Timed over 3 passes
/// after a warm-up one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvThroughput {
    pub float32_gflops: f64,
    /// Only where bfloat16 is native: emulated, it is far slower than float32.
    pub bfloat16_gflops: Option<f64>,
}

/// Measures [`ConvThroughput`] (about a second with AVX2 kernels).
pub fn convolution_throughput() -> ConvThroughput {
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let float32_gflops = conv_gflops(tch::Kind::Float);
    let bfloat16_gflops = crate::training::options::cpu_has_native_bf16().then(|| conv_gflops(tch::Kind::BFloat16));
    tch::set_num_threads(threads);
    ConvThroughput { float32_gflops, bfloat16_gflops }
}

fn conv_gflops(kind: tch::Kind) -> f64 {
    use crate::training::network::channels_last;
    let (n, c, voxels) = (4i64, 16i64, [16i64, 48, 48]);
    let opts = (kind, tch::Device::Cpu);
    let x = channels_last(&tch::Tensor::randn([n, c, voxels[0], voxels[1], voxels[2]], opts)).set_requires_grad(true);
    let w = channels_last(&tch::Tensor::randn([c, c, 3, 3, 3], opts)).set_requires_grad(true);
    let pass = || {
        let y = x.conv3d(&w, None::<tch::Tensor>, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1);
        y.sum(tch::Kind::Float).backward();
    };
    pass();
    let timed = 3;
    let start = std::time::Instant::now();
    for _ in 0..timed {
        pass();
    }
    let seconds = start.elapsed().as_secs_f64() / timed as f64;
    let flops = 3.0 * 2.0 * (n * c * c * 27 * voxels.iter().product::<i64>()) as f64;
    flops / seconds / 1e9
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
        nccl: crate::distributed::has_nccl(),
        cpu_threads: tch::get_num_threads(),
        cpu_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_native_bf16: crate::training::options::cpu_has_native_bf16(),
        cpu_convolution: convolution_throughput(),
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
        writeln!(
            f,
            "multi-rank training (c10d): Gloo{}",
            if self.nccl { ", NCCL" } else { " (CUDA gradients through host memory: this build has no NCCL)" }
        )?;
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
        )?;
        write!(
            f,
            "\nconvolution throughput, one thread (3x3x3, 16 channels, forward + backward): float32 {:.0} GFLOP/s",
            self.cpu_convolution.float32_gflops
        )?;
        if let Some(b) = self.cpu_convolution.bfloat16_gflops {
            write!(f, ", bfloat16 {b:.0} GFLOP/s")?;
        }
        Ok(())
    }
}
