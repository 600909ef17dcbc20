//! Active-speaker detection for one room: the latest RFC 6464 audio level of each participant,
//! reduced to the loudest three that speak now, announced when that list changes and at most
//! once per interval. Sans-IO: levels and `now` come in, a list comes out.
//!
//! Contract: call [`SpeakerDetector::observe`] with each level report and
//! [`SpeakerDetector::forget`] when a participant leaves; call [`SpeakerDetector::poll`] after
//! either and whenever [`SpeakerDetector::next_deadline`] passes. `poll` returns `Some` only
//! when the list differs from the last one returned, and never twice within `interval`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::protocol::{ParticipantId, Speaker};

/// At most this many speakers are announced.
pub const TOP_SPEAKERS: usize = 3;

#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    /// Minimum time between two announcements (300 ms).
    pub interval: Duration,
    /// A level at or below this many -dBov counts as speech (RFC 6464: 0 is the loudest, 127
    /// silence). Default 50.
    pub threshold_dbov: u8,
    /// A report older than this no longer counts (the sender stopped, e.g. Opus DTX). 1 s.
    pub hold: Duration,
}

impl Default for SpeakerConfig {
    fn default() -> SpeakerConfig {
        SpeakerConfig {
            interval: Duration::from_millis(300),
            threshold_dbov: 50,
            hold: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpeakerDetector {
    config: SpeakerConfig,
    /// Latest report per participant: (-dBov, when).
    levels: BTreeMap<ParticipantId, (u8, Instant)>,
    last_sent: Vec<ParticipantId>,
    last_sent_at: Option<Instant>,
}

/// `10^(-dBov/20)`, rounded to 3 decimals.
pub fn linear_level(dbov: u8) -> f32 {
    let linear = 10f32.powf(-f32::from(dbov.min(127)) / 20.0);
    (linear * 1000.0).round() / 1000.0
}

impl SpeakerDetector {
    pub fn new(config: SpeakerConfig) -> SpeakerDetector {
        SpeakerDetector {
            config,
            levels: BTreeMap::new(),
            last_sent: Vec::new(),
            last_sent_at: None,
        }
    }

    /// A participant's audio level in -dBov (0 loudest, 127 silence) for the last interval.
    pub fn observe(&mut self, participant: ParticipantId, dbov: u8, now: Instant) {
        self.levels.insert(participant, (dbov.min(127), now));
    }

    pub fn forget(&mut self, participant: ParticipantId) {
        self.levels.remove(&participant);
    }

    fn speaking(&self, dbov: u8, seen: Instant, now: Instant) -> bool {
        dbov <= self.config.threshold_dbov && now.saturating_duration_since(seen) < self.config.hold
    }

    /// The loudest speakers now, loudest first (ties: earlier participant first).
    pub fn current(&self, now: Instant) -> Vec<(ParticipantId, u8)> {
        let mut active: Vec<(ParticipantId, u8)> = self
            .levels
            .iter()
            .filter(|(_, &(dbov, seen))| self.speaking(dbov, seen, now))
            .map(|(&p, &(dbov, _))| (p, dbov))
            .collect();
        active.sort_by_key(|&(p, dbov)| (dbov, p));
        active.truncate(TOP_SPEAKERS);
        active
    }

    /// The list to announce now, if it changed and the interval allows.
    pub fn poll(&mut self, now: Instant) -> Option<Vec<Speaker>> {
        if let Some(at) = self.last_sent_at {
            if now.saturating_duration_since(at) < self.config.interval {
                return None;
            }
        }
        let current = self.current(now);
        let ids: Vec<ParticipantId> = current.iter().map(|&(p, _)| p).collect();
        if ids == self.last_sent {
            return None;
        }
        self.last_sent = ids;
        self.last_sent_at = Some(now);
        Some(
            current
                .into_iter()
                .map(|(participant, dbov)| Speaker {
                    participant,
                    level: linear_level(dbov),
                })
                .collect(),
        )
    }

    /// When `poll` may have something new without further input: the end of the interval if
    /// the list already differs, or the moment a counted level goes stale.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let stale = self
            .levels
            .values()
            .filter(|&&(dbov, seen)| self.speaking(dbov, seen, now))
            .map(|&(_, seen)| seen + self.config.hold)
            .min();
        let ids: Vec<ParticipantId> = self.current(now).iter().map(|&(p, _)| p).collect();
        let pending = (ids != self.last_sent).then(|| match self.last_sent_at {
            Some(at) => at + self.config.interval,
            None => now,
        });
        match (stale, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn ids(list: &[Speaker]) -> Vec<u64> {
        list.iter().map(|s| s.participant.0).collect()
    }

    #[test]
    fn top_three_loudest_first() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        for (p, dbov) in [(1, 40), (2, 20), (3, 127), (4, 30), (5, 45), (6, 60)] {
            d.observe(ParticipantId(p), dbov, t0);
        }
        let s = d.poll(t0).unwrap();
        assert_eq!(
            ids(&s),
            [2, 4, 1],
            "5 is fourth, 3 and 6 are below the threshold"
        );
        assert_eq!(s[0].level, 0.1);
        assert_eq!(linear_level(0), 1.0);
        assert_eq!(linear_level(127), 0.0);
    }

    #[test]
    fn at_most_once_per_interval_and_only_on_change() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        d.observe(ParticipantId(1), 30, t0);
        assert_eq!(ids(&d.poll(t0).unwrap()), [1]);
        // Same list: nothing, however often asked.
        d.observe(ParticipantId(1), 25, ms(t0, 100));
        assert_eq!(d.poll(ms(t0, 100)), None);
        // A new loudest speaker 100 ms later waits for the interval.
        d.observe(ParticipantId(2), 10, ms(t0, 100));
        assert_eq!(d.poll(ms(t0, 299)), None);
        assert_eq!(d.next_deadline(ms(t0, 299)), Some(ms(t0, 300)));
        assert_eq!(ids(&d.poll(ms(t0, 300)).unwrap()), [2, 1]);
        assert_eq!(d.poll(ms(t0, 300)), None);
    }

    #[test]
    fn stale_and_forgotten_speakers_drop_out() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::new(SpeakerConfig::default());
        d.observe(ParticipantId(1), 30, t0);
        d.observe(ParticipantId(2), 35, ms(t0, 500));
        assert_eq!(ids(&d.poll(ms(t0, 500)).unwrap()), [1, 2]);
        // 1's report goes stale at 1000 ms.
        assert_eq!(d.next_deadline(ms(t0, 600)), Some(ms(t0, 1000)));
        assert_eq!(ids(&d.poll(ms(t0, 1000)).unwrap()), [2]);
        d.forget(ParticipantId(2));
        assert_eq!(d.poll(ms(t0, 1300)).unwrap(), vec![]);
        assert_eq!(d.next_deadline(ms(t0, 1300)), None);
    }
}
