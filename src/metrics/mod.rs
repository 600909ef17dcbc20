//! Metrics. A shard bumps plain `u64`s on its hot path and publishes a snapshot into its
//! `ShardStats` (relaxed atomic stores) a few times a second; the control thread turns the
//! snapshots into Prometheus families on scrape (`export`). Nothing is shared per packet.
//! Every metric is documented in `docs/metrics.md`.

pub mod export;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

macro_rules! counters {
    ($($name:ident => $family:literal [$($k:literal = $v:literal),*];)*) => {
        /// Every per-shard counter, in a fixed order. Several counters share one Prometheus
        /// family and differ by their (bounded) labels.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $($name,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// Family name without the `sluice_` prefix.
            pub fn family(self) -> &'static str {
                match self { $(Counter::$name => $family,)* }
            }
            /// Labels other than `shard`.
            pub fn labels(self) -> &'static [(&'static str, &'static str)] {
                match self { $(Counter::$name => &[$(($k, $v)),*],)* }
            }
        }
    };
}

counters! {
    PacketsInRtp => "media_packets_total" ["direction" = "in", "kind" = "rtp"];
    PacketsInRtcp => "media_packets_total" ["direction" = "in", "kind" = "rtcp"];
    PacketsInStun => "media_packets_total" ["direction" = "in", "kind" = "stun"];
    PacketsInDtls => "media_packets_total" ["direction" = "in", "kind" = "dtls"];
    PacketsInOther => "media_packets_total" ["direction" = "in", "kind" = "other"];
    PacketsOutRtp => "media_packets_total" ["direction" = "out", "kind" = "rtp"];
    PacketsOutRtcp => "media_packets_total" ["direction" = "out", "kind" = "rtcp"];
    PacketsOutStun => "media_packets_total" ["direction" = "out", "kind" = "stun"];
    PacketsOutDtls => "media_packets_total" ["direction" = "out", "kind" = "dtls"];
    PacketsOutOther => "media_packets_total" ["direction" = "out", "kind" = "other"];
    BytesIn => "media_bytes_total" ["direction" = "in"];
    BytesOut => "media_bytes_total" ["direction" = "out"];
    RtpIn => "rtp_received_packets_total" [];
    RtpForwarded => "rtp_forwarded_packets_total" [];
    DropRingFull => "dropped_packets_total" ["reason" = "ring_full"];
    DropDecrypt => "dropped_packets_total" ["reason" = "decrypt"];
    DropUnknownSource => "dropped_packets_total" ["reason" = "unknown_source"];
    DropMalformed => "dropped_packets_total" ["reason" = "malformed"];
    DropRateLimited => "dropped_packets_total" ["reason" = "rate_limited"];
    DropForwarder => "dropped_packets_total" ["reason" = "forwarder"];
    DropNoCodec => "dropped_packets_total" ["reason" = "no_codec"];
    KeyframeInPli => "keyframe_requests_total" ["direction" = "in", "kind" = "pli"];
    KeyframeInFir => "keyframe_requests_total" ["direction" = "in", "kind" = "fir"];
    KeyframeOutPli => "keyframe_requests_total" ["direction" = "out", "kind" = "pli"];
    Nacks => "nacks_total" [];
    PeersAdded => "peers_added_total" [];
    PeersConnected => "peers_connected_total" [];
    RemovedDeleted => "peers_removed_total" ["reason" = "deleted"];
    RemovedConnectTimeout => "peers_removed_total" ["reason" = "connect_timeout"];
    RemovedIceTimeout => "peers_removed_total" ["reason" = "ice_timeout"];
    RemovedDisconnected => "peers_removed_total" ["reason" = "disconnected"];
    RemovedError => "peers_removed_total" ["reason" = "error"];
    RemovedShutdown => "peers_removed_total" ["reason" = "shutdown"];
    SendErrors => "media_send_errors_total" [];
    LoopTurns => "shard_loop_turns_total" [];
    SwitchStart => "simulcast_layer_switches_total" ["reason" = "start"];
    SwitchEstimate => "simulcast_layer_switches_total" ["reason" = "estimate"];
    SwitchCap => "simulcast_layer_switches_total" ["reason" = "cap"];
    SwitchLayerDied => "simulcast_layer_switches_total" ["reason" = "layer_died"];
    SwitchLayerBack => "simulcast_layer_switches_total" ["reason" = "layer_back"];
    SwitchPause => "simulcast_layer_switches_total" ["reason" = "pause"];
    SwitchResume => "simulcast_layer_switches_total" ["reason" = "resume"];
}

/// Help text of each counter family.
pub fn family_help(family: &str) -> &'static str {
    match family {
        "media_packets_total" => "Datagrams on media sockets by direction and kind (SRTP and SRTCP counted as rtp and rtcp).",
        "media_bytes_total" => "Bytes on media sockets by direction.",
        "rtp_received_packets_total" => "RTP packets received from publishers, after decryption.",
        "rtp_forwarded_packets_total" => "RTP packets written to subscribers.",
        "dropped_packets_total" => "Datagrams or packets dropped, by reason: ring_full (cross-shard ring full), decrypt (rejected by the peer's WebRTC stack), unknown_source (no peer owns the 5-tuple), malformed (not STUN/DTLS/RTP/RTCP), rate_limited (a peer exceeded its address limit), forwarder (waiting for a keyframe, duplicate, too old), no_codec (codec not negotiated by the subscriber).",
        "keyframe_requests_total" => "Keyframe requests: in = PLI/FIR from subscribers, out = PLI sent to publishers after throttling.",
        "nacks_total" => "NACK feedback received from subscribers (answered from their send buffers).",
        "peers_added_total" => "Peers handed to the shard by the control thread.",
        "peers_connected_total" => "Peers that completed ICE and DTLS.",
        "peers_removed_total" => "Peers removed, by reason.",
        "media_send_errors_total" => "Datagrams the kernel refused to send.",
        "shard_loop_turns_total" => "Iterations of the shard loop.",
        "simulcast_layer_switches_total" => "Changes of the simulcast layer a subscriber receives, by reason: start (first layer), estimate (bandwidth estimate or measured layer bitrate), cap (the subscriber's ?layer=/?max_height=, or the layers' sizes), layer_died, layer_back, pause (even the lowest layer does not fit), resume.",
        _ => "sluice counter.",
    }
}

pub const COUNTERS: usize = Counter::ALL.len();

/// Upper bounds (seconds) of the ICE+DTLS connect-time histogram.
pub const CONNECT_BUCKETS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Upper bounds of the subscribers' bandwidth-estimate histogram, in bytes per second (100 kbit/s
/// to 16 Mbit/s; Prometheus' base unit is the byte).
pub const BWE_BUCKETS: [f64; 10] = [
    12.5e3, 31.25e3, 62.5e3, 93.75e3, 125e3, 187.5e3, 312.5e3, 500e3, 1e6, 2e6,
];

/// Simulcast subscribers by layer: layers 0..MAX_LAYERS, then "none" (paused or not started).
pub const LAYER_SLOTS: usize = crate::sfu::MAX_LAYERS + 1;

/// Upper bounds (seconds) of the receive-to-send forwarding-latency histogram: fine below the
/// 1 ms that a forwarding SFU should stay under, coarse above it.
pub const LATENCY_BUCKETS: [f64; 18] = [
    25e-6, 50e-6, 100e-6, 150e-6, 200e-6, 300e-6, 400e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3,
    5e-3, 10e-3, 20e-3, 50e-3, 100e-3,
];

/// Classify a media datagram by its first bytes (RFC 7983 demultiplexing; RFC 5761 for RTCP).
pub fn classify(buf: &[u8], out: bool) -> Counter {
    let kind = match buf.first() {
        Some(0..=3) => 0,
        Some(20..=63) => 1,
        Some(128..=191) => {
            if matches!(buf.get(1), Some(192..=223)) {
                2
            } else {
                3
            }
        }
        _ => 4,
    };
    match (out, kind) {
        (false, 0) => Counter::PacketsInStun,
        (false, 1) => Counter::PacketsInDtls,
        (false, 2) => Counter::PacketsInRtcp,
        (false, 3) => Counter::PacketsInRtp,
        (false, _) => Counter::PacketsInOther,
        (true, 0) => Counter::PacketsOutStun,
        (true, 1) => Counter::PacketsOutDtls,
        (true, 2) => Counter::PacketsOutRtcp,
        (true, 3) => Counter::PacketsOutRtp,
        (true, _) => Counter::PacketsOutOther,
    }
}

/// A shard's own counters and histograms: plain values, touched only by that shard.
pub struct ShardCounters {
    values: [u64; COUNTERS],
    connect_buckets: [u64; CONNECT_BUCKETS.len() + 1],
    connect_sum: Duration,
    latency_buckets: [u64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: u64,
    bwe_buckets: [u64; BWE_BUCKETS.len() + 1],
    bwe_sum: u64,
    /// Simulcast subscriptions per layer now (the last slot: none).
    pub simulcast_layers: [u64; LAYER_SLOTS],
}

impl Default for ShardCounters {
    fn default() -> Self {
        ShardCounters {
            values: [0; COUNTERS],
            connect_buckets: [0; CONNECT_BUCKETS.len() + 1],
            connect_sum: Duration::ZERO,
            latency_buckets: [0; LATENCY_BUCKETS.len() + 1],
            latency_sum_ns: 0,
            bwe_buckets: [0; BWE_BUCKETS.len() + 1],
            bwe_sum: 0,
            simulcast_layers: [0; LAYER_SLOTS],
        }
    }
}

impl ShardCounters {
    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        self.values[c as usize] += n;
    }
    #[inline]
    pub fn inc(&mut self, c: Counter) {
        self.add(c, 1);
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize]
    }

    pub fn observe_connect(&mut self, d: Duration) {
        self.connect_buckets[bucket(&CONNECT_BUCKETS, d.as_secs_f64())] += 1;
        self.connect_sum += d;
    }

    /// One subscriber's current bandwidth estimate in bits per second (sampled once a second).
    pub fn observe_bwe(&mut self, bps: u64) {
        self.bwe_buckets[bucket(&BWE_BUCKETS, bps as f64 / 8.0)] += 1;
        self.bwe_sum += bps;
    }

    /// One packet's receive-to-send time.
    #[inline]
    pub fn observe_latency(&mut self, d: Duration) {
        self.latency_buckets[bucket(&LATENCY_BUCKETS, d.as_secs_f64())] += 1;
        self.latency_sum_ns += d.as_nanos() as u64;
    }
}

/// The histogram bucket of `v`: the first upper bound it does not exceed, or `bounds.len()`
/// (`+Inf`).
#[inline]
fn bucket(bounds: &[f64], v: f64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())
}

/// The published snapshot of one shard, read by the control thread.
#[derive(Debug)]
pub struct ShardStats {
    counters: [AtomicU64; COUNTERS],
    pub peers: AtomicU64,
    pub tracks: AtomicU64,
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub pool_allocated: AtomicU64,
    connect_buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    connect_sum_ns: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_ns: AtomicU64,
    bwe_buckets: [AtomicU64; BWE_BUCKETS.len() + 1],
    bwe_sum: AtomicU64,
    simulcast_layers: [AtomicU64; LAYER_SLOTS],
}

impl Default for ShardStats {
    fn default() -> Self {
        ShardStats {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            peers: AtomicU64::new(0),
            tracks: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            idle_ns: AtomicU64::new(0),
            pool_allocated: AtomicU64::new(0),
            connect_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            connect_sum_ns: AtomicU64::new(0),
            latency_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
            bwe_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            bwe_sum: AtomicU64::new(0),
            simulcast_layers: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ShardStats {
    /// Copy the shard's counters out.
    pub fn publish(&self, c: &ShardCounters) {
        for (slot, v) in self.counters.iter().zip(c.values.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
        for (slot, v) in self.connect_buckets.iter().zip(c.connect_buckets.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
        self.connect_sum_ns
            .store(c.connect_sum.as_nanos() as u64, Ordering::Relaxed);
        for (slot, v) in self.bwe_buckets.iter().zip(c.bwe_buckets.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
        self.bwe_sum.store(c.bwe_sum, Ordering::Relaxed);
        for (slot, v) in self.simulcast_layers.iter().zip(c.simulcast_layers.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
        for (slot, v) in self.latency_buckets.iter().zip(c.latency_buckets.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
        self.latency_sum_ns
            .store(c.latency_sum_ns, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    /// Sum over the families' label sets, e.g. every `dropped_packets_total` reason.
    pub fn family_total(&self, family: &str) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.family() == family)
            .map(|c| self.get(*c))
            .sum()
    }

    /// Per-bucket (not cumulative) connect counts, the last one being `+Inf`, and the sum.
    pub fn connect(&self) -> (Vec<u64>, Duration) {
        (
            self.connect_buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            Duration::from_nanos(self.connect_sum_ns.load(Ordering::Relaxed)),
        )
    }

    /// Per-bucket (not cumulative) bandwidth-estimate samples, the last one being `+Inf`, and
    /// their sum in bits per second (the buckets are in bytes per second).
    pub fn bwe(&self) -> (Vec<u64>, u64) {
        (
            self.bwe_buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.bwe_sum.load(Ordering::Relaxed),
        )
    }

    /// Simulcast subscriptions per layer now; the last slot: none (paused or not started).
    pub fn simulcast_layers(&self) -> [u64; LAYER_SLOTS] {
        std::array::from_fn(|i| self.simulcast_layers[i].load(Ordering::Relaxed))
    }

    /// Per-bucket (not cumulative) forwarding-latency counts since start, the last one being
    /// `+Inf`, and their sum in seconds.
    pub fn latency(&self) -> (Vec<u64>, f64) {
        (
            self.latency_buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_copies_every_counter() {
        let mut c = ShardCounters::default();
        c.inc(Counter::RtpIn);
        c.add(Counter::BytesIn, 1200);
        let s = ShardStats::default();
        s.publish(&c);
        assert_eq!(s.get(Counter::RtpIn), 1);
        assert_eq!(s.get(Counter::BytesIn), 1200);
        assert_eq!(s.get(Counter::DropRingFull), 0);
    }

    #[test]
    fn label_sets_are_unique_within_a_family() {
        let mut keys: Vec<String> = Counter::ALL
            .iter()
            .map(|c| format!("{}{:?}", c.family(), c.labels()))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), COUNTERS);
    }

    #[test]
    fn classifies_by_first_bytes() {
        assert_eq!(classify(&[0, 1], false), Counter::PacketsInStun);
        assert_eq!(classify(&[22, 254], false), Counter::PacketsInDtls);
        assert_eq!(classify(&[0x80, 96], false), Counter::PacketsInRtp);
        assert_eq!(classify(&[0x80, 200], true), Counter::PacketsOutRtcp);
        assert_eq!(classify(&[0x81, 205], true), Counter::PacketsOutRtcp);
        assert_eq!(classify(&[0xff], false), Counter::PacketsInOther);
        assert_eq!(classify(&[], true), Counter::PacketsOutOther);
    }

    #[test]
    fn histograms_bucket_and_rotate() {
        let mut c = ShardCounters::default();
        c.observe_connect(Duration::from_millis(40));
        c.observe_connect(Duration::from_secs(60));
        for us in 1..=1000u64 {
            c.observe_latency(Duration::from_micros(us));
        }
        let s = ShardStats::default();
        s.publish(&c);
        let (buckets, sum) = s.connect();
        assert_eq!(buckets[1], 1, "40 ms is in the 50 ms bucket");
        assert_eq!(*buckets.last().unwrap(), 1, "60 s is in +Inf");
        assert!(sum > Duration::from_secs(60));
        let (latency, total) = s.latency();
        assert_eq!(latency.iter().sum::<u64>(), 1000);
        assert_eq!(latency[0], 25, "1..=25 us");
        assert_eq!(latency[8], 250, "501..=750 us");
        assert_eq!(latency[9], 250, "751..=1000 us: 1 ms is in the 1 ms bucket");
        assert_eq!(latency[10], 0);
        assert!(total > 0.4 && total < 0.6);
        c.observe_latency(Duration::from_secs(1));
        s.publish(&c);
        assert_eq!(*s.latency().0.last().unwrap(), 1, "1 s is in +Inf");
    }
}
