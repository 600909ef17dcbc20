//! The forwarding core end to end, in process: str0m clients publish over WHIP and play over WHEP
//! through sluice's public HTTP interface and its real media sockets, on both I/O backends.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sluice::config::IoBackend;

const CONNECT: Duration = Duration::from_secs(10);

/// Keep making viewers until at least two shards each hold one, and we have `n`.
fn viewers_on_two_shards(server: &sluice::serve::Server, stream: &str, n: usize) -> Vec<Client> {
    let mut viewers: Vec<Client> = Vec::new();
    for _ in 0..40 {
        let ports: HashSet<u16> = viewers.iter().map(|v| v.shard_port).collect();
        if viewers.len() >= n && ports.len() >= 2 {
            break;
        }
        let v = Client::play(server, stream).expect("WHEP accepted");
        if viewers.len() >= n - 1 && ports.len() < 2 && ports.contains(&v.shard_port) {
            assert_eq!(v.delete(), 200);
            continue;
        }
        viewers.push(v);
    }
    let ports: HashSet<u16> = viewers.iter().map(|v| v.shard_port).collect();
    assert!(ports.len() >= 2, "viewers on shards {ports:?}");
    viewers
}

/// Every payload in the viewer's window arrives intact, in order, with continuous sequence
/// numbers; returns (video, audio) counts.
fn check_continuous(name: &str, got: &[Received]) -> (usize, usize) {
    let mut counts = (0, 0);
    for video in [true, false] {
        let pkts: Vec<&Received> = got.iter().filter(|r| r.video == video).collect();
        assert!(
            !pkts.is_empty(),
            "{name}: no {} packets",
            if video { "video" } else { "audio" }
        );
        let counters: Vec<u32> = pkts
            .iter()
            .map(|r| {
                payload_counter(video, &r.payload)
                    .unwrap_or_else(|| panic!("{name}: corrupt payload"))
            })
            .collect();
        for w in counters.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "{name}: publisher counters jump (video={video})"
            );
        }
        let seqs: Vec<u64> = pkts.iter().map(|r| r.seq).collect();
        assert!(
            is_sorted_continuous(&seqs),
            "{name}: sequence numbers not continuous (video={video})"
        );
        let ssrcs: HashSet<u32> = pkts.iter().map(|r| r.ssrc).collect();
        assert_eq!(ssrcs.len(), 1, "{name}: one outgoing SSRC per track");
        if video {
            counts.0 = pkts.len();
        } else {
            counts.1 = pkts.len();
        }
    }
    counts
}

fn fanout_to_six(io: IoBackend, busy_poll_us: u64) {
    let mut cfg = config(2, io);
    // Sends go to the kernel two subscribers at a time: each shard's viewers span chunks.
    cfg.media.send_chunk = 2;
    cfg.media.busy_poll_us = busy_poll_us;
    let server = start(cfg);
    let publisher = Client::publish(&server, "fan").expect("WHIP accepted");
    assert!(publisher.wait_connected(CONNECT), "publisher connects");
    let viewers = viewers_on_two_shards(&server, "fan", 6);
    for v in &viewers {
        assert!(v.wait_connected(CONNECT), "viewer connects");
    }
    // Let every viewer lock on to a keyframe, then measure a 2 s window.
    assert!(wait_until(CONNECT, || viewers
        .iter()
        .all(|v| v.received().iter().any(|r| r.video))));
    std::thread::sleep(Duration::from_secs(2));
    publisher.state.paused.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    for (i, v) in viewers.iter().enumerate() {
        let (video, audio) = check_continuous(&format!("viewer {i}"), &v.received());
        assert!(
            video > 200 && audio > 50,
            "viewer {i}: {video} video, {audio} audio"
        );
    }
}

/// The distinct video sequence numbers a client received, in order.
fn video_seqs(c: &Client) -> Vec<u64> {
    let mut seqs: Vec<u64> = c
        .received()
        .iter()
        .filter(|r| r.video)
        .map(|r| r.seq)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs
}

/// A viewer that loses every 10th RTP datagram still gets every video packet: it sends NACKs, and
/// sluice resends from its copies of what it sent (RTX). Those copies are kept whether a packet
/// was protected at once or went through str0m's queue.
#[test]
fn lost_video_is_resent() {
    let server = start(config(1, IoBackend::Uring));
    let publisher = Client::publish(&server, "lossy").expect("WHIP accepted");
    assert!(publisher.wait_connected(CONNECT), "publisher connects");
    let viewer = Client::play(&server, "lossy").expect("WHEP accepted");
    viewer.state.lose_rtp_every.store(10, Ordering::Relaxed);
    assert!(viewer.wait_connected(CONNECT), "viewer connects");
    assert!(wait_until(CONNECT, || viewer
        .received()
        .iter()
        .any(|r| r.video)));
    std::thread::sleep(Duration::from_secs(2));
    publisher.state.paused.store(true, Ordering::Relaxed);
    // Time for the last NACKs and their resends.
    std::thread::sleep(Duration::from_secs(1));
    let lost = viewer.state.lost_rtp.load(Ordering::Relaxed);
    let seqs = video_seqs(&viewer);
    let span = seqs.last().unwrap() - seqs.first().unwrap() + 1;
    let missing = span - seqs.len() as u64;
    assert!(lost >= 20, "the viewer lost only {lost} datagrams");
    assert!(seqs.len() > 200, "{} video packets", seqs.len());
    assert_eq!(
        missing, 0,
        "{missing} of {span} video packets never arrived ({lost} lost)"
    );
}

#[test]
fn one_publisher_six_viewers_two_shards_uring() {
    fanout_to_six(IoBackend::Uring, 0);
}

#[test]
fn one_publisher_six_viewers_two_shards_mmsg() {
    fanout_to_six(IoBackend::Mmsg, 0);
}

/// The same with busy polling: shards poll for 300 us after each packet (shorter than the
/// media's gaps, so they also sleep), and must lose nothing, their own or the other shard's.
#[test]
fn one_publisher_six_viewers_busy_polling_uring() {
    fanout_to_six(IoBackend::Uring, 300);
}

#[test]
fn one_publisher_six_viewers_busy_polling_mmsg() {
    fanout_to_six(IoBackend::Mmsg, 300);
}

fn late_viewer_asks_for_keyframe(io: IoBackend) {
    let server = start(config(2, io));
    let publisher = Client::publish(&server, "late").expect("WHIP accepted");
    assert!(publisher.wait_connected(CONNECT));
    std::thread::sleep(Duration::from_millis(300));
    let before = publisher.state.keyframe_requests.load(Ordering::Relaxed);
    let viewer = Client::play(&server, "late").expect("WHEP accepted");
    assert!(viewer.wait_connected(CONNECT));
    assert!(
        wait_until(Duration::from_millis(900), || publisher.state.keyframe_requests.load(Ordering::Relaxed) > before),
        "a viewer joining mid-stream makes sluice ask the publisher for a keyframe (well before the 1 s periodic one)"
    );
    // The first video packet the viewer gets is a keyframe.
    assert!(wait_until(CONNECT, || viewer
        .received()
        .iter()
        .any(|r| r.video)));
    let first = viewer.received().into_iter().find(|r| r.video).unwrap();
    assert_eq!(
        first.payload[1] & 1,
        0,
        "first forwarded video packet is a keyframe"
    );
}

#[test]
fn late_viewer_asks_for_keyframe_uring() {
    late_viewer_asks_for_keyframe(IoBackend::Uring);
}

#[test]
fn late_viewer_asks_for_keyframe_mmsg() {
    late_viewer_asks_for_keyframe(IoBackend::Mmsg);
}

fn republish_is_continuous(io: IoBackend) {
    let server = start(config(2, io));
    let first = Client::publish(&server, "again").expect("WHIP accepted");
    assert!(first.wait_connected(CONNECT));
    let viewer = Client::play(&server, "again").expect("WHEP accepted");
    assert!(viewer.wait_connected(CONNECT));
    assert!(wait_until(CONNECT, || viewer
        .received()
        .iter()
        .filter(|r| r.video)
        .count()
        > 50));
    assert_eq!(first.delete(), 200);
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let before = viewer.received().len();
    let second = Client::publish(&server, "again").expect("the name is free again");
    assert!(second.wait_connected(CONNECT));
    assert!(wait_until(CONNECT, || viewer
        .received()
        .iter()
        .skip(before)
        .filter(|r| r.video)
        .count()
        > 50));
    let got = viewer.received();
    for video in [true, false] {
        let seqs: Vec<u64> = got
            .iter()
            .filter(|r| r.video == video)
            .map(|r| r.seq)
            .collect();
        assert!(
            is_sorted_continuous(&seqs),
            "continuous across publishers (video={video})"
        );
        let ssrcs: HashSet<u32> = got
            .iter()
            .filter(|r| r.video == video)
            .map(|r| r.ssrc)
            .collect();
        assert_eq!(ssrcs.len(), 1, "the viewer sees one SSRC across publishers");
        let ts: Vec<u32> = got
            .iter()
            .filter(|r| r.video == video)
            .map(|r| r.timestamp)
            .collect();
        assert!(
            ts.windows(2).all(|w| w[1].wrapping_sub(w[0]) < 1 << 31),
            "timestamps move forward"
        );
    }
}

#[test]
fn republish_is_continuous_uring() {
    republish_is_continuous(IoBackend::Uring);
}

#[test]
fn republish_is_continuous_mmsg() {
    republish_is_continuous(IoBackend::Mmsg);
}

fn peers_end(io: IoBackend) {
    let mut c = config(1, io);
    c.media.ice_timeout_ms = 1500;
    let server = start(c);
    let publisher = Client::publish(&server, "end").expect("WHIP accepted");
    assert!(publisher.wait_connected(CONNECT));
    let mut viewer = Client::play(&server, "end").expect("WHEP accepted");
    assert!(viewer.wait_connected(CONNECT));
    let peers = || {
        server
            .control
            .shards
            .iter()
            .map(|s| s.stats.peers.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    assert!(wait_until(CONNECT, || peers() == 2));
    // A viewer that goes silent is removed after the ICE timeout.
    viewer.go_silent();
    assert!(
        wait_until(Duration::from_secs(5), || peers() == 1),
        "silent viewer removed"
    );
    assert_eq!(viewer.delete(), 404, "its session is gone");
    // DELETE frees the publisher's session and the stream.
    assert_eq!(publisher.delete(), 200);
    assert!(wait_until(Duration::from_secs(2), || peers() == 0));
    assert_eq!(publisher.delete(), 404);
    let streams: serde_json::Value = ureq::get(&format!("http://{}/api/streams", server.http_addr))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(streams["streams"].as_array().unwrap().len(), 0);
}

#[test]
fn delete_and_ice_timeout_free_peers_uring() {
    peers_end(IoBackend::Uring);
}

#[test]
fn delete_and_ice_timeout_free_peers_mmsg() {
    peers_end(IoBackend::Mmsg);
}

#[test]
fn ice_restart_moves_a_viewer_to_a_new_address() {
    let server = start(config(1, IoBackend::Uring));
    let publisher = Client::publish(&server, "move").expect("WHIP accepted");
    assert!(publisher.wait_connected(CONNECT));
    let viewer = Client::play(&server, "move").expect("WHEP accepted");
    assert!(viewer.wait_connected(CONNECT));
    assert!(wait_until(CONNECT, || viewer.received().len() > 50));
    let old = viewer.state.local.lock().unwrap().unwrap();
    assert_eq!(
        viewer.ice_restart(),
        200,
        "PATCH with new credentials restarts ICE"
    );
    assert!(wait_until(Duration::from_secs(2), || *viewer
        .state
        .local
        .lock()
        .unwrap()
        != Some(old)));
    // Media now reaches the new address only if sluice took the new credentials.
    let before = viewer.received().len();
    assert!(
        wait_until(Duration::from_secs(5), || viewer.received().len()
            > before + 50),
        "media continues after the restart, on the new 5-tuple"
    );
    // Packets in flight to the old address during the move are lost, then repaired by NACK
    // from sluice's send buffer: the 40 sequence numbers around the move all arrive (the window
    // is fixed now; repairs may still be on their way on a busy machine).
    let seqs = || video_seqs(&viewer);
    let newest = *seqs().last().unwrap();
    let wanted = newest - 60..newest - 20;
    let have = || -> Vec<u64> { seqs().into_iter().filter(|s| wanted.contains(s)).collect() };
    assert!(
        wait_until(Duration::from_secs(3), || have().len() == 40),
        "complete after the move: {:?}",
        have()
    );
}
