//! sluice's patch to the vendored str0m (`vendor/str0m/SLUICE.md`), on a connected pair of
//! `Rtc`s joined in memory and run on virtual time: sluice's side sends every packet with
//! `Rtc::send_rtp_now` into a recycled buffer, as a shard does for a subscriber without a
//! bandwidth estimator, and the other side receives it the regular way.
//!
//! - Every packet is sent at once, and arrives decrypted with its payload intact (the payload
//!   is encrypted from where it lies, not from a copy).
//! - The buffer given is the one the datagram owns, so recycling it allocates nothing.
//! - What the sender keeps stays bounded over a long stream: a counting allocator holds the live
//!   heap flat between the 10th and the 70th second. (The byte history behind str0m's resend
//!   ratio cap was aged only where str0m looks for resends, which `send_rtp_now` skips, so it
//!   grew by one entry per packet for as long as the subscriber lived.)
//! - A packet sent this way never enters str0m's send queue, yet lands in the resend history: a
//!   datagram lost on the way comes back when the viewer NACKs it.
//! - MID is sent only until the viewer's receiver report names the stream's SSRC, also on a
//!   stream with an RTX SSRC (str0m took no report as the binding there).

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

struct Live;

/// Bytes allocated and not yet freed, by every thread of this test binary.
static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as i64 - l.size() as i64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Live = Live;

/// Addresses the two `Rtc`s claim. No socket is ever bound: datagrams are handed over in memory.
const SFU: &str = "127.0.0.1:41000";
const VIEWER: &str = "127.0.0.1:41001";

/// One side of the pair.
struct Side {
    rtc: Rtc,
    addr: SocketAddr,
    timeout: Instant,
    connected: bool,
    /// RTP payloads received, in order (the viewer's).
    received: Vec<Vec<u8>>,
    /// Whether each packet received carried a MID header extension, in order.
    with_mid: Vec<bool>,
}

impl Side {
    fn new(rtc: Rtc, addr: &str, now: Instant) -> Side {
        Side {
            rtc,
            addr: addr.parse().unwrap(),
            timeout: now,
            connected: false,
            received: Vec::new(),
            with_mid: Vec::new(),
        }
    }

    /// Run `poll_output` until it gives a timeout; return what it transmits.
    fn poll(&mut self) -> Vec<Transmit> {
        let mut out = Vec::new();
        loop {
            match self.rtc.poll_output().expect("poll_output") {
                Output::Timeout(t) => {
                    self.timeout = t;
                    return out;
                }
                Output::Transmit(t) => out.push(t),
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::RtpPacket(p)) => {
                    self.with_mid.push(p.header.ext_vals.mid.is_some());
                    self.received.push(p.payload.to_vec());
                }
                Output::Event(_) => {}
            }
        }
    }

    fn receive(&mut self, now: Instant, t: &Transmit) {
        let r = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).unwrap();
        self.rtc.handle_input(Input::Receive(now, r)).unwrap();
    }
}

/// Hand every datagram either side has to the other, and fire due timeouts, until both are
/// quiet at `now`.
fn pump(sfu: &mut Side, viewer: &mut Side, now: Instant) {
    for _ in 0..64 {
        for side in [&mut *sfu, &mut *viewer] {
            if side.timeout <= now {
                side.rtc.handle_input(Input::Timeout(now)).unwrap();
            }
        }
        let from_sfu = sfu.poll();
        let from_viewer = viewer.poll();
        if from_sfu.is_empty() && from_viewer.is_empty() {
            return;
        }
        for t in &from_sfu {
            viewer.receive(now, t);
        }
        for t in &from_viewer {
            sfu.receive(now, t);
        }
    }
    panic!("the pair never went quiet");
}

/// A viewer offering to receive video, and an ice-lite RTP-mode `Rtc` answering as sluice's
/// subscriber connections do (no bandwidth estimator), connected on virtual time.
fn connected_pair(t0: Instant) -> (Side, Side, Mid, Instant) {
    let mut viewer = RtcConfig::new().set_rtp_mode(true).build(t0);
    viewer.add_local_candidate(Candidate::host(VIEWER.parse().unwrap(), "udp").unwrap());
    let mut api = viewer.sdp_api();
    let mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();

    let mut sfu = RtcConfig::new()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .build(t0);
    sfu.add_local_candidate(Candidate::host(SFU.parse().unwrap(), "udp").unwrap());
    let answer = sfu.sdp_api().accept_offer(offer).unwrap();
    viewer.sdp_api().accept_answer(pending, answer).unwrap();

    let (mut sfu, mut viewer) = (Side::new(sfu, SFU, t0), Side::new(viewer, VIEWER, t0));
    let mut now = t0;
    while !(sfu.connected && viewer.connected) {
        pump(&mut sfu, &mut viewer, now);
        assert!(now < t0 + Duration::from_secs(10), "never connected");
        now += Duration::from_millis(5);
    }
    (sfu, viewer, mid, now)
}

/// `connected_pair`, then the VP8 payload type and 100 ms of virtual time for the stream to see
/// its first timeout (str0m sets its kind there, and only then sends at once).
fn ready_to_send(t0: Instant) -> (Side, Side, Mid, Pt, Instant) {
    let (mut sfu, mut viewer, mid, mut now) = connected_pair(t0);
    let pt = sfu
        .rtc
        .codec_config()
        .iter()
        .find(|p| p.spec().codec == Codec::Vp8)
        .expect("VP8 negotiated")
        .pt();
    for _ in 0..10 {
        now += Duration::from_millis(10);
        pump(&mut sfu, &mut viewer, now);
    }
    (sfu, viewer, mid, pt, now)
}

/// Check and drop what the viewer received; how many.
fn check(viewer: &mut Side, payload: &[u8]) -> u64 {
    let n = viewer.received.len() as u64;
    for p in viewer.received.drain(..) {
        assert_eq!(&p[..], payload, "the payload arrives intact");
    }
    n
}

#[test]
fn send_rtp_now_delivers_every_packet_into_the_given_buffer_and_keeps_memory_bounded() {
    let (mut sfu, mut viewer, mid, pt, mut now) = ready_to_send(Instant::now());

    // 1,000 packets a second for 70 s: a 1,100-byte payload shared by every packet, as a
    // publisher's packet is shared by its subscribers.
    let payload: Arc<[u8]> = (0..1100u32)
        .map(|i| (i * 7) as u8)
        .collect::<Vec<_>>()
        .into();
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let (mut sent, mut fallback, mut received) = (0u64, 0u64, 0u64);
    let mut live_at_10s = 0;
    const SECONDS: u64 = 70;
    for i in 0..SECONDS * 1000 {
        now += Duration::from_millis(1);
        let write = RtpWrite::new(pt, (i + 1).into(), (i * 90) as u32, now, payload.clone())
            .marker(i % 30 == 29)
            .nackable(true);
        let recycled = buf.as_ptr();
        match sfu.rtc.send_rtp_now(mid, write, now, &mut buf) {
            Ok(Some(t)) => {
                assert!(buf.is_empty() && buf.capacity() == 0, "buf was taken");
                assert_eq!(
                    t.contents.as_ptr(),
                    recycled,
                    "the datagram is in buf's memory"
                );
                assert_eq!(t.destination, viewer.addr);
                viewer.receive(now, &t);
                for back in viewer.poll() {
                    sfu.receive(now, &back);
                }
                buf = t.contents.into();
                sent += 1;
            }
            Ok(None) => panic!("packet {i} dropped"),
            Err(write) => {
                // Only before str0m is ready for the fast path; counted, and bounded below.
                sfu.rtc
                    .direct_api()
                    .stream_tx_by_mid(mid, None)
                    .unwrap()
                    .write_rtp(write);
                fallback += 1;
            }
        }
        if i % 10 == 9 {
            pump(&mut sfu, &mut viewer, now);
        }
        if i % 1000 == 0 {
            // Received payloads are checked and dropped as they come, so they do not count.
            received += check(&mut viewer, &payload);
        }
        if i == 10 * 1000 {
            live_at_10s = LIVE.load(Ordering::Relaxed);
        }
    }
    pump(&mut sfu, &mut viewer, now);
    received += check(&mut viewer, &payload);
    let growth = LIVE.load(Ordering::Relaxed) - live_at_10s;
    println!(
        "sent {sent} at once, {fallback} through the queue, {received} received; live heap grew {growth} bytes from 10 s to {SECONDS} s"
    );
    assert!(
        fallback <= 10,
        "the fast path was used ({fallback} fell back)"
    );
    assert_eq!(received, SECONDS * 1000, "every packet arrived");
    assert!(sent >= SECONDS * 1000 - 10);
    // 60,000 packets went out after the 10 s mark. A per-packet leak of even 4 bytes is 240 KB.
    assert!(
        growth < 128 * 1024,
        "the sender's live heap grew by {growth} bytes over 60 s of sending"
    );
}

/// Packets sent with `send_rtp_now` never pass through str0m's send queue, so they reach the
/// resend history another way: a datagram lost on the way is asked for again (NACK) and comes
/// back as a resend, and every sequence number arrives.
#[test]
fn packets_sent_at_once_are_resent_when_the_viewer_asks() {
    let (mut sfu, mut viewer, mid, pt, mut now) = ready_to_send(Instant::now());

    // 200 packets a second for 5 s; every 25th datagram is lost on the way.
    const PACKETS: u64 = 1000;
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let (mut sent, mut lost) = (0u64, 0u64);
    for i in 0..PACKETS {
        now += Duration::from_millis(5);
        // Each payload names its packet, so the viewer can tell which ones arrived.
        let mut named = i.to_be_bytes().to_vec();
        named.resize(600, 0xAB);
        let payload: Arc<[u8]> = named.into();
        let write =
            RtpWrite::new(pt, (i + 1).into(), (i * 450) as u32, now, payload).nackable(true);
        match sfu.rtc.send_rtp_now(mid, write, now, &mut buf) {
            Ok(Some(t)) => {
                if i % 25 == 12 {
                    lost += 1;
                } else {
                    viewer.receive(now, &t);
                }
                buf = t.contents.into();
                sent += 1;
            }
            Ok(None) => panic!("packet {i} dropped"),
            Err(_) => panic!("packet {i} was not sent at once"),
        }
        pump(&mut sfu, &mut viewer, now);
    }
    // Time for the last NACKs and their resends.
    for _ in 0..100 {
        now += Duration::from_millis(10);
        pump(&mut sfu, &mut viewer, now);
    }
    let mut seen: Vec<u64> = viewer
        .received
        .drain(..)
        .map(|p| u64::from_be_bytes(p[..8].try_into().unwrap()))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let missing: Vec<u64> = (0..PACKETS)
        .filter(|i| seen.binary_search(i).is_err())
        .collect();
    println!(
        "sent {sent}, lost {lost} on the way, {} distinct arrived",
        seen.len()
    );
    assert_eq!(sent, PACKETS);
    assert!(lost >= 39, "the test lost packets ({lost})");
    assert!(
        missing.is_empty(),
        "never resent: {} packets, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// BUNDLE lets a sender drop the MID extension once the receiver has bound the SSRC, which a
/// receiver report on it shows. A video stream has an RTX SSRC, and str0m used to take a report
/// as that binding only on streams without one, so MID went out on every packet.
#[test]
fn mid_stops_once_the_viewer_reports_on_the_ssrc() {
    let (mut sfu, mut viewer, mid, pt, mut now) = ready_to_send(Instant::now());
    let payload: Arc<[u8]> = vec![7u8; 500].into();
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    // 200 packets a second for 3 s: the viewer reports once a second.
    for i in 0..600u64 {
        now += Duration::from_millis(5);
        let write = RtpWrite::new(pt, (i + 1).into(), (i * 450) as u32, now, payload.clone())
            .nackable(true);
        let t = sfu
            .rtc
            .send_rtp_now(mid, write, now, &mut buf)
            .ok()
            .flatten()
            .expect("sent at once");
        viewer.receive(now, &t);
        buf = t.contents.into();
        pump(&mut sfu, &mut viewer, now);
    }
    let with_mid = std::mem::take(&mut viewer.with_mid);
    assert_eq!(with_mid.len(), 600, "every packet arrived");
    assert!(with_mid[0], "the first packets carry MID");
    let last_second = &with_mid[400..];
    assert!(
        last_second.iter().all(|m| !m),
        "MID still on {} of the last 200 packets",
        last_second.iter().filter(|m| **m).count()
    );
}
