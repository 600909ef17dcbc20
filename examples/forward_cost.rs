//! What forwarding one packet costs sluice in user space, measured without the network or the
//! host's noise: a publisher's packet sent to N subscribers' `Rtc`s with `Rtc::send_rtp_now`,
//! as a shard does, on virtual time, with every datagram handed over in memory.
//!
//! Each subscriber is an ice-lite RTP-mode `Rtc` (as sluice builds them) connected to a viewer
//! `Rtc` that offers video with str0m's default header extensions. The subscriber answers with
//! the extensions sluice negotiates for a viewer without a bandwidth estimator (no abs-send-time,
//! no transport-wide sequence numbers), or with all of str0m's given `all-extensions` (sessions
//! 11 and 12 measured that way before sluice dropped the two). The run warms up for longer
//! than str0m's resend history, so that the history is full and every packet evicts one, as in a
//! long-lived stream, then measures `PACKETS` packets to every subscriber. The viewers' reports
//! flow back throughout and are handled by the subscribers' `Rtc`s as a shard would.
//!
//! Two functions do the work, and two wrappers called only after the warm-up give callgrind
//! the measured part to count (`perf/README.md`):
//!
//! - `forward` (`measured_forward`): one packet to every subscriber, protected into recycled
//!   buffers;
//! - `feedback` (`measured_feedback`): the subscribers' side of the viewers' reports, timeouts
//!   and output drains.
//!
//! ```sh
//! cargo build --release --example forward_cost
//! valgrind --tool=callgrind --toggle-collect='*forward_cost::measured_*' \
//!     target/release/examples/forward_cost
//! ```
//!
//! Arguments: `[subscribers] [packets] [all-extensions]` (defaults 50 and 600). It prints the wall
//! time per forwarded packet too, which on a shared VM is only a rough guide.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::control::negotiate::extensions_without_estimator;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive, Transmit};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

/// One subscriber: sluice's `Rtc` for it, and the viewer at the other end.
struct Sub {
    sfu: Rtc,
    viewer: Rtc,
    sfu_timeout: Instant,
    viewer_timeout: Instant,
    mid: Mid,
    pt: Pt,
    connected: bool,
    /// Datagrams the subscriber's `Rtc` sent, not yet given to the viewer.
    to_viewer: Vec<Transmit>,
    /// Datagrams the viewer sent, not yet given to the subscriber's `Rtc`.
    to_sfu: Vec<Transmit>,
}

/// Run `poll_output` until a timeout; collect transmits. True when it reported `Connected`.
fn drain(rtc: &mut Rtc, out: &mut Vec<Transmit>, timeout: &mut Instant) -> bool {
    let mut connected = false;
    loop {
        match rtc.poll_output().expect("poll_output") {
            Output::Timeout(t) => {
                *timeout = t;
                return connected;
            }
            Output::Transmit(t) => out.push(t),
            Output::Event(Event::Connected) => connected = true,
            Output::Event(_) => {}
        }
    }
}

fn receive(rtc: &mut Rtc, now: Instant, t: &Transmit) {
    let r = Receive::new(Protocol::Udp, t.source, t.destination, &t.contents).expect("datagram");
    rtc.handle_input(Input::Receive(now, r))
        .expect("handle_input");
}

impl Sub {
    fn new(i: u16, t0: Instant, all_extensions: bool) -> Sub {
        let sfu_addr: SocketAddr = format!("127.0.0.1:{}", 20000 + i).parse().unwrap();
        let viewer_addr: SocketAddr = format!("127.0.0.2:{}", 20000 + i).parse().unwrap();
        let mut viewer = RtcConfig::new().set_rtp_mode(true).build(t0);
        viewer.add_local_candidate(Candidate::host(viewer_addr, "udp").unwrap());
        let mut api = viewer.sdp_api();
        let mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let mut cfg = RtcConfig::new().set_ice_lite(true).set_rtp_mode(true);
        if !all_extensions {
            cfg = cfg.set_extension_map(extensions_without_estimator());
        }
        let mut sfu = cfg.build(t0);
        sfu.add_local_candidate(Candidate::host(sfu_addr, "udp").unwrap());
        let answer = sfu.sdp_api().accept_offer(offer).unwrap();
        viewer.sdp_api().accept_answer(pending, answer).unwrap();
        let pt = sfu
            .codec_config()
            .iter()
            .find(|p| p.spec().codec == Codec::Vp8)
            .expect("VP8 negotiated")
            .pt();
        Sub {
            sfu,
            viewer,
            sfu_timeout: t0,
            viewer_timeout: t0,
            mid,
            pt,
            connected: false,
            to_viewer: Vec::new(),
            to_sfu: Vec::new(),
        }
    }

    /// The viewer's side: take what the subscriber's `Rtc` sent, fire its timeout, and queue its
    /// replies. Not measured: a viewer is not sluice's work.
    fn viewer_turn(&mut self, now: Instant) {
        for t in self.to_viewer.drain(..) {
            receive(&mut self.viewer, now, &t);
        }
        if self.viewer_timeout <= now {
            self.viewer
                .handle_input(Input::Timeout(now))
                .expect("timeout");
        }
        drain(&mut self.viewer, &mut self.to_sfu, &mut self.viewer_timeout);
    }
}

/// sluice's side of everything but the packets: the viewers' datagrams, due timeouts, and the
/// output drain.
#[inline(never)]
fn feedback(subs: &mut [Sub], now: Instant) {
    for s in subs {
        for t in s.to_sfu.drain(..) {
            receive(&mut s.sfu, now, &t);
        }
        if s.sfu_timeout <= now {
            s.sfu.handle_input(Input::Timeout(now)).expect("timeout");
        }
        if drain(&mut s.sfu, &mut s.to_viewer, &mut s.sfu_timeout) {
            s.connected = true;
        }
    }
}

/// One publisher packet to every subscriber, each protected into a recycled buffer. Returns how
/// many went out at once.
#[inline(never)]
fn forward(
    subs: &mut [Sub],
    seq: u64,
    payload: &Arc<[u8]>,
    pool: &mut Vec<Vec<u8>>,
    now: Instant,
) -> usize {
    let mut sent = 0;
    for s in subs {
        let write = RtpWrite::new(s.pt, seq.into(), (seq * 450) as u32, now, payload.clone())
            .marker(seq % 6 == 5)
            .nackable(true);
        let mut buf = pool.pop().unwrap_or_default();
        match s.sfu.send_rtp_now(s.mid, write, now, &mut buf) {
            Ok(Some(t)) => {
                s.to_viewer.push(t);
                sent += 1;
            }
            Ok(None) => {}
            Err(write) => {
                // Before the stream's first timeout str0m wants the queue; so does a shard.
                if let Some(tx) = s.sfu.direct_api().stream_tx_by_mid(s.mid, None) {
                    tx.write_rtp(write);
                }
            }
        }
        if buf.capacity() > 0 {
            pool.push(buf);
        }
    }
    sent
}

#[inline(never)]
fn measured_forward(
    subs: &mut [Sub],
    seq: u64,
    payload: &Arc<[u8]>,
    pool: &mut Vec<Vec<u8>>,
    now: Instant,
) -> usize {
    forward(subs, seq, payload, pool, now)
}

#[inline(never)]
fn measured_feedback(subs: &mut [Sub], now: Instant) {
    feedback(subs, now)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u16 = args.next().map_or(50, |a| a.parse().expect("subscribers"));
    let packets: u64 = args.next().map_or(600, |a| a.parse().expect("packets"));
    let all_extensions = match args.next().as_deref() {
        None => false,
        Some("all-extensions") => true,
        Some(other) => panic!("unknown argument {other}: expected all-extensions"),
    };

    let t0 = Instant::now();
    let mut subs: Vec<Sub> = (0..n).map(|i| Sub::new(i, t0, all_extensions)).collect();
    let mut now = t0;
    while !subs.iter().all(|s| s.connected) {
        feedback(&mut subs, now);
        for s in &mut subs {
            s.viewer_turn(now);
        }
        now += Duration::from_millis(5);
        assert!(now < t0 + Duration::from_secs(10), "never connected");
    }

    // 1,100 bytes shared by every subscriber, as a publisher's packet is. 200 packets a second,
    // a report exchange every 20 ms.
    let payload: Arc<[u8]> = (0..1100u32)
        .map(|i| (i * 7) as u8)
        .collect::<Vec<_>>()
        .into();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let step = Duration::from_millis(5);
    // str0m keeps 3 s of sent packets for resends: 4 s of warm-up fills that history.
    let warm = 800;
    let mut seq = 0;
    let mut sent_measured = 0usize;
    let mut wall = Duration::ZERO;
    for i in 0..warm + packets {
        now += step;
        seq += 1;
        let measured = i >= warm;
        let start = Instant::now();
        let sent = if measured {
            measured_forward(&mut subs, seq, &payload, &mut pool, now)
        } else {
            forward(&mut subs, seq, &payload, &mut pool, now)
        };
        if measured {
            wall += start.elapsed();
            sent_measured += sent;
        }
        // Sent datagrams go to the viewers and come back as buffers to reuse, as a shard's do.
        for s in &mut subs {
            for t in s.to_viewer.iter() {
                receive(&mut s.viewer, now, t);
            }
            pool.extend(s.to_viewer.drain(..).map(|t| {
                let mut b: Vec<u8> = t.contents.into();
                b.clear();
                b
            }));
        }
        if seq % 4 == 0 {
            for s in &mut subs {
                s.viewer_turn(now);
            }
            if measured {
                measured_feedback(&mut subs, now);
            } else {
                feedback(&mut subs, now);
            }
        }
    }
    let forwarded = packets as usize * n as usize;
    assert!(
        sent_measured == forwarded,
        "{sent_measured} of {forwarded} went out at once"
    );
    println!(
        "{n} subscribers x {packets} packets: {forwarded} forwarded at once, {:.0} ns each (wall)",
        wall.as_nanos() as f64 / forwarded as f64
    );
}
