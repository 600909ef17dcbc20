//! The main thread's view of a run: merges what the shards report (sent counts, closed buckets,
//! joins, failures) into one row per second, and decides which subscriber deliveries were
//! expected: a subscriber owes every packet its publisher sent in the buckets after the one it
//! joined in.

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;

use crate::accounting::{latency_histogram, LatencySummary, RecvCounts};
use crate::peer::Role;
use crate::shard::{ShardEvent, StatsFlush};

#[derive(Debug, Clone, Copy)]
struct Subscriber {
    publisher: u32,
    /// Bucket of its first media packet, once it has one.
    joined: Option<u32>,
    failed: bool,
}

/// One closed second of the run.
#[derive(Debug, Clone)]
pub struct Row {
    pub bucket: u32,
    /// Subscribers that owed this bucket's packets.
    pub subscribers: u64,
    /// Packets the publishers sent.
    pub sent: u64,
    /// Deliveries owed to subscribers.
    pub expected: u64,
    pub counts: RecvCounts,
    pub latency: LatencySummary,
}

/// A failure reason, with how often it happened and to whom.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub reason: String,
    pub role: String,
    pub count: u64,
}

#[derive(Default)]
pub struct Collector {
    sent: HashMap<(u32, u32), u64>,
    recv: BTreeMap<u32, RecvCounts>,
    hist: BTreeMap<u32, Histogram<u64>>,
    read_hist: BTreeMap<u32, Histogram<u64>>,
    closed_upto: Vec<u32>,
    subscribers: HashMap<u32, Subscriber>,
    publishers_requested: u64,
    pub publishers_joined: u64,
    pub publishers_failed: u64,
    pub subscribers_joined: u64,
    pub subscribers_failed: u64,
    pub lost: u64,
    pub join_ms: Vec<f64>,
    pub publisher_join_ms: Vec<f64>,
    failures: BTreeMap<(String, String), u64>,
    pub late_frames: u64,
    pub done: usize,
    pub unfinished: usize,
    rows: Vec<Row>,
    /// Simulcast: each subscriber's current layer, and layer changes seen.
    pub layer_of: HashMap<u32, u8>,
    pub layer_changes: u64,
}

impl Collector {
    pub fn new(shards: usize) -> Collector {
        Collector {
            closed_upto: vec![0; shards],
            ..Default::default()
        }
    }

    pub fn add_publisher(&mut self) {
        self.publishers_requested += 1;
    }

    pub fn add_subscriber(&mut self, id: u32, publisher: u32) {
        self.subscribers.insert(
            id,
            Subscriber {
                publisher,
                joined: None,
                failed: false,
            },
        );
    }

    pub fn subscribers_requested(&self) -> u64 {
        self.subscribers.len() as u64
    }

    /// Publishers and subscribers whose join has not resolved (joined or failed) yet.
    pub fn pending_joins(&self) -> u64 {
        let subs_resolved = self.subscribers_joined + self.subscribers_failed;
        let pubs_resolved = self.publishers_joined + self.publishers_failed;
        (self.subscribers.len() as u64 - subs_resolved.min(self.subscribers.len() as u64))
            + self.publishers_requested.saturating_sub(pubs_resolved)
    }

    pub fn failure(&mut self, role: &str, reason: String) {
        *self.failures.entry((reason, role.to_string())).or_default() += 1;
    }

    pub fn failures(&self) -> Vec<Failure> {
        let mut v: Vec<Failure> = self
            .failures
            .iter()
            .map(|((reason, role), &count)| Failure {
                reason: reason.clone(),
                role: role.clone(),
                count,
            })
            .collect();
        v.sort_by_key(|f| std::cmp::Reverse(f.count));
        v
    }

    pub fn rejected_joins(&self) -> u64 {
        self.publishers_failed + self.subscribers_failed
    }

    pub fn on_event(&mut self, e: ShardEvent) {
        match e {
            ShardEvent::Joined {
                role,
                id,
                join_ms,
                bucket,
            } => match role {
                Role::Publisher => {
                    self.publishers_joined += 1;
                    self.publisher_join_ms.push(join_ms);
                }
                Role::Subscriber => {
                    if let Some(s) = self.subscribers.get_mut(&id) {
                        if s.joined.is_none() && !s.failed {
                            s.joined = Some(bucket);
                            self.subscribers_joined += 1;
                            self.join_ms.push(join_ms);
                        }
                    }
                }
            },
            ShardEvent::JoinFailed { role, id, reason } => {
                match role {
                    Role::Publisher => self.publishers_failed += 1,
                    Role::Subscriber => {
                        if let Some(s) = self.subscribers.get_mut(&id) {
                            if s.joined.is_none() && !s.failed {
                                s.failed = true;
                                self.subscribers_failed += 1;
                            }
                        }
                    }
                }
                self.failure(role.name(), format!("join: {reason}"));
            }
            ShardEvent::Lost { role, reason, .. } => {
                self.lost += 1;
                self.failure(role.name(), format!("lost after joining: {reason}"));
            }
            ShardEvent::Failure { reason } => self.failure("any", reason),
            ShardEvent::Layer { id, layer } => {
                if self.layer_of.insert(id, layer).is_some() {
                    self.layer_changes += 1;
                }
            }
            ShardEvent::Stats(f) => self.on_stats(*f),
            ShardEvent::Done { unfinished } => {
                self.done += 1;
                self.unfinished += unfinished;
            }
        }
    }

    fn on_stats(&mut self, f: StatsFlush) {
        for (p, b, n) in f.sent {
            *self.sent.entry((p, b)).or_default() += n;
        }
        for c in f.closed {
            self.recv.entry(c.bucket).or_default().add(&c.counts);
            let h = self.hist.entry(c.bucket).or_insert_with(latency_histogram);
            let _ = h.add(&c.latency);
            let h = self
                .read_hist
                .entry(c.bucket)
                .or_insert_with(latency_histogram);
            let _ = h.add(&c.read_latency);
        }
        for (b, n) in f.late {
            self.recv.entry(b).or_default().late += n;
        }
        self.late_frames += f.late_frames;
        if let Some(c) = self.closed_upto.get_mut(f.shard) {
            *c = (*c).max(f.closed_upto);
        }
    }

    /// Buckets below this are closed on every shard: final.
    pub fn closed(&self) -> u32 {
        self.closed_upto.iter().copied().min().unwrap_or(0)
    }

    /// Make rows for every newly final bucket and return them.
    pub fn take_closed_rows(&mut self) -> Vec<Row> {
        let from = self.rows.last().map_or(0, |r| r.bucket + 1);
        let upto = self.closed();
        let mut out = Vec::new();
        for b in from..upto {
            let row = self.row(b);
            self.rows.push(row.clone());
            out.push(row);
        }
        out
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    fn row(&self, b: u32) -> Row {
        let mut subscribers = 0;
        let mut expected = 0;
        for s in self.subscribers.values() {
            if s.joined.is_some_and(|j| j < b) {
                subscribers += 1;
                expected += self.sent.get(&(s.publisher, b)).copied().unwrap_or(0);
            }
        }
        let sent = self
            .sent
            .iter()
            .filter(|((_, sb), _)| *sb == b)
            .map(|(_, n)| n)
            .sum();
        Row {
            bucket: b,
            subscribers,
            sent,
            expected,
            counts: self.recv.get(&b).copied().unwrap_or_default(),
            latency: self
                .hist
                .get(&b)
                .map(LatencySummary::of)
                .unwrap_or_default(),
        }
    }

    /// The latency histogram (to the socket) of buckets `from..to`.
    pub fn latency(&self, from: u32, to: u32) -> Histogram<u64> {
        Self::merged(&self.hist, from, to)
    }

    /// The latency histogram (to the peer reading the packet) of buckets `from..to`.
    pub fn read_latency(&self, from: u32, to: u32) -> Histogram<u64> {
        Self::merged(&self.read_hist, from, to)
    }

    fn merged(hists: &BTreeMap<u32, Histogram<u64>>, from: u32, to: u32) -> Histogram<u64> {
        let mut h = latency_histogram();
        for (_, b) in hists.range(from..to) {
            let _ = h.add(b);
        }
        h
    }

    /// Subscribers whose first media has arrived.
    pub fn joined_subscribers(&self) -> u64 {
        self.subscribers_joined
    }

    /// The ids of the subscribers whose first media has arrived.
    pub fn joined_subscriber_ids(&self) -> Vec<u32> {
        self.subscribers
            .iter()
            .filter(|(_, s)| s.joined.is_some())
            .map(|(&id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{record_latency, Arrival};
    use crate::shard::ClosedBucket;

    fn closed(bucket: u32, received: u64, latency_us: u64) -> ClosedBucket {
        let mut counts = RecvCounts::default();
        let mut latency = latency_histogram();
        for _ in 0..received {
            counts.count(Arrival::InOrder);
            record_latency(&mut latency, latency_us);
        }
        ClosedBucket {
            bucket,
            counts,
            read_latency: latency.clone(),
            latency,
        }
    }

    #[test]
    fn expected_counts_only_buckets_after_each_join() {
        let mut c = Collector::new(2);
        c.add_publisher();
        c.add_subscriber(0, 0);
        c.add_subscriber(1, 0);
        c.on_event(ShardEvent::Joined {
            role: Role::Publisher,
            id: 0,
            join_ms: 5.0,
            bucket: 0,
        });
        // Subscriber 0 joins in bucket 0, subscriber 1 in bucket 1.
        for (id, bucket) in [(0, 0), (1, 1)] {
            c.on_event(ShardEvent::Joined {
                role: Role::Subscriber,
                id,
                join_ms: 100.0,
                bucket,
            });
        }
        assert_eq!(c.pending_joins(), 0);
        // The publisher (on shard 0) sent 100 packets in each of buckets 0..3.
        c.on_event(ShardEvent::Stats(Box::new(StatsFlush {
            shard: 0,
            sent: vec![(0, 0, 100), (0, 1, 100), (0, 2, 100)],
            closed: vec![],
            closed_upto: 3,
            late: vec![],
            late_frames: 0,
        })));
        // Shard 1 has both subscribers: bucket 1 has one owed delivery set, bucket 2 two, and
        // one packet of bucket 2 never arrived.
        c.on_event(ShardEvent::Stats(Box::new(StatsFlush {
            shard: 1,
            sent: vec![],
            closed: vec![closed(0, 0, 0), closed(1, 100, 500), closed(2, 199, 700)],
            closed_upto: 3,
            late: vec![(2, 1)],
            late_frames: 0,
        })));
        assert_eq!(c.closed(), 3);
        let rows = c.take_closed_rows();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].subscribers, rows[0].expected), (0, 0));
        assert_eq!((rows[1].subscribers, rows[1].expected), (1, 100));
        assert_eq!((rows[2].subscribers, rows[2].expected), (2, 200));
        assert_eq!(rows[2].counts.received, 199);
        assert_eq!(rows[2].counts.late, 1);
        assert_eq!(rows[1].latency.p50, 500);
        assert!(c.take_closed_rows().is_empty());
        let h = c.latency(1, 3);
        assert_eq!(h.len(), 299);
    }

    #[test]
    fn a_bucket_is_final_only_when_every_shard_closed_it() {
        let mut c = Collector::new(2);
        c.on_event(ShardEvent::Stats(Box::new(StatsFlush {
            shard: 0,
            sent: vec![],
            closed: vec![],
            closed_upto: 5,
            late: vec![],
            late_frames: 0,
        })));
        assert_eq!(c.closed(), 0);
        assert!(c.take_closed_rows().is_empty());
    }

    #[test]
    fn failures_group_by_reason_and_role() {
        let mut c = Collector::new(1);
        c.add_subscriber(0, 0);
        c.add_subscriber(1, 0);
        for id in 0..2 {
            c.on_event(ShardEvent::JoinFailed {
                role: Role::Subscriber,
                id,
                reason: "POST /whep: HTTP 503 over capacity".into(),
            });
        }
        assert_eq!(c.rejected_joins(), 2);
        assert_eq!(c.pending_joins(), 0);
        let f = c.failures();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].count, 2);
        assert_eq!(f[0].role, "subscriber");
    }
}
