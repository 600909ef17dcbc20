//! Synthetic media: VP8-shaped video frames cut into RTP payloads, and Opus-shaped audio packets.
//! Nothing is encoded; sizes, timing and the first bytes are what an SFU looks at, so those are
//! realistic (a valid VP8 payload descriptor with a 15-bit PictureID, the frame tag, and a
//! keyframe's start code and size). The probe ([`crate::probe`]) is written over each payload's
//! last bytes by the sender.

use std::time::{Duration, Instant};

use crate::probe::PROBE_LEN;

/// Largest RTP payload we build. With the 12-byte RTP header and str0m's header extensions
/// (mid, abs-send-time, ...) every packet stays at or under 1200 bytes.
pub const MAX_PAYLOAD: usize = 1140;

/// RTP clock rates.
pub const VIDEO_CLOCK: u64 = 90_000;
pub const AUDIO_CLOCK: u64 = 48_000;

/// A keyframe is this many times larger than a delta frame.
pub const KEYFRAME_RATIO: u64 = 10;

/// Extended VP8 payload descriptor: X=1, S, PID=0; I=1; M=1 and a 15-bit PictureID.
const VP8_DESCRIPTOR_LEN: usize = 4;
/// Frame tag (3 bytes); on keyframes, start code (3) and width/height (4).
const VP8_KEY_HEADER: [u8; 10] = [0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];
const VP8_DELTA_HEADER: [u8; 3] = [0x11, 0x02, 0x00];

/// Settings of a synthetic video source.
#[derive(Debug, Clone, Copy)]
pub struct VideoConfig {
    pub bitrate_bps: u64,
    pub fps: u32,
    pub keyframe_interval: Duration,
    /// Packets leave at this multiple of the bitrate, as libwebrtc's pacer sends (its default
    /// is 2.5), so a keyframe is spread over several frame intervals. 0: each frame leaves in
    /// one burst.
    pub pacing_factor: f64,
}

/// A leaky-bucket pacer on the publisher's clock (sans-IO: the caller passes `now`). Packets
/// leave no closer than [`VideoSource::pacing_gap`] apart while a queue is waiting. An idle
/// pacer banks no credit: a frame that finds the queue empty starts the clock at `now`. A pacer
/// woken late catches up, back to back, until it is on schedule again; more than `max_debt`
/// behind, the debt beyond that is forgiven and the event is reported (the sender is
/// overloaded).
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    next: Instant,
    max_debt: Duration,
}

impl Pacer {
    pub fn new(now: Instant, max_debt: Duration) -> Pacer {
        Pacer {
            next: now,
            max_debt,
        }
    }

    /// Packets were queued while the queue was empty.
    pub fn queue_started(&mut self, now: Instant) {
        self.next = self.next.max(now);
    }

    /// When the next waiting packet may leave.
    pub fn next_send(&self) -> Instant {
        self.next
    }

    /// A packet whose gap is `gap` leaves at `now` (not before [`Pacer::next_send`]). True when
    /// the pacer was more than `max_debt` behind its schedule.
    pub fn sent(&mut self, now: Instant, gap: Duration) -> bool {
        let late = self.next + self.max_debt < now;
        let base = if late { now - self.max_debt } else { self.next };
        self.next = base + gap;
        late
    }
}

/// One encoded frame, cut into RTP payloads (each at most [`MAX_PAYLOAD`] bytes, the last one
/// carries the marker bit).
#[derive(Debug)]
pub struct Frame {
    #[cfg_attr(not(test), allow(dead_code))]
    pub keyframe: bool,
    /// RTP timestamp (90 kHz).
    pub rtp_time: u32,
    pub payloads: Vec<Vec<u8>>,
}

/// A VP8-shaped frame source at a constant bitrate: keyframes every `keyframe_interval` (and on
/// request), [`KEYFRAME_RATIO`] times the size of a delta frame.
#[derive(Debug)]
pub struct VideoSource {
    cfg: VideoConfig,
    frame_no: u64,
    frames_since_key: u64,
    gop_frames: u64,
    picture_id: u16,
    delta_bytes: usize,
    key_bytes: usize,
}

impl VideoSource {
    pub fn new(cfg: VideoConfig) -> VideoSource {
        let fps = cfg.fps.max(1) as u64;
        let gop_frames = ((cfg.keyframe_interval.as_secs_f64() * fps as f64).round() as u64).max(1);
        // Bytes in one keyframe interval, spread so that key = RATIO x delta.
        let gop_bytes = cfg.bitrate_bps as f64 / 8.0 * gop_frames as f64 / fps as f64;
        let delta = gop_bytes / (gop_frames - 1 + KEYFRAME_RATIO) as f64;
        let min = VP8_DESCRIPTOR_LEN + VP8_KEY_HEADER.len() + PROBE_LEN;
        VideoSource {
            cfg,
            frame_no: 0,
            frames_since_key: 0,
            gop_frames,
            picture_id: 0,
            delta_bytes: (delta as usize).max(min),
            key_bytes: ((delta * KEYFRAME_RATIO as f64) as usize).max(min),
        }
    }

    pub fn frame_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.cfg.fps.max(1) as f64)
    }

    /// How long the pacer waits after sending a packet of `bytes` (zero without pacing).
    pub fn pacing_gap(&self, bytes: usize) -> Duration {
        let rate = self.cfg.bitrate_bps as f64 * self.cfg.pacing_factor;
        if rate > 0.0 {
            Duration::from_secs_f64(bytes as f64 * 8.0 / rate)
        } else {
            Duration::ZERO
        }
    }

    /// The next frame: a keyframe when it is the first, when the interval is up, or when asked
    /// (a PLI from the SFU). A requested keyframe restarts the interval, as encoders do.
    pub fn next_frame(&mut self, keyframe_requested: bool) -> Frame {
        let keyframe =
            self.frame_no == 0 || keyframe_requested || self.frames_since_key >= self.gop_frames;
        if keyframe {
            self.frames_since_key = 0;
        }
        self.frames_since_key += 1;
        let rtp_time = (self.frame_no * VIDEO_CLOCK / self.cfg.fps.max(1) as u64) as u32;
        let size = if keyframe {
            self.key_bytes
        } else {
            self.delta_bytes
        };
        let payloads = vp8_packetize(size, keyframe, self.picture_id);
        self.frame_no += 1;
        self.picture_id = (self.picture_id + 1) & 0x7fff;
        Frame {
            keyframe,
            rtp_time,
            payloads,
        }
    }
}

/// Cut a frame of `frame_bytes` (VP8 data, excluding descriptors) into payloads of at most
/// [`MAX_PAYLOAD`] bytes, each led by a payload descriptor; the first also holds the frame tag.
pub fn vp8_packetize(frame_bytes: usize, keyframe: bool, picture_id: u16) -> Vec<Vec<u8>> {
    let room = MAX_PAYLOAD - VP8_DESCRIPTOR_LEN;
    let count = frame_bytes.div_ceil(room).max(1);
    let per = frame_bytes / count;
    let mut extra = frame_bytes % count;
    let header: &[u8] = if keyframe {
        &VP8_KEY_HEADER
    } else {
        &VP8_DELTA_HEADER
    };
    (0..count)
        .map(|i| {
            let body = per + usize::from(extra > 0);
            extra = extra.saturating_sub(1);
            let len = (VP8_DESCRIPTOR_LEN + body)
                .max(VP8_DESCRIPTOR_LEN + header.len() + PROBE_LEN)
                .min(MAX_PAYLOAD);
            let mut p = Vec::with_capacity(len);
            let start = if i == 0 { 0x10 } else { 0x00 };
            p.extend_from_slice(&[
                0x80 | start,
                0x80,
                0x80 | (picture_id >> 8) as u8 & 0x7f,
                picture_id as u8,
            ]);
            if i == 0 {
                p.extend_from_slice(header);
            }
            fill(&mut p, len);
            p
        })
        .collect()
}

/// Opus-shaped audio: one packet every 20 ms of `bytes` (TOC byte, then filler).
pub fn opus_payload(bytes: usize) -> Vec<u8> {
    let len = bytes.clamp(1 + PROBE_LEN, MAX_PAYLOAD);
    let mut p = Vec::with_capacity(len);
    // TOC: config 31 (CELT fullband 20 ms), mono, one frame.
    p.push(0xf8);
    fill(&mut p, len);
    p
}

/// Audio packets per second (20 ms frames) and the RTP time step per packet.
pub const AUDIO_PPS: u64 = 50;
pub const AUDIO_TS_STEP: u32 = (AUDIO_CLOCK / AUDIO_PPS) as u32;

fn fill(p: &mut Vec<u8>, len: usize) {
    let mut x = p.len() as u8;
    while p.len() < len {
        x = x.wrapping_mul(37).wrapping_add(11);
        p.push(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::sfu::{is_keyframe, CodecKind};

    fn source(bitrate_bps: u64) -> VideoSource {
        VideoSource::new(VideoConfig {
            bitrate_bps,
            fps: 30,
            keyframe_interval: Duration::from_secs(2),
            pacing_factor: 2.5,
        })
    }

    #[test]
    fn paced_at_2_5x_a_keyframe_spreads_over_three_and_a_half_frame_intervals() {
        let mut v = source(1_500_000);
        let (key, delta) = (v.next_frame(false), v.next_frame(false));
        let gap =
            |f: &Frame| -> Duration { f.payloads.iter().map(|p| v.pacing_gap(p.len())).sum() };
        let (key, delta) = (gap(&key), gap(&delta));
        let frame = v.frame_interval();
        // 1.5 Mbit/s over 60 frames, the keyframe 10 delta frames: a delta frame is 60/69 of
        // the mean frame and leaves in 0.35 of a frame interval at 2.5x; the keyframe in 3.5.
        assert!(key > frame * 33 / 10 && key < frame * 37 / 10, "{key:?}");
        assert!(
            delta > frame * 33 / 100 && delta < frame * 37 / 100,
            "{delta:?}"
        );
        let burst = VideoSource::new(VideoConfig {
            pacing_factor: 0.0,
            ..v.cfg
        });
        assert_eq!(burst.pacing_gap(1200), Duration::ZERO);
    }

    /// Frames every interval, each queued behind the pacer; the sender wakes `late` after the
    /// pacer's slot. Returns each packet's (send time, frame number) and the late events.
    fn pace(frames: &[usize], gap: Duration, late: Duration) -> (Vec<(Duration, usize)>, usize) {
        let t0 = Instant::now();
        let interval = Duration::from_millis(33);
        let mut pacer = Pacer::new(t0, Duration::from_millis(50));
        let (mut queue, mut sends, mut lates) = (std::collections::VecDeque::new(), vec![], 0);
        let mut now = t0;
        let mut next_frame = 0;
        while next_frame < frames.len() || !queue.is_empty() {
            let frame_at = t0 + interval * next_frame as u32;
            let send_at = (!queue.is_empty()).then(|| pacer.next_send().max(now) + late);
            if next_frame < frames.len() && send_at.is_none_or(|s| frame_at <= s) {
                now = now.max(frame_at);
                if queue.is_empty() {
                    pacer.queue_started(now);
                }
                queue.extend(std::iter::repeat_n(next_frame, frames[next_frame]));
                next_frame += 1;
            } else {
                now = send_at.unwrap();
                let frame = queue.pop_front().unwrap();
                lates += usize::from(pacer.sent(now, gap));
                sends.push((now - t0, frame));
            }
        }
        (sends, lates)
    }

    #[test]
    fn the_pacer_spaces_every_frame_and_an_idle_pacer_banks_no_credit() {
        let gap = Duration::from_micros(2560);
        // A keyframe of 52 packets, then delta frames of 6: the pacer is idle between them.
        let mut frames = vec![52];
        frames.extend([6; 20]);
        let (sends, lates) = pace(&frames, gap, Duration::ZERO);
        assert_eq!(lates, 0);
        for w in sends.windows(2) {
            assert!(w[1].0 - w[0].0 >= gap, "packets {w:?} closer than the gap");
        }
        // A frame that finds the pacer idle leaves when it is made, not earlier.
        let last_first = sends.iter().find(|s| s.1 == 20).unwrap();
        assert_eq!(last_first.0, Duration::from_millis(33 * 20));
    }

    #[test]
    fn a_late_pacer_catches_up_and_reports_only_a_large_debt() {
        let gap = Duration::from_micros(2560);
        let frames = vec![52, 6, 6, 6, 6];
        // Woken 1 ms late every time: no slot is lost, the keyframe still leaves within
        // 52 gaps plus the lateness, and nothing is reported.
        let (sends, lates) = pace(&frames, gap, Duration::from_millis(1));
        assert_eq!(lates, 0);
        let key_last = sends.iter().rfind(|s| s.1 == 0).unwrap().0;
        assert!(
            key_last <= gap * 52 + Duration::from_millis(52),
            "{key_last:?}"
        );
        // A sender stalled for 80 ms at the start: more than the 50 ms debt, reported once;
        // then it goes back to back until on schedule.
        let mut pacer = Pacer::new(Instant::now(), Duration::from_millis(50));
        let t = pacer.next_send() + Duration::from_millis(80);
        assert!(pacer.sent(t, gap));
        assert_eq!(pacer.next_send(), t - Duration::from_millis(50) + gap);
        assert!(!pacer.sent(t, gap));
        assert!(
            pacer.next_send() < t,
            "still behind: the next packet is due at once"
        );
    }

    #[test]
    fn bitrate_packet_size_and_keyframe_size_are_as_configured() {
        let mut v = source(1_500_000);
        let (mut bytes, mut keys, mut key_size, mut delta_size) = (0usize, 0, 0, 0);
        // Ten seconds of frames.
        for _ in 0..300 {
            let f = v.next_frame(false);
            let size: usize = f.payloads.iter().map(Vec::len).sum();
            assert!(f.payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
            bytes += size;
            if f.keyframe {
                keys += 1;
                key_size = size;
            } else {
                delta_size = size;
            }
        }
        assert_eq!(keys, 5, "one keyframe every 2 s");
        let bps = bytes as f64 * 8.0 / 10.0;
        assert!((bps - 1_500_000.0).abs() < 1_500_000.0 * 0.02, "{bps}");
        let ratio = key_size as f64 / delta_size as f64;
        assert!((9.0..=11.0).contains(&ratio), "{ratio}");
    }

    #[test]
    fn sluice_detects_the_keyframes_and_only_their_first_packet() {
        let mut v = source(1_500_000);
        let key = v.next_frame(false);
        assert!(key.keyframe);
        assert!(key.payloads.len() > 10);
        assert!(is_keyframe(CodecKind::Vp8, &key.payloads[0]));
        assert!(key.payloads[1..]
            .iter()
            .all(|p| !is_keyframe(CodecKind::Vp8, p)));
        let delta = v.next_frame(false);
        assert!(!delta.keyframe);
        assert!(delta
            .payloads
            .iter()
            .all(|p| !is_keyframe(CodecKind::Vp8, p)));
        // A requested keyframe comes at once, and a probe over the tail does not hide it.
        let mut forced = v.next_frame(true);
        assert!(forced.keyframe);
        crate::probe::Probe {
            stream: crate::probe::StreamId::new(1, true),
            seq: 1,
            sent_ns: 1,
        }
        .write_into(&mut forced.payloads[0]);
        assert!(is_keyframe(CodecKind::Vp8, &forced.payloads[0]));
    }

    #[test]
    fn descriptors_carry_start_bit_and_picture_id() {
        let payloads = vp8_packetize(3000, false, 0x1234);
        assert_eq!(payloads.len(), 3);
        for (i, p) in payloads.iter().enumerate() {
            assert_eq!(p[0] & 0x10 != 0, i == 0, "S bit only on the first packet");
            assert_eq!(p[0] & 0x80, 0x80);
            assert_eq!(p[1], 0x80);
            let pid = u16::from_be_bytes([p[2] & 0x7f, p[3]]);
            assert_eq!(pid, 0x1234);
        }
        // P bit 1: a delta frame.
        assert_eq!(payloads[0][4] & 1, 1);
    }

    #[test]
    fn timestamps_advance_by_one_frame_of_90khz() {
        let mut v = source(500_000);
        let a = v.next_frame(false).rtp_time;
        let b = v.next_frame(false).rtp_time;
        assert_eq!(b - a, 3000);
        assert_eq!(v.frame_interval(), Duration::from_secs_f64(1.0 / 30.0));
    }

    #[test]
    fn tiny_frames_and_audio_still_hold_a_probe() {
        let p = vp8_packetize(1, true, 0);
        assert_eq!(p.len(), 1);
        assert!(p[0].len() >= VP8_DESCRIPTOR_LEN + VP8_KEY_HEADER.len() + PROBE_LEN);
        assert!(opus_payload(0).len() > PROBE_LEN);
        assert_eq!(opus_payload(80).len(), 80);
        assert_eq!(opus_payload(80)[0], 0xf8);
    }
}
