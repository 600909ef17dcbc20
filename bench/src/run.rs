//! One run of a scenario, driven from the main thread: start the shards, join the peers at a
//! bounded rate, sample the SFU at every second boundary, measure a window (or ramp until a
//! limit), stop everything, and summarise. Every phase has a deadline, so a run always ends.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use crate::accounting::{loss_ratio, percentile, LatencySummary};
use crate::clock::{allowed_cpus, mono_ns, self_cpu};
use crate::collect::{Collector, Row};
use crate::http::{self, Target};
use crate::peer::{PeerSpec, Role};
use crate::report::{Capacity, JoinSummary, Summary, TimelineRow};
use crate::sfu::{SfuMonitor, SfuSample};
use crate::shard::{self, Command, MediaPlan, ShardSetup, BUCKET_NS};

pub struct Options {
    pub url: String,
    /// Measurement window (fanout, audio) or longest ramp.
    pub duration: Duration,
    /// Whole seconds between the last join and the window (fanout, audio, meeting).
    pub settle: u64,
    pub cores: usize,
    pub sfu_pid: Option<u32>,
    pub sfu_metrics: Option<String>,
    pub json: Option<PathBuf>,
    pub chart: Option<PathBuf>,
    pub label: Option<String>,
    pub join_timeout: Duration,
    /// Subscribers started per second (fanout, audio).
    pub join_rate: f64,
    pub max_concurrent_joins: u64,
    /// Peers' sockets are polled this often (see `crate::udp::Poller`); none: each waits on
    /// the ring.
    pub rx_poll: Option<Duration>,
    pub plan: MediaPlan,
    pub stream_prefix: String,
    /// `meeting`: the room to join [default: the stream prefix and our pid].
    pub room: Option<String>,
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Scenario {
    /// `subscribers` per publisher, all joined before the window starts.
    Fanout { publishers: u32, subscribers: u32 },
    /// Subscribers added at `rate` per second (spread over the publishers) until a limit.
    Ramp {
        publishers: u32,
        rate: f64,
        max_loss: f64,
        max_p99_ms: f64,
        max_subscribers: u32,
    },
    /// Everyone publishes to and receives from everyone in one `/ws` room
    /// (`crate::meeting`): participants join at `join_rate`, then the window.
    Meeting { participants: u32 },
}

/// How the run ended, besides its summary.
pub enum Outcome {
    /// The scenario ran to its end.
    Complete,
    /// It could not (no publisher joined, the run overran its bound): the summary says why.
    Aborted(String),
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    ns: u64,
    sfu: SfuSample,
    loadgen_cpu: Duration,
}

enum Phase {
    Publishing {
        deadline: Instant,
    },
    Subscribing {
        started: Instant,
        launched: u32,
        total: u32,
        last_launch: Instant,
    },
    Measuring {
        b1: u32,
    },
    Ramping {
        started: Instant,
        launched: u32,
        streak: u32,
        first: Option<u32>,
        last_good: Option<Row>,
        last_launch: Instant,
    },
    Stopping {
        deadline: Instant,
    },
}

/// Refuse at once, with the reason, when nothing answers at `url`.
pub fn check_reachable(target: &Target, url: &str) -> Result<(), String> {
    match http::request(
        target,
        "GET",
        &target.path("/healthz"),
        None,
        b"",
        Duration::from_secs(3),
    ) {
        Ok(r) if (200..300).contains(&r.status) => Ok(()),
        Ok(r) => Err(format!(
            "sluice at {url} is not healthy: GET /healthz answered HTTP {}",
            r.status
        )),
        Err(e) => Err(format!("sluice is not reachable at {url}: {e}")),
    }
}

pub fn run(scenario_name: &str, scenario: Scenario, opts: Options) -> (Summary, Outcome) {
    let mut runner = match Runner::start(scenario_name, scenario, opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    runner.main_loop();
    runner.finish()
}

struct Runner {
    name: String,
    scenario: Scenario,
    opts: Options,
    commands: Vec<Sender<Command>>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    events: mpsc::Receiver<shard::ShardEvent>,
    col: Collector,
    monitor: SfuMonitor,
    baseline: SfuSample,
    samples: BTreeMap<u32, Sample>,
    timeline: Vec<TimelineRow>,
    epoch_ns: u64,
    epoch: Instant,
    phase: Phase,
    window: Option<(u32, u32)>,
    capacity: Option<Capacity>,
    aborted: Option<String>,
    /// The bucket in which peers were told to stop: later seconds are teardown.
    stop_bucket: Option<u32>,
    next_subscriber: u32,
    /// `meeting`: when each participant started joining (shared with the shards).
    meeting_started: std::sync::Arc<Vec<std::sync::atomic::AtomicU64>>,
    status: Status,
    hard_deadline: Instant,
}

impl Runner {
    fn start(name: &str, scenario: Scenario, opts: Options) -> Result<Runner, String> {
        let target = Target::parse(&opts.url)?;
        check_reachable(&target, &opts.url)?;
        let metrics_url = opts
            .sfu_metrics
            .clone()
            .unwrap_or_else(|| format!("{}/metrics", opts.url.trim_end_matches('/')));
        let mut monitor = SfuMonitor::new(opts.sfu_pid, Some(&metrics_url))?;
        let baseline = monitor.sample();
        // One certificate for every peer: generating one costs about a millisecond.
        let cert = str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
            .ok_or("cannot generate a DTLS certificate")?;
        let fds = crate::clock::raise_fd_limit();
        let peers = match scenario {
            Scenario::Fanout {
                publishers,
                subscribers,
            } => publishers as u64 * (1 + subscribers as u64),
            // A ramp stops where it stops; its failed joins will say so.
            Scenario::Ramp { .. } => 0,
            // Two peer connections and a WebSocket each.
            Scenario::Meeting { participants } => participants as u64 * 3,
        };
        if fds > 0 && peers * 2 + 64 > fds {
            eprintln!(
                "warning: {peers} peers need about {} file descriptors; the limit is {fds} \
                 (raise it with ulimit -n): joins past it will fail",
                peers * 2 + 64
            );
        }
        let cpus = allowed_cpus();
        let cores = opts.cores.max(1);
        if cores > cpus.len() {
            eprintln!(
                "warning: --cores {cores} but only {} CPU(s) allowed ({cpus:?}): shards share CPUs",
                cpus.len()
            );
        }
        let epoch_ns = mono_ns();
        let epoch = Instant::now();
        let (ev_tx, ev_rx) = mpsc::channel();
        let mut commands = Vec::new();
        let mut handles = Vec::new();
        for index in 0..cores {
            let (tx, rx) = mpsc::channel();
            let h = shard::spawn(ShardSetup {
                index,
                cpu: cpus[index % cpus.len()],
                target: target.clone(),
                cert: cert.clone(),
                plan: opts.plan,
                epoch_ns,
                join_timeout: opts.join_timeout,
                max_concurrent_joins: opts.max_concurrent_joins,
                rx_poll: opts.rx_poll,
                commands: rx,
                events: ev_tx.clone(),
            })?;
            commands.push(tx);
            handles.push(h);
        }
        let publishers = match scenario {
            Scenario::Fanout { publishers, .. } | Scenario::Ramp { publishers, .. } => publishers,
            // Participants are launched in the joining phase.
            Scenario::Meeting { .. } => 0,
        };
        let window_bound = match scenario {
            Scenario::Fanout {
                publishers,
                subscribers,
            } => {
                opts.duration
                    + Duration::from_secs_f64(
                        (publishers as f64 * subscribers as f64) / opts.join_rate.max(1.0),
                    )
            }
            Scenario::Ramp { .. } => opts.duration,
            Scenario::Meeting { participants } => {
                opts.duration
                    + Duration::from_secs_f64(participants as f64 / opts.join_rate.max(1.0))
            }
        };
        let hard_deadline = epoch
            + window_bound
            + Duration::from_secs(opts.settle)
            + 3 * opts.join_timeout
            + Duration::from_secs(60);
        let mut r = Runner {
            name: name.to_string(),
            scenario,
            commands,
            handles,
            events: ev_rx,
            col: Collector::new(cores),
            monitor,
            baseline,
            samples: BTreeMap::new(),
            timeline: Vec::new(),
            epoch_ns,
            epoch,
            phase: match scenario {
                Scenario::Meeting { participants } => Phase::Subscribing {
                    started: Instant::now(),
                    launched: 0,
                    total: participants,
                    last_launch: Instant::now(),
                },
                _ => Phase::Publishing {
                    deadline: Instant::now() + opts.join_timeout + Duration::from_secs(2),
                },
            },
            window: None,
            capacity: None,
            aborted: None,
            stop_bucket: None,
            next_subscriber: 0,
            meeting_started: std::sync::Arc::new(Vec::new()),
            status: Status::new(opts.quiet),
            hard_deadline,
            opts,
        };
        if let Scenario::Meeting { participants } = scenario {
            r.meeting_started = std::sync::Arc::new(
                (0..participants)
                    .map(|_| std::sync::atomic::AtomicU64::new(0))
                    .collect(),
            );
        }
        r.take_sample(0);
        for p in 0..publishers {
            r.col.add_publisher();
            let spec = PeerSpec {
                role: Role::Publisher,
                id: p,
                publisher: p,
                stream: r.stream_name(p),
            };
            r.send(p as usize, Command::Add(spec));
        }
        Ok(r)
    }

    fn stream_name(&self, publisher: u32) -> String {
        format!(
            "{}{}-{}",
            self.opts.stream_prefix,
            std::process::id(),
            publisher
        )
    }

    /// `meeting`: `--room`, else the stream prefix and our pid.
    fn room(&self) -> String {
        self.opts
            .room
            .clone()
            .unwrap_or_else(|| format!("{}{}", self.opts.stream_prefix, std::process::id()))
    }

    fn send(&self, key: usize, c: Command) {
        let _ = self.commands[key % self.commands.len()].send(c);
    }

    fn publishers(&self) -> u32 {
        match self.scenario {
            Scenario::Fanout { publishers, .. } | Scenario::Ramp { publishers, .. } => publishers,
            Scenario::Meeting { participants } => participants,
        }
    }

    /// The joining phase's next peer: a subscriber, or (meeting) a participant.
    fn launch(&mut self) {
        match self.scenario {
            Scenario::Meeting { participants } => self.add_participant(participants),
            _ => self.add_subscriber(),
        }
    }

    /// A meeting participant: publisher `i`, and one collector subscriber per other participant
    /// it receives (`crate::meeting::pair_id`).
    fn add_participant(&mut self, participants: u32) {
        let index = self.next_subscriber;
        self.next_subscriber += 1;
        self.col.add_publisher();
        for sender in (0..participants).filter(|&s| s != index) {
            self.col
                .add_subscriber(crate::meeting::pair_id(index, sender, participants), sender);
        }
        let room = self.room();
        let spec = crate::meeting::MeetingSpec {
            index,
            participants,
            room,
            started: self.meeting_started.clone(),
        };
        self.send(index as usize, Command::Join(spec));
    }

    fn add_subscriber(&mut self) {
        let id = self.next_subscriber;
        self.next_subscriber += 1;
        let publisher = id % self.publishers().max(1);
        self.col.add_subscriber(id, publisher);
        let spec = PeerSpec {
            role: Role::Subscriber,
            id,
            publisher,
            stream: self.stream_name(publisher),
        };
        // Spread subscribers over the shards; publisher p lives on shard p.
        self.send(id as usize + 1, Command::Add(spec));
    }

    fn bucket_now(&self) -> u32 {
        ((mono_ns() - self.epoch_ns) / BUCKET_NS) as u32
    }

    fn take_sample(&mut self, bucket: u32) {
        let sfu = self.monitor.sample();
        self.samples.insert(
            bucket,
            Sample {
                ns: mono_ns(),
                sfu,
                loadgen_cpu: self_cpu(),
            },
        );
    }

    /// The first sample at or after bucket `b`'s start.
    fn sample_at(&self, b: u32) -> Option<&Sample> {
        self.samples.range(b..).next().map(|(_, s)| s)
    }

    fn main_loop(&mut self) {
        let mut last_status = Instant::now();
        let mut last_sampled = 0u32;
        loop {
            // Events: wait a little for the first, then take whatever else is there.
            if let Ok(e) = self.events.recv_timeout(Duration::from_millis(20)) {
                self.col.on_event(e);
                while let Ok(e) = self.events.try_recv() {
                    self.col.on_event(e);
                }
            }
            let now = Instant::now();
            let cur = self.bucket_now();
            if cur > last_sampled && !matches!(self.phase, Phase::Stopping { .. }) {
                self.take_sample(cur);
                last_sampled = cur;
            }
            for row in self.col.take_closed_rows() {
                self.timeline_row(&row);
                self.ramp_check(&row);
            }
            if let Some(next) = self.advance(now, cur) {
                self.phase = next;
            }
            if matches!(self.phase, Phase::Stopping { .. }) && self.col.done >= self.commands.len()
            {
                break;
            }
            if let Phase::Stopping { deadline } = self.phase {
                if now > deadline {
                    eprintln!(
                        "warning: {} shard(s) did not stop in time",
                        self.commands.len() - self.col.done
                    );
                    break;
                }
            }
            if now > self.hard_deadline && !matches!(self.phase, Phase::Stopping { .. }) {
                self.abort("the run overran its time bound".into());
            }
            if now.duration_since(last_status) >= Duration::from_millis(250) {
                last_status = now;
                let line = self.status_line();
                self.status.update(&line);
            }
        }
        self.status.finish();
    }

    fn abort(&mut self, reason: String) {
        eprintln!("error: {reason}");
        self.aborted.get_or_insert(reason);
        self.stop();
    }

    fn stop(&mut self) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        self.stop_bucket = Some(self.bucket_now());
        for c in &self.commands {
            let _ = c.send(Command::Shutdown);
        }
        self.phase = Phase::Stopping {
            deadline: Instant::now() + Duration::from_secs(20),
        };
    }

    /// Move the scenario forward; a new phase when it changes.
    fn advance(&mut self, now: Instant, cur: u32) -> Option<Phase> {
        let pending = self.col.pending_joins();
        match self.phase {
            Phase::Publishing { deadline } => {
                if pending > 0 && now < deadline {
                    return None;
                }
                if self.col.publishers_joined == 0 {
                    self.abort(format!(
                        "no publisher could join ({} failed): see failures",
                        self.col.publishers_failed
                    ));
                    return None;
                }
                Some(match self.scenario {
                    Scenario::Fanout {
                        publishers,
                        subscribers,
                    } => Phase::Subscribing {
                        started: now,
                        launched: 0,
                        total: publishers * subscribers,
                        last_launch: now,
                    },
                    Scenario::Ramp { .. } => Phase::Ramping {
                        started: now,
                        launched: 0,
                        streak: 0,
                        first: None,
                        last_good: None,
                        last_launch: now,
                    },
                    // (A meeting starts in the joining phase.)
                    Scenario::Meeting { participants } => Phase::Subscribing {
                        started: now,
                        launched: 0,
                        total: participants,
                        last_launch: now,
                    },
                })
            }
            Phase::Subscribing {
                started,
                launched,
                total,
                last_launch,
            } => {
                let rate = self.opts.join_rate;
                let due = if rate <= 0.0 {
                    total
                } else {
                    ((now.duration_since(started).as_secs_f64() * rate).ceil() as u32).min(total)
                };
                let mut last_launch = last_launch;
                if due > launched {
                    for _ in launched..due {
                        self.launch();
                    }
                    last_launch = now;
                    if let Phase::Subscribing {
                        launched: l,
                        last_launch: ll,
                        ..
                    } = &mut self.phase
                    {
                        *l = due;
                        *ll = now;
                    }
                }
                let waited = now.duration_since(last_launch)
                    > self.opts.join_timeout + Duration::from_secs(2);
                // Counted again: the peers just launched are pending too.
                let pending = self.col.pending_joins();
                if due == total && (pending == 0 || waited) {
                    if self.col.joined_subscribers() == 0 && total > 0 {
                        self.abort("no subscriber received media: see failures".into());
                        return None;
                    }
                    let (b0, b1) = window_after(cur, self.opts.settle, self.opts.duration);
                    self.window = Some((b0, b1));
                    return Some(Phase::Measuring { b1 });
                }
                None
            }
            Phase::Measuring { b1 } => {
                if self.col.closed() >= b1 {
                    self.stop();
                }
                None
            }
            Phase::Ramping {
                started,
                launched,
                last_launch,
                ..
            } => {
                let Scenario::Ramp {
                    rate,
                    max_subscribers,
                    ..
                } = self.scenario
                else {
                    return None;
                };
                let elapsed = now.duration_since(started);
                let due = ((elapsed.as_secs_f64() * rate) as u32).min(max_subscribers);
                let mut last_launch = last_launch;
                if due > launched {
                    for _ in launched..due {
                        self.add_subscriber();
                    }
                    last_launch = now;
                    if let Phase::Ramping {
                        launched: l,
                        last_launch: ll,
                        ..
                    } = &mut self.phase
                    {
                        *l = due;
                        *ll = now;
                    }
                }
                let quiet_since = now.duration_since(last_launch);
                let pending = self.col.pending_joins();
                let rejected = self.col.rejected_joins();
                if rejected > 10.max(due as u64 / 20) {
                    self.end_ramp(format!("the SFU refused or failed {rejected} joins"));
                } else if elapsed > self.opts.duration {
                    self.end_ramp(format!(
                        "time limit ({:?}) before reaching a limit",
                        self.opts.duration
                    ));
                } else if due >= max_subscribers
                    && pending == 0
                    && quiet_since > Duration::from_secs(4)
                {
                    self.end_ramp(format!(
                        "--max-subscribers {max_subscribers} reached without reaching a limit"
                    ));
                }
                None
            }
            Phase::Stopping { .. } => None,
        }
    }

    /// Ramp: judge one closed second against the limits.
    fn ramp_check(&mut self, row: &Row) {
        let Scenario::Ramp {
            max_loss,
            max_p99_ms,
            ..
        } = self.scenario
        else {
            return;
        };
        let Phase::Ramping {
            streak,
            first,
            last_good,
            ..
        } = &mut self.phase
        else {
            return;
        };
        if row.subscribers == 0 {
            return;
        }
        first.get_or_insert(row.bucket);
        let loss = loss_ratio(row.expected, row.counts.received);
        let p99_ms = row.latency.p99 as f64 / 1000.0;
        if loss > max_loss || p99_ms > max_p99_ms {
            *streak += 1;
            if *streak >= 2 {
                let why = format!(
                    "limit reached: loss {:.2} %, p99 {:.1} ms at {} subscribers",
                    loss * 100.0,
                    p99_ms,
                    row.subscribers
                );
                self.end_ramp(why);
            }
        } else {
            *streak = 0;
            *last_good = Some(row.clone());
        }
    }

    fn end_ramp(&mut self, why: String) {
        let Scenario::Ramp {
            max_loss,
            max_p99_ms,
            ..
        } = self.scenario
        else {
            return;
        };
        let Phase::Ramping {
            first, last_good, ..
        } = &self.phase
        else {
            return;
        };
        let (first, last_good) = (*first, last_good.clone());
        match (first, &last_good) {
            (Some(f), Some(g)) => self.window = Some((f, g.bucket + 1)),
            _ => self.window = None,
        }
        let egress = last_good
            .as_ref()
            .and_then(|g| self.timeline_for(g.bucket))
            .and_then(|t| t.sfu_egress_pps);
        self.capacity = Some(Capacity {
            subscribers: last_good.as_ref().map_or(0, |g| g.subscribers),
            sfu_egress_pps: egress,
            delivered_pps: last_good.as_ref().map_or(0.0, |g| g.counts.received as f64),
            stopped_by: why,
            max_loss,
            max_p99_ms,
        });
        self.stop();
    }

    fn timeline_for(&self, bucket: u32) -> Option<&TimelineRow> {
        let t = bucket as f64;
        self.timeline.iter().find(|r| r.t_s == t)
    }

    fn timeline_row(&mut self, row: &Row) {
        let rate = |a: Option<&Sample>, b: Option<&Sample>, f: &dyn Fn(&Sample) -> Option<f64>| {
            let (a, b) = (a?, b?);
            let dt = (b.ns.checked_sub(a.ns)? as f64) / 1e9;
            (dt > 0.0).then_some((f(b)? - f(a)?) / dt)
        };
        let (a, b) = (
            self.samples.get(&row.bucket),
            self.samples.get(&(row.bucket + 1)),
        );
        self.timeline.push(TimelineRow {
            t_s: row.bucket as f64,
            subscribers: row.subscribers,
            sent_pps: row.sent,
            expected: row.expected,
            received_pps: row.counts.received,
            loss: loss_ratio(row.expected, row.counts.received),
            sfu_egress_pps: rate(a, b, &|s| s.sfu.forwarded.map(|v| v as f64)),
            sfu_cpu_cores: rate(a, b, &|s| s.sfu.cpu.map(|c| c.as_secs_f64())),
            sfu_cpu_steal: rate(a, b, &|s| s.sfu.steal.map(|c| c.as_secs_f64()))
                .map(|v| v / self.monitor.cpus.len().max(1) as f64),
            loadgen_cpu_cores: rate(a, b, &|s| Some(s.loadgen_cpu.as_secs_f64())),
            latency_us: row.latency,
        });
    }

    fn status_line(&self) -> String {
        let phase = match &self.phase {
            Phase::Publishing { .. } => "publishing",
            Phase::Subscribing { .. } => "joining",
            Phase::Measuring { .. } => "measuring",
            Phase::Ramping { .. } => "ramping",
            Phase::Stopping { .. } => "stopping",
        };
        let mut s = format!(
            "{:>5.1}s {phase:<9} peers: pub {}/{} sub {}/{} ({} failed)",
            self.epoch.elapsed().as_secs_f64(),
            self.col.publishers_joined,
            self.publishers(),
            self.col.joined_subscribers(),
            self.col.subscribers_requested(),
            self.col.rejected_joins(),
        );
        if let Some(t) = self.timeline.last() {
            s.push_str(&format!(
                " | out {} pps in {} pps | loss {:.2}% | p50 {:.2} ms p99 {:.2} ms",
                t.sent_pps,
                t.received_pps,
                t.loss * 100.0,
                t.latency_us.p50 as f64 / 1000.0,
                t.latency_us.p99 as f64 / 1000.0,
            ));
            if let Some(e) = t.sfu_egress_pps {
                s.push_str(&format!(" | SFU {e:.0} pps"));
            }
            if let Some(c) = t.sfu_cpu_cores {
                s.push_str(&format!(" {:.0}% CPU", c * 100.0));
            }
            if let Some(c) = t.loadgen_cpu_cores {
                s.push_str(&format!(" | loadgen {:.0}% CPU", c * 100.0));
            }
        }
        s
    }

    fn finish(mut self) -> (Summary, Outcome) {
        for h in self.handles.drain(..) {
            // Shards have reported Done (or missed the deadline, already reported); a shard
            // thread that is still stuck is left behind rather than waited on forever.
            if self.col.done >= self.commands.len() {
                let _ = h.join();
            }
        }
        let summary = self.summarize();
        let outcome = match self.aborted.take() {
            Some(r) => Outcome::Aborted(r),
            None => Outcome::Complete,
        };
        (summary, outcome)
    }

    /// `meeting`: pairs receiving, and participants receiving anyone (the summary's
    /// `subscribers`).
    fn meeting_spread(&self, participants: u32) -> (crate::report::MeetingSpread, u64) {
        let mut per_receiver = vec![0u32; participants as usize];
        let ids = self.col.joined_subscriber_ids();
        for &id in &ids {
            let r = crate::meeting::receiver_of(id, participants) as usize;
            if let Some(n) = per_receiver.get_mut(r) {
                *n += 1;
            }
        }
        let n = u64::from(participants);
        let spread = crate::report::MeetingSpread {
            room: self.room(),
            participants: n,
            pairs: n * n.saturating_sub(1),
            pairs_receiving: ids.len() as u64,
            receiving_everyone: per_receiver
                .iter()
                .filter(|&&k| k + 1 == participants)
                .count() as u64,
        };
        let receiving = per_receiver.iter().filter(|&&k| k > 0).count() as u64;
        (spread, receiving)
    }

    fn summarize(&self) -> Summary {
        let (b0, b1) = self.window.unwrap_or((0, 0));
        let rows: Vec<&Row> = self
            .col
            .rows()
            .iter()
            .filter(|r| r.bucket >= b0 && r.bucket < b1)
            .collect();
        let sum = |f: &dyn Fn(&Row) -> u64| rows.iter().map(|r| f(r)).sum::<u64>();
        let expected = sum(&|r| r.expected);
        let received = sum(&|r| r.counts.received);
        let (s0, s1) = (self.sample_at(b0), self.sample_at(b1));
        let dt = match (s0, s1) {
            (Some(a), Some(b)) if b.ns > a.ns && b1 > b0 => Some((b.ns - a.ns) as f64 / 1e9),
            _ => None,
        };
        let delta = |f: &dyn Fn(&Sample) -> Option<f64>| -> Option<f64> {
            let (a, b) = (s0?, s1?);
            dt?;
            Some(f(b)? - f(a)?)
        };
        let forwarded = delta(&|s| s.sfu.forwarded.map(|v| v as f64));
        let sfu_cpu = delta(&|s| s.sfu.cpu.map(|c| c.as_secs_f64()));
        let steal = delta(&|s| s.sfu.steal.map(|c| c.as_secs_f64()))
            .zip(dt)
            .map(|(s, dt)| s / (dt * self.monitor.cpus.len().max(1) as f64));
        let lg_cpu = delta(&|s| Some(s.loadgen_cpu.as_secs_f64())).unwrap_or(0.0);
        let sfu_egress_pps = forwarded.zip(dt).map(|(f, dt)| f / dt);
        let per_core = forwarded
            .zip(sfu_cpu)
            .and_then(|(f, c)| (c > 0.0).then_some(f / c));
        let sent = sum(&|r| r.sent);
        let lg_per_core = (lg_cpu > 0.0).then_some((sent + received) as f64 / lg_cpu);
        let saturated = dt.is_some_and(|dt| lg_cpu / (dt * self.commands.len() as f64) > 0.9);
        let peers = match self.scenario {
            // Two peer connections per participant (its pairs are not peers).
            Scenario::Meeting { .. } => 2 * self.col.publishers_joined,
            _ => self.col.publishers_joined + self.col.joined_subscribers(),
        };
        let rss_per_peer = match (self.baseline.rss_bytes, s1.and_then(|s| s.sfu.rss_bytes)) {
            (Some(a), Some(b)) if peers > 0 => Some(b.saturating_sub(a) as f64 / peers as f64),
            _ => None,
        };
        let drops = delta(&|s| s.sfu.dropped.map(|v| v as f64)).map(|v| v as u64);
        let join = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            JoinSummary {
                p50: percentile(&v, 0.50).unwrap_or(0.0),
                p99: percentile(&v, 0.99).unwrap_or(0.0),
            }
        };
        let mut failures = self.col.failures();
        if let Some(a) = &self.aborted {
            failures.insert(
                0,
                crate::collect::Failure {
                    reason: format!("run aborted: {a}"),
                    role: "run".into(),
                    count: 1,
                },
            );
        }
        if self.col.unfinished > 0 {
            failures.push(crate::collect::Failure {
                reason: "peers still running when their shard stopped".into(),
                role: "any".into(),
                count: self.col.unfinished as u64,
            });
        }
        let meeting = match self.scenario {
            Scenario::Meeting { participants } => Some(self.meeting_spread(participants)),
            _ => None,
        };
        Summary {
            scenario: self.name.clone(),
            duration_s: (b1 - b0) as f64,
            publishers: self.col.publishers_joined,
            subscribers: match &meeting {
                Some(m) => m.1,
                None => rows.iter().map(|r| r.subscribers).max().unwrap_or(0),
            },
            packets_sent: sent,
            packets_expected: expected,
            packets_received: received,
            delivered_ratio: if expected > 0 {
                received as f64 / expected as f64
            } else {
                0.0
            },
            sfu_egress_pps,
            sfu_cpu_seconds: sfu_cpu,
            egress_pps_per_sfu_core: per_core,
            latency_us: LatencySummary::of(&self.col.latency(b0, b1)),
            read_latency_us: LatencySummary::of(&self.col.read_latency(b0, b1)),
            join_ms: join(&self.col.join_ms),
            loadgen_cpu_seconds: lg_cpu,
            failures,
            url: self.opts.url.clone(),
            label: self.opts.label.clone(),
            loadgen_cores: self.commands.len(),
            loadgen_pps_per_core: lg_per_core,
            loadgen_saturated: saturated,
            loadgen_late_frames: self.col.late_frames,
            video_pacing_factor: self.opts.plan.video.map(|v| v.pacing_factor),
            settle_s: self.opts.settle,
            rx_poll_us: self.opts.rx_poll.map_or(0, |d| d.as_micros() as u64),
            reordered: sum(&|r| r.counts.reordered),
            duplicates: sum(&|r| r.counts.duplicates),
            too_old: sum(&|r| r.counts.too_old),
            late: sum(&|r| r.counts.late),
            rejected_joins: self.col.rejected_joins(),
            lost_peers: self.col.lost,
            publisher_join_ms: join(&self.col.publisher_join_ms),
            sfu_rss_per_peer_bytes: rss_per_peer,
            sfu_forward_latency_us: s0
                .zip(s1)
                .and_then(|(a, b)| {
                    b.sfu
                        .forward_latency?
                        .quantiles_since(&a.sfu.forward_latency?)
                })
                .map(|q| crate::report::SfuLatency {
                    p50: q[0],
                    p90: q[1],
                    p99: q[2],
                    p999: q[3],
                }),
            sfu_drops: drops,
            sfu_cpu_steal: steal,
            simulcast: self.opts.plan.simulcast.then(|| {
                let mut per_layer = vec![0u64; crate::peer::SIMULCAST_RIDS.len()];
                for &l in self.col.layer_of.values() {
                    if let Some(n) = per_layer.get_mut(usize::from(l)) {
                        *n += 1;
                    }
                }
                let with_video = self.col.layer_of.len() as u64;
                crate::report::SimulcastSpread {
                    subscribers_per_layer: per_layer,
                    without_video: self.col.subscribers_joined.saturating_sub(with_video),
                    layer_changes: self.col.layer_changes,
                }
            }),
            meeting: meeting.map(|(m, _)| m),
            capacity: self.capacity.clone(),
            timeline: self
                .timeline
                .iter()
                .filter(|r| self.stop_bucket.is_none_or(|s| r.t_s < s as f64))
                .cloned()
                .collect(),
        }
    }
}

/// The live status line: an indicatif spinner on a terminal, a plain line every 5 s otherwise.
struct Status {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    last_plain: Instant,
}

impl Status {
    fn new(quiet: bool) -> Status {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b
        });
        Status {
            bar,
            quiet,
            last_plain: Instant::now(),
        }
    }

    fn update(&mut self, line: &str) {
        if let Some(b) = &self.bar {
            b.set_message(line.to_string());
            b.tick();
        } else if !self.quiet && self.last_plain.elapsed() >= Duration::from_secs(5) {
            self.last_plain = Instant::now();
            eprintln!("{line}");
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The window's first and end buckets (seconds since the epoch), when the last join completed
/// in bucket `cur`: `settle` whole seconds left out after the bucket that follows, then
/// `duration` rounded up to whole seconds (at least one).
fn window_after(cur: u32, settle: u64, duration: Duration) -> (u32, u32) {
    let b0 = cur + 1 + settle as u32;
    (b0, b0 + (duration.as_secs_f64().ceil() as u32).max(1))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn the_window_starts_after_the_settle() {
        let ten = Duration::from_secs(10);
        assert_eq!(super::window_after(4, 0, ten), (5, 15));
        assert_eq!(super::window_after(4, 3, ten), (8, 18));
        assert_eq!(
            super::window_after(4, 0, Duration::from_millis(2500)),
            (5, 8)
        );
        assert_eq!(super::window_after(0, 0, Duration::ZERO), (1, 2));
    }
}
