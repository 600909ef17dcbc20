//! `sluice-loadgen hiccup`: how much latency the machine itself adds, with no SFU at all.
//!
//! One thread spins reading the monotonic clock. Every gap between two reads longer than
//! [`MIN_GAP`] is time the thread did not run: an interrupt, another task, or (on a VM) the host
//! descheduling the vCPU. A packet arriving at a uniformly random instant waits out the rest of
//! the gap it lands in, so the gaps give the latency percentiles any process on that CPU would
//! add: the floor under sluice's own figures. `perf/capacity.sh` runs it on the SFU's CPUs.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Shorter gaps are the clock read itself and cache misses, not lost time.
const MIN_GAP: Duration = Duration::from_micros(20);

#[derive(Debug, Clone, Serialize)]
pub struct HiccupSummary {
    pub scenario: &'static str,
    pub duration_s: f64,
    /// Share of the window the thread did not run (gaps over 20 us).
    pub stalled_ratio: f64,
    /// Gaps longer than 0.1, 0.5, 1, 2 and 5 ms.
    pub gaps_over_us: Vec<(u64, u64)>,
    pub max_gap_us: u64,
    /// The wait a uniformly random arrival sees: p50, p90, p99, p99.9 (microseconds).
    pub added_latency_us: AddedLatency,
    /// A sleeping thread instead (as an SFU idles between packets): how late a 500 us sleep
    /// wakes up, over the same length of time. It adds the cost of waking an idle CPU.
    pub wakeup_late_us: AddedLatency,
}

#[derive(Debug, Clone, Serialize)]
pub struct AddedLatency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
}

/// Spin for `duration` on the calling thread and collect the gaps, then sleep and wake for as
/// long again.
pub fn measure(duration: Duration) -> HiccupSummary {
    let mut summary = spin(duration);
    summary.wakeup_late_us = wakeups(duration);
    summary
}

fn wakeups(duration: Duration) -> AddedLatency {
    let mut late = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let start = Instant::now();
    while start.elapsed() < duration {
        let asleep = Instant::now();
        std::thread::sleep(WAKEUP_SLEEP);
        let over = asleep.elapsed().saturating_sub(WAKEUP_SLEEP);
        late.saturating_record(over.as_micros() as u64);
    }
    AddedLatency {
        p50: late.value_at_quantile(0.5),
        p90: late.value_at_quantile(0.9),
        p99: late.value_at_quantile(0.99),
        p999: late.value_at_quantile(0.999),
    }
}

const WAKEUP_SLEEP: Duration = Duration::from_micros(500);

fn spin(duration: Duration) -> HiccupSummary {
    let start = Instant::now();
    let mut prev = start;
    let mut gaps = Vec::with_capacity(4096);
    loop {
        let now = Instant::now();
        let gap = now - prev;
        prev = now;
        if gap > MIN_GAP {
            gaps.push(gap);
        }
        if now - start >= duration {
            break;
        }
    }
    summarize(&gaps, prev - start)
}

/// The summary of `gaps` seen over a window of `window`.
pub fn summarize(gaps: &[Duration], window: Duration) -> HiccupSummary {
    let total = window.as_secs_f64().max(1e-9);
    let stalled: f64 = gaps.iter().map(Duration::as_secs_f64).sum();
    let over = |us: u64| {
        gaps.iter()
            .filter(|g| g.as_micros() > u128::from(us))
            .count() as u64
    };
    let q = |p: f64| wait_at_quantile(gaps, window, p).as_micros() as u64;
    HiccupSummary {
        scenario: "hiccup",
        duration_s: total,
        stalled_ratio: stalled / total,
        gaps_over_us: [100, 500, 1000, 2000, 5000]
            .iter()
            .map(|&us| (us, over(us)))
            .collect(),
        max_gap_us: gaps.iter().max().map_or(0, |g| g.as_micros() as u64),
        added_latency_us: AddedLatency {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
        },
        wakeup_late_us: AddedLatency {
            p50: 0,
            p90: 0,
            p99: 0,
            p999: 0,
        },
    }
}

/// The wait `d` such that an arrival at a uniformly random instant of the window waits longer
/// than `d` with probability `1 - p`. Landing in a gap of length `g` waits longer than `d` for
/// `g - d` of its length, so `P(wait > d) = sum(max(0, g - d)) / window`, which falls as `d`
/// grows: bisect it.
pub fn wait_at_quantile(gaps: &[Duration], window: Duration, p: f64) -> Duration {
    let total = window.as_secs_f64();
    if total <= 0.0 {
        return Duration::ZERO;
    }
    let tail = |d: f64| -> f64 {
        gaps.iter()
            .map(|g| (g.as_secs_f64() - d).max(0.0))
            .sum::<f64>()
            / total
    };
    let want = 1.0 - p;
    if tail(0.0) <= want {
        return Duration::ZERO;
    }
    let (mut lo, mut hi) = (0.0, gaps.iter().max().map_or(0.0, Duration::as_secs_f64));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if tail(mid) > want {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Duration::from_secs_f64(hi)
}

impl HiccupSummary {
    pub fn table(&self) -> String {
        let a = &self.added_latency_us;
        let gaps: Vec<String> = self
            .gaps_over_us
            .iter()
            .map(|(us, n)| format!("{n} over {:.1} ms", *us as f64 / 1000.0))
            .collect();
        let w = &self.wakeup_late_us;
        format!(
            "  {:<18}{:.1} s spinning on one thread, stalled {:.3} % of it\n  {:<18}{}; longest {:.2} ms\n  {:<18}p50 {} / p90 {} / p99 {} / p99.9 {} us (what any process on this CPU would add)\n  {:<18}p50 {} / p90 {} / p99 {} / p99.9 {} us late, waking from a 500 us sleep\n",
            "hiccup",
            self.duration_s,
            self.stalled_ratio * 100.0,
            "gaps",
            gaps.join(", "),
            self.max_gap_us as f64 / 1000.0,
            "added latency",
            a.p50,
            a.p90,
            a.p99,
            a.p999,
            "wakeup",
            w.p50,
            w.p90,
            w.p99,
            w.p999
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_gaps_add_nothing() {
        let s = summarize(&[], 10 * 1000 * MS);
        assert_eq!(s.stalled_ratio, 0.0);
        assert_eq!(s.added_latency_us.p99, 0);
        assert_eq!(s.max_gap_us, 0);
    }

    #[test]
    fn the_wait_is_the_rest_of_the_gap_an_arrival_lands_in() {
        // One 100 ms gap in a 1 s window: 10 % of arrivals wait, uniformly 0..100 ms.
        let gaps = [100 * MS];
        let window = 1000 * MS;
        let at = |p| wait_at_quantile(&gaps, window, p).as_secs_f64() * 1000.0;
        assert_eq!(at(0.5), 0.0);
        assert_eq!(at(0.9), 0.0);
        // P(wait > d) = (100 - d) / 1000 = 1 % at d = 90 ms; 0.1 % at 99 ms.
        assert!((at(0.99) - 90.0).abs() < 0.01, "{}", at(0.99));
        assert!((at(0.999) - 99.0).abs() < 0.01, "{}", at(0.999));
    }

    #[test]
    fn many_short_gaps_and_a_count_of_long_ones() {
        // 50 gaps of 2 ms in 10 s: 1 % of the time stalled.
        let gaps = vec![2 * MS; 50];
        let s = summarize(&gaps, 10_000 * MS);
        assert!((s.stalled_ratio - 0.01).abs() < 1e-9);
        assert_eq!(
            s.gaps_over_us,
            vec![(100, 50), (500, 50), (1000, 50), (2000, 0), (5000, 0)]
        );
        assert_eq!(s.max_gap_us, 2000);
        // Exactly 1 % of arrivals land in a gap: the p99 wait is (just about) zero, p99.9 is
        // 1.8 ms (P(wait > d) = 50 (2 - d) / 10000 = 0.1 % at d = 1.8 ms).
        assert!(s.added_latency_us.p99 <= 1, "{:?}", s.added_latency_us);
        assert!((s.added_latency_us.p999 as i64 - 1800).abs() <= 1);
    }
}
