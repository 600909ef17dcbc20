//! Per-subscriber, per-track forwarding decisions: drop, or forward with a rewritten sequence
//! number and timestamp, so the subscriber sees one continuous stream whatever the source does.

use std::time::{Duration, Instant};

use super::seq::SeqUnwrapper;

/// How far behind the newest forwarded packet (in source sequence numbers) a late packet may
/// still be forwarded.
const REORDER_WINDOW: u64 = 1000;

/// How many of the newest forwarded sequence numbers are remembered to catch duplicates.
const DUPLICATE_WINDOW: u64 = u64::BITS as u64;

/// How many replaced sources are remembered, so their stragglers do not switch back.
const RETIRED_SOURCES: usize = 4;

/// A replaced source stays blocked until it has been silent this long.
const RETIRED_QUIET: Duration = Duration::from_secs(1);

/// This many packets in a row of the current source, all too old to forward, mean the source
/// restarted its sequence numbers under the same SSRC: it is then treated like a new source.
const RESTART_AFTER_TOO_OLD: u32 = 16;

/// What a [`Forwarder`] needs to know about its track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// RTP clock rate of the track's codec (48000 for Opus, 90000 for video).
    pub clock_rate: u32,
    /// Video waits for a keyframe at start, after a source switch and after a resume; audio never
    /// waits.
    pub is_video: bool,
}

/// The fields of one publisher RTP packet that forwarding decisions need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePacket {
    /// The publisher's SSRC. A new SSRC on the track is a new source.
    pub ssrc: u32,
    /// RTP sequence number as received.
    pub seq: u16,
    /// RTP timestamp as received.
    pub timestamp: u32,
    /// RTP marker bit, passed through.
    pub marker: bool,
    /// Whether this packet starts a keyframe (see [`is_keyframe`](super::is_keyframe)).
    pub keyframe: bool,
    /// When the packet arrived at sluice.
    pub arrival: Instant,
}

/// What to do with one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it, rewritten.
    Forward {
        /// Extended outgoing sequence number (the low 16 bits go on the wire). The first one
        /// is below 2^15, chosen from the forwarder's seed.
        seq: u64,
        /// Outgoing RTP timestamp.
        timestamp: u32,
        /// Outgoing marker bit (the source's).
        marker: bool,
    },
    /// Do not send it.
    Drop(DropReason),
}

/// Why a packet was not forwarded; count these per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Video, at start, after a source switch or after a resume, until a keyframe arrives.
    WaitingForKeyframe,
    /// A repeat of one of the newest forwarded packets.
    Duplicate,
    /// Older than the reorder window, older than the point where this source was switched to
    /// (or resumed), or from a source that has since been replaced.
    TooOld,
    /// The forwarder is paused.
    Paused,
}

/// Makes one subscriber see one continuous RTP stream of one track.
///
/// The subscriber's SSRC is set by its WebRTC stack; the forwarder rewrites sequence numbers
/// and timestamps so that the stream stays continuous across source switches (a publisher
/// leaves and another publishes the same stream, with a new SSRC and random bases), source
/// wraps, pauses, and the forwarder's own drops, while gaps caused by loss upstream stay gaps
/// (so the subscriber's NACKs still name real packets).
///
/// Decisions come back as plain values; the forwarder does no I/O, reads no clock and does not
/// allocate.
///
/// # Call-order contract
///
/// 1. Create one with [`new`](Self::new) per (subscriber, track). Give each a different
///    `seed` (random, or a hash of the subscription): it picks the first outgoing sequence
///    number.
/// 2. For every RTP packet of the track's *primary* media stream (not RTX, not FEC), in the
///    order the shard receives them, call [`decide`](Self::decide) once, then act on the
///    [`Decision`]: on `Forward`, send the payload to the subscriber with that sequence number,
///    timestamp and marker; on `Drop`, count the reason and send nothing.
/// 3. After `decide` (once per loop turn is enough), if [`needs_keyframe`](Self::needs_keyframe)
///    is true, ask the publisher's [`KeyframeThrottle`](super::KeyframeThrottle) for a PLI.
///    Asking on every turn while it stays true is fine: the throttle coalesces.
/// 4. [`pause`](Self::pause) and [`resume`](Self::resume) may be called at any time between
///    `decide` calls.
/// 5. `now` never goes backwards from one call to the next, and a packet's `arrival` is not
///    after `now`. A violation gives odd timestamps, never a panic.
/// 6. Simulcast: feed only the packets a [`LayerSelector`](super::LayerSelector) lets through.
///    On `Forward` call [`decide_layer`](Self::decide_layer); on `SwitchAndForward` call
///    [`switch_layer`](Self::switch_layer); on `Drop` call nothing. Pause and resume through the
///    selector, not here, and take keyframe needs from the selector, plus `needs_keyframe` for
///    the current layer (a new publisher's SSRC on it is still a source switch, found by
///    `decide_layer`).
///
/// Feeding only one source at a time is not required: a new SSRC starts a switch, but for video
/// the current source keeps being forwarded until the new one delivers a keyframe, and once
/// replaced a source's stragglers are dropped (`TooOld`) until it has been silent for a second.
#[derive(Debug, Clone)]
pub struct Forwarder {
    cfg: ForwarderConfig,
    /// The first outgoing sequence number, chosen from the seed.
    first_seq: u64,
    paused: bool,
    /// The source being forwarded, once one has been locked on to.
    current: Option<Source>,
    /// After a resume: the current source's next new packet (video: its next keyframe)
    /// re-anchors the sequence mapping so the packets dropped meanwhile leave no gap.
    resume_pending: bool,
    /// Video: a new SSRC whose keyframe is awaited while the current source continues.
    switch_pending: Option<u32>,
    /// The newest packet forwarded so far: continuity across switches starts from it.
    last_out: Option<LastOut>,
    /// Sources replaced by a switch, and when each was last heard.
    retired: [Option<Retired>; RETIRED_SOURCES],
}

/// The mapping of the current source's sequence numbers and timestamps to outgoing ones.
#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    seq: SeqUnwrapper,
    /// outgoing extended seq = extended source seq + `seq_offset` (wrapping).
    seq_offset: u64,
    /// outgoing timestamp = source timestamp + `ts_offset` (wrapping).
    ts_offset: u32,
    /// Extended source seq where forwarding (re)started; anything older would collide with
    /// sequence numbers already sent.
    base: u64,
    /// Newest extended source seq forwarded.
    highest: u64,
    /// Bit `i` set: extended source seq `highest - i` was forwarded.
    recent: u64,
    /// Consecutive packets dropped as `TooOld`.
    too_old_run: u32,
}

#[derive(Debug, Clone, Copy)]
struct LastOut {
    seq: u64,
    timestamp: u32,
    arrival: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Retired {
    ssrc: u32,
    last_heard: Instant,
}

impl Forwarder {
    /// A forwarder for one (subscriber, track); `seed` picks the first outgoing sequence number.
    pub fn new(cfg: ForwarderConfig, seed: u32) -> Self {
        Self {
            cfg,
            first_seq: initial_seq(seed),
            paused: false,
            current: None,
            resume_pending: false,
            switch_pending: None,
            last_out: None,
            retired: [None; RETIRED_SOURCES],
        }
    }

    /// Decides what to do with `p` for this subscriber. See the call-order contract on the type.
    #[must_use]
    pub fn decide(&mut self, p: &SourcePacket, now: Instant) -> Decision {
        let is_current = self.current.is_some_and(|s| s.ssrc == p.ssrc);
        if self.paused {
            if let Some(src) = self.current.as_mut().filter(|_| is_current) {
                // Keep tracking wraps, so the mapping is still right after a long pause.
                src.seq.extend(p.seq);
            }
            return Decision::Drop(DropReason::Paused);
        }
        if is_current {
            return self.decide_current(p);
        }
        if self.is_retired(p.ssrc, now) {
            return Decision::Drop(DropReason::TooOld);
        }
        if self.cfg.is_video && !p.keyframe {
            self.switch_pending = Some(p.ssrc);
            return Decision::Drop(DropReason::WaitingForKeyframe);
        }
        self.switch_to(p, now)
    }

    /// A simulcast layer switch: makes `p` the current source's packet to continue from, as the
    /// [`LayerSelector`](super::LayerSelector) decided (call it instead of
    /// [`decide`](Self::decide) for the packet on which the selector answered
    /// [`SwitchAndForward`](super::LayerDecision::SwitchAndForward); every other forwarded
    /// packet still goes through `decide`).
    ///
    /// The selector is the authority here, so unlike a source switch found by `decide`, this
    /// neither waits for anything nor refuses a recently replaced SSRC (a switch back to the
    /// layer left a moment ago is normal in simulcast). The outgoing sequence number continues
    /// from the last one sent. The timestamp continues by the wall-clock time elapsed since the
    /// last packet sent (at least one tick) for another SSRC; for the SSRC already current (a
    /// resume on the same layer, after the selector dropped its packets) the source's own
    /// timestamp mapping is kept, since its clock ran on. Packets of this SSRC older than `p`
    /// are dropped afterwards as `TooOld`, so the dropped stretch leaves no gap.
    ///
    /// While [paused](Self::pause) it switches nothing and drops `p`: with a selector, pause
    /// through the selector, not the forwarder.
    #[must_use]
    pub fn switch_layer(&mut self, p: &SourcePacket, now: Instant) -> Decision {
        if self.paused {
            return Decision::Drop(DropReason::Paused);
        }
        self.forget_retired(p.ssrc);
        match self.current.filter(|s| s.ssrc == p.ssrc) {
            None => self.switch_to(p, now),
            Some(same) => {
                let next = self.last_out.map_or(self.first_seq, |l| l.seq + 1);
                let mut unwrapper = SeqUnwrapper::new();
                let ext = unwrapper.extend(p.seq);
                let source = Source {
                    ssrc: p.ssrc,
                    seq: unwrapper,
                    seq_offset: next.wrapping_sub(ext),
                    ts_offset: same.ts_offset,
                    base: ext,
                    highest: ext,
                    recent: 1,
                    too_old_run: 0,
                };
                let (seq, timestamp) = source.map(ext, p.timestamp);
                self.current = Some(source);
                self.switch_pending = None;
                self.resume_pending = false;
                self.last_out = Some(LastOut {
                    seq,
                    timestamp,
                    arrival: p.arrival,
                });
                Decision::Forward {
                    seq,
                    timestamp,
                    marker: p.marker,
                }
            }
        }
    }

    /// A packet of the layer a [`LayerSelector`](super::LayerSelector) forwards
    /// ([`Forward`](super::LayerDecision::Forward)): as [`decide`](Self::decide), except that
    /// a source replaced earlier is not refused. The selector is the authority on which layer
    /// flows, so a source other than the current one here (a new publisher on the layer, or a
    /// layer the selector's view and ours disagree on) is a switch: it waits for a keyframe
    /// (`needs_keyframe` says so) and is taken on it, never blocked for good.
    #[must_use]
    pub fn decide_layer(&mut self, p: &SourcePacket, now: Instant) -> Decision {
        if self.current.is_none_or(|s| s.ssrc != p.ssrc) {
            self.forget_retired(p.ssrc);
        }
        self.decide(p, now)
    }

    /// Whether a keyframe is needed from the publisher: video only, from the start until a
    /// keyframe is forwarded, while a new source is awaited, and after a resume until a keyframe
    /// is forwarded. Always false while paused.
    pub fn needs_keyframe(&self) -> bool {
        self.cfg.is_video
            && !self.paused
            && (self.current.is_none() || self.resume_pending || self.switch_pending.is_some())
    }

    /// Stops forwarding: every packet is dropped as [`DropReason::Paused`] until
    /// [`resume`](Self::resume).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Forwards again after [`pause`](Self::pause), continuing the outgoing sequence with no
    /// gap. Video waits for a keyframe first. Does nothing if not paused.
    pub fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.resume_pending = self.current.is_some();
        }
    }

    /// Whether the forwarder is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The SSRC of the source being forwarded, if any.
    pub fn source_ssrc(&self) -> Option<u32> {
        self.current.map(|s| s.ssrc)
    }

    /// A packet of the current source.
    fn decide_current(&mut self, p: &SourcePacket) -> Decision {
        let is_video = self.cfg.is_video;
        let Some(src) = self.current.as_mut() else {
            return Decision::Drop(DropReason::TooOld);
        };
        let ext = src.seq.extend(p.seq);

        if ext > src.highest {
            if self.resume_pending {
                if is_video && !p.keyframe {
                    return Decision::Drop(DropReason::WaitingForKeyframe);
                }
                // Re-anchor the sequence numbers after the last one sent; the timestamp
                // mapping stays, since the source's clock ran on while we were paused.
                let next = self.last_out.map_or(self.first_seq, |l| l.seq + 1);
                src.seq_offset = next.wrapping_sub(ext);
                src.base = ext;
                src.highest = ext;
                src.recent = 0;
                self.resume_pending = false;
            }
            let shift = ext - src.highest;
            src.recent = if shift >= DUPLICATE_WINDOW {
                0
            } else {
                src.recent << shift
            } | 1;
            src.highest = ext;
            src.too_old_run = 0;
            let (seq, timestamp) = src.map(ext, p.timestamp);
            self.last_out = Some(LastOut {
                seq,
                timestamp,
                arrival: p.arrival,
            });
            return Decision::Forward {
                seq,
                timestamp,
                marker: p.marker,
            };
        }

        let age = src.highest - ext;
        if ext < src.base || age > REORDER_WINDOW {
            src.too_old_run += 1;
            if src.too_old_run >= RESTART_AFTER_TOO_OLD {
                // The source restarted its numbering under the same SSRC: the mapping is
                // meaningless now. Its next packets are taken as a new source's.
                self.current = None;
                self.resume_pending = false;
            }
            return Decision::Drop(DropReason::TooOld);
        }
        if age < DUPLICATE_WINDOW {
            let bit = 1u64 << age;
            if src.recent & bit != 0 {
                return Decision::Drop(DropReason::Duplicate);
            }
            src.recent |= bit;
        }
        src.too_old_run = 0;
        let (seq, timestamp) = src.map(ext, p.timestamp);
        Decision::Forward {
            seq,
            timestamp,
            marker: p.marker,
        }
    }

    /// Locks on to a new source with `p` as its first forwarded packet.
    fn switch_to(&mut self, p: &SourcePacket, now: Instant) -> Decision {
        let (seq, timestamp) = match self.last_out {
            None => (self.first_seq, p.timestamp),
            Some(last) => {
                let elapsed = now.saturating_duration_since(last.arrival);
                let advance = ticks(elapsed, self.cfg.clock_rate).max(1);
                (last.seq + 1, last.timestamp.wrapping_add(advance))
            }
        };
        let mut unwrapper = SeqUnwrapper::new();
        let ext = unwrapper.extend(p.seq);
        let replaced = self.current.replace(Source {
            ssrc: p.ssrc,
            seq: unwrapper,
            seq_offset: seq.wrapping_sub(ext),
            ts_offset: timestamp.wrapping_sub(p.timestamp),
            base: ext,
            highest: ext,
            recent: 1,
            too_old_run: 0,
        });
        if let Some(old) = replaced {
            self.retire(old.ssrc, now);
        }
        self.forget_retired(p.ssrc);
        self.switch_pending = None;
        self.resume_pending = false;
        self.last_out = Some(LastOut {
            seq,
            timestamp,
            arrival: p.arrival,
        });
        Decision::Forward {
            seq,
            timestamp,
            marker: p.marker,
        }
    }

    /// Whether `ssrc` is a replaced source still being heard; hearing it keeps it blocked.
    fn is_retired(&mut self, ssrc: u32, now: Instant) -> bool {
        for slot in &mut self.retired {
            if let Some(r) = slot.as_mut().filter(|r| r.ssrc == ssrc) {
                if now.saturating_duration_since(r.last_heard) < RETIRED_QUIET {
                    r.last_heard = now;
                    return true;
                }
                *slot = None;
                return false;
            }
        }
        false
    }

    fn retire(&mut self, ssrc: u32, now: Instant) {
        self.forget_retired(ssrc);
        // An empty slot if there is one (None sorts first), else the longest silent.
        let oldest = self
            .retired
            .iter_mut()
            .min_by_key(|slot| slot.map(|r| r.last_heard));
        if let Some(slot) = oldest {
            *slot = Some(Retired {
                ssrc,
                last_heard: now,
            });
        }
    }

    fn forget_retired(&mut self, ssrc: u32) {
        for slot in &mut self.retired {
            if slot.is_some_and(|r| r.ssrc == ssrc) {
                *slot = None;
            }
        }
    }
}

impl Source {
    fn map(&self, ext: u64, timestamp: u32) -> (u64, u32) {
        (
            ext.wrapping_add(self.seq_offset),
            timestamp.wrapping_add(self.ts_offset),
        )
    }
}

/// `elapsed` in RTP clock ticks, modulo 2^32 (as RTP timestamps are).
fn ticks(elapsed: Duration, clock_rate: u32) -> u32 {
    let ticks = elapsed.as_nanos() * u128::from(clock_rate) / 1_000_000_000;
    ticks as u32
}

/// A well-mixed value below 2^15 from `seed` (the "lowbias32" integer hash).
fn initial_seq(seed: u32) -> u64 {
    let mut x = seed;
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    u64::from(x & 0x7fff)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIDEO: ForwarderConfig = ForwarderConfig {
        clock_rate: 90_000,
        is_video: true,
    };
    const AUDIO: ForwarderConfig = ForwarderConfig {
        clock_rate: 48_000,
        is_video: false,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A simulated publisher stream: one packet per frame unless told otherwise.
    struct Publisher {
        ssrc: u32,
        seq: u16,
        ts: u32,
        ts_step: u32,
    }

    impl Publisher {
        fn new(ssrc: u32, seq: u16, ts: u32, ts_step: u32) -> Self {
            Self {
                ssrc,
                seq,
                ts,
                ts_step,
            }
        }

        fn packet(&self, keyframe: bool, arrival: Instant) -> SourcePacket {
            SourcePacket {
                ssrc: self.ssrc,
                seq: self.seq,
                timestamp: self.ts,
                marker: true,
                keyframe,
                arrival,
            }
        }

        /// The next frame's packet, advancing the stream.
        fn next(&mut self, keyframe: bool, arrival: Instant) -> SourcePacket {
            let p = self.packet(keyframe, arrival);
            self.seq = self.seq.wrapping_add(1);
            self.ts = self.ts.wrapping_add(self.ts_step);
            p
        }
    }

    fn forwarded(d: Decision) -> (u64, u32) {
        match d {
            Decision::Forward { seq, timestamp, .. } => (seq, timestamp),
            Decision::Drop(reason) => panic!("expected Forward, got Drop({reason:?})"),
        }
    }

    fn dropped(d: Decision) -> DropReason {
        match d {
            Decision::Drop(reason) => reason,
            other => panic!("expected Drop, got {other:?}"),
        }
    }

    /// Sends `n` frames from `publisher` at `interval`, starting at `*t`; asserts that the
    /// output continues exactly from `last` (seq + 1, ts + step). Returns the new last output.
    fn run(
        f: &mut Forwarder,
        publisher: &mut Publisher,
        t: &mut Instant,
        interval: Duration,
        n: usize,
        mut last: (u64, u32),
    ) -> (u64, u32) {
        for _ in 0..n {
            *t += interval;
            let out = forwarded(f.decide(&publisher.next(false, *t), *t));
            assert_eq!(out.0, last.0 + 1, "seq continues");
            assert_eq!(
                out.1,
                last.1.wrapping_add(publisher.ts_step),
                "ts continues"
            );
            last = out;
        }
        last
    }

    #[test]
    fn video_waits_for_a_keyframe_at_start() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(VIDEO, 7);
        let mut a = Publisher::new(0xa, 1000, 5000, 3000);
        assert!(f.needs_keyframe());
        for i in 0..3 {
            let t = t0 + ms(33 * i);
            assert_eq!(
                dropped(f.decide(&a.next(false, t), t)),
                DropReason::WaitingForKeyframe
            );
            assert!(f.needs_keyframe());
        }
        let t = t0 + ms(100);
        let key = a.next(true, t);
        let (seq, ts) = forwarded(f.decide(&key, t));
        assert_eq!(seq, initial_seq(7), "the dropped deltas leave no gap");
        assert_eq!(
            ts, key.timestamp,
            "the first source's timestamps pass through"
        );
        assert!(!f.needs_keyframe());
        assert_eq!(f.source_ssrc(), Some(0xa));
    }

    #[test]
    fn first_output_seq_is_low_and_depends_on_the_seed() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..1000 {
            let s = initial_seq(seed);
            assert!(s < 1 << 15);
            seen.insert(s);
        }
        assert!(seen.len() > 900, "seeds spread: {}", seen.len());
    }

    #[test]
    fn audio_forwards_from_the_first_packet() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(AUDIO, 3);
        assert!(!f.needs_keyframe());
        let mut a = Publisher::new(0xa, 9, 77, 960);
        let first = forwarded(f.decide(&a.next(false, t0), t0));
        assert_eq!(first, (initial_seq(3), 77));
        let mut t = t0;
        run(&mut f, &mut a, &mut t, ms(20), 50, first);
        assert!(!f.needs_keyframe());
    }

    #[test]
    fn source_switch_mid_stream_continues_seq_and_ts() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 11);
        let mut a = Publisher::new(0xa, 31_000, 1_000_000, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 29, first);

        // A leaves; B publishes the same stream 33 ms later with unrelated bases.
        let mut b = Publisher::new(0xb, 50_000, 123_456_789, 3000);
        t += ms(33);
        let (seq, ts) = forwarded(f.decide(&b.next(true, t), t));
        assert_eq!(seq, last.0 + 1);
        assert_eq!(
            ts,
            last.1 + 33 * 90,
            "advance by the elapsed time at 90 kHz"
        );
        assert_eq!(f.source_ssrc(), Some(0xb));
        assert!(!f.needs_keyframe());

        // Then B's own spacing, through a fixed offset.
        run(&mut f, &mut b, &mut t, ms(33), 100, (seq, ts));
    }

    #[test]
    fn switch_advances_timestamp_by_elapsed_time_and_at_least_one() {
        let t0 = Instant::now();
        let mut f = Forwarder::new(AUDIO, 1);
        let a = Publisher::new(0xa, 0, 0, 960);
        let first = forwarded(f.decide(&a.packet(false, t0), t0));

        // Same instant: still moves forward by one tick.
        let b = Publisher::new(0xb, 500, 999, 960);
        let (_, ts) = forwarded(f.decide(&b.packet(false, t0), t0));
        assert_eq!(ts, first.1 + 1);

        // One and a half seconds later, decided at `now` (arrival earlier still counts as now).
        let c = Publisher::new(0xc, 7, 4, 960);
        let now = t0 + ms(1_500);
        let (_, ts2) = forwarded(f.decide(&c.packet(false, now - ms(5)), now));
        assert_eq!(ts2, ts + 72_000);
    }

    #[test]
    fn source_seq_and_ts_wraps_stay_continuous() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 5);
        // Both counters wrap within the first few frames.
        let mut a = Publisher::new(0xa, 65_530, u32::MAX - 6_500, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 20, first);
        assert_eq!(last.0, first.0 + 20);

        // A new source that also wraps right away.
        let mut b = Publisher::new(0xb, 65_534, u32::MAX - 1000, 3000);
        t += ms(33);
        let (seq, ts) = forwarded(f.decide(&b.next(true, t), t));
        assert_eq!((seq, ts), (last.0 + 1, last.1.wrapping_add(2970)));
        run(&mut f, &mut b, &mut t, ms(33), 20, (seq, ts));
    }

    #[test]
    fn output_crosses_its_own_16_bit_boundary_as_an_extended_seq() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 9);
        let mut a = Publisher::new(0xa, 100, 0, 960);
        let first = forwarded(f.decide(&a.next(false, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(20), 70_000, first);
        assert_eq!(last.0, first.0 + 70_000);
        assert!(last.0 > u64::from(u16::MAX));
    }

    #[test]
    fn new_source_starting_with_delta_frames_is_dropped_until_keyframe_without_gap() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 2);
        let mut a = Publisher::new(0xa, 10, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 9, first);
        let last_at = t;

        // A is gone. B joins mid-GOP: five deltas, then the keyframe our PLI asked for.
        let mut b = Publisher::new(0xb, 4_000, 900_000, 3000);
        for _ in 0..5 {
            t += ms(33);
            assert_eq!(
                dropped(f.decide(&b.next(false, t), t)),
                DropReason::WaitingForKeyframe
            );
            assert!(f.needs_keyframe());
        }
        t += ms(33);
        let (seq, ts) = forwarded(f.decide(&b.next(true, t), t));
        assert_eq!(seq, last.0 + 1, "no gap for the deltas we dropped");
        let elapsed_ticks = (t - last_at).as_millis() as u32 * 90;
        assert_eq!(ts, last.1 + elapsed_ticks);
        assert!(!f.needs_keyframe());
        run(&mut f, &mut b, &mut t, ms(33), 10, (seq, ts));
    }

    #[test]
    fn old_source_keeps_flowing_until_the_new_source_keyframe() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 2);
        let mut a = Publisher::new(0xa, 10, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let mut last = run(&mut f, &mut a, &mut t, ms(33), 5, first);

        // B appears while A still sends: A keeps going, B waits for its keyframe.
        let mut b = Publisher::new(0xb, 60_000, 5, 3000);
        for _ in 0..3 {
            t += ms(16);
            assert_eq!(
                dropped(f.decide(&b.next(false, t), t)),
                DropReason::WaitingForKeyframe
            );
            assert!(f.needs_keyframe());
            last = run(&mut f, &mut a, &mut t, ms(17), 1, last);
        }
        t += ms(16);
        let (seq, _) = forwarded(f.decide(&b.next(true, t), t));
        assert_eq!(seq, last.0 + 1);
        assert_eq!(f.source_ssrc(), Some(0xb));

        // A's last in-flight packets are now stragglers.
        t += ms(1);
        assert_eq!(dropped(f.decide(&a.next(false, t), t)), DropReason::TooOld);
        assert!(!f.needs_keyframe());
    }

    #[test]
    fn loss_in_the_source_stays_a_gap_in_the_output() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 4);
        let mut a = Publisher::new(0xa, 65_533, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        // Lose three packets (across the source's wrap).
        for _ in 0..3 {
            a.next(false, t);
        }
        t += ms(132);
        let (seq, ts) = forwarded(f.decide(&a.next(false, t), t));
        assert_eq!(
            seq,
            first.0 + 4,
            "three missing numbers, for the subscriber to NACK"
        );
        assert_eq!(ts, first.1 + 4 * 3000);
    }

    #[test]
    fn reordered_packets_map_through_the_same_offset() {
        let t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 4);
        let a = Publisher::new(0xa, 65_534, 100, 3000);
        let pkt = |i: u16| SourcePacket {
            seq: a.seq.wrapping_add(i),
            timestamp: a.ts.wrapping_add(u32::from(i) * 3000),
            ..a.packet(i == 0, t)
        };
        let base = forwarded(f.decide(&pkt(0), t));
        // Arrival order 0, 2, 1, 4, 3 (across the source's 65535 -> 0 wrap).
        for i in [2u16, 1, 4, 3] {
            let (seq, ts) = forwarded(f.decide(&pkt(i), t));
            assert_eq!(seq, base.0 + u64::from(i));
            assert_eq!(ts, base.1 + u32::from(i) * 3000);
        }
        // A packet 800 behind the newest, still inside the window, goes to its own place.
        for i in (5..900u16).filter(|&i| i != 100) {
            forwarded(f.decide(&pkt(i), t));
        }
        let (seq, ts) = forwarded(f.decide(&pkt(100), t));
        assert_eq!((seq, ts), (base.0 + 100, base.1 + 100 * 3000));
    }

    #[test]
    fn duplicates_of_recent_packets_are_dropped() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 4);
        let mut a = Publisher::new(0xa, 200, 0, 960);
        let p0 = a.next(false, t);
        let first = forwarded(f.decide(&p0, t));
        assert_eq!(dropped(f.decide(&p0, t)), DropReason::Duplicate);
        let mut sent = vec![p0];
        for _ in 0..63 {
            t += ms(20);
            let p = a.next(false, t);
            forwarded(f.decide(&p, t));
            sent.push(p);
        }
        // Every one of the newest 64 is caught, including the very first.
        for p in &sent {
            assert_eq!(dropped(f.decide(p, t)), DropReason::Duplicate);
        }
        // Duplicates did not disturb the stream.
        run(&mut f, &mut a, &mut t, ms(20), 5, (first.0 + 63, 63 * 960));
    }

    #[test]
    fn duplicate_of_a_reordered_packet_is_dropped() {
        let t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 4);
        let a = Publisher::new(0xa, 10, 0, 960);
        let pkt = |i: u16| SourcePacket {
            seq: 10 + i,
            ..a.packet(false, t)
        };
        forwarded(f.decide(&pkt(0), t));
        forwarded(f.decide(&pkt(2), t));
        forwarded(f.decide(&pkt(1), t));
        assert_eq!(dropped(f.decide(&pkt(1), t)), DropReason::Duplicate);
        assert_eq!(dropped(f.decide(&pkt(2), t)), DropReason::Duplicate);
    }

    #[test]
    fn packets_older_than_the_reorder_window_are_too_old() {
        let t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 4);
        let a = Publisher::new(0xa, 0, 0, 960);
        let pkt = |i: u16| SourcePacket {
            seq: i,
            timestamp: u32::from(i) * 960,
            ..a.packet(false, t)
        };
        for i in (0..1500).filter(|i| i % 100 != 50) {
            forwarded(f.decide(&pkt(i), t));
        }
        // 1499 is the newest; 450 is 1049 behind, 550 is 949 behind.
        assert_eq!(dropped(f.decide(&pkt(450), t)), DropReason::TooOld);
        let (seq, ts) = forwarded(f.decide(&pkt(550), t));
        let (seq0, ts0) = (initial_seq(4), 0);
        assert_eq!((seq, ts), (seq0 + 550, ts0 + 550 * 960));
    }

    #[test]
    fn packets_from_before_the_switch_point_are_too_old() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 8);
        let mut a = Publisher::new(0xa, 0, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 3, first);

        // B's packets 0..3; its keyframe (2) overtakes 0 and 1.
        let b = Publisher::new(0xb, 65_535, 0, 3000);
        t += ms(33);
        let pkt = |i: u16, key: bool| SourcePacket {
            seq: b.seq.wrapping_add(i),
            timestamp: u32::from(i) * 3000,
            ..b.packet(key, t)
        };
        let (seq, _) = forwarded(f.decide(&pkt(2, true), t));
        assert_eq!(seq, last.0 + 1);
        // 0 and 1 would need numbers already used by A: dropped.
        assert_eq!(dropped(f.decide(&pkt(0, false), t)), DropReason::TooOld);
        assert_eq!(dropped(f.decide(&pkt(1, false), t)), DropReason::TooOld);
        assert_eq!(forwarded(f.decide(&pkt(3, false), t)).0, seq + 1);
    }

    #[test]
    fn audio_switch_does_not_wait_for_a_keyframe() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 6);
        let mut a = Publisher::new(0xa, 40_000, 3_000_000_000, 960);
        let first = forwarded(f.decide(&a.next(false, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(20), 49, first);

        // B's first packet, 60 ms after A's last (two packets' worth of silence).
        let mut b = Publisher::new(0xb, 3, 17, 960);
        t += ms(60);
        let (seq, ts) = forwarded(f.decide(&b.next(false, t), t));
        assert_eq!(seq, last.0 + 1);
        assert_eq!(ts, last.1 + 60 * 48);
        assert!(!f.needs_keyframe());
        run(&mut f, &mut b, &mut t, ms(20), 50, (seq, ts));
    }

    #[test]
    fn stragglers_from_a_replaced_source_do_not_switch_back() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 6);
        let mut a = Publisher::new(0xa, 0, 0, 960);
        let first = forwarded(f.decide(&a.next(false, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(20), 10, first);

        let mut b = Publisher::new(0xb, 1000, 1000, 960);
        t += ms(20);
        let mut out = forwarded(f.decide(&b.next(false, t), t));
        assert_eq!(out.0, last.0 + 1);
        // A's in-flight packets, interleaved with B's, for a while.
        for _ in 0..5 {
            assert_eq!(dropped(f.decide(&a.next(false, t), t)), DropReason::TooOld);
            out = run(&mut f, &mut b, &mut t, ms(20), 1, out);
        }
        assert_eq!(f.source_ssrc(), Some(0xb));
    }

    #[test]
    fn replaced_source_that_keeps_sending_stays_replaced() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 6);
        let mut a = Publisher::new(0xa, 0, 0, 960);
        forwarded(f.decide(&a.next(false, t), t));
        let mut b = Publisher::new(0xb, 1000, 1000, 960);
        t += ms(20);
        let mut out = forwarded(f.decide(&b.next(false, t), t));
        // The old publisher's session lingers, sending for three more seconds.
        for _ in 0..150 {
            assert_eq!(dropped(f.decide(&a.next(false, t), t)), DropReason::TooOld);
            out = run(&mut f, &mut b, &mut t, ms(20), 1, out);
        }
        assert_eq!(f.source_ssrc(), Some(0xb));
    }

    #[test]
    fn replaced_source_returning_after_silence_is_a_new_switch() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 6);
        let mut a = Publisher::new(0xa, 0, 0, 960);
        let mut out = forwarded(f.decide(&a.next(false, t), t));
        let mut b = Publisher::new(0xb, 1000, 1000, 960);
        t += ms(20);
        out = (out.0 + 1, forwarded(f.decide(&b.next(false, t), t)).1);
        out = run(&mut f, &mut b, &mut t, ms(20), 100, out);
        // A client with a fixed SSRC publishes again, two seconds after it was replaced.
        let mut a2 = Publisher::new(0xa, 30_000, 5, 960);
        t += ms(20);
        let (seq, ts) = forwarded(f.decide(&a2.next(false, t), t));
        assert_eq!((seq, ts), (out.0 + 1, out.1 + 960));
        assert_eq!(f.source_ssrc(), Some(0xa));
        run(&mut f, &mut a2, &mut t, ms(20), 10, (seq, ts));
    }

    #[test]
    fn pause_drops_and_resume_waits_for_a_keyframe_without_gap() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 12);
        let mut a = Publisher::new(0xa, 65_000, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 10, first);

        f.pause();
        assert!(f.is_paused());
        assert!(!f.needs_keyframe(), "no keyframe requests while paused");
        // Long enough (22 minutes) for the source's sequence numbers to move more than half
        // their range, and wrap, while we drop.
        for _ in 0..40_000 {
            t += ms(33);
            assert_eq!(dropped(f.decide(&a.next(false, t), t)), DropReason::Paused);
        }
        f.resume();
        assert!(f.needs_keyframe());
        for _ in 0..3 {
            t += ms(33);
            assert_eq!(
                dropped(f.decide(&a.next(false, t), t)),
                DropReason::WaitingForKeyframe
            );
        }
        t += ms(33);
        let key = a.next(true, t);
        let (seq, ts) = forwarded(f.decide(&key, t));
        assert_eq!(seq, last.0 + 1, "nothing dropped by pausing shows as a gap");
        assert_eq!(
            ts,
            last.1.wrapping_add(40_004 * 3000),
            "the source clock ran on meanwhile"
        );
        assert!(!f.needs_keyframe());
        run(&mut f, &mut a, &mut t, ms(33), 10, (seq, ts));
    }

    #[test]
    fn late_packet_from_before_the_pause_keeps_its_old_place() {
        let t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 12);
        let a = Publisher::new(0xa, 100, 0, 3000);
        let pkt = |i: u16, key: bool| SourcePacket {
            seq: 100 + i,
            timestamp: u32::from(i) * 3000,
            ..a.packet(key, t)
        };
        let first = forwarded(f.decide(&pkt(0, true), t));
        forwarded(f.decide(&pkt(2, false), t));
        f.pause();
        f.resume();
        // 1 was sent before the pause but arrives after: it fills its own gap.
        assert_eq!(forwarded(f.decide(&pkt(1, false), t)).0, first.0 + 1);
        assert!(f.needs_keyframe());
        assert_eq!(forwarded(f.decide(&pkt(3, true), t)).0, first.0 + 3);
    }

    #[test]
    fn audio_resume_continues_without_gap() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 12);
        let mut a = Publisher::new(0xa, 10, 0, 960);
        let first = forwarded(f.decide(&a.next(false, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(20), 10, first);
        f.pause();
        for _ in 0..50 {
            t += ms(20);
            assert_eq!(dropped(f.decide(&a.next(false, t), t)), DropReason::Paused);
        }
        f.resume();
        assert!(!f.needs_keyframe());
        t += ms(20);
        let (seq, ts) = forwarded(f.decide(&a.next(false, t), t));
        assert_eq!((seq, ts), (last.0 + 1, last.1 + 51 * 960));
    }

    #[test]
    fn pause_and_resume_are_idempotent() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 12);
        let mut a = Publisher::new(0xa, 10, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        // Resume without pause: no keyframe wait.
        f.resume();
        assert!(!f.needs_keyframe());
        let last = run(&mut f, &mut a, &mut t, ms(33), 2, first);
        f.pause();
        f.pause();
        f.resume();
        f.resume();
        assert!(!f.is_paused());
        t += ms(33);
        let (seq, _) = forwarded(f.decide(&a.next(true, t), t));
        assert_eq!(seq, last.0 + 1);
    }

    #[test]
    fn switch_while_paused_is_taken_on_resume() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 12);
        let mut a = Publisher::new(0xa, 10, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        f.pause();
        let mut b = Publisher::new(0xb, 500, 77, 3000);
        t += ms(33);
        assert_eq!(dropped(f.decide(&b.next(true, t), t)), DropReason::Paused);
        f.resume();
        t += ms(33);
        assert_eq!(
            dropped(f.decide(&b.next(false, t), t)),
            DropReason::WaitingForKeyframe
        );
        t += ms(33);
        let (seq, ts) = forwarded(f.decide(&b.next(true, t), t));
        assert_eq!((seq, ts), (first.0 + 1, first.1 + 99 * 90));
    }

    #[test]
    fn sequence_restart_under_the_same_ssrc_recovers() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 13);
        let mut a = Publisher::new(0xa, 40_000, 0, 3000);
        let first = forwarded(f.decide(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 10, first);
        // The client restarts with a fixed SSRC: numbering jumps half the space away.
        let mut a2 = Publisher::new(0xa, 40_011 - 30_000, 9_999, 3000);
        for _ in 0..RESTART_AFTER_TOO_OLD {
            t += ms(33);
            assert_eq!(dropped(f.decide(&a2.next(false, t), t)), DropReason::TooOld);
        }
        assert!(f.needs_keyframe());
        t += ms(33);
        let (seq, ts) = forwarded(f.decide(&a2.next(true, t), t));
        assert_eq!(seq, last.0 + 1);
        let elapsed = (RESTART_AFTER_TOO_OLD + 1) * 33 * 90;
        assert_eq!(ts, last.1 + elapsed);
    }

    #[test]
    fn scattered_too_old_packets_are_not_a_restart() {
        let t = Instant::now();
        let mut f = Forwarder::new(AUDIO, 13);
        let a = Publisher::new(0xa, 0, 0, 960);
        let pkt = |i: u16| SourcePacket {
            seq: i,
            timestamp: u32::from(i) * 960,
            ..a.packet(false, t)
        };
        // 0..3000 with every odd number in 2100..2200 missing; newest is 2999.
        for i in (0..3000).filter(|i| !(2100..2200).contains(i) || i % 2 == 0) {
            forwarded(f.decide(&pkt(i), t));
        }
        // Very late packets (hopeless) interleaved with late ones still in the window.
        for k in 0..2 * RESTART_AFTER_TOO_OLD as u16 {
            assert_eq!(dropped(f.decide(&pkt(100 + k), t)), DropReason::TooOld);
            forwarded(f.decide(&pkt(2101 + 2 * k), t));
        }
        assert_eq!(f.source_ssrc(), Some(0xa));
        assert_eq!(forwarded(f.decide(&pkt(3000), t)).0, initial_seq(13) + 3000);
    }

    #[test]
    fn long_run_with_random_switches_is_continuous() {
        // xorshift64, seeded: bases, switch points, keyframe timing and gaps between sources.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rng = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for cfg in [VIDEO, AUDIO] {
            let mut t = Instant::now();
            let mut f = Forwarder::new(cfg, rng() as u32);
            let mut last: Option<(u64, u32)> = None;
            for source in 0..200u32 {
                let step = if cfg.is_video { 3000 } else { 960 };
                let mut p = Publisher::new(source + 1, rng() as u16, rng() as u32, step);
                t += ms(rng() % 500);
                // Video: a few deltas before the keyframe (dropped, no gap).
                let deltas = if cfg.is_video { rng() % 4 } else { 0 };
                for _ in 0..deltas {
                    t += ms(33);
                    assert_eq!(
                        dropped(f.decide(&p.next(false, t), t)),
                        DropReason::WaitingForKeyframe
                    );
                }
                t += ms(20);
                let out = forwarded(f.decide(&p.next(true, t), t));
                if let Some((seq, ts)) = last {
                    assert_eq!(out.0, seq + 1);
                    let advance = out.1.wrapping_sub(ts);
                    assert!(advance > 0 && advance < 1 << 31, "ts moves forward");
                }
                let n = (rng() % 400) as usize;
                last = Some(run(&mut f, &mut p, &mut t, ms(20), n, out));
            }
        }
    }

    // ---- simulcast layer switches (switch_layer) ----

    #[test]
    fn layer_switch_continues_seq_and_advances_ts_by_elapsed_time() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 21);
        let mut high = Publisher::new(0x41, 1_000, 50_000, 3000);
        let mut low = Publisher::new(0x40, 30_000, 7_000_000, 3000);
        let first = forwarded(f.switch_layer(&high.next(true, t), t));
        assert_eq!(
            first,
            (initial_seq(21), 50_000),
            "first layer passes its timestamp"
        );
        let last = run(&mut f, &mut high, &mut t, ms(33), 10, first);
        // The low layer's keyframe, 12 ms after the last high packet.
        t += ms(12);
        let (seq, ts) = forwarded(f.switch_layer(&low.next(true, t), t));
        assert_eq!((seq, ts), (last.0 + 1, last.1 + 12 * 90));
        assert_eq!(f.source_ssrc(), Some(0x40));
        assert!(!f.needs_keyframe());
        run(&mut f, &mut low, &mut t, ms(33), 10, (seq, ts));
    }

    #[test]
    fn layer_switch_back_within_a_second_is_taken() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 22);
        let mut high = Publisher::new(0x41, 1_000, 0, 3000);
        let mut low = Publisher::new(0x40, 9_000, 0, 3000);
        let mut out = forwarded(f.switch_layer(&high.next(true, t), t));
        out = run(&mut f, &mut high, &mut t, ms(33), 5, out);
        t += ms(33);
        low.next(false, t);
        out = (
            out.0 + 1,
            forwarded(f.switch_layer(&low.next(true, t), t)).1,
        );
        out = run(&mut f, &mut low, &mut t, ms(33), 5, out);
        // Back up 200 ms after leaving it. `decide` would take the high layer for a replaced
        // source's straggler and refuse it; the selector's word is final.
        t += ms(33);
        let key = high.next(true, t);
        assert_eq!(
            dropped(f.clone().decide(&key, t)),
            DropReason::TooOld,
            "why switch_layer exists"
        );
        let (seq, _) = forwarded(f.switch_layer(&key, t));
        assert_eq!(seq, out.0 + 1);
        assert_eq!(f.source_ssrc(), Some(0x41));
        let (seq2, _) = forwarded(f.decide(&high.next(false, t + ms(33)), t + ms(33)));
        assert_eq!(seq2, seq + 1);
    }

    #[test]
    fn layer_switch_to_the_same_ssrc_closes_the_gap_and_keeps_its_clock() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 23);
        let mut a = Publisher::new(0x40, 65_000, u32::MAX - 10_000, 3000);
        let first = forwarded(f.switch_layer(&a.next(true, t), t));
        let last = run(&mut f, &mut a, &mut t, ms(33), 5, first);
        // The selector paused video: 40 000 packets never reach the forwarder (its sequence
        // numbers wrap meanwhile).
        for _ in 0..40_000 {
            t += ms(33);
            a.next(false, t);
        }
        t += ms(33);
        let key = a.next(true, t);
        let (seq, ts) = forwarded(f.switch_layer(&key, t));
        assert_eq!(seq, last.0 + 1, "no gap for what the selector dropped");
        assert_eq!(
            ts,
            last.1.wrapping_add(40_001 * 3000),
            "the source clock ran on"
        );
        run(&mut f, &mut a, &mut t, ms(33), 5, (seq, ts));
        // A packet from before the resume point would collide with numbers already sent.
        let old = SourcePacket {
            seq: key.seq.wrapping_sub(3),
            ..key
        };
        assert_eq!(dropped(f.decide(&old, t)), DropReason::TooOld);
    }

    #[test]
    fn a_selected_layer_is_never_refused_as_replaced() {
        let mut t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 25);
        let mut a = Publisher::new(0x40, 100, 0, 3000);
        let mut b = Publisher::new(0x41, 7_000, 0, 3000);
        let mut out = forwarded(f.switch_layer(&a.next(true, t), t));
        out = run(&mut f, &mut a, &mut t, ms(33), 3, out);
        t += ms(33);
        out = (out.0 + 1, forwarded(f.switch_layer(&b.next(true, t), t)).1);
        out = run(&mut f, &mut b, &mut t, ms(33), 3, out);
        // The selector now says a is the layer it forwards, while a keeps sending.
        t += ms(33);
        let delta = a.next(false, t);
        assert_eq!(dropped(f.clone().decide(&delta, t)), DropReason::TooOld);
        assert_eq!(
            dropped(f.decide_layer(&delta, t)),
            DropReason::WaitingForKeyframe
        );
        assert!(f.needs_keyframe());
        t += ms(33);
        let (seq, _) = forwarded(f.decide_layer(&a.next(true, t), t));
        assert_eq!(seq, out.0 + 1);
        assert_eq!(f.source_ssrc(), Some(0x40));
        assert!(!f.needs_keyframe());
    }

    #[test]
    fn layer_switch_while_paused_drops() {
        let t = Instant::now();
        let mut f = Forwarder::new(VIDEO, 24);
        let a = Publisher::new(0x40, 5, 0, 3000);
        f.pause();
        assert_eq!(
            dropped(f.switch_layer(&a.packet(true, t), t)),
            DropReason::Paused
        );
        assert_eq!(f.source_ssrc(), None);
    }
}
