//! The records a run keeps of each epoch: [`EpochLog`] (a line of `log.jsonl`, also
//! carried by each checkpoint's state), [`StepPhases`] (where a step's time goes), and the
//! JSON rule that reads their NaNs back.

use serde::{Deserialize, Serialize};

/// JSON has no NaN (serde_json writes it as `null`): these read `null` back as NaN, so
/// that a log line or state with an absent class's NaN pseudo-Dice can be read again.
pub mod nan {
    use serde::{Deserialize, Deserializer};

    pub fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }

    pub fn lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        Ok(Vec::<Vec<Option<f64>>>::deserialize(d)?
            .into_iter()
            .map(|v| v.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
            .collect())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    pub epoch: usize,
    #[serde(deserialize_with = "nan::scalar")]
    pub lr: f64,
    #[serde(deserialize_with = "nan::scalar")]
    pub lambda: f64,
    #[serde(deserialize_with = "nan::list")]
    pub loss: Vec<f64>,
    #[serde(deserialize_with = "nan::list")]
    pub sup_loss: Vec<f64>,
    #[serde(deserialize_with = "nan::list")]
    pub cps_loss: Vec<f64>,
    /// Per network, per foreground class (NaN where the class is absent from validation).
    #[serde(deserialize_with = "nan::lists")]
    pub pseudo_dice: Vec<Vec<f64>>,
    #[serde(deserialize_with = "nan::scalar")]
    pub mean_pseudo_dice: f64,
    #[serde(deserialize_with = "nan::scalar")]
    pub ema_pseudo_dice: f64,
    #[serde(deserialize_with = "nan::scalar")]
    pub step_seconds: f64,
    #[serde(deserialize_with = "nan::scalar")]
    pub data_wait: f64,
    #[serde(deserialize_with = "nan::scalar")]
    pub epoch_seconds: f64,
    /// Seconds per step by phase, averaged over the trainers (absent in older logs).
    #[serde(default)]
    pub phases: StepPhases,
    /// Shards that failed to read in this epoch's training and validation (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_failures: Vec<cps3d_actors::datapath::ReadFailure>,
}

/// Where a step's time goes, seconds per step (host wall time: on CUDA, kernels still
/// running are counted where the host next waits for them, e.g. at the loss read-back).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepPhases {
    /// Waiting for the next batch from the data path.
    pub data: f64,
    /// Batch to tensors, and the network's forward pass.
    pub forward: f64,
    /// Argmax labels sent to the sibling and the sibling's received (including waiting for it).
    pub exchange: f64,
    /// Supervised and CPS losses.
    pub loss: f64,
    /// Backward pass and gradient clipping.
    pub backward: f64,
    /// The SGD update, and reading the losses back.
    pub optimizer: f64,
}

impl StepPhases {
    pub const NAMES: [&'static str; 6] = ["data", "forward", "exchange", "loss", "backward", "optimizer"];

    pub fn values(&self) -> [f64; 6] {
        [self.data, self.forward, self.exchange, self.loss, self.backward, self.optimizer]
    }

    /// The mean over trainers.
    pub fn mean<'a>(all: impl Iterator<Item = &'a StepPhases>) -> StepPhases {
        let (mut sum, mut n) = ([0.0; 6], 0usize);
        for p in all {
            for (s, v) in sum.iter_mut().zip(p.values()) {
                *s += v;
            }
            n += 1;
        }
        StepPhases::from(sum).scaled(1.0 / n.max(1) as f64)
    }

    /// "data 1%, forward 30%, ..." as shares of the phases' sum.
    pub fn shares(&self) -> String {
        let total: f64 = self.values().iter().sum::<f64>().max(1e-12);
        Self::NAMES
            .iter()
            .zip(self.values())
            .map(|(n, v)| format!("{n} {:.0}%", 100.0 * v / total))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn scaled(&self, k: f64) -> StepPhases {
        StepPhases::from(self.values().map(|x| x * k))
    }
}

impl From<[f64; 6]> for StepPhases {
    fn from(v: [f64; 6]) -> StepPhases {
        StepPhases { data: v[0], forward: v[1], exchange: v[2], loss: v[3], backward: v[4], optimizer: v[5] }
    }
}
