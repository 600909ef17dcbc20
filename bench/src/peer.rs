//! One simulated WebRTC client: a glommio task with its own UDP socket (its own 5-tuple) and a
//! str0m `Rtc` (RTP mode, real ICE, DTLS and SRTP). It joins through the public signaling API
//! (WHIP to publish, WHEP to play), then publishes synthetic media or receives and accounts for
//! it, until its shard stops; then it DELETEs its session.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use std::net::UdpSocket;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use crate::accounting::SeqTracker;
use crate::clock::mono_ns;
use crate::http::request_async;
use crate::media::{opus_payload, Pacer, VideoConfig, VideoSource, AUDIO_PPS, AUDIO_TS_STEP};
use crate::probe::{Probe, StreamId};
use crate::shard::{Shard, ShardEvent};
use crate::udp::{self, Readiness};

const SIGNALING_TIMEOUT: Duration = Duration::from_secs(10);
const DELETE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a peer sleeps without looking at its shard's stop flag.
const MAX_WAIT: Duration = Duration::from_millis(100);
const RECV_BUFFER_BYTES: i32 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Publisher,
    Subscriber,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub role: Role,
    /// Publisher index, or subscriber index.
    pub id: u32,
    /// The publisher this peer is (or plays).
    pub publisher: u32,
    pub stream: String,
}

/// Run one peer to the end. Never panics on network or peer errors: they become events.
pub async fn run(shard: Rc<Shard>, spec: PeerSpec) {
    shard.live.set(shard.live.get() + 1);
    let permit = shard.joins.acquire_static_permit(1).await.ok();
    let posted = Instant::now();
    let peer = match connect(&shard, &spec).await {
        Ok(p) => Some(p),
        Err(reason) => {
            shard.emit(ShardEvent::JoinFailed {
                role: spec.role,
                id: spec.id,
                reason,
            });
            None
        }
    };
    if let Some(mut peer) = peer {
        peer.permit = permit;
        let location = peer.location.clone();
        let result = peer.drive(&shard, &spec, posted).await;
        // A peer that never joined may already be gone from the SFU (its connect timeout).
        let gone_ok = !peer.joined;
        if let Err(reason) = result {
            let e = if peer.joined {
                ShardEvent::Lost {
                    role: spec.role,
                    reason,
                }
            } else {
                ShardEvent::JoinFailed {
                    role: spec.role,
                    id: spec.id,
                    reason,
                }
            };
            shard.emit(e);
        }
        drop(peer);
        delete(&shard, &location, gone_ok).await;
    }
    shard.live.set(shard.live.get() - 1);
}

async fn delete(shard: &Shard, location: &str, gone_ok: bool) {
    let _permit = shard.joins.acquire_static_permit(1).await.ok();
    let path = shard.target.path(location);
    let r = glommio::timer::timeout(DELETE_TIMEOUT, async {
        Ok(request_async(&shard.target, "DELETE", &path, None, b"").await)
    })
    .await;
    let reason = match r {
        Ok(Ok(resp)) if resp.status == 200 || resp.status == 204 => return,
        Ok(Ok(resp)) if resp.status == 404 && gone_ok => return,
        Ok(Ok(resp)) => format!("DELETE: HTTP {}", resp.status),
        Ok(Err(e)) => format!("DELETE: {}", short(&e)),
        Err(_) => format!("DELETE: no answer within {DELETE_TIMEOUT:?}"),
    };
    shard.emit(ShardEvent::Failure { reason });
}

/// A failure reason without the numbers that differ from peer to peer, so reasons group.
pub(crate) fn short(e: &str) -> String {
    let first = e.lines().next().unwrap_or("").trim();
    first.chars().take(160).collect()
}

pub(crate) struct Peer {
    rtc: Rtc,
    /// Sends go straight to the kernel on this (non-blocking, connected) socket.
    socket: UdpSocket,
    /// Waits for the socket on glommio's ring; `waiting` is the wait in progress, if any.
    ready: Readiness,
    waiting: Option<udp::ReadyWait>,
    local: SocketAddr,
    /// The SFU's media address (the one candidate we keep from its answer).
    remote: SocketAddr,
    location: String,
    video: Option<(Mid, Pt)>,
    audio: Option<(Mid, Pt)>,
    permit: Option<glommio::sync::StaticPermit>,
    connected: bool,
    ice: IceConnectionState,
    joined: bool,
    join_bucket: u32,
    /// When the datagram being handled reached the socket (kernel timestamp), and when the
    /// peer read it (CLOCK_MONOTONIC ns).
    arrived_ns: u64,
    read_ns: u64,
    trackers: [SeqTracker; 2],
    // Publisher state.
    next_audio: Instant,
    /// Video: one source, or one per simulcast layer (low to high).
    layers: Vec<VideoLayer>,
    audio_probe_seq: u32,
    audio_rtp_seq: u64,
    audio_ts: u32,
    /// Subscriber, simulcast: the layer its video last came from.
    layer: Option<u8>,
}

/// The rids of `--simulcast` publishers, low to high, and each layer's share of
/// `--video-bitrate` (the top layer's rate), as browsers' usual quarter, half and full size.
pub const SIMULCAST_RIDS: [&str; 3] = ["l", "m", "h"];
pub const SIMULCAST_SHARE: [f64; 3] = [0.1, 1.0 / 3.0, 1.0];

/// How far behind its schedule the video pacer may fall and still catch up.
const PACER_MAX_DEBT: Duration = Duration::from_millis(50);

/// One video stream a publisher sends: the only one, or a simulcast layer.
struct VideoLayer {
    rid: Option<Rid>,
    source: VideoSource,
    next: Instant,
    keyframe_requested: bool,
    /// Packets of the frames made so far not yet written: (payload, RTP time, marker).
    pending: std::collections::VecDeque<(Vec<u8>, u32, bool)>,
    /// Spaces the pending packets out.
    pacer: Pacer,
    probe_seq: u32,
    rtp_seq: u64,
}

/// A peer's SDP offer, made and not answered yet: its socket and `Rtc`, and what finishing needs.
/// WHIP/WHEP POST the offer ([`connect`]); a `/ws` room participant sends it as an `offer`
/// message (`crate::meeting`).
pub(crate) struct Offered {
    socket: UdpSocket,
    local: SocketAddr,
    rtc: Rtc,
    pending: SdpPendingOffer,
    video_mid: Option<Mid>,
    audio_mid: Option<Mid>,
    /// The offer's SDP.
    pub sdp: String,
}

impl Offered {
    /// The m-lines offered: video, audio (when the plan has them).
    pub(crate) fn mids(&self) -> (Option<Mid>, Option<Mid>) {
        (self.video_mid, self.audio_mid)
    }
}

async fn connect(shard: &Shard, spec: &PeerSpec) -> Result<Peer, String> {
    let offered = offer(shard, spec)?;
    let kind = match spec.role {
        Role::Publisher => "whip",
        Role::Subscriber => "whep",
    };
    let path = shard.target.path(&format!("/{kind}/{}", spec.stream));
    let resp = glommio::timer::timeout(SIGNALING_TIMEOUT, async {
        Ok(request_async(
            &shard.target,
            "POST",
            &path,
            Some("application/sdp"),
            offered.sdp.as_bytes(),
        )
        .await)
    })
    .await
    .map_err(|_| format!("POST /{kind}: no answer within {SIGNALING_TIMEOUT:?}"))?
    .map_err(|e| short(&e))?;
    if resp.status != 201 {
        return Err(format!(
            "POST /{kind}: HTTP {} {}",
            resp.status,
            short(&resp.text())
        ));
    }
    let location = resp
        .header("location")
        .ok_or_else(|| format!("POST /{kind}: 201 without a Location"))?
        .to_string();
    offered.accept(
        shard,
        spec,
        &resp.text(),
        location,
        &format!("POST /{kind}"),
    )
}

/// A client's own non-blocking UDP socket on loopback (kernel receive timestamps on) and its
/// `Rtc`: RTP mode, the shard's DTLS certificate, the plan's codecs, the socket as candidate.
pub(crate) fn client_socket(shard: &Shard) -> Result<(UdpSocket, SocketAddr, Rtc), String> {
    let socket =
        UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("UDP socket: {e}"))?;
    udp::set_recv_buffer(&socket, RECV_BUFFER_BYTES);
    udp::enable_timestamps(&socket).map_err(|e| format!("SO_TIMESTAMPNS: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let mut cfg = RtcConfig::new()
        .set_rtp_mode(true)
        .clear_codecs()
        .set_dtls_cert(shard.cert.clone());
    if shard.plan.video.is_some() {
        cfg = cfg.enable_vp8(true);
    }
    if shard.plan.audio_bytes.is_some() {
        cfg = cfg.enable_opus(true, false);
    }
    let mut rtc = cfg.build(Instant::now());
    let candidate = Candidate::host(local, "udp").map_err(|e| e.to_string())?;
    rtc.add_local_candidate(candidate);
    Ok((socket, local, rtc))
}

/// Make a peer's socket and `Rtc`, and its offer: sendonly (publisher) or recvonly
/// (subscriber) video and audio as the plan says.
pub(crate) fn offer(shard: &Shard, spec: &PeerSpec) -> Result<Offered, String> {
    let (socket, local, mut rtc) = client_socket(shard)?;
    let dir = match spec.role {
        Role::Publisher => Direction::SendOnly,
        Role::Subscriber => Direction::RecvOnly,
    };
    let mut api = rtc.sdp_api();
    let simulcast = (shard.plan.simulcast && spec.role == Role::Publisher).then(|| Simulcast {
        send: SIMULCAST_RIDS
            .iter()
            .map(|r| SimulcastLayer::new(r))
            .collect(),
        recv: Vec::new(),
    });
    let video_mid = shard
        .plan
        .video
        .map(|_| api.add_media(MediaKind::Video, dir, None, None, simulcast));
    let audio_mid = shard
        .plan
        .audio_bytes
        .map(|_| api.add_media(MediaKind::Audio, dir, None, None, None));
    let (offer, pending) = api.apply().ok_or("str0m made no offer")?;
    Ok(Offered {
        socket,
        local,
        rtc,
        pending,
        video_mid,
        audio_mid,
        sdp: offer.to_sdp_string(),
    })
}

impl Offered {
    /// Apply the answer (`what` names the exchange in errors, e.g. "POST /whip") and make the
    /// peer. `location` is what its DELETE goes to ("" for none).
    pub(crate) fn accept(
        self,
        shard: &Shard,
        spec: &PeerSpec,
        answer: &str,
        location: String,
        what: &str,
    ) -> Result<Peer, String> {
        let Offered {
            socket,
            local,
            mut rtc,
            pending,
            video_mid,
            audio_mid,
            sdp: _,
        } = self;
        let (answer, remote) = keep_one_candidate(answer)
            .ok_or_else(|| format!("{what}: the answer has no UDP candidate"))?;
        socket
            .connect(remote)
            .map_err(|e| format!("UDP connect to {remote}: {e}"))?;
        let ready = Readiness::for_socket(&socket, shard.poller.as_ref())
            .map_err(|e| format!("UDP socket: {e}"))?;
        let answer = SdpAnswer::from_sdp_string(&answer)
            .map_err(|e| format!("{what}: bad SDP answer: {e}"))?;
        rtc.sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| format!("{what}: answer not accepted: {e}"))?;
        let pt = |rtc: &Rtc, codec: Codec| {
            rtc.codec_config()
                .find(|p| p.spec().codec == codec)
                .map(|p| p.pt())
        };
        let video = match (video_mid, pt(&rtc, Codec::Vp8)) {
            (Some(m), Some(p)) => Some((m, p)),
            _ => None,
        };
        let audio = match (audio_mid, pt(&rtc, Codec::Opus)) {
            (Some(m), Some(p)) => Some((m, p)),
            _ => None,
        };
        let now = Instant::now();
        // Spread publishers' frame times so they do not all send in the same instant.
        let phase = Duration::from_micros(u64::from(spec.id.wrapping_mul(7919)) % 33_000);
        Ok(Peer {
            rtc,
            socket,
            ready,
            waiting: None,
            local,
            remote,
            location,
            video,
            audio,
            permit: None,
            connected: false,
            ice: IceConnectionState::New,
            joined: false,
            join_bucket: u32::MAX,
            arrived_ns: 0,
            read_ns: 0,
            trackers: [SeqTracker::default(), SeqTracker::default()],
            next_audio: now + phase / 2,
            layers: video_layers(shard, spec, now + phase),
            audio_probe_seq: 0,
            audio_rtp_seq: 3000 + u64::from(spec.id) * 13,
            audio_ts: spec.id.wrapping_mul(48_000),
            layer: None,
        })
    }
}

/// A publisher's video streams: one, or the simulcast layers (each at its share of the bitrate,
/// its own sequence numbers, frames at the same instants).
fn video_layers(shard: &Shard, spec: &PeerSpec, first: Instant) -> Vec<VideoLayer> {
    let Some(cfg) = shard.plan.video.filter(|_| spec.role == Role::Publisher) else {
        return Vec::new();
    };
    let layer = |rid: Option<Rid>, bitrate_bps: u64, n: u64| VideoLayer {
        rid,
        source: VideoSource::new(VideoConfig { bitrate_bps, ..cfg }),
        next: first,
        keyframe_requested: false,
        pending: Default::default(),
        pacer: Pacer::new(first, PACER_MAX_DEBT),
        probe_seq: 0,
        rtp_seq: 1000 + u64::from(spec.id) * 7 + n * 20_000,
    };
    if !shard.plan.simulcast {
        return vec![layer(None, cfg.bitrate_bps, 0)];
    }
    SIMULCAST_RIDS
        .iter()
        .zip(SIMULCAST_SHARE)
        .enumerate()
        .map(|(i, (rid, share))| {
            let bps = (cfg.bitrate_bps as f64 * share) as u64;
            layer(Some((*rid).into()), bps, i as u64)
        })
        .collect()
}

/// The answer with only one of its UDP candidates (a loopback one when there is one), and that
/// candidate's address. The peer's socket is connected to it, so the kernel hands this socket
/// only the SFU's datagrams and every received datagram comes from `remote`.
pub(crate) fn keep_one_candidate(answer: &str) -> Option<(String, SocketAddr)> {
    let udp = |l: &str| -> Option<SocketAddr> {
        // a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
        let f: Vec<&str> = l.strip_prefix("a=candidate:")?.split_whitespace().collect();
        if !f.get(2)?.eq_ignore_ascii_case("udp") {
            return None;
        }
        format!("{}:{}", f.get(4)?, f.get(5)?)
            .parse()
            .ok()
            .or_else(|| format!("[{}]:{}", f[4], f[5]).parse().ok())
    };
    let all: Vec<SocketAddr> = answer.lines().filter_map(|l| udp(l.trim_end())).collect();
    let remote = all
        .iter()
        .find(|a| a.ip().is_loopback())
        .or(all.first())
        .copied()?;
    let kept: Vec<&str> = answer
        .lines()
        .filter(|l| !l.starts_with("a=candidate:") || udp(l.trim_end()) == Some(remote))
        .collect();
    Some((kept.join("\r\n") + "\r\n", remote))
}

impl Peer {
    async fn drive(
        &mut self,
        shard: &Shard,
        spec: &PeerSpec,
        posted: Instant,
    ) -> Result<(), String> {
        let publisher = spec.role == Role::Publisher;
        loop {
            let deadline = self.drain(shard, spec, posted)?;
            if shard.stopping.get() {
                return Ok(());
            }
            let now = Instant::now();
            if !self.joined && now > posted + shard.join_timeout {
                let what = match (publisher, self.connected) {
                    (_, false) => format!("ICE+DTLS not connected (ICE {:?})", self.ice),
                    (true, true) => "not connected".to_string(),
                    (false, true) => "connected but no media".to_string(),
                };
                return Err(format!("{what} within {:?}", shard.join_timeout));
            }
            if publisher && self.connected && self.send_due(shard, spec, now) {
                continue;
            }
            let mut wake = deadline.min(now + MAX_WAIT);
            if publisher && self.connected {
                wake = wake.min(self.next_media(now));
            }
            if wake <= now {
                self.input(Input::Timeout(now))?;
                continue;
            }
            let wait = (wake - now).max(Duration::from_micros(50));
            let waiting = self.waiting.get_or_insert_with(|| self.ready.wait());
            let ready = async { Some(waiting.as_mut().await) };
            let timer = async {
                glommio::timer::sleep(wait).await;
                None
            };
            let woke = futures_lite::future::or(ready, timer).await;
            if woke.is_some() {
                self.waiting = None;
            }
            match woke {
                None => self.input(Input::Timeout(Instant::now()))?,
                Some(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err("the SFU's media port is closed (ICMP port unreachable)".into());
                }
                Some(Err(e)) => return Err(format!("UDP receive: {e}")),
                Some(Ok(())) => self.receive_all(shard, spec, posted)?,
            }
        }
    }

    /// Publisher: when its next media is due (the next frame, or the pacer's next slot while
    /// packets are pending; `now + MAX_WAIT` when it sends nothing).
    pub(crate) fn next_media(&self, now: Instant) -> Instant {
        let mut wake = now + MAX_WAIT;
        if self.video.is_some() {
            for l in &self.layers {
                wake = wake.min(if l.pending.is_empty() {
                    l.next
                } else {
                    l.next.min(l.pacer.next_send().max(now))
                });
            }
        }
        if self.audio.is_some() {
            wake = wake.min(self.next_audio);
        }
        wake
    }

    /// The wait for a datagram on this peer's socket, kept across loop turns until it resolves
    /// (then call [`Peer::ready_done`]).
    pub(crate) fn ready_wait(&mut self) -> &mut udp::ReadyWait {
        self.waiting.get_or_insert_with(|| self.ready.wait())
    }

    pub(crate) fn ready_done(&mut self) {
        self.waiting = None;
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    pub(crate) fn is_joined(&self) -> bool {
        self.joined
    }

    /// Held until DTLS connects (bounds the joins in progress per shard).
    pub(crate) fn set_permit(&mut self, permit: Option<glommio::sync::StaticPermit>) {
        self.permit = permit;
    }

    /// Feed str0m everything queued on the socket, a batch per syscall, draining its output
    /// after each datagram (so each RTP packet is matched with its own arrival time).
    pub(crate) fn receive_all(
        &mut self,
        shard: &Shard,
        spec: &PeerSpec,
        posted: Instant,
    ) -> Result<(), String> {
        loop {
            let mut batch = shard.rx.borrow_mut();
            let n = match batch.recv(&self.socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err("the SFU's media port is closed (ICMP port unreachable)".into());
                }
                Err(e) => return Err(format!("UDP receive: {e}")),
            };
            // Kernel stamps are CLOCK_REALTIME: turn each into the monotonic clock of the
            // probes through its age now.
            let (mono, real) = (mono_ns(), udp::realtime_ns());
            for i in 0..n {
                let (data, stamp) = batch.get(i);
                self.read_ns = mono;
                self.arrived_ns =
                    stamp.map_or(mono, |t| mono.saturating_sub(real.saturating_sub(t)));
                if let Ok(r) = Receive::new(Protocol::Udp, self.remote, self.local, data) {
                    self.rtc
                        .handle_input(Input::Receive(Instant::now(), r))
                        .map_err(|e| format!("str0m: {e}"))?;
                    self.drain(shard, spec, posted)?;
                }
            }
            if n < udp::BATCH {
                return Ok(());
            }
        }
    }

    pub(crate) fn input(&mut self, input: Input<'_>) -> Result<(), String> {
        self.rtc
            .handle_input(input)
            .map_err(|e| format!("str0m: {e}"))
    }

    /// Send what str0m has to send and act on its events, until it names its next deadline.
    pub(crate) fn drain(
        &mut self,
        shard: &Shard,
        spec: &PeerSpec,
        posted: Instant,
    ) -> Result<Instant, String> {
        loop {
            let out = self.rtc.poll_output().map_err(|e| format!("str0m: {e}"))?;
            match out {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    // A refused send (buffer full) is like loss on the wire: str0m recovers or
                    // the receiver counts it.
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Output::Event(e) => match e {
                    Event::Connected => {
                        self.connected = true;
                        self.permit = None;
                        if spec.role == Role::Publisher {
                            self.join(shard, spec, posted);
                        }
                    }
                    Event::IceConnectionStateChange(state) => {
                        self.ice = state;
                        if state == IceConnectionState::Disconnected && self.joined {
                            return Err("ICE disconnected".into());
                        }
                    }
                    Event::KeyframeRequest(r) => {
                        for l in self.layers.iter_mut().filter(|l| l.rid == r.rid) {
                            l.keyframe_requested = true;
                        }
                    }
                    Event::RtpPacket(p) => self.on_rtp(shard, spec, posted, &p.payload),
                    _ => {}
                },
            }
        }
    }

    fn join(&mut self, shard: &Shard, spec: &PeerSpec, posted: Instant) {
        if self.joined {
            return;
        }
        self.joined = true;
        self.join_bucket = shard.bucket(mono_ns());
        shard.emit(ShardEvent::Joined {
            role: spec.role,
            id: spec.id,
            join_ms: posted.elapsed().as_secs_f64() * 1000.0,
            bucket: self.join_bucket,
        });
    }

    fn on_rtp(&mut self, shard: &Shard, spec: &PeerSpec, posted: Instant, payload: &[u8]) {
        let Some(probe) = Probe::parse(payload) else {
            shard.emit(ShardEvent::Failure {
                reason: "received a packet without a probe (corrupted payload?)".into(),
            });
            return;
        };
        if probe.stream.publisher() != spec.publisher {
            shard.emit(ShardEvent::Failure {
                reason: "received another publisher's packet (misrouted)".into(),
            });
            return;
        }
        let video = probe.stream.is_video();
        // Simulcast video: sequences are per layer, and which layer arrives is the SFU's
        // choice, so its packets give latency and the layer, not loss (audio gives loss).
        let layered = video && shard.plan.simulcast;
        if layered && self.layer != Some(probe.stream.layer()) {
            self.trackers[1] = SeqTracker::default();
            self.layer = Some(probe.stream.layer());
            shard.emit(ShardEvent::Layer {
                id: spec.id,
                layer: probe.stream.layer(),
            });
        }
        let arrival = self.trackers[video as usize].on_packet(probe.seq);
        if !self.joined && (video || shard.plan.video.is_none()) {
            self.join(shard, spec, posted);
        }
        let bucket = shard.bucket(probe.sent_ns);
        if self.joined && bucket > self.join_bucket {
            let latency_us = self.arrived_ns.saturating_sub(probe.sent_ns) / 1000;
            let read_us = self.read_ns.saturating_sub(probe.sent_ns) / 1000;
            shard
                .stats
                .borrow_mut()
                .count_received(bucket, arrival, latency_us, read_us, !layered);
        }
    }

    /// Publisher: write the media that is due. Returns whether anything was written (the
    /// caller drains str0m before waiting).
    pub(crate) fn send_due(&mut self, shard: &Shard, spec: &PeerSpec, now: Instant) -> bool {
        if let Some((mid, pt)) = self.video {
            for l in &mut self.layers {
                // Frames come on the encoder's schedule and queue behind the pacer.
                if now >= l.next {
                    let interval = l.source.frame_interval();
                    let frame = l
                        .source
                        .next_frame(std::mem::take(&mut l.keyframe_requested));
                    let count = frame.payloads.len();
                    if l.pending.is_empty() {
                        l.pacer.queue_started(now);
                    }
                    l.pending.extend(
                        frame
                            .payloads
                            .into_iter()
                            .enumerate()
                            .map(|(i, p)| (p, frame.rtp_time, i + 1 == count)),
                    );
                    l.next += interval;
                    if l.next + interval < now {
                        // More than a frame behind: the shard is overloaded. Skip, as an
                        // encoder would.
                        shard.stats.borrow_mut().late_frames += 1;
                        l.next = now + interval;
                    }
                }
            }
            // One packet per call, so its send time is stamped just before str0m encrypts and
            // sends it (not a whole keyframe burst earlier).
            let simulcast = self.layers.len() > 1;
            for (index, l) in self.layers.iter_mut().enumerate() {
                if now < l.pacer.next_send() {
                    continue;
                }
                let Some((mut payload, rtp_time, marker)) = l.pending.pop_front() else {
                    continue;
                };
                if l.pacer.sent(now, l.source.pacing_gap(payload.len())) {
                    // More than PACER_MAX_DEBT behind: this loadgen core is overloaded.
                    shard.stats.borrow_mut().late_frames += 1;
                }
                let sent_ns = mono_ns();
                Probe {
                    stream: StreamId::new(spec.publisher, true).with_layer(index as u8),
                    seq: l.probe_seq,
                    sent_ns,
                }
                .write_into(&mut payload);
                l.probe_seq += 1;
                let mut api = self.rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(mid, l.rid) else {
                    return false;
                };
                tx.write_rtp(
                    RtpWrite::new(pt, l.rtp_seq.into(), rtp_time, now, payload)
                        .marker(marker)
                        .nackable(true),
                );
                l.rtp_seq += 1;
                if !simulcast {
                    shard
                        .stats
                        .borrow_mut()
                        .count_sent(spec.publisher, shard.bucket(sent_ns));
                }
                return true;
            }
        }
        if let (Some((mid, pt)), true) = (self.audio, now >= self.next_audio) {
            let interval = Duration::from_micros(1_000_000 / AUDIO_PPS);
            let mut payload = opus_payload(shard.plan.audio_bytes.unwrap_or(80));
            let sent_ns = mono_ns();
            Probe {
                stream: StreamId::new(spec.publisher, false),
                seq: self.audio_probe_seq,
                sent_ns,
            }
            .write_into(&mut payload);
            self.audio_probe_seq += 1;
            let mut api = self.rtc.direct_api();
            let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                return false;
            };
            tx.write_rtp(RtpWrite::new(
                pt,
                self.audio_rtp_seq.into(),
                self.audio_ts,
                now,
                payload,
            ));
            self.audio_rtp_seq += 1;
            self.audio_ts = self.audio_ts.wrapping_add(AUDIO_TS_STEP);
            shard
                .stats
                .borrow_mut()
                .count_sent(spec.publisher, shard.bucket(sent_ns));
            self.next_audio += interval;
            if self.next_audio + interval < now {
                shard.stats.borrow_mut().late_frames += 1;
                self.next_audio = now + interval;
            }
            return true;
        }
        false
    }
}
