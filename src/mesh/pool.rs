//! `MediaPacket`: one received RTP packet, immutable and reference-counted, shared by pointer with
//! every subscriber on every shard. Its slot comes from the receiving shard's recycled pool and goes
//! back to it when the last holder, on whatever shard, lets go. The payload bytes are the ones the
//! WebRTC stack decrypted into; they are never copied here.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam::queue::ArrayQueue;

use super::TrackId;

/// The header fields the forwarders need, the payload, and where the packet came from.
#[derive(Debug, Clone)]
pub struct PacketView {
    pub track: TrackId,
    /// The publisher's payload type (mapped per subscriber).
    pub pt: u8,
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub marker: bool,
    /// The packet starts a keyframe (codec-aware, `sfu::keyframe`).
    pub keyframe: bool,
    /// Simulcast: the layer this packet belongs to, 0 = lowest (ranked by the publisher's shard).
    pub layer: u8,
    /// Simulcast: how many layers the track has (1 without simulcast).
    pub layers: u8,
    /// When the datagram carrying it was read from the socket.
    pub arrival: Instant,
    pub audio_level: Option<i8>,
    pub voice_activity: Option<bool>,
    pub payload: Arc<[u8]>,
}

struct Slot {
    view: PacketView,
    /// Logical holders. The one that takes it to zero returns the slot to its pool.
    holders: AtomicUsize,
    pool: &'static PacketPool,
}

/// A reference-counted, immutable RTP packet. Cloning is two atomic increments, no allocation.
pub struct MediaPacket {
    slot: Option<Arc<Slot>>,
}

impl Deref for MediaPacket {
    type Target = PacketView;
    fn deref(&self) -> &PacketView {
        // Invariant: `slot` is only `None` inside `drop`.
        &self.slot.as_ref().expect("live MediaPacket").view
    }
}

impl Clone for MediaPacket {
    fn clone(&self) -> Self {
        let slot = self.slot.as_ref().expect("live MediaPacket");
        slot.holders.fetch_add(1, Ordering::Relaxed);
        MediaPacket {
            slot: Some(slot.clone()),
        }
    }
}

impl Drop for MediaPacket {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if slot.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
                let pool = slot.pool;
                pool.recycle(slot);
            }
        }
    }
}

/// A shard's pool of packet slots. `take` is called only by the owning shard; `recycle` by any.
pub struct PacketPool {
    free: ArrayQueue<Arc<Slot>>,
    empty_payload: Arc<[u8]>,
    allocated: AtomicU64,
    reused: AtomicU64,
}

impl PacketPool {
    /// A pool that keeps up to `capacity` free slots. Pools live as long as the process (they are
    /// shared by every shard that may drop a packet last), so this leaks one allocation by design.
    pub fn new_static(capacity: usize) -> &'static PacketPool {
        Box::leak(Box::new(PacketPool {
            free: ArrayQueue::new(capacity.max(1)),
            empty_payload: Arc::from(&[][..]),
            allocated: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        }))
    }

    /// Wrap `view` in a packet, reusing a free slot when one is available.
    pub fn take(&'static self, view: PacketView) -> MediaPacket {
        // A slot can be in the free list while the previous last holder's `Arc` is a few
        // instructions from being dropped on another core; skip such a slot rather than wait.
        for _ in 0..4 {
            let Some(mut arc) = self.free.pop() else {
                break;
            };
            match Arc::get_mut(&mut arc) {
                Some(slot) => {
                    slot.view = view;
                    *slot.holders.get_mut() = 1;
                    self.reused.fetch_add(1, Ordering::Relaxed);
                    return MediaPacket { slot: Some(arc) };
                }
                None => {
                    let _ = self.free.push(arc);
                }
            }
        }
        self.allocated.fetch_add(1, Ordering::Relaxed);
        MediaPacket {
            slot: Some(Arc::new(Slot {
                view,
                holders: AtomicUsize::new(1),
                pool: self,
            })),
        }
    }

    fn recycle(&self, mut slot: Arc<Slot>) {
        // Release the payload now, so the pool does not pin decrypted buffers.
        if let Some(s) = Arc::get_mut(&mut slot) {
            s.view.payload = self.empty_payload.clone();
        }
        // A full free list means the pool is at capacity: let this one go.
        let _ = self.free.push(slot);
    }

    /// Slots allocated because none was free (grows during warm-up, flat in steady state).
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    pub fn free_len(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(seq: u16) -> PacketView {
        PacketView {
            track: TrackId(2),
            pt: 96,
            ssrc: 1,
            seq,
            timestamp: 0,
            marker: false,
            keyframe: false,
            layer: 0,
            layers: 1,
            arrival: Instant::now(),
            audio_level: None,
            voice_activity: None,
            payload: Arc::from(&[1u8, 2, 3][..]),
        }
    }

    #[test]
    fn slots_are_recycled_after_last_holder() {
        let pool = PacketPool::new_static(8);
        let p = pool.take(view(1));
        let q = p.clone();
        drop(p);
        assert_eq!(pool.free_len(), 0, "still held by q");
        assert_eq!(q.seq, 1);
        drop(q);
        assert_eq!(pool.free_len(), 1);
        let r = pool.take(view(2));
        assert_eq!(r.seq, 2);
        assert_eq!(pool.allocated(), 1);
        assert_eq!(pool.reused(), 1);
    }

    #[test]
    fn steady_state_does_not_allocate_across_threads() {
        let pool = PacketPool::new_static(64);
        let (tx, rx) = std::sync::mpsc::sync_channel::<MediaPacket>(16);
        let consumer = std::thread::spawn(move || {
            let mut n = 0;
            while let Ok(p) = rx.recv() {
                n += p.payload.len();
            }
            n
        });
        for i in 0..10_000u32 {
            let p = pool.take(view(i as u16));
            let held = p.clone();
            tx.send(p).unwrap();
            drop(held);
        }
        drop(tx);
        assert_eq!(consumer.join().unwrap(), 30_000);
        // Warm-up allocates at most the pool's worth plus the rare in-flight skip.
        assert!(pool.allocated() < 200, "allocated {}", pool.allocated());
    }
}
