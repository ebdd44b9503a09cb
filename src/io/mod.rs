//! File formats at the edges of the pipeline: NIfTI volumes and their geometry.

pub mod geometry;
pub mod nifti;

pub use self::nifti::{read_header, read_image, read_labels, write_labels_like, write_volume, Geometry, Volume};

pub use cps3d_storage::file_kind;

/// A NIfTI file's name without `.nii` or `.nii.gz`: `CASE_0000.nii.gz` → `CASE_0000`.
pub fn nifti_stem(path: &std::path::Path) -> String {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.trim_end_matches(".gz").trim_end_matches(".nii").to_string()
}
