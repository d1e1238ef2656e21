//! Tombstones: the outcome of each decided txid, remembered for a bounded
//! count and age, and, for what they forgot, a horizon per coordinator.
//!
//! A tombstone is what makes a late message harmless: a Prepare after the
//! Abort votes NO instead of locking keys for a transaction that is over, a
//! repeated one-phase Prepare or Abort hears "committed". Tombstones are
//! evicted oldest first, beyond `max` or older than `max_age`, but never
//! before they are [`MIN_AGE`] old; the highest
//! evicted txid of each coordinator becomes its *horizon*, and a txid at or
//! below the horizon that this participant does not know is **forgotten**:
//! the engine refuses work for it as stale, never takes it for new. The
//! horizon only rises; it is made durable with the deletion of the evicted
//! tombstones' records, so after a restart the same txids are still refused.
//!
//! Why a least age: txids do not reach a participant in the order they were
//! issued. A group's leader leases blocks of txids to client streams, and a
//! stream may start a txid of its block up to a lease's life (2 s) after the
//! block was granted, while other streams' higher txids are decided. A
//! horizon raised past a txid that can still start would refuse it as stale
//! (seen: with 50 tombstones and four clients, most transactions of a group
//! were refused so). A tombstone is at least as young as the lease of its
//! txid, and every lower txid's lease was granted before that one: once the
//! tombstone is [`MIN_AGE`] old (a lease's life, a Prepare's deadline and a
//! margin), no txid below it can start any more.
//!
//! Pure: time arrives as arguments.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use decree_proto::TxId;
use foldhash::HashMap;

use super::Outcome;

/// The least age of a tombstone before either bound may evict it (see the
/// module): a lease's life, a Prepare's deadline (2 s by default) and a second's margin.
pub const MIN_AGE: Duration = Duration::from_secs(decree_proto::TXID_LEASE_LIFE.as_secs() + 2 + 1);

/// How many decided txids are remembered, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max: usize,
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max: super::TOMBSTONES, max_age: Duration::from_secs(3600) }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    retention: Retention,
    outcomes: HashMap<TxId, Outcome>,
    /// Oldest first: the order of eviction.
    order: VecDeque<TxId>,
    /// Tombstones ever inserted: `inserted - order.len()` have been evicted.
    inserted: u64,
    /// (when, `inserted` then), for the age bounds.
    checkpoints: VecDeque<(Instant, u64)>,
    /// Tombstones inserted at least [`MIN_AGE`] ago (by the last checkpoint
    /// that old): the count bound evicts no further.
    old_enough: u64,
    /// The highest forgotten txid of each coordinator.
    horizons: HashMap<u32, TxId>,
    /// Horizons moved since they were last taken (to be made durable).
    moved: bool,
}

impl Tombstones {
    pub(crate) fn new(retention: Retention) -> Self {
        Tombstones { retention, ..Tombstones::default() }
    }

    pub(crate) fn get(&self, txid: &TxId) -> Option<&Outcome> {
        self.outcomes.get(txid)
    }

    /// Remembers `txid`'s outcome; evicts the oldest beyond the count bound
    /// (those at least [`MIN_AGE`] old).
    pub(crate) fn remember(&mut self, txid: TxId, outcome: Outcome) {
        if self.outcomes.insert(txid, outcome).is_none() {
            self.order.push_back(txid);
            self.inserted += 1;
            self.evict_beyond_count();
        }
    }

    fn evict_beyond_count(&mut self) {
        while self.order.len() > self.retention.max && self.forgotten_count() < self.old_enough {
            self.evict_oldest();
        }
    }

    /// The horizon that makes `txid` forgotten: it is unknown here and at or
    /// below its coordinator's horizon.
    pub(crate) fn forgotten(&self, txid: TxId) -> Option<TxId> {
        if self.outcomes.contains_key(&txid) {
            return None;
        }
        self.horizons.get(&txid.coordinator).copied().filter(|horizon| txid <= *horizon)
    }

    /// A horizon found at start.
    pub(crate) fn recover_horizon(&mut self, horizon: TxId) {
        self.raise(horizon);
    }

    /// Evicts what is older than the age bound, and what is beyond the count
    /// bound and old enough, by `now`.
    pub(crate) fn age_out(&mut self, now: Instant) {
        self.checkpoints.push_back((now, self.inserted));
        // The newest checkpoint at least `age` old: everything inserted before it is older.
        let before = |checkpoints: &VecDeque<(Instant, u64)>, age: Duration| {
            let cutoff = now.checked_sub(age)?;
            checkpoints.iter().rposition(|(at, _)| *at <= cutoff)
        };
        if let Some(index) = before(&self.checkpoints, MIN_AGE) {
            self.old_enough = self.old_enough.max(self.checkpoints[index].1);
        }
        if let Some(index) = before(&self.checkpoints, self.retention.max_age.max(MIN_AGE)) {
            let (_, inserted_then) = self.checkpoints[index];
            self.checkpoints.drain(..index);
            while self.forgotten_count() < inserted_then {
                self.evict_oldest();
            }
        }
        self.evict_beyond_count();
    }

    /// Each coordinator's horizon, if any moved since the last call.
    pub(crate) fn take_moved_horizons(&mut self) -> Option<Vec<TxId>> {
        if !std::mem::take(&mut self.moved) {
            return None;
        }
        let mut horizons: Vec<TxId> = self.horizons.values().copied().collect();
        horizons.sort();
        Some(horizons)
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Tombstones evicted so far.
    pub(crate) fn forgotten_count(&self) -> u64 {
        self.inserted - self.order.len() as u64
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.order.pop_front() {
            self.outcomes.remove(&old);
            self.raise(old);
        }
    }

    fn raise(&mut self, txid: TxId) {
        let horizon = self.horizons.entry(txid.coordinator).or_insert(txid);
        if txid > *horizon {
            *horizon = txid;
        }
        self.moved = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(coordinator: u32, sequence: u64) -> TxId {
        TxId::new(coordinator, 1, sequence)
    }

    /// Tombstones remembered so far made [`MIN_AGE`] old.
    fn aged(tombstones: &mut Tombstones) {
        let start = Instant::now();
        tombstones.age_out(start);
        tombstones.age_out(start + MIN_AGE);
    }

    #[test]
    fn beyond_the_count_the_oldest_are_forgotten_below_a_horizon() {
        let mut tombstones = Tombstones::new(Retention { max: 3, max_age: Duration::from_secs(3600) });
        for s in 1..=5 {
            tombstones.remember(t(1, s), Outcome::Committed);
        }
        assert_eq!(tombstones.len(), 5, "none is old enough to go yet");
        assert_eq!(tombstones.forgotten(t(1, 1)), None);
        aged(&mut tombstones);
        assert_eq!(tombstones.len(), 3);
        assert_eq!(tombstones.forgotten(t(1, 1)), Some(t(1, 2)));
        assert_eq!(tombstones.forgotten(t(1, 2)), Some(t(1, 2)));
        assert_eq!(tombstones.forgotten(t(1, 3)), None, "remembered");
        assert_eq!(tombstones.get(&t(1, 3)), Some(&Outcome::Committed));
        assert_eq!(tombstones.forgotten(t(1, 6)), None, "never seen, above the horizon: new");
        assert_eq!(tombstones.forgotten(t(2, 1)), None, "another coordinator has no horizon");
        assert_eq!(tombstones.take_moved_horizons(), Some(vec![t(1, 2)]));
        assert_eq!(tombstones.take_moved_horizons(), None, "taken once per move");
    }

    #[test]
    fn a_late_decision_below_the_horizon_is_remembered_and_then_forgotten_again() {
        let mut tombstones = Tombstones::new(Retention { max: 2, max_age: Duration::from_secs(3600) });
        for s in [5, 6, 7] {
            tombstones.remember(t(1, s), Outcome::Aborted);
        }
        aged(&mut tombstones);
        // A transaction older than the horizon decided late: known while kept.
        tombstones.remember(t(1, 3), Outcome::Committed);
        assert_eq!(tombstones.forgotten(t(1, 3)), None);
        tombstones.remember(t(1, 8), Outcome::Committed);
        tombstones.remember(t(1, 9), Outcome::Committed);
        aged(&mut tombstones);
        assert_eq!(tombstones.forgotten(t(1, 3)), Some(t(1, 7)), "the horizon never moves back");
    }

    #[test]
    fn the_age_bound_forgets_what_is_older_than_max_age() {
        let start = Instant::now();
        let mut tombstones = Tombstones::new(Retention { max: 1_000, max_age: Duration::from_secs(10) });
        for s in 1..=4 {
            tombstones.remember(t(1, s), Outcome::Committed);
        }
        tombstones.age_out(start);
        for s in 5..=6 {
            tombstones.remember(t(1, s), Outcome::Committed);
        }
        tombstones.age_out(start + Duration::from_secs(5));
        assert_eq!(tombstones.len(), 6, "nothing is 10 s old yet");
        tombstones.age_out(start + Duration::from_secs(11));
        assert_eq!(tombstones.len(), 2, "the four remembered before the first tick are 10 s old");
        assert_eq!(tombstones.forgotten(t(1, 4)), Some(t(1, 4)));
        tombstones.age_out(start + Duration::from_secs(16));
        assert_eq!(tombstones.len(), 0);
        assert_eq!(tombstones.forgotten(t(1, 6)), Some(t(1, 6)));
    }

    /// The lease case: a stream's lower txids start after other streams'
    /// higher ones are decided and counted out; none is refused as stale
    /// while it is younger than a lease's life and a Prepare's deadline.
    #[test]
    fn the_count_bound_never_forgets_a_tombstone_younger_than_the_least_age() {
        let start = Instant::now();
        let mut tombstones = Tombstones::new(Retention { max: 2, max_age: Duration::from_secs(3600) });
        tombstones.age_out(start);
        for s in 1025..=1030 {
            tombstones.remember(t(1, s), Outcome::Committed);
        }
        tombstones.age_out(start + MIN_AGE / 2);
        assert_eq!(tombstones.len(), 6, "over the count, but young");
        assert_eq!(tombstones.forgotten(t(1, 21)), None, "a leased txid below them is still new");
        tombstones.age_out(start + MIN_AGE / 2 + MIN_AGE);
        assert_eq!(tombstones.len(), 2, "old enough: the count bound applies");
        assert_eq!(tombstones.forgotten(t(1, 21)), Some(t(1, 1028)));
    }

    #[test]
    fn a_short_age_bound_waits_for_the_least_age_too() {
        let start = Instant::now();
        let mut tombstones = Tombstones::new(Retention { max: 1_000, max_age: Duration::from_millis(100) });
        tombstones.age_out(start);
        tombstones.remember(t(1, 9), Outcome::Aborted);
        tombstones.age_out(start + Duration::from_millis(10));
        tombstones.age_out(start + Duration::from_secs(1));
        assert_eq!(tombstones.len(), 1, "older than max_age, younger than MIN_AGE");
        tombstones.age_out(start + Duration::from_millis(10) + MIN_AGE);
        assert_eq!(tombstones.len(), 0);
    }

    #[test]
    fn a_recovered_horizon_forgets_what_is_below_it() {
        let mut tombstones = Tombstones::new(Retention::default());
        tombstones.recover_horizon(t(4, 100));
        assert_eq!(tombstones.forgotten(t(4, 100)), Some(t(4, 100)));
        assert_eq!(tombstones.forgotten(t(4, 101)), None);
        tombstones.remember(t(4, 50), Outcome::Aborted);
        assert_eq!(tombstones.forgotten(t(4, 50)), None, "a tombstone beats the horizon");
    }
}
