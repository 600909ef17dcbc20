//! Receiver-side accounting: per-stream loss, reordering and duplicates from probe sequence
//! numbers; counts per one-second bucket of send time; and the percentile math of the report.
//! Pure data, no clocks or I/O: everything here is unit tested.

use hdrhistogram::Histogram;
use serde::Serialize;

/// How far back (in packets) duplicates are recognised. Older stragglers are counted as
/// `too_old` and not as received.
pub const REORDER_WINDOW: u64 = 1024;
const WORDS: usize = (REORDER_WINDOW / 64) as usize;

/// What one arriving packet was, relative to those seen before on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The highest sequence so far (perhaps after a gap).
    InOrder,
    /// First time seen, but a higher sequence had already arrived.
    Reordered,
    /// Seen before.
    Duplicate,
    /// Older than the reorder window: cannot tell a duplicate, so not counted as received.
    TooOld,
}

/// Tracks one received stream's probe sequence numbers.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// Highest sequence seen, if any.
    highest: Option<u64>,
    /// Bit `i` set: sequence `highest - i` has been seen.
    seen: [u64; WORDS],
}

impl Default for SeqTracker {
    fn default() -> Self {
        SeqTracker {
            highest: None,
            seen: [0; WORDS],
        }
    }
}

impl SeqTracker {
    pub fn on_packet(&mut self, seq: u32) -> Arrival {
        let seq = seq as u64;
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            self.seen = [0; WORDS];
            self.seen[0] = 1;
            return Arrival::InOrder;
        };
        if seq > highest {
            self.shift(seq - highest);
            self.highest = Some(seq);
            self.seen[0] |= 1;
            return Arrival::InOrder;
        }
        let back = highest - seq;
        if back >= REORDER_WINDOW {
            return Arrival::TooOld;
        }
        let (word, bit) = ((back / 64) as usize, back % 64);
        if self.seen[word] & (1 << bit) != 0 {
            Arrival::Duplicate
        } else {
            self.seen[word] |= 1 << bit;
            Arrival::Reordered
        }
    }

    /// Age every mark by `by` positions (the window moves forward).
    fn shift(&mut self, by: u64) {
        if by >= REORDER_WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |s| self.seen[s] << bits);
            let lo = match src.and_then(|s| s.checked_sub(1)) {
                Some(s) if bits > 0 => self.seen[s] >> (64 - bits),
                _ => 0,
            };
            self.seen[i] = hi | lo;
        }
    }
}

/// What the subscribers of one shard saw of the packets sent during one bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecvCounts {
    /// Distinct packets received (duplicates and too-old stragglers excluded).
    pub received: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub too_old: u64,
    /// Arrived after the bucket was closed and reported (more than the grace period late).
    pub late: u64,
}

impl RecvCounts {
    pub fn count(&mut self, a: Arrival) {
        match a {
            Arrival::InOrder => self.received += 1,
            Arrival::Reordered => {
                self.received += 1;
                self.reordered += 1;
            }
            Arrival::Duplicate => self.duplicates += 1,
            Arrival::TooOld => self.too_old += 1,
        }
    }

    pub fn add(&mut self, o: &RecvCounts) {
        self.received += o.received;
        self.reordered += o.reordered;
        self.duplicates += o.duplicates;
        self.too_old += o.too_old;
        self.late += o.late;
    }
}

/// A latency histogram in microseconds: 1 us to 60 s, three significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Record one latency, clamped into the histogram's range.
pub fn record_latency(h: &mut Histogram<u64>, micros: u64) {
    let _ = h.record(micros.clamp(1, 60_000_000));
}

/// The latency percentiles of the report, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Nearest-rank percentile (`q` in 0..=1) of already sorted values: the smallest value with at
/// least `q` of the values at or below it. `None` for no values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Loss as a fraction of what was expected (0 when nothing was expected).
pub fn loss_ratio(expected: u64, received: u64) -> f64 {
    if expected == 0 {
        0.0
    } else {
        expected.saturating_sub(received) as f64 / expected as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u32]) -> (RecvCounts, Vec<Arrival>) {
        let mut t = SeqTracker::default();
        let mut c = RecvCounts::default();
        let arrivals = seqs
            .iter()
            .map(|&s| {
                let a = t.on_packet(s);
                c.count(a);
                a
            })
            .collect();
        (c, arrivals)
    }

    #[test]
    fn in_order_stream_counts_every_packet_once() {
        let seqs: Vec<u32> = (0..5000).collect();
        let (c, _) = run(&seqs);
        assert_eq!(c.received, 5000);
        assert_eq!(c.reordered + c.duplicates + c.too_old, 0);
    }

    #[test]
    fn gaps_are_loss_not_reordering() {
        // 3, 4 and 7 lost.
        let (c, a) = run(&[0, 1, 2, 5, 6, 8, 9]);
        assert_eq!(c.received, 7);
        assert_eq!(c.reordered, 0);
        assert!(a.iter().all(|&x| x == Arrival::InOrder));
        assert!((loss_ratio(10, c.received) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn late_arrivals_are_reordered_and_then_duplicates() {
        let (c, a) = run(&[0, 2, 1, 1, 3, 2, 0]);
        use Arrival::*;
        assert_eq!(
            a,
            vec![InOrder, InOrder, Reordered, Duplicate, InOrder, Duplicate, Duplicate]
        );
        assert_eq!(c.received, 4);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.duplicates, 3);
    }

    #[test]
    fn the_window_edges_hold_across_word_boundaries() {
        let mut t = SeqTracker::default();
        assert_eq!(t.on_packet(0), Arrival::InOrder);
        // Jump forward by exactly one word plus one bit; 1..=64 are missing.
        assert_eq!(t.on_packet(65), Arrival::InOrder);
        assert_eq!(t.on_packet(0), Arrival::Duplicate);
        assert_eq!(t.on_packet(1), Arrival::Reordered);
        assert_eq!(t.on_packet(64), Arrival::Reordered);
        assert_eq!(t.on_packet(64), Arrival::Duplicate);
        // The oldest position still inside the window, then just outside it.
        let top = REORDER_WINDOW as u32 + 10;
        assert_eq!(t.on_packet(top), Arrival::InOrder);
        assert_eq!(
            t.on_packet(top - (REORDER_WINDOW as u32 - 1)),
            Arrival::Reordered
        );
        assert_eq!(t.on_packet(top - REORDER_WINDOW as u32), Arrival::TooOld);
        assert_eq!(t.on_packet(0), Arrival::TooOld);
    }

    #[test]
    fn a_jump_past_the_window_forgets_everything() {
        let mut t = SeqTracker::default();
        for s in 0..100 {
            t.on_packet(s);
        }
        assert_eq!(t.on_packet(100_000), Arrival::InOrder);
        assert_eq!(t.on_packet(99_999), Arrival::Reordered);
        assert_eq!(t.on_packet(99), Arrival::TooOld);
    }

    #[test]
    fn shifting_matches_a_naive_set() {
        // Pseudo-random arrivals checked against a HashSet model.
        let mut t = SeqTracker::default();
        let mut seen = std::collections::HashSet::new();
        let mut highest: Option<u32> = None;
        let mut x: u32 = 12345;
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let base = highest.unwrap_or(0);
            let seq = (base + (x >> 16) % 300).saturating_sub(150);
            let want = match highest {
                Some(h) if seq <= h && (h - seq) as u64 >= REORDER_WINDOW => Arrival::TooOld,
                _ if seen.contains(&seq) => Arrival::Duplicate,
                Some(h) if seq < h => Arrival::Reordered,
                _ => Arrival::InOrder,
            };
            assert_eq!(t.on_packet(seq), want, "seq {seq} highest {highest:?}");
            if want != Arrival::TooOld {
                seen.insert(seq);
            }
            highest = Some(highest.map_or(seq, |h| h.max(seq)));
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.5), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.51), Some(2.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn histogram_percentiles_are_within_a_tenth_of_a_percent() {
        let mut h = latency_histogram();
        // 1..=100_000 us, uniform: p50 = 50 ms, p99 = 99 ms, p999 = 99.9 ms.
        for us in 1..=100_000u64 {
            record_latency(&mut h, us);
        }
        let s = LatencySummary::of(&h);
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001;
        assert!(close(s.p50, 50_000), "{s:?}");
        assert!(close(s.p90, 90_000), "{s:?}");
        assert!(close(s.p99, 99_000), "{s:?}");
        assert!(close(s.p999, 99_900), "{s:?}");
        assert!(close(s.max, 100_000), "{s:?}");
        assert_eq!(
            LatencySummary::of(&latency_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_lost() {
        let mut h = latency_histogram();
        record_latency(&mut h, 0);
        record_latency(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 1);
    }

    #[test]
    fn loss_ratio_edges() {
        assert_eq!(loss_ratio(0, 0), 0.0);
        assert_eq!(loss_ratio(100, 100), 0.0);
        assert_eq!(loss_ratio(100, 150), 0.0);
        assert!((loss_ratio(200, 199) - 0.005).abs() < 1e-12);
    }
}
