//! Which ended outcomes to forget: a pure policy, no I/O.
//!
//! The coordinator keeps the outcome of an ended transaction (`c/` in the
//! store) so that `GetOutcome` can answer COMMITTED for a while; it forgets
//! them by txid horizon (one range delete below a txid). This module picks the
//! horizon. Every tick it notes a checkpoint: when it was, the next txid to be
//! issued, and how many outcomes had been recorded. The records issued between
//! two checkpoints form a bucket; a horizon at a checkpoint forgets every
//! bucket before it. Two bounds, the tighter wins:
//!
//! - **age**: a bucket is forgotten once all of it is older than `max_age`;
//! - **count**: buckets are forgotten, oldest first, while at least
//!   `max_ended` outcomes were recorded after them: the newest `max_ended` are
//!   always kept, and at most one tick's worth more.
//!
//! Both err on keeping: a bucket goes only when all of it is out of bounds.
//! What a previous incarnation left is one bucket before the first
//! checkpoint, of unknown size: it is forgotten by age (`max_age` after this
//! start) or once `max_ended` outcomes were recorded since the start, never at
//! once, so a restart does not drop the window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use decree_proto::TxId;

/// How much of the history of ended outcomes is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// About this many recorded outcomes: the newest this many are kept, and
    /// at most one tick's worth more.
    pub max_ended: u64,
    /// None older than this.
    pub max_age: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    at: Instant,
    /// The next txid to be issued at `at`: every txid issued before is below it.
    next: TxId,
    /// Outcomes recorded by `at`.
    ended: u64,
}

/// The checkpoints since the current horizon, and the horizon.
#[derive(Debug)]
pub struct Window {
    retention: Retention,
    checkpoints: VecDeque<Checkpoint>,
    horizon: Option<TxId>,
}

impl Window {
    /// A window that starts now, at `next`, with `ended` outcomes recorded.
    pub fn new(retention: Retention, at: Instant, next: TxId, ended: u64) -> Self {
        Window { retention, checkpoints: VecDeque::from([Checkpoint { at, next, ended }]), horizon: None }
    }

    /// Notes a checkpoint; returns the new horizon when it moved.
    pub fn tick(&mut self, now: Instant, next: TxId, ended: u64) -> Option<TxId> {
        debug_assert!(self.checkpoints.back().is_none_or(|last| last.next <= next && last.ended <= ended));
        self.checkpoints.push_back(Checkpoint { at: now, next, ended });
        // Age: the newest checkpoint at least max_age old (everything before it is older).
        let by_age = now
            .checked_sub(self.retention.max_age)
            .and_then(|cutoff| self.checkpoints.iter().rposition(|c| c.at <= cutoff));
        // Count: the newest checkpoint since which at least max_ended were recorded.
        let by_count = self.checkpoints.iter().rposition(|c| ended - c.ended >= self.retention.max_ended);
        let index = match (by_age, by_count) {
            (None, None) => return None,
            (a, c) => a.max(c).expect("one is set"),
        };
        self.checkpoints.drain(..index);
        let horizon = self.checkpoints.front().expect("the chosen checkpoint is kept").next;
        if self.horizon.is_some_and(|h| h >= horizon) {
            return None;
        }
        self.horizon = Some(horizon);
        Some(horizon)
    }

    /// Checkpoints held (bounded by `max_age` over the tick interval).
    pub fn len(&self) -> usize {
        self.checkpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checkpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txid(sequence: u64) -> TxId {
        TxId::new(7, 3, sequence)
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn nothing_is_forgotten_while_both_bounds_hold() {
        let start = Instant::now();
        let retention = Retention { max_ended: 1_000, max_age: 60 * SECOND };
        let mut window = Window::new(retention, start, txid(1), 0);
        for s in 1..=59u64 {
            assert_eq!(window.tick(start + secs(s), txid(10 * s + 1), 10 * s), None, "second {s}");
        }
    }

    #[test]
    fn the_count_bound_forgets_the_oldest_buckets() {
        let start = Instant::now();
        let retention = Retention { max_ended: 100, max_age: 3600 * SECOND };
        let mut window = Window::new(retention, start, txid(1), 0);
        // 40 outcomes a second.
        assert_eq!(window.tick(start + SECOND, txid(41), 40), None);
        assert_eq!(window.tick(start + 2 * SECOND, txid(81), 80), None);
        // 120 since the start, 80 since 1 s: what came before this start goes.
        assert_eq!(window.tick(start + 3 * SECOND, txid(121), 120), Some(txid(1)));
        // 120 since 1 s: forget below txid 41, keeping the newest 120 >= 100.
        assert_eq!(window.tick(start + 4 * SECOND, txid(161), 160), Some(txid(41)));
        // No new outcomes: the horizon stays.
        assert_eq!(window.tick(start + 5 * SECOND, txid(161), 160), None);
        assert_eq!(window.tick(start + 6 * SECOND, txid(161), 160), None);
    }

    #[test]
    fn the_age_bound_forgets_what_is_older_than_max_age_even_at_a_trickle() {
        let start = Instant::now();
        let retention = Retention { max_ended: 1_000_000, max_age: 10 * SECOND };
        let mut window = Window::new(retention, start, txid(1), 0);
        let mut forgotten = Vec::new();
        for s in 1..=25u64 {
            if let Some(h) = window.tick(start + secs(s), txid(s + 1), s) {
                forgotten.push((s, h));
            }
        }
        // At 10 s the start's checkpoint is 10 s old: what came before this start goes;
        // from then on, each second forgets the second that is 10 s old.
        assert_eq!(forgotten.first(), Some(&(10, txid(1))));
        assert_eq!(forgotten.last(), Some(&(25, txid(16))));
        assert!(window.len() <= 12, "checkpoints stay bounded: {}", window.len());
    }

    #[test]
    fn a_restart_keeps_the_previous_window_until_a_bound_says_otherwise() {
        let start = Instant::now();
        let retention = Retention { max_ended: 50, max_age: 3600 * SECOND };
        let mut window = Window::new(retention, start, txid(1), 0);
        // 30 outcomes since the start: with what came before, possibly more than 50,
        // but the count bound does not guess: the previous bucket stays.
        assert_eq!(window.tick(start + SECOND, txid(31), 30), None);
        // 60 since the start: the newest 50 are this incarnation's; the previous one goes.
        assert_eq!(window.tick(start + 2 * SECOND, txid(61), 60), Some(txid(1)));
        // 60 since the first second: it goes too.
        assert_eq!(window.tick(start + 3 * SECOND, txid(91), 90), Some(txid(31)));
    }

    #[test]
    fn a_burst_larger_than_the_bound_keeps_it_whole() {
        let start = Instant::now();
        let retention = Retention { max_ended: 5, max_age: 3600 * SECOND };
        let mut window = Window::new(retention, start, txid(1), 0);
        // 30 outcomes within one tick: the newest 5 are among them, so nothing goes.
        assert_eq!(window.tick(start + SECOND, txid(31), 30), Some(txid(1)));
        for s in 2..10 {
            assert_eq!(window.tick(start + secs(s), txid(31), 30), None, "idle: nothing more goes");
        }
        // Six more: now the burst's tick is more than 5 behind.
        assert_eq!(window.tick(start + secs(10), txid(37), 36), Some(txid(31)));
    }

    #[test]
    fn the_horizon_never_moves_back() {
        let start = Instant::now();
        let retention = Retention { max_ended: 10, max_age: 3600 * SECOND };
        let mut window = Window::new(retention, start, txid(1), 0);
        let mut last = None;
        for s in 1..100u64 {
            // Bursty: sometimes many outcomes, sometimes none.
            let ended = (s / 3) * 7;
            if let Some(h) = window.tick(start + secs(s), txid(ended + 1), ended) {
                assert!(last.is_none_or(|l| h > l), "{h} after {last:?}");
                last = Some(h);
            }
        }
        assert!(last.is_some());
    }
}
