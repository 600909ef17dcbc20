//! One load-generator core: a glommio executor pinned to a CPU, owning its simulated peers (one
//! task, one `Rtc` and one UDP socket each) and their statistics. It talks to the main thread only
//! by messages: commands in (polled every few milliseconds), statistics and peer events out
//! (flushed a few times a second). Nothing is shared with other shards.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

use crate::accounting::{latency_histogram, record_latency, Arrival, RecvCounts};
use crate::clock::mono_ns;
use crate::http::Target;
use crate::media::VideoConfig;
use crate::peer::{self, PeerSpec, Role};

/// Statistics are kept per second of *send* time.
pub const BUCKET_NS: u64 = 1_000_000_000;
/// A bucket is closed (and reported) this long after its end; later arrivals count as `late`.
pub const GRACE_NS: u64 = 1_000_000_000;
const FLUSH_EVERY: Duration = Duration::from_millis(250);
const COMMAND_POLL: Duration = Duration::from_millis(5);
/// How long a shard waits for its peers to leave (and DELETE their sessions) at shutdown.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// What every peer sends (publishers) and expects (subscribers).
#[derive(Debug, Clone, Copy)]
pub struct MediaPlan {
    pub video: Option<VideoConfig>,
    /// Audio payload bytes per 20 ms packet, when audio is on.
    pub audio_bytes: Option<usize>,
    /// Publishers send their video as three simulcast layers.
    pub simulcast: bool,
}

/// Everything a shard needs, moved onto its thread.
pub struct ShardSetup {
    pub index: usize,
    pub cpu: usize,
    pub target: Target,
    pub cert: str0m::crypto::dtls::DtlsCert,
    pub plan: MediaPlan,
    pub epoch_ns: u64,
    pub join_timeout: Duration,
    /// Peers of this shard between POST and DTLS-connected at once.
    pub max_concurrent_joins: u64,
    /// Watch peers' sockets with a [`crate::udp::Poller`] read this often, instead of a
    /// receive armed on the ring per socket (`--rx-poll-us`).
    pub rx_poll: Option<Duration>,
    pub commands: Receiver<Command>,
    pub events: Sender<ShardEvent>,
}

#[derive(Debug)]
pub enum Command {
    Add(PeerSpec),
    /// A `meeting` participant (`crate::meeting`).
    Join(crate::meeting::MeetingSpec),
    /// Leave: every peer stops, DELETEs its session, and the shard reports `Done`.
    Shutdown,
}

#[derive(Debug)]
pub enum ShardEvent {
    /// A publisher connected, or a subscriber got its first media packet.
    Joined {
        role: Role,
        id: u32,
        join_ms: f64,
        /// The bucket the peer joined in: a subscriber counts from the next one.
        bucket: u32,
    },
    JoinFailed {
        role: Role,
        id: u32,
        reason: String,
    },
    /// A joined peer lost its connection before shutdown.
    Lost {
        role: Role,
        reason: String,
    },
    /// Not about joining: a DELETE that failed, a packet without a probe, and so on.
    Failure {
        reason: String,
    },
    /// Simulcast: a subscriber's video now comes from layer `layer` (0 = lowest).
    Layer {
        id: u32,
        layer: u8,
    },
    Stats(Box<StatsFlush>),
    Done {
        unfinished: usize,
    },
}

/// One shard's statistics since its previous flush.
#[derive(Debug)]
pub struct StatsFlush {
    pub shard: usize,
    /// (publisher, bucket, packets sent).
    pub sent: Vec<(u32, u32, u64)>,
    /// Buckets closed by this flush, with what this shard's subscribers saw of them.
    pub closed: Vec<ClosedBucket>,
    /// Buckets below this are closed on this shard.
    pub closed_upto: u32,
    /// (bucket, packets) that arrived after their bucket was closed.
    pub late: Vec<(u32, u64)>,
    /// Publisher frames sent late because the shard was busy (a sign the loadgen is the limit).
    pub late_frames: u64,
}

#[derive(Debug)]
pub struct ClosedBucket {
    pub bucket: u32,
    pub counts: RecvCounts,
    /// Send to arrival at the subscriber's socket (kernel timestamp).
    pub latency: Histogram<u64>,
    /// Send to the subscriber reading it (adds the loadgen's own queueing).
    pub read_latency: Histogram<u64>,
}

struct OpenBucket {
    counts: RecvCounts,
    latency: Histogram<u64>,
    read_latency: Histogram<u64>,
}

/// A shard's running statistics. Touched per packet by its own peers only.
pub struct ShardStats {
    sent: HashMap<(u32, u32), u64>,
    /// Buckets `base..base + open.len()`.
    open: VecDeque<OpenBucket>,
    base: u32,
    late: HashMap<u32, u64>,
    pub late_frames: u64,
}

impl ShardStats {
    fn new() -> ShardStats {
        ShardStats {
            sent: HashMap::new(),
            open: VecDeque::new(),
            base: 0,
            late: HashMap::new(),
            late_frames: 0,
        }
    }

    pub fn count_sent(&mut self, publisher: u32, bucket: u32) {
        *self.sent.entry((publisher, bucket)).or_default() += 1;
    }

    /// `latency_us`: send to arrival at the socket; `read_us`: send to the peer reading it.
    /// Without `counted`, only the latency is kept (simulcast video: no loss accounting).
    pub fn count_received(
        &mut self,
        bucket: u32,
        arrival: Arrival,
        latency_us: u64,
        read_us: u64,
        counted: bool,
    ) {
        if bucket < self.base {
            if !counted {
                return;
            }
            if matches!(arrival, Arrival::InOrder | Arrival::Reordered) {
                *self.late.entry(bucket).or_default() += 1;
            }
            return;
        }
        // A send time far in the future is a corrupt probe: never grow without bound.
        let idx = (bucket - self.base) as usize;
        if idx > 64 {
            return;
        }
        while self.open.len() <= idx {
            self.open.push_back(OpenBucket {
                counts: RecvCounts::default(),
                latency: latency_histogram(),
                read_latency: latency_histogram(),
            });
        }
        let b = &mut self.open[idx];
        if counted {
            b.counts.count(arrival);
        }
        if matches!(arrival, Arrival::InOrder | Arrival::Reordered) {
            record_latency(&mut b.latency, latency_us);
            record_latency(&mut b.read_latency, read_us);
        }
    }

    /// Close every bucket below `upto` and take what has accumulated.
    fn flush(&mut self, shard: usize, upto: u32) -> StatsFlush {
        let mut closed = Vec::new();
        while self.base < upto {
            let b = self.open.pop_front().unwrap_or_else(|| OpenBucket {
                counts: RecvCounts::default(),
                latency: latency_histogram(),
                read_latency: latency_histogram(),
            });
            closed.push(ClosedBucket {
                bucket: self.base,
                counts: b.counts,
                latency: b.latency,
                read_latency: b.read_latency,
            });
            self.base += 1;
        }
        StatsFlush {
            shard,
            sent: self.sent.drain().map(|((p, b), n)| (p, b, n)).collect(),
            closed,
            closed_upto: self.base,
            late: self.late.drain().collect(),
            late_frames: std::mem::take(&mut self.late_frames),
        }
    }
}

/// The state every peer task of a shard shares (single-threaded: `Cell`/`RefCell`).
pub struct Shard {
    pub index: usize,
    pub target: Target,
    pub cert: str0m::crypto::dtls::DtlsCert,
    pub plan: MediaPlan,
    pub epoch_ns: u64,
    pub join_timeout: Duration,
    pub joins: Rc<Semaphore>,
    pub stopping: Cell<bool>,
    pub live: Cell<usize>,
    pub stats: RefCell<ShardStats>,
    /// Receive buffers, used by one peer at a time.
    pub rx: RefCell<crate::udp::RecvBatch>,
    /// The peers' sockets' poller (`--rx-poll-us`), or none to wait on the ring.
    pub poller: Option<Rc<crate::udp::Poller>>,
    events: Sender<ShardEvent>,
}

impl Shard {
    /// The statistics bucket of a monotonic-clock time.
    pub fn bucket(&self, ns: u64) -> u32 {
        (ns.saturating_sub(self.epoch_ns) / BUCKET_NS) as u32
    }

    pub fn emit(&self, e: ShardEvent) {
        // The main thread gone means we are being torn down; nothing to tell.
        let _ = self.events.send(e);
    }
}

/// Start a shard on its own pinned executor thread.
pub fn spawn(setup: ShardSetup) -> Result<glommio::ExecutorJoinHandle<()>, String> {
    let name = format!("loadgen-{}", setup.index);
    let cpu = setup.cpu;
    LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(&name)
        .io_memory(64 << 20)
        .ring_depth(1024)
        .spawn(move || run(setup))
        .map_err(|e| format!("cannot start shard on CPU {cpu}: {e}"))
}

async fn run(setup: ShardSetup) {
    let ShardSetup {
        index,
        cpu: _,
        target,
        cert,
        plan,
        epoch_ns,
        join_timeout,
        max_concurrent_joins,
        rx_poll,
        commands,
        events,
    } = setup;
    let poller = match rx_poll.map(crate::udp::Poller::new).transpose() {
        Ok(p) => p,
        Err(e) => {
            // Without a poller the peers wait on the ring: slower for the SFU, but measured.
            eprintln!("warning: shard {index}: epoll: {e}; its peers wait on the ring instead");
            None
        }
    };
    let shard = Rc::new(Shard {
        index,
        target,
        cert,
        plan,
        epoch_ns,
        join_timeout,
        joins: Rc::new(Semaphore::new(max_concurrent_joins.max(1))),
        stopping: Cell::new(false),
        live: Cell::new(0),
        stats: RefCell::new(ShardStats::new()),
        rx: RefCell::new(Default::default()),
        poller,
        events,
    });
    if let Some(p) = shard.poller.clone() {
        let s = shard.clone();
        glommio::spawn_local(crate::udp::run_poller(p, move || {
            s.stopping.get() && s.live.get() == 0
        }))
        .detach();
    }
    let mut last_flush = Instant::now();
    'control: loop {
        loop {
            match commands.try_recv() {
                Ok(Command::Add(spec)) => {
                    glommio::spawn_local(peer::run(shard.clone(), spec)).detach();
                }
                Ok(Command::Join(spec)) => {
                    glommio::spawn_local(crate::meeting::run(shard.clone(), spec)).detach();
                }
                Ok(Command::Shutdown) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    break 'control
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
            }
        }
        if last_flush.elapsed() >= FLUSH_EVERY {
            last_flush = Instant::now();
            flush(&shard, false);
        }
        glommio::timer::sleep(COMMAND_POLL).await;
    }
    shard.stopping.set(true);
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    while shard.live.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    flush(&shard, true);
    shard.emit(ShardEvent::Done {
        unfinished: shard.live.get(),
    });
}

/// Report what accumulated; close the buckets whose grace period is over (all of them when
/// `all`).
fn flush(shard: &Shard, all: bool) {
    let now = mono_ns();
    let upto = if all {
        shard.bucket(now) + 2
    } else {
        shard.bucket(now.saturating_sub(GRACE_NS))
    };
    let f = shard.stats.borrow_mut().flush(shard.index, upto);
    shard.emit(ShardEvent::Stats(Box::new(f)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_close_in_order_and_late_packets_are_kept_apart() {
        let mut s = ShardStats::new();
        s.count_sent(3, 0);
        s.count_sent(3, 0);
        s.count_sent(3, 1);
        s.count_received(0, Arrival::InOrder, 100, 150, true);
        s.count_received(1, Arrival::Reordered, 300, 350, true);
        s.count_received(1, Arrival::Duplicate, 300, 350, true);
        let f = s.flush(0, 1);
        assert_eq!(f.closed.len(), 1);
        assert_eq!(f.closed[0].bucket, 0);
        assert_eq!(f.closed[0].counts.received, 1);
        assert_eq!(f.closed[0].latency.len(), 1);
        assert_eq!(f.closed_upto, 1);
        let mut sent = f.sent.clone();
        sent.sort();
        assert_eq!(sent, vec![(3, 0, 2), (3, 1, 1)]);
        // Bucket 0 is closed: a straggler for it is late, not received.
        s.count_received(0, Arrival::InOrder, 2_000_000, 2_000_000, true);
        let f = s.flush(0, 3);
        assert_eq!(
            f.closed.iter().map(|c| c.bucket).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(f.closed[0].counts.received, 1);
        assert_eq!(f.closed[0].counts.reordered, 1);
        assert_eq!(f.closed[0].counts.duplicates, 1);
        assert_eq!(f.closed[1].counts, RecvCounts::default());
        assert_eq!(f.late, vec![(0, 1)]);
        assert!(f.sent.is_empty());
    }
}
