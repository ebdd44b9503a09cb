//! Preview pictures: a phantom drawn with its labels, decoded back from the PNG and checked
//! pixel by pixel against the voxels each panel shows.

mod common;

use std::path::Path;

use cps3d::drawing::ORGAN_COLOURS;
use cps3d::io::nifti::read_labels;
use cps3d::preview::{render_files, Layout};
use cps3d::synth::{write_dataset, SynthConfig};

fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn phantom(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cfg = SynthConfig { labeled: 1, unlabeled: 0, shape: [24, 64, 64], workers: 1, ..Default::default() };
    write_dataset(&cfg, dir, |_| {}).unwrap();
    (dir.join("imagesTr/phantom_0000_0000.nii.gz"), dir.join("labelsTr/phantom_0000.nii.gz"))
}

/// Every pure organ colour in a panel sits on a voxel of that organ, every voxel without a
/// label is drawn grey, and each organ cut by the slice shows its colour.
fn check_panels(layout: &Layout, rgb: &[u8], labels: &ndarray::Array3<u8>, rows: usize) -> usize {
    let mut organs_seen = 0;
    for panel in layout.panels.iter().filter(|p| p.row < rows) {
        let mut seen = [false; 14];
        let mut shown = [false; 14];
        for py in panel.origin.1..panel.origin.1 + panel.size.1 {
            for px in panel.origin.0..panel.origin.0 + panel.size.0 {
                let voxel = panel.voxel_at(px, py).unwrap();
                let label = labels[voxel] as usize;
                shown[label] = true;
                let o = ((py * layout.width + px) * 3) as usize;
                let c = [rgb[o], rgb[o + 1], rgb[o + 2]];
                if label == 0 {
                    assert!(
                        c[0] == c[1] && c[1] == c[2],
                        "{:?} pixel ({px}, {py}) off the organs is {c:?}",
                        panel.view
                    );
                }
                if let Some(k) = ORGAN_COLOURS.iter().position(|&oc| oc == c) {
                    assert_eq!(label, k + 1, "{:?} pixel ({px}, {py}) has organ {}'s colour", panel.view, k + 1);
                    seen[k + 1] = true;
                }
            }
        }
        for l in 1..14 {
            assert_eq!(
                seen[l], shown[l],
                "{:?} slice {}: organ {l} shown {} but coloured {}",
                panel.view, panel.slice, shown[l], seen[l]
            );
        }
        organs_seen += seen.iter().filter(|&&s| s).count();
    }
    organs_seen
}

#[test]
fn a_preview_outlines_the_organs_where_the_labels_are() {
    let tmp = tempfile::tempdir().unwrap();
    let (image, label) = phantom(tmp.path());
    let labels = read_labels(&label).unwrap().data;

    let png = tmp.path().join("out/one.png");
    let layout = render_files(&image, &label, None, "synth_0000", &png).unwrap();
    let (w, h, rgb) = decode(&png);
    assert_eq!((w, h), (layout.width, layout.height));
    assert_eq!(layout.panels.len(), 3, "prediction only: one row of three views");
    // The longest edge (64 × ~6 mm in-plane) is 320 pixels.
    assert!(layout.panels.iter().any(|p| p.size.0 == 320), "{:?}", layout.panels);
    let organs = check_panels(&layout, &rgb, &labels, 1);
    assert!(organs >= 8, "the chosen slices cross several organs ({organs} organ-views)");

    // With a reference: a second row, same slices, the reference's colours.
    let png2 = tmp.path().join("two.png");
    let layout2 = render_files(&image, &label, Some(&label), "synth_0000", &png2).unwrap();
    let (w2, h2, rgb2) = decode(&png2);
    assert_eq!((w2, h2), (layout2.width, layout2.height));
    assert_eq!(layout2.panels.len(), 6);
    assert!(h2 > h && w2 == w);
    check_panels(&layout2, &rgb2, &labels, 2);
    for (a, b) in layout2.panels[..3].iter().zip(&layout2.panels[3..]) {
        assert_eq!((a.view, a.slice, a.size), (b.view, b.slice, b.size));
    }
}

#[test]
fn show_draws_a_case_and_names_a_label_map_on_another_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let (image, label) = phantom(tmp.path());
    let out = tmp.path().join("p.png");
    let o = common::run(&[
        "show",
        image.to_str().unwrap(),
        label.to_str().unwrap(),
        "-r",
        label.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stdout(&o).contains("p.png"), "{}", common::stdout(&o));
    let (w, h, _) = decode(&out);
    assert!(w > 900 && h > 500, "{w}×{h}");

    let other = tmp.path().join("other");
    let cfg = SynthConfig { labeled: 1, unlabeled: 0, shape: [24, 64, 48], workers: 1, ..Default::default() };
    write_dataset(&cfg, &other, |_| {}).unwrap();
    let wrong = other.join("labelsTr/phantom_0000.nii.gz");
    let o = common::run(&["show", image.to_str().unwrap(), wrong.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains(wrong.to_str().unwrap()) && err.contains("grid"), "{err}");
}
