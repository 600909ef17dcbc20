//! The cross-shard mesh: one bounded single-producer single-consumer ring per ordered shard pair,
//! the doorbell that wakes an idle shard, and the recycled `MediaPacket` pool.
//!
//! Types here are plain data plus lock-free queues: no sockets, no clocks, no blocking.

pub mod pool;

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam::queue::ArrayQueue;

use crate::shard::io::WakeFd;
use crate::ShardId;
pub use pool::{MediaPacket, PacketPool, PacketView};

/// A track published on the node: `(stream id << 1) | is_video`. Chosen locally, so a fast hasher is
/// fine for maps keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

impl TrackId {
    pub fn new(stream_id: u64, video: bool) -> TrackId {
        TrackId((stream_id << 1) | video as u64)
    }
    pub fn is_video(self) -> bool {
        self.0 & 1 == 1
    }
}

/// What crosses from one shard to another.
pub enum MeshMsg {
    /// One RTP packet of a track that has subscribers on the receiving shard.
    Media(MediaPacket),
    /// A subscriber on the sending shard needs a keyframe of this track (new subscriber, PLI or FIR,
    /// source switch) on simulcast layer `layer` ([`ANY_LAYER`]: every layer). The publisher's
    /// shard throttles and forwards it.
    KeyframeRequest(TrackId, u8),
    /// The publisher's shard's view of a simulcast track's layers, sent about once a second to
    /// every shard with subscribers of it.
    Layers(TrackId, Arc<crate::sfu::LayerTable>),
}

/// A keyframe request for every layer of the track (or its only one).
pub const ANY_LAYER: u8 = u8::MAX;

/// Wakes a shard that is (about to be) blocked in its single wait point. Producers ring it only when
/// the shard said it is going idle, so a busy shard costs its producers one atomic load.
pub struct Doorbell {
    sleeping: AtomicBool,
    fd: WakeFd,
    rings: AtomicU64,
}

impl Doorbell {
    pub fn new(fd: WakeFd) -> Doorbell {
        Doorbell {
            sleeping: AtomicBool::new(false),
            fd,
            rings: AtomicU64::new(0),
        }
    }

    pub fn wake_fd(&self) -> &WakeFd {
        &self.fd
    }

    /// Producer side, after pushing work: wake the owner if it is idle.
    pub fn ring(&self) {
        // Pairs with the fence in `prepare_sleep`: either we see `sleeping`, or the owner sees our
        // push when it re-checks its queues.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            self.rings.fetch_add(1, Ordering::Relaxed);
            self.fd.wake();
        }
    }

    /// Owner side: announce the intent to sleep. The owner must re-check all of its queues after
    /// this and call `awake` instead of waiting if any has work.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    pub fn awake(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
    }

    /// How many times producers had to ring (wake syscalls).
    pub fn rings(&self) -> u64 {
        self.rings.load(Ordering::Relaxed)
    }
}

/// The queues between every ordered pair of shards, built once at start.
pub struct Mesh {
    shards: usize,
    rings: Vec<Arc<ArrayQueue<MeshMsg>>>,
    doorbells: Vec<Arc<Doorbell>>,
}

impl Mesh {
    pub fn new(doorbells: Vec<Arc<Doorbell>>, capacity: usize) -> Mesh {
        let shards = doorbells.len();
        let rings = (0..shards * shards)
            .map(|_| Arc::new(ArrayQueue::new(capacity)))
            .collect();
        Mesh {
            shards,
            rings,
            doorbells,
        }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// (from, to, messages waiting) for every ring between two different shards.
    pub fn depths(&self) -> Vec<(ShardId, ShardId, usize)> {
        let mut v = Vec::new();
        for from in 0..self.shards {
            for to in 0..self.shards {
                if from != to {
                    v.push((from, to, self.rings[from * self.shards + to].len()));
                }
            }
        }
        v
    }

    /// The endpoints shard `me` owns: its producers towards every other shard and its consumers
    /// from every other shard. Each ring has exactly one producer and one consumer.
    pub fn endpoints(&self, me: ShardId) -> MeshEndpoints {
        let outboxes = (0..self.shards)
            .map(|to| Outbox {
                ring: self.rings[me * self.shards + to].clone(),
                doorbell: self.doorbells[to].clone(),
                batch: Vec::with_capacity(256),
                dropped_full: 0,
            })
            .collect();
        let inboxes = (0..self.shards)
            .map(|from| self.rings[from * self.shards + me].clone())
            .collect();
        MeshEndpoints {
            me,
            outboxes,
            inboxes,
        }
    }
}

/// One shard's producer towards another shard. Messages are batched during a loop turn and pushed
/// in `flush`, with at most one doorbell ring per turn.
pub struct Outbox {
    ring: Arc<ArrayQueue<MeshMsg>>,
    doorbell: Arc<Doorbell>,
    batch: Vec<MeshMsg>,
    /// Messages dropped because the ring was full (the sender never waits).
    pub dropped_full: u64,
}

impl Outbox {
    pub fn push(&mut self, msg: MeshMsg) {
        self.batch.push(msg);
    }

    /// Push the batch onto the ring. Returns how many were dropped because the ring was full.
    pub fn flush(&mut self) -> usize {
        if self.batch.is_empty() {
            return 0;
        }
        let mut dropped = 0;
        for msg in self.batch.drain(..) {
            if self.ring.push(msg).is_err() {
                dropped += 1;
            }
        }
        self.dropped_full += dropped as u64;
        self.doorbell.ring();
        dropped
    }

    pub fn depth(&self) -> usize {
        self.ring.len()
    }
}

pub struct MeshEndpoints {
    pub me: ShardId,
    pub outboxes: Vec<Outbox>,
    pub inboxes: Vec<Arc<ArrayQueue<MeshMsg>>>,
}

impl MeshEndpoints {
    pub fn any_inbound(&self) -> bool {
        self.inboxes.iter().any(|r| !r.is_empty())
    }

    pub fn flush(&mut self) -> usize {
        self.outboxes.iter_mut().map(Outbox::flush).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_id_packs_kind() {
        let a = TrackId::new(7, false);
        let v = TrackId::new(7, true);
        assert!(!a.is_video());
        assert!(v.is_video());
        assert_ne!(a, v);
    }

    #[test]
    fn full_ring_drops_and_counts() {
        let bells: Vec<_> = (0..2)
            .map(|_| Arc::new(Doorbell::new(WakeFd::new().unwrap())))
            .collect();
        let mesh = Mesh::new(bells, 4);
        let mut e0 = mesh.endpoints(0);
        let e1 = mesh.endpoints(1);
        for _ in 0..6 {
            e0.outboxes[1].push(MeshMsg::KeyframeRequest(TrackId(1), ANY_LAYER));
        }
        assert_eq!(e0.flush(), 2);
        assert_eq!(e0.outboxes[1].dropped_full, 2);
        assert_eq!(e1.inboxes[0].len(), 4);
        assert!(e1.any_inbound());
    }

    #[test]
    fn doorbell_rings_only_when_sleeping() {
        let bell = Doorbell::new(WakeFd::new().unwrap());
        bell.ring();
        assert_eq!(bell.rings(), 0);
        bell.prepare_sleep();
        bell.ring();
        assert_eq!(bell.rings(), 1);
        bell.awake();
        bell.ring();
        assert_eq!(bell.rings(), 1);
    }
}
