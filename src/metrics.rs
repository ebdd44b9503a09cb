//! Live metrics over HTTP for Prometheus: `GET /metrics` in the OpenMetrics text format
//! (which Prometheus scrapes natively), served by actix-web on `--metrics-addr` for
//! `train`, `bench` and `tune`.
//!
//! One registry per process, made when the server starts: the data paths register their
//! telemetry (read at scrape time, summed over every path the process ran, since training
//! starts one per epoch), the trainers record each step, and the epoch loop its losses,
//! λ, learning rate and pseudo-Dice. Without a server nothing is recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use cps3d_actors::telemetry::{peak_rss_bytes, rss_bytes, Telemetry};

/// Label sets: a few (name, value) pairs.
pub type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;
type StepHistogram = Family<Labels, Histogram, fn() -> Histogram>;

/// What the trainers and the epoch loop record.
#[derive(Clone)]
pub struct TrainerMetrics {
    pub step_seconds: StepHistogram,
    pub data_wait_seconds: Family<Labels, FloatCounter>,
    pub steps: Family<Labels, Counter>,
    pub loss: Family<Labels, FloatGauge>,
    pub pseudo_dice: Family<Labels, FloatGauge>,
    pub lambda: FloatGauge,
    pub learning_rate: FloatGauge,
    pub epoch: Gauge,
}

fn step_histogram() -> Histogram {
    // 10 ms to ~40 s: a tiny CPU network to the paper's network on a slow GPU.
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

impl TrainerMetrics {
    fn new() -> TrainerMetrics {
        TrainerMetrics {
            step_seconds: Family::new_with_constructor(step_histogram as fn() -> Histogram),
            data_wait_seconds: Family::default(),
            steps: Family::default(),
            loss: Family::default(),
            pseudo_dice: Family::default(),
            lambda: FloatGauge::default(),
            learning_rate: FloatGauge::default(),
            epoch: Gauge::default(),
        }
    }

    /// One finished training step of `sibling`.
    pub fn record_step(&self, sibling: usize, seconds: f64, data_wait_seconds: f64) {
        let l = sibling_labels(sibling);
        self.step_seconds.get_or_create(&l).observe(seconds);
        self.data_wait_seconds.get_or_create(&l).inc_by(data_wait_seconds);
        self.steps.get_or_create(&l).inc();
    }

    /// The schedule of the epoch about to be trained.
    pub fn record_epoch_start(&self, epoch: usize, lr: f64, lambda: f64) {
        self.epoch.set(epoch as i64);
        self.learning_rate.set(lr);
        self.lambda.set(lambda);
    }

    /// A finished epoch, per sibling: its mean losses (total, supervised, cps) and its
    /// pseudo-Dice per organ (NaN where absent).
    pub fn record_epoch(&self, losses: &[[f64; 3]], pseudo_dice: &[Vec<f64>]) {
        for (i, values) in losses.iter().enumerate() {
            for (term, v) in ["total", "supervised", "cps"].iter().zip(values) {
                self.loss.get_or_create(&vec![("sibling", i.to_string()), ("term", term.to_string())]).set(*v);
            }
        }
        for (i, d) in pseudo_dice.iter().enumerate() {
            self.pseudo_dice.get_or_create(&sibling_labels(i)).set(crate::util::mean_finite(d));
        }
    }
}

pub fn sibling_labels(sibling: usize) -> Labels {
    vec![("sibling", sibling.to_string())]
}

/// The process's registry and the handles that feed it.
pub struct Metrics {
    registry: Registry,
    pub trainer: TrainerMetrics,
    /// Worker changes the autotuner made.
    pub autotune_decisions: Counter,
    datapaths: Arc<DataPathCollector>,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, once a server has started.
pub fn global() -> Option<&'static Metrics> {
    GLOBAL.get()
}

impl Metrics {
    /// The registry; with `rank` (a rank of a multi-process run) every series carries it
    /// as the label `rank`.
    fn new(rank: Option<usize>) -> Metrics {
        let labels = rank.map(|r| (std::borrow::Cow::Borrowed("rank"), std::borrow::Cow::Owned(r.to_string())));
        let mut registry = Registry::with_prefix_and_labels("cps3d", labels.into_iter());
        let trainer = TrainerMetrics::new();
        registry.register_with_unit(
            "trainer_step",
            "Wall time of one training step per sibling",
            Unit::Seconds,
            trainer.step_seconds.clone(),
        );
        registry.register_with_unit(
            "trainer_data_wait",
            "Time the sibling waited for its next batch",
            Unit::Seconds,
            trainer.data_wait_seconds.clone(),
        );
        registry.register("trainer_steps", "Training steps done per sibling", trainer.steps.clone());
        registry.register(
            "trainer_loss",
            "Mean loss of the last epoch per sibling and term (total, supervised, cps)",
            trainer.loss.clone(),
        );
        registry.register(
            "trainer_pseudo_dice",
            "Mean pseudo-Dice over the organs of the last validation, per sibling",
            trainer.pseudo_dice.clone(),
        );
        registry.register("trainer_cps_lambda", "Weight of the CPS term this epoch", trainer.lambda.clone());
        registry.register("trainer_learning_rate", "SGD learning rate this epoch", trainer.learning_rate.clone());
        registry.register("trainer_epoch", "Epoch being trained (0-based)", trainer.epoch.clone());
        let autotune_decisions = Counter::default();
        registry.register(
            "autotune_decisions",
            "Worker changes the autotuner made (details in RUN/autotune.jsonl)",
            autotune_decisions.clone(),
        );
        let datapaths = Arc::new(DataPathCollector::default());
        registry.register_collector(Box::new(datapaths.clone()));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics { registry, trainer, autotune_decisions, datapaths }
    }

    /// Adds a data path's counters to what is served (kept after the path stops).
    pub fn watch_datapath(&self, telemetry: Arc<Telemetry>) {
        self.datapaths.add(telemetry);
    }

    /// The exposition: OpenMetrics text, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a collector's error would be a bug.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("metrics encode");
        out
    }
}

/// Registers `telemetry` with the global metrics, if a server runs.
pub fn watch_datapath(telemetry: Arc<Telemetry>) {
    if let Some(m) = global() {
        m.watch_datapath(telemetry);
    }
}

/// Counters of every data path the process started; gauges of the latest.
#[derive(Default)]
struct DataPathCollector {
    paths: Mutex<Vec<Arc<Telemetry>>>,
}

impl std::fmt::Debug for DataPathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.paths.lock().map(|p| p.len()).unwrap_or(0);
        write!(f, "DataPathCollector({n} data paths)")
    }
}

impl DataPathCollector {
    fn add(&self, t: Arc<Telemetry>) {
        self.paths.lock().unwrap_or_else(|e| e.into_inner()).push(t);
    }
}

/// One metric family of constant values, one per label set (an empty set: no labels).
/// `make` is `ConstCounter::new` or `ConstGauge::new`.
fn family<N: Copy, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: &[(Labels, N)],
    make: impl Fn(N) -> M,
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = values.first() else { return Ok(()) };
    let mut family = encoder.encode_descriptor(name, help, unit, make(*first).metric_type())?;
    for (labels, v) in values {
        if labels.is_empty() {
            make(*v).encode(family)?;
            break;
        }
        make(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for DataPathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let paths = self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(latest) = paths.last() else { return Ok(()) };
        let stage = |name: &str| -> Labels { vec![("stage", name.to_string())] };
        let sum = |name: &str, f: &dyn Fn(&cps3d_actors::telemetry::StageStats) -> u64| -> u64 {
            paths.iter().flat_map(|t| t.stages.iter()).filter(|s| s.name == name).map(f).sum()
        };
        let names: Vec<&'static str> = latest.stages.iter().map(|s| s.name).collect();
        let per_stage = |f: &dyn Fn(&cps3d_actors::telemetry::StageStats) -> u64| -> Vec<(Labels, u64)> {
            names.iter().map(|n| (stage(n), sum(n, f))).collect()
        };
        let seconds = |f: &dyn Fn(&cps3d_actors::telemetry::StageStats) -> u64| -> Vec<(Labels, f64)> {
            names.iter().map(|n| (stage(n), sum(n, f) as f64 / 1e9)).collect()
        };
        family(
            &mut encoder,
            "datapath_items",
            "Items a stage finished (loader: samples read, augmenter: samples, batcher: batches)",
            None,
            &per_stage(&|s| s.items.load(Ordering::Relaxed)),
            ConstCounter::new,
        )?;
        family(
            &mut encoder,
            "datapath_busy",
            "Time a stage's workers spent working, summed over workers",
            Some(&Unit::Seconds),
            &seconds(&|s| s.busy_ns.load(Ordering::Relaxed)),
            ConstCounter::new,
        )?;
        let mut blocked = Vec::new();
        for n in &names {
            for (direction, v) in [
                ("send", sum(n, &|s| s.send_blocked_ns.load(Ordering::Relaxed))),
                ("recv", sum(n, &|s| s.recv_blocked_ns.load(Ordering::Relaxed))),
            ] {
                blocked.push((vec![("stage", n.to_string()), ("direction", direction.to_string())], v as f64 / 1e9));
            }
        }
        family(
            &mut encoder,
            "datapath_blocked",
            "Time a stage's workers waited to send downstream or to receive from upstream",
            Some(&Unit::Seconds),
            &blocked,
            ConstCounter::new,
        )?;
        family(
            &mut encoder,
            "datapath_errors",
            "Items a stage failed on (an unreadable shard, a failed augmentation)",
            None,
            &per_stage(&|s| s.errors.load(Ordering::Relaxed)),
            ConstCounter::new,
        )?;
        family(
            &mut encoder,
            "datapath_restarts",
            "Workers restarted after a panic",
            None,
            &per_stage(&|s| s.restarts.load(Ordering::Relaxed)),
            ConstCounter::new,
        )?;
        let workers: Vec<(Labels, i64)> =
            latest.stages.iter().map(|s| (stage(s.name), s.workers.load(Ordering::Relaxed) as i64)).collect();
        family(
            &mut encoder,
            "datapath_workers",
            "Workers of each stage in the current data path",
            None,
            &workers,
            ConstGauge::new,
        )?;
        let queue = |q: &cps3d_actors::telemetry::QueueStats| -> Labels { vec![("queue", q.name.to_string())] };
        let depth: Vec<(Labels, i64)> = latest.queues.iter().map(|q| (queue(q), q.depth() as i64)).collect();
        family(
            &mut encoder,
            "datapath_queue_depth",
            "Items waiting in a bounded queue (sampled)",
            None,
            &depth,
            ConstGauge::new,
        )?;
        let capacity: Vec<(Labels, i64)> = latest.queues.iter().map(|q| (queue(q), q.capacity as i64)).collect();
        family(
            &mut encoder,
            "datapath_queue_capacity",
            "Capacity of a bounded queue",
            None,
            &capacity,
            ConstGauge::new,
        )?;
        Ok(())
    }
}

/// Memory and shard I/O of the whole process, read at scrape time.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let none: Labels = Vec::new();
        if let Some(rss) = rss_bytes() {
            family(
                &mut encoder,
                "process_resident_memory",
                "Resident set size",
                Some(&Unit::Bytes),
                &[(none.clone(), rss as i64)],
                ConstGauge::new,
            )?;
        }
        if let Some(peak) = peak_rss_bytes() {
            family(
                &mut encoder,
                "process_peak_resident_memory",
                "Largest resident set size so far",
                Some(&Unit::Bytes),
                &[(none.clone(), peak as i64)],
                ConstGauge::new,
            )?;
        }
        let io = cps3d_storage::io_stats();
        family(
            &mut encoder,
            "shards_open",
            "Shards memory-mapped now",
            None,
            &[(none.clone(), io.open_shards)],
            ConstGauge::new,
        )?;
        family(
            &mut encoder,
            "shard_read",
            "Compressed brick bytes read from shards",
            Some(&Unit::Bytes),
            &[(none.clone(), io.bytes_read)],
            ConstCounter::new,
        )?;
        family(
            &mut encoder,
            "shard_decompressed",
            "Bytes those bricks decompressed to",
            Some(&Unit::Bytes),
            &[(none, io.bytes_decompressed)],
            ConstCounter::new,
        )?;
        Ok(())
    }
}

/// Starts the HTTP server on `addr` (port 0: any free port) in its own thread and returns
/// the address it listens on. The metrics are recorded from then on; `rank` labels them.
pub fn serve(addr: &str, rank: Option<usize>) -> std::io::Result<SocketAddr> {
    let metrics = GLOBAL.get_or_init(|| Metrics::new(rank));
    let listener = std::net::TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
        let system = actix_web::rt::System::new();
        let started = system.block_on(async move {
            let server = actix_web::HttpServer::new(move || {
                actix_web::App::new()
                    .route(
                        "/metrics",
                        actix_web::web::get().to(move || async move {
                            actix_web::HttpResponse::Ok()
                                .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
                                .body(metrics.encode())
                        }),
                    )
                    .default_service(actix_web::web::to(|| async {
                        actix_web::HttpResponse::NotFound().body("cps3d serves GET /metrics\n")
                    }))
            })
            .workers(1)
            .disable_signals()
            .listen(listener);
            match server {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s.run().await
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    Ok(())
                }
            }
        });
        if let Err(e) = started {
            tracing::warn!("metrics server stopped: {e}");
        }
    })?;
    ready_rx.recv().map_err(|_| std::io::Error::other("the metrics server thread ended before listening"))??;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_steps_become_a_histogram_and_counters_per_sibling() {
        let m = Metrics::new(None);
        m.trainer.record_step(1, 0.3, 0.01);
        m.trainer.record_step(1, 0.5, 0.0);
        m.trainer.lambda.set(0.25);
        let text = m.encode();
        for line in [
            "cps3d_trainer_step_seconds_count{sibling=\"1\"} 2",
            "cps3d_trainer_step_seconds_sum{sibling=\"1\"} 0.8",
            "cps3d_trainer_steps_total{sibling=\"1\"} 2",
            "cps3d_trainer_data_wait_seconds_total{sibling=\"1\"} 0.01",
            "cps3d_trainer_cps_lambda 0.25",
            "# TYPE cps3d_trainer_step_seconds histogram",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // 0.3 s falls in the bucket up to 0.32 s (10 ms × 2^5), 0.5 s in the next.
        let bucket =
            |le: &str| text.lines().find(|l| l.contains("step_seconds_bucket") && l.contains(le)).map(str::to_owned);
        assert!(bucket("le=\"0.32\"").is_some_and(|l| l.ends_with(" 1")), "{text}");
        assert!(bucket("le=\"0.64\"").is_some_and(|l| l.ends_with(" 2")), "{text}");
        // No data path yet: no data-path families, and the text is still complete.
        assert!(!text.contains("datapath_items") && text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_rank_of_a_multi_process_run_labels_every_series_with_it() {
        let m = Metrics::new(Some(3));
        m.trainer.record_step(0, 0.3, 0.0);
        m.trainer.lambda.set(0.5);
        let text = m.encode();
        assert!(text.contains("cps3d_trainer_steps_total{rank=\"3\",sibling=\"0\"} 1"), "{text}");
        assert!(text.contains("cps3d_trainer_cps_lambda{rank=\"3\"} 0.5"), "{text}");
        // The collectors' series too (the process's memory).
        assert!(text.lines().any(|l| l.starts_with("cps3d_process_resident_memory_bytes{rank=\"3\"}")), "{text}");
    }
}
