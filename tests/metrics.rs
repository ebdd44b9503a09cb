//! `/metrics` scraped over real HTTP from a running `cps3d bench`, parsed with a
//! Prometheus text parser: counters grow between scrapes, gauges stay in their bounds.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

/// Kills the child when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cps3d ARGS --metrics-addr 127.0.0.1:0` and returns it with the address it printed.
fn start(args: &[&str]) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cps3d"))
        .args(args)
        .args(["--metrics-addr", "127.0.0.1:0", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let running = Running(child);
    let line = lines.next().expect("a line on stderr").unwrap();
    let addr = line
        .strip_prefix("metrics: http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("first stderr line names the address: {line}"))
        .to_string();
    // Keep draining stderr so that the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (running, addr)
}

/// One HTTP/1.1 GET; returns (status line, headers, body).
fn get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

fn scrape(addr: &str) -> (String, Scrape) {
    let (status, headers, body) = get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(headers.contains("content-type: application/openmetrics-text"), "{headers}");
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics ends with # EOF");
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (body, parsed)
}

/// The value of the sample `metric` whose labels include every `labels` pair.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {metric} {labels:?}"));
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{metric}: unexpected {other:?}"),
    }
}

#[test]
fn a_running_bench_serves_metrics_that_prometheus_can_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let (_bench, addr) = start(&["bench", shards.to_str().unwrap(), "--batches", "100000000"]);
    let started = Instant::now();
    // The server listens before the data path has started: its families appear then.
    let (text, first) = loop {
        let (text, parsed) = scrape(&addr);
        if text.contains("cps3d_datapath_items_total") {
            break (text, parsed);
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no data-path metrics after 60 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for family in ["cps3d_datapath_items", "cps3d_datapath_busy_seconds", "cps3d_shard_read_bytes"] {
        assert!(text.contains(&format!("# TYPE {family} counter")), "{family} is a counter:\n{text}");
    }
    assert!(text.contains("# UNIT cps3d_datapath_busy_seconds seconds"), "{text}");
    // Scrape again once every stage has moved on (a loaded machine may take a while).
    let grew = |a: &Scrape, b: &Scrape| {
        ["loader", "augmenter", "batcher"].iter().all(|&stage| {
            value(b, "cps3d_datapath_items_total", &[("stage", stage)])
                > value(a, "cps3d_datapath_items_total", &[("stage", stage)])
        })
    };
    let second = loop {
        std::thread::sleep(Duration::from_millis(300));
        let (_, second) = scrape(&addr);
        if grew(&first, &second) || started.elapsed() > Duration::from_secs(60) {
            break second;
        }
    };
    for stage in ["loader", "augmenter", "batcher"] {
        let (a, b) = (
            value(&first, "cps3d_datapath_items_total", &[("stage", stage)]),
            value(&second, "cps3d_datapath_items_total", &[("stage", stage)]),
        );
        assert!(b > a, "{stage}: items {a} -> {b}: a running data path's counter grows");
        let busy = value(&second, "cps3d_datapath_busy_seconds_total", &[("stage", stage)]);
        let wall = started.elapsed().as_secs_f64() + 5.0;
        assert!(busy >= value(&first, "cps3d_datapath_busy_seconds_total", &[("stage", stage)]));
        assert!(busy < wall, "{stage}: one worker cannot be busy {busy} s in {wall} s");
        assert_eq!(value(&second, "cps3d_datapath_workers", &[("stage", stage)]), 1.0);
        assert_eq!(value(&second, "cps3d_datapath_errors_total", &[("stage", stage)]), 0.0);
    }
    for queue in ["raw", "augmented", "batches"] {
        let depth = value(&second, "cps3d_datapath_queue_depth", &[("queue", queue)]);
        let capacity = value(&second, "cps3d_datapath_queue_capacity", &[("queue", queue)]);
        assert!(capacity >= 1.0 && (0.0..=capacity).contains(&depth), "{queue}: {depth}/{capacity}");
    }
    assert!(value(&second, "cps3d_shard_read_bytes_total", &[]) > value(&first, "cps3d_shard_read_bytes_total", &[]));
    let (read, raw) = (
        value(&second, "cps3d_shard_read_bytes_total", &[]),
        value(&second, "cps3d_shard_decompressed_bytes_total", &[]),
    );
    assert!(raw > read, "bricks decompress to more than they take on disk: {read} -> {raw}");
    let open = value(&second, "cps3d_shards_open", &[]);
    assert!((1.0..=64.0).contains(&open), "{open} shards open");
    let rss = value(&second, "cps3d_process_resident_memory_bytes", &[]);
    let peak = value(&second, "cps3d_process_peak_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss <= peak && peak < 8e9, "rss {rss}, peak {peak}");
    let (status, _, body) = get(&addr, "/");
    assert!(status.contains("404") && body.contains("/metrics"), "{status} {body}");
}

#[test]
fn an_address_that_cannot_be_listened_on_is_refused_with_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    for addr in [port.as_str(), "not-an-address"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cps3d"))
            .args(["bench", shards.to_str().unwrap(), "--batches", "1", "--metrics-addr", addr])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{addr}: {err}");
        assert!(err.contains("--metrics-addr") && err.contains(addr) && err.contains("cannot listen"), "{err}");
    }
}

/// Percent-encodes a PromQL query for a URL.
fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The first result's value of an instant query against Prometheus's HTTP API.
fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let (status, _, body) = get(prometheus, &format!("/api/v1/query?query={}", url_encode(promql)));
    if !status.contains("200") {
        return None;
    }
    // Chunked or not, the JSON object is the body's outermost braces.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_server_scrapes_a_running_bench() {
    let Some(binary) = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("prometheus")).find(|b| b.is_file()))
    else {
        println!("SKIPPED: the prometheus binary is not on PATH (Debian: apt-get install prometheus)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let shards = common::tiny_shards(tmp.path());
    let (_bench, addr) = start(&["bench", shards.to_str().unwrap(), "--batches", "100000000"]);
    let web = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: cps3d\n    static_configs:\n      - targets: ['{addr}']\n"),
    )
    .unwrap();
    let _prometheus = Running(
        Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let mut up = None;
    let mut rate = None;
    while started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        if TcpStream::connect(&web).is_err() {
            continue;
        }
        up = query(&web, "up{job=\"cps3d\"}");
        rate = query(&web, "rate(cps3d_datapath_items_total{stage=\"loader\"}[10s])");
        if up == Some(1.0) && rate.is_some_and(|r| r > 0.0) {
            break;
        }
    }
    assert_eq!(up, Some(1.0), "Prometheus sees the target up");
    assert!(rate.is_some_and(|r| r > 0.0), "the loader's item rate through PromQL: {rate:?}");
    // Every query of the Grafana dashboard is valid PromQL over these metrics.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ops/grafana-cps3d.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$job", ".*").replace("$instance", ".*");
            let (status, _, body) = get(&web, &format!("/api/v1/query?query={}", url_encode(&expr)));
            assert!(status.contains("200") && body.contains("\"success\""), "{}: {expr}: {body}", panel["title"]);
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} dashboard queries");
}
