//! `progress.png`, like nnU-Net's: losses of both networks, pseudo-Dice and its
//! moving average, learning rate and λ, and epoch time, redrawn every epoch.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::checkpoint::EpochLog;

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
        tracing::warn!("no TTF font found (set CPS3D_FONT): progress.png is drawn without labels");
        false
    })
}

type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    series: &[Series],
    text: bool,
) -> Result<(), String> {
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.1.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Ok(());
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut b = ChartBuilder::on(area);
    b.margin(10).x_label_area_size(if text { 30 } else { 5 }).y_label_area_size(if text { 60 } else { 5 });
    if text {
        b.caption(title, ("sans-serif", 18));
    }
    let mut chart = b.build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad)).map_err(|e| e.to_string())?;
    if text {
        chart.configure_mesh().x_desc("epoch").draw().map_err(|e| e.to_string())?;
    }
    for (name, data, color) in series {
        let s = chart
            .draw_series(LineSeries::new(data.iter().cloned().filter(|p| p.1.is_finite()), color.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if text {
            let c = *color;
            s.label(*name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Draws the progress figure of a run's epochs.
pub fn draw(path: &Path, logs: &[EpochLog]) -> Result<(), String> {
    let text = font_available();
    let root = BitMapBackend::new(path, (1200, 1600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((4, 1));
    let e = |l: &EpochLog| l.epoch as f64;
    let colors = [BLUE, RED];
    let mut losses: Vec<Series> = Vec::new();
    for net in 0..logs.first().map(|l| l.loss.len()).unwrap_or(0) {
        let name: &str = if net == 0 { "loss net 1" } else { "loss net 2" };
        losses.push((name, logs.iter().map(|l| (e(l), l.loss[net])).collect(), colors[net % 2]));
    }
    losses.push((
        "CPS term (mean)",
        logs.iter().map(|l| (e(l), l.cps_loss.iter().sum::<f64>() / l.cps_loss.len().max(1) as f64)).collect(),
        GREEN,
    ));
    panel(&areas[0], "training loss", &losses, text)?;
    panel(
        &areas[1],
        "pseudo-Dice (validation patches)",
        &[
            ("pseudo-Dice", logs.iter().map(|l| (e(l), l.mean_pseudo_dice)).collect(), BLUE),
            ("moving average", logs.iter().map(|l| (e(l), l.ema_pseudo_dice)).collect(), RED),
        ],
        text,
    )?;
    panel(
        &areas[2],
        "learning rate and lambda",
        &[
            ("learning rate ×100", logs.iter().map(|l| (e(l), l.lr * 100.0)).collect(), BLUE),
            ("lambda", logs.iter().map(|l| (e(l), l.lambda)).collect(), RED),
        ],
        text,
    )?;
    panel(
        &areas[3],
        "epoch time (s)",
        &[("epoch time", logs.iter().map(|l| (e(l), l.epoch_seconds)).collect(), BLACK)],
        text,
    )?;
    root.present().map_err(|e| e.to_string())
}
