//! Allocations on the forwarding path, counted by a global allocator.
//!
//! 1. sluice's own forwarding machinery (packet pool, cross-shard rings, outbox batches) does not
//!    allocate per packet in steady state: asserted to be exactly zero.
//! 2. The whole data plane (shard threads, str0m included) is measured per forwarded packet with
//!    real peers, printed, and bounded so a regression fails; the figure is in perf/RESULTS.md.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::mesh::{Doorbell, Mesh, MeshMsg, PacketPool, PacketView, TrackId};
use sluice::metrics::Counter;
use sluice::shard::io::WakeFd;

struct Counting;

static ALL: AtomicU64 = AtomicU64::new(0);
static SHARD: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IS_SHARD: Cell<bool> = const { Cell::new(false) };
    static MINE: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALL.fetch_add(1, Ordering::Relaxed);
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
    if IS_SHARD.try_with(|s| s.get()).unwrap_or(false) {
        SHARD.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn mine() -> u64 {
    MINE.with(|c| c.get())
}

/// Pool -> outbox batch -> ring -> consumer -> drop, on one thread so nothing else is counted.
#[test]
fn pool_rings_and_batches_do_not_allocate_in_steady_state() {
    let bells: Vec<_> = (0..2)
        .map(|_| Arc::new(Doorbell::new(WakeFd::new().unwrap())))
        .collect();
    let mesh = Mesh::new(bells, 1024);
    let mut a = mesh.endpoints(0);
    let b = mesh.endpoints(1);
    let pool = PacketPool::new_static(4096);
    let payload: Arc<[u8]> = Arc::from(vec![7u8; 1100]);
    let t0 = Instant::now();
    let mut run = |n: u32| {
        for i in 0..n {
            let p = pool.take(PacketView {
                track: TrackId::new(1, true),
                pt: 96,
                ssrc: 1,
                seq: i as u16,
                timestamp: i * 3000,
                marker: false,
                keyframe: false,
                layer: 0,
                layers: 1,
                arrival: t0,
                audio_level: None,
                voice_activity: None,
                payload: payload.clone(),
            });
            // One pointer to the other shard, one kept for a local subscriber.
            a.outboxes[1].push(MeshMsg::Media(p.clone()));
            drop(p);
            if i % 64 == 63 {
                assert_eq!(a.flush(), 0);
                while let Some(msg) = b.inboxes[0].pop() {
                    drop(msg);
                }
            }
        }
    };
    run(20_480); // warm-up (whole batches): pool slots and batch capacity grow to their working size
    let before = mine();
    run(204_800);
    let allocs = mine() - before;
    println!(
        "pool allocated {} reused {} free {}",
        pool.allocated(),
        pool.reused(),
        pool.free_len()
    );
    println!("steady state: {allocs} allocations for 204800 packets");
    assert_eq!(
        allocs, 0,
        "the forwarding machinery allocated in steady state"
    );
}

fn mark_shard() {
    IS_SHARD.with(|s| s.set(true));
}

/// The whole data plane with real peers: shard-thread allocations per forwarded packet.
#[test]
fn data_plane_allocations_per_forwarded_packet() {
    sluice::shard::on_shard_thread_start(mark_shard);
    let server = common::start(common::config(2, sluice::config::IoBackend::Uring));
    let publisher = common::Client::publish(&server, "alloc").unwrap();
    assert!(publisher.wait_connected(Duration::from_secs(10)));
    let viewers: Vec<_> = (0..4)
        .map(|_| common::Client::play(&server, "alloc").unwrap())
        .collect();
    for v in &viewers {
        assert!(v.wait_connected(Duration::from_secs(10)));
    }
    assert!(common::wait_until(Duration::from_secs(10), || viewers
        .iter()
        .all(|v| v.received().len() > 100)));
    let forwarded = || -> u64 {
        server
            .control
            .shards
            .iter()
            .map(|s| s.stats.get(Counter::RtpForwarded))
            .sum()
    };
    std::thread::sleep(Duration::from_millis(500));
    let (a0, f0) = (SHARD.load(Ordering::Relaxed), forwarded());
    std::thread::sleep(Duration::from_secs(3));
    let (a1, f1) = (SHARD.load(Ordering::Relaxed), forwarded());
    let per_packet = (a1 - a0) as f64 / (f1 - f0).max(1) as f64;
    println!(
        "data plane: {} allocations on shard threads for {} forwarded packets = {per_packet:.2} per packet (str0m included)",
        a1 - a0,
        f1 - f0
    );
    assert!(f1 - f0 > 1000, "traffic flowed");
    assert!(
        per_packet < 2.0,
        "allocations per forwarded packet regressed: {per_packet:.2}"
    );
}
