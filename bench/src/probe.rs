//! The probe every synthetic packet carries: which publisher stream sent it, its sequence in that
//! stream, and its send time on the host's monotonic clock. It sits at the end of the payload, so
//! the codec header at the front stays whatever the codec needs (VP8 descriptor, Opus TOC).
//!
//! Layout, big-endian, the last [`PROBE_LEN`] bytes of the RTP payload:
//! `stream: u32 | seq: u32 | sent_ns: u64 | magic: u32`.

/// Bytes the probe adds to a payload.
pub const PROBE_LEN: usize = 20;

/// "SLG1": tells a probe from arbitrary payload bytes.
const MAGIC: u32 = 0x534c_4731;

/// One publisher's stream: publisher index, media kind and simulcast layer (0 without
/// simulcast), packed so one `u32` names it: `publisher << 3 | layer << 1 | video`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId(pub u32);

impl StreamId {
    pub fn new(publisher: u32, video: bool) -> StreamId {
        StreamId(publisher << 3 | video as u32)
    }
    /// The same stream's simulcast layer `layer` (0..=3).
    pub fn with_layer(self, layer: u8) -> StreamId {
        StreamId(self.0 & !0b110 | u32::from(layer & 3) << 1)
    }
    pub fn publisher(self) -> u32 {
        self.0 >> 3
    }
    pub fn is_video(self) -> bool {
        self.0 & 1 == 1
    }
    pub fn layer(self) -> u8 {
        (self.0 >> 1 & 3) as u8
    }
}

/// What a receiver learns from one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub stream: StreamId,
    /// Counts every packet of this stream from 0, independent of the RTP sequence number (which
    /// the SFU rewrites).
    pub seq: u32,
    /// CLOCK_MONOTONIC nanoseconds when the publisher built the packet.
    pub sent_ns: u64,
}

impl Probe {
    /// Write the probe over the last [`PROBE_LEN`] bytes of `payload`.
    ///
    /// Panics if the payload is shorter than the probe: payload sizes are chosen by
    /// [`crate::media`], which never goes below it.
    pub fn write_into(&self, payload: &mut [u8]) {
        let at = payload.len() - PROBE_LEN;
        let p = &mut payload[at..];
        p[0..4].copy_from_slice(&self.stream.0.to_be_bytes());
        p[4..8].copy_from_slice(&self.seq.to_be_bytes());
        p[8..16].copy_from_slice(&self.sent_ns.to_be_bytes());
        p[16..20].copy_from_slice(&MAGIC.to_be_bytes());
    }

    /// The probe at the end of `payload`, or `None` when there is none.
    pub fn parse(payload: &[u8]) -> Option<Probe> {
        let at = payload.len().checked_sub(PROBE_LEN)?;
        let p = &payload[at..];
        let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        if word(16) != MAGIC {
            return None;
        }
        let mut ns = [0u8; 8];
        ns.copy_from_slice(&p[8..16]);
        Some(Probe {
            stream: StreamId(word(0)),
            seq: word(4),
            sent_ns: u64::from_be_bytes(ns),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_carry_publisher_kind_and_layer() {
        let audio = StreamId::new(1234, false);
        let video = StreamId::new(1234, true).with_layer(2);
        assert_eq!(
            (audio.publisher(), audio.is_video(), audio.layer()),
            (1234, false, 0)
        );
        assert_eq!(
            (video.publisher(), video.is_video(), video.layer()),
            (1234, true, 2)
        );
        assert_eq!(video.with_layer(1).layer(), 1);
        assert_eq!(video.with_layer(1).publisher(), 1234);
    }

    #[test]
    fn probe_round_trips_at_the_end_of_a_payload() {
        let probe = Probe {
            stream: StreamId::new(41, true),
            seq: 0xdead_beef,
            sent_ns: 0x0123_4567_89ab_cdef,
        };
        let mut payload = vec![0x10, 0x00, 0x9d, 0x01, 0x2a];
        payload.resize(300, 0xaa);
        probe.write_into(&mut payload);
        // The codec header at the front is untouched.
        assert_eq!(&payload[..5], &[0x10, 0x00, 0x9d, 0x01, 0x2a]);
        assert_eq!(Probe::parse(&payload), Some(probe));
        assert_eq!(probe.stream.publisher(), 41);
        assert!(probe.stream.is_video());
        assert!(!StreamId::new(41, false).is_video());
    }

    #[test]
    fn probe_fits_a_payload_of_exactly_its_size() {
        let probe = Probe {
            stream: StreamId::new(0, false),
            seq: 7,
            sent_ns: 1,
        };
        let mut payload = vec![0u8; PROBE_LEN];
        probe.write_into(&mut payload);
        assert_eq!(Probe::parse(&payload), Some(probe));
    }

    #[test]
    fn payloads_without_a_probe_are_refused() {
        assert_eq!(Probe::parse(&[]), None);
        assert_eq!(Probe::parse(&[0u8; PROBE_LEN - 1]), None);
        assert_eq!(Probe::parse(&[0u8; 200]), None);
        let mut payload = vec![0u8; 64];
        Probe {
            stream: StreamId(3),
            seq: 1,
            sent_ns: 2,
        }
        .write_into(&mut payload);
        // One flipped bit in the magic.
        *payload.last_mut().unwrap() ^= 1;
        assert_eq!(Probe::parse(&payload), None);
    }

    #[test]
    fn send_times_from_the_monotonic_clock_survive_the_trip() {
        let before = crate::clock::mono_ns();
        let mut payload = vec![0u8; 100];
        Probe {
            stream: StreamId(1),
            seq: 2,
            sent_ns: crate::clock::mono_ns(),
        }
        .write_into(&mut payload);
        let after = crate::clock::mono_ns();
        let got = Probe::parse(&payload).unwrap().sent_ns;
        assert!(before <= got && got <= after);
    }
}
