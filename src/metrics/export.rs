//! Prometheus exposition: control-side metrics live in a `prometheus::Registry`; shard-side ones
//! are built from the shards' published snapshots at scrape time.

use prometheus::proto::{
    Bucket, Counter as PCounter, Gauge as PGauge, Histogram as PHistogram, LabelPair, Metric,
    MetricFamily, MetricType,
};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use super::{
    family_help, Counter, ShardStats, BWE_BUCKETS, CONNECT_BUCKETS, LATENCY_BUCKETS, LAYER_SLOTS,
};

/// Control-side metrics and the scrape.
pub struct Exporter {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub signaling: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub draining: IntGauge,
}

/// Values owned by the control thread, read at scrape.
pub struct ControlGauges {
    pub publish_sessions: u64,
    pub play_sessions: u64,
    pub streams: u64,
    /// (from shard, to shard, messages waiting).
    pub ring_depths: Vec<(usize, usize, usize)>,
}

impl Exporter {
    pub fn new(io_backend: &str) -> Exporter {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "sluice_http_requests_total",
                "HTTP requests by route template and status code.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let signaling = IntCounterVec::new(
            Opts::new(
                "sluice_http_signaling_total",
                "WHIP/WHEP signaling outcomes: created, deleted, bad_request, not_found, conflict, unsupported_media_type, over_capacity, draining.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "sluice_auth_failures_total",
                "Requests refused by token auth, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        // Every reason exists from the start, at 0, so dashboards and alerts see the series.
        for e in crate::control::auth::AuthError::ALL {
            auth_failures.with_label_values(&[e.reason()]);
        }
        let draining = IntGauge::new(
            "sluice_draining",
            "1 while the node drains (refuses new sessions before shutdown), else 0.",
        )
        .expect("valid metric");
        let build = IntGaugeVec::new(
            Opts::new(
                "sluice_build_info",
                "Always 1; labels say what runs: version, git commit, media I/O backend.",
            ),
            &["version", "commit", "io"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("SLUICE_GIT_COMMIT").unwrap_or("unknown"),
                io_backend,
            ])
            .set(1);
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(signaling.clone()),
            Box::new(auth_failures.clone()),
            Box::new(draining.clone()),
            Box::new(build),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Exporter {
            registry,
            http_requests,
            signaling,
            auth_failures,
            draining,
        }
    }

    /// The whole exposition: control-side registry, then every shard family.
    pub fn render(&self, shards: &[&ShardStats], g: &ControlGauges) -> String {
        let mut families = self.registry.gather();
        families.extend(shard_families(shards));
        families.push(gauge(
            "sluice_sessions",
            "Signaling sessions by kind: publish (WHIP) and play (WHEP).",
            vec![
                (vec![("kind", "publish".into())], g.publish_sessions as f64),
                (vec![("kind", "play".into())], g.play_sessions as f64),
            ],
        ));
        families.push(gauge(
            "sluice_streams",
            "Streams with a publisher or viewers.",
            vec![(vec![], g.streams as f64)],
        ));
        if !g.ring_depths.is_empty() {
            families.push(gauge(
                "sluice_ring_depth",
                "Packets waiting in each cross-shard ring (from shard, to shard).",
                g.ring_depths
                    .iter()
                    .map(|(f, t, d)| {
                        (
                            vec![("from", f.to_string()), ("to", t.to_string())],
                            *d as f64,
                        )
                    })
                    .collect(),
            ));
        }
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

fn labels(pairs: &[(&str, String)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.clone());
            l
        })
        .collect()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn gauge(name: &str, help: &str, samples: Vec<(Vec<(&str, String)>, f64)>) -> MetricFamily {
    let metrics = samples
        .into_iter()
        .map(|(l, v)| {
            let mut m = Metric::default();
            m.set_label(labels(&l));
            let mut g = PGauge::default();
            g.set_value(v);
            m.set_gauge(g);
            m
        })
        .collect();
    family(name, help, MetricType::GAUGE, metrics)
}

fn counter(name: &str, help: &str, samples: Vec<(Vec<(&str, String)>, f64)>) -> MetricFamily {
    let metrics = samples
        .into_iter()
        .map(|(l, v)| {
            let mut m = Metric::default();
            m.set_label(labels(&l));
            let mut c = PCounter::default();
            c.set_value(v);
            m.set_counter(c);
            m
        })
        .collect();
    family(name, help, MetricType::COUNTER, metrics)
}

fn shard_families(shards: &[&ShardStats]) -> Vec<MetricFamily> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    // Counter families, in first-appearance order.
    let mut names: Vec<&str> = Vec::new();
    for c in Counter::ALL {
        if !names.contains(&c.family()) {
            names.push(c.family());
        }
    }
    for name in names {
        let mut samples = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            for c in Counter::ALL.iter().filter(|c| c.family() == name) {
                let mut l = vec![("shard", i.to_string())];
                l.extend(c.labels().iter().map(|(k, v)| (*k, v.to_string())));
                samples.push((l, s.get(*c) as f64));
            }
        }
        out.push(counter(
            &format!("sluice_{name}"),
            family_help(name),
            samples,
        ));
    }
    let per_shard = |f: &dyn Fn(&ShardStats) -> f64| -> Vec<(Vec<(&str, String)>, f64)> {
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| (vec![("shard", i.to_string())], f(s)))
            .collect()
    };
    out.push(counter(
        "sluice_shard_busy_seconds_total",
        "Time each shard spent working (not waiting). Utilisation = rate(busy) / (rate(busy) + rate(idle)).",
        per_shard(&|s| s.busy_ns.load(Relaxed) as f64 / 1e9),
    ));
    out.push(counter(
        "sluice_shard_idle_seconds_total",
        "Time each shard spent waiting for sockets, timers or its doorbell.",
        per_shard(&|s| s.idle_ns.load(Relaxed) as f64 / 1e9),
    ));
    out.push(gauge(
        "sluice_peers",
        "Peers each shard owns now.",
        per_shard(&|s| s.peers.load(Relaxed) as f64),
    ));
    out.push(gauge(
        "sluice_tracks",
        "Tracks each shard forwards or routes now.",
        per_shard(&|s| s.tracks.load(Relaxed) as f64),
    ));
    out.push(gauge(
        "sluice_packet_pool_allocated",
        "Packet slots each shard's pool has allocated (flat in steady state).",
        per_shard(&|s| s.pool_allocated.load(Relaxed) as f64),
    ));

    // Connect time: one histogram over all shards.
    let mut buckets = vec![0u64; CONNECT_BUCKETS.len() + 1];
    let mut sum = 0.0;
    for s in shards {
        let (b, d) = s.connect();
        for (acc, v) in buckets.iter_mut().zip(b) {
            *acc += v;
        }
        sum += d.as_secs_f64();
    }
    out.push(histogram(
        "sluice_connect_seconds",
        "Time from a peer's hand-over to its shard until ICE and DTLS completed.",
        &CONNECT_BUCKETS,
        &buckets,
        sum,
    ));

    // Bandwidth estimates: one histogram over all shards.
    let mut buckets = vec![0u64; BWE_BUCKETS.len() + 1];
    let mut sum = 0.0;
    for s in shards {
        let (b, total) = s.bwe();
        for (acc, v) in buckets.iter_mut().zip(b) {
            *acc += v;
        }
        sum += total as f64 / 8.0;
    }
    out.push(histogram(
        "sluice_bandwidth_estimate_bytes_per_second",
        "Subscribers' egress bandwidth estimates (str0m's TWCC estimator) in bytes per second (x 8 for bit/s), one sample per connected subscriber with an estimate per second: the distribution of what subscribers' downlinks carry.",
        &BWE_BUCKETS,
        &buckets,
        sum,
    ));

    let mut layers = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        for (slot, n) in s.simulcast_layers().iter().enumerate() {
            let name = if slot == LAYER_SLOTS - 1 {
                "none".to_string()
            } else {
                slot.to_string()
            };
            layers.push((vec![("shard", i.to_string()), ("layer", name)], *n as f64));
        }
    }
    out.push(gauge(
        "sluice_simulcast_subscriptions",
        "Simulcast video subscriptions by the layer they receive now (0 = lowest; none = paused or waiting for the first keyframe), sampled once a second.",
        layers,
    ));

    // Forwarding latency: a histogram per shard.
    let metrics = shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (counts, sum) = s.latency();
            let mut m = histogram_metric(&LATENCY_BUCKETS, &counts, sum);
            m.set_label(labels(&[("shard", i.to_string())]));
            m
        })
        .collect();
    out.push(family(
        "sluice_forward_latency_seconds",
        "Per forwarded packet and subscriber, from reading the publisher's datagram to submitting that subscriber's send.",
        MetricType::HISTOGRAM,
        metrics,
    ));
    out
}

/// A histogram family from per-bucket (not cumulative) counts, the last one being `+Inf`.
fn histogram(name: &str, help: &str, bounds: &[f64], counts: &[u64], sum: f64) -> MetricFamily {
    let m = histogram_metric(bounds, counts, sum);
    family(name, help, MetricType::HISTOGRAM, vec![m])
}

/// One histogram series from per-bucket (not cumulative) counts, the last one being `+Inf`.
fn histogram_metric(bounds: &[f64], counts: &[u64], sum: f64) -> Metric {
    let mut h = PHistogram::default();
    let mut cumulative = 0;
    let mut pb = Vec::new();
    for (bound, n) in bounds.iter().zip(counts) {
        cumulative += n;
        let mut b = Bucket::default();
        b.set_upper_bound(*bound);
        b.set_cumulative_count(cumulative);
        pb.push(b);
    }
    cumulative += counts.get(bounds.len()).copied().unwrap_or(0);
    h.set_bucket(pb);
    h.set_sample_count(cumulative);
    h.set_sample_sum(sum);
    let mut m = Metric::default();
    m.set_histogram(h);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ShardCounters;
    use std::time::Duration;

    #[test]
    fn renders_valid_families() {
        let e = Exporter::new("uring");
        e.signaling.with_label_values(&["created"]).inc();
        let s = ShardStats::default();
        let mut c = ShardCounters::default();
        c.inc(Counter::DropMalformed);
        c.observe_connect(Duration::from_millis(80));
        c.observe_latency(Duration::from_micros(50));
        s.publish(&c);
        let text = e.render(
            &[&s, &s],
            &ControlGauges {
                publish_sessions: 1,
                play_sessions: 2,
                streams: 1,
                ring_depths: vec![(0, 1, 3)],
            },
        );
        assert!(
            text.contains("sluice_dropped_packets_total{shard=\"1\",reason=\"malformed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_connect_seconds_bucket{le=\"0.1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sluice_forward_latency_seconds_bucket{shard=\"1\",le=\"0.00005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_forward_latency_seconds_bucket{shard=\"1\",le=\"0.000025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("sluice_forward_latency_seconds_count{shard=\"0\"} 1"),
            "{text}"
        );
        assert!(text.contains("sluice_sessions{kind=\"play\"} 2"));
        assert!(text.contains("sluice_ring_depth{from=\"0\",to=\"1\"} 3"));
        assert!(text.contains("sluice_build_info{"));
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
