//! Simulcast on a shard. On the publisher's side, [`SimulcastRx`] follows one video track's rid
//! layers: their bitrate, picture size and liveness, and their rank from low to high, which every
//! packet carries across the mesh. On a subscriber's side, [`SubLayers`] holds the subscriber's
//! `LayerSelector` and VP8 descriptor rewriter for one track.

use std::time::{Duration, Instant};

use str0m::media::Rid;

use crate::sfu::{
    Decision, Forwarder, LayerDecision, LayerInfo, LayerSelector, LayerSelectorConfig, LayerTable,
    MaxLayer, SourcePacket, Vp8Descriptor, Vp8Rewriter, MAX_LAYERS,
};

/// A layer with no packet for this long is not live (str0m's `StreamPaused` says so after 1.5 s
/// too; this also covers a layer that never started).
const LAYER_SILENCE: Duration = Duration::from_millis(1_500);

#[derive(Debug, Clone, Copy, Default)]
struct RawLayer {
    bytes: u64,
    last_packet: Option<Instant>,
    width: u32,
    height: u32,
    bitrate_bps: u64,
    paused: bool,
}

/// One simulcast video track of a publisher, on its shard. Layers are kept in the order the
/// offer listed their rids ("raw" indexes) and ranked low to high by picture height where every
/// layer's is known (VP8 keyframes carry it), else by measured bitrate, else in offer order.
#[derive(Debug)]
pub struct SimulcastRx {
    rids: Vec<Rid>,
    raw: [RawLayer; MAX_LAYERS],
    /// Rank (0 = lowest) of each raw layer.
    rank_of: [u8; MAX_LAYERS],
    /// Raw layer of each rank.
    raw_of: [u8; MAX_LAYERS],
    window_start: Instant,
}

impl SimulcastRx {
    /// `None` unless the track has at least two rids.
    pub fn new(rids: &[Rid], now: Instant) -> Option<SimulcastRx> {
        if rids.len() < 2 {
            return None;
        }
        let rids: Vec<Rid> = rids.iter().take(MAX_LAYERS).copied().collect();
        let identity: [u8; MAX_LAYERS] = std::array::from_fn(|i| i as u8);
        Some(SimulcastRx {
            rids,
            raw: [RawLayer::default(); MAX_LAYERS],
            rank_of: identity,
            raw_of: identity,
            window_start: now,
        })
    }

    pub fn count(&self) -> u8 {
        self.rids.len() as u8
    }

    /// The raw index of `rid`.
    pub fn raw_index(&self, rid: Rid) -> Option<u8> {
        self.rids.iter().position(|r| *r == rid).map(|i| i as u8)
    }

    /// One packet of raw layer `raw`; `size` when it starts a keyframe that says its picture
    /// size. Returns the layer's rank, which the packet carries.
    pub fn on_packet(
        &mut self,
        raw: u8,
        bytes: usize,
        size: Option<(u16, u16)>,
        now: Instant,
    ) -> u8 {
        let i = usize::from(raw).min(MAX_LAYERS - 1);
        let l = &mut self.raw[i];
        l.bytes += bytes as u64;
        l.last_packet = Some(now);
        l.paused = false;
        if let Some((w, h)) = size {
            l.width = w.into();
            l.height = h.into();
        }
        self.rank_of[i]
    }

    /// str0m's `StreamPaused` for the layer with this rid.
    pub fn set_paused(&mut self, rid: Rid, paused: bool) {
        if let Some(i) = self.raw_index(rid) {
            self.raw[usize::from(i)].paused = paused;
        }
    }

    /// The rid of the layer ranked `rank`.
    pub fn rid_of_rank(&self, rank: u8) -> Option<Rid> {
        let raw = *self.raw_of.get(usize::from(rank))?;
        self.rids.get(usize::from(raw)).copied()
    }

    /// Close the measurement window (call about once a second): bitrates, liveness and ranks.
    /// Returns the ranked table for the subscribers, and whether the ranking changed.
    pub fn tick(&mut self, now: Instant) -> (LayerTable, bool) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= Duration::from_millis(500) {
            for l in &mut self.raw {
                l.bitrate_bps = l.bytes * 8 * 1_000_000 / (elapsed.as_micros().max(1) as u64);
                l.bytes = 0;
            }
            self.window_start = now;
        }
        let n = self.rids.len();
        let live =
            |l: &RawLayer| !l.paused && l.last_packet.is_some_and(|t| now < t + LAYER_SILENCE);
        let mut order: Vec<usize> = (0..n).collect();
        let all_sized = self.raw[..n].iter().all(|l| l.height > 0 || !live(l));
        let all_measured = self.raw[..n].iter().all(|l| l.bitrate_bps > 0 || !live(l));
        let any_live = self.raw[..n].iter().any(live);
        if any_live && all_sized {
            order.sort_by_key(|&i| (self.raw[i].height, self.raw[i].bitrate_bps));
        } else if any_live && all_measured {
            order.sort_by_key(|&i| self.raw[i].bitrate_bps);
        } else {
            order.sort_by_key(|&i| self.rank_of[i]);
        }
        let mut changed = false;
        let mut table = LayerTable::assumed(n);
        for (rank, &raw) in order.iter().enumerate() {
            changed |= self.rank_of[raw] != rank as u8;
            self.rank_of[raw] = rank as u8;
            self.raw_of[rank] = raw as u8;
            table.ids[rank] = raw as u8;
            let l = &self.raw[raw];
            let info = &mut table.layers[rank];
            *info = LayerInfo {
                width: l.width,
                height: l.height,
                bitrate_bps: if l.bitrate_bps > 0 {
                    l.bitrate_bps
                } else {
                    info.bitrate_bps
                },
            };
            if !live(l) {
                table.live &= !(1 << rank);
            }
        }
        (table, changed)
    }
}

/// A subscriber's simulcast state for one video track.
#[derive(Debug)]
pub struct SubLayers {
    pub selector: LayerSelector,
    pub vp8: Vp8Rewriter,
    /// The table last given to the selector.
    table: LayerTable,
}

impl SubLayers {
    pub fn new(table: &LayerTable, max: MaxLayer, now: Instant) -> SubLayers {
        let mut selector = LayerSelector::new(LayerSelectorConfig::default());
        selector.set_max(max, now);
        table.apply(&mut selector, now);
        SubLayers {
            selector,
            vp8: Vp8Rewriter::new(),
            table: *table,
        }
    }

    /// A newer table from the publisher's shard: layers ranked anew keep what the selector
    /// knows of them (and the forwarded layer stays the same layer), new sizes or layers reset
    /// the selector's layers, measured bitrates and liveness update them.
    pub fn update(&mut self, table: &LayerTable, now: Instant) {
        let old = self.table;
        self.table = *table;
        let moved = table.moved_from(&old);
        if let Some(moved) = &moved {
            self.selector.reorder(moved);
        }
        let same_shape = old.count == table.count
            && old
                .infos()
                .iter()
                .zip(table.infos())
                .all(|(a, b)| (a.width, a.height) == (b.width, b.height));
        if moved.is_some() || !same_shape {
            table.apply(&mut self.selector, now);
            // The bitrate a layer measured before stays the selector's cost until it is told
            // otherwise: tell it every layer's, as the table has them now.
            for (i, b) in table.infos().iter().enumerate() {
                self.selector.measured_bitrate(i, b.bitrate_bps, now);
            }
            return;
        }
        for (i, (a, b)) in old.infos().iter().zip(table.infos()).enumerate() {
            if a.bitrate_bps != b.bitrate_bps {
                self.selector.measured_bitrate(i, b.bitrate_bps, now);
            }
            if old.is_live(i) != table.is_live(i) {
                self.selector.layer_live(i, table.is_live(i), now);
            }
        }
    }

    /// One packet of layer `layer` (its rank) for this subscriber: `None` when the selector
    /// does not forward that layer now, else what `forwarder` decided.
    pub fn decide(
        &mut self,
        forwarder: &mut Forwarder,
        layer: u8,
        p: &SourcePacket,
        now: Instant,
    ) -> Option<Decision> {
        match self.selector.on_packet(layer.into(), p.keyframe, now) {
            LayerDecision::Drop => None,
            LayerDecision::Forward => Some(forwarder.decide_layer(p, now)),
            LayerDecision::SwitchAndForward => {
                self.vp8.resync();
                Some(forwarder.switch_layer(p, now))
            }
        }
    }

    /// The VP8 descriptor patch that keeps PictureID, TL0PICIDX and KEYIDX continuous across
    /// layers, for str0m to apply while it serializes (the shared payload is not touched).
    /// `None` when the descriptor stays as it is or cannot be patched in place.
    pub fn vp8_patch(&mut self, ssrc: u32, payload: &[u8]) -> Option<str0m::rtp::Vp8Patch> {
        let d = Vp8Descriptor::parse(payload).ok()?;
        let rw = self.vp8.rewrite(ssrc, &d);
        if rw.is_unchanged() || !rw.in_place() {
            return None;
        }
        let parsed = str0m::rtp::Vp8Descriptor::parse(payload).ok()?;
        let mut b = parsed.patch();
        if let Some(p) = rw.picture_id() {
            b = b.picture_id(p);
        }
        if let Some(t) = rw.tl0_pic_idx() {
            b = b.tl0_pic_idx(t);
        }
        if let Some(k) = rw.key_idx() {
            b = b.key_idx(k);
        }
        b.build().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::Quality;

    fn rids() -> Vec<Rid> {
        vec!["f".into(), "h".into(), "q".into()]
    }

    #[test]
    fn ranks_by_height_once_known_else_by_bitrate() {
        let t0 = Instant::now();
        let mut s = SimulcastRx::new(&rids(), t0).unwrap();
        // Offer order first.
        assert_eq!(s.on_packet(0, 1000, None, t0), 0);
        // "f" big, "q" small, "h" medium by bitrate.
        let t1 = t0 + Duration::from_millis(100);
        s.on_packet(0, 150_000, None, t1);
        s.on_packet(1, 60_000, None, t1);
        s.on_packet(2, 20_000, None, t1);
        let (table, changed) = s.tick(t0 + Duration::from_secs(1));
        assert!(changed);
        assert_eq!(s.rid_of_rank(0), Some("q".into()));
        assert_eq!(s.rid_of_rank(2), Some("f".into()));
        assert_eq!(table.count, 3);
        assert_eq!(table.live, 0b111);
        assert!(table.layers[0].bitrate_bps < table.layers[2].bitrate_bps);
        // Sizes win over bitrates once every live layer has one.
        let t2 = t0 + Duration::from_millis(1500);
        s.on_packet(0, 10, Some((320, 180)), t2);
        s.on_packet(1, 10, Some((1280, 720)), t2);
        s.on_packet(2, 10, Some((640, 360)), t2);
        let (table, _) = s.tick(t0 + Duration::from_secs(2));
        assert_eq!(s.rid_of_rank(0), Some("f".into()));
        assert_eq!(s.rid_of_rank(2), Some("h".into()));
        assert_eq!(table.layers[2].height, 720);
        assert_eq!(s.on_packet(1, 10, None, t2), 2);
    }

    #[test]
    fn silent_and_paused_layers_are_not_live() {
        let t0 = Instant::now();
        let mut s = SimulcastRx::new(&rids(), t0).unwrap();
        s.on_packet(0, 1000, None, t0);
        s.on_packet(1, 500, None, t0);
        s.on_packet(2, 100, None, t0);
        s.set_paused("h".into(), true);
        let (table, _) = s.tick(t0 + Duration::from_secs(1));
        assert_eq!(table.live.count_ones(), 2);
        let (table, _) = s.tick(t0 + Duration::from_secs(3));
        assert_eq!(table.live, 0, "nothing for 3 s");
    }

    /// One publisher layer for the tests: a VP8 stream, one packet per frame.
    struct Layer {
        raw: u8,
        ssrc: u32,
        seq: u16,
        ts: u32,
        size: (u16, u16),
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Frame {
        Delta,
        Key,
        /// A keyframe that says its picture size, as VP8 keyframes do.
        SizedKey,
    }

    /// Three layers q, h, f of one publisher, its shard's `SimulcastRx`, and one subscriber's
    /// `SubLayers` and `Forwarder`, driven as `Peer::forward` drives them.
    struct Rig {
        layers: [Layer; 3],
        rx: SimulcastRx,
        sub: Option<SubLayers>,
        fwd: Forwarder,
        now: Instant,
        /// Forwarded packets: (outgoing seq, source SSRC).
        sent: Vec<(u64, u32)>,
    }

    const Q: u32 = 0x1111_0001;
    const H: u32 = 0x2222_0002;
    const F: u32 = 0x3333_0003;

    impl Rig {
        fn new(now: Instant) -> Rig {
            let layer = |raw: u8, ssrc: u32, size| Layer {
                raw,
                ssrc,
                seq: (ssrc as u16).wrapping_mul(7),
                ts: ssrc.wrapping_mul(13),
                size,
            };
            Rig {
                layers: [
                    layer(0, Q, (320, 180)),
                    layer(1, H, (640, 360)),
                    layer(2, F, (1280, 720)),
                ],
                rx: SimulcastRx::new(&["q".into(), "h".into(), "f".into()], now).unwrap(),
                sub: None,
                fwd: Forwarder::new(
                    crate::sfu::ForwarderConfig {
                        clock_rate: 90_000,
                        is_video: true,
                    },
                    7,
                ),
                now,
                sent: Vec::new(),
            }
        }

        /// One frame on every layer, 33 ms after the last.
        fn round(&mut self, frame: Frame) {
            self.now += Duration::from_millis(33);
            let sub = self.sub.as_mut().expect("subscriber");
            for l in &mut self.layers {
                l.seq = l.seq.wrapping_add(1);
                l.ts = l.ts.wrapping_add(3_000);
                let keyframe = frame != Frame::Delta;
                let size = (frame == Frame::SizedKey).then_some(l.size);
                let rank = self.rx.on_packet(l.raw, 1_000, size, self.now);
                let p = SourcePacket {
                    ssrc: l.ssrc,
                    seq: l.seq,
                    timestamp: l.ts,
                    marker: true,
                    keyframe,
                    arrival: self.now,
                };
                if let Some(Decision::Forward { seq, .. }) =
                    sub.decide(&mut self.fwd, rank, &p, self.now)
                {
                    self.sent.push((seq, p.ssrc));
                }
            }
        }

        /// The source SSRCs forwarded from index `from` on.
        fn sources(&self, from: usize) -> Vec<u32> {
            self.sent[from..].iter().map(|s| s.1).collect()
        }
    }

    /// Ranks can change under a subscriber: here the layers are first ranked by bitrate (the
    /// middle layer measuring below the lowest, as a layer still ramping up does), then by
    /// height once keyframes give sizes. The subscriber must keep getting the layer it had, and
    /// a later switch must work. Before the fix its layer index kept pointing at a rank that
    /// now named another layer, one the forwarder had retired, and nothing reached the
    /// subscriber again (CI, chromium-simulcast-tc).
    #[test]
    fn a_reranking_keeps_the_forwarded_layer() {
        let t0 = Instant::now();
        let mut rig = Rig::new(t0);
        // By bitrate: h < q < f, so h is ranked 0 and q 1.
        rig.rx.on_packet(0, 40_000, None, t0);
        rig.rx.on_packet(1, 10_000, None, t0);
        rig.rx.on_packet(2, 100_000, None, t0);
        rig.now = t0 + Duration::from_secs(1);
        let (table, _) = rig.rx.tick(rig.now);
        assert_eq!(rig.rx.rid_of_rank(0), Some("h".into()));
        assert_eq!(rig.rx.rid_of_rank(1), Some("q".into()));

        // The subscriber is capped at the middle rank (q now) and starts on it.
        let cap = |quality| MaxLayer {
            quality: Some(quality),
            max_height: None,
        };
        rig.sub = Some(SubLayers::new(&table, cap(Quality::Mid), rig.now));
        rig.round(Frame::Key);
        assert_eq!(rig.sources(0), vec![Q]);
        // Capped at the lowest rank (h now): the switch happens on h's next keyframe.
        let sub = rig.sub.as_mut().unwrap();
        sub.selector.set_max(cap(Quality::Low), rig.now);
        rig.round(Frame::Key);
        assert_eq!(rig.sent.last().map(|s| s.1), Some(H));

        // Keyframes with sizes: ranked by height now, q 0, h 1, f 2.
        rig.round(Frame::SizedKey);
        rig.now += Duration::from_millis(500);
        let (table, changed) = rig.rx.tick(rig.now);
        assert!(changed);
        assert_eq!(rig.rx.rid_of_rank(0), Some("q".into()));
        rig.sub.as_mut().unwrap().update(&table, rig.now);

        // h keeps flowing until q, the lowest layer now, sends a keyframe; then q flows.
        let before = rig.sent.len();
        for _ in 0..10 {
            rig.round(Frame::Delta);
        }
        assert_eq!(
            rig.sources(before),
            vec![H; 10],
            "the forwarded layer changed with its rank"
        );
        rig.round(Frame::SizedKey);
        for _ in 0..10 {
            rig.round(Frame::Delta);
        }
        assert_eq!(
            rig.sources(before + 10),
            vec![Q; 11],
            "no switch to the lowest layer after the reranking"
        );
        let seqs: Vec<u64> = rig.sent.iter().map(|s| s.0).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "outgoing sequence numbers not continuous: {seqs:?}"
        );
    }

    /// After a new ranking (or new sizes), the selector's cost of each layer is the table's
    /// latest measurement, not the one it had before.
    #[test]
    fn a_reranking_brings_the_latest_bitrates() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut rx = SimulcastRx::new(&["q".into(), "h".into(), "f".into()], t0).unwrap();
        let window = |rx: &mut SimulcastRx, q: usize, h: usize, f: usize, size: bool, at| {
            let sized = |w, h| size.then_some((w, h));
            rx.on_packet(0, q, sized(320, 180), at);
            rx.on_packet(1, h, sized(640, 360), at);
            rx.on_packet(2, f, sized(1280, 720), at);
        };
        // By bitrate, h below q.
        window(&mut rx, 20_000, 10_000, 100_000, false, t0);
        let (table, _) = rx.tick(t0 + sec);
        let mut sub = SubLayers::new(&table, MaxLayer::default(), t0 + sec);
        // Same ranking, new bitrates: f measured at 1.2 Mbit/s.
        window(&mut rx, 20_000, 10_000, 150_000, false, t0 + sec);
        let (table, changed) = rx.tick(t0 + 2 * sec);
        assert!(!changed);
        sub.update(&table, t0 + 2 * sec);
        // Sizes: ranked q, h, f now, and f measures 2 Mbit/s.
        window(&mut rx, 20_000, 60_000, 250_000, true, t0 + 2 * sec);
        let (table, changed) = rx.tick(t0 + 3 * sec);
        assert!(changed);
        assert_eq!(table.layers[2].bitrate_bps, 2_000_000);
        sub.update(&table, t0 + 3 * sec);
        let cfg = LayerSelectorConfig::default();
        let top = 2_000_000 * u64::from(100 + cfg.upswitch_hysteresis_pct) / 100;
        assert_eq!(
            sub.selector.bwe_targets().map(|b| b.desired_bps),
            Some(top + cfg.audio_reserve_bps),
            "the top layer's cost is its latest measurement"
        );
    }

    #[test]
    fn one_rid_is_not_simulcast() {
        assert!(SimulcastRx::new(&["a".into()], Instant::now()).is_none());
    }
}
