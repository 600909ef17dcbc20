//! Bad input never crashes sluice nor disturbs a running stream: HTTP refusals with reasons, and
//! garbage datagrams on the media ports dropped and counted.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use sluice::config::IoBackend;

fn post(base: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String, Option<String>) {
    match ureq::post(&format!("{base}{path}"))
        .set("Content-Type", ctype)
        .send_bytes(body)
    {
        Ok(r) => (r.status(), String::new(), None),
        Err(ureq::Error::Status(code, r)) => {
            let retry = r.header("Retry-After").map(str::to_string);
            (code, r.into_string().unwrap_or_default(), retry)
        }
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn http_refusals_carry_reasons() {
    let mut c = config(1, IoBackend::Mmsg);
    c.limits.max_peers = 2;
    let server = start(c);
    let base = format!("http://{}", server.http_addr);

    let (code, body, _) = post(
        &base,
        "/whip/x",
        "application/sdp",
        b"v=0\r\nthis is not sdp",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("SDP"), "reason given: {body}");

    let (code, body, _) = post(&base, "/whip/x", "text/plain", b"v=0");
    assert_eq!(code, 415, "{body}");

    let big = vec![b'a'; 70 * 1024];
    let (code, _, _) = post(&base, "/whip/x", "application/sdp", &big);
    assert_eq!(code, 413);

    let (code, body, _) = post(&base, "/whep/nobody", "application/sdp", b"v=0\r\n");
    assert_eq!(code, 404, "{body}");

    let (code, _, _) = post(&base, "/whip/bad%20name", "application/sdp", b"v=0\r\n");
    assert_eq!(code, 400);

    let publisher = Client::publish(&server, "taken").expect("first publisher");
    let err = Client::publish(&server, "taken")
        .err()
        .expect("second publisher refused");
    assert!(err.starts_with("409"), "{err}");

    // max_peers = 2: one more session fits, the next gets 503 with Retry-After.
    let _viewer = Client::play(&server, "taken").expect("second session fits");
    let (code, body, retry) = post(&base, "/whep/taken", "application/sdp", b"v=0\r\n");
    assert_eq!(code, 503, "{body}");
    assert!(retry.is_some(), "Retry-After is set");
    drop(publisher);

    let metrics = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("sluice_http_signaling_total{outcome=\"conflict\"} 1"),
        "{metrics}"
    );
}

fn flood_during_stream(io: IoBackend) {
    let server = start(config(2, io));
    let publisher = Client::publish(&server, "flood").expect("WHIP");
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let viewer = Client::play(&server, "flood").expect("WHEP");
    assert!(viewer.wait_connected(Duration::from_secs(10)));
    assert!(wait_until(Duration::from_secs(5), || viewer
        .received()
        .iter()
        .any(|r| r.video)));

    // Random bytes, truncated STUN, RTP- and DTLS-shaped junk from unknown 5-tuples, to every port.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x1234_5678u32;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for addr in server.media_addrs() {
        for i in 0..3000u32 {
            let len = (rnd() % 1400) as usize + 1;
            let mut buf: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            match i % 4 {
                0 => buf[0] = 0x80,                                           // RTP-shaped
                1 => buf = vec![0, 1, 0, 8, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3], // truncated STUN
                2 => buf[0] = 22,                                             // DTLS-shaped
                _ => {}
            }
            let _ = junk.send_to(&buf, addr);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = viewer.received().len();
    assert!(
        wait_until(Duration::from_secs(3), || viewer.received().len()
            > before + 100),
        "the viewer keeps receiving after the flood"
    );
    let dropped: u64 = server
        .control
        .shards
        .iter()
        .map(|s| {
            s.stats.get(sluice::metrics::Counter::DropUnknownSource)
                + s.stats.get(sluice::metrics::Counter::DropMalformed)
        })
        .sum();
    assert!(dropped >= 3000, "garbage counted: {dropped}");
}

#[test]
fn garbage_flood_is_counted_and_harmless_uring() {
    flood_during_stream(IoBackend::Uring);
}

#[test]
fn garbage_flood_is_counted_and_harmless_mmsg() {
    flood_during_stream(IoBackend::Mmsg);
}
