//! `progress.png`, like nnU-Net's: losses of both networks, pseudo-Dice and its
//! moving average, learning rate and λ, and epoch time, redrawn every epoch.

use std::path::Path;

use plotters::prelude::*;

use super::records::EpochLog;

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
    let text = crate::drawing::font_available();
    let root = BitMapBackend::new(path, (1200, 2000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((5, 1));
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
    // Per class: when each organ starts being learnt (the small ones last).
    let classes = logs.iter().map(|l| l.pseudo_dice.first().map_or(0, |d| d.len())).max().unwrap_or(0);
    let names: Vec<String> = (1..=classes).map(|k| format!("class {k}")).collect();
    let per_class: Vec<Series> = (0..classes)
        .map(|k| {
            let points = logs
                .iter()
                .map(|l| {
                    let v: Vec<f64> =
                        l.pseudo_dice.iter().filter_map(|d| d.get(k).copied()).filter(|v| v.is_finite()).collect();
                    (e(l), if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 })
                })
                .collect();
            let [r, g, b] = crate::drawing::ORGAN_COLOURS[k % crate::drawing::ORGAN_COLOURS.len()];
            // The palette's pale entries (class 7's) would vanish on white.
            let dim = |c: u8| if r as u32 + g as u32 + b as u32 > 600 { (c as f32 * 0.6) as u8 } else { c };
            (names[k].as_str(), points, RGBColor(dim(r), dim(g), dim(b)))
        })
        .collect();
    panel(&areas[4], "pseudo-Dice per class (mean of the networks)", &per_class, text)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_class_panel_draws_each_class_in_its_colour() {
        let logs: Vec<EpochLog> = (0..6)
            .map(|epoch| EpochLog {
                epoch,
                lr: 0.01,
                lambda: 0.1,
                loss: vec![1.0, 1.1],
                sup_loss: vec![1.0, 1.1],
                cps_loss: vec![0.1, 0.1],
                // Class 2 absent from validation (NaN) in one network: the other's value is drawn.
                pseudo_dice: vec![vec![0.1 * epoch as f64, f64::NAN], vec![0.1 * epoch as f64, 0.5]],
                mean_pseudo_dice: 0.3,
                ema_pseudo_dice: 0.2,
                step_seconds: 0.1,
                data_wait: 0.0,
                epoch_seconds: 2.0,
                phases: Default::default(),
                read_failures: vec![],
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.png");
        draw(&path, &logs).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (1200, 2000));
        let channels = info.color_type.samples();
        let count = |colour: [u8; 3], rows: std::ops::Range<u32>| {
            rows.flat_map(|y| (0..info.width).map(move |x| (x, y)))
                .filter(|&(x, y)| {
                    let o = (y * info.width + x) as usize * channels;
                    buf[o..o + 3] == colour
                })
                .count()
        };
        // Classes 1 and 2 (red, green) in the bottom panel.
        assert!(count([255, 0, 0], 1600..2000) > 50);
        assert!(count([0, 255, 0], 1600..2000) > 50);
    }
}
