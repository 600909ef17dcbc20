//! One room: its participants, their published tracks and subscriptions, the negotiation state
//! of each participant's two peer connections, and the events everyone must hear. It is driven by
//! [`super::Rooms`], which owns the rooms and the ids; every input appends the actions it causes
//! to `out`, in the order they must be carried out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use super::protocol::{
    ClientMessage, ErrorCode, IceServer, Kind, Layer, LeaveReason, MidTrack, OfferedTrack,
    ParticipantId, ParticipantInfo, ParticipantKind, PcKind, Permissions, Quality, ServerMessage,
    Source, TrackDeclaration, TrackId, TrackInfo, WireLimits, DATA_CHANNEL_LABEL,
};
use super::quality::QualityHint;
use super::rate::TokenBucket;
use super::speakers::SpeakerDetector;
use super::{Action, JoinRequest, NegotiatedTrack, RoomConfig, SubscribedTrack};
use crate::sfu::{MaxLayer, Quality as LayerQuality};

/// Longest mid accepted in a track declaration (browsers use small integers).
const MAX_MID_BYTES: usize = 32;
/// Most simulcast layers per track.
const MAX_LAYERS: usize = 3;
/// At most one `rate_limited` error per this long.
const RATE_ERROR_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A published track and the m-line of the publisher's peer connection that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedTrack {
    pub info: TrackInfo,
    pub mid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublishState {
    Idle,
    /// An offer went to the caller (`Action::NegotiatePublish`), with these declarations.
    Negotiating(Vec<TrackDeclaration>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubscribeState {
    Idle,
    /// `Action::Renegotiate` went out with this track set; waiting for the offer it makes.
    Requested(Vec<SubscribedTrack>),
    /// Offer `seq` went to the client at `since`; waiting for its answer.
    AwaitingAnswer {
        seq: u64,
        since: Instant,
    },
}

/// A member of a room.
#[derive(Debug, Clone)]
pub struct Participant {
    pub id: ParticipantId,
    pub identity: String,
    pub name: String,
    pub kind: ParticipantKind,
    pub joined_at_unix_ms: u64,
    pub permissions: Permissions,
    pub auto_subscribe: bool,
    tracks: Vec<PublishedTrack>,
    subscriptions: BTreeSet<TrackId>,
    publish: PublishState,
    subscribe: SubscribeState,
    /// The subscription set changed while an offer was outstanding: renegotiate after it.
    renegotiate_after: bool,
    next_seq: u64,
    connected: [bool; 2],
    messages: TokenBucket,
    data: TokenBucket,
    last_rate_error: Option<Instant>,
    quality: QualityHint,
}

impl Participant {
    pub(super) fn new(
        id: ParticipantId,
        identity: String,
        name: String,
        request: &JoinRequest,
        config: &RoomConfig,
    ) -> Participant {
        Participant {
            id,
            identity,
            name,
            kind: request.kind,
            joined_at_unix_ms: request.joined_at_unix_ms,
            permissions: request.permissions,
            auto_subscribe: request.auto_subscribe,
            tracks: Vec::new(),
            subscriptions: BTreeSet::new(),
            publish: PublishState::Idle,
            subscribe: SubscribeState::Idle,
            renegotiate_after: false,
            next_seq: 1,
            connected: [false; 2],
            messages: TokenBucket::new(config.messages_per_second, config.message_burst),
            data: TokenBucket::new(config.data_per_second, config.data_burst),
            last_rate_error: None,
            quality: QualityHint::default(),
        }
    }

    pub fn tracks(&self) -> &[PublishedTrack] {
        &self.tracks
    }

    /// The tracks it receives, in id order.
    pub fn subscriptions(&self) -> impl Iterator<Item = TrackId> + '_ {
        self.subscriptions.iter().copied()
    }

    pub fn is_subscribed(&self, track: TrackId) -> bool {
        self.subscriptions.contains(&track)
    }

    /// Whether the shard reported this peer connection connected.
    pub fn connected(&self, pc: PcKind) -> bool {
        self.connected[pc as usize]
    }

    /// The last connection-quality hint announced, if any.
    pub fn quality(&self) -> Option<Quality> {
        self.quality.current()
    }

    pub fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            id: self.id,
            identity: self.identity.clone(),
            name: self.name.clone(),
            kind: self.kind,
            joined_at: self.joined_at_unix_ms,
            tracks: self.tracks.iter().map(|t| t.info.clone()).collect(),
        }
    }

    fn has_socket(&self) -> bool {
        self.kind == ParticipantKind::Websocket
    }

    fn receives_media(&self) -> bool {
        self.has_socket() && self.permissions.subscribe
    }

    /// Whether another message may be taken now; `false` also says whether to tell the client.
    pub(super) fn take_message(&mut self, now: Instant) -> Result<(), bool> {
        if self.messages.take(now) {
            Ok(())
        } else {
            Err(self.rate_error_due(now))
        }
    }

    fn rate_error_due(&mut self, now: Instant) -> bool {
        let due = self
            .last_rate_error
            .is_none_or(|t| now.saturating_duration_since(t) >= RATE_ERROR_EVERY);
        if due {
            self.last_rate_error = Some(now);
        }
        due
    }
}

/// One room. Participants are kept in join order (ids only grow).
#[derive(Debug, Clone)]
pub struct Room {
    name: String,
    participants: BTreeMap<ParticipantId, Participant>,
    /// The publisher of each track.
    owners: BTreeMap<TrackId, ParticipantId>,
    speakers: SpeakerDetector,
}

fn send(out: &mut Vec<Action>, to: Vec<ParticipantId>, message: ServerMessage) {
    if !to.is_empty() {
        out.push(Action::Send { to, message });
    }
}

fn error(out: &mut Vec<Action>, to: ParticipantId, code: ErrorCode, message: impl Into<String>) {
    send(out, vec![to], ServerMessage::error(code, message));
}

impl Room {
    pub(super) fn new(name: String, config: &RoomConfig) -> Room {
        Room {
            name,
            participants: BTreeMap::new(),
            owners: BTreeMap::new(),
            speakers: SpeakerDetector::new(config.speakers.clone()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    pub fn len(&self) -> usize {
        self.participants.len()
    }

    /// Participants in join order.
    pub fn participants(&self) -> impl Iterator<Item = &Participant> {
        self.participants.values()
    }

    pub fn participant(&self, id: ParticipantId) -> Option<&Participant> {
        self.participants.get(&id)
    }

    pub(super) fn participant_mut(&mut self, id: ParticipantId) -> Option<&mut Participant> {
        self.participants.get_mut(&id)
    }

    pub fn by_identity(&self, identity: &str) -> Option<&Participant> {
        self.participants.values().find(|p| p.identity == identity)
    }

    pub fn publisher_of(&self, track: TrackId) -> Option<ParticipantId> {
        self.owners.get(&track).copied()
    }

    pub fn track_count(&self) -> usize {
        self.owners.len()
    }

    /// Participants with a socket, except `except`.
    fn sockets_except(&self, except: Option<ParticipantId>) -> Vec<ParticipantId> {
        self.participants
            .values()
            .filter(|p| p.has_socket() && Some(p.id) != except)
            .map(|p| p.id)
            .collect()
    }

    fn track_kind(&self, track: TrackId) -> Option<Kind> {
        let owner = self.participants.get(self.owners.get(&track)?)?;
        owner
            .tracks
            .iter()
            .find(|t| t.info.id == track)
            .map(|t| t.info.kind)
    }

    /// Add a participant and tell everyone. The caller checked names and capacity.
    pub(super) fn add(
        &mut self,
        participant: Participant,
        ice_servers: Vec<IceServer>,
        config: &RoomConfig,
        out: &mut Vec<Action>,
    ) {
        let id = participant.id;
        let info = participant.info();
        let has_socket = participant.has_socket();
        let permissions = participant.permissions;
        if has_socket {
            let others = self.participants.values().map(Participant::info).collect();
            send(
                out,
                vec![id],
                ServerMessage::Joined {
                    room: self.name.clone(),
                    participant: info.clone(),
                    participants: others,
                    permissions,
                    ice_servers,
                    data_channel: DATA_CHANNEL_LABEL.to_owned(),
                    limits: WireLimits {
                        max_message_bytes: config.max_message_bytes,
                        messages_per_second: config.messages_per_second,
                        max_data_bytes: config.max_data_bytes,
                        data_per_second: config.data_per_second,
                        max_tracks: config.max_tracks,
                    },
                },
            );
        }
        let auto = participant.receives_media() && participant.auto_subscribe;
        self.participants.insert(id, participant);
        send(
            out,
            self.sockets_except(Some(id)),
            ServerMessage::ParticipantJoined { participant: info },
        );
        if auto {
            let existing: Vec<TrackId> = self.owners.keys().copied().collect();
            let p = self.participants.get_mut(&id).expect("inserted above");
            for track in existing {
                p.subscriptions.insert(track);
                out.push(Action::Subscribe {
                    subscriber: id,
                    track,
                });
            }
        }
        if has_socket {
            // The first subscribe offer: the data channel and whatever it receives already.
            self.renegotiate([id].into(), out);
        }
    }

    /// Remove a participant: its tracks leave every subscriber, everyone hears it, and the
    /// caller closes its socket and peer connections.
    pub(super) fn remove(
        &mut self,
        id: ParticipantId,
        reason: LeaveReason,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Option<Participant> {
        let p = self.participants.remove(&id)?;
        let mut dirty = BTreeSet::new();
        for track in &p.tracks {
            self.drop_track(track.info.id, &mut dirty, out);
            out.push(Action::Unpublish {
                publisher: id,
                track: track.info.id,
            });
        }
        for &track in &p.subscriptions {
            out.push(Action::Unsubscribe {
                subscriber: id,
                track,
            });
        }
        self.speakers.forget(id);
        send(
            out,
            self.sockets_except(None),
            ServerMessage::ParticipantLeft {
                participant: id,
                reason,
            },
        );
        if p.has_socket() && reason != LeaveReason::Disconnected {
            send(out, vec![id], ServerMessage::Left { reason });
        }
        out.push(Action::Close {
            participant: id,
            reason,
        });
        self.renegotiate(dirty, out);
        self.poll_speakers(now, out);
        Some(p)
    }

    /// Unsubscribe everyone from `track` (it is going away); collect who must renegotiate.
    fn drop_track(
        &mut self,
        track: TrackId,
        dirty: &mut BTreeSet<ParticipantId>,
        out: &mut Vec<Action>,
    ) {
        self.owners.remove(&track);
        for p in self.participants.values_mut() {
            if p.subscriptions.remove(&track) {
                out.push(Action::Unsubscribe {
                    subscriber: p.id,
                    track,
                });
                dirty.insert(p.id);
            }
        }
    }

    /// Ask for a new subscribe offer for each of `ids`, or remember to once the outstanding one
    /// is answered: at most one server offer per participant is in flight.
    fn renegotiate(&mut self, ids: BTreeSet<ParticipantId>, out: &mut Vec<Action>) {
        for id in ids {
            let Some(p) = self.participants.get(&id) else {
                continue;
            };
            if !p.has_socket() {
                continue;
            }
            if p.subscribe != SubscribeState::Idle {
                self.participants
                    .get_mut(&id)
                    .expect("present")
                    .renegotiate_after = true;
                continue;
            }
            let tracks: Vec<SubscribedTrack> = p
                .subscriptions
                .iter()
                .filter_map(|&track| {
                    Some(SubscribedTrack {
                        track,
                        kind: self.track_kind(track)?,
                        publisher: self.publisher_of(track)?,
                    })
                })
                .collect();
            let p = self.participants.get_mut(&id).expect("present");
            p.renegotiate_after = false;
            p.subscribe = SubscribeState::Requested(tracks.clone());
            out.push(Action::Renegotiate {
                participant: id,
                tracks,
            });
        }
    }

    fn poll_speakers(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Some(speakers) = self.speakers.poll(now) {
            send(
                out,
                self.sockets_except(None),
                ServerMessage::Speakers { speakers },
            );
        }
    }

    /// A message from a participant's socket, parsed and within its rate.
    pub(super) fn handle(
        &mut self,
        id: ParticipantId,
        message: ClientMessage,
        config: &RoomConfig,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        match message {
            ClientMessage::Join(_) => error(
                out,
                id,
                ErrorCode::AlreadyJoined,
                format!("already in room {:?}", self.name),
            ),
            ClientMessage::Offer { sdp, tracks } => {
                if !p.permissions.publish {
                    return error(
                        out,
                        id,
                        ErrorCode::Forbidden,
                        "this token does not grant publishing",
                    );
                }
                if p.publish != PublishState::Idle {
                    return error(
                        out,
                        id,
                        ErrorCode::NegotiationInProgress,
                        "the previous offer is still being answered",
                    );
                }
                if let Err((code, message)) = check_offer(&sdp, &tracks, config) {
                    return error(out, id, code, message);
                }
                p.publish = PublishState::Negotiating(tracks.clone());
                out.push(Action::NegotiatePublish {
                    participant: id,
                    sdp,
                    tracks,
                });
            }
            ClientMessage::Answer { sdp, seq } => match p.subscribe {
                SubscribeState::AwaitingAnswer { seq: expected, .. } if expected == seq => {
                    p.subscribe = SubscribeState::Idle;
                    let again = std::mem::take(&mut p.renegotiate_after);
                    out.push(Action::ApplyAnswer {
                        participant: id,
                        sdp,
                    });
                    if again {
                        self.renegotiate([id].into(), out);
                    }
                }
                _ => error(
                    out,
                    id,
                    ErrorCode::UnexpectedAnswer,
                    format!("no server offer {seq} is waiting for an answer"),
                ),
            },
            ClientMessage::Candidate {
                pc,
                candidate,
                sdp_mid,
            } => {
                if !candidate.is_empty() {
                    out.push(Action::RemoteCandidate {
                        participant: id,
                        pc,
                        candidate,
                        mid: sdp_mid,
                    });
                }
            }
            ClientMessage::Subscribe { tracks } => {
                if !p.permissions.subscribe {
                    return error(
                        out,
                        id,
                        ErrorCode::Forbidden,
                        "this token does not grant subscribing",
                    );
                }
                let mut unknown = Vec::new();
                let mut changed = false;
                for track in tracks {
                    match self.owners.get(&track) {
                        Some(&owner) if owner != id => {
                            let p = self.participants.get_mut(&id).expect("present");
                            if p.subscriptions.insert(track) {
                                out.push(Action::Subscribe {
                                    subscriber: id,
                                    track,
                                });
                                changed = true;
                            }
                        }
                        _ => unknown.push(track),
                    }
                }
                self.unknown_tracks(id, &unknown, out);
                if changed {
                    self.renegotiate([id].into(), out);
                }
            }
            ClientMessage::Unsubscribe { tracks } => {
                let mut unknown = Vec::new();
                let mut changed = false;
                for track in tracks {
                    if !self.owners.contains_key(&track) {
                        unknown.push(track);
                        continue;
                    }
                    let p = self.participants.get_mut(&id).expect("present");
                    if p.subscriptions.remove(&track) {
                        out.push(Action::Unsubscribe {
                            subscriber: id,
                            track,
                        });
                        changed = true;
                    }
                }
                self.unknown_tracks(id, &unknown, out);
                if changed {
                    self.renegotiate([id].into(), out);
                }
            }
            ClientMessage::Layer {
                track,
                layer,
                max_height,
            } => {
                let quality = match layer.as_deref().map(LayerQuality::parse) {
                    None => None,
                    Some(Some(q)) => Some(q),
                    Some(None) => {
                        return error(
                            out,
                            id,
                            ErrorCode::BadMessage,
                            "layer must be low, mid or high",
                        )
                    }
                };
                if max_height.is_some_and(|h| !(1..=8192).contains(&h)) {
                    return error(
                        out,
                        id,
                        ErrorCode::BadMessage,
                        "maxHeight must be from 1 to 8192 pixels",
                    );
                }
                if !p.subscriptions.contains(&track) {
                    return self.unknown_tracks(id, &[track], out);
                }
                out.push(Action::LayerCap {
                    subscriber: id,
                    track,
                    max: MaxLayer {
                        quality,
                        max_height,
                    },
                });
            }
            ClientMessage::Mute { track } => self.set_muted(id, track, true, out),
            ClientMessage::Unmute { track } => self.set_muted(id, track, false, out),
            ClientMessage::Leave => {
                self.remove(id, LeaveReason::Left, now, out);
            }
            ClientMessage::Ping { ts } => send(out, vec![id], ServerMessage::Pong { ts }),
        }
    }

    fn unknown_tracks(&self, id: ParticipantId, unknown: &[TrackId], out: &mut Vec<Action>) {
        if unknown.is_empty() {
            return;
        }
        let list: Vec<String> = unknown.iter().take(8).map(ToString::to_string).collect();
        error(
            out,
            id,
            ErrorCode::UnknownTrack,
            format!("no such track of another participant: {}", list.join(", ")),
        );
    }

    fn set_muted(&mut self, id: ParticipantId, track: TrackId, muted: bool, out: &mut Vec<Action>) {
        let p = self.participants.get_mut(&id).expect("caller checked");
        let Some(t) = p.tracks.iter_mut().find(|t| t.info.id == track) else {
            return error(
                out,
                id,
                ErrorCode::UnknownTrack,
                format!("{track} is not a track this participant publishes"),
            );
        };
        if t.info.muted == muted {
            return;
        }
        t.info.muted = muted;
        let message = if muted {
            ServerMessage::TrackMuted {
                participant: id,
                track,
            }
        } else {
            ServerMessage::TrackUnmuted {
                participant: id,
                track,
            }
        };
        send(out, self.sockets_except(Some(id)), message);
    }

    /// The tracks a publish negotiation (or a WHIP session) produced. `answer` is the SDP for a
    /// `/ws` client's offer, `None` for WHIP. Tracks are matched to the previous ones by mid:
    /// same mid, kind and source keeps the track; anything else is a new track.
    pub(super) fn published(
        &mut self,
        id: ParticipantId,
        answer: Option<String>,
        negotiated: Vec<NegotiatedTrack>,
        next_track: &mut dyn FnMut(Kind) -> TrackId,
        config: &RoomConfig,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let declared = match (&answer, &p.publish) {
            (Some(_), PublishState::Negotiating(declared)) => declared.clone(),
            // An answer nobody waits for (the participant re-offered, or it is stale).
            (Some(_), PublishState::Idle) => return,
            (None, _) => Vec::new(),
        };
        p.publish = PublishState::Idle;
        let mut tracks: Vec<PublishedTrack> = Vec::new();
        let mut refused = 0;
        for n in negotiated {
            if tracks.iter().any(|t| t.mid == n.mid) {
                continue;
            }
            if tracks.len() >= config.max_tracks {
                refused += 1;
                continue;
            }
            let declaration = declared.iter().find(|d| d.mid == n.mid);
            let source = declaration
                .and_then(|d| d.source)
                .filter(|s| s.fits(n.kind))
                .unwrap_or(Source::default_for(n.kind));
            let kept = p.tracks.iter().find(|t| {
                t.mid == n.mid
                    && t.info.kind == n.kind
                    && t.info.source == source
                    && n.id.is_none_or(|id| id == t.info.id)
            });
            let track = match kept {
                Some(t) => t.clone(),
                None => PublishedTrack {
                    info: TrackInfo {
                        id: n.id.unwrap_or_else(|| next_track(n.kind)),
                        kind: n.kind,
                        source,
                        muted: declaration.is_some_and(|d| d.muted),
                        simulcast: declaration.map(|d| d.simulcast.clone()).unwrap_or_default(),
                    },
                    mid: n.mid,
                },
            };
            tracks.push(track);
        }
        let old = std::mem::replace(&mut p.tracks, tracks.clone());
        let removed: Vec<TrackId> = old
            .iter()
            .map(|t| t.info.id)
            .filter(|id| !tracks.iter().any(|t| t.info.id == *id))
            .collect();
        let added: Vec<PublishedTrack> = tracks
            .iter()
            .filter(|t| !old.iter().any(|o| o.info.id == t.info.id))
            .cloned()
            .collect();

        let mut dirty = BTreeSet::new();
        for &track in &removed {
            self.drop_track(track, &mut dirty, out);
            out.push(Action::Unpublish {
                publisher: id,
                track,
            });
        }
        for t in &added {
            self.owners.insert(t.info.id, id);
            out.push(Action::Publish {
                publisher: id,
                track: t.info.id,
                mid: t.mid.clone(),
                kind: t.info.kind,
            });
        }
        if let Some(sdp) = answer {
            let tracks = tracks
                .iter()
                .map(|t| MidTrack {
                    mid: t.mid.clone(),
                    track: t.info.id,
                })
                .collect();
            send(out, vec![id], ServerMessage::Answer { sdp, tracks });
        }
        if refused > 0 {
            error(
                out,
                id,
                ErrorCode::TooManyTracks,
                format!(
                    "{refused} track(s) not published: at most {} per participant",
                    config.max_tracks
                ),
            );
        }
        let others = self.sockets_except(Some(id));
        for &track in &removed {
            send(
                out,
                others.clone(),
                ServerMessage::TrackUnpublished {
                    participant: id,
                    track,
                },
            );
        }
        for t in &added {
            send(
                out,
                others.clone(),
                ServerMessage::TrackPublished {
                    participant: id,
                    track: t.info.clone(),
                },
            );
        }
        for p in self.participants.values_mut() {
            if p.id == id || !p.receives_media() || !p.auto_subscribe {
                continue;
            }
            for t in &added {
                if p.subscriptions.insert(t.info.id) {
                    out.push(Action::Subscribe {
                        subscriber: p.id,
                        track: t.info.id,
                    });
                    dirty.insert(p.id);
                }
            }
        }
        self.renegotiate(dirty, out);
    }

    pub(super) fn publish_failed(
        &mut self,
        id: ParticipantId,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if p.publish == PublishState::Idle {
            return;
        }
        p.publish = PublishState::Idle;
        error(out, id, ErrorCode::NegotiationFailed, reason);
    }

    /// The offer made for the last `Renegotiate`; `mids` maps its m-lines to tracks.
    pub(super) fn subscriber_offer(
        &mut self,
        id: ParticipantId,
        sdp: String,
        mids: Vec<(String, TrackId)>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let SubscribeState::Requested(requested) = &p.subscribe else {
            return;
        };
        let tracks = mids
            .into_iter()
            .filter_map(|(mid, track)| {
                let publisher = requested.iter().find(|t| t.track == track)?.publisher;
                Some(OfferedTrack {
                    mid,
                    track,
                    participant: publisher,
                })
            })
            .collect();
        let seq = p.next_seq;
        p.next_seq += 1;
        p.subscribe = SubscribeState::AwaitingAnswer { seq, since: now };
        send(out, vec![id], ServerMessage::Offer { seq, sdp, tracks });
    }

    pub(super) fn subscriber_unchanged(&mut self, id: ParticipantId, out: &mut Vec<Action>) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if !matches!(p.subscribe, SubscribeState::Requested(_)) {
            return;
        }
        p.subscribe = SubscribeState::Idle;
        if std::mem::take(&mut p.renegotiate_after) {
            self.renegotiate([id].into(), out);
        }
    }

    pub(super) fn set_connected(&mut self, id: ParticipantId, pc: PcKind) {
        if let Some(p) = self.participants.get_mut(&id) {
            p.connected[pc as usize] = true;
        }
    }

    pub(super) fn audio_level(
        &mut self,
        id: ParticipantId,
        dbov: u8,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.participants.contains_key(&id) {
            self.speakers.observe(id, dbov, now);
            self.poll_speakers(now, out);
        }
    }

    pub(super) fn link_stats(
        &mut self,
        id: ParticipantId,
        loss: f32,
        rtt_ms: u32,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if let Some(quality) = p.quality.observe(loss, rtt_ms) {
            send(
                out,
                self.sockets_except(None),
                ServerMessage::ConnectionQuality {
                    participant: id,
                    quality,
                },
            );
        }
    }

    /// A data-channel message from `id`: relayed to everyone else with a socket, tagged.
    pub(super) fn data(
        &mut self,
        id: ParticipantId,
        binary: bool,
        payload: &[u8],
        config: &RoomConfig,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if payload.len() > config.max_data_bytes {
            return error(
                out,
                id,
                ErrorCode::TooLarge,
                format!(
                    "data-channel message of {} bytes, limit {}",
                    payload.len(),
                    config.max_data_bytes
                ),
            );
        }
        if !p.data.take(now) {
            if p.rate_error_due(now) {
                error(
                    out,
                    id,
                    ErrorCode::RateLimited,
                    format!(
                        "over {} data-channel messages per second: dropped",
                        config.data_per_second
                    ),
                );
            }
            return;
        }
        let to = self.sockets_except(Some(id));
        if to.is_empty() {
            return;
        }
        out.push(Action::Data {
            from: id,
            to,
            binary,
            frame: data_frame(id, payload),
        });
    }

    /// Participants whose subscribe offer has waited longer than the timeout.
    pub(super) fn overdue(&self, config: &RoomConfig, now: Instant) -> Vec<ParticipantId> {
        self.participants
            .values()
            .filter(|p| match p.subscribe {
                SubscribeState::AwaitingAnswer { since, .. } => {
                    now.saturating_duration_since(since) >= config.answer_timeout
                }
                _ => false,
            })
            .map(|p| p.id)
            .collect()
    }

    pub(super) fn handle_timeout(
        &mut self,
        config: &RoomConfig,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        for id in self.overdue(config, now) {
            self.remove(id, LeaveReason::Timeout, now, out);
        }
        self.poll_speakers(now, out);
    }

    pub(super) fn next_deadline(&self, config: &RoomConfig, now: Instant) -> Option<Instant> {
        let answers = self
            .participants
            .values()
            .filter_map(|p| match p.subscribe {
                SubscribeState::AwaitingAnswer { since, .. } => Some(since + config.answer_timeout),
                _ => None,
            });
        answers.chain(self.speakers.next_deadline(now)).min()
    }
}

/// The relayed form of a data-channel message: the sender's participant id in ASCII, a line feed,
/// then the payload unchanged.
pub fn data_frame(from: ParticipantId, payload: &[u8]) -> Arc<[u8]> {
    let tag = from.to_string();
    let mut frame = Vec::with_capacity(tag.len() + 1 + payload.len());
    frame.extend_from_slice(tag.as_bytes());
    frame.push(b'\n');
    frame.extend_from_slice(payload);
    frame.into()
}

fn check_offer(
    sdp: &str,
    tracks: &[TrackDeclaration],
    config: &RoomConfig,
) -> Result<(), (ErrorCode, String)> {
    if sdp.trim().is_empty() {
        return Err((ErrorCode::BadMessage, "`sdp` is empty".into()));
    }
    if tracks.len() > config.max_tracks {
        return Err((
            ErrorCode::TooManyTracks,
            format!(
                "{} tracks declared, at most {} per participant",
                tracks.len(),
                config.max_tracks
            ),
        ));
    }
    for (i, t) in tracks.iter().enumerate() {
        if t.mid.is_empty() || t.mid.len() > MAX_MID_BYTES {
            return Err((ErrorCode::BadMessage, format!("track {i}: bad mid")));
        }
        if tracks[..i].iter().any(|o| o.mid == t.mid) {
            return Err((
                ErrorCode::BadMessage,
                format!("mid {:?} declared twice", t.mid),
            ));
        }
        if t.simulcast.len() > MAX_LAYERS || !t.simulcast.iter().all(valid_layer) {
            return Err((
                ErrorCode::BadMessage,
                format!(
                    "mid {:?}: at most {MAX_LAYERS} layers, rids of 1 to 16 of A-Z a-z 0-9 - _",
                    t.mid
                ),
            ));
        }
    }
    Ok(())
}

fn valid_layer(layer: &Layer) -> bool {
    (1..=16).contains(&layer.rid.len())
        && layer
            .rid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
