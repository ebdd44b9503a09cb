//! Data-parallel training on c10d (Gloo, 127.0.0.1): `train --nproc-per-node 2` with a
//! 1 + 1 batch per rank computes the steps of one process with the 2 + 2 batch; a rank
//! that dies ends the run naming it, and the run resumes on one process.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{stderr, stdout};

fn train(args: &[&str], failpoints: Option<&str>) -> (Output, Duration) {
    let mut c = common::cps3d();
    c.args(args);
    if let Some(f) = failpoints {
        c.env("FAILPOINTS", f);
    }
    let start = Instant::now();
    let o = c.output().unwrap();
    (o, start.elapsed())
}

fn log_losses(run: &Path) -> Vec<(u64, Vec<f64>)> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["epoch"].as_u64().unwrap(), v["loss"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        })
        .collect()
}

/// Trains `shards` for `steps` epochs of one step (the log's loss is then each step's),
/// as one process and as 2 ranks each with half of the plan's 2 + 2 batch; both folders.
fn one_and_two_ranks(tmp: &Path, shards: &Path, steps: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    let run_args = |run: &Path, more: &[&str]| -> Vec<String> {
        let mut a: Vec<&str> = vec!["train", shards.to_str().unwrap(), "-o", run.to_str().unwrap()];
        a.extend(["--epochs", steps, "--iterations", "1", "--fold", "all", "--val-iterations", "1"]);
        a.extend(["--no-final-validation", "--devices", "cpu,cpu"]);
        a.extend(more);
        a.into_iter().map(String::from).collect()
    };
    let ok = |args: Vec<String>| {
        let (o, _) = train(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(o.status.success(), "{text}");
        text
    };
    ok(run_args(&one, &["--threads", "1"]));
    let text = ok(run_args(&two, &["--nproc-per-node", "2"]));
    assert!(text.contains("[rank 1]") && text.contains("rank 1 of 2 (torchrun"), "{text}");
    (one, two)
}

/// Each epoch's mean pseudo-Dice of the validation (counts summed over the ranks).
fn log_dice(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["mean_pseudo_dice"].as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn assert_same_losses(one: &Path, two: &Path, steps: usize, relative: f64) {
    let (la, lb) = (log_losses(one), log_losses(two));
    assert_eq!((la.len(), lb.len()), (steps, steps));
    for ((ea, a), (eb, b)) in la.iter().zip(&lb) {
        assert_eq!(ea, eb);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= relative * x.abs().max(1.0), "step {ea}: loss {x} vs {y}");
        }
    }
}

/// Both siblings' weights at `epoch`'s checkpoint agree within `tolerance`.
fn assert_same_weights(one: &Path, two: &Path, epoch: usize, tolerance: f64) {
    for net in ["net0", "net1"] {
        let read = |run: &Path| -> std::collections::BTreeMap<String, tch::Tensor> {
            let file = run.join(format!("checkpoints/epoch_{epoch:04}/{net}.safetensors"));
            tch::Tensor::read_safetensors(file).unwrap().into_iter().filter(|(n, _)| n.starts_with("model.")).collect()
        };
        let (wa, wb) = (read(one), read(two));
        assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
        for ((name, x), y) in wa.iter().zip(wb.values()) {
            let diff = (x - y).abs().max().double_value(&[]);
            assert!(diff <= tolerance, "epoch {epoch}, {net} {name}: weights differ by {diff:e}");
        }
    }
}

#[test]
fn two_ranks_with_half_batches_train_as_one_process_with_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    // The CPS pair, 3 steps: every step's losses and then the weights of both siblings
    // agree within 1e-5, the float32 rounding of sums taken in another order (a batch of 4
    // convolved and reduced as one or as two halves, the ranks' gradients added).
    let (one, two) = one_and_two_ranks(&tmp.path().join("short"), &sh, "3");
    assert_same_losses(&one, &two, 3, 1e-5);
    // Validation split over the ranks, its counts summed: the one-process pseudo-Dice (a
    // voxel whose two best logits tie may go either way: 1e-3).
    for (a, b) in log_dice(&one).iter().zip(log_dice(&two)) {
        assert!((a - b).abs() <= 1e-3 || (a.is_nan() && b.is_nan()), "pseudo-Dice {a} vs {b}");
    }
    assert_same_weights(&one, &two, 2, 1e-5);
    // 10 steps: losses and weights within 5e-4. Rounding stays rounding until an activation
    // at a LeakyReLU's kink, or a voxel whose two best logits tie (a CPS pseudo-label), falls
    // on the other side in one run: a discrete step the momentum then carries along (measured
    // on this 2-core Xeon: losses 3.5e-5 apart, weights 4.8e-5, from step 3 on).
    let (one, two) = one_and_two_ranks(&tmp.path().join("long"), &sh, "10");
    assert_same_losses(&one, &two, 10, 5e-4);
    assert_same_weights(&one, &two, 9, 5e-4);
}

#[test]
fn a_rank_that_dies_ends_the_run_naming_it_and_the_run_resumes_on_one_process_then_on_two() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let args = [
        "train",
        sh.to_str().unwrap(),
        "-o",
        run.to_str().unwrap(),
        "--epochs",
        "3",
        "--iterations",
        "3",
        "--devices",
        "cpu,cpu",
        "--val-iterations",
        "1",
        "--no-final-validation",
        "--nproc-per-node",
        "2",
    ];
    // Rank 1 dies (as by kill -9) in epoch 1, step 1.
    let (o, took) = train(&args, Some("trainer-step=return(0:1:1:abort:1)"));
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("rank 1 of 2") && text.contains("was killed by signal 6"), "{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let latest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("latest.json")).unwrap()).unwrap();
    assert_eq!(latest["epoch"], 0);
    let (o, _) = train(&["train", "--resume", run.to_str().unwrap()], None);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(log_losses(&run).iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 2]);
    // And on from one process to two ranks again, one epoch more.
    let (o, _) = train(&["train", "--resume", run.to_str().unwrap(), "--epochs", "4", "--nproc-per-node", "2"], None);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(log_losses(&run).iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
}

/// Ranks started by another launcher (torchrun, Slurm) have no parent that names a dead
/// rank: the survivor's own error must, with its host and pid.
#[test]
fn under_an_outside_launcher_the_surviving_rank_names_the_dead_one() {
    let tmp = tempfile::tempdir().unwrap();
    let sh = common::tiny_shards(tmp.path());
    let run = tmp.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let start = Instant::now();
    let mut ranks: Vec<std::process::Child> = (0..2)
        .map(|rank| {
            let mut c = common::cps3d();
            c.args(["train", sh.to_str().unwrap(), "-o", run.to_str().unwrap(), "--epochs", "3"])
                .args(["--iterations", "3", "--devices", "cpu,cpu", "--val-iterations", "1", "--threads", "1"])
                .args(["--no-final-validation", "--timeout", "30"])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                // Rank 1 dies (as by kill -9) in epoch 1, step 1.
                .env("FAILPOINTS", "trainer-step=return(0:1:1:abort:1)")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let dead = ranks.pop().unwrap();
    let dead_pid = dead.id();
    let survivor = ranks.pop().unwrap().wait_with_output().unwrap();
    let _ = dead.wait_with_output();
    let text = stderr(&survivor);
    assert!(!survivor.status.success(), "{text}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
    let who = format!("rank 1 on {} (pid {dead_pid}) stopped answering", cps3d::distributed::roster::hostname());
    assert!(text.contains(&who), "{who} missing from:\n{text}");
}
