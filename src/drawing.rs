//! What the pictures share (segmentation previews, `progress.png`, the ablation's chart):
//! the organs' label colours and the font their text is set in.

use std::sync::OnceLock;

use plotters::style::FontStyle;

/// Colours of labels 1–13: ITK-SNAP's default label colours, in which FLARE22's annotations
/// are usually shown.
pub const ORGAN_COLOURS: [[u8; 3]; 13] = [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [255, 255, 0],
    [0, 255, 255],
    [255, 0, 255],
    [255, 239, 213],
    [0, 0, 205],
    [205, 133, 63],
    [210, 180, 140],
    [102, 205, 170],
    [0, 0, 128],
    [0, 139, 139],
];

/// Registers a sans-serif TTF for labels once: `$CPS3D_FONT`, else common system
/// fonts. Without one plots are drawn without text.
pub fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = [
            std::env::var("CPS3D_FONT").unwrap_or_default(),
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
            "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf".into(),
        ];
        for c in candidates.iter().filter(|c| !c.is_empty()) {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no TTF font found (set CPS3D_FONT): pictures are drawn without text");
        false
    })
}
