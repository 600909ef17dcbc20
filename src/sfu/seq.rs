//! Extending RTP's wrapping counters (16-bit sequence numbers, 32-bit timestamps) into
//! monotonic `u64` values, tolerant of reordering within half the counter's range.
//!
//! The first value seen is placed at roll-over count 1 (`2^16 + seq`, `2^32 + ts`), not 0, so a
//! packet reordered to before the first one still has a representable extended value. Compare
//! extended values with each other; never compare them with raw wire values.

/// Shared logic: extend an `N`-bit counter (`N` = 16 or 32) to `u64`.
///
/// A value within half the range ahead of the highest seen moves forward (crossing a wrap if it
/// must); anything else is taken as older (reordered) and maps behind the highest without
/// moving it. Exactly half the range ahead counts as behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extender<const BITS: u32> {
    highest: Option<u64>,
}

impl<const BITS: u32> Extender<BITS> {
    const RANGE: u64 = 1 << BITS;
    const MASK: u64 = Self::RANGE - 1;
    const HALF: u64 = Self::RANGE / 2;

    const fn new() -> Self {
        Self { highest: None }
    }

    fn extend(&mut self, value: u64) -> u64 {
        let value = value & Self::MASK;
        let Some(highest) = self.highest else {
            let first = Self::RANGE + value;
            self.highest = Some(first);
            return first;
        };
        let ahead = value.wrapping_sub(highest) & Self::MASK;
        if ahead == 0 {
            highest
        } else if ahead < Self::HALF {
            let extended = highest + ahead;
            self.highest = Some(extended);
            extended
        } else {
            // Behind by RANGE - ahead, which is at most HALF. The highest value starts at
            // RANGE or above and only grows, so this never goes below RANGE - HALF.
            highest - (Self::RANGE - ahead)
        }
    }
}

/// Extends 16-bit RTP sequence numbers to monotonic `u64` values.
///
/// Reordering within ±2^15 of the highest sequence number seen is resolved correctly across the
/// 65535 → 0 wrap. Older packets do not move the highest value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqUnwrapper {
    inner: Extender<16>,
}

impl SeqUnwrapper {
    /// An unwrapper that has seen nothing yet.
    pub const fn new() -> Self {
        Self {
            inner: Extender::new(),
        }
    }

    /// The extended value of `seq`, remembering it if it is the newest so far.
    pub fn extend(&mut self, seq: u16) -> u64 {
        self.inner.extend(u64::from(seq))
    }

    /// The highest extended sequence number seen, if any.
    pub fn highest(&self) -> Option<u64> {
        self.inner.highest
    }
}

impl Default for SeqUnwrapper {
    fn default() -> Self {
        Self::new()
    }
}

/// Extends 32-bit RTP timestamps to monotonic `u64` values.
///
/// Reordering within ±2^31 ticks of the highest timestamp seen is resolved correctly across the
/// `u32::MAX` → 0 wrap (at 90 kHz that is about 6.6 hours each way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TsUnwrapper {
    inner: Extender<32>,
}

impl TsUnwrapper {
    /// An unwrapper that has seen nothing yet.
    pub const fn new() -> Self {
        Self {
            inner: Extender::new(),
        }
    }

    /// The extended value of `ts`, remembering it if it is the newest so far.
    pub fn extend(&mut self, ts: u32) -> u64 {
        self.inner.extend(u64::from(ts))
    }

    /// The highest extended timestamp seen, if any.
    pub fn highest(&self) -> Option<u64> {
        self.inner.highest
    }
}

impl Default for TsUnwrapper {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R16: u64 = 1 << 16;
    const R32: u64 = 1 << 32;

    #[test]
    fn first_seq_is_placed_at_rollover_one() {
        let mut u = SeqUnwrapper::new();
        assert_eq!(u.highest(), None);
        assert_eq!(u.extend(7), R16 + 7);
        assert_eq!(u.highest(), Some(R16 + 7));
    }

    #[test]
    fn seq_crosses_65535_to_0_forward() {
        let mut u = SeqUnwrapper::new();
        let a = u.extend(65534);
        assert_eq!(u.extend(65535), a + 1);
        assert_eq!(u.extend(0), a + 2);
        assert_eq!(u.extend(1), a + 3);
        assert_eq!(u.highest(), Some(a + 3));
    }

    #[test]
    fn seq_reordered_around_the_wrap_maps_to_the_right_side() {
        let mut u = SeqUnwrapper::new();
        let a = u.extend(65533);
        // Arrival order: 65533, 0, 65535, 2, 65534, 1
        assert_eq!(u.extend(0), a + 3);
        assert_eq!(u.extend(65535), a + 2);
        assert_eq!(u.extend(2), a + 5);
        assert_eq!(u.extend(65534), a + 1);
        assert_eq!(u.extend(1), a + 4);
        assert_eq!(
            u.highest(),
            Some(a + 5),
            "older packets do not move the highest"
        );
    }

    #[test]
    fn seq_reordered_before_the_first_packet_is_representable() {
        let mut u = SeqUnwrapper::new();
        let a = u.extend(3);
        assert_eq!(u.extend(65530), a - 9);
        assert_eq!(u.extend(2), a - 1);
        assert_eq!(u.highest(), Some(a));
    }

    #[test]
    fn seq_duplicate_maps_to_the_same_value() {
        let mut u = SeqUnwrapper::new();
        let a = u.extend(100);
        assert_eq!(u.extend(100), a);
        assert_eq!(u.extend(101), a + 1);
        assert_eq!(u.extend(100), a);
    }

    #[test]
    fn seq_half_range_boundary() {
        let mut u = SeqUnwrapper::new();
        let a = u.extend(0);
        // 2^15 - 1 ahead: forward.
        assert_eq!(u.extend(32767), a + 32767);
        // Exactly 2^15 ahead of the highest (32767 + 32768 = 65535): taken as behind.
        assert_eq!(u.extend(65535), a + 32767 - 32768);
        assert_eq!(u.highest(), Some(a + 32767));
    }

    #[test]
    fn seq_stays_monotonic_over_many_wraps() {
        let mut u = SeqUnwrapper::new();
        let mut seq: u16 = 40_000;
        let first = u.extend(seq);
        for i in 1..=300_000u64 {
            seq = seq.wrapping_add(1);
            assert_eq!(u.extend(seq), first + i);
        }
    }

    #[test]
    fn ts_crosses_u32_max_to_0_forward() {
        let mut u = TsUnwrapper::new();
        let a = u.extend(u32::MAX - 1);
        assert_eq!(a, R32 + u64::from(u32::MAX - 1));
        assert_eq!(u.extend(u32::MAX), a + 1);
        assert_eq!(u.extend(0), a + 2);
        assert_eq!(u.extend(2999), a + 3001);
    }

    #[test]
    fn ts_reordered_around_the_wrap_maps_to_the_right_side() {
        let mut u = TsUnwrapper::new();
        let a = u.extend(u32::MAX - 2999);
        assert_eq!(u.extend(3000), a + 6000);
        assert_eq!(u.extend(u32::MAX), a + 2999);
        assert_eq!(u.extend(0), a + 3000);
        assert_eq!(u.highest(), Some(a + 6000));
    }

    #[test]
    fn ts_large_forward_jump_within_half_range() {
        let mut u = TsUnwrapper::new();
        let a = u.extend(10);
        let jump = (1u32 << 31) - 1;
        assert_eq!(u.extend(10 + jump), a + u64::from(jump));
        // Going back the same amount is still a valid reorder.
        assert_eq!(u.extend(11), a + 1);
    }
}
