//! cps3d's streaming runtime: bounded work pools, nnU-Net's augmentation, and the
//! data-path actors (loader → augmenter → batcher) with their telemetry.
//!
//! Nothing here links libtorch, so it builds and benchmarks in seconds.

pub mod augment;
pub mod datapath;
pub mod faults;
pub mod pool;
pub mod telemetry;
