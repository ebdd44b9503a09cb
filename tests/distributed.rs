//! c10d through the shim: Gloo process groups of real processes on 127.0.0.1. Each test
//! starts its ranks as copies of this test binary (running only itself, with the rank in
//! the environment), and ends them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cps3d::distributed::roster::{hostname, Roster};
use cps3d::distributed::{ProcessGroup, Store};
use tch::Tensor;

const RANK_ENV: &str = "CPS3D_TEST_RANK";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts rank 1.. of `test` as child processes; this process is rank 0.
fn start_ranks(test: &str, world: usize, port: u16, extra: &[(&str, &str)]) -> Vec<Child> {
    spawn_ranks(test, 1..world, port, extra)
}

fn spawn_ranks(test: &str, ranks: std::ops::Range<usize>, port: u16, extra: &[(&str, &str)]) -> Vec<Child> {
    ranks
        .map(|rank| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([test, "--exact", "--nocapture", "--test-threads", "1"])
                .env(RANK_ENV, rank.to_string())
                .env("CPS3D_TEST_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in extra {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect()
}

/// (rank, port) of this process: rank 0 unless started by [`start_ranks`].
fn role() -> (usize, Option<u16>) {
    let rank = std::env::var(RANK_ENV).map(|r| r.parse().unwrap()).unwrap_or(0);
    let port = std::env::var("CPS3D_TEST_PORT").ok().map(|p| p.parse().unwrap());
    (rank, port)
}

fn finish(children: Vec<Child>) {
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a rank failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn gloo_collectives_across_three_processes() {
    let (rank, port) = role();
    let world = 3;
    let port = port.unwrap_or_else(free_port);
    let children =
        if rank == 0 { start_ranks("gloo_collectives_across_three_processes", world, port, &[]) } else { vec![] };
    let store = Store::tcp("127.0.0.1", port, rank, world, Duration::from_secs(30)).unwrap();
    // Two groups on one store, as the two siblings' gradients have.
    let pg = ProcessGroup::gloo(&store, "sibling0", Duration::from_secs(30)).unwrap();
    let other = ProcessGroup::gloo(&store, "sibling1", Duration::from_secs(30)).unwrap();
    assert_eq!((pg.rank(), pg.world()), (rank, world));
    let mut o = Tensor::from_slice(&[1.0f32]);
    other.all_reduce_sum(&mut o).unwrap();
    assert_eq!(o.double_value(&[0]), 3.0);
    let mut t = Tensor::from_slice(&[rank as f32 + 1.0, 10.0]);
    pg.all_reduce_sum(&mut t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [6.0, 30.0]);
    let gathered = pg.all_gather(&Tensor::from_slice(&[rank as i64; 2])).unwrap();
    let gathered: Vec<Vec<i64>> = gathered.iter().map(|g| Vec::try_from(g).unwrap()).collect();
    assert_eq!(gathered, [[0, 0], [1, 1], [2, 2]]);
    let mut b = Tensor::from_slice(&[rank as f64 * 7.0]);
    pg.broadcast(&mut b, 2).unwrap();
    assert_eq!(b.double_value(&[0]), 14.0);
    // Means of several tensors of other shapes and kinds, in one all-reduce.
    let mut grads = vec![
        Tensor::full([2, 2], rank as f64, (tch::Kind::Float, tch::Device::Cpu)),
        Tensor::from_slice(&[rank as f64 * 3.0]),
    ];
    pg.all_reduce_mean(&mut grads).unwrap();
    assert_eq!(Vec::<f32>::try_from(grads[0].reshape([-1])).unwrap(), [1.0; 4]);
    assert_eq!(grads[1].double_value(&[0]), 3.0);
    assert_eq!(grads[1].kind(), tch::Kind::Double);
    pg.barrier().unwrap();
    finish(children);
}

/// Rank 0's group over `world` ranks, with the roster that names a rank that stops.
fn group_with_roster(rank: usize, world: usize, port: u16, timeout: Duration) -> (Store, ProcessGroup) {
    let store = Store::tcp("127.0.0.1", port, rank, world, Duration::from_secs(20)).unwrap();
    let roster = Roster::join("127.0.0.1", port, rank, world, "test").unwrap();
    let pg = ProcessGroup::gloo(&store, "test", timeout).unwrap().with_roster(roster);
    (store, pg)
}

#[test]
fn a_rank_that_dies_ends_the_others_collective_with_an_error_naming_it() {
    let test = "a_rank_that_dies_ends_the_others_collective_with_an_error_naming_it";
    let (rank, port) = role();
    let port = port.unwrap_or_else(free_port);
    let children = if rank == 0 { start_ranks(test, 2, port, &[]) } else { vec![] };
    let (_store, pg) = group_with_roster(rank, 2, port, Duration::from_secs(20));
    let mut t = Tensor::from_slice(&[1.0f32]);
    pg.all_reduce_sum(&mut t).unwrap();
    if rank == 1 {
        // Gone without a word, as a killed process is.
        std::process::exit(0);
    }
    let start = Instant::now();
    let e = pg.all_reduce_sum(&mut t).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    assert!(e.contains("rank 0 of group test (2 ranks): all-reduce failed"), "{e}");
    let who = format!("rank 1 on {} (pid {}) stopped answering", hostname(), children[0].id());
    assert!(e.contains(&who), "{who} missing from: {e}");
    for c in children {
        let _ = c.wait_with_output();
    }
}

#[test]
fn a_rank_that_hangs_is_named_once_the_timeout_has_passed() {
    let test = "a_rank_that_hangs_is_named_once_the_timeout_has_passed";
    let (rank, port) = role();
    let port = port.unwrap_or_else(free_port);
    let mut children = if rank == 0 { start_ranks(test, 2, port, &[]) } else { vec![] };
    let (_store, pg) = group_with_roster(rank, 2, port, Duration::from_secs(3));
    let mut t = Tensor::from_slice(&[1.0f32]);
    pg.all_reduce_sum(&mut t).unwrap();
    if rank == 1 {
        // Frozen whole (heartbeat included), as a process stuck in a driver call or swapped out.
        // SAFETY: raising a signal on this process.
        unsafe { libc::raise(libc::SIGSTOP) };
        return;
    }
    let start = Instant::now();
    let e = pg.all_reduce_sum(&mut t).unwrap_err();
    let took = start.elapsed();
    let who = format!("rank 1 on {} (pid {}) stopped answering", hostname(), children[0].id());
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    // The 3 s timeout, then the roster's 2.5 s look at the heartbeats.
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(20), "took {took:?}");
    assert!(e.contains(&who), "{who} missing from: {e}");
}

#[test]
fn a_rank_that_never_comes_is_reported_after_the_timeout() {
    let port = free_port();
    let start = Instant::now();
    let e = match Store::tcp("127.0.0.1", port, 0, 2, Duration::from_secs(2)) {
        Ok(_) => panic!("a store of 2 ranks formed with one"),
        Err(e) => e,
    };
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
    assert!(e.contains(&format!("rank 0 of 2: no rendezvous at 127.0.0.1:{port} within 2 s")), "{e}");
    assert!(Store::tcp("127.0.0.1", port, 2, 2, Duration::from_secs(1)).err().unwrap().contains("ranks are 0..world"));
}

/// The loss of a global batch split over ranks: every rank gets the single-process value,
/// and the gradient on its own samples is exactly the single-process one (so summing the
/// ranks' parameter gradients gives the global batch's).
#[test]
fn losses_over_ranks_are_the_global_batch_loss_with_each_ranks_exact_gradient() {
    use cps3d::training::loss::{deep_supervised, DiceCe, Scores, IGNORE_INDEX};
    use tch::{Device, Kind};
    let test = "losses_over_ranks_are_the_global_batch_loss_with_each_ranks_exact_gradient";
    let (rank, port) = role();
    let world = 2;
    let port = port.unwrap_or_else(free_port);
    let children = if rank == 0 { start_ranks(test, world, port, &[]) } else { vec![] };
    let store = Store::tcp("127.0.0.1", port, rank, world, Duration::from_secs(30)).unwrap();
    let pg = ProcessGroup::gloo(&store, "loss", Duration::from_secs(30)).unwrap();
    // Three outputs (deep supervision; the lowest has weight 0), 4 samples, 4 classes; a
    // few ignored voxels.
    tch::manual_seed(11);
    let shapes: [&[i64]; 3] = [&[3, 4, 4], &[2, 2, 2], &[1, 1, 1]];
    let full: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn([&[4, 4], *s].concat(), (Kind::Float, Device::Cpu)).set_requires_grad(true))
        .collect();
    let targets: Vec<Tensor> =
        shapes.iter().map(|s| Tensor::randint(4, [&[4], *s].concat(), (Kind::Int64, Device::Cpu))).collect();
    let _ = targets[0].get(1).get(0).get(0).fill_(IGNORE_INDEX);
    let _ = targets[0].get(3).get(2).fill_(IGNORE_INDEX);
    for batch_dice in [true, false] {
        let single = DiceCe { batch_dice, ..Default::default() };
        let scores: Vec<Scores> = full.iter().map(Scores::new).collect();
        let want = deep_supervised(&single, &scores, &targets);
        let want_grads: Vec<Tensor> = Tensor::run_backward(&[&want], &full, false, false);
        // This rank's half of the batch.
        let mine: Vec<Tensor> = full.iter().map(|o| o.narrow(0, 2 * rank as i64, 2)).collect();
        let my_targets: Vec<Tensor> = targets.iter().map(|t| t.narrow(0, 2 * rank as i64, 2)).collect();
        let split = DiceCe { ranks: Some(&pg), ..single };
        let got = deep_supervised(&split, &mine.iter().map(Scores::new).collect::<Vec<_>>(), &my_targets);
        let (a, b) = (want.double_value(&[]), got.double_value(&[]));
        assert!((a - b).abs() < 1e-6, "batch_dice {batch_dice}, rank {rank}: loss {b} vs one process {a}");
        let got_grads: Vec<Tensor> = Tensor::run_backward(&[&got], &full, false, false);
        for (g, w) in got_grads.iter().zip(&want_grads).take(2) {
            let (g, w) = (g.narrow(0, 2 * rank as i64, 2), w.narrow(0, 2 * rank as i64, 2));
            let diff = (&g - &w).abs().max().double_value(&[]);
            let scale = w.abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * scale.max(1e-3), "batch_dice {batch_dice}, rank {rank}: gradient off by {diff}");
        }
    }
    pg.barrier().unwrap();
    finish(children);
}

/// torchrun with `TORCHELASTIC_USE_AGENT_STORE=True`: its agent serves the store and every
/// rank, rank 0 included, is a client. Here this test process plays the agent.
#[test]
fn ranks_meet_on_a_store_their_launcher_serves() {
    let test = "ranks_meet_on_a_store_their_launcher_serves";
    let world = 2;
    if let (rank, Some(port)) = role() {
        let store = Store::connect("127.0.0.1", port, rank, world, true, Duration::from_secs(20)).unwrap();
        let pg = ProcessGroup::gloo(&store, "agent", Duration::from_secs(20)).unwrap();
        let mut t = Tensor::from_slice(&[rank as f32 + 1.0]);
        pg.all_reduce_sum(&mut t).unwrap();
        assert_eq!(t.double_value(&[0]), 3.0);
        return;
    }
    let port = free_port();
    // The agent's store: served here, this process its only registered worker.
    let agent = Store::tcp("127.0.0.1", port, 0, 1, Duration::from_secs(20)).unwrap();
    let children = spawn_ranks(test, 0..world, port, &[]);
    finish(children);
    drop(agent);
}
