//! The ablation's chart: mean DSC per arm with its spread over seeds.

use std::path::Path;

use plotters::prelude::*;

use anyhow::{Context, Result};

use super::table::{mean_std, rows};
use super::{Arm, Outcome};
use cps3d::dataset::labels::FLARE22_ORGANS;

/// Grouped bars: per organ and for mDSC, one bar per arm (mean DSC over seeds) with
/// its ± standard deviation.
fn draw_chart(path: &Path, arms: &[Arm], outcomes: &[Outcome]) -> Result<(), String> {
    let text = cps3d::drawing::font_available();
    let per_arm: Vec<Vec<(String, Vec<f64>)>> = arms.iter().map(|&arm| rows(arm, outcomes)).collect();
    // Organs and mDSC; mNSD is another measure and stays in the tables.
    let groups = FLARE22_ORGANS.len() + 1;
    let names: Vec<String> = per_arm[0][..groups].iter().map(|r| r.0.clone()).collect();
    let root = BitMapBackend::new(path, (1400, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut b = ChartBuilder::on(&root);
    b.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 55 } else { 5 });
    if text {
        let seeds = outcomes.iter().filter(|o| o.arm == arms[0]).count();
        b.caption(format!("DSC per organ on the held-out cases (mean ± std over {seeds} seed(s))"), ("sans-serif", 22));
    }
    // Headroom above 1 keeps the legend off the bars.
    let mut chart = b.build_cartesian_2d(-0.5f64..(groups as f64 - 0.5), 0f64..1.3).map_err(|e| e.to_string())?;
    if text {
        let label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups)
            .x_label_formatter(&label)
            .y_labels(14)
            // The headroom above 1 holds the legend, not DSC values.
            .y_label_formatter(&|y| if *y <= 1.0 + 1e-9 { format!("{y:.1}") } else { String::new() })
            .light_line_style(WHITE)
            .y_desc("DSC")
            .draw()
            .map_err(|e| e.to_string())?;
    }
    let width = 0.8 / arms.len() as f64;
    for (k, (&arm, arm_rows)) in arms.iter().zip(&per_arm).enumerate() {
        let color = arm.color();
        let bars: Vec<(f64, f64, f64)> = (0..groups)
            .filter_map(|g| {
                let (m, s, _) = mean_std(arm_rows[g].1.iter().copied());
                let x0 = g as f64 - 0.4 + k as f64 * width;
                m.is_finite().then_some((x0, m, s))
            })
            .collect();
        let series = chart
            .draw_series(bars.iter().map(|&(x0, m, _)| Rectangle::new([(x0, 0.0), (x0 + width, m)], color.filled())))
            .map_err(|e| e.to_string())?;
        if text {
            series
                .label(format!("{} ({})", arm.paper(), arm.name()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
        }
        let whiskers = bars.iter().filter(|b| b.2.is_finite()).flat_map(|&(x0, m, s)| {
            let (xc, cap) = (x0 + width / 2.0, width / 4.0);
            let (lo, hi) = ((m - s).max(0.0), (m + s).min(1.0));
            [vec![(xc, lo), (xc, hi)], vec![(xc - cap, lo), (xc + cap, lo)], vec![(xc - cap, hi), (xc + cap, hi)]]
        });
        chart.draw_series(whiskers.map(|p| PathElement::new(p, BLACK.stroke_width(1)))).map_err(|e| e.to_string())?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// `ablation.png`, drawn beside and renamed so that the chart on disk is always whole.
pub(super) fn write_chart(out: &Path, arms: &[Arm], outcomes: &[Outcome]) -> Result<()> {
    let png = out.join("ablation.png");
    let tmp = out.join(".tmp-ablation.png");
    draw_chart(&tmp, arms, outcomes).map_err(|e| anyhow::anyhow!("{}: cannot draw: {e}", png.display()))?;
    std::fs::rename(&tmp, &png).with_context(|| png.display().to_string())?;
    Ok(())
}
