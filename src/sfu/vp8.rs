//! The VP8 RTP payload descriptor (RFC 7741 section 4.2): parsing, writing, and rewriting its
//! PictureID, TL0PICIDX and KEYIDX so one subscriber sees one continuous VP8 stream across source
//! switches (simulcast layers, publishers). Touches only the descriptor, never the VP8 bitstream
//! (beyond reading a keyframe's size); never panics and never allocates, whatever the bytes.
//!
//! ```text
//!       0 1 2 3 4 5 6 7
//!      +-+-+-+-+-+-+-+-+
//!      |X|R|N|S|R| PID | (REQUIRED)
//!      +-+-+-+-+-+-+-+-+
//! X:   |I|L|T|K| RSV   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! I:   |M| PictureID   | (OPTIONAL; M=1: 15 bits, one more byte)
//!      +-+-+-+-+-+-+-+-+
//! L:   |   TL0PICIDX   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! T/K: |TID|Y| KEYIDX  | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! ```

use std::fmt;

/// Why a payload's descriptor could not be read, or a rewrite not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vp8Error {
    /// The payload ends inside the descriptor, or right after it (a VP8 payload is never
    /// empty).
    ShortPayload,
    /// L=1 without T=1 (RFC 7741: "the T bit MUST be set to 1" when L is). str0m's
    /// `Vp8Descriptor::parse` refuses the same.
    Malformed,
    /// The payload given to a [`Vp8Rewrite`] does not start with the descriptor it was made
    /// from.
    Mismatch,
    /// The output buffer is too small.
    BufferTooSmall,
    /// [`Vp8Rewrite::apply_in_place`] on a rewrite that changes the PictureID width: use
    /// [`Vp8Rewrite::write`].
    NotInPlace,
}

impl fmt::Display for Vp8Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ShortPayload => "VP8 payload too short for its descriptor",
            Self::Malformed => "VP8 payload descriptor has L=1 without T=1",
            Self::Mismatch => "VP8 payload does not match the parsed descriptor",
            Self::BufferTooSmall => "output buffer too small",
            Self::NotInPlace => "PictureID width changes: the payload must be rewritten",
        })
    }
}

impl std::error::Error for Vp8Error {}

/// How many bits a PictureID field carries (M=0: 7, M=1: 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PictureIdWidth {
    /// One byte, M=0.
    Bits7,
    /// Two bytes, M=1.
    Bits15,
}

impl PictureIdWidth {
    /// Values wrap at this modulus (128 or 32768).
    pub const fn modulus(self) -> u16 {
        match self {
            Self::Bits7 => 1 << 7,
            Self::Bits15 => 1 << 15,
        }
    }

    /// Bytes the field takes in the descriptor.
    pub const fn encoded_len(self) -> usize {
        match self {
            Self::Bits7 => 1,
            Self::Bits15 => 2,
        }
    }
}

/// A PictureID as carried: its value (below the width's modulus) and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureId {
    /// The value, `< width.modulus()`.
    pub value: u16,
    /// 7 or 15 bits.
    pub width: PictureIdWidth,
}

/// The TID/Y part of the T/K byte, present when T=1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemporalLayer {
    /// Temporal layer index, 0..=3.
    pub tid: u8,
    /// Y: layer sync (this frame depends only on TL0 frames).
    pub layer_sync: bool,
}

/// A parsed VP8 payload descriptor. Writing it back ([`write`](Self::write)) gives the same
/// bytes for every descriptor whose reserved bits are zero (and, when T=0 and K=1, whose ignored
/// TID/Y bits are zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// X: the extension byte is present (even if it announces nothing).
    pub extended: bool,
    /// N: a non-reference frame (may be discarded).
    pub non_reference: bool,
    /// S: the first packet of a VP8 partition.
    pub start_of_partition: bool,
    /// PID: partition index, 0..=7.
    pub partition_index: u8,
    /// I.
    pub picture_id: Option<PictureId>,
    /// L: index of the last frame of temporal layer 0.
    pub tl0_pic_idx: Option<u8>,
    /// T.
    pub temporal: Option<TemporalLayer>,
    /// K: keyframe index, 0..=31.
    pub key_idx: Option<u8>,
}

impl Vp8Descriptor {
    /// Parses the descriptor at the start of an RTP payload (no RTP header). Requires at least
    /// one payload byte after it, and rejects what str0m 0.25's `Vp8Descriptor::parse` rejects,
    /// so a descriptor accepted here can be patched by str0m.
    pub fn parse(payload: &[u8]) -> Result<Self, Vp8Error> {
        let b0 = *payload.first().ok_or(Vp8Error::ShortPayload)?;
        let mut d = Self {
            extended: b0 & 0x80 != 0,
            non_reference: b0 & 0x20 != 0,
            start_of_partition: b0 & 0x10 != 0,
            partition_index: b0 & 0x07,
            picture_id: None,
            tl0_pic_idx: None,
            temporal: None,
            key_idx: None,
        };
        let mut i = 1;
        let mut next = || {
            let b = payload.get(i).copied().ok_or(Vp8Error::ShortPayload);
            i += 1;
            b
        };
        if d.extended {
            let x = next()?;
            let (has_pid, has_tl0, has_tid, has_key) =
                (x & 0x80 != 0, x & 0x40 != 0, x & 0x20 != 0, x & 0x10 != 0);
            if has_tl0 && !has_tid {
                return Err(Vp8Error::Malformed);
            }
            if has_pid {
                let hi = next()?;
                d.picture_id = Some(if hi & 0x80 != 0 {
                    let lo = next()?;
                    PictureId {
                        value: u16::from(hi & 0x7f) << 8 | u16::from(lo),
                        width: PictureIdWidth::Bits15,
                    }
                } else {
                    PictureId {
                        value: u16::from(hi),
                        width: PictureIdWidth::Bits7,
                    }
                });
            }
            if has_tl0 {
                d.tl0_pic_idx = Some(next()?);
            }
            if has_tid || has_key {
                let b = next()?;
                if has_tid {
                    d.temporal = Some(TemporalLayer {
                        tid: b >> 6,
                        layer_sync: b & 0x20 != 0,
                    });
                }
                if has_key {
                    d.key_idx = Some(b & 0x1f);
                }
            }
        }
        if payload.len() <= d.encoded_len() {
            return Err(Vp8Error::ShortPayload);
        }
        Ok(d)
    }

    /// The descriptor's length in bytes (1 to 6): where the VP8 payload proper starts.
    pub fn encoded_len(&self) -> usize {
        if !self.has_extension() {
            return 1;
        }
        2 + self.picture_id.map_or(0, |p| p.width.encoded_len())
            + usize::from(self.tl0_pic_idx.is_some())
            + usize::from(self.has_tk_byte())
    }

    /// Writes the descriptor at the start of `out`; returns its length. Values are masked to
    /// their fields' widths. A TL0PICIDX without a TID is written with TID 0 (T=1), as RFC 7741
    /// requires.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, Vp8Error> {
        let len = self.encoded_len();
        let out = out.get_mut(..len).ok_or(Vp8Error::BufferTooSmall)?;
        out[0] = u8::from(self.has_extension()) << 7
            | u8::from(self.non_reference) << 5
            | u8::from(self.start_of_partition) << 4
            | (self.partition_index & 0x07);
        if len == 1 {
            return Ok(1);
        }
        let temporal = self.temporal.or(self.tl0_pic_idx.map(|_| TemporalLayer {
            tid: 0,
            layer_sync: false,
        }));
        out[1] = u8::from(self.picture_id.is_some()) << 7
            | u8::from(self.tl0_pic_idx.is_some()) << 6
            | u8::from(temporal.is_some()) << 5
            | u8::from(self.key_idx.is_some()) << 4;
        let mut i = 2;
        if let Some(p) = self.picture_id {
            match p.width {
                PictureIdWidth::Bits7 => {
                    out[i] = (p.value & 0x7f) as u8;
                }
                PictureIdWidth::Bits15 => {
                    out[i] = 0x80 | ((p.value >> 8) & 0x7f) as u8;
                    out[i + 1] = p.value as u8;
                }
            }
            i += p.width.encoded_len();
        }
        if let Some(tl0) = self.tl0_pic_idx {
            out[i] = tl0;
            i += 1;
        }
        if self.has_tk_byte() {
            let t = temporal.unwrap_or(TemporalLayer {
                tid: 0,
                layer_sync: false,
            });
            out[i] = (t.tid & 0x03) << 6
                | u8::from(t.layer_sync) << 5
                | self.key_idx.unwrap_or(0) & 0x1f;
        }
        Ok(len)
    }

    /// Whether this packet starts a VP8 frame (S=1 and PID=0).
    pub fn starts_frame(&self) -> bool {
        self.start_of_partition && self.partition_index == 0
    }

    fn has_extension(&self) -> bool {
        self.extended
            || self.picture_id.is_some()
            || self.tl0_pic_idx.is_some()
            || self.temporal.is_some()
            || self.key_idx.is_some()
    }

    /// The TID/Y/KEYIDX byte: present with T or K (and T is implied by L).
    fn has_tk_byte(&self) -> bool {
        self.temporal.is_some() || self.key_idx.is_some() || self.tl0_pic_idx.is_some()
    }
}

/// The width and height of a VP8 keyframe, from the first packet of the frame (descriptor S=1,
/// PID=0, then the frame tag with P=0, the start code, and the 14-bit sizes; the scaling bits
/// are ignored). `None` for anything else. Lets the shard learn each simulcast layer's
/// resolution for [`LayerInfo`](super::LayerInfo) from its keyframes.
pub fn keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    let d = Vp8Descriptor::parse(payload).ok()?;
    if !d.starts_frame() {
        return None;
    }
    let h = payload.get(d.encoded_len()..)?;
    if h.first()? & 0x01 != 0 || h.get(3..6)? != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([*h.get(6)?, *h.get(7)?]) & 0x3fff;
    let height = u16::from_le_bytes([*h.get(8)?, *h.get(9)?]) & 0x3fff;
    Some((width, height))
}

/// One wrapping descriptor field's mapping from the current source's values to outgoing ones.
///
/// Source values are extended (unwrapped) modulo the field's range, tolerating reordering
/// within half of it; outgoing extended value = source extended value + `offset`.
#[derive(Debug, Clone, Copy)]
struct FieldMap {
    /// The field's range in the current source (PictureID: 128 or 32768).
    modulus: u64,
    /// Highest extended source value seen; `None` until the field is first seen.
    highest: Option<u64>,
    offset: u64,
}

impl FieldMap {
    const fn new() -> Self {
        Self {
            modulus: 0,
            highest: None,
            offset: 0,
        }
    }

    /// The outgoing extended value of source `value` (already `< modulus`). The first value
    /// after a reset (or after the source changed the field's range) continues from
    /// `out_highest + 1`, or passes through when nothing was sent yet.
    fn map(&mut self, value: u64, modulus: u64, out_highest: Option<u64>) -> u64 {
        let highest = match self.highest {
            Some(h) if self.modulus == modulus => h,
            _ => {
                // The first value sits at roll-over count 1, so reordered older values stay
                // representable (as in `seq.rs`).
                let ext = modulus + value;
                self.modulus = modulus;
                self.highest = Some(ext);
                self.offset = out_highest.map_or(0, |h| (h + 1).wrapping_sub(ext));
                return ext.wrapping_add(self.offset);
            }
        };
        let ahead = value.wrapping_sub(highest) & (modulus - 1);
        let ext = if ahead < modulus / 2 {
            highest + ahead
        } else {
            highest.saturating_sub(modulus - ahead)
        };
        if ext > highest {
            self.highest = Some(ext);
        }
        ext.wrapping_add(self.offset)
    }
}

/// Keeps one subscriber's VP8 PictureID, TL0PICIDX and KEYIDX continuous across source
/// switches, as mediasoup's and LiveKit's VP8 munging does: within one source every field keeps
/// its own spacing (gaps from loss upstream stay gaps); at a switch the new source's first
/// PictureID is the last one sent + 1, its TL0PICIDX the last + 1 and its KEYIDX the last + 1.
/// The first source's values pass through unchanged.
///
/// The outgoing PictureID width is the first source's (libwebrtc senders all use 15 bits); a
/// later source with the other width needs its descriptor resized ([`Vp8Rewrite::in_place`] is
/// false), everything else is patched in place.
///
/// # Call-order contract
///
/// 1. One per (subscriber, VP8 video track), next to its [`Forwarder`](super::Forwarder).
/// 2. For every packet the forwarder forwards, in the same order, parse its descriptor
///    ([`Vp8Descriptor::parse`]; the shard may do that once per packet for all subscribers) and
///    call [`rewrite`](Self::rewrite) with the packet's SSRC; apply the returned
///    [`Vp8Rewrite`] to the outgoing payload. Packets whose descriptor does not parse go out
///    unchanged and are not shown to the rewriter.
/// 3. A new SSRC starts a new mapping by itself. On the selector's `SwitchAndForward`, call
///    [`resync`](Self::resync) before rewriting that keyframe: a resume on the same SSRC after
///    the selector dropped its packets then shows no PictureID jump either (for another SSRC
///    it changes nothing).
/// 4. Never reads a clock, never allocates, never panics.
#[derive(Debug, Clone)]
pub struct Vp8Rewriter {
    ssrc: Option<u32>,
    out_width: Option<PictureIdWidth>,
    picture_id: FieldMap,
    tl0: FieldMap,
    key_idx: FieldMap,
    /// Highest outgoing extended value sent per field.
    out_picture_id: Option<u64>,
    out_tl0: Option<u64>,
    out_key_idx: Option<u64>,
}

impl Default for Vp8Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Vp8Rewriter {
    /// A rewriter that has forwarded nothing yet.
    pub const fn new() -> Self {
        Self {
            ssrc: None,
            out_width: None,
            picture_id: FieldMap::new(),
            tl0: FieldMap::new(),
            key_idx: FieldMap::new(),
            out_picture_id: None,
            out_tl0: None,
            out_key_idx: None,
        }
    }

    /// The next packet starts a new mapping even if its SSRC is the current one.
    pub fn resync(&mut self) {
        self.ssrc = None;
    }

    /// Maps one forwarded packet's descriptor `d`, from source `ssrc`, to outgoing values.
    pub fn rewrite(&mut self, ssrc: u32, d: &Vp8Descriptor) -> Vp8Rewrite {
        if self.ssrc != Some(ssrc) {
            self.ssrc = Some(ssrc);
            self.picture_id = FieldMap::new();
            self.tl0 = FieldMap::new();
            self.key_idx = FieldMap::new();
        }
        let mut out = *d;
        if let Some(p) = d.picture_id {
            let width = *self.out_width.get_or_insert(p.width);
            let ext = self.picture_id.map(
                u64::from(p.value),
                u64::from(p.width.modulus()),
                self.out_picture_id,
            );
            self.out_picture_id = Some(self.out_picture_id.map_or(ext, |h| h.max(ext)));
            out.picture_id = Some(PictureId {
                value: (ext % u64::from(width.modulus())) as u16,
                width,
            });
        }
        if let Some(tl0) = d.tl0_pic_idx {
            let ext = self.tl0.map(u64::from(tl0), 256, self.out_tl0);
            self.out_tl0 = Some(self.out_tl0.map_or(ext, |h| h.max(ext)));
            out.tl0_pic_idx = Some(ext as u8);
        }
        if let Some(k) = d.key_idx {
            let ext = self.key_idx.map(u64::from(k & 0x1f), 32, self.out_key_idx);
            self.out_key_idx = Some(self.out_key_idx.map_or(ext, |h| h.max(ext)));
            out.key_idx = Some((ext & 0x1f) as u8);
        }
        Vp8Rewrite { source: *d, out }
    }
}

/// What to write into one forwarded packet's VP8 descriptor: the source descriptor it was made
/// from and the outgoing one. Valid only for the payload that descriptor was parsed from.
///
/// Applying it with str0m 0.25: when [`in_place`](Self::in_place), build a `Vp8Patch` from
/// str0m's own `Vp8Descriptor::parse(payload)?.patch()` with
/// [`picture_id`](Self::picture_id), [`tl0_pic_idx`](Self::tl0_pic_idx) and
/// [`key_idx`](Self::key_idx) (the values always fit the source fields then) and hand it to
/// `RtpWrite::vp8_patch`: str0m patches while it serializes into the send buffer, so the shared
/// payload is neither copied nor changed. Otherwise [`write`](Self::write) a new payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Rewrite {
    source: Vp8Descriptor,
    out: Vp8Descriptor,
}

impl Vp8Rewrite {
    /// The outgoing descriptor.
    pub fn descriptor(&self) -> Vp8Descriptor {
        self.out
    }

    /// The outgoing PictureID value, if the packet carries one.
    pub fn picture_id(&self) -> Option<u16> {
        self.out.picture_id.map(|p| p.value)
    }

    /// The outgoing TL0PICIDX, if the packet carries one.
    pub fn tl0_pic_idx(&self) -> Option<u8> {
        self.out.tl0_pic_idx
    }

    /// The outgoing KEYIDX, if the packet carries one.
    pub fn key_idx(&self) -> Option<u8> {
        self.out.key_idx
    }

    /// True when the descriptor keeps its size, so the bytes can be patched in place.
    pub fn in_place(&self) -> bool {
        self.out.encoded_len() == self.source.encoded_len()
    }

    /// True when the outgoing descriptor equals the source's: send the payload as it is.
    pub fn is_unchanged(&self) -> bool {
        self.out == self.source
    }

    /// Rewrites the descriptor at the start of `payload` in place. Only the PictureID,
    /// TL0PICIDX and KEYIDX bits change (as with str0m's `Vp8Patch`); reserved and TID/Y bits
    /// stay as they were.
    pub fn apply_in_place(&self, payload: &mut [u8]) -> Result<(), Vp8Error> {
        if !self.in_place() {
            return Err(Vp8Error::NotInPlace);
        }
        self.check(payload)?;
        self.patch_fields(payload);
        Ok(())
    }

    /// Writes the rewritten payload into `out`, which needs `payload.len() + 1` bytes at most;
    /// returns the length written. Like [`apply_in_place`](Self::apply_in_place), but also
    /// when the PictureID field changes width: the bytes before and after it are copied as
    /// they are.
    pub fn write(&self, payload: &[u8], out: &mut [u8]) -> Result<usize, Vp8Error> {
        self.check(payload)?;
        let src_len = self.source.encoded_len();
        let out_len = self.out.encoded_len();
        let total = payload.len() - src_len + out_len;
        let out = out.get_mut(..total).ok_or(Vp8Error::BufferTooSmall)?;
        // The PictureID field is the only one that changes size; it starts at byte 2.
        let field = |d: &Vp8Descriptor| d.picture_id.map_or(0, |p| p.width.encoded_len());
        let (head, src_after, out_after) = if self.source.picture_id.is_some() {
            (2, 2 + field(&self.source), 2 + field(&self.out))
        } else {
            (src_len, src_len, src_len)
        };
        out[..head].copy_from_slice(&payload[..head]);
        out[out_after..].copy_from_slice(&payload[src_after..]);
        self.patch_fields(out);
        Ok(total)
    }

    /// Writes the outgoing field values into `buf`, which starts with a descriptor laid out
    /// as the outgoing one.
    fn patch_fields(&self, buf: &mut [u8]) {
        let mut put = |i: usize, keep: u8, value: u8| {
            if let Some(b) = buf.get_mut(i) {
                *b = (*b & keep) | value;
            }
        };
        let d = &self.out;
        if let Some(p) = d.picture_id {
            match p.width {
                PictureIdWidth::Bits7 => put(2, 0, (p.value & 0x7f) as u8),
                PictureIdWidth::Bits15 => {
                    put(2, 0, 0x80 | ((p.value >> 8) & 0x7f) as u8);
                    put(3, 0, p.value as u8);
                }
            }
        }
        let tl0_at = 2 + d.picture_id.map_or(0, |p| p.width.encoded_len());
        if let Some(tl0) = d.tl0_pic_idx {
            put(tl0_at, 0, tl0);
        }
        if let Some(k) = d.key_idx {
            put(
                tl0_at + usize::from(d.tl0_pic_idx.is_some()),
                !0x1f,
                k & 0x1f,
            );
        }
    }

    fn check(&self, payload: &[u8]) -> Result<(), Vp8Error> {
        match Vp8Descriptor::parse(payload) {
            Ok(d) if d == self.source => Ok(()),
            _ => Err(Vp8Error::Mismatch),
        }
    }
}

/// The fuzzing entry point (for a `fuzz/fuzz_targets/vp8_descriptor.rs`, and a unit test):
/// `data` is a run of packets, each `[length, ssrc, bytes...]`, fed through one
/// [`Vp8Rewriter`]. Checks that nothing panics, that whatever parses writes back to the same
/// descriptor, and that a rewrite applied in place equals the rewrite written out. Panics only
/// on a bug here. Allocates nothing.
pub fn fuzz_vp8(data: &[u8]) {
    let mut rw = Vp8Rewriter::new();
    let mut rest = data;
    while let [len, ssrc, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (packet, next) = tail.split_at(n);
        rest = next;
        let _ = keyframe_size(packet);
        let Ok(d) = Vp8Descriptor::parse(packet) else {
            continue;
        };
        let mut head = [0u8; 7];
        let hn = d.write(&mut head).expect("a descriptor fits in 6 bytes");
        head[hn] = 0;
        assert_eq!(
            Vp8Descriptor::parse(&head[..=hn]),
            Ok(d),
            "write/parse round trip"
        );
        let r = rw.rewrite(u32::from(*ssrc % 4), &d);
        let mut out = [0u8; 257];
        let written = r.write(packet, &mut out).expect("room for one more byte");
        assert_eq!(written + d.encoded_len(), n + r.descriptor().encoded_len());
        assert_eq!(Vp8Descriptor::parse(&out[..written]), Ok(r.descriptor()));
        let mut copy = [0u8; 255];
        let copy = &mut copy[..n];
        copy.copy_from_slice(packet);
        if r.in_place() {
            r.apply_in_place(copy).expect("in place");
            assert_eq!(&copy[..], &out[..written]);
        } else {
            assert_eq!(r.apply_in_place(copy), Err(Vp8Error::NotInPlace));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: [u8; 3] = [0x31, 0x10, 0x00];

    fn desc(pid: Option<(u16, PictureIdWidth)>, tl0: Option<u8>, tid: Option<u8>) -> Vp8Descriptor {
        Vp8Descriptor {
            extended: true,
            non_reference: false,
            start_of_partition: true,
            partition_index: 0,
            picture_id: pid.map(|(value, width)| PictureId { value, width }),
            tl0_pic_idx: tl0,
            temporal: tid.map(|tid| TemporalLayer {
                tid,
                layer_sync: false,
            }),
            key_idx: None,
        }
    }

    fn packet(d: &Vp8Descriptor) -> Vec<u8> {
        let mut p = vec![0; d.encoded_len()];
        d.write(&mut p).unwrap();
        p.extend_from_slice(&BODY);
        p
    }

    use PictureIdWidth::{Bits15, Bits7};

    #[test]
    fn descriptor_round_trips() {
        let cases: [&[u8]; 9] = [
            &[0x10],
            &[0x90, 0x00],
            &[0x90, 0x80, 0x23],
            &[0x90, 0x80, 0x81, 0x23],
            &[0xb0, 0xe0, 0xff, 0xff, 0x05, 0x60],
            &[0x90, 0xf0, 0x92, 0x34, 0x55, 0xa7],
            &[0x83, 0x10, 0x1f],
            &[0xa1, 0x30, 0xc5],
            &[0x90, 0x60, 0x07, 0x40],
        ];
        for bytes in cases {
            let p = [bytes, &BODY[..]].concat();
            let d = Vp8Descriptor::parse(&p).unwrap();
            assert_eq!(d.encoded_len(), bytes.len(), "{bytes:02x?}");
            let mut out = [0u8; 6];
            assert_eq!(d.write(&mut out), Ok(bytes.len()));
            assert_eq!(&out[..bytes.len()], bytes);
        }
        let d = Vp8Descriptor::parse(&[0xb0, 0xf0, 0x92, 0x34, 0x55, 0xa7, 0x00]).unwrap();
        assert!(d.non_reference && d.start_of_partition && d.starts_frame());
        assert_eq!(
            d.picture_id,
            Some(PictureId {
                value: 0x1234,
                width: Bits15
            })
        );
        assert_eq!(d.tl0_pic_idx, Some(0x55));
        assert_eq!(
            d.temporal,
            Some(TemporalLayer {
                tid: 2,
                layer_sync: true
            })
        );
        assert_eq!(d.key_idx, Some(7));
    }

    #[test]
    fn descriptor_rejects_truncation_and_l_without_t() {
        assert_eq!(Vp8Descriptor::parse(&[]), Err(Vp8Error::ShortPayload));
        assert_eq!(Vp8Descriptor::parse(&[0x10]), Err(Vp8Error::ShortPayload));
        assert_eq!(Vp8Descriptor::parse(&[0x90]), Err(Vp8Error::ShortPayload));
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0x80, 0x81]),
            Err(Vp8Error::ShortPayload)
        );
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0x80, 0x81, 0x00]),
            Err(Vp8Error::ShortPayload),
            "nothing after the descriptor"
        );
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0x40, 0x07, 0x00]),
            Err(Vp8Error::Malformed)
        );
    }

    #[test]
    fn keyframe_size_reads_the_frame_header() {
        // 7-bit PictureID, then a 1280x720 keyframe header.
        let p = [
            0x90, 0x80, 0x05, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x00, 0x05, 0xd0, 0x02,
        ];
        assert_eq!(keyframe_size(&p), Some((1280, 720)));
        // Scaling bits are not part of the size.
        let p = [
            0x10, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0xc1, 0xb4, 0x80,
        ];
        assert_eq!(keyframe_size(&p), Some((320, 180)));
        // A delta frame, a continuation, a cut header.
        assert_eq!(
            keyframe_size(&[0x10, 0x51, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0, 5, 0xd0, 2]),
            None
        );
        assert_eq!(
            keyframe_size(&[0x00, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0, 5, 0xd0, 2]),
            None
        );
        assert_eq!(
            keyframe_size(&[0x10, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0, 5, 0xd0]),
            None
        );
    }

    /// A simulated VP8 source: one packet per frame, every frame on TL0, a keyframe to start.
    struct Source {
        ssrc: u32,
        pid: u16,
        width: PictureIdWidth,
        tl0: u8,
    }

    impl Source {
        fn next(&mut self) -> Vp8Descriptor {
            let d = desc(Some((self.pid, self.width)), Some(self.tl0), Some(0));
            self.pid = (self.pid + 1) % self.width.modulus();
            self.tl0 = self.tl0.wrapping_add(1);
            d
        }
    }

    fn out_of(r: &Vp8Rewrite) -> (u16, u8) {
        (r.picture_id().unwrap(), r.tl0_pic_idx().unwrap())
    }

    #[test]
    fn first_source_passes_through_unchanged() {
        let mut rw = Vp8Rewriter::new();
        let mut a = Source {
            ssrc: 1,
            pid: 32_760,
            width: Bits15,
            tl0: 250,
        };
        for _ in 0..20 {
            let d = a.next();
            let r = rw.rewrite(a.ssrc, &d);
            assert!(r.is_unchanged() && r.in_place());
        }
    }

    #[test]
    fn picture_id_and_tl0_continue_across_a_switch() {
        let mut rw = Vp8Rewriter::new();
        let mut high = Source {
            ssrc: 0x41,
            pid: 32_760,
            width: Bits15,
            tl0: 250,
        };
        let mut last = (0, 0);
        for _ in 0..10 {
            last = out_of(&rw.rewrite(high.ssrc, &high.next()));
        }
        // Wrapped through 32767 -> 0 and 255 -> 0 on the way.
        assert_eq!(last, (1, 3));
        let mut low = Source {
            ssrc: 0x40,
            pid: 9_000,
            width: Bits15,
            tl0: 77,
        };
        for i in 1..=40u16 {
            let r = rw.rewrite(low.ssrc, &low.next());
            assert!(r.in_place());
            assert_eq!(out_of(&r), (last.0 + i, last.1.wrapping_add(i as u8)));
        }
        // And back to high (which went on meanwhile).
        for _ in 0..40 {
            high.next();
        }
        let r = rw.rewrite(high.ssrc, &high.next());
        assert_eq!(out_of(&r), (last.0 + 41, last.1 + 41));
    }

    #[test]
    fn several_packets_of_one_picture_keep_one_id_and_loss_stays_a_gap() {
        let mut rw = Vp8Rewriter::new();
        let first = rw.rewrite(1, &desc(Some((100, Bits15)), Some(10), Some(0)));
        assert_eq!(out_of(&first), (100, 10));
        let switch = rw.rewrite(2, &desc(Some((5000, Bits15)), Some(200), Some(0)));
        assert_eq!(out_of(&switch), (101, 11));
        // The keyframe's second packet (S=0): same picture.
        let mut cont = desc(Some((5000, Bits15)), Some(200), Some(0));
        cont.start_of_partition = false;
        assert_eq!(out_of(&rw.rewrite(2, &cont)), (101, 11));
        // Picture 5001 (TID 1) lost upstream; 5002 on TL0 arrives, then 5001 late.
        assert_eq!(
            out_of(&rw.rewrite(2, &desc(Some((5002, Bits15)), Some(201), Some(0)))),
            (103, 12)
        );
        assert_eq!(
            out_of(&rw.rewrite(2, &desc(Some((5001, Bits15)), Some(200), Some(1)))),
            (102, 11)
        );
    }

    #[test]
    fn switch_from_7_bit_to_15_bit_source_resizes_and_stays_continuous() {
        let mut rw = Vp8Rewriter::new();
        let mut a = Source {
            ssrc: 1,
            pid: 120,
            width: Bits7,
            tl0: 0,
        };
        let mut last = (0, 0);
        for _ in 0..12 {
            let r = rw.rewrite(a.ssrc, &a.next());
            assert!(r.is_unchanged());
            last = out_of(&r);
        }
        assert_eq!(last.0, 3, "wrapped 127 -> 0");
        let mut b = Source {
            ssrc: 2,
            pid: 20_000,
            width: Bits15,
            tl0: 9,
        };
        for i in 1..=200u16 {
            let d = b.next();
            let r = rw.rewrite(b.ssrc, &d);
            assert!(!r.in_place(), "the subscriber's stream stays 7-bit");
            let src = packet(&d);
            let mut buf = [0u8; 16];
            let n = r.write(&src, &mut buf).unwrap();
            assert_eq!(n, src.len() - 1);
            let out = Vp8Descriptor::parse(&buf[..n]).unwrap();
            assert_eq!(
                out.picture_id,
                Some(PictureId {
                    value: (last.0 + i) % 128,
                    width: Bits7
                })
            );
            assert_eq!(out.tl0_pic_idx, Some(last.1.wrapping_add(i as u8)));
            assert_eq!(&buf[out.encoded_len()..n], &BODY);
            let mut in_place = src.clone();
            assert_eq!(r.apply_in_place(&mut in_place), Err(Vp8Error::NotInPlace));
        }
    }

    #[test]
    fn switch_from_15_bit_to_7_bit_source_widens() {
        let mut rw = Vp8Rewriter::new();
        let a = desc(Some((32_767, Bits15)), Some(255), Some(0));
        assert_eq!(out_of(&rw.rewrite(1, &a)), (32_767, 255));
        let mut b = Source {
            ssrc: 2,
            pid: 126,
            width: Bits7,
            tl0: 3,
        };
        for i in 0..300u32 {
            let d = b.next();
            let r = rw.rewrite(2, &d);
            let src = packet(&d);
            let mut buf = [0u8; 16];
            let n = r.write(&src, &mut buf).unwrap();
            assert_eq!(n, src.len() + 1);
            let out = Vp8Descriptor::parse(&buf[..n]).unwrap();
            let pid = out.picture_id.unwrap();
            assert_eq!(pid.width, Bits15);
            assert_eq!(
                u32::from(pid.value),
                i % 32_768,
                "32767 + 1 + i, modulo 2^15"
            );
            assert_eq!(out.tl0_pic_idx, Some(i as u8));
        }
    }

    #[test]
    fn key_idx_advances_at_a_switch_and_tid_passes_through() {
        let mut rw = Vp8Rewriter::new();
        let mut d = desc(Some((1, Bits15)), Some(1), Some(2));
        d.key_idx = Some(31);
        d.temporal = Some(TemporalLayer {
            tid: 2,
            layer_sync: true,
        });
        assert_eq!(rw.rewrite(1, &d).key_idx(), Some(31));
        let mut e = d;
        e.key_idx = Some(4);
        let r = rw.rewrite(2, &e);
        assert_eq!(r.key_idx(), Some(0), "31 + 1 wraps in 5 bits");
        assert_eq!(r.descriptor().temporal, d.temporal);
        e.key_idx = Some(5);
        assert_eq!(rw.rewrite(2, &e).key_idx(), Some(1));
    }

    #[test]
    fn resync_on_the_same_ssrc_continues_without_a_jump() {
        let mut rw = Vp8Rewriter::new();
        let mut a = Source {
            ssrc: 1,
            pid: 10,
            width: Bits15,
            tl0: 10,
        };
        let last = out_of(&rw.rewrite(1, &a.next()));
        for _ in 0..500 {
            a.next(); // dropped while paused
        }
        rw.resync();
        assert_eq!(out_of(&rw.rewrite(1, &a.next())), (last.0 + 1, last.1 + 1));
    }

    #[test]
    fn apply_in_place_matches_write_and_checks_the_payload() {
        let mut rw = Vp8Rewriter::new();
        rw.rewrite(1, &desc(Some((500, Bits15)), Some(40), Some(0)));
        let d = desc(Some((7, Bits15)), Some(3), Some(0));
        let r = rw.rewrite(2, &d);
        let src = packet(&d);
        let mut patched = src.clone();
        r.apply_in_place(&mut patched).unwrap();
        let mut written = [0u8; 16];
        let n = r.write(&src, &mut written).unwrap();
        assert_eq!(&written[..n], &patched[..]);
        assert_eq!(
            Vp8Descriptor::parse(&patched)
                .unwrap()
                .picture_id
                .unwrap()
                .value,
            501
        );
        // Another packet's bytes are refused.
        let other = packet(&desc(Some((8, Bits15)), Some(3), Some(0)));
        assert_eq!(
            r.apply_in_place(&mut other.clone()),
            Err(Vp8Error::Mismatch)
        );
        assert_eq!(r.write(&src, &mut [0u8; 4]), Err(Vp8Error::BufferTooSmall));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rng = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0;
        let mut data = [0u8; 64 * 14];
        for _ in 0..5_000 {
            // 64 packets of 0 to 11 bytes, half of them extended so the deep paths run.
            let mut at = 0;
            for _ in 0..64 {
                let len = (rng() % 12) as usize;
                data[at] = len as u8;
                data[at + 1] = rng() as u8;
                let packet = &mut data[at + 2..at + 2 + len];
                for b in packet.iter_mut() {
                    *b = rng() as u8;
                }
                if len > 0 && rng() % 2 == 0 {
                    packet[0] |= 0x80;
                }
                parsed += usize::from(Vp8Descriptor::parse(packet).is_ok());
                at += 2 + len;
            }
            fuzz_vp8(&data[..at]);
        }
        assert!(
            parsed > 100_000,
            "the parser's success paths are reached: {parsed}"
        );
        // Truncated input and lengths running past the end.
        fuzz_vp8(&[]);
        fuzz_vp8(&[9]);
        fuzz_vp8(&[200, 1, 0x90, 0xe0, 0x81]);
    }
}
