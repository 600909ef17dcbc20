use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use crate::io::DATAGRAM_MAX_PACKET_SIZE;
use crate::packet::Vp8Patch;
use crate::rtp_::{
    ExtensionValues, Frequency, MediaTime, Pt, RtpHeader, SeqNo, Ssrc, VideoOrientation,
};

use super::RtpPacket;
use super::rtx_cache_buf::EvictingBuffer;

const RTX_CACHE_SIZE_QUANTIZER: usize = 25;
const RTX_CACHE_QUANTIZE_SLOTS: usize = DATAGRAM_MAX_PACKET_SIZE / RTX_CACHE_SIZE_QUANTIZER;

#[derive(Debug)]
pub(crate) struct RtxCache {
    // Data, new additions here probably need to be cleared in [`clear`].
    packet_by_seq_no: EvictingBuffer<Cached>,

    // Technically we want [Option<SeqNo>; X] to indicate the absence of
    // a SeqNo. However We can half the storage space by using the sentinel
    // values SeqNo::MAX to indicate None
    seq_no_by_quantized_size: [SeqNo; RTX_CACHE_QUANTIZE_SLOTS],

    /// sluice: the last compact entry handed out, rebuilt as a whole packet.
    rebuilt: Option<RtpPacket>,
}

/// sluice: a sent packet as the history keeps it. Most are kept compact, in 56 bytes instead of
/// an `RtpPacket`'s 408 (288 of them its header), because the history is written once per packet
/// sent and read only for resends: at 640 entries per stream, whole packets made every send a
/// write to memory that had left the cache seconds before, and each byte of an entry is a byte
/// the shard brings back into the cache twice, when the entry is written and when it is evicted.
#[derive(Debug)]
enum Cached {
    Compact(CompactPacket),
    /// Anything the compact form cannot hold exactly: CSRCs, a sender info, extension values
    /// other than the three `CompactPacket` keeps (a MID or RID not yet acknowledged,
    /// abs-capture-time, ...), a sequence number that is not the low bits of the `SeqNo`, a
    /// `timestamp` more than two seconds from the time it was cached.
    Whole(Box<RtpPacket>),
}

/// sluice: what is left of a packet once everything a header built by `StreamTx::write_rtp`
/// holds at its default is dropped, and what the history's entry already holds: the `SeqNo` is
/// the entry's position (and the header's sequence number its low 16 bits), and the packet's
/// `timestamp` is kept as its distance from the entry's.
#[derive(Debug)]
struct CompactPacket {
    payload: Arc<[u8]>,
    time_numer: u64,
    time_frequency: Frequency,
    rtp_time: u32,
    ssrc: Ssrc,
    /// The packet's `timestamp` less the time it was cached, in nanoseconds.
    timestamp_offset_ns: i32,
    vp8_patch: Option<Vp8Patch>,
    payload_type: Pt,
    marker: bool,
    audio_level: Option<i8>,
    voice_activity: Option<bool>,
    video_orientation: Option<VideoOrientation>,
}

/// sluice: `at` moved by `offset_ns`; `None` past what an `Instant` can hold.
fn offset_instant(at: Instant, offset_ns: i32) -> Option<Instant> {
    if offset_ns == 0 {
        return Some(at); // a packet sent as it was written
    }
    let d = Duration::from_nanos(u64::from(offset_ns.unsigned_abs()));
    if offset_ns >= 0 {
        at.checked_add(d)
    } else {
        at.checked_sub(d)
    }
}

/// sluice: how far `t` is from `at`, when it fits an `i32` of nanoseconds.
fn offset_of(t: Instant, at: Instant) -> Option<i32> {
    if t == at {
        return Some(0);
    }
    let ns = if t >= at {
        i64::try_from((t - at).as_nanos()).ok()?
    } else {
        -i64::try_from((at - t).as_nanos()).ok()?
    };
    i32::try_from(ns).ok()
}

impl CompactPacket {
    /// The header a packet with these values has, everything else at its default.
    #[allow(clippy::too_many_arguments)]
    fn header_of(
        rtp_time: u32,
        ssrc: Ssrc,
        sequence_number: u16,
        payload_type: Pt,
        marker: bool,
        audio_level: Option<i8>,
        voice_activity: Option<bool>,
        video_orientation: Option<VideoOrientation>,
    ) -> RtpHeader {
        RtpHeader {
            sequence_number,
            marker,
            payload_type,
            timestamp: rtp_time,
            ssrc,
            ext_vals: ExtensionValues {
                audio_level,
                voice_activity,
                video_orientation,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The packet kept at `seq_no`, cached at `at`.
    fn packet(&self, seq_no: SeqNo, at: Instant) -> RtpPacket {
        RtpPacket {
            seq_no,
            time: MediaTime::new(self.time_numer, self.time_frequency),
            header: Self::header_of(
                self.rtp_time,
                self.ssrc,
                *seq_no as u16,
                self.payload_type,
                self.marker,
                self.audio_level,
                self.voice_activity,
                self.video_orientation,
            ),
            payload: self.payload.clone(),
            vp8_patch: self.vp8_patch,
            // Checked when the packet was kept.
            timestamp: offset_instant(at, self.timestamp_offset_ns).unwrap_or(at),
            last_sender_info: None,
            nackable: true,
        }
    }
}

impl Cached {
    /// Compact when the compact form, cached at `at`, gives back exactly this packet.
    fn new(packet: RtpPacket, at: Instant) -> Cached {
        let h = &packet.header;
        let e = &h.ext_vals;
        let offset = offset_of(packet.timestamp, at)
            .filter(|o| *o == 0 || offset_instant(at, *o) == Some(packet.timestamp));
        let exact = packet.last_sender_info.is_none()
            && packet.nackable
            && CompactPacket::header_of(
                h.timestamp,
                h.ssrc,
                *packet.seq_no as u16,
                h.payload_type,
                h.marker,
                e.audio_level,
                e.voice_activity,
                e.video_orientation,
            ) == *h;
        let Some(timestamp_offset_ns) = offset.filter(|_| exact) else {
            return Cached::Whole(Box::new(packet));
        };
        let RtpPacket {
            time,
            header,
            payload,
            vp8_patch,
            ..
        } = packet;
        Cached::Compact(CompactPacket {
            payload,
            time_numer: time.numer(),
            time_frequency: time.frequency(),
            rtp_time: header.timestamp,
            ssrc: header.ssrc,
            timestamp_offset_ns,
            vp8_patch,
            payload_type: header.payload_type,
            marker: header.marker,
            audio_level: header.ext_vals.audio_level,
            voice_activity: header.ext_vals.voice_activity,
            video_orientation: header.ext_vals.video_orientation,
        })
    }

    fn payload(&self) -> &[u8] {
        match self {
            Cached::Compact(c) => &c.payload,
            Cached::Whole(p) => &p.payload,
        }
    }
}

impl RtxCache {
    pub fn new(max_packet_count: usize, max_packet_age: Duration) -> Self {
        Self {
            packet_by_seq_no: EvictingBuffer::new(10, max_packet_age, max_packet_count),
            seq_no_by_quantized_size: [SeqNo::MAX; RTX_CACHE_QUANTIZE_SLOTS],
            rebuilt: None,
        }
    }

    pub fn cache_sent_packet(&mut self, packet: RtpPacket, now: Instant) {
        assert!(packet.nackable);
        let seq_no = packet.seq_no;
        let quantized_size = packet.payload.len() / RTX_CACHE_SIZE_QUANTIZER;
        self.packet_by_seq_no
            .push(*seq_no, now, Cached::new(packet, now));
        self.seq_no_by_quantized_size[quantized_size] = seq_no;
        self.remove_old_packets(now);
    }

    pub fn last_cached_seq_no(&self) -> Option<SeqNo> {
        Some(self.packet_by_seq_no.last_position()?.into())
    }

    /// sluice: a compact entry comes back rebuilt, so changes made through the reference last
    /// only until the next lookup (the resend path changes only the copy it sends).
    pub fn get_cached_packet_by_seq_no(&mut self, seq_no: SeqNo) -> Option<&mut RtpPacket> {
        match self.packet_by_seq_no.get_mut_with_time(*seq_no)? {
            (Cached::Whole(p), _) => Some(p),
            (Cached::Compact(c), at) => Some(self.rebuilt.insert(c.packet(seq_no, at))),
        }
    }

    pub fn get_cached_packet_smaller_than(&mut self, max_size: usize) -> Option<&mut RtpPacket> {
        let quantized_size = max_size / RTX_CACHE_SIZE_QUANTIZER;

        let seq_no = self.seq_no_by_quantized_size[..quantized_size]
            .iter()
            .rev()
            .filter(|seq_no| !seq_no.is_max())
            .find(|seq_no| self.packet_by_seq_no.contains(***seq_no))?;

        self.get_cached_packet_by_seq_no(*seq_no)
    }

    fn remove_old_packets(&mut self, now: Instant) {
        self.packet_by_seq_no.maybe_evict(now);
    }

    pub(crate) fn last_packet(&self) -> Option<&[u8]> {
        let packet = self.packet_by_seq_no.last()?;
        Some(packet.payload())
    }

    pub(crate) fn clear(&mut self) {
        self.packet_by_seq_no.clear();
        self.seq_no_by_quantized_size = [SeqNo::MAX; RTX_CACHE_QUANTIZE_SLOTS];
        self.rebuilt = None;
    }
}

#[cfg(test)]
mod test {
    use crate::rtp_::MediaTime;
    use crate::rtp_::RtpHeader;

    use super::*;

    fn after(now: Instant, millis: u64) -> Instant {
        now + Duration::from_millis(millis)
    }

    fn packet(now: Instant, seq_no: u64, millis: u64) -> RtpPacket {
        RtpPacket {
            header: RtpHeader::default(),
            seq_no: seq_no.into(),
            time: MediaTime::from_90khz(0),
            payload: millis.to_be_bytes().into(),
            vp8_patch: None,
            timestamp: after(now, millis),
            last_sender_info: None,
            nackable: true,
        }
    }

    /// sluice: a packet is kept compact only when it comes back exactly as it went in; any
    /// other comes back whole. Both give back the packet cached.
    #[test]
    fn compact_and_whole_entries_come_back_unchanged() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(100, Duration::from_secs(3));
        let plain = |seq_no: u64| {
            let mut p = packet(now, seq_no, seq_no);
            p.header.marker = true;
            p.header.payload_type = 96.into();
            p.header.sequence_number = seq_no as u16;
            p.header.timestamp = 90_000;
            p.header.ssrc = 1234.into();
            p.header.ext_vals.audio_level = Some(-30);
            p.header.ext_vals.voice_activity = Some(true);
            p
        };
        let with_mid = |seq_no: u64| {
            let mut p = plain(seq_no);
            p.header.ext_vals.mid = Some("0".into());
            p
        };
        let with_csrc = |seq_no: u64| {
            let mut p = plain(seq_no);
            p.header.csrc_count = 1;
            p.header.csrc[0] = 99;
            p
        };
        // The sequence number is not the low bits of the SeqNo.
        let renumbered = |seq_no: u64| {
            let mut p = plain(seq_no);
            p.header.sequence_number = 7;
            p
        };
        // Sent from a queue where it waited longer than the offset can say.
        let long_queued = |seq_no: u64| {
            let mut p = plain(seq_no);
            p.timestamp = now - Duration::from_secs(3);
            p
        };
        // Cached before its timestamp, and at the nanosecond.
        let early = |seq_no: u64| {
            let mut p = plain(seq_no);
            p.timestamp = now + Duration::from_nanos(1_999_999_999);
            p
        };
        rtx_cache.cache_sent_packet(plain(1), now);
        rtx_cache.cache_sent_packet(with_mid(2), now);
        rtx_cache.cache_sent_packet(with_csrc(3), now);
        rtx_cache.cache_sent_packet(renumbered(4), now);
        rtx_cache.cache_sent_packet(long_queued(5), now);
        rtx_cache.cache_sent_packet(early(70_000), now);
        let kept = |c: &RtxCache, seq_no: u64| match c.packet_by_seq_no.get(seq_no) {
            Some(Cached::Compact(_)) => "compact",
            Some(Cached::Whole(_)) => "whole",
            None => "none",
        };
        assert_eq!(kept(&rtx_cache, 1), "compact");
        assert_eq!(kept(&rtx_cache, 2), "whole");
        assert_eq!(kept(&rtx_cache, 3), "whole");
        assert_eq!(kept(&rtx_cache, 4), "whole");
        assert_eq!(kept(&rtx_cache, 5), "whole");
        assert_eq!(kept(&rtx_cache, 70_000), "compact");
        for (seq_no, p) in [
            (4, renumbered(4)),
            (5, long_queued(5)),
            (70_000, early(70_000)),
        ] {
            assert_eq!(
                Some(&mut { p }),
                rtx_cache.get_cached_packet_by_seq_no(seq_no.into())
            );
        }
        assert_eq!(
            Some(&mut plain(1)),
            rtx_cache.get_cached_packet_by_seq_no(1.into())
        );
        assert_eq!(
            Some(&mut with_mid(2)),
            rtx_cache.get_cached_packet_by_seq_no(2.into())
        );
        assert_eq!(
            Some(&mut with_csrc(3)),
            rtx_cache.get_cached_packet_by_seq_no(3.into())
        );
        assert_eq!(rtx_cache.last_packet(), Some(&70_000u64.to_be_bytes()[..]));
    }

    /// sluice: a compact entry stays small (each byte of it is brought into the cache when it is
    /// written and again when it is evicted).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_compact_entry_is_56_bytes() {
        assert_eq!(std::mem::size_of::<Cached>(), 56);
    }

    #[test]
    fn rtx_cache_0_sized() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(0, Duration::from_secs(3));
        rtx_cache.cache_sent_packet(packet(now, 1, 10), after(now, 10));
        assert_eq!(
            Some(&mut packet(now, 1, 10)),
            rtx_cache.get_cached_packet_by_seq_no(1.into())
        );
        assert_eq!(
            Some(&mut packet(now, 1, 10)),
            rtx_cache.get_cached_packet_smaller_than(1000)
        );
    }

    #[test]
    fn rtx_cache_0_duration() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(10, Duration::from_secs(0));
        rtx_cache.cache_sent_packet(packet(now, 1, 10), after(now, 10));
        assert_eq!(None, rtx_cache.get_cached_packet_by_seq_no(1.into()));
        assert_eq!(None, rtx_cache.get_cached_packet_smaller_than(1000));
    }

    #[test]
    fn rtx_cache_1_sized() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(1, Duration::from_secs(3));
        rtx_cache.cache_sent_packet(packet(now, 1, 10), after(now, 10));
        assert_eq!(
            Some(&mut packet(now, 1, 10)),
            rtx_cache.get_cached_packet_by_seq_no(1.into())
        );
        assert_eq!(
            Some(&mut packet(now, 1, 10)),
            rtx_cache.get_cached_packet_smaller_than(1000)
        );
        assert_eq!(
            Some(&mut packet(now, 1, 10)),
            rtx_cache.get_cached_packet_smaller_than(25)
        );
        assert_eq!(None, rtx_cache.get_cached_packet_smaller_than(24));
        rtx_cache.cache_sent_packet(packet(now, 2, 20), after(now, 20));
        assert_eq!(
            Some(&mut packet(now, 2, 20)),
            rtx_cache.get_cached_packet_by_seq_no(2.into())
        );
    }

    #[test]
    fn rtx_cache_100_sized_backwards() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(100, Duration::from_secs(3));

        for i in 1..=200 {
            let seq_no = 201 - i;
            let pkt = packet(now, seq_no, (201 - i) * 10);
            let now = after(now, i * 10);
            rtx_cache.cache_sent_packet(pkt, now);
        }

        assert_eq!(
            Some(&mut packet(now, 200, 2000)),
            rtx_cache.get_cached_packet_by_seq_no(200.into())
        );
        assert_eq!(None, rtx_cache.get_cached_packet_by_seq_no(100.into()));
        assert_eq!(None, rtx_cache.get_cached_packet_by_seq_no(101.into()));
    }

    #[test]
    fn rtx_cache_eviction() {
        let now = Instant::now();
        // Cache can take all entries
        let mut rtx_cache = RtxCache::new(400, Duration::from_secs(1));
        for i in 1..=200 {
            let seq_no = i;
            let pkt = packet(now, seq_no, i * 10);
            let now = after(now, i * 10);
            rtx_cache.cache_sent_packet(pkt, now);
        }

        assert_eq!(None, rtx_cache.get_cached_packet_by_seq_no(99.into()));

        assert_eq!(
            Some(&mut packet(now, 100, 1000)),
            rtx_cache.get_cached_packet_by_seq_no(100.into())
        );
        assert_eq!(
            Some(&mut packet(now, 200, 2000)),
            rtx_cache.get_cached_packet_by_seq_no(200.into())
        );
    }
}
