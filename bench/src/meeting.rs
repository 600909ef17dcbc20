//! One simulated participant of the `meeting` scenario: a glommio task that joins a room over
//! sluice's `/ws` protocol (docs/signaling.md) exactly as a browser would, with two WebRTC
//! connections, each its own `Rtc` and UDP socket:
//!
//! - **publish**: a `crate::peer::Peer` publisher (the same synthetic audio and video, with
//!   probes, as WHIP publishers send), whose offer goes out as the `offer` message with its
//!   `tracks` and whose answer comes back as `answer`;
//! - **subscribe**: the server offers (`offer` with `seq`, again on every change of the room), we
//!   answer with str0m's `accept_offer` and the same `seq`; it receives every other participant
//!   (auto-subscribe) and accounts for their packets.
//!
//! Accounting reuses the collector unchanged: participant `i` is publisher `i`, and each ordered
//! pair (receiver `r`, sender `s`) is one collector "subscriber" of publisher `s` (id
//! [`pair_id`]), joined at `r`'s first video packet from `s`. So a packet of `s` is expected at
//! every other participant from the second after that pair's first media.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::sync::StaticPermit;
use str0m::change::SdpOffer;
use str0m::media::Mid;
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpPacket;
use str0m::{Event, Input, Output, Rtc};

use crate::accounting::SeqTracker;
use crate::clock::mono_ns;
use crate::peer::{self, client_socket, keep_one_candidate, short, Offered, Peer, PeerSpec, Role};
use crate::probe::Probe;
use crate::room::{self, ServerMsg};
use crate::shard::{Shard, ShardEvent};
use crate::udp::{self, Readiness, ReadyWait};
use crate::ws::{self, Incoming, Ws};

const SIGNALING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leaving participant waits for `left` before it just closes.
const LEAVE_WAIT: Duration = Duration::from_secs(3);
/// Longest a participant sleeps without looking at its shard's stop flag.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often join deadlines are checked.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// One participant to run.
#[derive(Debug, Clone)]
pub struct MeetingSpec {
    /// This participant (0..participants): its publisher index and identity `loadgen-<index>`.
    pub index: u32,
    pub participants: u32,
    pub room: String,
    /// When each participant started joining (CLOCK_MONOTONIC ns, 0 = not yet), shared by
    /// every shard: a pair's join time counts from the later of its two participants.
    pub started: Arc<Vec<AtomicU64>>,
}

/// The collector id of "receiver `receiver` gets sender `sender`'s media".
pub fn pair_id(receiver: u32, sender: u32, participants: u32) -> u32 {
    receiver * participants + sender
}

/// The receiving participant of a pair id.
pub fn receiver_of(pair: u32, participants: u32) -> u32 {
    pair / participants.max(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pair {
    /// No media from that sender yet.
    Waiting,
    /// First media in this bucket: counts from the next one.
    Joined(u32),
    /// Reported as a failed join; nothing of it is counted.
    Failed,
    /// Ourselves.
    Me,
}

/// The subscribe connection.
struct Sub {
    rtc: Rtc,
    socket: UdpSocket,
    ready: Readiness,
    waiting: Option<ReadyWait>,
    local: SocketAddr,
    /// The SFU candidate kept from the first offer (the socket is connected to it).
    remote: Option<SocketAddr>,
    connected: bool,
    /// m-line -> the server participant id sending on it (from the offers' `tracks`).
    mid_owner: HashMap<Mid, String>,
    /// Per probe stream (sender and kind).
    trackers: HashMap<u32, SeqTracker>,
    arrived_ns: u64,
    read_ns: u64,
}

struct Participant {
    spec: MeetingSpec,
    /// The publish side as a publisher peer.
    pub_spec: PeerSpec,
    started: Instant,
    started_ns: u64,
    /// Our server participant id, once joined.
    me: Option<String>,
    /// Server participant id -> load-generator index.
    ids: HashMap<String, u32>,
    offered: Option<Offered>,
    publish: Option<Peer>,
    permit: Option<StaticPermit>,
    sub: Sub,
    pairs: Vec<Pair>,
    leaving: Option<Instant>,
    /// When the join deadlines are looked at next.
    next_check: Instant,
}

enum Woke {
    Ws(std::io::Result<()>),
    Publish(std::io::Result<()>),
    Subscribe(std::io::Result<()>),
    Timer,
}

/// Run one participant to the end. Never panics on network or peer errors: they become events.
pub async fn run(shard: Rc<Shard>, spec: MeetingSpec) {
    shard.live.set(shard.live.get() + 1);
    let permit = shard.joins.acquire_static_permit(1).await.ok();
    let result = match Participant::new(&shard, spec.clone(), permit) {
        Ok(mut p) => {
            let r = p.run(&shard).await;
            p.finish(&shard, r);
            None
        }
        Err(e) => Some(e),
    };
    if let Some(reason) = result {
        shard.emit(ShardEvent::JoinFailed {
            role: Role::Publisher,
            id: spec.index,
            reason: reason.clone(),
        });
        for sender in (0..spec.participants).filter(|&s| s != spec.index) {
            shard.emit(ShardEvent::JoinFailed {
                role: Role::Subscriber,
                id: pair_id(spec.index, sender, spec.participants),
                reason: format!("the receiving participant failed: {reason}"),
            });
        }
    }
    shard.live.set(shard.live.get() - 1);
}

impl Participant {
    fn new(
        shard: &Shard,
        spec: MeetingSpec,
        permit: Option<StaticPermit>,
    ) -> Result<Participant, String> {
        let started = Instant::now();
        let started_ns = mono_ns();
        if let Some(s) = spec.started.get(spec.index as usize) {
            s.store(started_ns, Ordering::Relaxed);
        }
        let (socket, local, rtc) = client_socket(shard)?;
        let ready = Readiness::for_socket(&socket, shard.poller.as_ref())
            .map_err(|e| format!("UDP socket: {e}"))?;
        let mut pairs = vec![Pair::Waiting; spec.participants as usize];
        if let Some(p) = pairs.get_mut(spec.index as usize) {
            *p = Pair::Me;
        }
        Ok(Participant {
            pub_spec: PeerSpec {
                role: Role::Publisher,
                id: spec.index,
                publisher: spec.index,
                stream: spec.room.clone(),
            },
            spec,
            started,
            started_ns,
            me: None,
            ids: HashMap::new(),
            offered: None,
            publish: None,
            permit,
            sub: Sub {
                rtc,
                socket,
                ready,
                waiting: None,
                local,
                remote: None,
                connected: false,
                mid_owner: HashMap::new(),
                trackers: HashMap::new(),
                arrived_ns: 0,
                read_ns: 0,
            },
            pairs,
            leaving: None,
            next_check: started,
        })
    }

    fn published(&self) -> bool {
        self.publish.as_ref().is_some_and(|p| p.is_joined())
    }

    /// Report how it ended: a participant that never published failed its join, one that did
    /// was lost; and every pair still waiting for media failed.
    fn finish(&mut self, shard: &Shard, result: Result<(), String>) {
        let Err(reason) = result else {
            return;
        };
        let reason = short(&reason);
        shard.emit(if self.published() {
            ShardEvent::Lost {
                role: Role::Publisher,
                reason: reason.clone(),
            }
        } else {
            ShardEvent::JoinFailed {
                role: Role::Publisher,
                id: self.spec.index,
                reason: reason.clone(),
            }
        });
        for sender in 0..self.spec.participants {
            if self.pairs[sender as usize] == Pair::Waiting {
                self.pairs[sender as usize] = Pair::Failed;
                shard.emit(ShardEvent::JoinFailed {
                    role: Role::Subscriber,
                    id: pair_id(self.spec.index, sender, self.spec.participants),
                    reason: format!("the receiving participant failed: {reason}"),
                });
            }
        }
    }

    async fn run(&mut self, shard: &Shard) -> Result<(), String> {
        let r = self.session(shard).await;
        // Once leaving, the server tears our connections down: not a failure.
        if self.leaving.is_some() {
            return Ok(());
        }
        r
    }

    async fn session(&mut self, shard: &Shard) -> Result<(), String> {
        let path = shard.target.path("/ws");
        let mut ws = ws::connect(&shard.target, &path, SIGNALING_TIMEOUT).await?;
        ws.send(room::join(
            &self.spec.room,
            &room::identity(self.spec.index),
        ))?;
        loop {
            let now = Instant::now();
            if shard.stopping.get() && self.leaving.is_none() {
                // Leave as a browser would; `left` (or the close) ends the task.
                let _ = ws.send(room::leave());
                self.leaving = Some(now + LEAVE_WAIT);
            }
            if self.leaving.is_some_and(|d| now > d) {
                return Ok(());
            }
            let mut wake = now + MAX_WAIT;
            if let Some(p) = self.publish.as_mut() {
                let deadline = p.drain(shard, &self.pub_spec, self.started)?;
                if self.leaving.is_none()
                    && p.is_connected()
                    && p.send_due(shard, &self.pub_spec, now)
                {
                    continue;
                }
                wake = wake.min(deadline);
                if p.is_connected() && self.leaving.is_none() {
                    wake = wake.min(p.next_media(now));
                }
            }
            wake = wake.min(self.drain_sub(shard)?);
            if self.leaving.is_none() && now >= self.next_check {
                self.next_check = now + CHECK_EVERY;
                self.check_joins(shard, now)?;
            }
            if wake <= now {
                self.timeouts(now)?;
                continue;
            }
            let wait = (wake - now).max(Duration::from_micros(50));
            let woke = {
                let ws_wait = ws.ready_wait();
                let pub_wait = self.publish.as_mut().map(|p| p.ready_wait());
                let sub_wait = if self.sub.remote.is_some() {
                    Some(
                        self.sub
                            .waiting
                            .get_or_insert_with(|| self.sub.ready.wait()),
                    )
                } else {
                    None
                };
                let a = async { Woke::Ws(ws_wait.as_mut().await) };
                let b = async {
                    match pub_wait {
                        Some(w) => Woke::Publish(w.as_mut().await),
                        None => future::pending().await,
                    }
                };
                let c = async {
                    match sub_wait {
                        Some(w) => Woke::Subscribe(w.as_mut().await),
                        None => future::pending().await,
                    }
                };
                let t = async {
                    glommio::timer::sleep(wait).await;
                    Woke::Timer
                };
                future::or(a, future::or(b, future::or(c, t))).await
            };
            match woke {
                Woke::Timer => self.timeouts(Instant::now())?,
                Woke::Ws(r) => {
                    ws.ready_done();
                    r.map_err(|e| format!("/ws: {e}"))?;
                    if self.read_ws(shard, &mut ws)? {
                        return Ok(());
                    }
                }
                Woke::Publish(r) => {
                    let p = self.publish.as_mut().ok_or("publish peer vanished")?;
                    p.ready_done();
                    udp_result(r)?;
                    p.receive_all(shard, &self.pub_spec, self.started)?;
                }
                Woke::Subscribe(r) => {
                    self.sub.waiting = None;
                    udp_result(r)?;
                    self.receive_sub(shard)?;
                }
            }
        }
    }

    /// Tell both `Rtc`s the time (their deadlines).
    fn timeouts(&mut self, now: Instant) -> Result<(), String> {
        if let Some(p) = self.publish.as_mut() {
            p.input(Input::Timeout(now))?;
        }
        self.sub
            .rtc
            .handle_input(Input::Timeout(now))
            .map_err(|e| format!("str0m: {e}"))
    }

    /// Join deadlines: the participant's own (publish connection up within `--join-timeout`),
    /// and each pair's (media from every other participant within `--join-timeout` of the later
    /// of the two starting).
    fn check_joins(&mut self, shard: &Shard, now: Instant) -> Result<(), String> {
        let timeout = shard.join_timeout;
        if !self.published() && now > self.started + timeout {
            let stage = if self.me.is_none() {
                "no `joined` answer to `join`".to_string()
            } else if self.publish.is_none() {
                "no answer to the publish offer".to_string()
            } else {
                "publish connection: ICE+DTLS not connected".to_string()
            };
            return Err(format!("{stage} within {timeout:?}"));
        }
        let now_ns = mono_ns();
        for sender in 0..self.spec.participants {
            if self.pairs[sender as usize] != Pair::Waiting {
                continue;
            }
            let theirs = self.spec.started[sender as usize].load(Ordering::Relaxed);
            // Not started yet: it is still being launched (--join-rate); give it time.
            let from = if theirs == 0 {
                self.started_ns + timeout.as_nanos() as u64
            } else {
                self.started_ns.max(theirs)
            };
            if now_ns > from + timeout.as_nanos() as u64 {
                self.pairs[sender as usize] = Pair::Failed;
                let what = if self.sub.connected {
                    "no media from another participant"
                } else {
                    "subscribe connection: ICE+DTLS not connected"
                };
                shard.emit(ShardEvent::JoinFailed {
                    role: Role::Subscriber,
                    id: pair_id(self.spec.index, sender, self.spec.participants),
                    reason: format!("{what} within {timeout:?}"),
                });
            }
        }
        Ok(())
    }

    /// Take every message the socket has. `Ok(true)`: we have left, the task ends.
    fn read_ws(&mut self, shard: &Shard, ws: &mut Ws) -> Result<bool, String> {
        while let Some(m) = ws.try_recv()? {
            let text = match m {
                Incoming::Text(t) => t,
                Incoming::Closed(_) if self.leaving.is_some() => return Ok(true),
                Incoming::Closed(why) => return Err(format!("/ws closed by the server: {why}")),
            };
            let msg = match room::parse(&text) {
                Ok(m) => m,
                Err(e) => {
                    shard.emit(ShardEvent::Failure {
                        reason: format!("/ws: unreadable server message: {e}"),
                    });
                    continue;
                }
            };
            if self.on_message(shard, ws, msg)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn on_message(&mut self, shard: &Shard, ws: &mut Ws, msg: ServerMsg) -> Result<bool, String> {
        match msg {
            ServerMsg::Joined { me, others } => {
                for w in others {
                    self.learn(w);
                }
                self.me = Some(me);
                if self.leaving.is_none() {
                    let offered = peer::offer(shard, &self.pub_spec)?;
                    let (video, audio) = offered.mids();
                    let (video, audio) =
                        (video.map(|m| m.to_string()), audio.map(|m| m.to_string()));
                    ws.send(room::publish_offer(
                        &offered.sdp,
                        video.as_deref(),
                        audio.as_deref(),
                    ))?;
                    self.offered = Some(offered);
                }
            }
            ServerMsg::ParticipantJoined(w) => self.learn(w),
            ServerMsg::Answer { sdp } => {
                let Some(offered) = self.offered.take() else {
                    shard.emit(ShardEvent::Failure {
                        reason: "/ws: an answer without an offer".into(),
                    });
                    return Ok(false);
                };
                let mut p =
                    offered.accept(shard, &self.pub_spec, &sdp, String::new(), "publish answer")?;
                p.set_permit(self.permit.take());
                self.publish = Some(p);
            }
            ServerMsg::Offer { seq, sdp, tracks } => {
                let answer = self.accept_offer(&sdp, tracks)?;
                ws.send(room::answer(&answer, seq))?;
            }
            ServerMsg::Error { code, message } => {
                if self.me.is_none() {
                    return Err(format!("join refused: {code}: {message}"));
                }
                shard.emit(ShardEvent::Failure {
                    reason: format!("/ws error {code}: {}", short(&message)),
                });
            }
            ServerMsg::Left { reason } => {
                if self.leaving.is_some() {
                    return Ok(true);
                }
                return Err(format!("removed by the server ({reason})"));
            }
            ServerMsg::Other => {}
        }
        Ok(false)
    }

    fn learn(&mut self, w: room::Who) {
        if let Some(i) = room::index_of(&w.identity) {
            self.ids.insert(w.id, i);
        }
    }

    /// Accept a subscribe offer (keeping one SFU candidate, as the peers do) and return the
    /// answer's SDP.
    fn accept_offer(&mut self, sdp: &str, tracks: Vec<(String, String)>) -> Result<String, String> {
        let (sdp, remote) =
            keep_one_candidate(sdp).ok_or("subscribe offer: no UDP candidate".to_string())?;
        if self.sub.remote.is_none() {
            self.sub
                .socket
                .connect(remote)
                .map_err(|e| format!("UDP connect to {remote}: {e}"))?;
            self.sub.remote = Some(remote);
        }
        for (mid, participant) in tracks {
            self.sub
                .mid_owner
                .insert(Mid::from(mid.as_str()), participant);
        }
        let offer = SdpOffer::from_sdp_string(&sdp)
            .map_err(|e| format!("subscribe offer: bad SDP: {e}"))?;
        let answer = self
            .sub
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| format!("subscribe offer not accepted: {e}"))?;
        Ok(answer.to_sdp_string())
    }

    /// Feed the subscribe `Rtc` everything queued on its socket (as `Peer::receive_all`).
    fn receive_sub(&mut self, shard: &Shard) -> Result<(), String> {
        let Some(remote) = self.sub.remote else {
            return Ok(());
        };
        loop {
            let mut batch = shard.rx.borrow_mut();
            let n = match batch.recv(&self.sub.socket) {
                Ok(n) => n,
                Err(e) => return udp_result(Err(e)),
            };
            let (mono, real) = (mono_ns(), udp::realtime_ns());
            for i in 0..n {
                let (data, stamp) = batch.get(i);
                self.sub.read_ns = mono;
                self.sub.arrived_ns =
                    stamp.map_or(mono, |t| mono.saturating_sub(real.saturating_sub(t)));
                if let Ok(r) = Receive::new(Protocol::Udp, remote, self.sub.local, data) {
                    self.sub
                        .rtc
                        .handle_input(Input::Receive(Instant::now(), r))
                        .map_err(|e| format!("str0m: {e}"))?;
                    self.drain_sub(shard)?;
                }
            }
            if n < udp::BATCH {
                return Ok(());
            }
        }
    }

    /// Send what the subscribe `Rtc` has to send and act on its events; its next deadline.
    fn drain_sub(&mut self, shard: &Shard) -> Result<Instant, String> {
        loop {
            let out = self
                .sub
                .rtc
                .poll_output()
                .map_err(|e| format!("str0m: {e}"))?;
            match out {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => {
                    if self.sub.remote.is_some() {
                        let _ = self.sub.socket.send_to(&t.contents, t.destination);
                    }
                }
                Output::Event(Event::Connected) => self.sub.connected = true,
                Output::Event(Event::IceConnectionStateChange(
                    str0m::IceConnectionState::Disconnected,
                )) if self.sub.connected => {
                    return Err("subscribe connection: ICE disconnected".into());
                }
                Output::Event(Event::RtpPacket(p)) => self.on_media(shard, &p),
                Output::Event(_) => {}
            }
        }
    }

    fn on_media(&mut self, shard: &Shard, p: &RtpPacket) {
        let Some(probe) = Probe::parse(&p.payload) else {
            shard.emit(ShardEvent::Failure {
                reason: "received a packet without a probe (corrupted payload?)".into(),
            });
            return;
        };
        let sender = probe.stream.publisher();
        let n = self.spec.participants;
        if sender >= n || sender == self.spec.index {
            shard.emit(ShardEvent::Failure {
                reason: "received its own or an unknown publisher's packet (misrouted)".into(),
            });
            return;
        }
        // The m-line it came on belongs, per the offer, to a participant: the same one?
        let owner = self
            .sub
            .rtc
            .direct_api()
            .stream_rx(&p.header.ssrc)
            .map(|s| s.mid())
            .and_then(|mid| self.sub.mid_owner.get(&mid))
            .and_then(|id| self.ids.get(id))
            .copied();
        if owner.is_some_and(|o| o != sender) {
            shard.emit(ShardEvent::Failure {
                reason: "received a participant's packet on another's m-line (misrouted)".into(),
            });
            return;
        }
        let video = probe.stream.is_video();
        let arrival = self
            .sub
            .trackers
            .entry(probe.stream.0)
            .or_default()
            .on_packet(probe.seq);
        let pair = &mut self.pairs[sender as usize];
        if *pair == Pair::Waiting && (video || shard.plan.video.is_none()) {
            let now_ns = mono_ns();
            let theirs = self.spec.started[sender as usize].load(Ordering::Relaxed);
            let from = self.started_ns.max(theirs);
            let bucket = shard.bucket(now_ns);
            *pair = Pair::Joined(bucket);
            shard.emit(ShardEvent::Joined {
                role: Role::Subscriber,
                id: pair_id(self.spec.index, sender, n),
                join_ms: now_ns.saturating_sub(from) as f64 / 1e6,
                bucket,
            });
        }
        if let Pair::Joined(joined) = *pair {
            let bucket = shard.bucket(probe.sent_ns);
            if bucket > joined {
                let latency_us = self.sub.arrived_ns.saturating_sub(probe.sent_ns) / 1000;
                let read_us = self.sub.read_ns.saturating_sub(probe.sent_ns) / 1000;
                shard
                    .stats
                    .borrow_mut()
                    .count_received(bucket, arrival, latency_us, read_us, true);
            }
        }
    }
}

/// A UDP wait or receive result as the peers report it.
fn udp_result(r: std::io::Result<()>) -> Result<(), String> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("the SFU's media port is closed (ICMP port unreachable)".into())
        }
        Err(e) => Err(format!("UDP receive: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ids_are_distinct_and_name_their_receiver() {
        let n = 5;
        let mut seen = std::collections::HashSet::new();
        for r in 0..n {
            for s in (0..n).filter(|&s| s != r) {
                let id = pair_id(r, s, n);
                assert!(seen.insert(id));
                assert_eq!(receiver_of(id, n), r);
            }
        }
        assert_eq!(seen.len(), (n * (n - 1)) as usize);
    }
}
