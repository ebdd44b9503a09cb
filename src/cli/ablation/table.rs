//! The ablation's tables: each arm's mean ± sample deviation over seeds, as Markdown,
//! CSV and JSON.

use anyhow::Result;

use super::super::workflow::TestSet;
use super::{AblationArgs, Arm, Outcome};
use cps3d::dataset::labels::FLARE22_ORGANS;
use cps3d::evaluation::Summary;

/// Mean and sample standard deviation of the finite values (NaN where there are none;
/// the deviation NaN with fewer than two).
pub(super) fn mean_std(values: impl IntoIterator<Item = f64>) -> (f64, f64, usize) {
    let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    let std =
        if n < 2 { f64::NAN } else { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() };
    (mean, std, n)
}

/// The table's rows: the 13 organs' DSC, then mDSC and mNSD; per arm, one value per seed.
pub(super) fn rows(arm: Arm, outcomes: &[Outcome]) -> Vec<(String, Vec<f64>)> {
    let of_arm: Vec<&Summary> = outcomes.iter().filter(|o| o.arm == arm).map(|o| &o.summary).collect();
    let mut rows: Vec<(String, Vec<f64>)> = FLARE22_ORGANS
        .iter()
        .enumerate()
        .map(|(i, (_, _, short))| (short.to_string(), of_arm.iter().map(|s| s.organs[i].1).collect()))
        .collect();
    rows.push(("mDSC".into(), of_arm.iter().map(|s| s.mean_dsc).collect()));
    rows.push(("mNSD".into(), of_arm.iter().map(|s| s.mean_nsd).collect()));
    rows
}

pub(super) fn cell(values: &[f64], decimals: usize) -> String {
    match mean_std(values.iter().copied()) {
        (_, _, 0) => "–".into(),
        (m, _, 1) => format!("{m:.decimals$}"),
        (m, s, _) => format!("{m:.decimals$} ± {s:.decimals$}"),
    }
}

/// The organ table in the paper's layout (rows: organs, mDSC, mNSD; columns: arms).
pub(super) fn markdown_table(arms: &[Arm], outcomes: &[Outcome]) -> String {
    let per_arm: Vec<Vec<(String, Vec<f64>)>> = arms.iter().map(|&arm| rows(arm, outcomes)).collect();
    let mut t = String::from("| Organ (DSC) |");
    for arm in arms {
        t += &format!(" {} (`{}`) |", arm.paper(), arm.name());
    }
    t += &format!("\n|---|{}\n", "---|".repeat(arms.len()));
    for r in 0..per_arm.first().map_or(0, Vec::len) {
        t += &format!("| {} |", per_arm[0][r].0);
        for arm_rows in &per_arm {
            t += &format!(" {} |", cell(&arm_rows[r].1, 3));
        }
        t.push('\n');
    }
    t
}

/// `ablation.md` and `ablation.csv` from the arms and seeds finished so far.
pub(super) fn write_tables(
    a: &AblationArgs,
    arms: &[Arm],
    outcomes: &[Outcome],
    total: usize,
    fp: &cps3d::planning::fingerprint::Fingerprint,
    test: &TestSet,
) -> Result<()> {
    let seeds = |arm: Arm| outcomes.iter().filter(|o| o.arm == arm).count();
    let times =
        |arm: Arm, f: fn(&Outcome) -> f64| -> Vec<f64> { outcomes.iter().filter(|o| o.arm == arm).map(f).collect() };

    let mut md = String::from("# cps3d ablation\n\n");
    let data = match &a.data {
        Some(d) => format!("`{}`", d.display()),
        None => format!("synthetic phantoms {}×{}×{}", a.shape.0[0], a.shape.0[1], a.shape.0[2]),
    };
    md += &format!(
        "Data: {data}; {} labeled + {} unlabeled training cases, {} held-out case(s) scored with the FLARE22 rules.\n",
        fp.num_labeled,
        fp.num_unlabeled,
        test.cases.len()
    );
    let mut configs = Vec::new();
    if arms.iter().any(|a| a.configuration() == "3d_fullres") {
        configs.push(format!("3D patch {:?}, features {:?}", a.patch.0, a.features.0));
    }
    if arms.iter().any(|a| a.configuration() == "2d") {
        configs.push(format!("2D patch {:?}, features {:?}", a.patch_2d.0, a.features_2d.0));
    }
    md += &format!(
        "One plan: {}. Every arm: {} epochs × {} steps, {}, λ ramp over {} epochs (CPS arms), {}; \
         cells are mean ± sample standard deviation over seeds.\n",
        configs.join("; "),
        a.epochs,
        a.iterations,
        if a.augment { "nnU-Net augmentation" } else { "no augmentation" },
        a.ramp(),
        if a.seeds == 1 { "seed 0".to_string() } else { format!("seeds 0 to {}", a.seeds - 1) }
    );
    let done = outcomes.len();
    if done < total {
        md += &format!("\n**Incomplete: {done} of {total} arm-seed(s) finished.**\n");
    }
    md += "\n";
    md += &markdown_table(arms, outcomes);
    md += "\n| Run |";
    for arm in arms {
        md += &format!(" `{}` |", arm.name());
    }
    md += &format!("\n|---|{}\n| seeds finished |", "---|".repeat(arms.len()));
    for &arm in arms {
        md += &format!(" {} |", seeds(arm));
    }
    md += "\n| training, s per seed |";
    for &arm in arms {
        md += &format!(" {} |", cell(&times(arm, |o| o.train_seconds), 0));
    }
    md += "\n| prediction, s per seed |";
    for &arm in arms {
        md += &format!(" {} |", cell(&times(arm, |o| o.predict_seconds), 0));
    }
    md += "\n| paper's mDSC (FLARE22, for context) |";
    for &arm in arms {
        md += &format!(" {:.4} |", arm.paper_mdsc());
    }
    md += "\n\nTraining time is the sum of the epochs' times in the run's `log.jsonl`; per-case scores are in \
           `predictions/{arm}/seed{s}/flare22_scores.csv`.\n";
    cps3d::util::write_atomic(&a.out.join("ablation.md"), md.as_bytes())?;

    // Machine-readable: one row per table row, a mean and a std column per arm.
    let mut csv = String::from("metric");
    for arm in arms {
        csv += &format!(",{0}_mean,{0}_std", arm.name());
    }
    csv.push('\n');
    let number = |v: f64| if v.is_finite() { format!("{v:.6}") } else { String::new() };
    let per_arm: Vec<Vec<(String, Vec<f64>)>> = arms.iter().map(|&arm| rows(arm, outcomes)).collect();
    let mut lines: Vec<(String, Vec<Vec<f64>>)> = (0..per_arm[0].len())
        .map(|r| {
            let name = per_arm[0][r].0.clone();
            let name = if r < FLARE22_ORGANS.len() { format!("{name}_DSC") } else { name };
            (name, per_arm.iter().map(|rows| rows[r].1.clone()).collect())
        })
        .collect();
    lines.push(("train_seconds".into(), arms.iter().map(|&arm| times(arm, |o| o.train_seconds)).collect()));
    lines.push(("predict_seconds".into(), arms.iter().map(|&arm| times(arm, |o| o.predict_seconds)).collect()));
    for (name, values) in &lines {
        csv += name;
        for v in values {
            let (m, s, _) = mean_std(v.iter().copied());
            csv += &format!(",{},{}", number(m), number(s));
        }
        csv.push('\n');
    }
    csv += "seeds";
    for &arm in arms {
        csv += &format!(",{},", seeds(arm));
    }
    csv.push('\n');
    cps3d::util::write_atomic(&a.out.join("ablation.csv"), csv.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_the_sample_deviation_from_two_seeds_on() {
        let (m, s, n) = mean_std([0.8, 0.9, f64::NAN, 1.0]);
        assert_eq!(n, 3);
        assert!((m - 0.9).abs() < 1e-12);
        assert!((s - 0.1).abs() < 1e-12, "sample std (n - 1): {s}");
        assert_eq!(cell(&[0.8, 0.9, 1.0], 3), "0.900 ± 0.100");
        assert_eq!(cell(&[0.8125], 3), "0.812", "one seed: no ±");
        assert_eq!(cell(&[f64::NAN], 3), "–");
    }
}
