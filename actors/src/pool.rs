//! A bounded parallel map: the building block of every "one scan per worker" stage
//! (synthesis, checking, fingerprinting, preprocessing).
//!
//! Items flow through crossbeam bounded channels of capacity `workers`, so at most
//! `3 × workers + 2` items exist at once whatever the length of the input (queued
//! jobs, items in workers' hands, queued results, one held by the feeder and one
//! being handed to the caller): memory stays flat over 20 or 2000 scans. A worker
//! that panics on one item reports the panic for that item and goes on with the next.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crossbeam_channel::bounded;

/// A panic caught while processing one item, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPanic(pub String);

impl std::fmt::Display for WorkerPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkerPanic {}

pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// Runs `work` on every item with `workers` threads and hands each result to
/// `on_result` on the calling thread, in completion order.
///
/// The input iterator is consumed lazily, from the calling thread's scope, only as
/// fast as workers take items.
pub fn for_each_bounded<I, T, R, F, G>(items: I, workers: usize, work: F, mut on_result: G)
where
    I: IntoIterator<Item = T>,
    I::IntoIter: Send,
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync,
    G: FnMut(Result<R, WorkerPanic>),
{
    let workers = workers.max(1);
    let (job_tx, job_rx) = bounded::<T>(workers);
    let (res_tx, res_rx) = bounded::<Result<R, WorkerPanic>>(workers);
    let items = items.into_iter();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for item in items {
                if job_tx.send(item).is_err() {
                    break; // every worker is gone
                }
            }
        });
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let res_tx = res_tx.clone();
            let work = &work;
            scope.spawn(move || {
                for item in job_rx.iter() {
                    let r = catch_unwind(AssertUnwindSafe(|| work(item)))
                        .map_err(|p| WorkerPanic(panic_message(p.as_ref())));
                    if res_tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(res_tx);
        for r in res_rx.iter() {
            on_result(r);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_is_processed_once() {
        let mut out = Vec::new();
        for_each_bounded(0..1000u64, 3, |x| x * 2, |r| out.push(r.unwrap()));
        out.sort_unstable();
        assert_eq!(out, (0..1000u64).map(|x| x * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_item_is_reported_and_the_rest_go_on() {
        let mut ok = 0;
        let mut panics = Vec::new();
        for_each_bounded(
            0..50,
            2,
            |x| {
                if x == 7 {
                    panic!("bad item {x}");
                }
                x
            },
            |r| match r {
                Ok(_) => ok += 1,
                Err(p) => panics.push(p),
            },
        );
        assert_eq!(ok, 49);
        assert_eq!(panics, vec![WorkerPanic("bad item 7".into())]);
    }

    #[test]
    fn items_in_flight_are_bounded_by_the_worker_count() {
        // Count items pulled from the input but not yet handed back.
        let in_flight = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let items = (0..200).inspect(|_| {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
        });
        for_each_bounded(
            items,
            2,
            |i| {
                std::thread::sleep(std::time::Duration::from_micros(200));
                i
            },
            |_| {
                in_flight.fetch_sub(1, Ordering::SeqCst);
            },
        );
        // 2 queued jobs + 2 in workers' hands (working, or blocked handing the result
        // on) + 2 queued results + 1 held by the feeder + 1 being passed to `on_result`
        // (taken off the result queue, not yet counted back). CI once saw all 8.
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 3 * 2 + 2, "peak {peak}");
    }
}
