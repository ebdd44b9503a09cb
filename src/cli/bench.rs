//! `cps3d bench` and `cps3d tune`: the data path measured, and its worker counts searched.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::Zyx;
use cps3d_actors::augment::AugmentConfig;
use cps3d_actors::datapath::autotune::{AutotuneConfig, Autotuner, Decision};
use cps3d_actors::datapath::{DataPath, DataPathConfig};
use cps3d_actors::telemetry::{peak_rss_bytes, Snapshot};

#[derive(Args, Debug, Clone)]
pub struct DataPathArgs {
    /// Shard folder from `cps3d preprocess` (with manifest.json and plans.json).
    pub shards: PathBuf,
    /// Loader workers.
    #[arg(long, default_value_t = 1, value_parser = super::workers, allow_negative_numbers = true)]
    pub loaders: usize,
    /// Augmenter workers.
    #[arg(long, default_value_t = 1, value_parser = super::workers, allow_negative_numbers = true)]
    pub augmenters: usize,
    /// Batcher workers.
    #[arg(long, default_value_t = 1, value_parser = super::workers, allow_negative_numbers = true)]
    pub batchers: usize,
    /// Queue capacities in items: raw samples, augmented samples, batches per consumer.
    #[arg(long, default_value_t = 4, value_parser = super::between(1, MAX_QUEUE), allow_negative_numbers = true)]
    pub raw_queue: usize,
    #[arg(long, default_value_t = 4, value_parser = super::between(1, MAX_QUEUE), allow_negative_numbers = true)]
    pub augmented_queue: usize,
    #[arg(long, default_value_t = 2, value_parser = super::between(1, MAX_QUEUE), allow_negative_numbers = true)]
    pub batch_queue: usize,
    /// Patch Z,Y,X (default: the plan's).
    #[arg(long)]
    pub patch: Option<Zyx>,
    /// Labeled and unlabeled samples per batch (default: the plan's CPS batch).
    #[arg(long)]
    pub labeled: Option<usize>,
    #[arg(long)]
    pub unlabeled: Option<usize>,
    /// Read and crop only: no augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// Consumers that each receive every batch (2 = the two CPS trainers).
    #[arg(long, default_value_t = 2, value_parser = super::between(1, 64), allow_negative_numbers = true)]
    pub consumers: usize,
    /// Shards each loader keeps mapped.
    #[arg(long, default_value_t = 16, value_parser = super::between(1, 4096), allow_negative_numbers = true)]
    pub open_shards: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Serve live metrics for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9184; port 0
    /// picks a free one; the address is printed on stderr).
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

/// Queue capacities are allocated up front (crossbeam's bounded channels).
const MAX_QUEUE: usize = 4096;

/// Builds the data-path configuration from a shard folder and the options, refusing
/// one whose buffers cannot fit in memory.
pub fn datapath_config(a: &DataPathArgs) -> Result<DataPathConfig> {
    let knobs = a.knobs();
    let cfg = cps3d::training::data::datapath_config(&a.shards, &knobs)
        .with_context(|| format!("{} (a shard folder from `cps3d preprocess`)", a.shards.display()))?;
    check_datapath_memory(&cfg)?;
    Ok(cfg)
}

/// Refuses a data path that would outgrow memory (`bench --labeled 100000` grew to
/// 24 GB and was killed), with the numbers.
pub fn check_datapath_memory(cfg: &DataPathConfig) -> Result<()> {
    let what = format!(
        "the data path (patch {:?}, batches of {}+{} samples, {} loader(s), {} augmenter(s), {} batcher(s), \
         queues {}/{}/{}, {} consumer(s))",
        cfg.patch,
        cfg.labeled_batch,
        cfg.unlabeled_batch,
        cfg.loaders,
        cfg.augmenters,
        cfg.batchers,
        cfg.raw_queue,
        cfg.augmented_queue,
        cfg.batch_queue,
        cfg.consumers
    );
    cps3d::memory::check_memory(
        cps3d::training::data::datapath_bytes(cfg),
        &what,
        "use a smaller --patch, --labeled/--unlabeled, fewer workers or shorter queues",
    )
    .map_err(anyhow::Error::msg)
}

impl DataPathArgs {
    pub fn knobs(&self) -> cps3d::training::data::DataKnobs {
        cps3d::training::data::DataKnobs {
            loaders: self.loaders,
            augmenters: self.augmenters,
            batchers: self.batchers,
            raw_queue: self.raw_queue,
            augmented_queue: self.augmented_queue,
            batch_queue: self.batch_queue,
            patch: self.patch.map(|p| p.0),
            labeled: self.labeled,
            unlabeled: self.unlabeled,
            no_augment: self.no_augment,
            consumers: self.consumers,
            open_shards: self.open_shards,
            seed: self.seed,
            global: None,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub loaders: usize,
    pub augmenters: usize,
    pub batchers: usize,
    pub patch: [usize; 3],
    pub labeled_batch: usize,
    pub unlabeled_batch: usize,
    pub augmentation: bool,
    pub batches: usize,
    pub patches: usize,
    pub seconds: f64,
    pub patches_per_s: f64,
    /// Worker busy time summed over all stages, in cores.
    pub busy_cores: f64,
    pub patches_per_busy_core_s: f64,
    pub peak_rss_mb: f64,
    pub queue_bound_mb: f64,
    pub telemetry: Snapshot,
    /// With `--autotune`: its changes, and patches/s in the configuration it ended with,
    /// from one interval after its last change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_workers: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_patches_per_s: Option<f64>,
}

/// Runs the data path alone for `batches` batches after `warmup` (consumers take
/// every batch at once, as infinitely fast trainers would).
pub fn run_bench(
    cfg: DataPathConfig,
    warmup: usize,
    batches: usize,
    autotune: Option<AutotuneConfig>,
) -> Result<BenchReport> {
    let samples = cfg.labeled_batch + cfg.unlabeled_batch;
    let (patch, bl, bu, consumers) = (cfg.patch, cfg.labeled_batch, cfg.unlabeled_batch, cfg.consumers);
    let augmentation = cfg.augmentation != AugmentConfig::none();
    let (l, a, b) = (cfg.loaders, cfg.augmenters, cfg.batchers);
    let queue_bound_mb = cfg.queue_bytes() as f64 / 1e6;
    let mut dp = super::no_panic("starting the data path", || DataPath::start(cfg).map_err(anyhow::Error::msg))?;
    cps3d::metrics::watch_datapath(dp.telemetry_handle());
    let take = |dp: &DataPath| -> Result<()> {
        for c in 0..consumers {
            if dp.next(c, Duration::from_secs(600)).is_none() {
                bail!("the data path stopped: {}", dp.failure().unwrap_or_else(|| "timeout".into()));
            }
        }
        Ok(())
    };
    for _ in 0..warmup {
        take(&dp)?;
    }
    let tuner = autotune.map(|c| {
        Autotuner::start(dp.control(), c, |d| {
            eprintln!(
                "autotune at {:.1} s: loaders {} -> {}, augmenters {} -> {} ({}; {:.2} batches/s, busy loader {:.0}% augmenter {:.0}%)",
                d.seconds, d.from[0], d.to[0], d.from[1], d.to[1], d.reason, d.batches_per_s, d.busy[0] * 100.0, d.busy[1] * 100.0
            )
        })
    });
    let before = dp.telemetry();
    let start = Instant::now();
    let mut done = Vec::with_capacity(batches);
    for _ in 0..batches {
        take(&dp)?;
        done.push(start.elapsed().as_secs_f64());
    }
    let seconds = start.elapsed().as_secs_f64();
    let decisions = tuner.map(Autotuner::stop).unwrap_or_default();
    let final_workers = autotune.map(|_| {
        let w = dp.workers();
        [w[0], w[1]]
    });
    // Patches/s once the last change has settled (one interval after it).
    let settled_patches_per_s = autotune.and_then(|c| {
        let from = decisions.last().map_or(0.0, |d| d.seconds + c.interval.as_secs_f64());
        let after: Vec<f64> = done.iter().copied().filter(|&t| t > from).collect();
        (after.len() >= 2).then(|| ((after.len() - 1) * samples) as f64 / (after[after.len() - 1] - after[0]))
    });
    let after = dp.stop();
    let busy: f64 = after.stages.iter().zip(&before.stages).map(|(x, y)| x.busy_seconds - y.busy_seconds).sum();
    let patches = batches * samples;
    Ok(BenchReport {
        loaders: l,
        augmenters: a,
        batchers: b,
        patch,
        labeled_batch: bl,
        unlabeled_batch: bu,
        augmentation,
        batches,
        patches,
        seconds,
        patches_per_s: patches as f64 / seconds,
        busy_cores: busy / seconds,
        patches_per_busy_core_s: patches as f64 / busy.max(1e-9),
        peak_rss_mb: peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
        queue_bound_mb,
        telemetry: after,
        decisions,
        final_workers,
        settled_patches_per_s,
    })
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub path: DataPathArgs,
    /// Batches to time (after 2 warm-up batches).
    #[arg(long, default_value_t = 20, value_parser = super::positive, allow_negative_numbers = true)]
    pub batches: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Move workers between loaders and augmenters while it runs, within --cores, to
    /// the fastest split (starting from --loaders/--augmenters); prints every change.
    #[arg(long)]
    pub autotune: bool,
    /// The core budget of --autotune: loaders + augmenters ≤ cores + 1, as `tune` counts.
    #[arg(long, default_value_t = super::default_workers(), requires = "autotune")]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    pub cores: usize,
    /// Seconds between autotune decisions (each change settles, then is measured, for this long).
    #[arg(long, default_value_t = 2.0, requires = "autotune", value_parser = super::planning::positive_f64)]
    pub autotune_interval: f64,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let cfg = datapath_config(&a.path)?;
    super::start_metrics(a.path.metrics_addr.as_deref())?;
    let autotune =
        a.autotune.then(|| AutotuneConfig { cores: a.cores, interval: Duration::from_secs_f64(a.autotune_interval) });
    let r = run_bench(cfg, 2, a.batches, autotune)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} batches of {}+{} patches {:?} ({}) in {:.2} s: {:.2} patches/s; busy cores {:.2}; {:.2} patches/s per busy core",
        r.batches,
        r.labeled_batch,
        r.unlabeled_batch,
        r.patch,
        if r.augmentation { "nnU-Net augmentation" } else { "no augmentation" },
        r.seconds,
        r.patches_per_s,
        r.busy_cores,
        r.patches_per_busy_core_s
    );
    for s in &r.telemetry.stages {
        println!(
            "  {:<10} ×{}  {:>8.2} items/s  busy {:>5.1}%  blocked send {:>5.1}%  blocked recv {:>5.1}%  errors {}  restarts {}",
            s.name,
            s.workers,
            s.items_per_s,
            s.busy * 100.0,
            s.blocked_send * 100.0,
            s.blocked_recv * 100.0,
            s.errors,
            s.restarts
        );
    }
    for q in &r.telemetry.queues {
        println!("  queue {:<10} mean depth {:.1} / {} (max {})", q.name, q.mean_depth, q.capacity, q.max_depth);
    }
    println!("bottleneck: {}", r.telemetry.bottleneck);
    println!("peak RSS {:.0} MB (queues hold at most {:.0} MB)", r.peak_rss_mb, r.queue_bound_mb);
    if let Some(w) = r.final_workers {
        let settled = r
            .settled_patches_per_s
            .map_or("too few batches after it to measure".into(), |p| format!("{p:.2} patches/s once settled"));
        println!(
            "autotune: {} change(s); ended with --loaders {} --augmenters {}; {settled}",
            r.decisions.len(),
            w[0],
            w[1]
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct TuneArgs {
    #[command(flatten)]
    pub path: DataPathArgs,
    /// Cores the data path may use (default: all).
    #[arg(long, default_value_t = super::default_workers())]
    #[arg(value_parser = super::workers, allow_negative_numbers = true)]
    pub cores: usize,
    /// Batches timed per configuration.
    #[arg(long, default_value_t = 8, value_parser = super::positive, allow_negative_numbers = true)]
    pub batches: usize,
    #[arg(long)]
    pub json: bool,
}

/// Loader and augmenter counts to try within a core budget: loaders + augmenters ≤
/// cores + 1 (the batcher only copies, and a worker waiting on I/O leaves its core free).
pub fn tune_candidates(cores: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for l in 1..=cores.max(1) {
        for a in 1..=cores.max(1) {
            if l + a <= cores + 1 {
                v.push((l, a, 1));
            }
        }
    }
    v
}

pub fn tune(a: TuneArgs) -> Result<()> {
    super::start_metrics(a.path.metrics_addr.as_deref())?;
    let mut reports = Vec::new();
    for (l, aug, b) in tune_candidates(a.cores) {
        let mut args = a.path.clone();
        (args.loaders, args.augmenters, args.batchers) = (l, aug, b);
        let cfg = datapath_config(&args)?;
        let r = run_bench(cfg, 1, a.batches, None)?;
        eprintln!(
            "loaders {l} augmenters {aug} batchers {b}: {:.2} patches/s ({})",
            r.patches_per_s, r.telemetry.bottleneck
        );
        reports.push(r);
    }
    let best = reports
        .iter()
        .max_by(|x, y| {
            // Within 3% of the best, fewer workers wins.
            let (px, py) = (x.patches_per_s, y.patches_per_s);
            if (px - py).abs() < 0.03 * px.max(py) {
                (y.loaders + y.augmenters).cmp(&(x.loaders + x.augmenters))
            } else {
                px.total_cmp(&py)
            }
        })
        .context("no configuration ran")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "runs": reports, "recommended": best }))?);
        return Ok(());
    }
    println!(
        "{:>7} {:>10} {:>8} {:>11} {:>10} {:>16}  bottleneck",
        "loaders", "augmenters", "batchers", "patches/s", "busy cores", "per busy core/s"
    );
    for r in &reports {
        println!(
            "{:>7} {:>10} {:>8} {:>11.2} {:>10.2} {:>16.2}  {}",
            r.loaders,
            r.augmenters,
            r.batchers,
            r.patches_per_s,
            r.busy_cores,
            r.patches_per_busy_core_s,
            r.telemetry.bottleneck
        );
    }
    println!(
        "recommended for {} cores: --loaders {} --augmenters {} --batchers {} ({:.2} patches/s)",
        a.cores, best.loaders, best.augmenters, best.batchers, best.patches_per_s
    );
    Ok(())
}
