//! Simulcast on a shard. On the publisher's side, [`SimulcastRx`] follows one video track's rid
//! layers: their bitrate, picture size and liveness, and their rank from low to high, which every
//! packet carries across the mesh. On a subscriber's side, [`SubLayers`] holds the subscriber's
//! `LayerSelector` and VP8 descriptor rewriter for one track.

use std::time::{Duration, Instant};

use str0m::media::Rid;

use crate::sfu::{
    LayerInfo, LayerSelector, LayerSelectorConfig, LayerTable, MaxLayer, Vp8Descriptor,
    Vp8Rewriter, MAX_LAYERS,
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

    /// A newer table from the publisher's shard: new sizes or layers reset the selector's
    /// layers, measured bitrates and liveness update them.
    pub fn update(&mut self, table: &LayerTable, now: Instant) {
        let old = self.table;
        self.table = *table;
        let same_shape = old.count == table.count
            && old
                .infos()
                .iter()
                .zip(table.infos())
                .all(|(a, b)| (a.width, a.height) == (b.width, b.height));
        if !same_shape {
            table.apply(&mut self.selector, now);
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

    #[test]
    fn one_rid_is_not_simulcast() {
        assert!(SimulcastRx::new(&["a".into()], Instant::now()).is_none());
    }
}
