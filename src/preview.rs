//! Pictures of a segmentation: axial, coronal and sagittal slices through the organs, each
//! label map outlined (and lightly filled) over the CT in an abdominal window, the reference
//! beside the prediction when one is given, and a legend of the FLARE22 organs.
//!
//! Slices are shown as radiologists read them: the patient's right on the viewer's left,
//! anterior (axial) or superior (coronal, sagittal) at the top, and in millimetres, not
//! voxels, so anisotropic scans keep their proportions.

use std::path::Path;

use ndarray::ArrayView3;
use plotters::prelude::*;

use crate::dataset::labels::FLARE22_ORGANS;
use crate::drawing::ORGAN_COLOURS;
use crate::error::{Error, Result};
use crate::io::nifti::{read_image, read_labels};

/// Abdominal soft-tissue window (level 40 HU, width 400 HU).
const WINDOW_HU: (f32, f32) = (-160.0, 240.0);
/// The longest edge of a panel in pixels.
const PANEL_PIXELS: f64 = 320.0;
const GAP: u32 = 8;
const HEADER: u32 = 28;
const LEGEND_WIDTH: u32 = 190;
const LEGEND_ROW: u32 = 18;
/// Opacity of the organ fill; the outline is drawn opaque.
const FILL_ALPHA: f32 = 0.3;
const BACKGROUND: [u8; 3] = [24, 24, 24];

/// The three orthogonal views, named by the slice plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// A z slice: x across, y down.
    Axial,
    /// A y slice: x across, z down.
    Coronal,
    /// An x slice: y across, z down.
    Sagittal,
}

impl View {
    pub const ALL: [View; 3] = [View::Axial, View::Coronal, View::Sagittal];

    /// The canonical (z, y, x) axis held fixed.
    fn fixed_axis(self) -> usize {
        match self {
            View::Axial => 0,
            View::Coronal => 1,
            View::Sagittal => 2,
        }
    }

    /// The axes shown across and down.
    fn axes(self) -> (usize, usize) {
        match self {
            View::Axial => (2, 1),
            View::Coronal => (2, 0),
            View::Sagittal => (1, 0),
        }
    }

    fn name(self) -> &'static str {
        match self {
            View::Axial => "axial",
            View::Coronal => "coronal",
            View::Sagittal => "sagittal",
        }
    }
}

/// One drawn slice: where it sits in the picture and which voxels it shows.
#[derive(Debug, Clone)]
pub struct Panel {
    pub view: View,
    /// 0: the prediction's row, 1: the reference's.
    pub row: usize,
    /// Index of the slice along the view's fixed axis.
    pub slice: usize,
    /// Top-left pixel and size.
    pub origin: (u32, u32),
    pub size: (u32, u32),
    mm_per_pixel: f64,
    shape: [usize; 3],
    spacing: [f64; 3],
}

impl Panel {
    /// The voxel (z, y, x) a pixel of the panel shows; `None` outside the panel.
    pub fn voxel_at(&self, px: u32, py: u32) -> Option<[usize; 3]> {
        if px < self.origin.0 || py < self.origin.1 {
            return None;
        }
        let (u, v) = (px - self.origin.0, py - self.origin.1);
        if u >= self.size.0 || v >= self.size.1 {
            return None;
        }
        let (across, down) = self.view.axes();
        let index = |axis: usize, offset: u32| {
            let mm = (offset as f64 + 0.5) * self.mm_per_pixel;
            let i = ((mm / self.spacing[axis]) as usize).min(self.shape[axis] - 1);
            // Flipped: the patient's right (high x) on the left, anterior (high y) and superior
            // (high z) at the top.
            self.shape[axis] - 1 - i
        };
        let mut voxel = [0; 3];
        voxel[self.view.fixed_axis()] = self.slice;
        voxel[across] = index(across, u);
        voxel[down] = index(down, v);
        Some(voxel)
    }
}

/// What was drawn: the picture's size and its panels.
#[derive(Debug, Clone)]
pub struct Layout {
    pub width: u32,
    pub height: u32,
    pub panels: Vec<Panel>,
}

/// A case to draw: CT in HU and label maps on the same canonical (z, y, x) grid.
pub struct PreviewCase<'a> {
    pub title: &'a str,
    pub image: ArrayView3<'a, f32>,
    pub spacing: [f64; 3],
    pub prediction: ArrayView3<'a, u8>,
    pub reference: Option<ArrayView3<'a, u8>>,
}

/// For each view, the slice crossing the most organs of `labels` (then the most organ
/// voxels); the middle slice when it has none.
pub fn organ_slices(labels: ArrayView3<'_, u8>) -> [usize; 3] {
    let shape = labels.shape();
    let mut present: Vec<Vec<[u32; 14]>> = (0..3).map(|a| vec![[0u32; 14]; shape[a]]).collect();
    for ((z, y, x), &l) in labels.indexed_iter() {
        if l > 0 {
            let l = (l as usize).min(13);
            present[0][z][l] += 1;
            present[1][y][l] += 1;
            present[2][x][l] += 1;
        }
    }
    std::array::from_fn(|a| {
        let score =
            |c: &[u32; 14]| (c[1..].iter().filter(|&&n| n > 0).count(), c[1..].iter().map(|&n| n as u64).sum::<u64>());
        let best = (0..shape[a]).max_by_key(|&i| (score(&present[a][i]), std::cmp::Reverse(i)));
        match best {
            Some(i) if score(&present[a][i]).0 > 0 => i,
            _ => shape[a] / 2,
        }
    })
}

/// Draws `case` into an RGB buffer and returns it with its layout.
pub fn render(case: &PreviewCase) -> Result<(Vec<u8>, Layout)> {
    let shape: [usize; 3] = std::array::from_fn(|a| case.image.shape()[a]);
    check_grid("prediction", case.prediction.shape(), shape)?;
    if let Some(r) = &case.reference {
        check_grid("reference", r.shape(), shape)?;
    }
    if shape.contains(&0) {
        return Err(Error::invalid(case.title, "the image is empty"));
    }
    let extent: [f64; 3] = std::array::from_fn(|a| shape[a] as f64 * case.spacing[a]);
    let mm_per_pixel = extent.iter().cloned().fold(0.0, f64::max) / PANEL_PIXELS;
    let pixels = |axis: usize| ((extent[axis] / mm_per_pixel).round() as u32).max(1);
    let slices = organ_slices(case.reference.unwrap_or(case.prediction));
    let rows: Vec<ArrayView3<u8>> = std::iter::once(case.prediction).chain(case.reference).collect();

    let panel_height = View::ALL.iter().map(|v| pixels(v.axes().1)).max().unwrap_or(1);
    let mut panels = Vec::new();
    for (row, _) in rows.iter().enumerate() {
        let mut x = GAP;
        let y = HEADER + row as u32 * (panel_height + HEADER) + GAP;
        for view in View::ALL {
            let (across, down) = view.axes();
            let size = (pixels(across), pixels(down));
            panels.push(Panel {
                view,
                row,
                slice: slices[view.fixed_axis()],
                origin: (x, y),
                size,
                mm_per_pixel,
                shape,
                spacing: case.spacing,
            });
            x += size.0 + GAP;
        }
    }
    let panels_width = panels.iter().map(|p| p.origin.0 + p.size.0).max().unwrap_or(0) + GAP;
    let width = panels_width + LEGEND_WIDTH;
    let legend_height = HEADER + LEGEND_ROW * (FLARE22_ORGANS.len() as u32 + 1);
    let height = (HEADER + rows.len() as u32 * (panel_height + HEADER)).max(legend_height) + GAP;

    let mut buf = vec![0u8; width as usize * height as usize * 3];
    for px in buf.chunks_exact_mut(3) {
        px.copy_from_slice(&BACKGROUND);
    }
    for p in &panels {
        draw_panel(&mut buf, width, p, case.image, rows[p.row]);
    }
    // Legend swatches.
    for (i, colour) in ORGAN_COLOURS.iter().enumerate() {
        let top = HEADER + LEGEND_ROW * (i as u32 + 1);
        for y in top + 3..top + LEGEND_ROW - 3 {
            for x in panels_width + 4..panels_width + 20 {
                let o = (y as usize * width as usize + x as usize) * 3;
                buf[o..o + 3].copy_from_slice(colour);
            }
        }
    }
    let layout = Layout { width, height, panels };
    if crate::drawing::font_available() {
        draw_text(&mut buf, &layout, case.title, rows.len(), panels_width)
            .map_err(|e| Error::invalid(case.title, format!("drawing the preview's text: {e}")))?;
    }
    Ok((buf, layout))
}

fn check_grid(what: &str, got: &[usize], image: [usize; 3]) -> Result<()> {
    if got != image {
        return Err(Error::invalid(what, format!("label map shape {got:?} differs from the image's {image:?}")));
    }
    Ok(())
}

fn draw_panel(buf: &mut [u8], width: u32, p: &Panel, image: ArrayView3<f32>, labels: ArrayView3<u8>) {
    let (w, h) = p.size;
    // The label shown by each pixel first, so outlines are found in display space.
    let mut shown = vec![0u8; (w * h) as usize];
    let mut grey = vec![0u8; (w * h) as usize];
    for v in 0..h {
        for u in 0..w {
            let voxel = p.voxel_at(p.origin.0 + u, p.origin.1 + v).expect("inside the panel");
            let hu = image[voxel];
            let t = ((hu - WINDOW_HU.0) / (WINDOW_HU.1 - WINDOW_HU.0)).clamp(0.0, 1.0);
            grey[(v * w + u) as usize] = if hu.is_finite() { (t * 255.0).round() as u8 } else { 0 };
            shown[(v * w + u) as usize] = labels[voxel];
        }
    }
    for v in 0..h {
        for u in 0..w {
            let i = (v * w + u) as usize;
            let g = grey[i];
            let mut rgb = [g, g, g];
            let l = shown[i];
            if (1..=13).contains(&l) {
                let colour = ORGAN_COLOURS[l as usize - 1];
                let differs = |du: i64, dv: i64| {
                    let (uu, vv) = (u as i64 + du, v as i64 + dv);
                    uu < 0 || vv < 0 || uu >= w as i64 || vv >= h as i64 || shown[(vv * w as i64 + uu) as usize] != l
                };
                let edge = differs(-1, 0) || differs(1, 0) || differs(0, -1) || differs(0, 1);
                rgb = if edge {
                    colour
                } else {
                    std::array::from_fn(|c| {
                        (g as f32 * (1.0 - FILL_ALPHA) + colour[c] as f32 * FILL_ALPHA).round() as u8
                    })
                };
            }
            let o = (((p.origin.1 + v) * width + p.origin.0 + u) * 3) as usize;
            buf[o..o + 3].copy_from_slice(&rgb);
        }
    }
}

fn draw_text(
    buf: &mut [u8],
    layout: &Layout,
    title: &str,
    rows: usize,
    legend_x: u32,
) -> std::result::Result<(), String> {
    let root = BitMapBackend::with_buffer(buf, (layout.width, layout.height)).into_drawing_area();
    let style = ("sans-serif", 15).into_font().color(&WHITE);
    let small = ("sans-serif", 13).into_font().color(&RGBColor(200, 200, 200));
    for row in 0..rows {
        let first = layout.panels.iter().find(|p| p.row == row).expect("a panel per row");
        let heading = if row == 0 { format!("{title}: prediction") } else { "reference".to_string() };
        let y = first.origin.1 as i32 - HEADER as i32 + 6;
        root.draw(&Text::new(heading, (GAP as i32, y), style.clone())).map_err(|e| e.to_string())?;
    }
    for p in layout.panels.iter().filter(|p| p.row == 0) {
        let label = format!("{} {}", p.view.name(), p.slice);
        let (x, y) = (p.origin.0 as i32 + p.size.0 as i32 - 90, p.origin.1 as i32 - 16);
        root.draw(&Text::new(label, (x.max(p.origin.0 as i32), y), small.clone())).map_err(|e| e.to_string())?;
    }
    root.draw(&Text::new("R ◂ ▸ L", (GAP as i32 + 4, layout.height as i32 - 20), small.clone()))
        .map_err(|e| e.to_string())?;
    for (i, (id, name, _)) in FLARE22_ORGANS.iter().enumerate() {
        let top = HEADER + LEGEND_ROW * (i as u32 + 1);
        let text = format!("{id} {}", name.replace('_', " "));
        root.draw(&Text::new(text, (legend_x as i32 + 26, top as i32 + 2), small.clone()))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes an RGB buffer as a PNG.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<()> {
    let write = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("png.tmp");
        let file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut encoder = png::Encoder::new(file, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(rgb)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write().map_err(|e| Error::invalid(path, format!("writing the PNG: {e}")))
}

/// Reads an image and its label maps (NIfTI), checks that they share the image's grid, and
/// writes the preview PNG to `out`.
pub fn render_files(
    image: &Path,
    prediction: &Path,
    reference: Option<&Path>,
    title: &str,
    out: &Path,
) -> Result<Layout> {
    let ct = read_image(image)?;
    let grid = |path: &Path| -> Result<ndarray::Array3<u8>> {
        let v = read_labels(path)?;
        let (a, b) = (v.geometry.shape(), ct.geometry.shape());
        if a != b {
            return Err(Error::invalid(
                path,
                format!("its grid ({a:?} voxels) is not the grid of {} ({b:?} voxels)", image.display()),
            ));
        }
        let offset = crate::io::geometry::max_abs_diff(&v.geometry.affine(), &ct.geometry.affine());
        if offset > 1e-3 {
            // Same voxels, slightly different placement (common in public datasets): drawn voxel
            // by voxel, as the evaluation compares them.
            tracing::warn!("{}: affine differs from {}'s by up to {offset:.3}", path.display(), image.display());
        }
        Ok(v.data)
    };
    let pred = grid(prediction)?;
    let reference = reference.map(grid).transpose()?;
    let case = PreviewCase {
        title,
        image: ct.data.view(),
        spacing: ct.geometry.spacing(),
        prediction: pred.view(),
        reference: reference.as_ref().map(|r| r.view()),
    };
    let (rgb, layout) = render(&case)?;
    write_png(out, &rgb, layout.width, layout.height)?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn case(shape: [usize; 3]) -> (Array3<f32>, Array3<u8>) {
        let image = Array3::from_elem(shape, 40.0f32);
        let mut labels = Array3::zeros(shape);
        // Canonical x points to the patient's right: the liver at high x, the spleen at low x.
        labels.slice_mut(ndarray::s![4..12, 10..20, 20..30]).fill(1);
        labels.slice_mut(ndarray::s![6..10, 12..16, 2..6]).fill(3);
        (image, labels)
    }

    #[test]
    fn slices_cross_the_most_organs() {
        let (_, labels) = case([16, 32, 32]);
        let [z, y, x] = organ_slices(labels.view());
        assert!((6..10).contains(&z) && (12..16).contains(&y), "{z} {y}");
        // No x slice holds both organs: the one with more organ voxels (the liver's) wins.
        assert!((20..30).contains(&x), "{x}");
        assert_eq!(organ_slices(Array3::<u8>::zeros([4, 6, 8]).view()), [2, 3, 4]);
    }

    #[test]
    fn pixels_map_to_voxels_in_radiological_orientation() {
        let (image, labels) = case([16, 32, 32]);
        let c = PreviewCase {
            title: "t",
            image: image.view(),
            spacing: [2.0, 1.0, 1.0],
            prediction: labels.view(),
            reference: None,
        };
        let (_, layout) = render(&c).unwrap();
        let axial = &layout.panels[0];
        assert_eq!(axial.view, View::Axial);
        // 32 mm across at 32 / 320 mm per pixel.
        assert_eq!(axial.size, (320, 320));
        let (x0, y0) = axial.origin;
        // Top-left: the patient's right (high x) and anterior (high y).
        assert_eq!(axial.voxel_at(x0, y0).unwrap()[1..], [31, 31]);
        assert_eq!(axial.voxel_at(x0 + 319, y0 + 319).unwrap()[1..], [0, 0]);
        assert!(axial.voxel_at(x0 + 320, y0).is_none());
        let coronal = &layout.panels[1];
        // 16 slices of 2 mm: as tall as the 32 mm width.
        assert_eq!(coronal.size, (320, 320));
        assert_eq!(coronal.voxel_at(coronal.origin.0, coronal.origin.1).unwrap()[0], 15);
    }

    #[test]
    fn mismatched_grids_are_refused() {
        let (image, labels) = case([16, 32, 32]);
        let other = Array3::<u8>::zeros([16, 32, 30]);
        let c = PreviewCase {
            title: "t",
            image: image.view(),
            spacing: [1.0; 3],
            prediction: labels.view(),
            reference: Some(other.view()),
        };
        let e = render(&c).unwrap_err().to_string();
        assert!(e.contains("reference") && e.contains("[16, 32, 30]"), "{e}");
    }
}
