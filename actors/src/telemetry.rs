//! Per-stage counters of the data path: items, busy time, time blocked sending and
//! receiving, errors and restarts, plus sampled queue depths. Workers add to atomics;
//! snapshots turn them into rates and name the stage that limits throughput.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct StageStats {
    pub name: &'static str,
    pub workers: AtomicUsize,
    pub items: AtomicU64,
    pub busy_ns: AtomicU64,
    pub send_blocked_ns: AtomicU64,
    pub recv_blocked_ns: AtomicU64,
    pub errors: AtomicU64,
    pub restarts: AtomicU64,
}

impl StageStats {
    pub fn new(name: &'static str, workers: usize) -> StageStats {
        StageStats { name, workers: AtomicUsize::new(workers), ..Default::default() }
    }

    pub fn add_busy(&self, since: Instant) {
        self.busy_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn add_send_blocked(&self, since: Instant) {
        self.send_blocked_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn add_recv_blocked(&self, since: Instant) {
        self.recv_blocked_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Depth of one bounded queue, sampled.
#[derive(Debug)]
pub struct QueueStats {
    pub name: &'static str,
    pub capacity: usize,
    samples: AtomicU64,
    sum: AtomicU64,
    max: AtomicUsize,
    /// The latest sample.
    last: AtomicUsize,
}

impl QueueStats {
    pub fn new(name: &'static str, capacity: usize) -> QueueStats {
        QueueStats {
            name,
            capacity,
            samples: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicUsize::new(0),
            last: AtomicUsize::new(0),
        }
    }

    /// Samples taken and the sum of their depths, since the start.
    pub fn totals(&self) -> (u64, u64) {
        (self.samples.load(Ordering::Relaxed), self.sum.load(Ordering::Relaxed))
    }

    /// The depth at the latest sample.
    pub fn depth(&self) -> usize {
        self.last.load(Ordering::Relaxed)
    }

    pub fn record(&self, depth: usize) {
        self.last.store(depth, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(depth as u64, Ordering::Relaxed);
        self.max.fetch_max(depth, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSnapshot {
    pub name: String,
    pub workers: usize,
    pub items: u64,
    pub items_per_s: f64,
    /// Shares of the workers' wall time (sum over workers / (workers × wall)).
    pub busy: f64,
    pub blocked_send: f64,
    pub blocked_recv: f64,
    pub busy_seconds: f64,
    pub errors: u64,
    pub restarts: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueSnapshot {
    pub name: String,
    pub capacity: usize,
    pub mean_depth: f64,
    pub max_depth: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub seconds: f64,
    pub stages: Vec<StageSnapshot>,
    pub queues: Vec<QueueSnapshot>,
    /// The stage whose workers are busiest; "consumer" when every stage mostly
    /// waits to send (the trainers are the limit).
    pub bottleneck: String,
}

/// (items, busy, send-blocked, recv-blocked ns) of a stage at one instant.
type Counters = (u64, u64, u64, u64);

pub struct Telemetry {
    pub started: Instant,
    pub stages: Vec<StageStats>,
    pub queues: Vec<QueueStats>,
    last: Mutex<Option<(Instant, Vec<Counters>)>>,
}

impl Telemetry {
    pub fn new(stages: Vec<StageStats>, queues: Vec<QueueStats>) -> Telemetry {
        Telemetry { started: Instant::now(), stages, queues, last: Mutex::new(None) }
    }

    pub fn stage(&self, name: &str) -> &StageStats {
        self.stages.iter().find(|s| s.name == name).expect("known stage")
    }

    fn snapshot_from(&self, wall: Duration, base: Option<&[Counters]>) -> Snapshot {
        let secs = wall.as_secs_f64().max(1e-9);
        let stages: Vec<StageSnapshot> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let now = (
                    s.items.load(Ordering::Relaxed),
                    s.busy_ns.load(Ordering::Relaxed),
                    s.send_blocked_ns.load(Ordering::Relaxed),
                    s.recv_blocked_ns.load(Ordering::Relaxed),
                );
                let b = base.map(|b| b[i]).unwrap_or((0, 0, 0, 0));
                let workers = s.workers.load(Ordering::Relaxed).max(1);
                let share = |ns: u64| ns as f64 / 1e9 / (secs * workers as f64);
                StageSnapshot {
                    name: s.name.to_string(),
                    workers,
                    items: now.0 - b.0,
                    items_per_s: (now.0 - b.0) as f64 / secs,
                    busy: share(now.1 - b.1),
                    blocked_send: share(now.2 - b.2),
                    blocked_recv: share(now.3 - b.3),
                    busy_seconds: (now.1 - b.1) as f64 / 1e9,
                    errors: s.errors.load(Ordering::Relaxed),
                    restarts: s.restarts.load(Ordering::Relaxed),
                }
            })
            .collect();
        let busiest = stages.iter().max_by(|a, b| a.busy.total_cmp(&b.busy));
        // Blocked time is booked when a send completes, so a path stalled behind a slow
        // consumer shows no busy time at all in an interval: that, too, is the consumer.
        let bottleneck = match busiest {
            Some(s) if s.busy < 0.05 => "consumer".to_string(),
            Some(s) if s.busy >= 0.5 || stages.iter().all(|t| t.blocked_send < 0.5) => s.name.clone(),
            _ => "consumer".to_string(),
        };
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let n = q.samples.load(Ordering::Relaxed).max(1);
                QueueSnapshot {
                    name: q.name.to_string(),
                    capacity: q.capacity,
                    mean_depth: q.sum.load(Ordering::Relaxed) as f64 / n as f64,
                    max_depth: q.max.load(Ordering::Relaxed),
                }
            })
            .collect();
        Snapshot { seconds: secs, stages, queues, bottleneck }
    }

    /// Totals since the start.
    pub fn summary(&self) -> Snapshot {
        self.snapshot_from(self.started.elapsed(), None)
    }

    /// Rates since the previous call (for periodic logging).
    pub fn interval(&self) -> Snapshot {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let current: Vec<_> = self
            .stages
            .iter()
            .map(|s| {
                (
                    s.items.load(Ordering::Relaxed),
                    s.busy_ns.load(Ordering::Relaxed),
                    s.send_blocked_ns.load(Ordering::Relaxed),
                    s.recv_blocked_ns.load(Ordering::Relaxed),
                )
            })
            .collect();
        let snap = match last.as_ref() {
            Some((t, base)) => self.snapshot_from(now - *t, Some(base)),
            None => self.snapshot_from(now - self.started, None),
        };
        *last = Some((now, current));
        snap
    }
}

impl Snapshot {
    pub fn render(&self) -> String {
        let mut s = String::new();
        for st in &self.stages {
            s.push_str(&format!(
                "{}×{}: {:.1}/s busy {:.0}% send-blocked {:.0}% recv-blocked {:.0}%{}{}; ",
                st.name,
                st.workers,
                st.items_per_s,
                st.busy * 100.0,
                st.blocked_send * 100.0,
                st.blocked_recv * 100.0,
                if st.errors > 0 { format!(" errors {}", st.errors) } else { String::new() },
                if st.restarts > 0 { format!(" restarts {}", st.restarts) } else { String::new() },
            ));
        }
        for q in &self.queues {
            s.push_str(&format!("{} queue {:.1}/{} (max {}); ", q.name, q.mean_depth, q.capacity, q.max_depth));
        }
        s.push_str(&format!("bottleneck: {}", self.bottleneck));
        s
    }
}

/// Peak resident set size of this process in bytes (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Resident set size of this process now, in bytes (VmRSS), where /proc has it.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
