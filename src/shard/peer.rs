//! One peer on a shard: its str0m `Rtc`, which track each of its m-lines carries, and, for a
//! subscriber, one forwarder per track. Decisions come from `sfu::Forwarder`; this file only applies
//! them to the `Rtc`.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::media::{Mid, Rids};
use str0m::rtp::{ExtensionValues, RtpWrite, Ssrc};
use str0m::Rtc;

use super::simulcast::{SimulcastRx, SubLayers};
use super::NewPeer;
use crate::mesh::{MediaPacket, TrackId};
use crate::sfu::{
    Decision, DropReason, Forwarder, ForwarderConfig, LayerTable, MaxLayer, SourcePacket,
};
use crate::SessionId;

/// "No payload type": the subscriber did not negotiate the publisher's codec.
pub const NO_PT: u8 = 0xff;

pub struct Peer {
    pub session: SessionId,
    pub rtc: Rtc,
    pub ufrag: Box<[u8]>,
    pub publisher: bool,
    pub tracks: Vec<PeerTrack>,
    /// Publisher: SSRC to (index in `tracks`, raw simulcast layer), learned from the first
    /// packet of each stream.
    rx_ssrcs: Vec<(Ssrc, usize, u8)>,
    pub connected: bool,
    pub created: Instant,
    pub last_recv: Instant,
    /// The deadline the timer heap holds for this peer.
    pub deadline: Option<Instant>,
    /// Given packets this turn that str0m has not sent yet (see `ShardState::send_written`).
    pub written: bool,
    /// The packets given this turn, per mid, in order, until `send_written` sends them (only
    /// without a bandwidth estimator: with one, `forward` writes them to str0m's queue).
    pub writes: Vec<(Mid, RtpWrite)>,
    /// Arrival time of each packet written this turn, until it is sent.
    pub written_arrivals: Vec<Instant>,
    /// 5-tuples (socket, remote) this peer is reached on.
    pub sources: Vec<(usize, SocketAddr)>,
    /// Cumulative NACK counts str0m last reported, per mid.
    nacks: Vec<(Mid, u64)>,
    /// Subscriber: the latest egress bandwidth estimate (bits/s).
    pub bwe: Option<u64>,
    /// Subscriber: the (minimum, desired) bitrates last given to its estimator.
    pub bwe_targets: (u64, u64),
    /// Subscriber: the desired bitrate is dipped for one tick, so that restoring it probes.
    pub probe_dip: bool,
    pub next_probe: Instant,
}

/// A published video track's simulcast layers, when its m-line negotiated several rids.
pub fn simulcast_rx(rtc: &Rtc, mid: Mid, track: TrackId, now: Instant) -> Option<SimulcastRx> {
    match rtc.media(mid).map(|m| m.rids_rx()) {
        Some(Rids::Specific(rids)) if track.is_video() => SimulcastRx::new(rids, now),
        _ => None,
    }
}

pub struct PeerTrack {
    pub mid: Mid,
    pub track: TrackId,
    pub sub: Option<Subscription>,
    /// Publisher: the track's simulcast layers, when it has several rids.
    pub sim: Option<SimulcastRx>,
}

/// A subscriber's state for one track.
pub struct Subscription {
    pub forwarder: Forwarder,
    /// Publisher payload type to ours.
    pub pt_map: [u8; 128],
    pub last_keyframe_ask: Option<Instant>,
    /// The subscriber's own cap on simulcast layers (`?layer=`, `?max_height=`).
    pub max: MaxLayer,
    /// Simulcast: the layer selector and VP8 rewriter, once the track shows several layers.
    pub layers: Option<Box<SubLayers>>,
}

pub enum Forwarded {
    Sent,
    Dropped {
        wants_keyframe: bool,
    },
    NoCodec,
    /// A simulcast layer this subscriber does not get now.
    OtherLayer,
    Skipped,
}

impl Peer {
    pub fn new(p: NewPeer, now: Instant) -> Peer {
        let publisher = p.publisher;
        let max = p.max_layer;
        let rtc = &p.rtc;
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
                    max,
                    layers: None,
                }),
                sim: if publisher {
                    simulcast_rx(rtc, mid, track, now)
                } else {
                    None
                },
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
            written: false,
            writes: Vec::new(),
            written_arrivals: Vec::new(),
            sources: Vec::with_capacity(2),
            nacks: Vec::new(),
            bwe: None,
            bwe_targets: (0, 0),
            probe_dip: false,
            next_probe: now,
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

    /// Which of a publisher's tracks an incoming SSRC belongs to (index in `tracks`), and its
    /// raw simulcast layer (0 without simulcast).
    pub fn track_for_ssrc(&mut self, ssrc: Ssrc) -> Option<(usize, u8)> {
        if let Some(&(_, i, raw)) = self.rx_ssrcs.iter().find(|(s, _, _)| *s == ssrc) {
            return Some((i, raw));
        }
        let mut api = self.rtc.direct_api();
        let rx = api.stream_rx(&ssrc)?;
        let (mid, rid) = (rx.mid(), rx.rid());
        let i = self.tracks.iter().position(|t| t.mid == mid)?;
        let raw = match (&self.tracks[i].sim, rid) {
            (Some(sim), Some(rid)) => sim.raw_index(rid)?,
            (Some(_), None) => return None,
            (None, _) => 0,
        };
        if self.rx_ssrcs.len() < 16 {
            self.rx_ssrcs.push((ssrc, i, raw));
        }
        Some((i, raw))
    }

    /// Apply the forwarder's decision for one packet on subscribed track `ti`. `table`: the
    /// track's simulcast layers, if known; `vp8`: the packet is VP8.
    pub fn forward(
        &mut self,
        ti: usize,
        packet: &MediaPacket,
        table: Option<&LayerTable>,
        vp8: bool,
        now: Instant,
    ) -> Forwarded {
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
        let source = SourcePacket {
            ssrc: packet.ssrc,
            seq: packet.seq,
            timestamp: packet.timestamp,
            marker: packet.marker,
            keyframe: packet.keyframe,
            arrival: packet.arrival,
        };
        let decision = if packet.layers > 1 {
            let max = sub.max;
            let estimate = self.bwe;
            let layers = sub.layers.get_or_insert_with(|| {
                let assumed = LayerTable::assumed(packet.layers.into());
                let mut l = SubLayers::new(table.unwrap_or(&assumed), max, now);
                if let Some(bps) = estimate {
                    l.selector.estimate(bps, now);
                }
                Box::new(l)
            });
            match layers.decide(&mut sub.forwarder, packet.layer, &source, now) {
                Some(d) => d,
                None => return Forwarded::OtherLayer,
            }
        } else {
            sub.forwarder.decide(&source, now)
        };
        match decision {
            Decision::Forward {
                seq,
                timestamp,
                marker,
            } => {
                let patch = match sub.layers.as_mut() {
                    Some(l) if vp8 => l.vp8_patch(packet.ssrc, &packet.payload),
                    _ => None,
                };
                let mid = t.mid;
                let video = t.track.is_video();
                let paced = self.rtc.has_bwe();
                let mut api = self.rtc.direct_api();
                let Some(tx) = api.stream_tx_by_mid(mid, None) else {
                    return Forwarded::Skipped;
                };
                let ext = ExtensionValues {
                    audio_level: packet.audio_level,
                    voice_activity: packet.voice_activity,
                    ..Default::default()
                };
                let mut write = RtpWrite::new(
                    pt.into(),
                    seq.into(),
                    timestamp,
                    packet.arrival,
                    packet.payload.clone(),
                )
                .marker(marker)
                .nackable(video)
                .ext_vals(ext);
                if let Some(patch) = patch {
                    write = write.vp8_patch(patch);
                }
                if paced {
                    // str0m's pacer looks at its queues on every timeout of this `Rtc` (its
                    // own timer, its feedback arriving) and, finding them empty, may schedule
                    // padding or a probe that goes before media queued later. So a paced
                    // subscriber's packets go to str0m as they are forwarded, as before the
                    // fast path (held until `send_written`, they made chromium-simulcast-tc
                    // fail half the time).
                    tx.write_rtp(write);
                } else {
                    self.writes.push((mid, write));
                }
                Forwarded::Sent
            }
            Decision::Drop(reason) => Forwarded::Dropped {
                wants_keyframe: matches!(reason, DropReason::WaitingForKeyframe),
            },
        }
    }
}
