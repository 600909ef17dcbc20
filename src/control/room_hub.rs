//! Rooms wired to the world: the sans-IO [`Rooms`] state machine, each participant's socket and
//! two peer connections, and the execution of every [`Action`] against the shards (negotiation,
//! track routing, data-channel relay). Lives on the control thread behind `Control::rooms`; it
//! never touches a media socket. Lock order: `rooms` before `registry`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use str0m::format::PayloadParams;
use str0m::media::Mid;
use str0m::Candidate;
use tokio::sync::mpsc;

use super::negotiate::NegotiatedMedia;
use super::placement::shard_for;
use super::registry::RouteUpdate;
use super::rooms::{
    Action, JoinRefusal, JoinRequest, Kind, LeaveReason, NegotiatedTrack, ParticipantId,
    ParticipantKind, PcKind, RoomConfig, Rooms, ServerMessage, TrackId as RoomTrackId,
};
use super::SharedControl;
use crate::mesh::TrackId;
use crate::sfu::MaxLayer;
use crate::shard::rooms::RoomCommand;
use crate::shard::{CloseReason, NewPeer, ShardCommand};
use crate::{SessionId, ShardId};

/// How long a shard may take to answer a negotiation command.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued towards one socket before further ones are dropped (a stalled client).
pub const SOCKET_QUEUE: usize = 512;

/// What the hub tells a socket task.
#[derive(Debug)]
pub enum Outbound {
    Text(Arc<str>),
    /// Send a close frame with this code and reason, then end.
    Close(u16, String),
}

/// One of a participant's peer connections: chosen at join, created on first use.
#[derive(Debug, Clone, Copy)]
struct Pc {
    session: SessionId,
    shard: ShardId,
    created: bool,
}

impl Pc {
    fn new(shards: usize) -> Pc {
        let session = SessionId::random();
        Pc {
            session,
            shard: shard_for(session, shards),
            created: false,
        }
    }
}

struct Member {
    kind: ParticipantKind,
    socket: Option<mpsc::Sender<Outbound>>,
    publish: Pc,
    subscribe: Pc,
    publish_media: NegotiatedMedia,
    subscribed: HashSet<TrackId>,
}

/// A room track the data plane routes: its publisher and codecs (for WHEP `room~identity`).
struct RoomTrack {
    codecs: Arc<[PayloadParams]>,
}

/// Room metrics, in their own registry, appended to the scrape.
pub struct RoomMetrics {
    registry: Registry,
    pub rooms: IntGauge,
    pub participants: IntGauge,
    /// Messages received on `/ws`, by type and result (`ok` or the error code).
    pub messages: IntCounterVec,
    /// Joins by result: `ok` or the refusal code.
    pub joins: IntCounterVec,
    pub data_messages: IntCounter,
    pub data_bytes: IntCounter,
    /// Messages not delivered, by reason.
    pub dropped: IntCounterVec,
    /// Sockets closed by the server, by reason.
    pub closes: IntCounterVec,
}

impl RoomMetrics {
    fn new() -> RoomMetrics {
        let registry = Registry::new();
        let rooms = IntGauge::new("sluice_rooms", "Rooms with at least one participant.")
            .expect("valid metric");
        let participants = IntGauge::new(
            "sluice_room_participants",
            "Participants in all rooms (/ws clients and WHIP publishers).",
        )
        .expect("valid metric");
        let messages = IntCounterVec::new(
            Opts::new(
                "sluice_room_ws_messages_total",
                "WebSocket messages received on /ws, by type (or invalid) and result (ok or the error code).",
            ),
            &["type", "result"],
        )
        .expect("valid metric");
        let joins = IntCounterVec::new(
            Opts::new(
                "sluice_room_joins_total",
                "Room joins by result: ok, or the refusal (room_full, bad_name, identity_taken, unauthorized, forbidden, unavailable, join_timeout).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let data_messages = IntCounter::new(
            "sluice_room_data_messages_total",
            "Data-channel messages relayed to room participants (one per recipient).",
        )
        .expect("valid metric");
        let data_bytes = IntCounter::new(
            "sluice_room_data_bytes_total",
            "Bytes of data-channel messages relayed to room participants.",
        )
        .expect("valid metric");
        let dropped = IntCounterVec::new(
            Opts::new(
                "sluice_room_dropped_total",
                "Room messages not delivered, by reason: socket_queue_full, shard_queue_full.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let closes = IntCounterVec::new(
            Opts::new(
                "sluice_room_ws_closed_total",
                "/ws sockets closed by the server, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in ["ok", "room_full", "unauthorized", "forbidden", "bad_name"] {
            joins.with_label_values(&[r]);
        }
        for r in ["socket_queue_full", "shard_queue_full"] {
            dropped.with_label_values(&[r]);
        }
        messages.with_label_values(&["invalid", "bad_message"]);
        for c in [
            Box::new(rooms.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(participants.clone()),
            Box::new(messages.clone()),
            Box::new(joins.clone()),
            Box::new(data_messages.clone()),
            Box::new(data_bytes.clone()),
            Box::new(dropped.clone()),
            Box::new(closes.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        RoomMetrics {
            registry,
            rooms,
            participants,
            messages,
            joins,
            data_messages,
            data_bytes,
            dropped,
            closes,
        }
    }

    /// Prometheus text of the room metrics.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        );
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Every room, socket and room peer connection of the process.
pub struct RoomHub {
    pub rooms: Rooms,
    members: HashMap<ParticipantId, Member>,
    by_session: HashMap<SessionId, (ParticipantId, PcKind)>,
    tracks: HashMap<TrackId, RoomTrack>,
    pub metrics: RoomMetrics,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mesh(track: RoomTrackId) -> TrackId {
    TrackId(track.0)
}

impl RoomHub {
    pub fn new(config: RoomConfig) -> RoomHub {
        RoomHub {
            rooms: Rooms::new(config),
            members: HashMap::new(),
            by_session: HashMap::new(),
            tracks: HashMap::new(),
            metrics: RoomMetrics::new(),
        }
    }

    fn gauges(&self) {
        self.metrics.rooms.set(self.rooms.len() as i64);
        self.metrics
            .participants
            .set(self.rooms.participant_count() as i64);
    }

    /// A `/ws` client joins; its socket gets `joined` (and everything after) through `socket`.
    pub fn join_websocket(
        &mut self,
        c: &SharedControl,
        request: JoinRequest,
        socket: mpsc::Sender<Outbound>,
    ) -> Result<ParticipantId, JoinRefusal> {
        let now = Instant::now();
        let joined = self.rooms.join(request, now)?;
        let shards = c.shards.len();
        self.members.insert(
            joined.participant,
            Member {
                kind: ParticipantKind::Websocket,
                socket: Some(socket),
                publish: Pc::new(shards),
                subscribe: Pc::new(shards),
                publish_media: Vec::new(),
                subscribed: HashSet::new(),
            },
        );
        let m = &self.members[&joined.participant];
        self.by_session
            .insert(m.publish.session, (joined.participant, PcKind::Publish));
        self.by_session
            .insert(m.subscribe.session, (joined.participant, PcKind::Subscribe));
        self.metrics.joins.with_label_values(&["ok"]).inc();
        self.execute(c, joined.actions, now);
        Ok(joined.participant)
    }

    /// A WHIP publisher of `stream` (already routed by the registry) enters the room of that
    /// name with its tracks: `(mid, track, codecs)`.
    pub fn join_whip(
        &mut self,
        c: &SharedControl,
        stream: &str,
        identity: Option<String>,
        session: SessionId,
        shard: ShardId,
        tracks: Vec<(Mid, TrackId, Arc<[PayloadParams]>)>,
    ) -> Result<ParticipantId, JoinRefusal> {
        let now = Instant::now();
        let joined = self
            .rooms
            .join(JoinRequest::whip(stream, identity, unix_ms()), now)?;
        let id = joined.participant;
        self.members.insert(
            id,
            Member {
                kind: ParticipantKind::Whip,
                socket: None,
                publish: Pc {
                    session,
                    shard,
                    created: true,
                },
                subscribe: Pc::new(c.shards.len()),
                publish_media: Vec::new(),
                subscribed: HashSet::new(),
            },
        );
        self.by_session.insert(session, (id, PcKind::Publish));
        self.metrics.joins.with_label_values(&["ok"]).inc();
        self.execute(c, joined.actions, now);
        let negotiated = tracks
            .into_iter()
            .map(|(mid, track, codecs)| {
                self.tracks.insert(track, RoomTrack { codecs });
                NegotiatedTrack {
                    mid: mid.to_string(),
                    kind: if track.is_video() {
                        Kind::Video
                    } else {
                        Kind::Audio
                    },
                    id: Some(RoomTrackId(track.0)),
                }
            })
            .collect();
        let actions = self.rooms.whip_published(id, negotiated, now);
        self.execute(c, actions, now);
        Ok(id)
    }

    /// A peer connection closed on its shard (or a WHIP session was deleted): its participant
    /// leaves.
    pub fn session_closed(&mut self, c: &SharedControl, session: SessionId) {
        let Some(&(id, pc)) = self.by_session.get(&session) else {
            return;
        };
        let now = Instant::now();
        let actions = match self.members.get(&id).map(|m| m.kind) {
            Some(ParticipantKind::Whip) => self.rooms.leave(id, LeaveReason::Left, now),
            _ => self.rooms.peer_closed(id, pc, now),
        };
        self.execute(c, actions, now);
    }

    pub fn session_connected(&mut self, c: &SharedControl, session: SessionId) {
        if let Some(&(id, pc)) = self.by_session.get(&session) {
            let now = Instant::now();
            let actions = self.rooms.peer_connected(id, pc, now);
            self.execute(c, actions, now);
        }
    }

    pub fn channel_data(
        &mut self,
        c: &SharedControl,
        session: SessionId,
        binary: bool,
        data: &[u8],
    ) {
        if let Some(&(id, _)) = self.by_session.get(&session) {
            let now = Instant::now();
            let actions = self.rooms.data(id, binary, data, now);
            self.execute(c, actions, now);
        }
    }

    pub fn audio_level(&mut self, c: &SharedControl, session: SessionId, dbov: u8) {
        if let Some(&(id, _)) = self.by_session.get(&session) {
            let now = Instant::now();
            let actions = self.rooms.audio_level(id, dbov, now);
            self.execute(c, actions, now);
        }
    }

    pub fn link_stats(&mut self, c: &SharedControl, session: SessionId, loss: f32, rtt_ms: u32) {
        if let Some(&(id, _)) = self.by_session.get(&session) {
            let now = Instant::now();
            let actions = self.rooms.link_stats(id, loss, rtt_ms, now);
            self.execute(c, actions, now);
        }
    }

    /// What WHEP `room~identity` plays: its tracks with their codecs.
    pub fn watch(
        &self,
        room: &str,
        identity: &str,
        screen: bool,
    ) -> Option<Vec<(TrackId, Arc<[PayloadParams]>)>> {
        let target = self.rooms.watch(room, identity, screen).ok()?;
        let tracks: Vec<_> = [target.audio, target.video]
            .into_iter()
            .flatten()
            .filter_map(|t| {
                let t = mesh(t);
                Some((t, self.tracks.get(&t)?.codecs.clone()))
            })
            .collect();
        (!tracks.is_empty()).then_some(tracks)
    }

    /// Carry out `actions` in order. Negotiations that need a shard's reply continue in a task
    /// that feeds the result back into the rooms.
    pub fn execute(&mut self, c: &SharedControl, actions: Vec<Action>, now: Instant) {
        for action in actions {
            self.execute_one(c, action, now);
        }
        self.gauges();
    }

    fn to_shard(&self, c: &SharedControl, shard: ShardId, cmd: ShardCommand) {
        if c.shards[shard].send(cmd).is_err() {
            self.metrics
                .dropped
                .with_label_values(&["shard_queue_full"])
                .inc();
            tracing::warn!(shard, "shard command queue full: a room command was lost");
        }
    }

    fn route(&self, c: &SharedControl, updates: Vec<RouteUpdate>) {
        if !updates.is_empty() {
            c.broadcast(updates);
        }
    }

    /// Send a shard the command `command` builds around a reply channel, and once the shard
    /// replies, or has not within [`SHARD_REPLY_TIMEOUT`] (`None`), run `then` on the hub
    /// under its lock and execute the actions it returns.
    fn ask_shard<T: Send + 'static>(
        &self,
        c: &SharedControl,
        shard: ShardId,
        command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> ShardCommand,
        then: impl FnOnce(&mut RoomHub, Option<T>, Instant) -> Vec<Action> + Send + 'static,
    ) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.to_shard(c, shard, command(reply));
        let c = c.clone();
        tokio::spawn(async move {
            let reply = tokio::time::timeout(SHARD_REPLY_TIMEOUT, rx)
                .await
                .ok()
                .and_then(Result::ok);
            let mut hub = c.rooms.lock().expect("rooms");
            let now = Instant::now();
            let actions = then(&mut hub, reply, now);
            hub.execute(&c, actions, now);
        });
    }

    fn execute_one(&mut self, c: &SharedControl, action: Action, now: Instant) {
        match action {
            Action::Send { to, message } => self.send(&to, &message),
            Action::Publish {
                publisher,
                track,
                mid,
                kind: _,
            } => {
                let Some(m) = self.members.get(&publisher) else {
                    return;
                };
                if m.kind != ParticipantKind::Websocket {
                    return; // The registry routes WHIP tracks.
                }
                let mid = Mid::from(mid.as_str());
                let codecs: Arc<[PayloadParams]> = m
                    .publish_media
                    .iter()
                    .find(|(m, _, _)| *m == mid)
                    .map(|(_, _, c)| Arc::from(c.clone()))
                    .unwrap_or_else(|| Arc::from(Vec::new()));
                let (session, shard) = (m.publish.session, m.publish.shard);
                let track = mesh(track);
                self.tracks.insert(
                    track,
                    RoomTrack {
                        codecs: codecs.clone(),
                    },
                );
                self.to_shard(
                    c,
                    shard,
                    ShardCommand::Room(RoomCommand::PublishTrack {
                        session,
                        mid,
                        track,
                    }),
                );
                self.route(
                    c,
                    vec![RouteUpdate::Route {
                        track,
                        publisher: Some(shard),
                        codecs,
                    }],
                );
            }
            Action::Unpublish { publisher, track } => {
                let track = mesh(track);
                self.tracks.remove(&track);
                let Some(m) = self.members.get(&publisher) else {
                    return;
                };
                if m.kind != ParticipantKind::Websocket {
                    return;
                }
                self.to_shard(
                    c,
                    m.publish.shard,
                    ShardCommand::Room(RoomCommand::UnpublishTrack {
                        session: m.publish.session,
                        track,
                    }),
                );
                self.route(
                    c,
                    vec![RouteUpdate::Route {
                        track,
                        publisher: None,
                        codecs: Arc::from(Vec::new()),
                    }],
                );
            }
            Action::Subscribe { subscriber, track } => {
                let track = mesh(track);
                let Some(m) = self.members.get_mut(&subscriber) else {
                    return;
                };
                if m.subscribed.insert(track) {
                    let shard = m.subscribe.shard;
                    let update = c
                        .registry
                        .lock()
                        .expect("registry")
                        .add_interest(track, shard);
                    self.route(c, update.into_iter().collect());
                }
            }
            Action::LayerCap {
                subscriber,
                track,
                max,
            } => {
                let Some(m) = self.members.get(&subscriber) else {
                    return;
                };
                let pc = m.subscribe;
                if pc.created {
                    self.to_shard(
                        c,
                        pc.shard,
                        ShardCommand::Room(RoomCommand::LayerCap {
                            session: pc.session,
                            track: mesh(track),
                            max,
                        }),
                    );
                }
            }
            Action::Unsubscribe { subscriber, track } => {
                let track = mesh(track);
                let Some(m) = self.members.get_mut(&subscriber) else {
                    return;
                };
                if m.subscribed.remove(&track) {
                    let pc = m.subscribe;
                    if pc.created {
                        self.to_shard(
                            c,
                            pc.shard,
                            ShardCommand::Room(RoomCommand::Unsubscribe {
                                session: pc.session,
                                track,
                            }),
                        );
                    }
                    let update = c
                        .registry
                        .lock()
                        .expect("registry")
                        .remove_interest(track, pc.shard);
                    self.route(c, update.into_iter().collect());
                }
            }
            Action::Renegotiate {
                participant,
                tracks,
            } => self.renegotiate(c, participant, tracks, now),
            Action::NegotiatePublish {
                participant,
                sdp,
                tracks: _,
            } => self.negotiate_publish(c, participant, sdp, now),
            Action::ApplyAnswer { participant, sdp } => {
                let Some(pc) = self.members.get(&participant).map(|m| m.subscribe) else {
                    return;
                };
                let command = |reply| {
                    ShardCommand::Room(RoomCommand::SubscribeAnswer {
                        session: pc.session,
                        answer: sdp,
                        reply,
                    })
                };
                self.ask_shard(c, pc.shard, command, move |hub, reply, now| {
                    if let Some(Ok(())) = reply {
                        return Vec::new();
                    }
                    tracing::info!(%participant, ?reply, "subscribe answer refused");
                    hub.rooms.subscriber_failed(participant, now)
                });
            }
            Action::RemoteCandidate {
                participant,
                pc,
                candidate,
                mid: _,
            } => {
                let Some(m) = self.members.get(&participant) else {
                    return;
                };
                let pc = match pc {
                    PcKind::Publish => m.publish,
                    PcKind::Subscribe => m.subscribe,
                };
                let text = candidate.trim();
                let text = text.strip_prefix("a=").unwrap_or(text);
                let parsed = if text.starts_with("candidate:") {
                    Candidate::from_sdp_string(text)
                } else {
                    Candidate::from_sdp_string(&format!("candidate:{text}"))
                };
                // sluice is ICE-lite and learns addresses from the checks; an unusable candidate
                // (mDNS, TCP) is simply not needed.
                if let (Ok(candidate), true) = (parsed, pc.created) {
                    self.to_shard(
                        c,
                        pc.shard,
                        ShardCommand::RemoteCandidate {
                            session: pc.session,
                            candidate,
                        },
                    );
                }
            }
            Action::Data {
                from: _,
                to,
                binary,
                frame,
            } => {
                for id in to {
                    let Some(m) = self.members.get(&id) else {
                        continue;
                    };
                    if !m.subscribe.created {
                        continue;
                    }
                    self.metrics.data_messages.inc();
                    self.metrics.data_bytes.inc_by(frame.len() as u64);
                    self.to_shard(
                        c,
                        m.subscribe.shard,
                        ShardCommand::Room(RoomCommand::ChannelWrite {
                            session: m.subscribe.session,
                            binary,
                            frame: frame.clone(),
                        }),
                    );
                }
            }
            Action::Close {
                participant,
                reason,
            } => {
                let Some(m) = self.members.remove(&participant) else {
                    return;
                };
                self.by_session.remove(&m.publish.session);
                self.by_session.remove(&m.subscribe.session);
                let mut updates = Vec::new();
                {
                    let mut reg = c.registry.lock().expect("registry");
                    for &track in &m.subscribed {
                        updates.extend(reg.remove_interest(track, m.subscribe.shard));
                    }
                }
                self.route(c, updates);
                if let Some(socket) = &m.socket {
                    self.metrics
                        .closes
                        .with_label_values(&[reason.as_str()])
                        .inc();
                    let _ = socket.try_send(Outbound::Close(
                        reason.close_code(),
                        reason.as_str().to_owned(),
                    ));
                }
                if m.kind == ParticipantKind::Websocket {
                    let why = if reason == LeaveReason::ServerShutdown {
                        CloseReason::Shutdown
                    } else {
                        CloseReason::Deleted
                    };
                    for pc in [m.publish, m.subscribe] {
                        if pc.created {
                            self.to_shard(
                                c,
                                pc.shard,
                                ShardCommand::RemovePeer {
                                    session: pc.session,
                                    reason: why,
                                },
                            );
                        }
                    }
                }
                tracing::info!(%participant, reason = reason.as_str(), "participant left");
            }
            Action::RoomFreed { room } => {
                tracing::info!(%room, "room freed");
            }
        }
    }

    fn send(&self, to: &[ParticipantId], message: &ServerMessage) {
        let text: Arc<str> = Arc::from(message.to_json());
        for id in to {
            let Some(socket) = self.members.get(id).and_then(|m| m.socket.as_ref()) else {
                continue;
            };
            if socket.try_send(Outbound::Text(text.clone())).is_err() {
                self.metrics
                    .dropped
                    .with_label_values(&["socket_queue_full"])
                    .inc();
            }
        }
    }

    fn renegotiate(
        &mut self,
        c: &SharedControl,
        participant: ParticipantId,
        tracks: Vec<super::rooms::SubscribedTrack>,
        now: Instant,
    ) {
        let Some(m) = self.members.get_mut(&participant) else {
            return;
        };
        if !m.subscribe.created {
            let pc = m.subscribe;
            match c.template.subscriber(&c.announced[pc.shard]) {
                Ok((rtc, ufrag)) => {
                    let peer = NewPeer {
                        session: pc.session,
                        rtc,
                        ufrag,
                        publisher: false,
                        tracks: Vec::new(),
                        max_layer: MaxLayer::default(),
                    };
                    m.subscribe.created = true;
                    self.to_shard(c, pc.shard, ShardCommand::AddPeer(Box::new(peer)));
                }
                Err(e) => {
                    tracing::error!(error = %e, "subscribe connection not created");
                    let actions = self.rooms.subscriber_failed(participant, now);
                    return self.execute(c, actions, now);
                }
            }
        }
        let pc = self.members[&participant].subscribe;
        let command = |reply| {
            ShardCommand::Room(RoomCommand::SubscribeOffer {
                session: pc.session,
                tracks: tracks.iter().map(|t| mesh(t.track)).collect(),
                reply,
            })
        };
        self.ask_shard(c, pc.shard, command, move |hub, reply, now| match reply {
            Some(Ok(Some(offer))) => {
                let mids = offer
                    .mids
                    .into_iter()
                    .map(|(mid, t)| (mid.to_string(), RoomTrackId(t.0)))
                    .collect();
                hub.rooms
                    .subscriber_offer(participant, offer.sdp, mids, now)
            }
            Some(Ok(None)) => hub.rooms.subscriber_unchanged(participant, now),
            other => {
                tracing::info!(%participant, ?other, "subscribe offer failed");
                hub.rooms.subscriber_failed(participant, now)
            }
        });
    }

    fn negotiate_publish(
        &mut self,
        c: &SharedControl,
        participant: ParticipantId,
        sdp: String,
        now: Instant,
    ) {
        let Some(m) = self.members.get_mut(&participant) else {
            return;
        };
        let pc = m.publish;
        if !pc.created {
            // The first offer is answered here, like WHIP; then the `Rtc` moves to its shard.
            let n = match c.template.publisher(&sdp, &c.announced[pc.shard]) {
                Ok(n) => n,
                Err(e) => {
                    let actions = self.rooms.publish_failed(participant, &e.to_string(), now);
                    return self.execute(c, actions, now);
                }
            };
            m.publish.created = true;
            m.publish_media = n.media.clone();
            let peer = NewPeer {
                session: pc.session,
                rtc: n.rtc,
                ufrag: n.ufrag,
                publisher: true,
                tracks: Vec::new(),
                max_layer: MaxLayer::default(),
            };
            self.to_shard(c, pc.shard, ShardCommand::AddPeer(Box::new(peer)));
            let actions =
                self.rooms
                    .publish_answered(participant, n.answer, negotiated(&n.media), now);
            return self.execute(c, actions, now);
        }
        let command = |reply| {
            ShardCommand::Room(RoomCommand::PublishOffer {
                session: pc.session,
                offer: sdp,
                reply,
            })
        };
        self.ask_shard(c, pc.shard, command, move |hub, reply, now| match reply {
            Some(Ok((answer, media))) => {
                let tracks = negotiated(&media);
                if let Some(m) = hub.members.get_mut(&participant) {
                    m.publish_media = media;
                }
                hub.rooms.publish_answered(participant, answer, tracks, now)
            }
            Some(Err(e)) => hub.rooms.publish_failed(participant, &e, now),
            None => hub
                .rooms
                .publish_failed(participant, "the media shard did not answer", now),
        });
    }

    /// Remove everyone (shutdown).
    pub fn close_all(&mut self, c: &SharedControl) {
        let now = Instant::now();
        let actions = self.rooms.close_all(now);
        self.execute(c, actions, now);
    }
}

fn negotiated(media: &NegotiatedMedia) -> Vec<NegotiatedTrack> {
    media
        .iter()
        .map(|(mid, video, _)| NegotiatedTrack {
            mid: mid.to_string(),
            kind: if *video { Kind::Video } else { Kind::Audio },
            id: None,
        })
        .collect()
}
