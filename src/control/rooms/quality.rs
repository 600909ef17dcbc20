//! The connection-quality hint of one participant: its loss and round-trip time reduced to four
//! levels, worse news at once and better news only when it holds for two reports in a row, so
//! the hint does not flap.

use super::protocol::Quality;

/// Loss fraction (0..1) and RTT in milliseconds to a level.
///
/// | quality | loss | RTT |
/// |---|---|---|
/// | excellent | < 2 % | < 150 ms |
/// | good | < 8 % | < 300 ms |
/// | poor | < 30 % | any |
/// | lost | >= 30 % | any |
pub fn classify(loss: f32, rtt_ms: u32) -> Quality {
    let loss = if loss.is_finite() {
        loss.clamp(0.0, 1.0)
    } else {
        1.0
    };
    if loss < 0.02 && rtt_ms < 150 {
        Quality::Excellent
    } else if loss < 0.08 && rtt_ms < 300 {
        Quality::Good
    } else if loss < 0.30 {
        Quality::Poor
    } else {
        Quality::Lost
    }
}

#[derive(Debug, Clone, Default)]
pub struct QualityHint {
    current: Option<Quality>,
    /// A better level seen once, waiting for a second report to confirm it.
    rising: Option<Quality>,
}

impl QualityHint {
    pub fn current(&self) -> Option<Quality> {
        self.current
    }

    /// Take one report; `Some` when the hint changes (and should be announced).
    pub fn observe(&mut self, loss: f32, rtt_ms: u32) -> Option<Quality> {
        let seen = classify(loss, rtt_ms);
        let next = match self.current {
            None => seen,
            Some(cur) if seen <= cur => {
                self.rising = None;
                seen
            }
            Some(cur) => match self.rising.take() {
                // Confirmed: rise to the lower of the two better reports.
                Some(prev) => prev.min(seen),
                None => {
                    self.rising = Some(seen);
                    cur
                }
            },
        };
        if Some(next) == self.current {
            return None;
        }
        self.current = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(classify(0.0, 20), Quality::Excellent);
        assert_eq!(classify(0.03, 20), Quality::Good);
        assert_eq!(classify(0.0, 200), Quality::Good);
        assert_eq!(classify(0.1, 20), Quality::Poor);
        assert_eq!(classify(0.0, 900), Quality::Poor);
        assert_eq!(classify(0.5, 20), Quality::Lost);
        assert_eq!(classify(f32::NAN, 20), Quality::Lost);
    }

    #[test]
    fn drops_at_once_and_rises_after_two_reports() {
        let mut q = QualityHint::default();
        assert_eq!(q.observe(0.0, 50), Some(Quality::Excellent));
        assert_eq!(q.observe(0.0, 50), None);
        assert_eq!(q.observe(0.2, 50), Some(Quality::Poor));
        assert_eq!(q.observe(0.0, 50), None, "one good report is not enough");
        assert_eq!(q.observe(0.2, 50), None, "and a bad one resets it");
        assert_eq!(q.observe(0.0, 50), None);
        assert_eq!(
            q.observe(0.04, 50),
            Some(Quality::Good),
            "the lower of the two"
        );
        assert_eq!(q.current(), Some(Quality::Good));
    }
}
