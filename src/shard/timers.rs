//! A shard's timer heap of peer deadlines, with lazy deletion: a peer's entry counts only while it
//! still matches the deadline the peer holds, so moving a deadline is one push, never a search.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct TimerHeap {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl TimerHeap {
    pub fn schedule(&mut self, at: Instant, key: usize) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry, stale or not.
    pub fn peek(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Pop the next entry due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Drop stale entries when the heap has grown far beyond the live keys.
    pub fn compact(&mut self, live: impl Fn(Instant, usize) -> bool) {
        let entries = std::mem::take(&mut self.heap).into_vec();
        self.heap = entries
            .into_iter()
            .filter(|Reverse((at, key))| live(*at, *key))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.schedule(t0 + Duration::from_millis(30), 3);
        h.schedule(t0 + Duration::from_millis(10), 1);
        h.schedule(t0 + Duration::from_millis(20), 2);
        assert_eq!(h.peek(), Some(t0 + Duration::from_millis(10)));
        assert_eq!(h.pop_due(t0), None);
        let now = t0 + Duration::from_millis(25);
        assert_eq!(h.pop_due(now).map(|e| e.1), Some(1));
        assert_eq!(h.pop_due(now).map(|e| e.1), Some(2));
        assert_eq!(h.pop_due(now), None);
        h.compact(|_, k| k != 3);
        assert_eq!(h.len(), 0);
    }
}
