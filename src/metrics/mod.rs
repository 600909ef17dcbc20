//! Per-shard counters. A shard bumps plain `u64`s on its hot path and publishes a snapshot into its
//! `ShardStats` (relaxed atomic stores) a few times a second; the control thread sums the snapshots
//! on scrape. Nothing here is shared on the per-packet path.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident => $metric:literal, $help:literal;)*) => {
        /// Every per-shard counter, in a fixed order.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Counter { $($name,)* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];
            /// Prometheus name without the `sluice_` prefix.
            pub fn metric(self) -> &'static str {
                match self { $(Counter::$name => $metric,)* }
            }
            pub fn help(self) -> &'static str {
                match self { $(Counter::$name => $help,)* }
            }
        }
    };
}

counters! {
    DatagramsIn => "media_datagrams_received_total", "UDP datagrams read from media sockets.";
    BytesIn => "media_received_bytes_total", "Bytes read from media sockets.";
    DatagramsOut => "media_datagrams_sent_total", "UDP datagrams written to media sockets.";
    BytesOut => "media_sent_bytes_total", "Bytes written to media sockets.";
    RtpIn => "rtp_received_packets_total", "RTP packets received from publishers (after decryption).";
    RtpForwarded => "rtp_forwarded_packets_total", "RTP packets written to subscribers.";
    DropUnknownSource => "drop_unknown_source_total", "Datagrams from a 5-tuple no peer owns (and not a STUN request for a known ufrag).";
    DropMalformed => "drop_malformed_total", "Datagrams that are neither STUN, DTLS, RTP nor RTCP.";
    DropRtcError => "drop_rtc_rejected_total", "Datagrams the peer's WebRTC stack rejected (decrypt failure, replay, bad state).";
    DropRingFull => "drop_ring_full_total", "Packets dropped because a cross-shard ring was full.";
    DropForwarder => "drop_forwarder_total", "Packets a subscriber's forwarder chose not to send (waiting for a keyframe, duplicate, too old).";
    DropNoCodec => "drop_no_codec_total", "Packets whose codec the subscriber did not negotiate.";
    KeyframeRequestsIn => "keyframe_requests_received_total", "PLI/FIR received from subscribers, plus keyframe needs of new subscribers.";
    KeyframeRequestsSent => "keyframe_requests_sent_total", "PLI sent to publishers after throttling.";
    PeersAdded => "peers_added_total", "Peers handed to this shard.";
    PeersConnected => "peers_connected_total", "Peers that completed ICE and DTLS.";
    PeersRemoved => "peers_removed_total", "Peers removed (any reason).";
    SendErrors => "media_send_errors_total", "Datagrams the kernel refused to send.";
    LoopTurns => "shard_loop_turns_total", "Iterations of the shard loop.";
}

pub const COUNTERS: usize = Counter::ALL.len();

/// A shard's own counters: plain integers, touched only by that shard.
#[derive(Debug, Clone)]
pub struct ShardCounters {
    values: [u64; COUNTERS],
}

impl Default for ShardCounters {
    fn default() -> Self {
        ShardCounters {
            values: [0; COUNTERS],
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
}

/// The published snapshot of one shard, read by the control thread.
#[derive(Debug, Default)]
pub struct ShardStats {
    counters: [AtomicU64; COUNTERS],
    pub peers: AtomicU64,
    pub tracks: AtomicU64,
    pub busy_ns: AtomicU64,
    pub idle_ns: AtomicU64,
    pub pool_allocated: AtomicU64,
}

impl ShardStats {
    pub fn publish(&self, c: &ShardCounters) {
        for (slot, v) in self.counters.iter().zip(c.values.iter()) {
            slot.store(*v, Ordering::Relaxed);
        }
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
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
    fn metric_names_are_unique() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.metric()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COUNTERS);
    }
}
