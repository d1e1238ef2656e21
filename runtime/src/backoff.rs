//! Retry pacing: capped exponential backoff with a choice of jitter, and a
//! per-destination retry budget.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::Rng;

/// How much of a backoff delay is random.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Exactly the exponential delay: retries of many transactions that
    /// failed together stay together.
    None,
    /// Uniform in `[d/2, d]`: a floor so retries never spin, spread so they
    /// never stampede.
    #[default]
    Half,
    /// Uniform in `[0, d]` (with a 1 ms floor): the widest spread.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based): `d = min(cap,
    /// base * 2^attempt)` (at least 1 ms), with the configured jitter.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let exp = self.base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap).max(Duration::from_millis(1));
        let ceiling_us = ceiling.as_micros() as u64;
        let floor_us = match self.jitter {
            Jitter::None => ceiling_us,
            Jitter::Half => ceiling_us / 2,
            Jitter::Full => 1_000,
        };
        Duration::from_micros(rng.random_range(floor_us.min(ceiling_us)..=ceiling_us))
    }
}

/// At most `per_second` retries to each destination, after a burst of as
/// many: however many transactions owe a destination, it sees a bounded rate
/// of retries, never a storm. Retries beyond the budget wait (none is dropped).
pub struct RetryBudget<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> RetryBudget<K> {
    pub fn per_second(per_second: NonZeroU32) -> Self {
        RetryBudget { limiter: RateLimiter::keyed(Quota::per_second(per_second)) }
    }

    /// Takes one retry from `key`'s budget at once if there is one left.
    pub fn try_take(&self, key: &K) -> bool {
        self.limiter.check_key(key).is_ok()
    }

    /// Waits until `key`'s budget has a retry, and takes it.
    pub async fn take(&self, key: &K) {
        self.limiter.until_key_ready(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff { base: Duration::from_millis(10), cap: Duration::from_millis(500), jitter }
    }

    #[test]
    fn delays_grow_then_stay_under_the_cap() {
        let mut rng = rand::rng();
        for jitter in [Jitter::None, Jitter::Half, Jitter::Full] {
            let backoff = backoff(jitter);
            for attempt in 0..64 {
                let d = backoff.delay(attempt, &mut rng);
                let ceiling = Duration::from_millis(10 * (1u64 << attempt.min(20))).min(backoff.cap);
                let floor = match jitter {
                    Jitter::None => ceiling,
                    Jitter::Half => ceiling / 2,
                    Jitter::Full => Duration::from_millis(1),
                };
                assert!(d <= ceiling && d >= floor, "{jitter:?} attempt {attempt}: {d:?} vs {ceiling:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_delays_and_none_does_not() {
        let mut rng = rand::rng();
        let mut distinct = |jitter| {
            let b = backoff(jitter);
            (0..50).map(|_| b.delay(4, &mut rng)).collect::<std::collections::BTreeSet<_>>().len()
        };
        assert_eq!(distinct(Jitter::None), 1);
        assert!(distinct(Jitter::Half) > 10);
        assert!(distinct(Jitter::Full) > 10);
    }

    #[test]
    fn a_budget_is_per_destination_and_runs_out() {
        let budget = RetryBudget::per_second(NonZeroU32::new(5).unwrap());
        let taken = (0..20).filter(|_| budget.try_take(&"a")).count();
        assert!((5..=6).contains(&taken), "a burst of the budget, then no more: took {taken}");
        assert!(budget.try_take(&"b"), "another destination has its own budget");
    }
}
