//! The expected training time, told before the wait: the first steps of a run are timed
//! as they train (no extra work), and the rest of the run is extrapolated from them,
//! with what the machine's other processes took from the cores meanwhile.

use std::time::{Duration, Instant};

use serde::Serialize;

/// What the timed steps say about the rest of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// Steps timed (after one warm-up step, whose oneDNN kernel set-up is not typical).
    pub steps_timed: usize,
    /// Wall seconds per step of the first trainer over the timed steps (the siblings
    /// step in lockstep, so this is the pair's rate).
    pub seconds_per_step: f64,
    /// Steps this invocation trains in all, and epochs.
    pub steps: usize,
    pub epochs: usize,
    /// Seconds since training started (network set-up, data path, the steps so far).
    pub elapsed_seconds: f64,
    /// Expected seconds from the start of training to its end: elapsed + the remaining
    /// steps + each epoch's validation (forward passes over the labeled samples only,
    /// about a third of a step's cost per sample).
    pub training_seconds: f64,
    /// Cores used by other processes (and the hypervisor's steal) while the steps were
    /// timed, from /proc/stat; `None` where that cannot be read.
    pub other_load_cores: Option<f64>,
}

impl std::fmt::Display for Estimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expected training time on this machine: {:.0} s ({} steps in {} epochs at {:.3} s/step, timed over {} steps)",
            self.training_seconds, self.steps, self.epochs, self.seconds_per_step, self.steps_timed
        )
    }
}

/// Times the first trainer's steps from its step counter; polled by the supervisor's
/// round while the trainers work.
pub(crate) struct StepTimer {
    start: Instant,
    counter_at_start: usize,
    warm_up: usize,
    timed: usize,
    first: Option<(usize, Instant, Option<CpuTimes>)>,
    done: bool,
}

impl StepTimer {
    /// `counter` is the step counter's value when training starts; `steps_per_epoch` sets
    /// how many steps can be timed within the first epoch (one warm-up, then up to 3).
    pub fn new(start: Instant, counter: usize, steps_per_epoch: usize) -> StepTimer {
        let warm_up = usize::from(steps_per_epoch > 1);
        let timed = steps_per_epoch.saturating_sub(warm_up).clamp(1, 3);
        StepTimer { start, counter_at_start: counter, warm_up, timed, first: None, done: false }
    }

    /// Looks at the step counter; returns the estimate once, when enough steps are timed.
    /// `steps` and `epochs` are this invocation's totals; `validation_share` the cost of
    /// an epoch's validation in steps.
    pub fn poll(&mut self, counter: usize, steps: usize, epochs: usize, validation_steps: f64) -> Option<Estimate> {
        if self.done {
            return None;
        }
        let done_steps = counter.saturating_sub(self.counter_at_start);
        match self.first {
            None if done_steps >= self.warm_up => {
                self.first = Some((done_steps, Instant::now(), CpuTimes::read()));
                None
            }
            Some((first, at, cpu)) if done_steps >= first + self.timed => {
                self.done = true;
                let now = Instant::now();
                let timed = done_steps - first;
                let per_step = (now - at).as_secs_f64() / timed as f64;
                let mut e = self.extrapolate(done_steps, timed, per_step, steps, epochs, validation_steps);
                e.other_load_cores = cpu.zip(CpuTimes::read()).map(|(a, b)| b.others_since(&a, now - at));
                Some(e)
            }
            _ => None,
        }
    }

    /// The estimate from the trainer's own mean step time when the first epoch ended
    /// before polling could time its steps (steps shorter than the poll interval);
    /// `None` when it was told already.
    pub fn at_epoch_end(
        &mut self,
        counter: usize,
        seconds_per_step: f64,
        steps: usize,
        epochs: usize,
        validation_steps: f64,
    ) -> Option<Estimate> {
        if self.done {
            return None;
        }
        self.done = true;
        let done_steps = counter.saturating_sub(self.counter_at_start);
        Some(self.extrapolate(done_steps, done_steps, seconds_per_step, steps, epochs, validation_steps))
    }

    /// The elapsed time plus the remaining steps and validations at `per_step`.
    fn extrapolate(
        &self,
        done_steps: usize,
        steps_timed: usize,
        per_step: f64,
        steps: usize,
        epochs: usize,
        validation_steps: f64,
    ) -> Estimate {
        let elapsed = self.start.elapsed().as_secs_f64();
        let remaining = steps.saturating_sub(done_steps) as f64 + epochs as f64 * validation_steps;
        Estimate {
            steps_timed,
            seconds_per_step: per_step,
            steps,
            epochs,
            elapsed_seconds: elapsed,
            training_seconds: elapsed + remaining * per_step,
            other_load_cores: None,
        }
    }
}

/// Busy and steal time of the whole machine, and this process's CPU time, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    machine_busy: u64,
    steal: u64,
    own: u64,
    ticks_per_second: f64,
}

impl CpuTimes {
    fn read() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal …
        let (idle, iowait, steal) = (*cpu.get(3)?, *cpu.get(4)?, cpu.get(7).copied().unwrap_or(0));
        let busy = cpu.iter().take(7).sum::<u64>() - idle - iowait;
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
        let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let own = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Some(CpuTimes {
            machine_busy: busy,
            steal,
            own,
            ticks_per_second: if ticks > 0 { ticks as f64 } else { 100.0 },
        })
    }

    /// Cores other processes (and the hypervisor) used between `earlier` and this reading.
    fn others_since(&self, earlier: &CpuTimes, wall: Duration) -> f64 {
        let busy = self.machine_busy.saturating_sub(earlier.machine_busy) as f64;
        let own = self.own.saturating_sub(earlier.own) as f64;
        let steal = self.steal.saturating_sub(earlier.steal) as f64;
        ((busy - own).max(0.0) + steal) / self.ticks_per_second / wall.as_secs_f64().max(1e-3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_extrapolates_the_timed_steps_after_a_warm_up() {
        let start = Instant::now();
        let mut t = StepTimer::new(start, 10, 20);
        assert!(t.poll(10, 100, 5, 0.0).is_none(), "nothing before the warm-up step");
        assert!(t.poll(11, 100, 5, 0.0).is_none(), "the warm-up step starts the clock");
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.poll(13, 100, 5, 0.0).is_none(), "3 steps are timed");
        let e = t.poll(14, 100, 5, 1.0).expect("an estimate after 1 + 3 steps");
        assert_eq!(e.steps_timed, 3);
        assert!(e.seconds_per_step >= 0.01, "{e:?}");
        // 96 steps and 5 validations of one step each remain.
        let expected = e.elapsed_seconds + 101.0 * e.seconds_per_step;
        assert!((e.training_seconds - expected).abs() < 1e-9, "{e:?}");
        assert!(t.poll(20, 100, 5, 1.0).is_none(), "told once");
        assert!(e.to_string().contains("100 steps in 5 epochs"), "{e}");
    }

    #[test]
    fn an_epoch_too_short_to_poll_is_estimated_from_its_mean_step() {
        let mut t = StepTimer::new(Instant::now(), 0, 2);
        // Both steps done before the first poll: the poll starts the clock, the epoch ends.
        assert!(t.poll(2, 6, 3, 0.5).is_none());
        let e = t.at_epoch_end(2, 0.1, 6, 3, 0.5).expect("an estimate at the end of the first epoch");
        assert_eq!(e.steps_timed, 2);
        assert!((e.training_seconds - (e.elapsed_seconds + (4.0 + 1.5) * 0.1)).abs() < 1e-9, "{e:?}");
        assert!(t.at_epoch_end(4, 0.1, 6, 3, 0.5).is_none() && t.poll(6, 6, 3, 0.5).is_none(), "told once");
    }

    #[test]
    fn a_one_step_epoch_is_timed_without_a_warm_up() {
        let mut t = StepTimer::new(Instant::now(), 0, 1);
        assert!(t.poll(0, 4, 4, 0.0).is_none());
        assert_eq!(t.poll(1, 4, 4, 0.0).expect("estimate").steps_timed, 1);
    }

    #[test]
    fn a_busy_process_beside_this_one_is_counted_as_load() {
        let mut busy = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let a = CpuTimes::read().expect("/proc/stat and /proc/self/stat are readable on Linux");
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let b = CpuTimes::read().unwrap();
        let load = b.others_since(&a, t.elapsed());
        busy.kill().unwrap();
        busy.wait().unwrap();
        // The loop takes most of a core; this process, sleeping, is not counted.
        let cores = std::thread::available_parallelism().unwrap().get() as f64;
        assert!(load >= 0.2 && load <= cores + 0.5, "{load}");
    }
}
