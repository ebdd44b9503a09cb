//! The schedules of a run: λ of the CPS term and the learning rate, per epoch.

use serde::{Deserialize, Serialize};

use crate::planning::plan::{LambdaSchedule, LrSchedule, Plans};

/// λ at `epoch`: a linear ramp from 0 to λmax (the paper) or λmax throughout.
pub fn lambda_at(plans: &Plans, epoch: usize) -> f64 {
    match plans.cps.lambda_schedule {
        LambdaSchedule::Constant => plans.cps.lambda_max,
        LambdaSchedule::LinearRamp { ramp_epochs } => {
            plans.cps.lambda_max * (epoch as f64 / ramp_epochs.max(1) as f64).min(1.0)
        }
    }
}

/// The state the plateau schedule carries from epoch to epoch (checkpointed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LrState {
    pub lr: f64,
    #[serde(deserialize_with = "super::records::nan::scalar")]
    pub plateau_best: f64,
    pub plateau_wait: usize,
}

impl LrState {
    pub fn new(plans: &Plans) -> LrState {
        LrState { lr: plans.cps.optimizer.lr, plateau_best: f64::MIN, plateau_wait: 0 }
    }

    /// The learning rate of `epoch`: poly (nnU-Net) or the plateau schedule's current rate.
    pub fn lr_at(&self, plans: &Plans, epoch: usize) -> f64 {
        match plans.cps.lr_schedule {
            LrSchedule::Poly { exponent } => {
                plans.cps.optimizer.lr * (1.0 - epoch as f64 / plans.cps.epochs as f64).powf(exponent)
            }
            LrSchedule::Plateau { .. } => self.lr,
        }
    }

    /// After an epoch: the plateau schedule multiplies the rate by `factor` when the
    /// signal (the moving-average pseudo-Dice) has not improved for `patience` epochs.
    pub fn update(&mut self, plans: &Plans, signal: f64) {
        if let LrSchedule::Plateau { factor, patience, min_lr } = plans.cps.lr_schedule {
            if signal > self.plateau_best {
                self.plateau_best = signal;
                self.plateau_wait = 0;
            } else {
                self.plateau_wait += 1;
                if self.plateau_wait > patience {
                    self.lr = (self.lr * factor).max(min_lr);
                    self.plateau_wait = 0;
                }
            }
        }
    }
}
