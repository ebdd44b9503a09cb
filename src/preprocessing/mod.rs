//! Preprocessing, as nnU-Net's `preprocessing/`: crop to the nonzero box, resample to
//! the plan's spacing, and write shards.

pub mod resample;
