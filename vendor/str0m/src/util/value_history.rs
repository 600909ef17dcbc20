use std::collections::VecDeque;
use std::iter::Sum;
use std::ops::{AddAssign, SubAssign};
use std::time::{Duration, Instant};

/// Holds a history values of type T for up to a certain Duration, as well as the
/// cumulated (total) value.
#[derive(Debug)]
pub(crate) struct ValueHistory<T> {
    value: T,
    history: VecDeque<(Instant, T)>,
    max_time: Duration,
    /// sluice: values pushed less than this after the newest entry are added to it, so the
    /// history holds about `max_time / resolution` entries however many values arrive, and each
    /// entry leaves up to `resolution` early. Zero (the default) keeps every value apart.
    resolution: Duration,
}

const DEFAULT_VALUE_HISTORY_DURATION: Duration = Duration::from_secs(1);

impl<T: Default> Default for ValueHistory<T> {
    fn default() -> Self {
        Self {
            value: Default::default(),
            history: Default::default(),
            max_time: DEFAULT_VALUE_HISTORY_DURATION,
            resolution: Duration::ZERO,
        }
    }
}

impl<T: Default> ValueHistory<T> {
    /// sluice: a history whose values within `resolution` of the newest entry share it.
    pub fn with_resolution(resolution: Duration) -> Self {
        Self {
            resolution,
            ..Default::default()
        }
    }
}

impl<T> ValueHistory<T>
where
    T: Copy + AddAssign + SubAssign + Sum,
{
    /// Adds a timed value
    /// Note: time should always monotonically increase in subsequent calls to add()
    pub fn push(&mut self, t: Instant, v: T) {
        self.value += v;
        if let Some((newest, sum)) = self.history.back_mut() {
            if t.saturating_duration_since(*newest) < self.resolution {
                *sum += v;
                return;
            }
        }
        self.history.push_back((t, v));
    }

    /// Returns the sum of all values in the history up to max_time. Might
    /// return stale value unless [`ValueHistory::purge_old`] is called before.
    pub fn sum(&self) -> T {
        self.value
    }

    /// Recalculates sum purging values older than `now - max_time`.
    pub fn purge_old(&mut self, now: Instant) {
        while {
            let Some(front_t) = self.history.front().map(|v| v.0) else {
                return;
            };
            now.duration_since(front_t) > self.max_time
        } {
            if let Some((_, v)) = self.history.pop_front() {
                self.value -= v;
            }
        }
    }
}

#[allow(clippy::unchecked_time_subtraction)]
#[cfg(test)]
mod test {
    use std::time::{Duration, Instant};

    use super::ValueHistory;

    #[test]
    fn with_value_test() {
        let now = Instant::now();

        let mut h = ValueHistory {
            value: 11,
            max_time: Duration::from_secs(1),
            ..Default::default()
        };

        assert_eq!(h.sum(), 11);
        h.purge_old(now);
        assert_eq!(h.sum(), 11);
        h.push(now - Duration::from_millis(1500), 22);
        h.push(now - Duration::from_millis(500), 22);
        assert_eq!(h.sum(), 11 + 22 + 22);
        h.purge_old(now);
        assert_eq!(h.sum(), 11 + 22);
        h.push(now, 0);
        assert_eq!(h.sum(), 11 + 22);
    }

    #[test]
    fn test() {
        let now = Instant::now();
        let mut h = ValueHistory::default();

        assert_eq!(h.sum(), 0);
        h.push(now - Duration::from_millis(1500), 22);
        assert_eq!(h.sum(), 22);
        h.purge_old(now);
        assert_eq!(h.sum(), 0);
        h.push(now - Duration::from_millis(700), 22);
        h.push(now - Duration::from_millis(500), 33);
        assert_eq!(h.sum(), 22 + 33);
        h.purge_old(now);
        assert_eq!(h.sum(), 22 + 33);

        h.purge_old(now + Duration::from_millis(400));
        assert_eq!(h.sum(), 33);
        h.purge_old(now + Duration::from_millis(600));
        assert_eq!(h.sum(), 0);
    }

    #[test]
    fn values_within_the_resolution_share_an_entry() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut h = ValueHistory::with_resolution(ms(50));

        // A value every 10 ms for a second: one entry per 50 ms, not one per value.
        for i in 0..100 {
            h.push(now + ms(i * 10), 1_u64);
        }
        assert_eq!(h.sum(), 100);
        assert_eq!(h.history.len(), 20);

        // An entry leaves with its first value's time: at 1.001 s the one begun at 0 ms is
        // older than a second, and its five values go, although those pushed at 10 to 40 ms are
        // not.
        h.purge_old(now + ms(1_000));
        assert_eq!(h.sum(), 100);
        h.purge_old(now + ms(1_001));
        assert_eq!(h.sum(), 95);
        assert_eq!(h.history.len(), 19);

        // A gap longer than the resolution starts a new entry; so does an equal one.
        h.push(now + ms(2_000), 7);
        h.push(now + ms(2_050), 3);
        assert_eq!(h.history.len(), 21);
        h.purge_old(now + ms(3_001));
        assert_eq!(h.sum(), 3);
    }

    #[test]
    fn without_a_resolution_every_value_has_its_entry() {
        let now = Instant::now();
        let mut h = ValueHistory::default();
        for _ in 0..3 {
            h.push(now, 1_u64);
        }
        assert_eq!(h.history.len(), 3);
    }
}
