//! Experiment planning, as nnU-Net's `experiment_planning/`: the dataset fingerprint
//! and the plans derived from it.

pub mod fingerprint;
pub mod footprint;
pub mod intensity;
pub mod plan;
pub mod plans;
pub mod topology;
