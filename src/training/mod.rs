//! Training, as nnU-Net's `training/`: the networks and the losses of 3D-CPS.
//! (The trainer actors, schedules, checkpoints and `cps3d train` are still to come.)

pub mod data;
pub mod loss;
pub mod network;
pub mod progress;
pub mod run;
pub mod sgd;
pub mod splits;
pub mod trainer;
pub mod validation;
