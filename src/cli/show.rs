//! `cps3d show`: a preview picture of one case (CT, prediction, optional reference).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The CT image (NIfTI; the first channel of a multi-channel case).
    pub image: PathBuf,
    /// A label map on the image's grid (e.g. from `cps3d predict`).
    pub prediction: PathBuf,
    /// The reference label map, drawn beside the prediction.
    #[arg(short, long)]
    pub reference: Option<PathBuf>,
    /// Output PNG.
    #[arg(short, long, default_value = "preview.png")]
    pub out: PathBuf,
}

pub fn run(a: ShowArgs) -> Result<()> {
    let title = cps3d::io::nifti_stem(&a.prediction);
    let layout = cps3d::preview::render_files(&a.image, &a.prediction, a.reference.as_deref(), &title, &a.out)?;
    let slices: Vec<String> =
        layout.panels.iter().filter(|p| p.row == 0).map(|p| format!("{:?} {}", p.view, p.slice)).collect();
    println!("{} ({}×{} px; slices {})", a.out.display(), layout.width, layout.height, slices.join(", "));
    Ok(())
}
