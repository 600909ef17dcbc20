//! What the load generator reads from the SFU under test, from outside: its CPU time and memory
//! (`/proc/PID`, with `--sfu-pid`) and its counters (Prometheus text from `/metrics`).

use std::time::Duration;

use crate::clock::{cpus_allowed_of, proc_sample, steal_of};
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
    /// sluice's own receive-to-send time per packet, `sluice_forward_latency_seconds` quantiles
    /// 0.5, 0.9, 0.99, 0.999 (worst shard), over its last 10 s window, in microseconds.
    pub forward_latency_us: Option<[f64; 4]>,
    /// Steal time (`/proc/stat`) summed over the CPUs the SFU may run on (with `--sfu-pid`).
    pub steal: Option<Duration>,
}

pub struct SfuMonitor {
    pid: Option<u32>,
    /// The CPUs the SFU may run on, from `/proc/PID/status` (with `--sfu-pid`).
    pub cpus: Vec<usize>,
    metrics: Option<(Target, String)>,
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
            proc_sample(pid).map_err(|e| format!("--sfu-pid {pid}: cannot read /proc: {e}"))?;
        }
        let cpus = pid.and_then(cpus_allowed_of).unwrap_or_default();
        Ok(SfuMonitor {
            pid,
            cpus,
            metrics,
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
                    s.forward_latency_us = forward_latency(&text);
                }
                Ok(r) => self.warn(&format!("{path}: HTTP {}", r.status)),
                Err(e) => self.warn(&e),
            }
        }
        if let Some(pid) = self.pid {
            if let Ok(p) = proc_sample(pid) {
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

/// The worst shard's `sluice_forward_latency_seconds` quantiles, in microseconds.
fn forward_latency(text: &str) -> Option<[f64; 4]> {
    let mut out = [None::<f64>; 4];
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("sluice_forward_latency_seconds{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        for (i, q) in ["\"0.5\"", "\"0.9\"", "\"0.99\"", "\"0.999\""]
            .iter()
            .enumerate()
        {
            if labels.contains(&format!("quantile={q}")) && v.is_finite() {
                out[i] = Some(out[i].map_or(v, |o: f64| o.max(v)));
            }
        }
    }
    Some([out[0]?, out[1]?, out[2]?, out[3]?].map(|v| v * 1e6))
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
sluice_forward_latency_seconds{shard=\"0\",quantile=\"0.5\"} 0.00002
sluice_forward_latency_seconds{shard=\"0\",quantile=\"0.9\"} 0.0001
sluice_forward_latency_seconds{shard=\"0\",quantile=\"0.99\"} 0.001
sluice_forward_latency_seconds{shard=\"0\",quantile=\"0.999\"} 0.002
sluice_forward_latency_seconds{shard=\"1\",quantile=\"0.99\"} 0.003
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
    fn forward_latency_takes_the_worst_shard_per_quantile() {
        let q = forward_latency(TEXT).unwrap();
        let want = [20.0, 100.0, 3000.0, 2000.0];
        for (got, want) in q.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{q:?}");
        }
        assert_eq!(
            forward_latency("sluice_rtp_forwarded_packets_total 1\n"),
            None
        );
    }
}
