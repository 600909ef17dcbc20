//! In-process test harness: a sluice server on loopback and str0m client peers that publish over
//! WHIP and play over WHEP through the public HTTP interface, each on its own UDP socket.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use sluice::config::{Config, IoBackend};
use sluice::serve::Server;

pub mod room;

pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A media port base no other test in this process uses.
pub fn port_base() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id() as u64;
    (20_000 + (pid % 200) * 100 + NEXT.fetch_add(4, Ordering::Relaxed) % 100) as u16
}

pub fn config(shards: usize, io: IoBackend) -> Config {
    let mut c = Config::default();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.media.shards = shards;
    c.media.io = io;
    c.media.listen_ips = vec!["127.0.0.1".parse().unwrap()];
    c.media.port_base = port_base();
    c.media.pin_cores = false;
    // Any free port: tests run in parallel, and 3478 may be taken.
    c.turn.listen = "127.0.0.1:0".parse().unwrap();
    c
}

pub fn start(c: Config) -> Server {
    init_log();
    sluice::serve::start(c).expect("sluice starts")
}

/// What a test client saw of one incoming RTP packet.
#[derive(Debug, Clone)]
pub struct Received {
    pub video: bool,
    pub seq: u64,
    pub timestamp: u32,
    pub ssrc: u32,
    pub payload: Vec<u8>,
    pub at: Instant,
}

#[derive(Default)]
pub struct ClientState {
    pub connected: AtomicBool,
    pub received: Mutex<Vec<Received>>,
    pub keyframe_requests: AtomicU64,
    pub sent_video: AtomicU64,
    pub sent_audio: AtomicU64,
    /// Publisher: ask for a keyframe on the next video packet.
    pub force_keyframe: AtomicBool,
    /// Publisher: stop sending (but keep the connection).
    pub paused: AtomicBool,
    /// Stop the client thread, without telling the server (a peer that goes silent).
    pub stop: AtomicBool,
    /// ICE restart onto a new local socket: (our new credentials, the server's new ones).
    pub restart: Mutex<Option<(str0m::IceCreds, str0m::IceCreds)>>,
    /// The local address the client currently uses.
    pub local: Mutex<Option<SocketAddr>>,
    /// Lose every Nth RTP datagram that arrives (0: none), as a lossy link would.
    pub lose_rtp_every: AtomicU64,
    /// RTP datagrams lost that way.
    pub lost_rtp: AtomicU64,
}

pub struct Client {
    pub location: String,
    pub state: Arc<ClientState>,
    pub shard_port: u16,
    thread: Option<JoinHandle<()>>,
    base: String,
}

/// Synthetic VP8 payload: descriptor with S=1, PID=0, then a VP8 frame tag whose low bit is 0 on
/// keyframes (followed by the keyframe start code and a 640x480 size), then the publisher's counter
/// and a checkable pattern.
pub fn vp8_payload(counter: u32, keyframe: bool) -> Vec<u8> {
    let mut p = if keyframe {
        vec![
            0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01,
        ]
    } else {
        vec![0x10, 0x01, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0]
    };
    p.extend_from_slice(&counter.to_be_bytes());
    p.extend((0..200u32).map(|i| (i.wrapping_mul(31) ^ counter) as u8));
    p
}

const VP8_HEADER: usize = 11;

pub fn audio_payload(counter: u32) -> Vec<u8> {
    let mut p = vec![0xfc];
    p.extend_from_slice(&counter.to_be_bytes());
    p.extend((0..60u32).map(|i| (i ^ counter) as u8));
    p
}

/// The counter in a payload made above, after checking the rest of it is intact.
pub fn payload_counter(video: bool, p: &[u8]) -> Option<u32> {
    let at = if video { VP8_HEADER } else { 1 };
    let counter = u32::from_be_bytes(p.get(at..at + 4)?.try_into().ok()?);
    let expect = if video {
        vp8_payload(counter, p[1] & 1 == 0)
    } else {
        audio_payload(counter)
    };
    (expect == p).then_some(counter)
}

pub fn http_post(
    url: &str,
    sdp: &str,
    token: Option<&str>,
) -> Result<(u16, String, String), String> {
    let mut req = ureq::post(url).set("Content-Type", "application/sdp");
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.send_string(sdp) {
        Ok(r) => {
            let loc = r.header("Location").unwrap_or_default().to_string();
            let status = r.status();
            Ok((status, loc, r.into_string().unwrap_or_default()))
        }
        Err(ureq::Error::Status(code, r)) => {
            Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

pub fn http_delete(base: &str, location: &str) -> u16 {
    match ureq::delete(&format!("{base}{location}")).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(_) => 0,
    }
}

impl Client {
    /// Publish over WHIP: video (VP8) and audio (Opus), sending synthetic RTP until stopped.
    pub fn publish(server: &Server, stream: &str) -> Result<Client, String> {
        Self::connect(&format!("http://{}", server.http_addr), stream, true, None)
    }

    /// Publish or play with `Authorization: Bearer <token>`.
    pub fn with_token(
        base: &str,
        stream: &str,
        publish: bool,
        token: &str,
    ) -> Result<Client, String> {
        Self::connect(base, stream, publish, Some(token))
    }

    /// Publish to a sluice at `base` (`http://127.0.0.1:PORT`), e.g. one running as a process.
    pub fn publish_to(base: &str, stream: &str) -> Result<Client, String> {
        Self::connect(base, stream, true, None)
    }

    pub fn play_from(base: &str, stream: &str) -> Result<Client, String> {
        Self::connect(base, stream, false, None)
    }

    /// Play over WHEP: receive video and audio.
    pub fn play(server: &Server, stream: &str) -> Result<Client, String> {
        Self::connect(&format!("http://{}", server.http_addr), stream, false, None)
    }

    fn connect(
        base: &str,
        stream: &str,
        publish: bool,
        token: Option<&str>,
    ) -> Result<Client, String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let local = socket.local_addr().unwrap();
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_vp8(true)
            .enable_opus(true, false)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let dir = if publish {
            Direction::SendOnly
        } else {
            Direction::RecvOnly
        };
        let mut api = rtc.sdp_api();
        let video = api.add_media(MediaKind::Video, dir, None, None, None);
        let audio = api.add_media(MediaKind::Audio, dir, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let base = base.to_string();
        let kind = if publish { "whip" } else { "whep" };
        let (_, location, answer) = http_post(
            &format!("{base}/{kind}/{stream}"),
            &offer.to_sdp_string(),
            token,
        )?;
        let shard_port = answer
            .lines()
            .find(|l| l.starts_with("a=candidate"))
            .and_then(|l| l.split_whitespace().nth(5))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let answer = SdpAnswer::from_sdp_string(&answer).map_err(|e| e.to_string())?;
        rtc.sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| e.to_string())?;
        let state = Arc::new(ClientState::default());
        let st = state.clone();
        let thread = std::thread::spawn(move || run_client(rtc, socket, st, publish, video, audio));
        Ok(Client {
            location,
            state,
            shard_port,
            thread: Some(thread),
            base,
        })
    }

    pub fn wait_connected(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.state.connected.load(Ordering::Relaxed))
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn delete(&self) -> u16 {
        http_delete(&self.base, &self.location)
    }

    /// ICE restart through PATCH (RFC 9725 section 4.4), moving to a new local UDP port as a
    /// client whose network changed would. Returns the HTTP status.
    pub fn ice_restart(&self) -> u16 {
        let mine = str0m::IceCreds::new();
        let frag = format!("a=ice-ufrag:{}\r\na=ice-pwd:{}\r\n", mine.ufrag, mine.pass);
        let resp = ureq::request("PATCH", &format!("{}{}", self.base, self.location))
            .set("Content-Type", "application/trickle-ice-sdpfrag")
            .set("If-Match", "*")
            .send_string(&frag);
        let r = match resp {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => return code,
            Err(_) => return 0,
        };
        let status = r.status();
        let body = r.into_string().unwrap_or_default();
        let attr = |name: &str| {
            body.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(str::to_string))
                .unwrap_or_default()
        };
        let theirs = str0m::IceCreds {
            ufrag: attr("a=ice-ufrag:"),
            pass: attr("a=ice-pwd:"),
        };
        *self.state.restart.lock().unwrap() = Some((mine, theirs));
        status
    }

    /// Stop the client's thread without telling the server.
    pub fn go_silent(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.go_silent();
    }
}

/// An RTP datagram (not RTCP, STUN or DTLS), by RFC 7983's first byte and RFC 5761's second.
fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..=191).contains(&d[0]) && !(192..=223).contains(&d[1])
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

const VIDEO_EVERY: Duration = Duration::from_millis(5);
const AUDIO_EVERY: Duration = Duration::from_millis(20);
const KEYFRAME_EVERY: Duration = Duration::from_secs(1);

/// The next send time of a stream sent every `every`, on a fixed schedule: a turn that comes late
/// (a debug build on a busy CI machine) does not push every later packet back, so the stream
/// keeps its rate. At most `CATCH_UP` intervals are made up, so a long stall (or a pause) is
/// followed by a burst of at most that many packets.
pub fn next_due(due: Instant, every: Duration, now: Instant) -> Instant {
    const CATCH_UP: u32 = 10;
    let floor = now.checked_sub(every * CATCH_UP).unwrap_or(now);
    (due + every).max(floor)
}

/// Hand everything `rtc` has to send to the socket and record its events; the next deadline,
/// or `None` once the connection is dead.
fn drain(rtc: &mut Rtc, socket: &UdpSocket, st: &ClientState, video_mid: Mid) -> Option<Instant> {
    loop {
        match rtc.poll_output() {
            Ok(Output::Timeout(t)) => return Some(t),
            Ok(Output::Transmit(t)) => {
                let _ = socket.send_to(&t.contents, t.destination);
            }
            Ok(Output::Event(e)) => match e {
                Event::Connected => st.connected.store(true, Ordering::Relaxed),
                Event::KeyframeRequest(_) => {
                    st.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                    st.force_keyframe.store(true, Ordering::Relaxed);
                }
                Event::RtpPacket(p) => {
                    let video = rtc
                        .direct_api()
                        .stream_rx(&p.header.ssrc)
                        .map(|s| s.mid() == video_mid)
                        .unwrap_or(false);
                    st.received.lock().unwrap().push(Received {
                        video,
                        seq: *p.seq_no,
                        timestamp: p.header.timestamp,
                        ssrc: *p.header.ssrc,
                        payload: p.payload.to_vec(),
                        at: Instant::now(),
                    });
                }
                _ => {}
            },
            Err(_) => return None,
        }
    }
}

fn run_client(
    mut rtc: Rtc,
    mut socket: UdpSocket,
    st: Arc<ClientState>,
    publish: bool,
    video_mid: Mid,
    audio_mid: Mid,
) {
    let mut local = socket.local_addr().unwrap();
    *st.local.lock().unwrap() = Some(local);
    let mut buf = vec![0u8; 2000];
    let start = Instant::now();
    let mut next_video = start;
    let mut next_audio = start;
    let mut last_keyframe = start - KEYFRAME_EVERY;
    let (mut vseq, mut aseq) = (1000u64, 5000u64);
    let (mut vcount, mut acount) = (0u32, 0u32);
    let mut rtp_in = 0u64;
    let vpt = rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Vp8)
        .map(|p| p.pt());
    let apt = rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Opus)
        .map(|p| p.pt());
    while !st.stop.load(Ordering::Relaxed) && rtc.is_alive() {
        if let Some((mine, theirs)) = st.restart.lock().unwrap().take() {
            let old = Candidate::host(local, "udp").unwrap();
            socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            local = socket.local_addr().unwrap();
            *st.local.lock().unwrap() = Some(local);
            rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
            let mut api = rtc.direct_api();
            api.invalidate_candidate(&old);
            api.set_local_ice_credentials(mine);
            api.set_remote_ice_credentials(theirs);
        }
        let Some(mut timeout) = drain(&mut rtc, &socket, &st, video_mid) else {
            return;
        };
        let now = Instant::now();
        // Publish whatever is due. Both kinds are checked on every turn, and the socket is read
        // on every turn: a turn slower than the video interval (a debug build on a busy CI
        // machine) must not starve the audio or the ICE and DTLS input. A late turn sends every
        // packet it is late by (`next_due`), so the streams keep their rates.
        let mut wrote = false;
        if publish && st.connected.load(Ordering::Relaxed) && !st.paused.load(Ordering::Relaxed) {
            while now >= next_video {
                next_video = next_due(next_video, VIDEO_EVERY, now);
                let key = st.force_keyframe.swap(false, Ordering::Relaxed)
                    || now >= last_keyframe + KEYFRAME_EVERY;
                if key {
                    last_keyframe = now;
                }
                if let (Some(pt), Some(tx)) =
                    (vpt, rtc.direct_api().stream_tx_by_mid(video_mid, None))
                {
                    let ts = (vcount as u64 * 3000) as u32;
                    tx.write_rtp(
                        RtpWrite::new(pt, vseq.into(), ts, now, vp8_payload(vcount, key))
                            .marker(true)
                            .nackable(true),
                    );
                    vseq += 1;
                    vcount += 1;
                    st.sent_video.fetch_add(1, Ordering::Relaxed);
                    wrote = true;
                }
            }
            while now >= next_audio {
                next_audio = next_due(next_audio, AUDIO_EVERY, now);
                if let (Some(pt), Some(tx)) =
                    (apt, rtc.direct_api().stream_tx_by_mid(audio_mid, None))
                {
                    let ts = acount.wrapping_mul(960);
                    tx.write_rtp(RtpWrite::new(
                        pt,
                        aseq.into(),
                        ts,
                        now,
                        audio_payload(acount),
                    ));
                    aseq += 1;
                    acount += 1;
                    st.sent_audio.fetch_add(1, Ordering::Relaxed);
                    wrote = true;
                }
            }
        }
        if wrote {
            // Send what was just written before waiting.
            match drain(&mut rtc, &socket, &st, video_mid) {
                Some(t) => timeout = t,
                None => return,
            }
        }
        // Wait for input or the next deadline.
        let mut wake = timeout.min(now + Duration::from_millis(20));
        if publish && st.connected.load(Ordering::Relaxed) {
            wake = wake.min(next_video).min(next_audio);
        }
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait)).unwrap();
        let input = match socket.recv_from(&mut buf) {
            Ok((n, _))
                if is_rtp(&buf[..n]) && {
                    rtp_in += 1;
                    let every = st.lose_rtp_every.load(Ordering::Relaxed);
                    every > 0 && rtp_in.is_multiple_of(every)
                } =>
            {
                st.lost_rtp.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok((n, source)) => match Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                Ok(r) => Input::Receive(Instant::now(), r),
                Err(_) => continue,
            },
            Err(_) => Input::Timeout(Instant::now()),
        };
        if rtc.handle_input(input).is_err() {
            return;
        }
    }
    let _ = KeyframeRequestKind::Pli;
}

/// Media socket port for shard `i` of a server.
pub fn shard_port(c: &Config, i: usize) -> u16 {
    c.media.port_base + i as u16
}

pub fn is_sorted_continuous(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[1] == w[0] + 1)
}

pub fn media_addrs(server: &Server) -> Vec<SocketAddr> {
    server.media_addrs()
}

pub fn io_backends() -> [IoBackend; 2] {
    [IoBackend::Uring, IoBackend::Mmsg]
}
