//! Training, as nnU-Net's `training/`: the networks and the losses of 3D-CPS.
//! (The trainer actors, schedules, checkpoints and `cps3d train` are still to come.)

pub mod loss;
pub mod network;
