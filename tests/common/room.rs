//! A `/ws` room client for tests: a blocking WebSocket plus two str0m peers (publish: client
//! offers audio and VP8 video; subscribe: answers the server's offers, with the data channel),
//! all driven by one thread. What it saw is in [`RoomState`].

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use super::{audio_payload, next_due, payload_counter, vp8_payload};

#[derive(Default)]
pub struct RoomState {
    /// Every server message, in order.
    pub messages: Mutex<Vec<Value>>,
    /// RTP packets received on the subscribe connection, per (publisher participant, is video).
    pub media: Mutex<HashMap<(String, bool), u64>>,
    /// Data-channel frames received (sender tag, payload).
    pub data: Mutex<Vec<(String, String)>>,
    pub me: Mutex<Option<String>>,
    /// Our published track ids (audio, video) once answered.
    pub tracks: Mutex<Vec<String>>,
    pub channel_open: AtomicBool,
    pub publish_connected: AtomicBool,
    pub subscribe_connected: AtomicBool,
    /// The socket was closed by the server: (code, reason).
    pub closed: Mutex<Option<(u16, String)>>,
    outbox: Mutex<Vec<Value>>,
    data_out: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Send audio at this RFC 6464 level (-dBov); 127 is silence.
    pub level: Mutex<u8>,
    /// Publish video as three simulcast layers (rids q, h, f: 1, 2 and 4 packets per frame);
    /// each packet's counter carries its layer in bits 28-29.
    pub simulcast: AtomicBool,
    /// Video packets received per publisher participant, by the sender's simulcast layer.
    pub video_layers: Mutex<HashMap<String, [u64; 3]>>,
}

/// The simulcast layers a [`RoomClient`] publishes: rid and packets per frame.
pub const ROOM_LAYERS: [(&str, u32); 3] = [("q", 1), ("h", 2), ("f", 4)];

impl RoomState {
    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == kind)
            .cloned()
            .collect()
    }

    pub fn received(&self, participant: &str, video: bool) -> u64 {
        *self
            .media
            .lock()
            .unwrap()
            .get(&(participant.to_owned(), video))
            .unwrap_or(&0)
    }
}

pub struct RoomClient {
    pub state: Arc<RoomState>,
    thread: Option<JoinHandle<()>>,
}

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// Open `/ws` (with `?token=` if given). Errors: the HTTP refusal as `status: body`.
pub fn open_ws(addr: SocketAddr, token: Option<&str>) -> Result<Ws, String> {
    let url = match token {
        Some(t) => format!("ws://{addr}/ws?token={t}"),
        None => format!("ws://{addr}/ws"),
    };
    match tungstenite::connect(url) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(r)) => Err(format!(
            "{}: {}",
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Read server messages until one satisfies `f` or the socket closes; returns the JSON
/// messages read and the close frame, if any.
pub fn read_until(
    ws: &mut Ws,
    timeout: Duration,
    mut f: impl FnMut(&Value) -> bool,
) -> (Vec<Value>, Option<(u16, String)>) {
    set_timeout(ws, Some(Duration::from_millis(50)));
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < end {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let done = f(&v);
                seen.push(v);
                if done {
                    return (seen, None);
                }
            }
            Ok(Message::Close(frame)) => {
                let c = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                return (seen, c.or(Some((1005, String::new()))));
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (seen, Some((1006, String::new()))),
        }
    }
    (seen, None)
}

fn set_timeout(ws: &mut Ws, t: Option<Duration>) {
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(t).unwrap();
    }
}

pub fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).unwrap();
}

impl RoomClient {
    /// Join `room` as `identity` and publish audio and video (unless `publish` is false).
    pub fn join(addr: SocketAddr, room: &str, identity: &str, publish: bool) -> RoomClient {
        RoomClient::join_with(addr, room, identity, publish, None)
    }

    /// Join and publish audio and three simulcast layers of video.
    pub fn join_simulcast(addr: SocketAddr, room: &str, identity: &str) -> RoomClient {
        RoomClient::start(addr, room, identity, true, None, true)
    }

    pub fn join_with(
        addr: SocketAddr,
        room: &str,
        identity: &str,
        publish: bool,
        token: Option<&str>,
    ) -> RoomClient {
        RoomClient::start(addr, room, identity, publish, token, false)
    }

    fn start(
        addr: SocketAddr,
        room: &str,
        identity: &str,
        publish: bool,
        token: Option<&str>,
        simulcast: bool,
    ) -> RoomClient {
        let mut ws = open_ws(addr, token).expect("ws opens");
        send(
            &mut ws,
            json!({"v":1,"type":"join","room":room,"identity":identity,"name":identity}),
        );
        let state = Arc::new(RoomState {
            level: Mutex::new(127),
            simulcast: AtomicBool::new(simulcast),
            ..Default::default()
        });
        let st = state.clone();
        let thread = std::thread::spawn(move || drive(ws, st, publish));
        RoomClient {
            state,
            thread: Some(thread),
        }
    }

    pub fn send(&self, v: Value) {
        self.state.outbox.lock().unwrap().push(v);
    }

    pub fn send_data(&self, text: &str) {
        self.state.data_out.lock().unwrap().push(text.to_owned());
    }

    pub fn me(&self) -> String {
        self.state.me.lock().unwrap().clone().unwrap_or_default()
    }

    /// Stop the client thread (its socket closes: the server sees a disconnect).
    pub fn stop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RoomClient {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client_rtc(socket: &UdpSocket) -> Rtc {
    let mut rtc = RtcConfig::new()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_vp8(true)
        .enable_opus(true, false)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(socket.local_addr().unwrap(), "udp").unwrap());
    rtc
}

struct Side {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
}

impl Side {
    fn new() -> Side {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let local = socket.local_addr().unwrap();
        Side {
            rtc: client_rtc(&socket),
            socket,
            local,
        }
    }

    /// Feed what arrived, draining after each input (str0m holds one received RTP packet for
    /// `poll_output` at a time: a second input before the poll replaces it). Returns events.
    fn pump(&mut self, buf: &mut [u8]) -> Vec<Event> {
        let mut events = Vec::new();
        while let Ok((n, src)) = self.socket.recv_from(buf) {
            if let Ok(r) = Receive::new(Protocol::Udp, src, self.local, &buf[..n]) {
                let _ = self.rtc.handle_input(Input::Receive(Instant::now(), r));
                self.drain(&mut events);
            }
        }
        let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
        self.drain(&mut events);
        events
    }

    fn drain(&mut self, events: &mut Vec<Event>) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(_)) | Err(_) => break,
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => events.push(e),
            }
        }
    }
}

fn drive(mut ws: Ws, st: Arc<RoomState>, publish: bool) {
    set_timeout(&mut ws, Some(Duration::from_millis(2)));
    let mut publisher = Side::new();
    let mut subscriber = Side::new();
    let mut pending: Option<SdpPendingOffer> = None;
    let mut mids: HashMap<Mid, (String, bool)> = HashMap::new();
    let mut channel: Option<ChannelId> = None;
    let mut media_mids: Option<(Mid, Mid)> = None;
    let mut buf = vec![0u8; 2000];
    let start = Instant::now();
    let (mut next_video, mut next_audio) = (start, start);
    let mut last_key = start - Duration::from_secs(5);
    let (mut vseq, mut aseq, mut vcount, mut acount) = (100u64, 900u64, 0u32, 0u32);
    let mut layer_seqs = [1_000u64, 20_000, 40_000];
    let vpt = publisher
        .rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Vp8)
        .map(|p| p.pt());
    let apt = publisher
        .rtc
        .codec_config()
        .find(|p| p.spec().codec == Codec::Opus)
        .map(|p| p.pt());
    let mut force_key = false;
    while !st.stop.load(Ordering::Relaxed) {
        // Socket.
        match ws.read() {
            Ok(Message::Text(t)) => {
                let m: Value = serde_json::from_str(&t).unwrap();
                // Recorded first, so a test that sees state derived from a message (`me`,
                // `tracks`) also finds the message itself.
                st.messages.lock().unwrap().push(m.clone());
                match m["type"].as_str().unwrap_or_default() {
                    "joined" => {
                        *st.me.lock().unwrap() = m["participant"]["id"].as_str().map(Into::into);
                        if publish {
                            let mut api = publisher.rtc.sdp_api();
                            let audio = api.add_media(
                                MediaKind::Audio,
                                Direction::SendOnly,
                                None,
                                None,
                                None,
                            );
                            let simulcast =
                                st.simulcast.load(Ordering::Relaxed).then(|| Simulcast {
                                    send: ROOM_LAYERS
                                        .iter()
                                        .map(|(rid, _)| SimulcastLayer::new(rid))
                                        .collect(),
                                    recv: vec![],
                                });
                            let video = api.add_media(
                                MediaKind::Video,
                                Direction::SendOnly,
                                None,
                                None,
                                simulcast.clone(),
                            );
                            let (offer, p) = api.apply().unwrap();
                            pending = Some(p);
                            media_mids = Some((audio, video));
                            let mut camera = json!({"mid": video.to_string(), "source": "camera"});
                            if simulcast.is_some() {
                                camera["simulcast"] = ROOM_LAYERS
                                    .iter()
                                    .map(|(rid, _)| json!({"rid": rid}))
                                    .collect();
                            }
                            let tracks = json!([
                                {"mid": audio.to_string(), "source": "mic"},
                                camera
                            ]);
                            let o =
                                json!({"type":"offer","sdp":offer.to_sdp_string(),"tracks":tracks});
                            send(&mut ws, o);
                        }
                    }
                    "answer" => {
                        let answer = SdpAnswer::from_sdp_string(m["sdp"].as_str().unwrap())
                            .expect("answer parses");
                        if let Some(p) = pending.take() {
                            publisher.rtc.sdp_api().accept_answer(p, answer).unwrap();
                        }
                        let ids: Vec<String> = m["tracks"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|t| t["track"].as_str().unwrap().to_owned())
                            .collect();
                        *st.tracks.lock().unwrap() = ids;
                    }
                    "offer" => {
                        let offer = SdpOffer::from_sdp_string(m["sdp"].as_str().unwrap())
                            .expect("offer parses");
                        let answer = subscriber.rtc.sdp_api().accept_offer(offer).unwrap();
                        for t in m["tracks"].as_array().unwrap() {
                            let mid = Mid::from(t["mid"].as_str().unwrap());
                            let video = t["track"]
                                .as_str()
                                .unwrap()
                                .trim_start_matches('t')
                                .parse::<u64>()
                                .unwrap()
                                & 1
                                == 1;
                            mids.insert(mid, (t["participant"].as_str().unwrap().into(), video));
                        }
                        let seq = m["seq"].clone();
                        send(
                            &mut ws,
                            json!({"type":"answer","sdp":answer.to_sdp_string(),"seq":seq}),
                        );
                    }
                    _ => {}
                }
            }
            Ok(Message::Close(frame)) => {
                let c = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                *st.closed.lock().unwrap() = c.or(Some((1005, String::new())));
                break;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                *st.closed.lock().unwrap() = Some((1006, String::new()));
                break;
            }
        }
        for v in st.outbox.lock().unwrap().drain(..) {
            send(&mut ws, v);
        }
        // Peers.
        for e in publisher.pump(&mut buf) {
            match e {
                Event::Connected => st.publish_connected.store(true, Ordering::Relaxed),
                Event::KeyframeRequest(_) => force_key = true,
                _ => {}
            }
        }
        for e in subscriber.pump(&mut buf) {
            match e {
                Event::Connected => st.subscribe_connected.store(true, Ordering::Relaxed),
                Event::ChannelOpen(id, _) => {
                    channel = Some(id);
                    st.channel_open.store(true, Ordering::Relaxed);
                }
                Event::ChannelData(d) => {
                    let text = String::from_utf8_lossy(&d.data).to_string();
                    let (from, payload) = text.split_once('\n').unwrap_or(("", &text));
                    st.data
                        .lock()
                        .unwrap()
                        .push((from.to_owned(), payload.to_owned()));
                }
                Event::RtpPacket(p) => {
                    let mid = subscriber
                        .rtc
                        .direct_api()
                        .stream_rx(&p.header.ssrc)
                        .map(|s| s.mid());
                    if let Some(key) = mid.and_then(|m| mids.get(&m)) {
                        *st.media.lock().unwrap().entry(key.clone()).or_default() += 1;
                        if key.1 {
                            if let Some(c) = payload_counter(true, &p.payload) {
                                let layer = ((c >> 28) & 3).min(2) as usize;
                                st.video_layers
                                    .lock()
                                    .unwrap()
                                    .entry(key.0.clone())
                                    .or_default()[layer] += 1;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(id) = channel {
            let out: Vec<String> = st.data_out.lock().unwrap().drain(..).collect();
            for text in out {
                if let Some(mut ch) = subscriber.rtc.channel(id) {
                    let _ = ch.write(false, text.as_bytes());
                }
            }
        }
        // Publish.
        let now = Instant::now();
        if let (true, Some((audio, video))) =
            (st.publish_connected.load(Ordering::Relaxed), media_mids)
        {
            if now >= next_video {
                next_video = next_due(next_video, Duration::from_millis(33), now);
                let key = force_key || now >= last_key + Duration::from_secs(1);
                force_key = false;
                if key {
                    last_key = now;
                }
                let ts = vcount.wrapping_mul(3000);
                if !st.simulcast.load(Ordering::Relaxed) {
                    if let (Some(pt), Some(tx)) = (
                        vpt,
                        publisher.rtc.direct_api().stream_tx_by_mid(video, None),
                    ) {
                        tx.write_rtp(
                            RtpWrite::new(pt, vseq.into(), ts, now, vp8_payload(vcount, key))
                                .marker(true)
                                .nackable(true),
                        );
                        vseq += 1;
                    }
                } else if let Some(pt) = vpt {
                    for (l, (rid, packets)) in ROOM_LAYERS.iter().enumerate() {
                        let mut api = publisher.rtc.direct_api();
                        let Some(tx) = api.stream_tx_by_mid(video, Some((*rid).into())) else {
                            continue;
                        };
                        for i in 0..*packets {
                            let counter = (vcount & 0x0fff_ffff) | (l as u32) << 28;
                            // Only the first packet of a keyframe starts it.
                            let payload = vp8_payload(counter, key && i == 0);
                            let seq = layer_seqs[l];
                            layer_seqs[l] += 1;
                            tx.write_rtp(
                                RtpWrite::new(pt, seq.into(), ts, now, payload)
                                    .marker(i + 1 == *packets)
                                    .nackable(true),
                            );
                        }
                    }
                }
                vcount += 1;
            }
            if now >= next_audio {
                next_audio = next_due(next_audio, Duration::from_millis(20), now);
                let level = *st.level.lock().unwrap();
                if let (Some(pt), Some(tx)) = (
                    apt,
                    publisher.rtc.direct_api().stream_tx_by_mid(audio, None),
                ) {
                    let ext = ExtensionValues {
                        audio_level: Some(-(level.min(127) as i8)),
                        voice_activity: Some(level < 127),
                        ..Default::default()
                    };
                    tx.write_rtp(
                        RtpWrite::new(
                            pt,
                            aseq.into(),
                            acount.wrapping_mul(960),
                            now,
                            audio_payload(acount),
                        )
                        .ext_vals(ext),
                    );
                    aseq += 1;
                    acount += 1;
                }
            }
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
}
