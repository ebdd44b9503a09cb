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
}

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

    fn handle(&mut self, msg: WorkerDown, _: &mut Self::Context) {
        let Some(sh) = self.shared.upgrade() else { return };
        let restarts = sh.telemetry.stage(msg.stage.name()).restarts.load(Ordering::Relaxed);
        tracing::error!(
            "{} {} crashed ({}); restarting it (restart #{restarts} of that stage)",
            msg.stage.name(),
            msg.id,
            msg.message
        );
        if !sh.stopping() {
            stages::spawn(sh.clone(), msg.stage, msg.id, msg.generation + 1);
        }
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
                let addr = Coordinator { shared: weak, log_interval }.start();
                let _ = tx.send((addr, actix::System::current()));
            });
            let _ = sys.run();
        })
        .map_err(|e| format!("starting the coordinator thread: {e}"))?;
    let (addr, system) =
        rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "the coordinator did not start".to_string())?;
    Ok(CoordinatorHandle { addr, system, thread: Some(thread) })
}
