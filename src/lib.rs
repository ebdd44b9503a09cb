//! cps3d: 3D Cross Pseudo Supervision for CT organ segmentation on an nnU-Net-style
//! pipeline. Modules follow the pipeline's stages.

// Geometry and resampling code indexes small matrices by axis; iterator chains read worse.
#![allow(clippy::needless_range_loop)]

pub mod dataset;
pub mod distributed;
pub mod drawing;
pub mod error;
pub mod evaluation;
pub mod inference;
pub mod info;
pub mod interop;
pub mod io;
pub mod memory;
pub mod metrics;
pub mod planning;
pub mod preprocessing;
pub mod preview;
pub mod synth;
pub mod training;
pub mod util;

pub use error::{Error, Result};
