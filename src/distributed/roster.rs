//! Who the ranks are and whether they still answer, so that a failed collective can name
//! the rank that stopped instead of only "a peer". Each rank writes its host and pid into
//! the run's store and bumps a heartbeat counter there twice a second, over a store
//! connection of its own (a short timeout, apart from the collectives' long one). When a
//! collective fails, the counters are read twice a few beats apart: a rank whose counter
//! stood still has died, hung or lost its network; a store that no longer answers means
//! rank 0, which serves it, has.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Store;

/// How often each rank bumps its counter.
const BEAT: Duration = Duration::from_millis(500);
/// How long a counter must stand still to call its rank stopped.
const SILENCE: Duration = Duration::from_millis(2500);
/// The roster's own store calls wait no longer than this.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Roster {
    store: Arc<Store>,
    prefix: String,
    rank: usize,
    world: usize,
    /// "host (pid N)" per rank, once read (kept for when the store is gone).
    names: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    beats: Option<JoinHandle<()>>,
}

impl Roster {
    /// Joins the roster of the run whose store is at `host:port`, under `prefix` (one per
    /// start of the workers), and starts this rank's heartbeat.
    pub fn join(host: &str, port: u16, rank: usize, world: usize, prefix: &str) -> Result<Arc<Roster>, String> {
        // A client even on rank 0: the store itself is the run's.
        let store = Arc::new(Store::connect(host, port, rank, world, true, STORE_TIMEOUT)?);
        store.set(&format!("{prefix}/who/{rank}"), &format!("{} (pid {})", hostname(), std::process::id()))?;
        let names = Arc::new(Mutex::new(vec![None; world]));
        let stop = Arc::new(AtomicBool::new(false));
        let beats = {
            let (store, names, stop, prefix) = (store.clone(), names.clone(), stop.clone(), prefix.to_string());
            std::thread::Builder::new()
                .name("heartbeat".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // A beat the store missed (busy, or gone: diagnose says which) is
                        // tried again at the next; stopping would make this rank look dead.
                        if store.add(&format!("{prefix}/beat/{rank}"), 1).is_ok() {
                            learn_names(&store, &prefix, &names);
                        }
                        std::thread::sleep(BEAT);
                    }
                })
                .map_err(|e| format!("cannot start the heartbeat thread: {e}"))?
        };
        Ok(Arc::new(Roster { store, prefix: prefix.to_string(), rank, world, names, stop, beats: Some(beats) }))
    }

    /// "rank r on HOST (pid P)" as far as known.
    fn name(&self, rank: usize) -> String {
        match self.names.lock().unwrap_or_else(|e| e.into_inner()).get(rank).cloned().flatten() {
            Some(who) => format!("rank {rank} on {who}"),
            None => format!("rank {rank}"),
        }
    }

    fn beats(&self) -> Result<Vec<i64>, String> {
        (0..self.world).map(|r| self.store.add(&format!("{}/beat/{r}", self.prefix), 0)).collect()
    }

    /// Which rank stopped answering, said for a person (takes a few heartbeats).
    pub fn diagnose(&self) -> String {
        let unreachable = |e: String| {
            format!(
                "the run's store at {}:{} does not answer ({e}): {}, which serves it, died, hung or lost its network",
                self.store.host(),
                self.store.port(),
                self.name(0)
            )
        };
        let before = match self.beats() {
            Ok(b) => b,
            Err(e) => return unreachable(e),
        };
        std::thread::sleep(SILENCE);
        let after = match self.beats() {
            Ok(b) => b,
            Err(e) => return unreachable(e),
        };
        let stopped: Vec<String> =
            (0..self.world).filter(|&r| r != self.rank && after[r] <= before[r]).map(|r| self.name(r)).collect();
        if stopped.is_empty() {
            "every rank's heartbeat still moves: one is slow or stuck outside the collective (a step longer than \
             --timeout?)"
                .to_string()
        } else {
            format!(
                "{} stopped answering (no heartbeat for {:.1} s: died, hung or lost its network)",
                stopped.join(", "),
                SILENCE.as_secs_f64()
            )
        }
    }
}

impl Drop for Roster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(b) = self.beats.take() {
            let _ = b.join();
        }
    }
}

fn learn_names(store: &Store, prefix: &str, names: &Mutex<Vec<Option<String>>>) {
    let missing: Vec<usize> = {
        let n = names.lock().unwrap_or_else(|e| e.into_inner());
        (0..n.len()).filter(|&r| n[r].is_none()).collect()
    };
    for r in missing {
        if let Ok(Some(who)) = store.get(&format!("{prefix}/who/{r}")) {
            names.lock().unwrap_or_else(|e| e.into_inner())[r] = Some(who);
        }
    }
}

/// This machine's name, as other ranks would look for it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length; gethostname NUL-terminates within it or truncates.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "an unknown host".to_string()
    }
}
