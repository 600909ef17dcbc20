//! Metrics move under load and agree with what the clients saw: the per-shard packet counters
//! summed over shards equal the clients' own counts within 1%, and the latency histogram
//! advances with every forwarded packet.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sluice::config::IoBackend;

/// Sum of every sample of `family` (any labels) in a Prometheus text exposition.
fn sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(family)
                && matches!(l.as_bytes().get(family.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(server: &sluice::serve::Server) -> String {
    ureq::get(&format!("http://{}/metrics", server.http_addr))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

#[test]
fn shard_counters_match_client_counts() {
    let mut cfg = config(2, IoBackend::Uring);
    // One subscriber per kernel submission: each latency is observed at its own chunk's send.
    cfg.media.send_chunk = 1;
    let server = start(cfg);
    let before = scrape(&server);
    let publisher = Client::publish(&server, "m").unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let viewers: Vec<_> = (0..4)
        .map(|_| Client::play(&server, "m").unwrap())
        .collect();
    for v in &viewers {
        assert!(v.wait_connected(Duration::from_secs(10)));
    }
    assert!(wait_until(Duration::from_secs(10), || viewers
        .iter()
        .all(|v| v.received().len() > 50)));
    std::thread::sleep(Duration::from_secs(2));
    publisher.state.paused.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(600));
    let after = scrape(&server);

    let received_by_clients: usize = viewers.iter().map(|v| v.received().len()).sum();
    let forwarded = sum(&after, "sluice_rtp_forwarded_packets_total")
        - sum(&before, "sluice_rtp_forwarded_packets_total");
    let sent = (publisher.state.sent_video.load(Ordering::Relaxed)
        + publisher.state.sent_audio.load(Ordering::Relaxed)) as f64;
    let received_rtp = sum(&after, "sluice_rtp_received_packets_total");
    println!("clients received {received_by_clients}, shards forwarded {forwarded}; publisher sent {sent}, shards received {received_rtp}");
    assert!(received_by_clients > 1000);
    let ratio = forwarded / received_by_clients as f64;
    assert!(
        (0.99..=1.01).contains(&ratio),
        "forwarded {forwarded} vs received {received_by_clients}"
    );
    let ratio = received_rtp / sent;
    assert!(
        (0.99..=1.01).contains(&ratio),
        "shards received {received_rtp} vs publisher sent {sent}"
    );

    let latency_count = sum(&after, "sluice_forward_latency_seconds_count");
    assert!(
        (latency_count - forwarded).abs() <= forwarded * 0.01,
        "every forwarded packet timed: {latency_count} vs {forwarded}"
    );
    assert!(
        sum(&after, "sluice_connect_seconds_count") >= 5.0,
        "five peers connected"
    );
    let packets_out = sum(&after, "sluice_media_packets_total");
    assert!(packets_out > forwarded, "media packets counted");
}
