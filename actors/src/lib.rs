//! cps3d's streaming runtime: bounded work pools and (later) the data-path actors.
//!
//! Nothing here links libtorch, so it builds and benchmarks in seconds.

pub mod pool;
