//! Subcommands, one module each; errors become a message naming the file and a
//! non-zero exit status.

mod ablation;
mod bench;
mod dataset;
mod demo;
mod evaluate;
mod export;
mod planning;
mod predict;
mod preprocess;
mod progress;
mod ranks;
mod show;
mod synth;
mod train;
mod verify;
mod workflow;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cps3d",
    version,
    about = "3D Cross Pseudo Supervision for CT organ segmentation on an nnU-Net-style pipeline"
)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the libtorch version, CUDA availability, GPUs and CPU threads.
    Info {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Raw datasets in nnU-Net layout.
    Dataset {
        #[command(subcommand)]
        command: dataset::DatasetCommand,
    },
    /// Write a synthetic abdominal CT dataset (13 FLARE22 organs) in nnU-Net layout.
    Synth(synth::SynthArgs),
    /// Dataset fingerprint: spacings, shapes, intensity statistics (all voxels and foreground).
    Fingerprint(planning::FingerprintArgs),
    /// Plans from a fingerprint: nnU-Net's heuristics for 3d_fullres and 2d, plus CPS training settings.
    Plan(planning::PlanArgs),
    /// Crop, resample and write shards (resumable; one scan in memory per worker).
    Preprocess(preprocess::PreprocessArgs),
    /// Check every shard (bricks, locations, header); list the bad ones, exit non-zero if any.
    Verify(verify::VerifyArgs),
    /// Run the data path alone (loaders → augmenters → batchers) and report throughput per stage.
    Bench(bench::BenchArgs),
    /// Sweep loader/augmenter counts within a core budget and recommend one.
    Tune(bench::TuneArgs),
    /// Train the two CPS siblings (or one supervised network) from shards; --resume continues a run.
    Train(train::TrainArgs),
    /// Write a checkpoint's network weights as plain safetensors (loadable by PyTorch).
    Export(export::ExportArgs),
    /// Segment images with a trained run: sliding window, optional forced spacing, back to the input's grid.
    Predict(predict::PredictArgs),
    /// A preview PNG of a case: axial, coronal and sagittal slices with the labels outlined over the CT.
    Show(show::ShowArgs),
    /// FLARE22 DSC and NSD per case and organ (official rules); CSV in the official layout plus a summary.
    Evaluate(evaluate::EvaluateArgs),
    /// The whole pipeline on synthetic phantoms (or --data DIR): plan, preprocess, CPS training, predict, evaluate.
    Demo(demo::DemoArgs),
    /// The paper's Table 3: 2D/3D × baseline/CPS arms over seeds on one dataset, scored on held-out cases.
    Ablation(ablation::AblationArgs),
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own stage lines; the data path's telemetry would drown them.
    let quiet = cli.quiet || (matches!(cli.command, Command::Demo(_) | Command::Ablation(_)) && cli.verbose == 0);
    init_logging(cli.verbose, quiet);
    let result = match cli.command {
        Command::Info { json } => {
            let info = cps3d::info::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&info).expect("info serialises"));
            } else {
                println!("{info}");
            }
            Ok(())
        }
        Command::Dataset { command } => dataset::run(command),
        Command::Synth(args) => synth::run(args),
        Command::Fingerprint(args) => planning::fingerprint(args),
        Command::Plan(args) => planning::run_plan(args),
        Command::Preprocess(args) => preprocess::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Bench(args) => bench::bench(args),
        Command::Tune(args) => bench::tune(args),
        Command::Train(args) => train::run(args),
        Command::Export(args) => export::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Show(args) => show::run(args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Ablation(args) => ablation::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses "A,B,C" (or "AxBxC") into numbers.
pub(crate) fn parse_list<T: std::str::FromStr>(s: &str, n: usize) -> Result<Vec<T>, String> {
    let parts: Vec<&str> = s.split([',', 'x']).map(str::trim).collect();
    if parts.len() != n {
        return Err(format!("expected {n} comma-separated numbers, got \"{s}\""));
    }
    parts.iter().map(|p| p.parse::<T>().map_err(|_| format!("\"{p}\" is not a valid number"))).collect()
}

/// Three whole numbers, Z,Y,X, each at least 1 (patches, shapes, bricks).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Zyx(pub [usize; 3]);

impl std::str::FromStr for Zyx {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v = parse_list::<usize>(s, 3)?;
        if v.contains(&0) {
            return Err(format!("Z,Y,X must each be at least 1, got \"{s}\""));
        }
        Ok(Zyx([v[0], v[1], v[2]]))
    }
}

/// A range MIN,MAX.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MinMax(pub f64, pub f64);

impl std::str::FromStr for MinMax {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v = parse_list::<f64>(s, 2)?;
        Ok(MinMax(v[0], v[1]))
    }
}

pub(crate) fn default_workers() -> usize {
    cps3d::util::cores()
}

/// Value parser for worker counts (`-j`, actor counts, `--cores`, threads): 1..=max_workers().
pub(crate) fn workers(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("\"{s}\" is not a whole number"))?;
    cps3d::util::check_workers(n)
}

/// Value parser for a whole number in `lo..=hi`.
pub(crate) fn between(lo: usize, hi: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let n: usize = s.trim().parse().map_err(|_| format!("\"{s}\" is not a whole number"))?;
        if n < lo || n > hi {
            return Err(format!("{n} is not in {lo}..={hi}"));
        }
        Ok(n)
    }
}

/// Value parser for counts that must be at least 1 (epochs, iterations, features).
pub(crate) fn positive(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("\"{s}\" is not a whole number"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// Value parser for a positive, finite real number (spacings, memory sizes).
pub(crate) fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s} must be positive and finite"));
    }
    Ok(v)
}

/// Starts the `/metrics` server when an address is given and says where it listens.
pub(crate) fn start_metrics(addr: Option<&str>) -> anyhow::Result<()> {
    start_rank_metrics(addr, None)
}

/// [`start_metrics`] for one rank of a multi-process run: local rank l listens on the
/// given port + l (port 0: any free port) and labels its series `rank`.
pub(crate) fn start_rank_metrics(
    addr: Option<&str>,
    rank: Option<&cps3d::distributed::launch::Launch>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let Some(addr) = addr else { return Ok(()) };
    let addr = match rank {
        Some(l) => cps3d::distributed::launch::rank_port(addr, l.local_rank)
            .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?,
        None => addr.to_string(),
    };
    let bound = cps3d::metrics::serve(&addr, rank.map(|l| l.rank))
        .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
    eprintln!("metrics: http://{bound}/metrics");
    Ok(())
}

/// Runs `f`, turning a panic into an error that names `what`: a pool whose threads
/// cannot be spawned panics inside std, and the user should get a message instead.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = cps3d_actors::pool::panic_message(p.as_ref());
        Err(anyhow::anyhow!("{what} stopped: {msg} (if threads could not be spawned, use fewer workers)"))
    })
}

/// The device named on the command line, else the first GPU when there is one, else the CPU.
pub(crate) fn device_or_default(name: Option<&str>) -> anyhow::Result<tch::Device> {
    Ok(match name {
        Some(d) => cps3d::training::run::parse_device(d)?,
        None => tch::Device::cuda_if_available(),
    })
}
