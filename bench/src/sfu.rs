//! What the load generator reads from the SFU under test, from outside: its CPU time and memory
//! (`/proc/PID`, with `--sfu-pid`) and its counters (Prometheus text from `/metrics`).

use std::time::Duration;

use crate::clock::{cpus_allowed_of, proc_sample, steal_of, ThreadCpu};
use crate::http::{self, Target};

/// One reading of the SFU. Every field is `None` when its source is not configured or failed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SfuSample {
    pub cpu: Option<Duration>,
    pub rss_bytes: Option<u64>,
    /// `sluice_rtp_forwarded_packets_total`, all shards.
    pub forwarded: Option<u64>,
    /// `sluice_rtp_received_packets_total`, all shards.
    pub received: Option<u64>,
    /// `sluice_dropped_packets_total` (every reason), all shards.
    pub dropped: Option<u64>,
    /// sluice's own receive-to-send time per packet: the `sluice_forward_latency_seconds`
    /// histogram, summed over shards, since the SFU started.
    pub forward_latency: Option<LatencyBuckets>,
    /// Steal time (`/proc/stat`) summed over the CPUs the SFU may run on (with `--sfu-pid`).
    pub steal: Option<Duration>,
}

pub struct SfuMonitor {
    pid: Option<u32>,
    /// The CPUs the SFU may run on, from its affinity (`sched_getaffinity`, with `--sfu-pid`).
    pub cpus: Vec<usize>,
    metrics: Option<(Target, String)>,
    /// The SFU's CPU time, kept across readings (with `--sfu-pid`).
    threads: ThreadCpu,
    pub warned: bool,
}

impl SfuMonitor {
    /// `metrics_url` is scraped for counters; `pid` is read for CPU and RSS (when absent, the
    /// standard `process_cpu_seconds_total` and `process_resident_memory_bytes` are used if
    /// the SFU exports them).
    pub fn new(pid: Option<u32>, metrics_url: Option<&str>) -> Result<SfuMonitor, String> {
        let metrics = match metrics_url {
            Some(u) => {
                let t = Target::parse(u)?;
                let path = if t.prefix.is_empty() {
                    "/metrics".to_string()
                } else {
                    t.prefix.clone()
                };
                Some((t, path))
            }
            None => None,
        };
        if let Some(pid) = pid {
            proc_sample(pid, &mut ThreadCpu::default())
                .map_err(|e| format!("--sfu-pid {pid}: cannot read /proc: {e}"))?;
        }
        let cpus = pid.and_then(cpus_allowed_of).unwrap_or_default();
        Ok(SfuMonitor {
            pid,
            cpus,
            metrics,
            threads: ThreadCpu::default(),
            warned: false,
        })
    }

    pub fn sample(&mut self) -> SfuSample {
        let mut s = SfuSample::default();
        if let Some((t, path)) = &self.metrics {
            match http::request(t, "GET", path, None, b"", Duration::from_secs(2)) {
                Ok(r) if r.status == 200 => {
                    let text = r.text();
                    s.forwarded = metric_sum(&text, "sluice_rtp_forwarded_packets_total");
                    s.received = metric_sum(&text, "sluice_rtp_received_packets_total");
                    s.dropped = metric_sum(&text, "sluice_dropped_packets_total")
                        .or_else(|| metric_sum_prefix(&text, "sluice_drop_"));
                    s.cpu = metric_sum_f64(&text, "process_cpu_seconds_total")
                        .map(Duration::from_secs_f64);
                    s.rss_bytes =
                        metric_sum_f64(&text, "process_resident_memory_bytes").map(|v| v as u64);
                    s.forward_latency = LatencyBuckets::parse(&text);
                }
                Ok(r) => self.warn(&format!("{path}: HTTP {}", r.status)),
                Err(e) => self.warn(&e),
            }
        }
        if let Some(pid) = self.pid {
            if let Ok(p) = proc_sample(pid, &mut self.threads) {
                s.cpu = Some(p.cpu);
                s.rss_bytes = Some(p.rss_bytes);
            }
            if !self.cpus.is_empty() {
                s.steal = steal_of(&self.cpus);
            }
        }
        s
    }

    fn warn(&mut self, e: &str) {
        if !self.warned {
            eprintln!("warning: cannot scrape SFU metrics: {e}");
            self.warned = true;
        }
    }
}

/// Sum of every series of `name` (any labels) in Prometheus text, as an integer counter.
pub fn metric_sum(text: &str, name: &str) -> Option<u64> {
    metric_sum_f64(text, name).map(|v| v.round() as u64)
}

pub fn metric_sum_f64(text: &str, name: &str) -> Option<f64> {
    sum_where(text, |metric| metric == name)
}

fn metric_sum_prefix(text: &str, prefix: &str) -> Option<u64> {
    sum_where(text, |metric| {
        metric.starts_with(prefix) && metric.ends_with("_total")
    })
    .map(|v| v.round() as u64)
}

/// Most buckets a latency histogram may have (sluice has 19 with `+Inf`).
const MAX_BUCKETS: usize = 32;

/// A Prometheus histogram's cumulative counts by upper bound (`le`), summed over its series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyBuckets {
    len: usize,
    /// Upper bounds in seconds, ascending; the last is infinite.
    bounds: [f64; MAX_BUCKETS],
    cumulative: [u64; MAX_BUCKETS],
}

impl LatencyBuckets {
    /// `sluice_forward_latency_seconds_bucket` in Prometheus text, every shard's series summed;
    /// `None` when there is none, more than `MAX_BUCKETS` bounds, or no `+Inf` bucket.
    pub fn parse(text: &str) -> Option<LatencyBuckets> {
        let mut by_bound: Vec<(f64, u64)> = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("sluice_forward_latency_seconds_bucket{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once('}') else {
                continue;
            };
            let Some(le) = labels
                .split(',')
                .find_map(|l| l.trim().strip_prefix("le=\""))
                .and_then(|v| v.strip_suffix('"'))
            else {
                continue;
            };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(b) if b.is_finite() => b,
                    _ => continue,
                }
            };
            let Ok(count) = value.trim().parse::<f64>() else {
                continue;
            };
            match by_bound.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, c)) => *c += count as u64,
                None => by_bound.push((bound, count as u64)),
            }
        }
        by_bound.sort_by(|a, b| a.0.total_cmp(&b.0));
        if by_bound.len() > MAX_BUCKETS || by_bound.last()?.0 != f64::INFINITY {
            return None;
        }
        let mut out = LatencyBuckets {
            len: by_bound.len(),
            bounds: [0.0; MAX_BUCKETS],
            cumulative: [0; MAX_BUCKETS],
        };
        for (i, (b, c)) in by_bound.into_iter().enumerate() {
            out.bounds[i] = b;
            out.cumulative[i] = c;
        }
        Some(out)
    }

    /// Quantiles 0.5, 0.9, 0.99 and 0.999 in microseconds of the packets counted between
    /// `earlier` and `self`, interpolated within a bucket as Prometheus' `histogram_quantile`
    /// does (a quantile in the `+Inf` bucket is reported as the largest finite bound). `None`
    /// when no packet was counted or the two do not have the same buckets.
    pub fn quantiles_since(&self, earlier: &LatencyBuckets) -> Option<[f64; 4]> {
        if self.len != earlier.len || self.bounds != earlier.bounds || self.len == 0 {
            return None;
        }
        let n = self.len;
        let delta: Vec<u64> = (0..n)
            .map(|i| self.cumulative[i].saturating_sub(earlier.cumulative[i]))
            .collect();
        let total = delta[n - 1];
        if total == 0 {
            return None;
        }
        let quantile = |q: f64| {
            let rank = q * total as f64;
            let i = delta
                .iter()
                .position(|c| *c as f64 >= rank)
                .unwrap_or(n - 1);
            let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
            let upper = self.bounds[i];
            if upper.is_infinite() {
                return lower;
            }
            let below = if i == 0 { 0 } else { delta[i - 1] };
            // Each bucket's counters are read one by one while the shard publishes, so a
            // bucket can look a packet short of the one below it.
            let inside = delta[i].saturating_sub(below);
            if inside == 0 {
                return upper;
            }
            (lower + (upper - lower) * (rank - below as f64) / inside as f64).clamp(lower, upper)
        };
        Some([0.5, 0.9, 0.99, 0.999].map(|q| quantile(q) * 1e6))
    }
}

fn sum_where(text: &str, want: impl Fn(&str) -> bool) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let metric = line
            .split(|c: char| c == '{' || c.is_whitespace())
            .next()
            .unwrap_or("");
        if !want(metric) {
            continue;
        }
        // The value follows the labels (which may hold spaces inside quotes).
        let after = line
            .rfind('}')
            .map_or(&line[metric.len()..], |i| &line[i + 1..]);
        if let Some(v) = after
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP sluice_rtp_forwarded_packets_total RTP packets written to subscribers.
# TYPE sluice_rtp_forwarded_packets_total counter
sluice_rtp_forwarded_packets_total{shard=\"0\"} 1000
sluice_rtp_forwarded_packets_total{shard=\"1\"} 234
sluice_rtp_forwarded_packets_total_extra 5
sluice_drop_ring_full_total{shard=\"0\"} 2
sluice_drop_forwarder_total{shard=\"0\",reason=\"a b\"} 3
process_cpu_seconds_total 12.5
sluice_forward_latency_seconds_bucket{shard=\"0\",le=\"0.0001\"} 90
sluice_forward_latency_seconds_bucket{shard=\"0\",le=\"0.001\"} 99
sluice_forward_latency_seconds_bucket{shard=\"0\",le=\"+Inf\"} 100
sluice_forward_latency_seconds_bucket{shard=\"1\",le=\"0.0001\"} 0
sluice_forward_latency_seconds_bucket{shard=\"1\",le=\"0.001\"} 0
sluice_forward_latency_seconds_bucket{shard=\"1\",le=\"+Inf\"} 0
sluice_forward_latency_seconds_sum{shard=\"0\"} 1.5
";

    #[test]
    fn counters_are_summed_over_shards() {
        assert_eq!(
            metric_sum(TEXT, "sluice_rtp_forwarded_packets_total"),
            Some(1234)
        );
        assert_eq!(metric_sum(TEXT, "sluice_rtp_received_packets_total"), None);
        assert_eq!(metric_sum_prefix(TEXT, "sluice_drop_"), Some(5));
        assert_eq!(
            metric_sum_f64(TEXT, "process_cpu_seconds_total"),
            Some(12.5)
        );
    }

    #[test]
    fn latency_quantiles_come_from_the_buckets_counted_between_two_readings() {
        let start = LatencyBuckets::parse(TEXT).unwrap();
        assert_eq!(start.len, 3);
        assert_eq!(start.cumulative[..3], [90, 99, 100]);
        assert_eq!(start.quantiles_since(&start), None, "nothing counted");
        // 1000 more packets: 500 under 100 us, 490 under 1 ms, 10 above.
        let later = TEXT
            .replace("le=\"0.0001\"} 90", "le=\"0.0001\"} 590")
            .replace("le=\"0.001\"} 99", "le=\"0.001\"} 1089")
            .replace("le=\"+Inf\"} 100", "le=\"+Inf\"} 1100");
        let end = LatencyBuckets::parse(&later).unwrap();
        let q = end.quantiles_since(&start).unwrap();
        // p50: rank 500 is the last of the 500 in (0, 100 us].
        assert!((q[0] - 100.0).abs() < 1e-6, "{q:?}");
        // p90: rank 900 is the 400th of 490 in (100 us, 1 ms].
        assert!(
            (q[1] - (100.0 + 900.0 * 400.0 / 490.0)).abs() < 1e-6,
            "{q:?}"
        );
        // p99: rank 990 is the 490th of 490.
        assert!((q[2] - 1000.0).abs() < 1e-6, "{q:?}");
        // p999: in +Inf, reported as the largest finite bound.
        assert!((q[3] - 1000.0).abs() < 1e-6, "{q:?}");
        // Counted since the SFU started (from zero), the quantiles are not the window's.
        assert_ne!(
            end.quantiles_since(&LatencyBuckets {
                cumulative: [0; MAX_BUCKETS],
                ..end
            }),
            Some(q)
        );
        assert_eq!(
            LatencyBuckets::parse("sluice_rtp_forwarded_packets_total 1\n"),
            None
        );
        let no_inf = "sluice_forward_latency_seconds_bucket{le=\"0.001\"} 5\n";
        assert_eq!(LatencyBuckets::parse(no_inf), None);
    }
}
