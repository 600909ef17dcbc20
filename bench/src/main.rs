//! sluice-loadgen: simulated WebRTC publishers and subscribers, thread-per-core on glommio, that
//! join sluice through WHIP and WHEP (and `/ws` rooms) exactly as outside clients do, and measure
//! delivery, one-way latency, join time, and the SFU's packets per CPU-second.
//!
//! Exit status: 0 the scenario ran (whatever it measured), 1 it could not (SFU unreachable, no
//! publisher joined, overran its bound).

mod accounting;
mod clock;
mod collect;
mod floor;
mod hiccup;
mod http;
mod media;
mod meeting;
mod peer;
mod probe;
mod report;
mod room;
mod run;
mod sfu;
mod shard;
mod udp;
mod ws;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::media::VideoConfig;
use crate::run::{Options, Outcome, Scenario};
use crate::shard::MediaPlan;

/// Largest `--rx-poll-us` accepted: longer, and the sockets could overflow between looks and
/// feedback to the SFU would be late.
const MAX_RX_POLL_US: u64 = 100_000;
/// Largest accepted `--settle`, seconds.
const MAX_SETTLE_S: u64 = 3600;

#[derive(Parser)]
#[command(
    name = "sluice-loadgen",
    version,
    about = "Load generator and capacity benchmark for sluice"
)]
struct Cli {
    #[command(subcommand)]
    scenario: ScenarioCmd,
}

#[derive(Subcommand)]
enum ScenarioCmd {
    /// P publishers (video and audio), S subscribers each.
    Fanout {
        #[arg(long, default_value_t = 1)]
        publishers: u32,
        /// Subscribers per publisher.
        #[arg(long, default_value_t = 10)]
        subscribers: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Many audio-only streams: P publishers, S subscribers each.
    Audio {
        #[arg(long, default_value_t = 50)]
        publishers: u32,
        /// Subscribers per publisher.
        #[arg(long, default_value_t = 10)]
        subscribers: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Add video subscribers at --rate until loss or p99 latency exceeds its limit for two
    /// seconds in a row, and report the last good point as the capacity.
    Ramp {
        #[arg(long, default_value_t = 1)]
        publishers: u32,
        /// Subscribers added per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Loss ratio limit (0.005 = 0.5 %).
        #[arg(long, default_value_t = 0.005)]
        max_loss: f64,
        /// p99 one-way latency limit, milliseconds.
        #[arg(long, default_value_t = 50.0)]
        max_p99: f64,
        /// Stop adding here even below the limits.
        #[arg(long, default_value_t = 20_000)]
        max_subscribers: u32,
        #[command(flatten)]
        common: Common,
    },
    /// N participants in one /ws room: each publishes video and audio and receives everyone
    /// else (--join-rate: participants started per second).
    Meeting {
        #[arg(long, default_value_t = 5)]
        participants: u32,
        /// The room [default: the stream prefix and our pid].
        #[arg(long)]
        room: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// No SFU: spin one thread on this CPU and report the latency the machine itself adds
    /// (interrupts, other tasks, a VM's host), the floor under every latency figure. Run it
    /// pinned where the SFU runs (`taskset -c 0`).
    Hiccup {
        /// Seconds to spin.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// No SFU: the kernel's own cost of a 1 x N fan-out's egress. One thread sends each packet
    /// to N loopback sockets with sendmmsg and does nothing else; its CPU per datagram is the
    /// ceiling for any SFU that sends packets one sendmsg each. Run it with `--send-cpu` on the
    /// SFU's CPU and `--recv-cpu` on the load generator's.
    Floor {
        /// Receiving sockets (subscribers).
        #[arg(long, default_value_t = 150)]
        subscribers: usize,
        /// Publisher packets per second, each sent to every subscriber [default: the default
        /// publisher's video, 1.5 Mbit/s in about 221 packets/s].
        #[arg(long, default_value_t = 221.0)]
        rate: f64,
        /// Datagram bytes [default: that video's mean payload, about 850 B, plus the RTP
        /// header, extensions and the AES-GCM tag].
        #[arg(long, default_value_t = 900)]
        size: usize,
        /// Destinations per sendmmsg (sluice's media.send_chunk).
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Seconds to send.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Pin the sending thread to this CPU.
        #[arg(long)]
        send_cpu: Option<usize>,
        /// Pin the receiving thread to this CPU.
        #[arg(long)]
        recv_cpu: Option<usize>,
        /// As the scenarios' --rx-poll-us: the receiver looks for datagrams this often; 0
        /// sleeps in epoll_wait, and every wakeup is charged to the sending CPU.
        #[arg(long, default_value_t = 200)]
        rx_poll_us: u64,
        /// Write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// sluice's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Measurement window in seconds (ramp: the longest it may run).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds between the last join and the window (fanout, audio, meeting): the joins'
    /// keyframe requests and the keyframes that answer them pass before the steady state is
    /// measured. The timeline shows those seconds either way.
    #[arg(long, default_value_t = 0)]
    settle: u64,
    /// Load generator cores: one pinned glommio executor each, on the CPUs this process may use.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// The SFU's process id: its CPU time and RSS are read from /proc.
    #[arg(long)]
    sfu_pid: Option<u32>,
    /// The SFU's Prometheus endpoint [default: URL/metrics].
    #[arg(long)]
    sfu_metrics: Option<String>,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency and throughput over time as SVG here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Free text stored in the JSON (e.g. the SFU's I/O backend).
    #[arg(long)]
    label: Option<String>,
    /// Video bitrate per publisher, bits/s.
    #[arg(long, default_value_t = 1_500_000)]
    video_bitrate: u64,
    /// Publishers send video as three simulcast layers (rids l, m, h at 1/10, 1/3 and all of
    /// --video-bitrate); the summary shows how subscribers spread over them.
    #[arg(long)]
    simulcast: bool,
    /// Seconds between keyframes.
    #[arg(long, default_value_t = 2.0)]
    keyframe_interval: f64,
    /// Video packets leave at this multiple of the bitrate, as a browser's pacer sends them
    /// (libwebrtc's default is 2.5: a keyframe ten times a delta frame spreads over about 3.5
    /// frame intervals). 0 sends each frame as one burst, the worst case for an SFU's latency.
    #[arg(long, default_value_t = 2.5)]
    pacing_factor: f64,
    /// Audio bitrate per publisher, bits/s (50 packets/s).
    #[arg(long, default_value_t = 32_000)]
    audio_bitrate: u64,
    /// Subscribers started per second before the window (fanout, audio); 0 = all at once.
    #[arg(long, default_value_t = 200.0)]
    join_rate: f64,
    /// Seconds a peer may take from its POST to its first media packet.
    #[arg(long, default_value_t = 15.0)]
    join_timeout: f64,
    /// Joins in progress (POST to DTLS connected) per loadgen core.
    #[arg(long, default_value_t = 16)]
    max_concurrent_joins: u64,
    /// How often, in microseconds, a core looks for datagrams on its peers' sockets (one
    /// non-blocking epoll_wait over all of them). 0: each peer arms a receive on glommio's
    /// io_uring instead, whose completions the kernel signals with an interrupt from the CPU
    /// that delivered the datagram, which on loopback charges the SFU's CPU for the load
    /// generator's wakeups (bench/README.md, "Receiving without taxing the SFU"). Latency is
    /// measured from the kernel's arrival stamp either way.
    #[arg(long, default_value_t = 200)]
    rx_poll_us: u64,
    /// Stream names are PREFIX<pid>-<publisher>.
    #[arg(long, default_value = "lg-")]
    stream_prefix: String,
    /// No status line.
    #[arg(long)]
    quiet: bool,
}

impl Common {
    fn options(&self, video: bool) -> Result<Options, String> {
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            return Err("--duration must be positive".into());
        }
        if !(self.keyframe_interval > 0.0 && self.keyframe_interval.is_finite()) {
            return Err("--keyframe-interval must be positive".into());
        }
        if !(self.pacing_factor >= 0.0 && self.pacing_factor.is_finite()) {
            return Err("--pacing-factor must be 0 (no pacing) or positive".into());
        }
        if self.pacing_factor > 0.0 && self.pacing_factor < 1.0 {
            return Err("--pacing-factor below 1 cannot keep up with the bitrate".into());
        }
        if !(self.join_timeout > 0.0 && self.join_timeout.is_finite()) {
            return Err("--join-timeout must be positive".into());
        }
        if self.cores == 0 {
            return Err("--cores must be at least 1".into());
        }
        if self.settle > MAX_SETTLE_S {
            return Err(format!(
                "--settle above {MAX_SETTLE_S} s (an hour) is not a settle"
            ));
        }
        if self.rx_poll_us > MAX_RX_POLL_US {
            return Err(format!(
                "--rx-poll-us above {MAX_RX_POLL_US} (0.1 s) would delay feedback to the SFU"
            ));
        }
        Ok(Options {
            url: self.url.trim_end_matches('/').to_string(),
            duration: Duration::from_secs_f64(self.duration),
            settle: self.settle,
            cores: self.cores,
            sfu_pid: self.sfu_pid,
            sfu_metrics: self.sfu_metrics.clone(),
            json: self.json.clone(),
            chart: self.chart.clone(),
            label: self.label.clone(),
            join_timeout: Duration::from_secs_f64(self.join_timeout),
            join_rate: self.join_rate,
            max_concurrent_joins: self.max_concurrent_joins,
            rx_poll: (self.rx_poll_us > 0).then(|| Duration::from_micros(self.rx_poll_us)),
            plan: MediaPlan {
                video: video.then_some(VideoConfig {
                    bitrate_bps: self.video_bitrate,
                    fps: 30,
                    keyframe_interval: Duration::from_secs_f64(self.keyframe_interval),
                    pacing_factor: self.pacing_factor,
                }),
                audio_bytes: Some((self.audio_bitrate / 8 / media::AUDIO_PPS) as usize),
                simulcast: self.simulcast && video,
            },
            stream_prefix: self.stream_prefix.clone(),
            room: None,
            quiet: self.quiet,
        })
    }
}

/// A no-SFU measurement's `--duration`, or exit with a clear message.
fn window_or_exit(seconds: f64) -> Duration {
    if !(seconds > 0.0 && seconds.is_finite()) {
        eprintln!("error: --duration must be positive");
        std::process::exit(1);
    }
    Duration::from_secs_f64(seconds)
}

/// Print a no-SFU measurement's table and write its JSON if asked (exiting on failure).
fn finish(table: &str, summary: &impl serde::Serialize, json: Option<PathBuf>) {
    print!("{table}");
    if let Some(Err(e)) = json.map(|p| report::write_json(summary, &p)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let cli = Cli::parse();
    let mut room = None;
    let (name, scenario, common, video) = match cli.scenario {
        ScenarioCmd::Hiccup { duration, json } => {
            let summary = hiccup::measure(window_or_exit(duration));
            return finish(&summary.table(), &summary, json);
        }
        ScenarioCmd::Floor {
            subscribers,
            rate,
            size,
            batch,
            duration,
            send_cpu,
            recv_cpu,
            rx_poll_us,
            json,
        } => {
            if rx_poll_us > MAX_RX_POLL_US {
                eprintln!(
                    "error: --rx-poll-us above {MAX_RX_POLL_US} (0.1 s) would let the sockets overflow"
                );
                std::process::exit(1);
            }
            let cfg = floor::FloorConfig {
                subscribers,
                rate,
                size,
                batch,
                duration: window_or_exit(duration),
                send_cpu,
                recv_cpu,
                rx_poll: (rx_poll_us > 0).then(|| Duration::from_micros(rx_poll_us)),
            };
            let summary = floor::run(&cfg).unwrap_or_else(|e| {
                eprintln!("error: {e}");
                std::process::exit(1);
            });
            return finish(&summary.table(), &summary, json);
        }
        ScenarioCmd::Fanout {
            publishers,
            subscribers,
            common,
        } => (
            "fanout",
            Scenario::Fanout {
                publishers,
                subscribers,
            },
            common,
            true,
        ),
        ScenarioCmd::Audio {
            publishers,
            subscribers,
            common,
        } => (
            "audio",
            Scenario::Fanout {
                publishers,
                subscribers,
            },
            common,
            false,
        ),
        ScenarioCmd::Ramp {
            publishers,
            rate,
            max_loss,
            max_p99,
            max_subscribers,
            common,
        } => (
            "ramp",
            Scenario::Ramp {
                publishers,
                rate,
                max_loss,
                max_p99_ms: max_p99,
                max_subscribers,
            },
            common,
            true,
        ),
        ScenarioCmd::Meeting {
            participants,
            room: r,
            common,
        } => {
            if participants < 2 {
                eprintln!("error: --participants must be at least 2");
                std::process::exit(1);
            }
            if common.simulcast {
                eprintln!("error: meeting does not send simulcast (yet): drop --simulcast");
                std::process::exit(1);
            }
            room = r;
            ("meeting", Scenario::Meeting { participants }, common, true)
        }
    };
    if matches!(
        scenario,
        Scenario::Fanout { publishers: 0, .. } | Scenario::Ramp { publishers: 0, .. }
    ) {
        eprintln!("error: --publishers must be at least 1");
        std::process::exit(1);
    }
    let opts = match common.options(video) {
        Ok(o) => Options { room, ..o },
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let (json, chart) = (opts.json.clone(), opts.chart.clone());
    let (summary, outcome) = run::run(name, scenario, opts);
    println!("{}", summary.table());
    let mut failed = false;
    if let Some(path) = json {
        if let Err(e) = summary.write_json(&path) {
            eprintln!("error: {e}");
            failed = true;
        }
    }
    if let Some(path) = chart {
        if let Err(e) = report::chart(&summary, &path) {
            eprintln!("warning: {e}");
        }
    }
    match outcome {
        Outcome::Complete if !failed => {}
        Outcome::Complete => std::process::exit(1),
        Outcome::Aborted(reason) => {
            eprintln!("error: run aborted: {reason}");
            std::process::exit(1)
        }
    }
}
