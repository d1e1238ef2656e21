//! Capped exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based): uniformly random in
    /// `[d/2, d]` where `d = min(cap, base * 2^attempt)`. Half-jitter keeps a
    /// floor so retries never spin, and spreads them so they never stampede.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap).max(Duration::from_millis(1));
        let ceiling_us = ceiling.as_micros() as u64;
        Duration::from_micros(rng.random_range(ceiling_us / 2..=ceiling_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_stay_under_the_cap() {
        let backoff = Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(500) };
        let mut rng = rand::rng();
        for attempt in 0..64 {
            let d = backoff.delay(attempt, &mut rng);
            let ceiling = Duration::from_millis(10 * (1u64 << attempt.min(20))).min(backoff.cap);
            assert!(d <= ceiling && d >= ceiling / 2, "attempt {attempt}: {d:?} vs {ceiling:?}");
        }
    }
}
