//! `cps3d ablation` end to end, tiny: two arms × two seeds, tables and chart, a rerun that
//! reuses every finished arm, and the options it refuses.

mod common;

use common::{run, stderr, stdout};

const TINY: &[&str] = &[
    "--shape",
    "16,32,32",
    "--patch",
    "16,32,32",
    "--features",
    "4,8,16,16",
    "--patch-2d",
    "32,32",
    "--features-2d",
    "4,8,16,16",
    "--epochs",
    "1",
    "--iterations",
    "2",
    "--labeled",
    "2",
    "--unlabeled",
    "2",
    "--test",
    "1",
    "--seeds",
    "2",
    "--devices",
    "cpu,cpu",
    "-j",
    "2",
];

const ARMS: &[&str] = &["2d", "2d_cps", "3d", "3d_cps"];

#[test]
fn ablation_tables_every_arm_and_seed_and_reuses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ablation");
    let arms = ARMS.join(",");
    let mut args = vec!["ablation", "-o", out.to_str().unwrap(), "--arms", &arms];
    args.extend_from_slice(TINY);
    let o = run(&args);
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    for arm in ARMS {
        for seed in 0..2 {
            assert!(text.contains(&format!("[{arm} seed {seed}] trained in")), "{arm} seed {seed}: {text}");
            let run_dir = out.join(format!("runs/{arm}/seed{seed}"));
            assert!(run_dir.join("final.json").is_file(), "{}", run_dir.display());
            let csv = out.join(format!("predictions/{arm}/seed{seed}/flare22_scores.csv"));
            assert_eq!(common::score_table(&csv).1.len(), 1, "{}", csv.display());
        }
    }
    // The baseline trains one network, the CPS arm two siblings.
    let nets = |arm: &str| {
        let final_dir: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("runs/{arm}/seed0/final.json"))).unwrap())
                .unwrap();
        let dir = out.join(format!("runs/{arm}/seed0")).join(final_dir["checkpoint"].as_str().unwrap());
        (0..2).filter(|i| dir.join(format!("net{i}.safetensors")).is_file()).count()
    };
    assert_eq!((nets("2d"), nets("2d_cps"), nets("3d"), nets("3d_cps")), (1, 2, 1, 2));

    // Markdown: the paper's rows, one column per arm, mean ± std over the two seeds.
    let md = std::fs::read_to_string(out.join("ablation.md")).unwrap();
    for row in ["| Liver |", "| Gallbladder |", "| LK |", "| mDSC |", "| mNSD |", "Baseline2D+CPS", "Baseline3D+CPS"] {
        assert!(md.contains(row), "{row} missing: {md}");
    }
    let liver = md.lines().find(|l| l.starts_with("| Liver |")).unwrap();
    assert_eq!(liver.matches(" ± ").count(), ARMS.len(), "{liver}");
    assert!(text.contains("| mDSC |"), "the table is printed: {text}");

    // CSV: 13 organs, mDSC, mNSD, two timings, the seed counts; a mean and a std per arm.
    let csv = std::fs::read_to_string(out.join("ablation.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let want: Vec<String> = std::iter::once("metric".to_string())
        .chain(ARMS.iter().flat_map(|a| [format!("{a}_mean"), format!("{a}_std")]))
        .collect();
    assert_eq!(header, want);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 18, "{csv}");
    assert_eq!(rows[0][0], "Liver_DSC");
    assert_eq!(rows[13][0], "mDSC");
    assert_eq!(rows[14][0], "mNSD");
    for row in &rows[..15] {
        assert_eq!(row.len(), 1 + 2 * ARMS.len(), "{row:?}");
        for v in &row[1..] {
            let v: f64 = v.parse().unwrap_or_else(|_| panic!("{row:?}"));
            assert!((0.0..=1.0).contains(&v), "{row:?}");
        }
    }
    assert_eq!(rows[17], ["seeds", "2", "", "2", "", "2", "", "2", ""]);

    let png = std::fs::read(out.join("ablation.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // A rerun trains, predicts and scores nothing: every arm and seed is read back.
    let checkpoints = std::fs::read_dir(out.join("runs/3d_cps/seed1/checkpoints")).unwrap().count();
    let o = run(&args);
    let again = stdout(&o);
    assert!(o.status.success(), "{again}{}", stderr(&o));
    assert_eq!(again.matches("] reused: mDSC").count(), 2 * ARMS.len(), "{again}");
    assert!(!again.contains("trained in") && !again.contains(" epoch "), "{again}");
    assert_eq!(std::fs::read_dir(out.join("runs/3d_cps/seed1/checkpoints")).unwrap().count(), checkpoints);
    assert_eq!(std::fs::read_to_string(out.join("ablation.csv")).unwrap(), csv, "the same table from the same runs");

    // Another step budget into the same folder would mix incomparable arms: refused.
    let mut other = args.clone();
    let epochs = other.iter().position(|a| *a == "--epochs").unwrap();
    other[epochs + 1] = "2";
    let o = run(&other);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--epochs was 1, now 2"), "{}", stderr(&o));
}

#[test]
fn ablation_refuses_bad_options_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ablation");
    let out = out.to_str().unwrap();
    for (args, expected) in [
        (vec!["--arms", "3d,4d"], "--arms"),
        (vec!["--seeds", "0"], "--seeds"),
        (vec!["--epochs", "0"], "--epochs"),
        (vec!["--test", "0"], "--test"),
        (vec!["--patch-2d", "32"], "--patch-2d"),
        (vec!["--devices", "gpu"], "--devices"),
    ] {
        let mut all = vec!["ablation", "-o", out];
        all.extend_from_slice(&args);
        let o = run(&all);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
    // Nothing was started for options refused up front.
    assert!(!std::path::Path::new(out).join("data").exists());
}
