//! One peer on a shard: its str0m `Rtc`, which track each of its m-lines carries, and, for a
//! subscriber, one forwarder per track. Decisions come from `sfu::Forwarder`; this file only applies
//! them to the `Rtc`.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::media::Mid;
use str0m::rtp::{ExtensionValues, RtpWrite, Ssrc};
use str0m::Rtc;

use super::NewPeer;
use crate::mesh::{MediaPacket, TrackId};
use crate::sfu::{Decision, DropReason, Forwarder, ForwarderConfig, SourcePacket};
use crate::SessionId;

/// "No payload type": the subscriber did not negotiate the publisher's codec.
pub const NO_PT: u8 = 0xff;

pub struct Peer {
    pub session: SessionId,
    pub rtc: Rtc,
    pub ufrag: Box<[u8]>,
    pub publisher: bool,
    pub tracks: Vec<PeerTrack>,
    /// Publisher: SSRC to index in `tracks`, learned from the first packet of each stream.
    rx_ssrcs: Vec<(Ssrc, usize)>,
    pub connected: bool,
    pub created: Instant,
    pub last_recv: Instant,
    /// The deadline the timer heap holds for this peer.
    pub deadline: Option<Instant>,
    /// 5-tuples (socket, remote) this peer is reached on.
    pub sources: Vec<(usize, SocketAddr)>,
    /// Cumulative NACK counts str0m last reported, per mid.
    nacks: Vec<(Mid, u64)>,
}

pub struct PeerTrack {
    pub mid: Mid,
    pub track: TrackId,
    pub sub: Option<Subscription>,
}

/// A subscriber's state for one track.
pub struct Subscription {
    pub forwarder: Forwarder,
    /// Publisher payload type to ours.
    pub pt_map: [u8; 128],
    pub last_keyframe_ask: Option<Instant>,
}

pub enum Forwarded {
    Sent,
    Dropped { wants_keyframe: bool },
    NoCodec,
    Skipped,
}

impl Peer {
    pub fn new(p: NewPeer, now: Instant) -> Peer {
        let publisher = p.publisher;
        let tracks = p
            .tracks
            .iter()
            .enumerate()
            .map(|(i, &(mid, track))| PeerTrack {
                mid,
                track,
                sub: (!publisher).then(|| Subscription {
                    forwarder: Forwarder::new(
                        ForwarderConfig {
                            clock_rate: if track.is_video() { 90_000 } else { 48_000 },
                            is_video: track.is_video(),
                        },
                        (p.session.0 as u32).wrapping_add(i as u32 * 7919),
                    ),
                    pt_map: [NO_PT; 128],
                    last_keyframe_ask: None,
                }),
            })
            .collect();
        Peer {
            session: p.session,
            rtc: p.rtc,
            ufrag: p.ufrag.as_bytes().into(),
            publisher,
            tracks,
            rx_ssrcs: Vec::with_capacity(4),
            connected: false,
            created: now,
            last_recv: now,
            deadline: None,
            sources: Vec::with_capacity(2),
            nacks: Vec::new(),
        }
    }

    /// NACKs received on `mid` since the last stats event (str0m reports running totals).
    pub fn nacks_since_last(&mut self, mid: Mid, total: u64) -> u64 {
        match self.nacks.iter_mut().find(|(m, _)| *m == mid) {
            Some((_, last)) => {
                let fresh = total.saturating_sub(*last);
                *last = total;
                fresh
            }
            None => {
                self.nacks.push((mid, total));
                total
            }
        }
    }

    /// Forget the learned SSRC-to-track mapping (a room publisher's tracks changed).
    pub fn forget_ssrcs(&mut self) {
        self.rx_ssrcs.clear();
    }

    /// The track a publisher's incoming SSRC belongs to.
    pub fn track_for_ssrc(&mut self, ssrc: Ssrc) -> Option<TrackId> {
        if let Some(&(_, i)) = self.rx_ssrcs.iter().find(|(s, _)| *s == ssrc) {
            return Some(self.tracks[i].track);
        }
        let mid = self.rtc.direct_api().stream_rx(&ssrc)?.mid();
        let i = self.tracks.iter().position(|t| t.mid == mid)?;
        if self.rx_ssrcs.len() < 16 {
            self.rx_ssrcs.push((ssrc, i));
        }
        Some(self.tracks[i].track)
    }

    /// Apply the forwarder's decision for one packet on subscribed track `ti`.
    pub fn forward(&mut self, ti: usize, packet: &MediaPacket, now: Instant) -> Forwarded {
        let Some(t) = self.tracks.get_mut(ti) else {
            return Forwarded::Skipped;
        };
        let Some(sub) = t.sub.as_mut() else {
            return Forwarded::Skipped;
        };
        let pt = sub.pt_map[(packet.pt & 127) as usize];
        if pt == NO_PT {
            return Forwarded::NoCodec;
        }
        let decision = sub.forwarder.decide(
            &SourcePacket {
                ssrc: packet.ssrc,
                seq: packet.seq,
                timestamp: packet.timestamp,
                marker: packet.marker,
                keyframe: packet.keyframe,
                arrival: packet.arrival,
            },
            now,
        );
        match decision {
            Decision::Forward {
                seq,
                timestamp,
                marker,
            } => {
                let mid = t.mid;
                let video = t.track.is_video();
                let mut api = self.rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                    return Forwarded::Skipped;
                };
                let ext = ExtensionValues {
                    audio_level: packet.audio_level,
                    voice_activity: packet.voice_activity,
                    ..Default::default()
                };
                tx.write_rtp(
                    RtpWrite::new(
                        pt.into(),
                        seq.into(),
                        timestamp,
                        packet.arrival,
                        packet.payload.clone(),
                    )
                    .marker(marker)
                    .nackable(video)
                    .ext_vals(ext),
                );
                Forwarded::Sent
            }
            Decision::Drop(reason) => Forwarded::Dropped {
                wants_keyframe: matches!(reason, DropReason::WaitingForKeyframe),
            },
        }
    }
}
