//! The results of a run: the JSON document (its field names are a public interface: scripts and
//! tests read them), the table printed at the end, and the SVG chart.

use std::path::Path;

use serde::Serialize;

use crate::accounting::LatencySummary;
use crate::collect::Failure;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct SfuLatency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct JoinSummary {
    pub p50: f64,
    pub p99: f64,
}

/// Ramp only: where it stopped.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// Subscribers in the last second that met both limits.
    pub subscribers: u64,
    /// SFU egress packets/s in that second.
    pub sfu_egress_pps: Option<f64>,
    /// Subscriber deliveries per second in that second.
    pub delivered_pps: f64,
    /// Why the ramp stopped.
    pub stopped_by: String,
    pub max_loss: f64,
    pub max_p99_ms: f64,
}

/// One second of the run, for the chart and for scripts.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineRow {
    pub t_s: f64,
    pub subscribers: u64,
    pub sent_pps: u64,
    pub expected: u64,
    pub received_pps: u64,
    pub loss: f64,
    pub sfu_egress_pps: Option<f64>,
    pub sfu_cpu_cores: Option<f64>,
    /// Share of the SFU's CPUs' time the hypervisor gave to others (steal), 0 to 1.
    pub sfu_cpu_steal: Option<f64>,
    pub loadgen_cpu_cores: Option<f64>,
    pub latency_us: LatencySummary,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: String,
    /// Length of the measurement window.
    pub duration_s: f64,
    pub publishers: u64,
    /// Subscribers that owed packets in the window (all publishers together).
    pub subscribers: u64,
    /// Packets the publishers sent in the window.
    pub packets_sent: u64,
    /// Deliveries owed to subscribers for those packets.
    pub packets_expected: u64,
    /// Distinct packets subscribers received of those.
    pub packets_received: u64,
    pub delivered_ratio: f64,
    /// `sluice_rtp_forwarded_packets_total` per second over the window.
    pub sfu_egress_pps: Option<f64>,
    /// SFU CPU time over the window (all its threads).
    pub sfu_cpu_seconds: Option<f64>,
    /// Egress packets per SFU CPU-second.
    pub egress_pps_per_sfu_core: Option<f64>,
    /// One-way latency, microseconds: from the publisher stamping the packet (just before str0m
    /// encrypts and sends it) to its arrival at the subscriber's socket (kernel timestamp).
    pub latency_us: LatencySummary,
    /// From the POST to the first media packet (first video packet when there is video).
    pub join_ms: JoinSummary,
    /// Load generator CPU time over the window (all its threads).
    pub loadgen_cpu_seconds: f64,
    pub failures: Vec<Failure>,
    // ---- beyond the required fields ----
    /// As `latency_us`, but to when the subscriber read the packet: adds the loadgen's own
    /// queueing (a busy loadgen shows here first).
    pub read_latency_us: LatencySummary,
    pub url: String,
    /// Free text from `--label` (capacity.sh names the SFU backend here).
    pub label: Option<String>,
    pub loadgen_cores: usize,
    /// Packets sent plus received per loadgen CPU-second in the window.
    pub loadgen_pps_per_core: Option<f64>,
    /// The loadgen used more than 90% of its cores: the SFU was not necessarily the limit.
    pub loadgen_saturated: bool,
    pub loadgen_late_frames: u64,
    /// `--pacing-factor` of the publishers' video (0: each frame in one burst); `None` without
    /// video.
    pub video_pacing_factor: Option<f64>,
    /// `--settle`: seconds left out between the last join and the window.
    pub settle_s: u64,
    /// `--rx-poll-us`: how often each loadgen core polled its peers' sockets (0: each peer
    /// waited on the ring, and the SFU's CPU paid for the wakeups).
    pub rx_poll_us: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub too_old: u64,
    pub late: u64,
    pub rejected_joins: u64,
    pub lost_peers: u64,
    pub publisher_join_ms: JoinSummary,
    pub sfu_rss_per_peer_bytes: Option<f64>,
    /// sluice's own view of its added latency (`sluice_forward_latency_seconds`, receive to send
    /// submission): quantiles of the packets its histogram counted in our window, all shards,
    /// interpolated within its buckets, in microseconds.
    pub sfu_forward_latency_us: Option<SfuLatency>,
    pub sfu_drops: Option<u64>,
    /// Share of the SFU's CPUs' time over the window that the hypervisor gave to others (the
    /// steal column of `/proc/stat` for the CPUs `--sfu-pid` may run on), 0 to 1: while it
    /// stole, no packet moved through the SFU. `None` without `--sfu-pid`.
    pub sfu_cpu_steal: Option<f64>,
    /// `--simulcast`: how subscribers spread over the layers at the end.
    pub simulcast: Option<SimulcastSpread>,
    /// `meeting`: who received whom. There `publishers` are the participants that published and
    /// `subscribers` those that received at least one other participant.
    pub meeting: Option<MeetingSpread>,
    pub capacity: Option<Capacity>,
    pub timeline: Vec<TimelineRow>,
}

/// Where `--simulcast` subscribers ended up. Video is then not in `packets_expected` (each
/// subscriber gets one layer of the SFU's choosing); audio is.
#[derive(Debug, Clone, Serialize)]
pub struct SimulcastSpread {
    /// Subscribers on each layer, low to high (rids l, m, h), by the last video packet.
    pub subscribers_per_layer: Vec<u64>,
    /// Subscribers with no video yet.
    pub without_video: u64,
    /// Layer changes subscribers saw (after their first layer).
    pub layer_changes: u64,
}

/// How far a `meeting` got: every participant should receive every other one.
#[derive(Debug, Clone, Serialize)]
pub struct MeetingSpread {
    pub room: String,
    pub participants: u64,
    /// Ordered (receiver, sender) pairs there should be: N x (N - 1).
    pub pairs: u64,
    /// Pairs whose receiver got media from its sender (by the end of the joining phase or later).
    pub pairs_receiving: u64,
    /// Participants receiving every other participant.
    pub receiving_everyone: u64,
}

/// Write any summary as pretty JSON to `path`.
pub fn write_json(value: &impl Serialize, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

impl Summary {
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        write_json(self, path)
    }

    /// The human-readable result.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut line = |k: &str, v: String| t.push_str(&format!("  {k:<18}{v}\n"));
        line(
            "scenario",
            format!(
                "{}: {} publisher(s), {} subscriber(s), {:.1} s window, {} loadgen core(s)",
                self.scenario,
                self.publishers,
                self.subscribers,
                self.duration_s,
                self.loadgen_cores
            ),
        );
        if let Some(sc) = &self.simulcast {
            line(
                "simulcast",
                format!(
                    "subscribers per layer (l, m, h): {:?}, {} without video, {} layer changes (video not in delivered)",
                    sc.subscribers_per_layer, sc.without_video, sc.layer_changes
                ),
            );
        }
        if let Some(m) = &self.meeting {
            line(
                "meeting",
                format!(
                    "room {}: {} participants, {} of {} (receiver, sender) pairs receiving, {} receive everyone",
                    m.room, m.participants, m.pairs_receiving, m.pairs, m.receiving_everyone
                ),
            );
        }
        line(
            "delivered",
            format!(
                "{:.3} %  ({} of {} expected; {} reordered, {} duplicates, {} late)",
                self.delivered_ratio * 100.0,
                self.packets_received,
                self.packets_expected,
                self.reordered,
                self.duplicates,
                self.late + self.too_old
            ),
        );
        line(
            "sent",
            format!(
                "{} packets ({:.0} pps)",
                self.packets_sent,
                self.packets_sent as f64 / self.duration_s.max(1e-9)
            ),
        );
        let l = &self.latency_us;
        line(
            "latency (us)",
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                l.p50, l.p90, l.p99, l.p999, l.max
            ),
        );
        let r = &self.read_latency_us;
        line(
            "  as read (us)",
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (adds the loadgen's queueing)",
                r.p50, r.p90, r.p99, r.p999, r.max
            ),
        );
        if let Some(f) = &self.sfu_forward_latency_us {
            line(
                "  inside SFU (us)",
                format!(
                    "p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  (sluice's receive-to-send, its histogram over this window)",
                    f.p50, f.p90, f.p99, f.p999
                ),
            );
        }
        line(
            "join (ms)",
            format!(
                "p50 {:.1}  p99 {:.1}  (publishers p50 {:.1})",
                self.join_ms.p50, self.join_ms.p99, self.publisher_join_ms.p50
            ),
        );
        let opt = |v: Option<f64>, digits: usize| {
            v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"))
        };
        line(
            "SFU",
            format!(
                "egress {} pps, CPU {} s, {} egress pps per CPU-second, RSS/peer {} KiB, host steal {} %",
                opt(self.sfu_egress_pps, 0),
                opt(self.sfu_cpu_seconds, 2),
                opt(self.egress_pps_per_sfu_core, 0),
                opt(self.sfu_rss_per_peer_bytes.map(|b| b / 1024.0), 1),
                opt(self.sfu_cpu_steal.map(|s| s * 100.0), 2),
            ),
        );
        line(
            "loadgen",
            format!(
                "CPU {:.2} s on {} core(s), {} pps per core{}{}",
                self.loadgen_cpu_seconds,
                self.loadgen_cores,
                opt(self.loadgen_pps_per_core, 0),
                if self.loadgen_saturated {
                    "  SATURATED: the loadgen, not the SFU, may be the limit"
                } else {
                    ""
                },
                if self.loadgen_late_frames > 0 {
                    format!(", {} late frames", self.loadgen_late_frames)
                } else {
                    String::new()
                }
            ),
        );
        if let Some(c) = &self.capacity {
            line(
                "capacity",
                format!(
                    "{} subscribers, {} SFU egress pps ({}; limits loss {:.2} %, p99 {} ms)",
                    c.subscribers,
                    opt(c.sfu_egress_pps, 0),
                    c.stopped_by,
                    c.max_loss * 100.0,
                    c.max_p99_ms
                ),
            );
        }
        if self.failures.is_empty() {
            line("failures", "none".into());
        } else {
            for f in &self.failures {
                line(
                    "failure",
                    format!("{} x {} ({})", f.count, f.reason, f.role),
                );
            }
        }
        t
    }
}

/// Draw latency percentiles, throughput and peers over time as an SVG.
pub fn chart(summary: &Summary, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let rows = &summary.timeline;
    if rows.is_empty() {
        return Err("nothing to chart: no second of the run closed".into());
    }
    let err = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "sluice-loadgen {}: {} publisher(s), {} subscriber(s)",
        summary.scenario, summary.publishers, summary.subscribers
    );
    let root = root
        .titled(&title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));
    let t_max = rows.last().map_or(1.0, |r| r.t_s + 1.0);
    let t_min = rows.first().map_or(0.0, |r| r.t_s);

    // Latency.
    let lat_max = rows
        .iter()
        .map(|r| r.latency_us.p999 as f64 / 1000.0)
        .fold(0.1, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&panels[0])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption("one-way latency (ms)", ("sans-serif", 16))
        .build_cartesian_2d(t_min..t_max, 0.0..lat_max)
        .map_err(|e| err(&e))?;
    c.configure_mesh().x_desc("s").draw().map_err(|e| err(&e))?;
    type Percentile = fn(&TimelineRow) -> u64;
    let series: [(&str, RGBColor, Percentile); 3] = [
        ("p50", BLUE, |r| r.latency_us.p50),
        ("p99", RED, |r| r.latency_us.p99),
        ("p99.9", MAGENTA, |r| r.latency_us.p999),
    ];
    for (name, color, f) in series {
        c.draw_series(LineSeries::new(
            rows.iter().map(|r| (r.t_s, f(r) as f64 / 1000.0)),
            color.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    // Throughput.
    let pps_max = rows
        .iter()
        .map(|r| {
            (r.received_pps as f64)
                .max(r.sfu_egress_pps.unwrap_or(0.0))
                .max(r.sent_pps as f64)
        })
        .fold(1.0, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&panels[1])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption("packets per second", ("sans-serif", 16))
        .build_cartesian_2d(t_min..t_max, 0.0..pps_max)
        .map_err(|e| err(&e))?;
    c.configure_mesh().x_desc("s").draw().map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        rows.iter().map(|r| (r.t_s, r.received_pps as f64)),
        BLUE.stroke_width(2),
    ))
    .map_err(|e| err(&e))?
    .label("received by subscribers")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(
        rows.iter()
            .filter_map(|r| r.sfu_egress_pps.map(|p| (r.t_s, p))),
        RED.stroke_width(2),
    ))
    .map_err(|e| err(&e))?
    .label("SFU egress")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.draw_series(LineSeries::new(
        rows.iter().map(|r| (r.t_s, r.sent_pps as f64)),
        GREEN.stroke_width(2),
    ))
    .map_err(|e| err(&e))?
    .label("sent by publishers")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    // Subscribers and CPU.
    let subs_max = rows.iter().map(|r| r.subscribers).max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut c = ChartBuilder::on(&panels[2])
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption(
            "subscribers (blue); CPU cores x 100: SFU (red), loadgen (green)",
            ("sans-serif", 16),
        )
        .build_cartesian_2d(t_min..t_max, 0.0..subs_max.max(110.0))
        .map_err(|e| err(&e))?;
    c.configure_mesh().x_desc("s").draw().map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        rows.iter().map(|r| (r.t_s, r.subscribers as f64)),
        BLUE.stroke_width(2),
    ))
    .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        rows.iter()
            .filter_map(|r| r.sfu_cpu_cores.map(|v| (r.t_s, v * 100.0))),
        RED.stroke_width(2),
    ))
    .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        rows.iter()
            .filter_map(|r| r.loadgen_cpu_cores.map(|v| (r.t_s, v * 100.0))),
        GREEN.stroke_width(2),
    ))
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
