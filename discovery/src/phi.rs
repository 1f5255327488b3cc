//! Phi accrual failure detection (Hayashibara et al.), with the exponential approximation
//! Cassandra and chitchat use: phi = elapsed / mean_interval * log10(e).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const WINDOW: usize = 64;

/// Tracks heartbeat arrivals of one member.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    last: Instant,
    intervals: VecDeque<f64>,
    /// Assumed mean before enough arrivals are seen, and the floor of the mean, so a burst
    /// of fast arrivals does not make the detector hair-trigger.
    min_mean: f64,
}

impl PhiDetector {
    /// A detector that last heard the member at `now`.
    pub fn new(now: Instant, min_mean: Duration) -> Self {
        Self {
            last: now,
            intervals: VecDeque::with_capacity(WINDOW),
            min_mean: min_mean.as_secs_f64(),
        }
    }

    /// Records a heartbeat arrival.
    pub fn heartbeat(&mut self, now: Instant) {
        // A gap after a partition or restart says nothing about the usual interval; left
        // whole it would inflate the mean (and slow detection) for the next 64 beats.
        let gap = now
            .saturating_duration_since(self.last)
            .as_secs_f64()
            .min(self.mean() * 2.0);
        if self.intervals.len() == WINDOW {
            self.intervals.pop_front();
        }
        self.intervals.push_back(gap);
        self.last = now;
    }

    /// Suspicion level at `now`; 1 means a 10% chance the member is still alive, 2 1%, ...
    pub fn phi(&self, now: Instant) -> f64 {
        let mean = self.mean();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        elapsed / mean * std::f64::consts::LOG10_E
    }

    /// Mean heartbeat interval, floored (see `min_mean`).
    fn mean(&self) -> f64 {
        if self.intervals.is_empty() {
            self.min_mean
        } else {
            (self.intervals.iter().sum::<f64>() / self.intervals.len() as f64).max(self.min_mean)
        }
    }

    /// When the last heartbeat arrived.
    pub fn last_heard(&self) -> Instant {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_grows_with_silence_relative_to_the_usual_interval() {
        let t0 = Instant::now();
        let mut d = PhiDetector::new(t0, Duration::from_millis(50));
        for i in 1..=20 {
            d.heartbeat(t0 + Duration::from_millis(100 * i));
        }
        let last = t0 + Duration::from_millis(2000);
        assert!(d.phi(last + Duration::from_millis(50)) < 1.0);
        let at_1s = d.phi(last + Duration::from_secs(1));
        assert!(
            (at_1s - 10.0 * std::f64::consts::LOG10_E).abs() < 0.01,
            "{at_1s}"
        );
        assert!(d.phi(last + Duration::from_secs(2)) > at_1s);
    }

    #[test]
    fn one_long_gap_does_not_blunt_detection() {
        let t0 = Instant::now();
        let mut d = PhiDetector::new(t0, Duration::from_millis(100));
        let mut now = t0;
        for _ in 0..10 {
            now += Duration::from_millis(100);
            d.heartbeat(now);
        }
        now += Duration::from_secs(30); // a partition heals
        d.heartbeat(now);
        assert!(
            d.phi(now + Duration::from_secs(2)) > 5.0,
            "2 s of silence is still alarming: {}",
            d.phi(now + Duration::from_secs(2))
        );
    }

    #[test]
    fn mean_is_floored() {
        let t0 = Instant::now();
        let mut d = PhiDetector::new(t0, Duration::from_millis(100));
        for i in 1..=10 {
            d.heartbeat(t0 + Duration::from_millis(i));
        }
        let phi = d.phi(t0 + Duration::from_millis(110));
        assert!(
            phi < 1.0,
            "a burst of 1 ms arrivals must not make 100 ms of silence alarming: {phi}"
        );
    }
}
