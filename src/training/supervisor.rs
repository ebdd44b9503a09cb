//! The trainer actors under one supervisor: commands go to every sibling at once (they
//! work in lockstep), replies are collected while the data path is watched; the first
//! fault anywhere cancels everything within a poll interval, and the error that caused
//! it (which sibling, which epoch and step, what) is the one reported.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use tch::Device;

use super::trainer::{start, start_pair, Cancel, Command, Reply, TrainerError, TrainerHandle, TrainerSetup};
use cps3d_actors::datapath::DataPath;

pub struct Trainers {
    handles: Vec<TrainerHandle>,
    cancel: Arc<Cancel>,
}

/// Why a round of commands failed: a trainer's fault or the data path's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RoundError {
    #[error("{0}")]
    Trainer(TrainerError),
    #[error("the data path failed: {0}")]
    DataPath(String),
    #[error("trainer {0}'s thread ended unexpectedly")]
    Gone(usize),
}

impl Trainers {
    /// Starts one trainer, or the two siblings, with a fresh cancel token; `setup` makes
    /// sibling `i`'s setup on `devices[i]`.
    pub fn start(
        devices: &[Device],
        cancel: Arc<Cancel>,
        setup: impl Fn(usize, Device) -> TrainerSetup,
    ) -> Result<Trainers, TrainerError> {
        let handles = if devices.len() == 1 {
            vec![start(setup(0, devices[0]))?]
        } else {
            let (a, b) = start_pair(setup(0, devices[0]), setup(1, devices[1]))?;
            vec![a, b]
        };
        Ok(Trainers { handles, cancel })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    pub fn cancel_token(&self) -> Arc<Cancel> {
        self.cancel.clone()
    }

    /// Sends `command(i)` to every trainer, then gathers their replies, watching
    /// `data` (if any). The first fault cancels the other trainers; its error is returned.
    pub fn round(
        &self,
        command: impl FnMut(usize) -> Command,
        data: Option<&DataPath>,
    ) -> Result<Vec<Reply>, RoundError> {
        self.round_watching(command, data, || {})
    }

    /// [`Self::round`], calling `tick` on this thread every poll interval (50 ms) while
    /// the trainers work.
    pub fn round_watching(
        &self,
        mut command: impl FnMut(usize) -> Command,
        data: Option<&DataPath>,
        mut tick: impl FnMut(),
    ) -> Result<Vec<Reply>, RoundError> {
        for (i, t) in self.handles.iter().enumerate() {
            if t.commands.send(command(i)).is_err() {
                self.cancel.cancel(format!("trainer {i} is gone"));
                return Err(RoundError::Gone(i));
            }
        }
        let mut replies: Vec<Option<Reply>> = (0..self.handles.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..self.handles.len()).collect();
        let mut cause: Option<RoundError> = None;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for &i in &pending {
                match self.handles[i].replies.recv_timeout(Duration::from_millis(50)) {
                    Ok(Ok(r)) => replies[i] = Some(r),
                    Ok(Err(e)) => {
                        // A cancelled sibling is a consequence; the first real fault is the cause.
                        let replace = match &cause {
                            None => true,
                            Some(RoundError::Trainer(t)) => t.is_cancelled() && !e.is_cancelled(),
                            Some(_) => false,
                        };
                        self.cancel.cancel(e.to_string());
                        if replace {
                            cause = Some(RoundError::Trainer(e));
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => still.push(i),
                    Err(RecvTimeoutError::Disconnected) => {
                        cause.get_or_insert(RoundError::Gone(i));
                        self.cancel.cancel(format!("trainer {i}'s thread ended"));
                    }
                }
            }
            pending = still;
            tick();
            if let Some(reason) = data.and_then(|d| d.failure()) {
                if cause.is_none() {
                    cause = Some(RoundError::DataPath(reason.clone()));
                }
                self.cancel.cancel(format!("the data path failed: {reason}"));
            }
        }
        match cause {
            Some(c) => Err(c),
            None => Ok(replies.into_iter().map(|r| r.expect("every trainer replied")).collect()),
        }
    }

    /// Ends every trainer thread (each finishes its current command first).
    pub fn shutdown(self) {
        self.cancel.cancel("shutting down");
        for t in self.handles {
            drop(t.commands);
            let _ = t.thread.join();
        }
    }
}
