//! Txid leases on a `TransactStream`: a pure policy, no I/O.
//!
//! A client that names its transactions by txids leased to it knows each
//! txid before it sends the transaction. Whatever becomes of the stream, or
//! of the coordinator (a group's leader killed mid-flight), it can ask each
//! one's outcome: a txid the log holds nothing of did not commit, and can no
//! longer start once its outcome was asked (the actor fences it).
//!
//! Per stream: the leases granted, and the last sequence used. A txid is
//! usable once, in increasing order (the stream is read in order, so a
//! client that takes them in order never trips on it), while its lease has
//! not expired. Leases expire so that the pruner's horizon, which trails the
//! issued sequence by [`LIFE`], never passes a txid that may still start.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a lease is usable after it was granted.
pub const LIFE: Duration = decree_proto::TXID_LEASE_LIFE;
/// The most txids one lease holds.
pub const MOST: u32 = 4096;
/// Leases a stream holds at once; granting another drops the oldest.
const HELD: usize = 4;

#[derive(Debug)]
struct Granted {
    first: u64,
    end: u64,
    until: Instant,
}

/// The leases of one stream.
#[derive(Debug, Default)]
pub struct StreamLeases {
    granted: VecDeque<Granted>,
    last: u64,
}

impl StreamLeases {
    /// Notes a lease of `count` sequences from `first`, granted `now`.
    pub fn grant(&mut self, first: u64, count: u32, now: Instant) {
        if self.granted.len() == HELD {
            self.granted.pop_front();
        }
        self.granted.push_back(Granted { first, end: first + u64::from(count), until: now + LIFE });
    }

    /// Takes `sequence` for a transaction read `now`, or says why not.
    pub fn take(&mut self, sequence: u64, now: Instant) -> Result<(), String> {
        while self.granted.front().is_some_and(|g| g.until <= now || g.end <= self.last + 1) {
            self.granted.pop_front();
        }
        if sequence <= self.last {
            return Err(format!(
                "sequence {sequence} is not above the last used on this stream ({})",
                self.last
            ));
        }
        if !self.granted.iter().any(|g| g.first <= sequence && sequence < g.end && now < g.until) {
            return Err(format!("sequence {sequence} is in no lease of this stream that is still valid"));
        }
        self.last = sequence;
        Ok(())
    }
}

/// The issued sequence as it stood [`LIFE`] ago (or at the first note, if
/// that is more recent): every txid that may still start is at or above it.
#[derive(Debug)]
pub struct Trailing {
    notes: VecDeque<(Instant, u64)>,
}

impl Trailing {
    pub fn new(at: Instant, next: u64) -> Self {
        Trailing { notes: VecDeque::from([(at, next)]) }
    }

    /// Notes where the sequence stands `now`; returns where it stood `LIFE` ago.
    pub fn note(&mut self, now: Instant, next: u64) -> u64 {
        self.notes.push_back((now, next));
        let cutoff = now.checked_sub(LIFE);
        // Keep the newest note at or before the cutoff, and everything after it.
        while self.notes.len() > 1 && cutoff.is_some_and(|c| self.notes[1].0 <= c) {
            self.notes.pop_front();
        }
        self.notes[0].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leased_sequence_is_taken_once_in_order_and_only_while_its_lease_is_valid() {
        let t0 = Instant::now();
        let mut leases = StreamLeases::default();
        assert!(leases.take(10, t0).is_err(), "nothing granted yet");
        leases.grant(10, 4, t0);
        assert_eq!(leases.take(10, t0), Ok(()));
        assert!(leases.take(10, t0).is_err(), "used once");
        assert_eq!(leases.take(12, t0), Ok(()), "gaps are allowed");
        assert!(leases.take(11, t0).is_err(), "never below the last used");
        assert!(leases.take(14, t0).is_err(), "beyond the lease");
        leases.grant(20, 4, t0 + Duration::from_millis(10));
        assert_eq!(leases.take(13, t0 + LIFE - Duration::from_millis(1)), Ok(()));
        assert!(leases.take(21, t0 + LIFE + Duration::from_millis(10)).is_err(), "expired");
    }

    #[test]
    fn a_stream_holds_a_bounded_number_of_leases() {
        let t0 = Instant::now();
        let mut leases = StreamLeases::default();
        for i in 0..10 {
            leases.grant(100 * i, 10, t0);
        }
        assert_eq!(leases.granted.len(), HELD);
        assert!(leases.take(5, t0).is_err(), "the oldest leases were dropped");
        assert_eq!(leases.take(905, t0), Ok(()));
    }

    #[test]
    fn the_trailing_sequence_is_where_it_stood_a_lease_life_ago() {
        let t0 = Instant::now();
        let mut trailing = Trailing::new(t0, 1);
        assert_eq!(trailing.note(t0 + Duration::from_millis(500), 50), 1);
        assert_eq!(trailing.note(t0 + LIFE, 100), 1);
        assert_eq!(trailing.note(t0 + LIFE + Duration::from_millis(600), 200), 50);
        assert_eq!(trailing.note(t0 + LIFE * 3, 300), 200);
        assert!(trailing.notes.len() <= 2);
    }
}
