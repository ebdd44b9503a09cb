//! The control plane: an actix actor that restarts crashed workers, samples queue
//! depths and logs telemetry. (Its mailbox is unbounded; it carries control
//! messages only, never patches.)

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix::prelude::*;

use super::{stages, Shared, Stage};

struct Coordinator {
    shared: Weak<Shared>,
    log_interval: Duration,
    /// Per stage: crashes in a row with no item finished in between, and the stage's
    /// item count at the last crash.
    crashes: std::collections::HashMap<&'static str, (usize, u64)>,
}

/// A stage whose workers crash this many times in a row without finishing a single
/// item is not restarted again: the data path fails with the last panic instead of
/// looping (a worker that panics now and then keeps being restarted).
const MAX_CRASHES_WITHOUT_PROGRESS: usize = 5;

#[derive(Message)]
#[rtype(result = "()")]
struct WorkerDown {
    stage: Stage,
    id: usize,
    generation: u32,
    message: String,
}

impl Actor for Coordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(50), |this, _| {
            if let Some(sh) = this.shared.upgrade() {
                sh.telemetry.queues[0].record(sh.raw.1.len());
                sh.telemetry.queues[1].record(sh.augmented.1.len());
                sh.telemetry.queues[2].record(sh.outputs.iter().map(|o| o.len()).max().unwrap_or(0));
            }
        });
        ctx.run_interval(self.log_interval, |this, _| {
            if let Some(sh) = this.shared.upgrade() {
                if !sh.stopping() {
                    tracing::info!("data path: {}", sh.telemetry.interval().render());
                }
            }
        });
    }
}

impl Handler<WorkerDown> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: WorkerDown, ctx: &mut Self::Context) {
        let Some(sh) = self.shared.upgrade() else { return };
        let name = msg.stage.name();
        let stats = sh.telemetry.stage(name);
        let (restarts, items) = (stats.restarts.load(Ordering::Relaxed), stats.items.load(Ordering::Relaxed));
        let entry = self.crashes.entry(name).or_insert((0, u64::MAX));
        entry.0 = if items == entry.1 { entry.0 + 1 } else { 1 };
        entry.1 = items;
        let in_a_row = entry.0;
        if in_a_row >= MAX_CRASHES_WITHOUT_PROGRESS {
            sh.fail(format!(
                "{name} workers crashed {in_a_row} times in a row without finishing an item; not restarting \
                 (last: {name} {}: {})",
                msg.id, msg.message
            ));
            return;
        }
        // Back off: 50 ms, doubling with each crash in a row.
        let delay = Duration::from_millis(50 << (in_a_row - 1).min(6));
        tracing::error!(
            "{name} {} crashed ({}); restarting it in {} ms (restart #{restarts} of that stage)",
            msg.id,
            msg.message,
            delay.as_millis()
        );
        ctx.run_later(delay, move |this, _| {
            if let Some(sh) = this.shared.upgrade() {
                // Not a worker retired since it crashed.
                if let (false, Some(retire)) = (sh.stopping(), sh.retire_flag(msg.stage, msg.id)) {
                    stages::spawn(sh.clone(), msg.stage, msg.id, msg.generation + 1, retire);
                }
            }
        });
    }
}

pub(crate) struct CoordinatorHandle {
    addr: Addr<Coordinator>,
    system: actix::System,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CoordinatorHandle {
    pub fn worker_down(&self, stage: Stage, id: usize, generation: u32, message: String) {
        self.addr.do_send(WorkerDown { stage, id, generation, message });
    }

    pub fn shutdown(mut self) {
        self.system.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the coordinator on its own thread with its own actix system.
pub(crate) fn start(shared: Arc<Shared>) -> Result<CoordinatorHandle, String> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let weak = Arc::downgrade(&shared);
    let log_interval = shared.cfg.log_interval;
    let thread = std::thread::Builder::new()
        .name("datapath-coordinator".into())
        .spawn(move || {
            let sys = actix::System::new();
            sys.block_on(async move {
                let addr = Coordinator { shared: weak, log_interval, crashes: Default::default() }.start();
                let _ = tx.send((addr, actix::System::current()));
            });
            let _ = sys.run();
        })
        .map_err(|e| format!("starting the coordinator thread: {e}"))?;
    let (addr, system) =
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "the coordinator did not start".to_string())?;
    Ok(CoordinatorHandle { addr, system, thread: Some(thread) })
}
