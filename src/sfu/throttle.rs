//! Keyframe request throttling, one per publisher track: many subscribers asking for a
//! keyframe at once must cost the publisher one PLI, not one each, and no request may be lost.

use std::time::{Duration, Instant};

/// Rate-limits keyframe requests (PLI/FIR) towards one publisher track.
///
/// At most one request goes out per `min_interval`. A request that arrives sooner is not
/// dropped: it is held, and requests held together are coalesced into the single one that goes
/// out when the interval has passed.
///
/// # Call-order contract
///
/// 1. On every keyframe need (a subscriber's PLI/FIR, a new subscriber, a forwarder whose
///    [`needs_keyframe`](super::Forwarder::needs_keyframe) turned true), call
///    [`request`](Self::request); if it returns `true`, send one PLI now.
/// 2. Whenever [`next_due`](Self::next_due) is `Some(t)`, keep `t` in the timer heap; when the
///    timer fires (or on any later turn), call [`poll`](Self::poll); if it returns `true`, send
///    one PLI now. `next_due` changes only after `request` or `poll`, so re-read it after them.
/// 3. `now` never goes backwards between calls. Nothing here reads a clock.
///
/// Counters: every request is either sent, coalesced, or (at most one) still held, so
/// `requests == sent() + coalesced() + next_due().is_some() as u64`.
#[derive(Debug, Clone)]
pub struct KeyframeThrottle {
    min_interval: Duration,
    last_sent: Option<Instant>,
    held: bool,
    sent: u64,
    coalesced: u64,
}

impl KeyframeThrottle {
    /// A throttle that sends at most one request per `min_interval` (zero: never throttles).
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            last_sent: None,
            held: false,
            sent: 0,
            coalesced: 0,
        }
    }

    /// Registers a keyframe request; `true` means send a PLI now.
    ///
    /// `false` means the request is held (or merged into the one already held) and will come
    /// out of [`poll`](Self::poll) at [`next_due`](Self::next_due).
    pub fn request(&mut self, now: Instant) -> bool {
        if self.is_open(now) {
            if self.held {
                // The held request is answered by this send too.
                self.held = false;
                self.coalesced += 1;
            }
            self.send(now);
            true
        } else {
            if self.held {
                self.coalesced += 1;
            }
            self.held = true;
            false
        }
    }

    /// `true` when a held request is due: send a PLI now.
    pub fn poll(&mut self, now: Instant) -> bool {
        if self.held && self.is_open(now) {
            self.held = false;
            self.send(now);
            true
        } else {
            false
        }
    }

    /// When a held request becomes due, for the timer heap; `None` when nothing is held.
    pub fn next_due(&self) -> Option<Instant> {
        if !self.held {
            return None;
        }
        // A request is only held after a send, so `last_sent` is set.
        self.last_sent
            .map(|t| t.checked_add(self.min_interval).unwrap_or(t))
    }

    /// Requests that went out (each one PLI).
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Requests merged into another one instead of going out on their own.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    fn is_open(&self, now: Instant) -> bool {
        match self.last_sent {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= self.min_interval,
        }
    }

    fn send(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.sent += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_request_is_sent_immediately() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(ms(500));
        assert_eq!(k.next_due(), None);
        assert!(k.request(t0));
        assert_eq!(k.next_due(), None);
        assert_eq!((k.sent(), k.coalesced()), (1, 0));
    }

    #[test]
    fn burst_of_ten_in_100ms_sends_one_now_and_one_later() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(ms(500));
        let mut sent_now = 0;
        for i in 0..10 {
            sent_now += usize::from(k.request(t0 + ms(i * 10)));
        }
        assert_eq!(sent_now, 1);
        assert_eq!(k.next_due(), Some(t0 + ms(500)));

        // Nothing before it is due.
        assert!(!k.poll(t0 + ms(100)));
        assert!(!k.poll(t0 + ms(499)));
        // The held request comes out exactly once.
        assert!(k.poll(t0 + ms(500)));
        assert!(!k.poll(t0 + ms(501)));
        assert_eq!(k.next_due(), None);

        assert_eq!(k.sent(), 2);
        assert_eq!(k.coalesced(), 8);
        assert_eq!(k.sent() + k.coalesced(), 10, "no request lost");
    }

    #[test]
    fn late_poll_still_sends_the_held_request() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(ms(500));
        assert!(k.request(t0));
        assert!(!k.request(t0 + ms(1)));
        // The shard was busy; the timer is serviced late.
        assert!(k.poll(t0 + ms(2_000)));
        // The next window starts from the actual send.
        assert!(!k.request(t0 + ms(2_100)));
        assert_eq!(k.next_due(), Some(t0 + ms(2_500)));
    }

    #[test]
    fn request_after_the_interval_is_sent_immediately() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(ms(500));
        assert!(k.request(t0));
        assert!(k.request(t0 + ms(500)));
        assert!(k.request(t0 + ms(1_200)));
        assert_eq!((k.sent(), k.coalesced()), (3, 0));
    }

    #[test]
    fn request_when_held_one_is_due_sends_once_for_both() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(ms(500));
        assert!(k.request(t0));
        assert!(!k.request(t0 + ms(100)));
        // Due at 500 but not polled yet; a new request arrives at 600.
        assert!(k.request(t0 + ms(600)));
        assert_eq!(k.next_due(), None);
        assert!(!k.poll(t0 + ms(700)));
        assert_eq!((k.sent(), k.coalesced()), (2, 1));
    }

    #[test]
    fn poll_without_a_held_request_sends_nothing() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(ms(500));
        assert!(!k.poll(t0));
        assert!(k.request(t0));
        assert!(!k.poll(t0 + ms(10_000)));
        assert_eq!(k.sent(), 1);
    }

    #[test]
    fn zero_interval_never_throttles() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(Duration::ZERO);
        for _ in 0..5 {
            assert!(k.request(t0));
        }
        assert_eq!(k.next_due(), None);
        assert_eq!((k.sent(), k.coalesced()), (5, 0));
    }

    #[test]
    fn time_going_backwards_holds_instead_of_panicking() {
        let t0 = Instant::now() + ms(1_000);
        let mut k = KeyframeThrottle::new(ms(500));
        assert!(k.request(t0));
        assert!(!k.request(t0 - ms(100)));
        assert!(!k.poll(t0 - ms(200)));
        assert!(k.poll(t0 + ms(500)));
    }
}
