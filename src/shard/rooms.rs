//! The shard's side of `/ws` rooms: renegotiating a participant's two peer connections in place
//! (publish: the client re-offers; subscribe: the server offers m-lines as tracks come and go,
//! plus the `sluice` data channel), writing relayed data-channel messages, and reporting what the
//! room needs to hear (channel data, RFC 6464 audio levels, loss and RTT). It adds state beside
//! the forwarding path and never changes how a packet is forwarded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind, Mid};
use str0m::Event;

use super::peer::{simulcast_rx, PeerTrack, Subscription, NO_PT};
use super::{ShardEvent, ShardState, TrackState};
use crate::control::negotiate::{answer_on, NegotiatedMedia};
use crate::control::rooms::DATA_CHANNEL_LABEL;
use crate::mesh::{TrackId, ANY_LAYER};
use crate::sfu::{Forwarder, ForwarderConfig, MaxLayer};
use crate::SessionId;

/// How often a publisher's loudest audio level is reported, at most.
const LEVEL_INTERVAL: Duration = Duration::from_millis(150);

/// Room commands from the control thread (variants of `ShardCommand`).
pub enum RoomCommand {
    /// The subscriber's own cap on the simulcast layer it gets of `track` (the room's `layer`
    /// message).
    LayerCap {
        session: SessionId,
        track: TrackId,
        max: MaxLayer,
    },
    /// Answer a new offer on an existing publish peer connection; the reply carries the answer
    /// and the m-lines the client now sends on.
    PublishOffer {
        session: SessionId,
        offer: String,
        reply: tokio::sync::oneshot::Sender<Result<(String, NegotiatedMedia), String>>,
    },
    /// The publisher sends `track` on `mid` from now on.
    PublishTrack {
        session: SessionId,
        mid: Mid,
        track: TrackId,
    },
    /// The publisher's `track` is gone.
    UnpublishTrack { session: SessionId, track: TrackId },
    /// Offer exactly `tracks` (kind from the id) and the data channel on the subscribe peer
    /// connection. The reply is `Ok(None)` when nothing changed since the last offer.
    SubscribeOffer {
        session: SessionId,
        tracks: Vec<TrackId>,
        reply: tokio::sync::oneshot::Sender<Result<Option<SubscribeOffer>, String>>,
    },
    /// The client's answer to the pending subscribe offer.
    SubscribeAnswer {
        session: SessionId,
        answer: String,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Stop forwarding `track` to this subscriber at once.
    Unsubscribe { session: SessionId, track: TrackId },
    /// Write a relayed message on the peer's `sluice` data channel.
    ChannelWrite {
        session: SessionId,
        binary: bool,
        frame: Arc<[u8]>,
    },
}

/// A subscribe offer: its SDP and which m-line carries which track.
#[derive(Debug)]
pub struct SubscribeOffer {
    pub sdp: String,
    pub mids: Vec<(Mid, TrackId)>,
}

/// Room state of one peer on this shard, keyed by peer key (removed with the peer).
#[derive(Default)]
pub struct RoomPeer {
    pending: Option<SdpPendingOffer>,
    channel_added: bool,
    channel: Option<ChannelId>,
    /// Loudest level (lowest -dBov) since `level_since`, per audio track.
    levels: Vec<(TrackId, u8, Instant)>,
}

impl ShardState {
    pub(super) fn handle_room_command(&mut self, cmd: RoomCommand, now: Instant) {
        match cmd {
            RoomCommand::PublishOffer {
                session,
                offer,
                reply,
            } => {
                let result = self.publish_offer(session, &offer, now);
                let _ = reply.send(result);
            }
            RoomCommand::PublishTrack {
                session,
                mid,
                track,
            } => self.publish_track(session, mid, track, now),
            RoomCommand::UnpublishTrack { session, track } => self.unpublish_track(session, track),
            RoomCommand::SubscribeOffer {
                session,
                tracks,
                reply,
            } => {
                let result = self.subscribe_offer(session, &tracks, now);
                let _ = reply.send(result);
            }
            RoomCommand::SubscribeAnswer {
                session,
                answer,
                reply,
            } => {
                let result = self.subscribe_answer(session, &answer, now);
                let _ = reply.send(result);
            }
            RoomCommand::LayerCap {
                session,
                track,
                max,
            } => {
                if let Some(&key) = self.by_session.get(&session) {
                    self.set_layer_cap(key, track, max, now);
                }
            }
            RoomCommand::Unsubscribe { session, track } => {
                if let Some(&key) = self.by_session.get(&session) {
                    self.detach_subscription(key, track);
                }
            }
            RoomCommand::ChannelWrite {
                session,
                binary,
                frame,
            } => self.channel_write(session, binary, &frame, now),
        }
    }

    fn publish_offer(
        &mut self,
        session: SessionId,
        offer: &str,
        now: Instant,
    ) -> Result<(String, NegotiatedMedia), String> {
        let key = *self.by_session.get(&session).ok_or("no such peer")?;
        let peer = &mut self.peers[key];
        let result = answer_on(&mut peer.rtc, offer, true).map_err(|e| e.to_string());
        self.drain(key, now);
        result
    }

    fn publish_track(&mut self, session: SessionId, mid: Mid, track: TrackId, now: Instant) {
        let Some(&key) = self.by_session.get(&session) else {
            return;
        };
        let min = self.cfg.keyframe_min_interval;
        let peer = &mut self.peers[key];
        if peer.tracks.iter().any(|t| t.track == track) {
            return;
        }
        peer.tracks.retain(|t| t.mid != mid);
        let sim = simulcast_rx(&peer.rtc, mid, track, now);
        peer.tracks.push(PeerTrack {
            mid,
            track,
            sub: None,
            sim,
        });
        peer.forget_ssrcs();
        let ts = self
            .tracks
            .entry(track)
            .or_insert_with(|| TrackState::new(min));
        ts.local_publisher = Some((key, mid));
    }

    fn unpublish_track(&mut self, session: SessionId, track: TrackId) {
        let Some(&key) = self.by_session.get(&session) else {
            return;
        };
        let peer = &mut self.peers[key];
        peer.tracks.retain(|t| t.track != track);
        peer.forget_ssrcs();
        if let Some(ts) = self.tracks.get_mut(&track) {
            if ts.local_publisher.is_some_and(|(k, _)| k == key) {
                ts.local_publisher = None;
            }
        }
        self.forget_if_unused(track);
    }

    /// Stop forwarding `track` to subscriber `key`. Its m-line stays (indices into the peer's
    /// tracks are held by `TrackState::local_subs`) but carries nothing any more.
    fn detach_subscription(&mut self, key: usize, track: TrackId) -> Option<Mid> {
        let peer = self.peers.get_mut(key)?;
        let ti = peer
            .tracks
            .iter()
            .position(|t| t.track == track && t.sub.is_some())?;
        peer.tracks[ti].sub = None;
        let mid = peer.tracks[ti].mid;
        if let Some(ts) = self.tracks.get_mut(&track) {
            ts.local_subs.retain(|&(k, i)| !(k == key && i == ti));
        }
        self.forget_if_unused(track);
        Some(mid)
    }

    fn subscribe_offer(
        &mut self,
        session: SessionId,
        tracks: &[TrackId],
        now: Instant,
    ) -> Result<Option<SubscribeOffer>, String> {
        let key = *self.by_session.get(&session).ok_or("no such peer")?;
        // Tracks no longer wanted: stop forwarding, their m-lines go inactive.
        let gone: Vec<TrackId> = self.peers[key]
            .tracks
            .iter()
            .filter(|t| t.sub.is_some() && !tracks.contains(&t.track))
            .map(|t| t.track)
            .collect();
        let mut inactive = Vec::new();
        for track in gone {
            if let Some(mid) = self.detach_subscription(key, track) {
                inactive.push(mid);
            }
        }
        let room = self.room_peers.entry(key).or_default();
        let add_channel = !room.channel_added;
        room.channel_added = true;
        let peer = &mut self.peers[key];
        let new: Vec<TrackId> = tracks
            .iter()
            .copied()
            .filter(|t| !peer.tracks.iter().any(|p| p.track == *t && p.sub.is_some()))
            .collect();
        let mut api = peer.rtc.sdp_api();
        for mid in inactive {
            api.set_direction(mid, Direction::Inactive);
        }
        let mut added = Vec::new();
        for &track in &new {
            let kind = if track.is_video() {
                MediaKind::Video
            } else {
                MediaKind::Audio
            };
            let name = format!("t{}", track.0);
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(name.clone()),
                Some(name),
                None,
            );
            added.push((mid, track));
        }
        if add_channel {
            api.add_channel(DATA_CHANNEL_LABEL.to_owned());
        }
        let Some((offer, pending)) = api.apply() else {
            return Ok(None);
        };
        let seed = session.0 as u32;
        for (mid, track) in added {
            let ti = peer.tracks.len();
            peer.tracks.push(PeerTrack {
                mid,
                track,
                sub: Some(Subscription {
                    forwarder: Forwarder::new(
                        ForwarderConfig {
                            clock_rate: if track.is_video() { 90_000 } else { 48_000 },
                            is_video: track.is_video(),
                        },
                        seed.wrapping_add(ti as u32 * 7919),
                    ),
                    pt_map: [NO_PT; 128],
                    last_keyframe_ask: None,
                    max: MaxLayer::default(),
                    layers: None,
                }),
                sim: None,
            });
            let min = self.cfg.keyframe_min_interval;
            self.tracks
                .entry(track)
                .or_insert_with(|| TrackState::new(min))
                .local_subs
                .push((key, ti));
        }
        let mids: Vec<(Mid, TrackId)> = self.peers[key]
            .tracks
            .iter()
            .filter(|t| t.sub.is_some())
            .map(|t| (t.mid, t.track))
            .collect();
        for &(_, track) in &mids {
            self.refresh_pt_maps(track);
        }
        if let Some(room) = self.room_peers.get_mut(&key) {
            room.pending = Some(pending);
        }
        self.drain(key, now);
        Ok(Some(SubscribeOffer {
            sdp: offer.to_sdp_string(),
            mids,
        }))
    }

    fn subscribe_answer(
        &mut self,
        session: SessionId,
        answer: &str,
        now: Instant,
    ) -> Result<(), String> {
        let key = *self.by_session.get(&session).ok_or("no such peer")?;
        let pending = self
            .room_peers
            .get_mut(&key)
            .and_then(|r| r.pending.take())
            .ok_or("no offer is waiting for an answer")?;
        let answer = SdpAnswer::from_sdp_string(answer).map_err(|e| e.to_string())?;
        let peer = &mut self.peers[key];
        peer.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| e.to_string())?;
        let tracks: Vec<TrackId> = peer
            .tracks
            .iter()
            .filter(|t| t.sub.is_some())
            .map(|t| t.track)
            .collect();
        for track in tracks {
            self.refresh_pt_maps(track);
            if track.is_video() && self.peers[key].connected {
                self.keyframe_needs.push((track, ANY_LAYER));
            }
        }
        self.drain(key, now);
        Ok(())
    }

    fn channel_write(&mut self, session: SessionId, binary: bool, frame: &[u8], now: Instant) {
        let Some(&key) = self.by_session.get(&session) else {
            return;
        };
        // Not open yet, or its buffer is full: the message is lost for this recipient (the
        // control thread counted it as relayed; SCTP buffers are large next to the rate limit).
        let Some(cid) = self.room_peers.get(&key).and_then(|r| r.channel) else {
            tracing::debug!(shard = self.id, %session, "data channel not open: message dropped");
            return;
        };
        let written = match self.peers[key].rtc.channel(cid) {
            Some(mut ch) => ch.write(binary, frame).unwrap_or(false),
            None => false,
        };
        if !written {
            tracing::debug!(shard = self.id, %session, "data channel full: message dropped");
        }
        self.drain(key, now);
    }

    /// str0m events only rooms care about.
    pub(super) fn handle_room_event(&mut self, key: usize, event: Event, _now: Instant) {
        let session = self.peers[key].session;
        match event {
            Event::ChannelOpen(cid, label) if label == DATA_CHANNEL_LABEL => {
                self.room_peers.entry(key).or_default().channel = Some(cid);
            }
            Event::ChannelData(d) => {
                let ours = self
                    .room_peers
                    .get(&key)
                    .is_some_and(|r| r.channel == Some(d.id));
                if ours {
                    let _ = self.events.try_send(ShardEvent::ChannelData {
                        session,
                        binary: d.binary,
                        data: d.data,
                    });
                }
            }
            Event::PeerStats(s) => {
                let loss = s
                    .egress_loss_fraction
                    .unwrap_or(0.0)
                    .max(s.ingress_loss_fraction.unwrap_or(0.0));
                if let Some(rtt) = s.rtt {
                    let _ = self.events.try_send(ShardEvent::LinkStats {
                        session,
                        loss,
                        rtt_ms: rtt.as_millis().min(u32::MAX as u128) as u32,
                    });
                }
            }
            _ => {}
        }
    }

    /// An audio packet's RFC 6464 level: the loudest of each interval goes to the control thread.
    pub(super) fn observe_audio_level(
        &mut self,
        key: usize,
        track: TrackId,
        level: Option<i8>,
        now: Instant,
    ) {
        let Some(level) = level else {
            return;
        };
        // str0m gives -dBov as a negative number (0 loudest, -127 silence).
        let dbov = level.unsigned_abs().min(127);
        let room = self.room_peers.entry(key).or_default();
        let slot = match room.levels.iter_mut().find(|(t, _, _)| *t == track) {
            Some(s) => s,
            None => {
                if room.levels.len() >= 4 {
                    return;
                }
                room.levels.push((track, 127, now));
                room.levels.last_mut().expect("pushed")
            }
        };
        slot.1 = slot.1.min(dbov);
        if now.saturating_duration_since(slot.2) >= LEVEL_INTERVAL {
            let dbov = slot.1;
            slot.1 = 127;
            slot.2 = now;
            let session = self.peers[key].session;
            let _ = self.events.try_send(ShardEvent::AudioLevel {
                session,
                track,
                dbov,
            });
        }
    }

    pub(super) fn forget_room_peer(&mut self, key: usize) {
        self.room_peers.remove(&key);
    }
}

/// Room state of every peer of one shard.
pub type RoomPeers = HashMap<usize, RoomPeer>;
