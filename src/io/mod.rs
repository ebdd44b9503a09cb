//! File formats at the edges of the pipeline: NIfTI volumes and their geometry.

pub mod geometry;
pub mod nifti;

pub use self::nifti::{read_header, read_image, read_labels, write_labels_like, write_volume, Geometry, Volume};

pub use cps3d_storage::file_kind;
