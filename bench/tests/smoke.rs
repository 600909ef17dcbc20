//! Smoke runs of the load generator against a real sluice on loopback: 1 publisher x 10
//! subscribers for 5 s must deliver at least 99% and write a JSON with every documented field;
//! an unreachable SFU must be a quick, clear failure; a meeting of 3 in a /ws room has everyone
//! receive everyone.
//!
//! sluice runs inside this test process (so `--sfu-pid` is our own pid: the loadgen is a child
//! process and its CPU is not counted here).

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sluice::config::{Config, IoBackend};

const LOADGEN: &str = env!("CARGO_BIN_EXE_sluice-loadgen");

/// A UDP port that was free a moment ago.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sluice() -> sluice::serve::Server {
    let mut c = Config::default();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.media.shards = 1;
    c.media.io = IoBackend::Uring;
    c.media.listen_ips = vec!["127.0.0.1".parse().unwrap()];
    c.media.port_base = free_udp_port();
    c.media.pin_cores = false;
    c.turn.enabled = false;
    sluice::serve::start(c).expect("sluice starts")
}

/// Run the loadgen with a hard bound, so a hang fails the test instead of stalling CI.
fn loadgen(args: &[&str], bound: Duration) -> Output {
    let mut child = Command::new(LOADGEN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice-loadgen");
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > bound {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "sluice-loadgen {args:?} ran past {bound:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tmp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sluice-loadgen-{}-{name}", std::process::id()))
}

#[test]
fn fanout_1x10_for_5s_delivers_and_reports_every_field() {
    let server = start_sluice();
    let url = format!("http://{}", server.http_addr);
    let json = tmp_path("smoke.json");
    let pid = std::process::id().to_string();
    let started = Instant::now();
    let out = loadgen(
        &[
            "fanout",
            "--url",
            &url,
            "--publishers",
            "1",
            "--subscribers",
            "10",
            "--duration",
            "5",
            "--settle",
            "1",
            "--cores",
            "1",
            "--sfu-pid",
            &pid,
            "--json",
            json.to_str().unwrap(),
            "--quiet",
        ],
        Duration::from_secs(90),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    let text = std::fs::read_to_string(&json).expect("the JSON file is written");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");

    for field in [
        "scenario",
        "duration_s",
        "publishers",
        "subscribers",
        "packets_sent",
        "packets_expected",
        "packets_received",
        "delivered_ratio",
        "sfu_egress_pps",
        "sfu_cpu_seconds",
        "egress_pps_per_sfu_core",
        "latency_us",
        "join_ms",
        "loadgen_cpu_seconds",
        "failures",
    ] {
        assert!(v.get(field).is_some(), "JSON lacks {field}: {text}");
    }
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][p].is_u64(), "latency_us.{p}: {text}");
    }
    for p in ["p50", "p99"] {
        assert!(v["join_ms"][p].is_number(), "join_ms.{p}: {text}");
    }
    assert!(v["failures"].is_array());

    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["duration_s"].as_f64(), Some(5.0));
    assert_eq!(v["publishers"].as_u64(), Some(1));
    assert_eq!(v["subscribers"].as_u64(), Some(10));
    let expected = v["packets_expected"].as_u64().unwrap();
    let sent = v["packets_sent"].as_u64().unwrap();
    // 5 s of 1.5 Mbit/s video plus audio is several hundred packets, each owed to 10 viewers.
    assert!(sent > 500, "{text}");
    assert_eq!(expected, sent * 10, "{text}");
    let delivered = v["delivered_ratio"].as_f64().unwrap();
    assert!(delivered >= 0.99, "delivered {delivered}: {text}");
    assert_eq!(v["rejected_joins"].as_u64(), Some(0), "{text}");
    // Read from /proc with --sfu-pid and from /metrics: present and sane.
    assert!(v["sfu_cpu_seconds"].as_f64().unwrap() > 0.0, "{text}");
    assert!(v["sfu_egress_pps"].as_f64().unwrap() > 0.0, "{text}");
    assert!(
        v["egress_pps_per_sfu_core"].as_f64().unwrap() > 0.0,
        "{text}"
    );
    assert!(v["latency_us"]["p50"].as_u64().unwrap() > 0, "{text}");
    assert!(v["join_ms"]["p50"].as_f64().unwrap() > 0.0, "{text}");
    assert!(v["loadgen_cpu_seconds"].as_f64().unwrap() > 0.0, "{text}");
    assert_eq!(v["settle_s"].as_u64(), Some(1), "{text}");
    // The host's share of the SFU's CPUs (here the test's own), from /proc/stat.
    let steal = v["sfu_cpu_steal"]
        .as_f64()
        .expect("sfu_cpu_steal with --sfu-pid");
    assert!((0.0..=1.0).contains(&steal), "{text}");
    // sluice's own receive-to-send time, from its histogram's buckets counted in the window.
    let own = &v["sfu_forward_latency_us"];
    let (p50, p99) = (own["p50"].as_f64(), own["p99"].as_f64());
    assert!(
        p50.zip(p99)
            .is_some_and(|(a, b)| a > 0.0 && a <= b && b <= 100_000.0),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the smoke run took {:?}",
        started.elapsed()
    );
    server.shutdown();
}

#[test]
fn an_hour_long_settle_is_refused_before_any_join() {
    let out = loadgen(
        &[
            "fanout",
            "--url",
            "http://127.0.0.1:9",
            "--settle",
            "3601",
            "--quiet",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--settle above 3600"), "{stderr}");
}

#[test]
fn an_unreachable_sfu_is_a_clear_quick_failure() {
    // A TCP port with nothing listening (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let out = loadgen(
        &["fanout", "--url", &url, "--duration", "5", "--quiet"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not reachable"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn meeting_of_3_everyone_receives_everyone() {
    let server = start_sluice();
    let url = format!("http://{}", server.http_addr);
    let json = tmp_path("meeting.json");
    let pid = std::process::id().to_string();
    let started = Instant::now();
    let out = loadgen(
        &[
            "meeting",
            "--url",
            &url,
            "--participants",
            "3",
            "--duration",
            "3",
            "--cores",
            "1",
            "--sfu-pid",
            &pid,
            "--json",
            json.to_str().unwrap(),
            "--quiet",
        ],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    let text = std::fs::read_to_string(&json).expect("the JSON file is written");
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["scenario"], "meeting");
    assert_eq!(v["publishers"].as_u64(), Some(3), "{text}");
    assert_eq!(v["subscribers"].as_u64(), Some(3), "{text}");
    assert_eq!(v["meeting"]["pairs"].as_u64(), Some(6), "{text}");
    assert_eq!(v["meeting"]["pairs_receiving"].as_u64(), Some(6), "{text}");
    assert_eq!(
        v["meeting"]["receiving_everyone"].as_u64(),
        Some(3),
        "{text}"
    );
    // Every packet is owed to the two other participants.
    let sent = v["packets_sent"].as_u64().unwrap();
    assert!(sent > 500, "{text}");
    assert_eq!(v["packets_expected"].as_u64(), Some(sent * 2), "{text}");
    let delivered = v["delivered_ratio"].as_f64().unwrap();
    assert!(delivered >= 0.99, "delivered {delivered}: {text}");
    assert_eq!(v["rejected_joins"].as_u64(), Some(0), "{text}");
    assert!(v["join_ms"]["p50"].as_f64().unwrap() > 0.0, "{text}");
    assert!(v["latency_us"]["p50"].as_u64().unwrap() > 0, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the meeting smoke run took {:?}",
        started.elapsed()
    );
    server.shutdown();
}

#[test]
fn meeting_needs_two_participants() {
    let out = loadgen(&["meeting", "--participants", "1"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2"));
}
