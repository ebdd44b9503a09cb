//! Autotuning: moves workers between the loader and augmenter stages while the path
//! runs, within a core budget, to keep the consumers fed with the fewest cores.
//!
//! Every interval the tuner reads the path's telemetry. When the consumers are starved
//! (the batch queue was empty on average) it adds a worker to the busier stage while
//! the budget allows, and at the budget moves one from the idler stage to the busier
//! one; when the batch queue stays full (the consumers are the limit) it removes a
//! worker from the idler stage. Every change is measured (over at least a few batches)
//! after a settling interval; a configuration that delivered fewer batches/s than the
//! one it replaced is undone and not tried again, so the search ends at a local best
//! (with 2–4 cores, the best).
//! Batches keep their order and numbering through every change (see
//! [`Control::set_workers`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Control, Stage};

#[derive(Debug, Clone, Copy)]
pub struct AutotuneConfig {
    /// Cores the data path may use: loaders + augmenters ≤ cores + 1, as `cps3d tune`
    /// counts (the batcher only copies, and a worker waiting on I/O leaves its core free).
    pub cores: usize,
    /// Time between decisions (also the settling and measuring time of a change).
    pub interval: Duration,
}

/// One change and the telemetry that drove it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub seconds: f64,
    /// Loaders and augmenters before and after.
    pub from: [usize; 2],
    pub to: [usize; 2],
    pub reason: String,
    /// Batches per second measured in the configuration being left.
    pub batches_per_s: f64,
    /// Busy share per worker of the loaders and augmenters.
    pub busy: [f64; 2],
    /// Mean depth of the batch queue over the interval, and its capacity.
    pub batch_queue: f64,
    pub batch_queue_capacity: usize,
}

/// The tuner's thread; dropping it stops it.
pub struct Autotuner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    decisions: Arc<Mutex<Vec<Decision>>>,
}

impl Autotuner {
    /// Tunes `path` until stopped. `on_decision` sees every change as it is made.
    pub fn start(path: Control, cfg: AutotuneConfig, on_decision: impl Fn(&Decision) + Send + 'static) -> Autotuner {
        let stop = Arc::new(AtomicBool::new(false));
        let decisions = Arc::new(Mutex::new(Vec::new()));
        let (s, d) = (stop.clone(), decisions.clone());
        let thread = std::thread::Builder::new()
            .name("datapath-autotune".into())
            .spawn(move || run(&path, cfg, &s, &d, &on_decision))
            .expect("spawning the autotune thread");
        Autotuner { stop, thread: Some(thread), decisions }
    }

    pub fn decisions(&self) -> Vec<Decision> {
        self.decisions.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the tuner and returns its decisions.
    pub fn stop(mut self) -> Vec<Decision> {
        self.halt();
        self.decisions()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Autotuner {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Batches a measurement must see before its rate is trusted, and the most intervals it
/// waits for them (consumers that take nothing at all, e.g. while validating, still end it).
const MIN_BATCHES_MEASURED: u64 = 4;
const MAX_WINDOWS_MEASURED: usize = 20;

/// Cumulative counters at one instant: batcher items, loader and augmenter busy ns,
/// batch-queue depth samples and their sum.
#[derive(Clone, Copy)]
struct Reading {
    at: Instant,
    batches: u64,
    busy_ns: [u64; 2],
    queue: (u64, u64),
}

fn read(path: &Control) -> Reading {
    let t = path.telemetry();
    Reading {
        at: Instant::now(),
        batches: t.stage("batcher").items.load(Ordering::Relaxed),
        busy_ns: [
            t.stage("loader").busy_ns.load(Ordering::Relaxed),
            t.stage("augmenter").busy_ns.load(Ordering::Relaxed),
        ],
        queue: t.queues[2].totals(),
    }
}

/// What one interval measured.
struct Interval {
    batches_per_s: f64,
    busy: [f64; 2],
    queue: f64,
}

fn measure(a: Reading, b: Reading, workers: [usize; 2]) -> Interval {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    let share = |i: usize| (b.busy_ns[i] - a.busy_ns[i]) as f64 / 1e9 / (secs * workers[i].max(1) as f64);
    let samples = (b.queue.0 - a.queue.0).max(1);
    Interval {
        batches_per_s: (b.batches - a.batches) as f64 / secs,
        busy: [share(0), share(1)],
        queue: (b.queue.1 - a.queue.1) as f64 / samples as f64,
    }
}

/// Sleeps `d` in small steps; false when stopped.
fn wait(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())));
    }
    !stop.load(Ordering::Relaxed)
}

fn run(
    path: &Control,
    cfg: AutotuneConfig,
    stop: &AtomicBool,
    decisions: &Mutex<Vec<Decision>>,
    on_decision: &dyn Fn(&Decision),
) {
    let started = Instant::now();
    let budget = cfg.cores.max(1) + 1;
    let capacity = path.batch_queue_capacity();
    // Batches/s measured per (loaders, augmenters), and configurations found worse.
    let mut measured: HashMap<[usize; 2], f64> = HashMap::new();
    let mut rejected: std::collections::HashSet<[usize; 2]> = Default::default();
    // The configuration a change left, to undo it if the new one measures worse.
    let mut previous: Option<[usize; 2]> = None;
    loop {
        // Settle after the last change, then measure.
        if !wait(cfg.interval, stop) {
            return;
        }
        let a = read(path);
        // A rate from one or two batches is noise (one slow consumer step would undo a
        // good change), so the window grows until a few batches have passed.
        let mut b;
        let mut windows = 0;
        loop {
            if !wait(cfg.interval, stop) {
                return;
            }
            b = read(path);
            windows += 1;
            if b.batches - a.batches >= MIN_BATCHES_MEASURED || windows >= MAX_WINDOWS_MEASURED {
                break;
            }
        }
        if path.stopping() {
            return;
        }
        let w = path.workers();
        let current = [w[0], w[1]];
        let m = measure(a, b, current);
        measured.insert(current, m.batches_per_s);
        let starved = m.queue < 0.5;
        let (busier, idler) = if m.busy[0] >= m.busy[1] { (0, 1) } else { (1, 0) };
        let mut next = None;
        let mut reason = String::new();
        if let Some(prev) = previous.take() {
            let before = measured.get(&prev).copied().unwrap_or(0.0);
            // Worse than what it replaced (beyond noise), or no longer keeping up: undo.
            let fell_behind = starved && before > 0.0 && prev.iter().sum::<usize>() > current.iter().sum::<usize>();
            if m.batches_per_s < 0.97 * before || fell_behind {
                rejected.insert(current);
                next = Some(prev);
                reason = format!("undo: {:.2} batches/s here vs {before:.2} before", m.batches_per_s);
            }
        }
        if next.is_none() {
            let total = current[0] + current[1];
            let mut candidates: Vec<([usize; 2], String)> = Vec::new();
            let with = |i: usize, d: isize| {
                let mut c = current;
                c[i] = (c[i] as isize + d) as usize;
                c
            };
            if starved {
                if total < budget {
                    candidates.push((with(busier, 1), format!("consumers starved; {} busiest", name(busier))));
                    candidates.push((with(idler, 1), format!("consumers starved; trying another {}", name(idler))));
                } else if current[idler] > 1 {
                    let mut c = with(idler, -1);
                    c[busier] += 1;
                    candidates.push((c, format!("consumers starved at the budget; {} busiest", name(busier))));
                }
                if total >= budget && current[busier] > 1 {
                    let mut c = with(busier, -1);
                    c[idler] += 1;
                    candidates.push((c, "consumers starved at the budget; trying the other split".into()));
                }
            } else if m.queue >= capacity as f64 - 0.5 && total > 2 {
                // From the idler stage that has a worker to spare (all idle: the larger one).
                let spare = (0..2)
                    .filter(|&i| current[i] > 1)
                    .min_by(|&a, &b| m.busy[a].total_cmp(&m.busy[b]).then(current[b].cmp(&current[a])));
                if let Some(i) = spare {
                    candidates.push((with(i, -1), format!("batch queue full; a {} fewer", name(i))));
                }
            }
            // Not a configuration found worse, nor one already measured slower than this one.
            let promising =
                |c: &[usize; 2]| !rejected.contains(c) && measured.get(c).is_none_or(|&t| t > 1.03 * m.batches_per_s);
            if let Some((c, why)) = candidates.into_iter().find(|(c, _)| promising(c)) {
                next = Some(c);
                reason = why;
                previous = Some(current);
            }
        }
        let Some(to) = next else { continue };
        if path.set_workers(Stage::Loader, to[0]).is_err() || path.set_workers(Stage::Augmenter, to[1]).is_err() {
            return;
        }
        let d = Decision {
            seconds: started.elapsed().as_secs_f64(),
            from: current,
            to,
            reason,
            batches_per_s: m.batches_per_s,
            busy: m.busy,
            batch_queue: m.queue,
            batch_queue_capacity: capacity,
        };
        tracing::info!(
            "autotune: loaders {}→{}, augmenters {}→{} ({}; {:.2} batches/s, busy loader {:.0}% augmenter {:.0}%, batch queue {:.1}/{})",
            d.from[0],
            d.to[0],
            d.from[1],
            d.to[1],
            d.reason,
            d.batches_per_s,
            d.busy[0] * 100.0,
            d.busy[1] * 100.0,
            d.batch_queue,
            d.batch_queue_capacity
        );
        on_decision(&d);
        decisions.lock().unwrap_or_else(|e| e.into_inner()).push(d);
    }
}

fn name(i: usize) -> &'static str {
    if i == 0 {
        "loader"
    } else {
        "augmenter"
    }
}
