//! Training, as nnU-Net's `training/`: the network and the losses of 3D-CPS, the
//! trainer actors and their supervisor, options, schedules, checkpoints, splits,
//! validation, and the run that ties them together (`cps3d train`).

pub mod checkpoint;
pub mod data;
pub mod estimate;
pub mod loss;
pub mod network;
pub mod options;
pub mod progress;
pub mod records;
pub mod run;
pub mod schedule;
pub mod sgd;
pub mod splits;
pub mod supervisor;
pub mod trainer;
pub mod validation;
