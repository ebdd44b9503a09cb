//! `train --nproc-per-node N`: this machine's ranks started as torchrun's standalone mode
//! starts them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
//! watched until all finish; the first to fail ends the others and names itself.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Lines of a failed rank's stderr shown with its failure.
const TAIL: usize = 12;

/// The command line without `--nproc-per-node N` (or `=N`).
fn rank_args(n: usize, set_threads: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--nproc-per-node" {
            args.next();
        } else if !a.starts_with("--nproc-per-node=") {
            out.push(a);
        }
    }
    if set_threads {
        // The cores are shared by the ranks: each gets its part, not all of them.
        out.push("--threads".into());
        out.push((cps3d::util::cores() / n).max(1).to_string());
    }
    out
}

pub fn run_local_ranks(n: usize, set_threads: bool) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program to start its ranks")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the ranks' store")?
        .port();
    let args = rank_args(n, set_threads);
    tracing::info!("starting {n} ranks on this machine (store at 127.0.0.1:{port})");
    let mut children: Vec<Child> = Vec::new();
    let mut tails: Vec<Arc<Mutex<VecDeque<String>>>> = Vec::new();
    let mut forwarders = Vec::new();
    for rank in 0..n {
        let mut c = Command::new(&exe);
        c.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank} of {n}"));
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("piped");
        let keep = tail.clone();
        forwarders.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
                let _ = writeln!(std::io::stderr(), "[rank {rank}] {line}");
                let mut t = keep.lock().unwrap_or_else(|e| e.into_inner());
                t.push_back(line);
                if t.len() > TAIL {
                    t.pop_front();
                }
            }
        }));
        children.push(child);
        tails.push(tail);
    }
    let mut done = vec![false; n];
    let failure = loop {
        let mut failed = None;
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Some(status) = child.try_wait().context("watching the ranks")? {
                done[rank] = true;
                if !status.success() {
                    failed = Some((rank, status));
                    break;
                }
            }
        }
        if failed.is_some() || done.iter().all(|&d| d) {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some((rank, status)) = failure {
        // The others would only wait for it until their --timeout.
        stop_all(&mut children);
        for f in forwarders {
            let _ = f.join();
        }
        let how = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => format!("ended ({status})"),
        };
        let tail: Vec<String> = tails[rank].lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        let cause = tail.iter().rev().find(|l| l.starts_with("error")).cloned().unwrap_or_else(|| tail.join("\n"));
        bail!(
            "rank {rank} of {n} (on this machine, pid {}) {how}; the other ranks were stopped. {cause}",
            children[rank].id()
        );
    }
    for f in forwarders {
        let _ = f.join();
    }
    Ok(())
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}
