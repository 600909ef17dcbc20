//! One core's world. A shard owns its media sockets (through `io`), its peers (each a str0m `Rtc`),
//! the 5-tuple and ufrag indexes that route datagrams to them, a timer heap of their deadlines, and
//! its end of the cross-shard mesh. It never blocks except in its single wait point, never takes a
//! lock, and talks to the control thread only through bounded queues.

pub mod io;
mod peer;
pub mod rooms;
mod simulcast;
mod stun;
mod timers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender, TrySendError};
use slab::Slab;
use str0m::bwe::{Bitrate, BweKind};
use str0m::format::PayloadParams;
use str0m::media::{KeyframeRequestKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Output, Rtc};

use crate::mesh::ANY_LAYER;
use crate::mesh::{Doorbell, MediaPacket, MeshEndpoints, MeshMsg, PacketPool, PacketView, TrackId};
use crate::metrics::{self, Counter, ShardCounters, ShardStats};
use crate::sfu::{
    is_keyframe, vp8_keyframe_size, CodecKind, KeyframeThrottle, LayerTable, MaxLayer,
    SwitchReason, MAX_LAYERS,
};
use crate::{SessionId, ShardId};
use io::{BufferPool, DatagramIo, IoConfig, WakeFd};
use peer::{Peer, PeerTrack};
use timers::TimerHeap;

/// Why a peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// `DELETE` on its session.
    Deleted,
    /// Never completed ICE and DTLS in time.
    ConnectTimeout,
    /// Connected, then went silent for longer than the ICE timeout.
    IceTimeout,
    /// ICE disconnected or DTLS closed by the remote.
    Disconnected,
    /// The WebRTC stack failed.
    Error,
    /// Replaced by a newer session, or the node shuts down.
    Shutdown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Deleted => "deleted",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::IceTimeout => "ice_timeout",
            CloseReason::Disconnected => "disconnected",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// A peer as the control thread hands it over: negotiated, not yet connected.
pub struct NewPeer {
    pub session: SessionId,
    pub rtc: Rtc,
    pub ufrag: String,
    pub publisher: bool,
    /// Which of the peer's m-lines carries which track (published or subscribed).
    pub tracks: Vec<(Mid, TrackId)>,
    /// A subscriber's own cap on simulcast layers (WHEP `?layer=`, `?max_height=`).
    pub max_layer: crate::sfu::MaxLayer,
}

/// Control thread to shard.
pub enum ShardCommand {
    AddPeer(Box<NewPeer>),
    RemovePeer {
        session: SessionId,
        reason: CloseReason,
    },
    /// Where a track is published now (`None`: nobody publishes it), and its codecs. Sent to every
    /// shard.
    TrackRoute {
        track: TrackId,
        publisher: Option<ShardId>,
        codecs: Arc<[PayloadParams]>,
    },
    /// Whether `shard` has at least one subscriber of `track`. Sent to every shard.
    TrackInterest {
        track: TrackId,
        shard: ShardId,
        interested: bool,
    },
    RemoteCandidate {
        session: SessionId,
        candidate: Candidate,
    },
    /// ICE restart (RFC 9725 section 4.4): the session's offer again, with the client's new ICE
    /// credentials, so str0m flushes its ICE state and picks new local credentials (which go back
    /// on `reply`). DTLS and media continue.
    IceRestart {
        session: SessionId,
        offer: String,
        reply: tokio::sync::oneshot::Sender<Result<IceCreds, String>>,
    },
    /// A `/ws` room participant's renegotiation, subscription or data (see `rooms`).
    Room(rooms::RoomCommand),
    Shutdown,
}

/// Shard to control thread.
#[derive(Debug)]
pub enum ShardEvent {
    Connected {
        session: SessionId,
        shard: ShardId,
    },
    Closed {
        session: SessionId,
        reason: CloseReason,
    },
    /// A message on the peer's `sluice` data channel (rooms).
    ChannelData {
        session: SessionId,
        binary: bool,
        data: Vec<u8>,
    },
    /// The loudest RFC 6464 level (-dBov, 0 loudest) of a published audio track over ~150 ms.
    AudioLevel {
        session: SessionId,
        track: TrackId,
        dbov: u8,
    },
    /// Loss (0..1) and round-trip time of a peer, from str0m's stats (every second).
    LinkStats {
        session: SessionId,
        loss: f32,
        rtt_ms: u32,
    },
}

/// What a shard needs to know about its configuration.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub io: IoConfig,
    /// Per socket (same order as `io.addrs`): the address announced in candidates.
    pub announced: Vec<SocketAddr>,
    pub pin_core: Option<usize>,
    pub connect_timeout: Duration,
    pub ice_timeout: Duration,
    pub keyframe_min_interval: Duration,
    /// Subscribers whose sends are handed to the kernel together (`media.send_chunk`).
    pub send_chunk: usize,
    /// How long after its last received packet the shard polls instead of sleeping
    /// (`media.busy_poll_us`); zero: it sleeps as soon as it has nothing to do.
    pub busy_poll: Duration,
}

/// The control thread's handle on a running shard.
pub struct ShardHandle {
    pub id: ShardId,
    commands: Sender<ShardCommand>,
    pub doorbell: Arc<Doorbell>,
    pub stats: Arc<ShardStats>,
    /// Bound socket addresses, in `ShardConfig::io.addrs` order.
    pub local_addrs: Vec<SocketAddr>,
    pub io_backend: &'static str,
    join: Option<JoinHandle<()>>,
}

impl ShardHandle {
    /// Queue a command and wake the shard. Fails (returning the command) when its queue is full.
    pub fn send(&self, cmd: ShardCommand) -> Result<(), Box<ShardCommand>> {
        match self.commands.try_send(cmd) {
            Ok(()) => {
                self.doorbell.ring();
                Ok(())
            }
            Err(TrySendError::Full(c)) | Err(TrySendError::Disconnected(c)) => Err(Box::new(c)),
        }
    }

    pub fn join(&mut self) {
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Everything a shard thread is built from.
pub struct ShardSetup {
    pub id: ShardId,
    pub config: ShardConfig,
    pub wake: WakeFd,
    pub doorbell: Arc<Doorbell>,
    pub mesh: MeshEndpoints,
    pub events: tokio::sync::mpsc::Sender<ShardEvent>,
    pub command_capacity: usize,
}

static THREAD_START_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Run `hook` at the start of every shard thread, before its loop. For profiling and tests (the
/// allocation-counting test marks shard threads with it); set at most once per process.
pub fn on_shard_thread_start(hook: fn()) {
    let _ = THREAD_START_HOOK.set(hook);
}

/// Start a shard thread. Returns once its sockets are bound (or failed to bind).
pub fn spawn(setup: ShardSetup) -> std::io::Result<ShardHandle> {
    let (cmd_tx, cmd_rx) = crossbeam::channel::bounded(setup.command_capacity);
    let stats = Arc::new(ShardStats::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let doorbell = setup.doorbell.clone();
    let thread_stats = stats.clone();
    let id = setup.id;
    let join = std::thread::Builder::new()
        .name(format!("sluice-shard-{id}"))
        .spawn(move || {
            if let Some(hook) = THREAD_START_HOOK.get() {
                hook();
            }
            if let Some(core) = setup.config.pin_core {
                let cores = core_affinity::get_core_ids().unwrap_or_default();
                if let Some(c) = cores.get(core % cores.len().max(1)) {
                    if !core_affinity::set_for_current(*c) {
                        tracing::warn!(shard = id, core, "could not pin shard thread");
                    }
                }
            }
            let io = match io::open(&setup.config.io, &setup.wake) {
                Ok(io) => io,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok((io.local_addrs().to_vec(), io.name())));
            let mut shard = Shard::new(setup, io, cmd_rx, thread_stats);
            shard.run();
        })?;
    let (local_addrs, io_backend) = ready_rx
        .recv()
        .map_err(|_| std::io::Error::other("shard thread died during start"))??;
    Ok(ShardHandle {
        id,
        commands: cmd_tx,
        doorbell,
        stats,
        local_addrs,
        io_backend,
        join: Some(join),
    })
}

/// Forwarding state of one track on one shard.
struct TrackState {
    publisher_shard: Option<ShardId>,
    codecs: Arc<[PayloadParams]>,
    /// Other shards with at least one subscriber (bit per shard).
    remote_shards: u64,
    /// Local subscribers: (peer key, index into the peer's tracks).
    local_subs: Vec<(usize, usize)>,
    /// The local publisher: (peer key, its mid for this track).
    local_publisher: Option<(usize, Mid)>,
    /// Keyframe requests to the publisher, per simulcast layer (index 0 without simulcast).
    throttles: [KeyframeThrottle; MAX_LAYERS],
    /// Bit per layer: a throttled request waits.
    keyframe_pending: u8,
    /// Simulcast: the publisher's shard's latest view of the layers.
    layers: Option<Arc<LayerTable>>,
}

impl TrackState {
    fn new(min_interval: Duration) -> TrackState {
        TrackState {
            publisher_shard: None,
            codecs: Arc::from(Vec::new()),
            remote_shards: 0,
            local_subs: Vec::new(),
            local_publisher: None,
            throttles: std::array::from_fn(|_| KeyframeThrottle::new(min_interval)),
            keyframe_pending: 0,
            layers: None,
        }
    }

    fn is_unused(&self) -> bool {
        self.publisher_shard.is_none()
            && self.remote_shards == 0
            && self.local_subs.is_empty()
            && self.local_publisher.is_none()
    }

    fn codec_of(&self, pt: u8) -> CodecKind {
        self.codecs
            .iter()
            .find(|p| *p.pt() == pt)
            .map(codec_kind)
            .unwrap_or(CodecKind::Other)
    }
}

pub(crate) fn codec_kind(p: &PayloadParams) -> CodecKind {
    use str0m::format::Codec;
    match p.spec().codec {
        Codec::Opus => CodecKind::Opus,
        Codec::Vp8 => CodecKind::Vp8,
        Codec::Vp9 => CodecKind::Vp9,
        Codec::H264 => CodecKind::H264,
        Codec::Av1 => CodecKind::Av1,
        _ => CodecKind::Other,
    }
}

const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
const LAYERS_INTERVAL: Duration = Duration::from_secs(1);
/// How long a subscriber that wants a higher layer than its estimate allows waits after one
/// probe before it asks for the next. With the second the dip lasts (`probe_for_more` runs once a
/// second), a probe every 2 s: each may at most double the estimate (str0m caps a probe at twice
/// the estimate), and an estimate that collapsed with a burst of loss (a bottleneck queue
/// flushed) must climb back a doubling at a time.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_DIP_BPS: u64 = 10_000;
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
const MAX_SOURCES_PER_PEER: usize = 8;
const SUBSCRIBER_KEYFRAME_RETRY: Duration = Duration::from_millis(300);

/// The estimator targets (padding floor, desired) for the tick a probe dip lasts, from the
/// viewer's (`bwe_targets`); `None` when the desired bitrate is too small to dip. The floor dips
/// with it: one layer under the top, the floor (the next layer up) and the goal (the top) are
/// the same, and a dip kept above the floor would be none (such a viewer never probed).
fn probe_dip(minimum: u64, desired: u64) -> Option<(u64, u64)> {
    let dip = desired.checked_sub(PROBE_DIP_BPS).filter(|&d| d > 0)?;
    Some((minimum.min(dip), dip))
}

struct Shard {
    id: ShardId,
    cfg: ShardConfig,
    io: Box<dyn DatagramIo>,
    commands: Receiver<ShardCommand>,
    doorbell: Arc<Doorbell>,
    stats: Arc<ShardStats>,
    st: ShardState,
}

/// Everything but the I/O backend, so that the receive callback can borrow it mutably.
struct ShardState {
    id: ShardId,
    cfg: ShardConfig,
    counters: ShardCounters,
    peers: Slab<Peer>,
    // Keyed by what remote peers choose: std's SipHash with a random key resists flooding.
    by_source: HashMap<(usize, SocketAddr), usize>,
    by_ufrag: HashMap<Box<[u8]>, usize>,
    by_session: HashMap<SessionId, usize>,
    timers: TimerHeap,
    tracks: HashMap<TrackId, TrackState>,
    mesh: MeshEndpoints,
    pool: &'static PacketPool,
    events: tokio::sync::mpsc::Sender<ShardEvent>,
    /// Datagrams produced this turn, handed to the backend at flush.
    pending_tx: Vec<(usize, SocketAddr, Vec<u8>)>,
    /// Buffers that forwarded packets are protected into, back from the backend once sent.
    tx_buffers: BufferPool,
    /// Keyframe needs raised this turn (track, simulcast layer or `ANY_LAYER`), routed at the
    /// end of it.
    keyframe_needs: Vec<(TrackId, u8)>,
    scratch_subs: Vec<(usize, usize)>,
    /// Arrival time of each packet handed to the backend since the last flush, for the
    /// latency histogram.
    forwarded_arrivals: Vec<Instant>,
    /// Subscribers given packets this turn (each once; `Peer::written` marks them), and how
    /// many of them have sent.
    written: Vec<usize>,
    written_sent: usize,
    next_sweep: Instant,
    next_publish: Instant,
    /// Simulcast layer tables and the bandwidth-estimate samples, once a second.
    next_layers_tick: Instant,
    /// Room state of peers that are `/ws` participants (or publish audio).
    room_peers: rooms::RoomPeers,
}

impl Shard {
    fn new(
        setup: ShardSetup,
        io: Box<dyn DatagramIo>,
        commands: Receiver<ShardCommand>,
        stats: Arc<ShardStats>,
    ) -> Shard {
        let now = Instant::now();
        let st = ShardState {
            id: setup.id,
            cfg: setup.config.clone(),
            counters: ShardCounters::default(),
            peers: Slab::with_capacity(256),
            by_source: HashMap::with_capacity(512),
            by_ufrag: HashMap::with_capacity(256),
            by_session: HashMap::with_capacity(256),
            timers: TimerHeap::default(),
            tracks: HashMap::with_capacity(64),
            mesh: setup.mesh,
            pool: PacketPool::new_static(8192),
            events: setup.events,
            pending_tx: Vec::with_capacity(1024),
            tx_buffers: BufferPool::default(),
            keyframe_needs: Vec::with_capacity(64),
            scratch_subs: Vec::with_capacity(64),
            forwarded_arrivals: Vec::with_capacity(4096),
            written: Vec::with_capacity(256),
            written_sent: 0,
            next_sweep: now + SWEEP_INTERVAL,
            next_publish: now + PUBLISH_INTERVAL,
            next_layers_tick: now + LAYERS_INTERVAL,
            room_peers: rooms::RoomPeers::default(),
        };
        Shard {
            id: setup.id,
            cfg: setup.config,
            io,
            commands,
            doorbell: setup.doorbell,
            stats,
            st,
        }
    }

    fn run(&mut self) {
        tracing::info!(
            shard = self.id,
            io = self.io.name(),
            gso = self.io.gso(),
            gro = self.io.gro(),
            addrs = ?self.io.local_addrs(),
            "shard running"
        );
        let mut busy = Duration::ZERO;
        let mut idle = Duration::ZERO;
        // When the last datagram or cross-shard packet came in (busy polling).
        let mut last_rx = Instant::now();
        loop {
            let turn_start = Instant::now();
            self.st.counters.inc(Counter::LoopTurns);

            // Commands from the control thread.
            while let Ok(cmd) = self.commands.try_recv() {
                if let ShardCommand::Shutdown = cmd {
                    self.st.shutdown(turn_start);
                    self.flush_io();
                    self.publish(busy, idle);
                    return;
                }
                self.st.handle_command(cmd, turn_start);
            }

            // Datagrams.
            let st = &mut self.st;
            let recv = self.io.recv(&mut |sock, src, data| {
                st.handle_datagram(sock, src, data, Instant::now());
            });
            match recv {
                Ok(0) => {}
                Ok(_) => last_rx = turn_start,
                Err(e) => tracing::warn!(shard = self.id, error = %e, "receive failed"),
            }

            // Packets and requests from other shards.
            let now = Instant::now();
            if !self.cfg.busy_poll.is_zero() && self.st.mesh.any_inbound() {
                last_rx = now;
            }
            self.st.handle_mesh(now);

            // Peer deadlines, keyframe throttles, liveness.
            self.st.handle_timers(now);
            self.st.route_keyframe_needs(now);

            // Subscribers that were given packets this turn send them, a chunk at a time: the
            // first ones are on the wire while the rest are still being encrypted.
            while self
                .st
                .send_written(Instant::now(), self.cfg.send_chunk.max(1))
            {
                self.flush_io();
            }

            // Everything produced this turn goes out now, in one batch per destination.
            let dropped = self.st.mesh.flush();
            self.st.counters.add(Counter::DropRingFull, dropped as u64);
            self.flush_io();

            let now = Instant::now();
            busy += now - turn_start;
            if now >= self.st.next_publish {
                self.st.next_publish = now + PUBLISH_INTERVAL;
                self.publish(busy, idle);
            }

            // The one wait point: sockets, the next deadline, and the doorbell.
            let deadline = self.st.next_deadline();
            if deadline <= now || self.busy_poll(last_rx, deadline, &mut idle) {
                continue;
            }
            // Measured after any polling, so that the sleep still ends at the deadline and the
            // polling is not counted as idle twice.
            let sleep_start = Instant::now();
            let timeout = deadline.saturating_duration_since(sleep_start);
            if timeout.is_zero() {
                continue;
            }
            self.doorbell.prepare_sleep();
            if !self.commands.is_empty() || self.st.mesh.any_inbound() {
                self.doorbell.awake();
                continue;
            }
            if let Err(e) = self.io.wait(Some(timeout)) {
                tracing::warn!(shard = self.id, error = %e, "wait failed");
            }
            self.doorbell.awake();
            idle += sleep_start.elapsed();
        }
    }

    /// Busy polling (`media.busy_poll_us`): until `busy_poll` after `last_rx`, or `deadline` if
    /// sooner, look for datagrams, commands and cross-shard packets without sleeping. True when
    /// something is there or the deadline came (go round again); false when the window closed
    /// with nothing (sleep). The time spent polling counts as idle: it is not work.
    fn busy_poll(&mut self, last_rx: Instant, deadline: Instant, idle: &mut Duration) -> bool {
        if self.cfg.busy_poll.is_zero() {
            return false;
        }
        let start = Instant::now();
        let until = (last_rx + self.cfg.busy_poll).min(deadline);
        let mut now = start;
        let go_round = loop {
            if now >= until {
                break now >= deadline;
            }
            if !self.commands.is_empty() || self.st.mesh.any_inbound() {
                break true;
            }
            match self.io.ready() {
                Ok(true) => break true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(shard = self.id, error = %e, "poll failed");
                    break false;
                }
            }
            std::hint::spin_loop();
            now = Instant::now();
        };
        *idle += now - start;
        go_round
    }

    fn flush_io(&mut self) {
        for (sock, dest, bytes) in self.st.pending_tx.drain(..) {
            self.st.counters.inc(metrics::classify(&bytes, true));
            self.st.counters.add(Counter::BytesOut, bytes.len() as u64);
            self.io.queue_send(sock, dest, bytes);
        }
        match self.io.flush() {
            Ok(s) => self.st.counters.add(Counter::SendErrors, s.errors as u64),
            Err(e) => tracing::warn!(shard = self.id, error = %e, "send flush failed"),
        }
        self.io.reclaim(&mut self.st.tx_buffers);
        // Receive-to-send latency of every packet forwarded this turn.
        let sent = Instant::now();
        for arrival in self.st.forwarded_arrivals.drain(..) {
            self.st
                .counters
                .observe_latency(sent.saturating_duration_since(arrival));
        }
    }

    fn publish(&mut self, busy: Duration, idle: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.publish(&self.st.counters);
        self.stats.peers.store(self.st.peers.len() as u64, Relaxed);
        self.stats
            .tracks
            .store(self.st.tracks.len() as u64, Relaxed);
        self.stats.busy_ns.store(busy.as_nanos() as u64, Relaxed);
        self.stats.idle_ns.store(idle.as_nanos() as u64, Relaxed);
        self.stats
            .pool_allocated
            .store(self.st.pool.allocated(), Relaxed);
        let _ = &self.cfg;
    }
}

impl ShardState {
    fn handle_command(&mut self, cmd: ShardCommand, now: Instant) {
        match cmd {
            ShardCommand::AddPeer(p) => self.add_peer(*p, now),
            ShardCommand::RemovePeer { session, reason } => {
                if let Some(&key) = self.by_session.get(&session) {
                    self.close_peer(key, reason);
                }
            }
            ShardCommand::TrackRoute {
                track,
                publisher,
                codecs,
            } => self.set_route(track, publisher, codecs),
            ShardCommand::TrackInterest {
                track,
                shard,
                interested,
            } => {
                if shard != self.id && shard < 64 {
                    let min = self.cfg.keyframe_min_interval;
                    let ts = self
                        .tracks
                        .entry(track)
                        .or_insert_with(|| TrackState::new(min));
                    if interested {
                        // The current ranking first, ahead of any packet that carries it.
                        let fresh = ts.remote_shards & (1 << shard) == 0;
                        if let (true, Some(table)) = (fresh, ts.layers.clone()) {
                            if let Some(out) = self.mesh.outboxes.get_mut(shard) {
                                out.push(MeshMsg::Layers(track, table));
                            }
                        }
                        ts.remote_shards |= 1 << shard;
                    } else {
                        ts.remote_shards &= !(1 << shard);
                    }
                    self.forget_if_unused(track);
                }
            }
            ShardCommand::RemoteCandidate { session, candidate } => {
                if let Some(&key) = self.by_session.get(&session) {
                    self.peers[key].rtc.add_remote_candidate(candidate);
                    self.drain(key, now);
                }
            }
            ShardCommand::IceRestart {
                session,
                offer,
                reply,
            } => {
                let result = self.ice_restart(session, &offer, now);
                let _ = reply.send(result);
            }
            ShardCommand::Room(cmd) => self.handle_room_command(cmd, now),
            ShardCommand::Shutdown => {}
        }
    }

    fn ice_restart(
        &mut self,
        session: SessionId,
        offer: &str,
        now: Instant,
    ) -> Result<IceCreds, String> {
        let key = *self.by_session.get(&session).ok_or("no such peer")?;
        let offer = str0m::change::SdpOffer::from_sdp_string(offer).map_err(|e| e.to_string())?;
        let peer = &mut self.peers[key];
        peer.rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| e.to_string())?;
        let local = peer.rtc.direct_api().local_ice_credentials();
        self.by_ufrag.remove(&peer.ufrag[..]);
        peer.ufrag = local.ufrag.as_bytes().into();
        self.by_ufrag.insert(peer.ufrag.clone(), key);
        tracing::debug!(shard = self.id, %session, "ICE restart");
        self.drain(key, now);
        Ok(local)
    }

    fn add_peer(&mut self, p: NewPeer, now: Instant) {
        self.counters.inc(Counter::PeersAdded);
        let min = self.cfg.keyframe_min_interval;
        let publisher = p.publisher;
        let ufrag: Box<[u8]> = p.ufrag.as_bytes().into();
        let key = self.peers.insert(Peer::new(p, now));
        let peer = &mut self.peers[key];
        self.by_ufrag.insert(ufrag, key);
        self.by_session.insert(peer.session, key);
        for (i, t) in peer.tracks.iter().enumerate() {
            let ts = self
                .tracks
                .entry(t.track)
                .or_insert_with(|| TrackState::new(min));
            if publisher {
                ts.local_publisher = Some((key, t.mid));
            } else {
                ts.local_subs.push((key, i));
            }
        }
        if !publisher {
            let tracks: Vec<TrackId> = self.peers[key].tracks.iter().map(|t| t.track).collect();
            for track in tracks {
                self.refresh_pt_maps(track);
            }
        }
        // Start its clock.
        let _ = self.peers[key].rtc.handle_input(Input::Timeout(now));
        self.drain(key, now);
    }

    fn set_route(
        &mut self,
        track: TrackId,
        publisher: Option<ShardId>,
        codecs: Arc<[PayloadParams]>,
    ) {
        let min = self.cfg.keyframe_min_interval;
        let ts = self
            .tracks
            .entry(track)
            .or_insert_with(|| TrackState::new(min));
        ts.publisher_shard = publisher;
        if publisher.is_some() {
            ts.codecs = codecs;
        }
        self.refresh_pt_maps(track);
        self.forget_if_unused(track);
    }

    /// Map the publisher's payload types to each local subscriber's, by codec.
    fn refresh_pt_maps(&mut self, track: TrackId) {
        let Some(ts) = self.tracks.get(&track) else {
            return;
        };
        for &(key, ti) in &ts.local_subs {
            let peer = &mut self.peers[key];
            let mut map = [peer::NO_PT; 128];
            for p in ts.codecs.iter() {
                if let Some(local) = peer.rtc.codec_config().match_params(*p) {
                    map[(*p.pt() & 127) as usize] = *local.pt();
                }
            }
            if let Some(sub) = peer.tracks[ti].sub.as_mut() {
                sub.pt_map = map;
            }
        }
    }

    fn forget_if_unused(&mut self, track: TrackId) {
        if self.tracks.get(&track).is_some_and(TrackState::is_unused) {
            self.tracks.remove(&track);
        }
    }

    fn handle_datagram(&mut self, sock: usize, src: SocketAddr, data: &[u8], now: Instant) {
        self.counters.inc(metrics::classify(data, false));
        self.counters.add(Counter::BytesIn, data.len() as u64);
        let key = match self.by_source.get(&(sock, src)) {
            Some(&key) => key,
            None => match stun::local_ufrag(data).and_then(|u| self.by_ufrag.get(u)) {
                Some(&key) => {
                    let peer = &mut self.peers[key];
                    if peer.sources.len() >= MAX_SOURCES_PER_PEER {
                        self.counters.inc(Counter::DropRateLimited);
                        return;
                    }
                    peer.sources.push((sock, src));
                    self.by_source.insert((sock, src), key);
                    key
                }
                None => {
                    let known_kind =
                        stun::is_stun(data) || Receive::new(Protocol::Udp, src, src, data).is_ok();
                    self.counters.inc(if known_kind {
                        Counter::DropUnknownSource
                    } else {
                        Counter::DropMalformed
                    });
                    return;
                }
            },
        };
        let Some(&local) = self.cfg.announced.get(sock) else {
            return;
        };
        let Ok(receive) = Receive::new(Protocol::Udp, src, local, data) else {
            self.counters.inc(Counter::DropMalformed);
            return;
        };
        let peer = &mut self.peers[key];
        peer.last_recv = now;
        if let Err(e) = peer.rtc.handle_input(Input::Receive(now, receive)) {
            self.counters.inc(Counter::DropDecrypt);
            tracing::debug!(shard = self.id, session = %peer.session, error = %e, "input rejected");
        }
        self.drain(key, now);
    }

    /// Poll a peer until it has nothing more to say (str0m's contract after every mutation).
    fn drain(&mut self, key: usize, now: Instant) {
        loop {
            let Some(peer) = self.peers.get_mut(key) else {
                return;
            };
            let out = match peer.rtc.poll_output() {
                Ok(out) => out,
                Err(e) => {
                    tracing::info!(shard = self.id, session = %peer.session, error = %e, "peer failed");
                    self.close_peer(key, CloseReason::Error);
                    return;
                }
            };
            match out {
                Output::Timeout(at) => {
                    if peer.deadline != Some(at) {
                        peer.deadline = Some(at);
                        self.timers.schedule(at, key);
                    }
                    if !peer.rtc.is_alive() {
                        self.close_peer(key, CloseReason::Disconnected);
                    }
                    return;
                }
                Output::Transmit(t) => {
                    let sock = socket_of(&self.cfg.announced, t.source);
                    self.pending_tx
                        .push((sock, t.destination, t.contents.into()));
                }
                Output::Event(e) => self.handle_event(key, e, now),
            }
        }
    }

    fn handle_event(&mut self, key: usize, event: Event, now: Instant) {
        match event {
            Event::Connected => {
                let peer = &mut self.peers[key];
                peer.connected = true;
                self.counters.inc(Counter::PeersConnected);
                self.counters
                    .observe_connect(now.saturating_duration_since(peer.created));
                let session = peer.session;
                if !peer.publisher {
                    for t in &peer.tracks {
                        if t.track.is_video() {
                            self.keyframe_needs.push((t.track, ANY_LAYER));
                        }
                    }
                }
                let _ = self.events.try_send(ShardEvent::Connected {
                    session,
                    shard: self.id,
                });
                tracing::debug!(shard = self.id, %session, "peer connected");
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.close_peer(key, CloseReason::Disconnected);
            }
            Event::RtpPacket(pkt) => self.on_rtp(key, pkt, now),
            Event::StreamPaused(p) => {
                let peer = &mut self.peers[key];
                if let (Some(t), Some(rid)) =
                    (peer.tracks.iter_mut().find(|t| t.mid == p.mid), p.rid)
                {
                    if let Some(sim) = t.sim.as_mut() {
                        sim.set_paused(rid, p.paused);
                    }
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                self.on_estimate(key, estimate.as_u64(), now);
            }
            e @ (Event::ChannelOpen(..) | Event::ChannelData(_) | Event::PeerStats(_)) => {
                self.handle_room_event(key, e, now)
            }
            Event::MediaEgressStats(stats) => {
                let fresh = self.peers[key].nacks_since_last(stats.mid, stats.nacks);
                self.counters.add(Counter::Nacks, fresh);
            }
            Event::KeyframeRequest(req) => {
                let peer = &self.peers[key];
                if let Some(t) = peer.tracks.iter().find(|t| t.mid == req.mid) {
                    self.counters.inc(match req.kind {
                        KeyframeRequestKind::Fir => Counter::KeyframeInFir,
                        _ => Counter::KeyframeInPli,
                    });
                    // Simulcast: the layer this subscriber gets.
                    let layer = t
                        .sub
                        .as_ref()
                        .and_then(|s| s.layers.as_ref())
                        .and_then(|l| l.selector.current())
                        .map_or(ANY_LAYER, |l| l as u8);
                    self.keyframe_needs.push((t.track, layer));
                }
            }
            _ => {}
        }
    }

    fn on_rtp(&mut self, key: usize, pkt: str0m::rtp::RtpPacket, now: Instant) {
        self.counters.inc(Counter::RtpIn);
        let peer = &mut self.peers[key];
        if !peer.publisher {
            return;
        }
        let ssrc = pkt.header.ssrc;
        let Some((ti, raw)) = peer.track_for_ssrc(ssrc) else {
            return;
        };
        let track = peer.tracks[ti].track;
        if !track.is_video() {
            self.observe_audio_level(key, track, pkt.header.ext_vals.audio_level, now);
        }
        let Some(ts) = self.tracks.get(&track) else {
            return;
        };
        let pt = *pkt.header.payload_type;
        let codec = ts.codec_of(pt);
        let keyframe = track.is_video() && is_keyframe(codec, &pkt.payload);
        let (layer, layers) = match self.peers[key].tracks[ti].sim.as_mut() {
            Some(sim) => {
                let size = if keyframe && codec == CodecKind::Vp8 {
                    vp8_keyframe_size(&pkt.payload)
                } else {
                    None
                };
                (
                    sim.on_packet(raw, pkt.payload.len(), size, now),
                    sim.count(),
                )
            }
            None => (0, 1),
        };
        let view = PacketView {
            track,
            pt,
            ssrc: *ssrc,
            seq: pkt.header.sequence_number,
            timestamp: pkt.header.timestamp,
            marker: pkt.header.marker,
            keyframe,
            layer,
            layers,
            arrival: pkt.timestamp,
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            payload: pkt.payload,
        };
        let packet = self.pool.take(view);
        let mut remote = ts.remote_shards;
        while remote != 0 {
            let shard = remote.trailing_zeros() as usize;
            remote &= remote - 1;
            if let Some(out) = self.mesh.outboxes.get_mut(shard) {
                out.push(MeshMsg::Media(packet.clone()));
            }
        }
        self.deliver_local(&packet, now);
    }

    fn deliver_local(&mut self, packet: &MediaPacket, now: Instant) {
        let Some(ts) = self.tracks.get(&packet.track) else {
            return;
        };
        let mut subs = std::mem::take(&mut self.scratch_subs);
        subs.clear();
        subs.extend_from_slice(&ts.local_subs);
        let table = ts.layers.clone();
        let vp8 = packet.layers > 1 && ts.codec_of(packet.pt) == CodecKind::Vp8;
        for &(key, ti) in &subs {
            self.forward(key, ti, packet, table.as_deref(), vp8, now);
        }
        self.scratch_subs = subs;
    }

    fn forward(
        &mut self,
        key: usize,
        ti: usize,
        packet: &MediaPacket,
        table: Option<&LayerTable>,
        vp8: bool,
        now: Instant,
    ) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        if !peer.connected {
            return;
        }
        let result = peer.forward(ti, packet, table, vp8, now);
        if packet.layers > 1 {
            self.poll_selector(key, ti, now);
        }
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        match result {
            peer::Forwarded::Sent => {
                self.counters.inc(Counter::RtpForwarded);
                peer.written_arrivals.push(packet.arrival);
                if !peer.written {
                    peer.written = true;
                    self.written.push(key);
                }
            }
            peer::Forwarded::NoCodec => self.counters.inc(Counter::DropNoCodec),
            peer::Forwarded::OtherLayer => {}
            peer::Forwarded::Dropped { wants_keyframe } => {
                self.counters.inc(Counter::DropForwarder);
                if wants_keyframe {
                    let sub = peer.tracks[ti].sub.as_mut().expect("subscriber track");
                    let due = sub
                        .last_keyframe_ask
                        .is_none_or(|t| now >= t + SUBSCRIBER_KEYFRAME_RETRY);
                    if due {
                        sub.last_keyframe_ask = Some(now);
                        let layer = if packet.layers > 1 {
                            packet.layer
                        } else {
                            ANY_LAYER
                        };
                        self.keyframe_needs.push((packet.track, layer));
                    }
                }
            }
            peer::Forwarded::Skipped => {}
        }
    }

    /// Send what this turn's forwarding wrote into each subscriber's `Rtc`, for at most `max`
    /// more subscribers; true while some are left. str0m's pacer only sees newly queued
    /// packets on a timeout, so one `handle_timeout` per subscriber per turn, then one drain,
    /// sends everything it was given (a keyframe burst from a whole receive batch), instead of
    /// a timer pop, a timeout and a drain per packet.
    fn send_written(&mut self, now: Instant, max: usize) -> bool {
        // By index, not over a taken list: a subscriber that a drain below gives packets is
        // appended and served in a later chunk instead of being lost with its `written` mark set.
        let end = self.written.len().min(self.written_sent + max);
        // What the next packet is protected into: a recycled buffer, taken when the last one
        // went out with its packet.
        let mut buf = Vec::new();
        for i in self.written_sent..end {
            let key = self.written[i];
            let Some(peer) = self.peers.get_mut(key) else {
                continue;
            };
            if !peer.written {
                continue; // closed, and the key reused this turn
            }
            peer.written = false;
            self.forwarded_arrivals.append(&mut peer.written_arrivals);
            // Each packet is protected at once where str0m allows it (no pacer, nothing queued
            // before it); the rest are queued, and a timeout and a drain send them. A subscriber
            // with a pacer had its packets queued as they were forwarded (`Peer::forward`).
            let mut queued = peer.rtc.has_bwe();
            for (mid, write) in peer.writes.drain(..) {
                if buf.capacity() == 0 {
                    buf = self.tx_buffers.take();
                }
                match peer.rtc.send_rtp_now(mid, write, now, &mut buf) {
                    Ok(Some(t)) => {
                        let sock = socket_of(&self.cfg.announced, t.source);
                        self.pending_tx
                            .push((sock, t.destination, t.contents.into()));
                    }
                    Ok(None) => self.counters.inc(Counter::DropNoCodec),
                    Err(write) => {
                        if let Some(tx) = peer.rtc.direct_api().stream_tx_by_mid(mid, None) {
                            tx.write_rtp(write);
                            queued = true;
                        }
                    }
                }
            }
            if queued {
                if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(shard = self.id, error = %e, "timeout input failed");
                }
                self.drain(key, now);
            }
        }
        self.tx_buffers.give(buf);
        self.written_sent = end;
        if end < self.written.len() {
            return true;
        }
        self.written.clear();
        self.written_sent = 0;
        false
    }

    fn handle_mesh(&mut self, now: Instant) {
        for from in 0..self.mesh.inboxes.len() {
            // Bounded per turn, so one busy neighbour cannot starve our sockets.
            for _ in 0..8192 {
                let Some(msg) = self.mesh.inboxes[from].pop() else {
                    break;
                };
                match msg {
                    MeshMsg::Media(p) => self.deliver_local(&p, now),
                    MeshMsg::KeyframeRequest(track, layer) => {
                        self.request_keyframe(track, layer, now, false)
                    }
                    MeshMsg::Layers(track, table) => self.apply_layers(track, table, now),
                }
            }
        }
    }

    fn route_keyframe_needs(&mut self, now: Instant) {
        while let Some((track, layer)) = self.keyframe_needs.pop() {
            self.request_keyframe(track, layer, now, true);
        }
    }

    /// Route a keyframe need to the publisher's shard, or throttle (per layer) and send it if
    /// that is us.
    fn request_keyframe(&mut self, track: TrackId, layer: u8, now: Instant, may_forward: bool) {
        let Some(ts) = self.tracks.get(&track) else {
            return;
        };
        match ts.publisher_shard {
            Some(s) if s == self.id => {
                let count = self.layer_count(track);
                let wanted = if layer == ANY_LAYER {
                    0..count
                } else {
                    layer..(layer + 1).min(count)
                };
                for l in wanted {
                    let Some(ts) = self.tracks.get_mut(&track) else {
                        return;
                    };
                    if ts.throttles[usize::from(l)].request(now) {
                        self.send_pli(track, l, now);
                    } else {
                        ts.keyframe_pending |= 1 << l;
                    }
                }
            }
            Some(s) if may_forward => {
                if let Some(out) = self.mesh.outboxes.get_mut(s) {
                    out.push(MeshMsg::KeyframeRequest(track, layer));
                }
            }
            _ => {}
        }
    }

    /// How many simulcast layers the local publisher of `track` sends (1 without simulcast).
    fn layer_count(&self, track: TrackId) -> u8 {
        self.tracks
            .get(&track)
            .and_then(|t| t.local_publisher)
            .and_then(|(key, mid)| self.peers.get(key)?.tracks.iter().find(|t| t.mid == mid))
            .and_then(|t| t.sim.as_ref())
            .map_or(1, |sim| sim.count())
    }

    fn send_pli(&mut self, track: TrackId, layer: u8, now: Instant) {
        let Some((key, mid)) = self.tracks.get(&track).and_then(|t| t.local_publisher) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let rid = match peer
            .tracks
            .iter()
            .find(|t| t.mid == mid)
            .and_then(|t| t.sim.as_ref())
        {
            Some(sim) => match sim.rid_of_rank(layer) {
                Some(rid) => Some(rid),
                None => return,
            },
            None => None,
        };
        let mut api = peer.rtc.direct_api();
        let mut sent = false;
        if let Some(rx) = api.stream_rx_by_mid(mid, rid) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            sent = true;
        }
        if sent {
            self.counters.inc(Counter::KeyframeOutPli);
            self.drain(key, now);
        }
    }

    fn handle_timers(&mut self, now: Instant) {
        while let Some((at, key)) = self.timers.pop_due(now) {
            let due = self.peers.get(key).is_some_and(|p| p.deadline == Some(at));
            if due {
                let peer = &mut self.peers[key];
                peer.deadline = None;
                if let Err(e) = peer.rtc.handle_input(Input::Timeout(now)) {
                    tracing::debug!(shard = self.id, error = %e, "timeout input failed");
                }
                self.drain(key, now);
            }
        }
        // Throttled keyframe requests that are now due.
        let mut due = Vec::new();
        for (track, ts) in self.tracks.iter_mut() {
            let mut pending = ts.keyframe_pending;
            while pending != 0 {
                let l = pending.trailing_zeros() as u8;
                pending &= pending - 1;
                if ts.throttles[usize::from(l)].poll(now) {
                    ts.keyframe_pending &= !(1 << l);
                    due.push((*track, l));
                }
            }
        }
        for (track, layer) in due {
            self.send_pli(track, layer, now);
        }
        if now >= self.next_layers_tick {
            self.next_layers_tick = now + LAYERS_INTERVAL;
            self.layers_tick(now);
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.sweep(now);
        }
    }

    /// Once a second: each local simulcast publisher's layer table goes to every shard with
    /// subscribers of it (this one included); each subscriber's bandwidth estimate and layer
    /// are sampled for the metrics.
    fn layers_tick(&mut self, now: Instant) {
        let mut tables = Vec::new();
        for (_, peer) in self.peers.iter_mut().filter(|(_, p)| p.publisher) {
            for t in &mut peer.tracks {
                if let Some(sim) = t.sim.as_mut() {
                    let (table, reranked) = sim.tick(now);
                    if reranked {
                        let rids: Vec<_> = (0..sim.count())
                            .filter_map(|r| sim.rid_of_rank(r))
                            .map(|r| r.to_string())
                            .collect();
                        tracing::info!(shard = self.id, session = %peer.session, track = t.track.0, low_to_high = ?rids, "simulcast layers ranked");
                    }
                    tables.push((t.track, Arc::new(table)));
                }
            }
        }
        for (track, table) in tables {
            let mut remote = self.tracks.get(&track).map_or(0, |t| t.remote_shards);
            while remote != 0 {
                let shard = remote.trailing_zeros() as usize;
                remote &= remote - 1;
                if let Some(out) = self.mesh.outboxes.get_mut(shard) {
                    out.push(MeshMsg::Layers(track, table.clone()));
                }
            }
            self.apply_layers(track, table, now);
        }
        self.probe_for_more(now);
        let mut layers = [0u64; MAX_LAYERS + 1];
        for (_, peer) in self
            .peers
            .iter()
            .filter(|(_, p)| !p.publisher && p.connected)
        {
            if let Some(bps) = peer.bwe {
                self.counters.observe_bwe(bps);
            }
            for l in peer
                .tracks
                .iter()
                .filter_map(|t| t.sub.as_ref()?.layers.as_ref())
            {
                layers[l.selector.current().unwrap_or(MAX_LAYERS).min(MAX_LAYERS)] += 1;
            }
        }
        self.counters.simulcast_layers = layers;
    }

    /// Subscribers held below the layer they may have (or paused) ask their estimator for a probe
    /// every 2 s (a dip of one tick, then `PROBE_EVERY`): str0m probes when the desired bitrate
    /// rises above the estimate, so the desired bitrate dips for one tick and comes back. Without this the estimate, once
    /// down, would only creep up, and a recovered link would take long to show.
    fn probe_for_more(&mut self, now: Instant) {
        let mut touched = Vec::new();
        for (key, peer) in self.peers.iter_mut() {
            let (minimum, desired) = peer.bwe_targets;
            if peer.publisher || !peer.connected || desired == 0 {
                continue;
            }
            let wants_more = peer.tracks.iter().any(|t| {
                t.sub
                    .as_ref()
                    .and_then(|s| s.layers.as_ref())
                    .is_some_and(|l| {
                        let sel = &l.selector;
                        sel.paused() || sel.target() < sel.max()
                    })
            });
            let short = wants_more && peer.bwe.is_none_or(|e| e < desired);
            if peer.probe_dip {
                // Back from the dip: str0m sees the desired bitrate rise, and probes.
                peer.probe_dip = false;
                peer.next_probe = now + PROBE_EVERY;
                peer.rtc
                    .bwe()
                    .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(desired));
                touched.push(key);
            } else if short && now >= peer.next_probe {
                if let Some((floor, dip)) = probe_dip(minimum, desired) {
                    peer.probe_dip = true;
                    peer.rtc
                        .bwe()
                        .set_bitrate(Bitrate::bps(floor), Bitrate::bps(dip));
                    touched.push(key);
                }
            }
        }
        for key in touched {
            self.drain(key, now);
        }
    }

    /// A simulcast track's layer table from its publisher's shard.
    fn apply_layers(&mut self, track: TrackId, table: Arc<LayerTable>, now: Instant) {
        let Some(ts) = self.tracks.get_mut(&track) else {
            return;
        };
        ts.layers = Some(table.clone());
        let mut subs = std::mem::take(&mut self.scratch_subs);
        subs.clear();
        subs.extend_from_slice(&ts.local_subs);
        for &(key, ti) in &subs {
            let layers = self
                .peers
                .get_mut(key)
                .and_then(|p| p.tracks.get_mut(ti))
                .and_then(|t| t.sub.as_mut())
                .and_then(|s| s.layers.as_mut());
            if let Some(l) = layers {
                l.update(&table, now);
                self.poll_selector(key, ti, now);
            }
        }
        self.scratch_subs = subs;
    }

    /// A subscriber's new egress bandwidth estimate: shared among its simulcast video tracks.
    fn on_estimate(&mut self, key: usize, bps: u64, now: Instant) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        peer.bwe = Some(bps);
        let selectors = peer
            .tracks
            .iter()
            .filter(|t| t.sub.as_ref().is_some_and(|s| s.layers.is_some()))
            .count() as u64;
        if selectors == 0 {
            return;
        }
        for ti in 0..peer.tracks.len() {
            let layers = peer.tracks[ti].sub.as_mut().and_then(|s| s.layers.as_mut());
            if let Some(l) = layers {
                l.selector.estimate(bps / selectors, now);
            }
        }
        for ti in 0..self.peers[key].tracks.len() {
            self.poll_selector(key, ti, now);
        }
        self.update_bwe_targets(key, now);
    }

    /// Act on what a subscriber's layer selector for track `ti` has to say: a keyframe request
    /// for the layer it waits for, and the switches it made (logged and counted).
    fn poll_selector(&mut self, key: usize, ti: usize, now: Instant) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let session = peer.session;
        let Some(t) = peer.tracks.get_mut(ti) else {
            return;
        };
        let track = t.track;
        let Some(l) = t.sub.as_mut().and_then(|s| s.layers.as_mut()) else {
            return;
        };
        if let Some(layer) = l.selector.poll_keyframe_request(now) {
            self.keyframe_needs.push((track, layer as u8));
        }
        let mut switched = false;
        while let Some(e) = l.selector.poll_event() {
            switched = true;
            self.counters.inc(switch_counter(e.reason));
            tracing::info!(
                shard = self.id,
                %session,
                track = track.0,
                from = ?e.from,
                to = ?e.to,
                reason = ?e.reason,
                estimate_bps = ?peer.bwe,
                "simulcast layer switch"
            );
        }
        if switched {
            self.update_bwe_targets(key, now);
        }
    }

    /// A subscriber's own cap on the simulcast layer of `track` changed.
    fn set_layer_cap(&mut self, key: usize, track: TrackId, max: MaxLayer, now: Instant) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let mut changed = Vec::new();
        for (ti, t) in peer.tracks.iter_mut().enumerate() {
            if t.track != track {
                continue;
            }
            if let Some(sub) = t.sub.as_mut() {
                sub.max = max;
                if let Some(l) = sub.layers.as_mut() {
                    l.selector.set_max(max, now);
                }
                changed.push(ti);
            }
        }
        for ti in changed {
            self.poll_selector(key, ti, now);
        }
        self.update_bwe_targets(key, now);
    }

    /// Aim the subscriber's bandwidth estimator at its next layer up (padding and probes show
    /// whether it fits) and at the best layer it may get.
    fn update_bwe_targets(&mut self, key: usize, now: Instant) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let (mut minimum, mut desired) = (0u64, 0u64);
        for t in &peer.tracks {
            let targets = t
                .sub
                .as_ref()
                .and_then(|s| s.layers.as_ref())
                .and_then(|l| l.selector.bwe_targets());
            if let Some(b) = targets {
                minimum += b.minimum_bps;
                desired += b.desired_bps;
            }
        }
        if desired == 0 || peer.bwe_targets == (minimum, desired) {
            return;
        }
        peer.bwe_targets = (minimum, desired);
        peer.rtc
            .bwe()
            .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(desired));
        self.drain(key, now);
    }

    /// Liveness: remove peers that never connected, or went silent.
    fn sweep(&mut self, now: Instant) {
        let mut dead = Vec::new();
        for (key, p) in self.peers.iter() {
            if !p.connected && now >= p.created + self.cfg.connect_timeout {
                dead.push((key, CloseReason::ConnectTimeout));
            } else if p.connected && now >= p.last_recv + self.cfg.ice_timeout {
                dead.push((key, CloseReason::IceTimeout));
            }
        }
        for (key, reason) in dead {
            self.close_peer(key, reason);
        }
        if self.timers.len() > 4 * self.peers.len() + 1024 {
            let peers = &self.peers;
            self.timers
                .compact(|at, key| peers.get(key).is_some_and(|p| p.deadline == Some(at)));
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut next = self
            .next_sweep
            .min(self.next_publish)
            .min(self.next_layers_tick);
        if let Some(t) = self.timers.peek() {
            next = next.min(t);
        }
        for ts in self.tracks.values() {
            let mut pending = ts.keyframe_pending;
            while pending != 0 {
                let l = pending.trailing_zeros() as usize;
                pending &= pending - 1;
                if let Some(t) = ts.throttles[l].next_due() {
                    next = next.min(t);
                }
            }
        }
        next
    }

    fn close_peer(&mut self, key: usize, reason: CloseReason) {
        let Some(mut peer) = self.peers.try_remove(key) else {
            return;
        };
        self.counters.inc(match reason {
            CloseReason::Deleted => Counter::RemovedDeleted,
            CloseReason::ConnectTimeout => Counter::RemovedConnectTimeout,
            CloseReason::IceTimeout => Counter::RemovedIceTimeout,
            CloseReason::Disconnected => Counter::RemovedDisconnected,
            CloseReason::Error => Counter::RemovedError,
            CloseReason::Shutdown => Counter::RemovedShutdown,
        });
        peer.rtc.disconnect();
        self.forget_room_peer(key);
        for src in &peer.sources {
            self.by_source.remove(src);
        }
        self.by_ufrag.remove(&peer.ufrag[..]);
        self.by_session.remove(&peer.session);
        for t in &peer.tracks {
            if let Some(ts) = self.tracks.get_mut(&t.track) {
                ts.local_subs.retain(|&(k, _)| k != key);
                if ts.local_publisher.is_some_and(|(k, _)| k == key) {
                    ts.local_publisher = None;
                }
            }
            self.forget_if_unused(t.track);
        }
        tracing::debug!(shard = self.id, session = %peer.session, reason = reason.as_str(), "peer closed");
        let _ = self.events.try_send(ShardEvent::Closed {
            session: peer.session,
            reason,
        });
    }

    fn shutdown(&mut self, _now: Instant) {
        let keys: Vec<usize> = self.peers.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close_peer(key, CloseReason::Shutdown);
        }
    }
}

/// The socket whose announced address str0m sends from (the first when it is not ours).
fn socket_of(announced: &[SocketAddr], source: SocketAddr) -> usize {
    announced.iter().position(|a| *a == source).unwrap_or(0)
}

fn switch_counter(reason: SwitchReason) -> Counter {
    match reason {
        SwitchReason::Start => Counter::SwitchStart,
        SwitchReason::Estimate => Counter::SwitchEstimate,
        SwitchReason::Cap => Counter::SwitchCap,
        SwitchReason::LayerDied => Counter::SwitchLayerDied,
        SwitchReason::LayerBack => Counter::SwitchLayerBack,
        SwitchReason::Pause => Counter::SwitchPause,
        SwitchReason::Resume => Counter::SwitchResume,
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<ShardCommand>();
    is_send::<PeerTrack>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_dip_goes_under_the_padding_floor_when_it_must() {
        // One layer under the top: the next layer up is the goal, floor and desired are equal.
        assert_eq!(probe_dip(900_000, 900_000), Some((890_000, 890_000)));
        // Further down, the floor (the next layer up) stays under the dip.
        assert_eq!(probe_dip(467_000, 1_262_000), Some((467_000, 1_252_000)));
        assert_eq!(probe_dip(0, PROBE_DIP_BPS), None);
        assert_eq!(probe_dip(0, 0), None);
    }
}
