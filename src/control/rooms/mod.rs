//! Conferencing rooms over `/ws`, sans-IO: who is in which room, what each publishes and
//! receives, the negotiation state of each participant's two peer connections, and every event
//! the server sends. It owns no socket, no `Rtc`, no clock and no task: the control thread feeds
//! it inputs with `now` and carries out the [`Action`]s it returns. The wire format is in
//! [`protocol`] and `docs/signaling.md`.
//!
//! # Contract
//!
//! * Every input is a method of [`Rooms`] taking `now`; each returns the actions it caused, **in
//!   the order they must be carried out** (data-plane changes before the messages that announce
//!   them; `Unsubscribe` before `Unpublish`; `Publish` before `Subscribe`).
//! * Call [`Rooms::handle_timeout`] once [`Rooms::poll_timeout`] has passed (or on a fixed tick of
//!   at most 100 ms): it times out unanswered offers and sends `speakers` updates.
//! * Ids are the caller's handles: [`ParticipantId`]s are never reused; a [`TrackId`] keeps the
//!   data plane's layout (`n << 1 | is_video`).
//! * Every removal, whatever its cause, yields exactly one [`Action::Close`] for that
//!   participant; after it the id is unknown and further inputs for it are ignored.
//! * A room with nobody left is dropped, with [`Action::RoomFreed`].
//!
//! # Negotiation
//!
//! Each `/ws` participant has two peer connections. On the *publish* one the client offers:
//! `offer` → [`Action::NegotiatePublish`] → the caller answers through str0m and reports
//! [`Rooms::publish_answered`] (or [`Rooms::publish_failed`]). On the *subscribe* one the server
//! offers: [`Action::Renegotiate`] carries the complete set of tracks the participant must
//! receive → the caller makes an offer with exactly those (plus the data channel) and reports
//! [`Rooms::subscriber_offer`] → the client's `answer` becomes [`Action::ApplyAnswer`]. At most
//! one server offer per participant is in flight; changes meanwhile produce one more
//! `Renegotiate` after the answer.

mod names;
pub mod protocol;
mod quality;
mod rate;
mod room;
mod speakers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sfu::MaxLayer;

pub use names::{
    parse_watch_name, valid_display_name, valid_identity, valid_room, watch_name, WatchName,
    MAX_NAME_BYTES, WATCH_SEPARATOR,
};
pub use protocol::{
    parse_client, parse_join, ClientMessage, ErrorCode, IceServer, JoinMessage, Kind, LeaveReason,
    ParticipantId, ParticipantKind, PcKind, Permissions, ProtocolError, Quality, ServerMessage,
    Source, TrackDeclaration, TrackId, DATA_CHANNEL_LABEL, PROTOCOL_VERSION,
};
pub use quality::classify as classify_quality;
pub use room::{data_frame, Participant, PublishedTrack, Room};
pub use speakers::SpeakerConfig;

/// Limits and timings of every room.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// `limits.max_participants_per_room`: WHIP publishers count, WHEP viewers do not.
    pub max_participants: usize,
    /// Published tracks per participant.
    pub max_tracks: usize,
    /// Largest WebSocket text message (SDP included).
    pub max_message_bytes: usize,
    /// WebSocket messages per second per participant, sustained and in a burst.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Largest data-channel message relayed.
    pub max_data_bytes: usize,
    /// Data-channel messages per second per participant, sustained and in a burst.
    pub data_per_second: u32,
    pub data_burst: u32,
    /// How long a client may take to answer a subscribe offer before it is removed.
    pub answer_timeout: Duration,
    pub speakers: SpeakerConfig,
    /// Tracks of `/ws` publishers get ids `(track_id_base + n) << 1 | is_video`, far above the
    /// registry's stream-based ids.
    pub track_id_base: u64,
}

impl Default for RoomConfig {
    fn default() -> RoomConfig {
        RoomConfig {
            max_participants: 50,
            max_tracks: 8,
            max_message_bytes: 64 * 1024,
            messages_per_second: 20,
            message_burst: 50,
            max_data_bytes: 16 * 1024,
            data_per_second: 30,
            data_burst: 60,
            answer_timeout: Duration::from_secs(15),
            speakers: SpeakerConfig::default(),
            track_id_base: 1 << 40,
        }
    }
}

/// A track of a publish negotiation: what str0m accepted on one m-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedTrack {
    pub mid: String,
    pub kind: Kind,
    /// `None`: the room chooses (and keeps it across renegotiations of the same mid). `Some`:
    /// an id the caller already uses (a WHIP publisher's registry track).
    pub id: Option<TrackId>,
}

/// A track a participant must receive on its subscribe peer connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribedTrack {
    pub track: TrackId,
    pub kind: Kind,
    pub publisher: ParticipantId,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `message` on each participant's socket. Serialize it once: `message.to_json()`.
    Send {
        to: Vec<ParticipantId>,
        message: ServerMessage,
    },
    /// Data plane: `publisher` now sends `track` on `mid` of its publish peer connection.
    Publish {
        publisher: ParticipantId,
        track: TrackId,
        mid: String,
        kind: Kind,
    },
    /// Data plane: the track is gone (every subscriber was unsubscribed just before).
    Unpublish {
        publisher: ParticipantId,
        track: TrackId,
    },
    /// Data plane: forward `track` to `subscriber` once its subscribe connection has an m-line
    /// for it (the `Renegotiate` that follows).
    Subscribe {
        subscriber: ParticipantId,
        track: TrackId,
    },
    /// Data plane: stop forwarding at once.
    Unsubscribe {
        subscriber: ParticipantId,
        track: TrackId,
    },
    /// Data plane: the subscriber's own cap on the simulcast layer it receives of `track`.
    LayerCap {
        subscriber: ParticipantId,
        track: TrackId,
        max: MaxLayer,
    },
    /// Make a subscribe offer for `participant` with exactly `tracks` and the data channel
    /// (create its subscribe peer connection the first time), then call
    /// [`Rooms::subscriber_offer`] (or [`Rooms::subscriber_failed`]).
    Renegotiate {
        participant: ParticipantId,
        tracks: Vec<SubscribedTrack>,
    },
    /// Answer this offer on `participant`'s publish peer connection (create it the first time),
    /// then call [`Rooms::publish_answered`] or [`Rooms::publish_failed`].
    NegotiatePublish {
        participant: ParticipantId,
        sdp: String,
        tracks: Vec<TrackDeclaration>,
    },
    /// Apply the client's answer to the pending subscribe offer; on failure call
    /// [`Rooms::subscriber_failed`].
    ApplyAnswer {
        participant: ParticipantId,
        sdp: String,
    },
    /// A trickled candidate (`a=candidate` value) for one of the participant's connections.
    RemoteCandidate {
        participant: ParticipantId,
        pc: PcKind,
        candidate: String,
        mid: Option<String>,
    },
    /// Write `frame` on the data channel of each of `to`, as a binary message if `binary`, else
    /// as text (the frame is then valid UTF-8).
    Data {
        from: ParticipantId,
        to: Vec<ParticipantId>,
        binary: bool,
        frame: Arc<[u8]>,
    },
    /// The participant is no longer in the room: after sending what precedes, close its socket
    /// and remove both its peer connections.
    Close {
        participant: ParticipantId,
        reason: LeaveReason,
    },
    /// The room is empty and was dropped.
    RoomFreed { room: String },
}

/// A request to enter a room, checked by the caller for auth.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub room: String,
    /// The token's `sub` with auth; without auth, the client's `identity`. `None`: generated
    /// (`guest-<n>`).
    pub identity: Option<String>,
    /// Display name; `None` or empty: the identity.
    pub name: Option<String>,
    pub kind: ParticipantKind,
    pub permissions: Permissions,
    pub auto_subscribe: bool,
    /// Passed to the client in `joined`.
    pub ice_servers: Vec<IceServer>,
    /// Wall-clock join time for `joinedAt` (unix milliseconds).
    pub joined_at_unix_ms: u64,
}

impl JoinRequest {
    /// A `/ws` client's request from its `join` message.
    pub fn websocket(
        join: &JoinMessage,
        identity: Option<String>,
        permissions: Permissions,
        ice_servers: Vec<IceServer>,
        joined_at_unix_ms: u64,
    ) -> JoinRequest {
        JoinRequest {
            room: join.room.clone(),
            identity,
            name: join.name.clone(),
            kind: ParticipantKind::Websocket,
            permissions,
            auto_subscribe: join.auto_subscribe,
            ice_servers,
            joined_at_unix_ms,
        }
    }

    /// A WHIP publisher of stream `stream`, entering the room of that name. Its identity is the
    /// token's `sub`, or `whip` without one.
    pub fn whip(stream: &str, identity: Option<String>, joined_at_unix_ms: u64) -> JoinRequest {
        JoinRequest {
            room: stream.to_owned(),
            identity: Some(
                identity
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "whip".into()),
            ),
            name: Some(stream.to_owned()),
            kind: ParticipantKind::Whip,
            permissions: Permissions {
                publish: true,
                subscribe: false,
            },
            auto_subscribe: false,
            ice_servers: Vec::new(),
            joined_at_unix_ms,
        }
    }
}

/// Why a join was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The room name, identity or display name is not allowed; which one is said.
    BadName(&'static str),
    RoomFull {
        max: usize,
    },
    /// A participant of the other kind (a WHIP publisher or a `/ws` client) has this identity.
    IdentityTaken,
    /// The room already has a WHIP publisher.
    StreamTaken,
}

impl JoinRefusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            JoinRefusal::BadName(_) => ErrorCode::BadName,
            JoinRefusal::RoomFull { .. } => ErrorCode::RoomFull,
            JoinRefusal::IdentityTaken | JoinRefusal::StreamTaken => ErrorCode::IdentityTaken,
        }
    }

    /// For WHIP: 400 for a bad name, 409 for a taken stream or identity, 503 for a full room.
    pub fn http_status(&self) -> u16 {
        match self {
            JoinRefusal::BadName(_) => 400,
            JoinRefusal::IdentityTaken | JoinRefusal::StreamTaken => 409,
            JoinRefusal::RoomFull { .. } => 503,
        }
    }

    /// The WebSocket close code that follows [`JoinRefusal::to_message`].
    pub fn close_code(&self) -> u16 {
        self.code().close_code()
    }

    /// The `error` message for a `/ws` client (then close the socket).
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::error(self.code(), self.to_string())
    }
}

impl std::fmt::Display for JoinRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinRefusal::BadName(what) => write!(f, "{what} is not allowed"),
            JoinRefusal::RoomFull { max } => write!(f, "the room is full ({max} participants)"),
            JoinRefusal::IdentityTaken => write!(f, "this identity is in the room already"),
            JoinRefusal::StreamTaken => write!(f, "the stream already has a publisher"),
        }
    }
}

impl std::error::Error for JoinRefusal {}

/// An accepted join.
#[derive(Debug)]
pub struct Joined {
    pub participant: ParticipantId,
    pub actions: Vec<Action>,
}

/// What a WHEP name `room~identity` plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchTarget {
    pub participant: ParticipantId,
    pub audio: Option<TrackId>,
    pub video: Option<TrackId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchError {
    /// No such room or participant (404).
    NotFound,
    /// The participant publishes nothing of what was asked (404).
    NothingPublished,
}

/// A room in `GET /api/rooms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomSummary {
    pub room: String,
    pub participants: usize,
    pub tracks: usize,
}

/// Every room of the process, and the entry point of every input. See the module docs for the
/// contract.
#[derive(Debug)]
pub struct Rooms {
    config: RoomConfig,
    /// Keyed by client-chosen names: std's randomly keyed SipHash.
    rooms: HashMap<String, Room>,
    members: HashMap<ParticipantId, String>,
    next_participant: u64,
    next_track: u64,
}

impl Rooms {
    pub fn new(config: RoomConfig) -> Rooms {
        Rooms {
            config,
            rooms: HashMap::new(),
            members: HashMap::new(),
            next_participant: 0,
            next_track: 0,
        }
    }

    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    pub fn room(&self, name: &str) -> Option<&Room> {
        self.rooms.get(name)
    }

    pub fn room_of(&self, id: ParticipantId) -> Option<&str> {
        self.members.get(&id).map(String::as_str)
    }

    pub fn participant(&self, id: ParticipantId) -> Option<&Participant> {
        self.rooms.get(self.members.get(&id)?)?.participant(id)
    }

    /// Rooms open now.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Participants in every room.
    pub fn participant_count(&self) -> usize {
        self.members.len()
    }

    /// Every room, sorted by name.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        let mut list: Vec<RoomSummary> = self
            .rooms
            .values()
            .map(|r| RoomSummary {
                room: r.name().to_owned(),
                participants: r.len(),
                tracks: r.track_count(),
            })
            .collect();
        list.sort_by(|a, b| a.room.cmp(&b.room));
        list
    }

    /// Enter a room (created on first join). A `/ws` client with the identity of another `/ws`
    /// client in the room replaces it (a reconnect); see [`JoinRefusal`] for refusals.
    pub fn join(&mut self, mut request: JoinRequest, now: Instant) -> Result<Joined, JoinRefusal> {
        if !valid_room(&request.room) {
            return Err(JoinRefusal::BadName("the room name"));
        }
        if let Some(identity) = &request.identity {
            if !valid_identity(identity) {
                return Err(JoinRefusal::BadName("the identity"));
            }
        }
        if let Some(name) = &request.name {
            if !valid_display_name(name) {
                return Err(JoinRefusal::BadName("the display name"));
            }
        }
        let mut replaced = None;
        if let Some(room) = self.rooms.get(&request.room) {
            if request.kind == ParticipantKind::Whip
                && room.participants().any(|p| p.kind == ParticipantKind::Whip)
            {
                return Err(JoinRefusal::StreamTaken);
            }
            if let Some(same) = request.identity.as_ref().and_then(|i| room.by_identity(i)) {
                if same.kind != ParticipantKind::Websocket
                    || request.kind != ParticipantKind::Websocket
                {
                    return Err(JoinRefusal::IdentityTaken);
                }
                replaced = Some(same.id);
            }
            let staying = room.len() - usize::from(replaced.is_some());
            if staying >= self.config.max_participants {
                return Err(JoinRefusal::RoomFull {
                    max: self.config.max_participants,
                });
            }
        } else if self.config.max_participants == 0 {
            return Err(JoinRefusal::RoomFull { max: 0 });
        }

        self.next_participant += 1;
        let id = ParticipantId(self.next_participant);
        let identity = request
            .identity
            .take()
            .unwrap_or_else(|| format!("guest-{}", id.0));
        let name = request
            .name
            .take()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| identity.clone());
        let participant = Participant::new(id, identity, name, &request, &self.config);
        let ice_servers = std::mem::take(&mut request.ice_servers);
        let mut out = Vec::new();
        let room = self
            .rooms
            .entry(request.room.clone())
            .or_insert_with(|| Room::new(request.room.clone(), &self.config));
        if let Some(old) = replaced {
            room.remove(old, LeaveReason::Replaced, now, &mut out);
            self.members.remove(&old);
        }
        room.add(participant, ice_servers, &self.config, &mut out);
        self.members.insert(id, request.room);
        Ok(Joined {
            participant: id,
            actions: out,
        })
    }

    /// Run `f` on the room of `id`.
    fn in_room(
        &mut self,
        id: ParticipantId,
        f: impl FnOnce(&mut Room, &RoomConfig, &mut u64, &mut Vec<Action>),
    ) -> Vec<Action> {
        match self.members.get(&id) {
            Some(name) => self.in_named_room(&name.clone(), f),
            None => Vec::new(),
        }
    }

    /// Run `f` on room `name`; then forget closed participants and free the room if empty.
    fn in_named_room(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Room, &RoomConfig, &mut u64, &mut Vec<Action>),
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(room) = self.rooms.get_mut(name) else {
            return out;
        };
        f(room, &self.config, &mut self.next_track, &mut out);
        let empty = room.is_empty();
        for action in &out {
            if let Action::Close { participant, .. } = action {
                self.members.remove(participant);
            }
        }
        if empty {
            self.rooms.remove(name);
            out.push(Action::RoomFreed {
                room: name.to_owned(),
            });
        }
        out
    }

    /// A text frame from a participant's socket (after `joined`).
    pub fn handle_text(&mut self, id: ParticipantId, text: &str, now: Instant) -> Vec<Action> {
        self.in_room(id, |room, config, _, out| {
            let Some(p) = room.participant_mut(id) else {
                return;
            };
            if let Err(tell) = p.take_message(now) {
                if tell {
                    out.push(Action::Send {
                        to: vec![id],
                        message: ServerMessage::error(
                            ErrorCode::RateLimited,
                            format!(
                                "over {} messages per second: dropped",
                                config.messages_per_second
                            ),
                        ),
                    });
                }
                return;
            }
            match parse_client(text, config.max_message_bytes) {
                Ok(message) => room.handle(id, message, config, now, out),
                Err(e) => out.push(Action::Send {
                    to: vec![id],
                    message: e.to_message(),
                }),
            }
        })
    }

    /// A binary frame from a participant's socket: the protocol is text only.
    pub fn handle_binary(&mut self, id: ParticipantId, len: usize, now: Instant) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| {
            let Some(p) = room.participant_mut(id) else {
                return;
            };
            if p.take_message(now).is_ok() {
                out.push(Action::Send {
                    to: vec![id],
                    message: ServerMessage::error(
                        ErrorCode::BadMessage,
                        format!("binary frame of {len} bytes: messages are JSON text frames"),
                    ),
                });
            }
        })
    }

    /// The caller answered a `NegotiatePublish`: `sdp` is the answer, `tracks` the m-lines str0m
    /// accepted for sending to the server.
    pub fn publish_answered(
        &mut self,
        id: ParticipantId,
        sdp: String,
        tracks: Vec<NegotiatedTrack>,
        _now: Instant,
    ) -> Vec<Action> {
        self.in_room(id, |room, config, next, out| {
            let base = config.track_id_base;
            let mut alloc = |kind| {
                *next += 1;
                TrackId::new(base + *next, kind)
            };
            room.published(id, Some(sdp), tracks, &mut alloc, config, out);
        })
    }

    /// The caller could not use a `NegotiatePublish` offer; `reason` goes to the client.
    pub fn publish_failed(
        &mut self,
        id: ParticipantId,
        reason: &str,
        _now: Instant,
    ) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| room.publish_failed(id, reason, out))
    }

    /// A WHIP participant's tracks (ids from the registry), once its session is negotiated.
    pub fn whip_published(
        &mut self,
        id: ParticipantId,
        tracks: Vec<NegotiatedTrack>,
        _now: Instant,
    ) -> Vec<Action> {
        self.in_room(id, |room, config, next, out| {
            let base = config.track_id_base;
            let mut alloc = |kind| {
                *next += 1;
                TrackId::new(base + *next, kind)
            };
            room.published(id, None, tracks, &mut alloc, config, out);
        })
    }

    /// The offer made for the last `Renegotiate` of `id`; `mids` maps its m-lines to tracks.
    /// Ignored unless a `Renegotiate` is outstanding.
    pub fn subscriber_offer(
        &mut self,
        id: ParticipantId,
        sdp: String,
        mids: Vec<(String, TrackId)>,
        now: Instant,
    ) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| {
            room.subscriber_offer(id, sdp, mids, now, out)
        })
    }

    /// The last `Renegotiate` of `id` changed nothing on its connection, so no offer was made:
    /// the subscribe connection is idle again (and renegotiates if something changed since).
    pub fn subscriber_unchanged(&mut self, id: ParticipantId, _now: Instant) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| room.subscriber_unchanged(id, out))
    }

    /// The subscribe connection could not be offered or could not take the answer: the
    /// participant is removed (it cannot receive anything any more).
    pub fn subscriber_failed(&mut self, id: ParticipantId, now: Instant) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| {
            room.remove(id, LeaveReason::NegotiationFailed, now, out);
        })
    }

    /// The shard reports one of the participant's peer connections connected.
    pub fn peer_connected(&mut self, id: ParticipantId, pc: PcKind, _now: Instant) -> Vec<Action> {
        self.in_room(id, |room, _, _, _| room.set_connected(id, pc))
    }

    /// One of the participant's peer connections closed or failed: it leaves the room.
    pub fn peer_closed(&mut self, id: ParticipantId, _pc: PcKind, now: Instant) -> Vec<Action> {
        self.leave(id, LeaveReason::PeerClosed, now)
    }

    /// The participant is gone: `Disconnected` when its socket closed, `Left` for a WHIP
    /// `DELETE`.
    pub fn leave(&mut self, id: ParticipantId, reason: LeaveReason, now: Instant) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| {
            room.remove(id, reason, now, out);
        })
    }

    /// The participant's audio level over the last report interval, in -dBov (RFC 6464: 0 is
    /// the loudest, 127 silence). Report at most every 100 ms per participant.
    pub fn audio_level(&mut self, id: ParticipantId, dbov: u8, now: Instant) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| room.audio_level(id, dbov, now, out))
    }

    /// Loss (fraction 0..1) and round-trip time of the participant's connections, for the
    /// connection-quality hint. Report every few seconds.
    pub fn link_stats(
        &mut self,
        id: ParticipantId,
        loss: f32,
        rtt_ms: u32,
        _now: Instant,
    ) -> Vec<Action> {
        self.in_room(id, |room, _, _, out| room.link_stats(id, loss, rtt_ms, out))
    }

    /// A message the participant sent on its data channel.
    pub fn data(
        &mut self,
        id: ParticipantId,
        binary: bool,
        payload: &[u8],
        now: Instant,
    ) -> Vec<Action> {
        self.in_room(id, |room, config, _, out| {
            room.data(id, binary, payload, config, now, out)
        })
    }

    /// Time out unanswered offers and send due `speakers` updates.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let mut due: Vec<String> = self
            .rooms
            .values()
            .filter(|r| r.next_deadline(&self.config, now).is_some_and(|d| d <= now))
            .map(|r| r.name().to_owned())
            .collect();
        due.sort();
        for name in due {
            out.extend(self.in_named_room(&name, |room, config, _, out| {
                room.handle_timeout(config, now, out)
            }));
        }
        out
    }

    /// The earliest time [`Rooms::handle_timeout`] has something to do (O(rooms)).
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        self.rooms
            .values()
            .filter_map(|r| r.next_deadline(&self.config, now))
            .min()
    }

    /// Remove everyone (server shutdown).
    pub fn close_all(&mut self, now: Instant) -> Vec<Action> {
        let mut ids: Vec<ParticipantId> = self.members.keys().copied().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            out.extend(self.leave(id, LeaveReason::ServerShutdown, now));
        }
        out
    }

    /// What WHEP `room~identity` plays: the participant's camera and microphone, or with
    /// `screen` its screen share (video, and audio if it shares some).
    pub fn watch(
        &self,
        room: &str,
        identity: &str,
        screen: bool,
    ) -> Result<WatchTarget, WatchError> {
        let p = self
            .rooms
            .get(room)
            .and_then(|r| r.by_identity(identity))
            .ok_or(WatchError::NotFound)?;
        let pick = |kind: Kind, preferred: Source| {
            let of_kind = || p.tracks().iter().filter(move |t| t.info.kind == kind);
            if screen {
                of_kind().find(|t| t.info.source == Source::Screen)
            } else {
                of_kind()
                    .find(|t| t.info.source == preferred)
                    .or_else(|| of_kind().find(|t| t.info.source != Source::Screen))
            }
            .map(|t| t.info.id)
        };
        let target = WatchTarget {
            participant: p.id,
            audio: pick(Kind::Audio, Source::Mic),
            video: pick(Kind::Video, Source::Camera),
        };
        if target.audio.is_none() && target.video.is_none() {
            return Err(WatchError::NothingPublished);
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests;
