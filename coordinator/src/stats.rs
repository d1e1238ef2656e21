//! What an operator reads of the coordinator's recent past (`GetStats`,
//! `ListTransactions`, the console): decisions per second with their decision
//! latency percentiles over the last [`WINDOW_SECONDS`], and the last
//! [`RECENT`] decisions. Memory is bounded by both. Pure: time arrives as
//! arguments.

use std::collections::VecDeque;

use decree_proto::{Reason, TxId};
use hdrhistogram::Histogram;

/// Seconds of per-second counts kept.
pub const WINDOW_SECONDS: u64 = 300;

/// Decisions kept, newest first.
pub const RECENT: usize = 1000;

/// How a transaction ended, as its client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Committed,
    Aborted,
    /// Not known yet (one-phase, its participant unreachable; or a lost leadership).
    Unknown,
}

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub txid: TxId,
    pub ended: Ended,
    pub code: Reason,
    pub reason: String,
    pub participants: Vec<String>,
    pub started_unix_ms: u64,
    pub decided_unix_ms: u64,
    /// From the start (or the Commit request) to the decision.
    pub latency_us: u64,
}

/// One second's decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    pub unix_s: u64,
    pub committed: u64,
    pub aborted: u64,
    pub unknown: u64,
    /// Decision latency percentiles in milliseconds (0 with no decision).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

struct Bucket {
    unix_s: u64,
    committed: u64,
    aborted: u64,
    unknown: u64,
    latency: Histogram<u64>,
}

impl Bucket {
    fn new(unix_s: u64) -> Self {
        // Microseconds up to an hour, two significant digits: a few KiB a bucket.
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds");
        Bucket { unix_s, committed: 0, aborted: 0, unknown: 0, latency }
    }

    fn view(&self) -> Second {
        let ms = |q: f64| {
            if self.latency.is_empty() {
                0.0
            } else {
                self.latency.value_at_quantile(q) as f64 / 1000.0
            }
        };
        Second {
            unix_s: self.unix_s,
            committed: self.committed,
            aborted: self.aborted,
            unknown: self.unknown,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: if self.latency.is_empty() { 0.0 } else { self.latency.max() as f64 / 1000.0 },
        }
    }
}

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub committed: u64,
    pub aborted: u64,
    pub unknown: u64,
}

#[derive(Default)]
pub struct Stats {
    /// Oldest first, at most [`WINDOW_SECONDS`], only seconds with decisions.
    seconds: VecDeque<Bucket>,
    /// Newest first.
    recent: VecDeque<Decision>,
    totals: Totals,
}

impl Stats {
    pub fn record(&mut self, decision: Decision) {
        let unix_s = decision.decided_unix_ms / 1000;
        if self.seconds.back().is_none_or(|b| b.unix_s < unix_s) {
            self.seconds.push_back(Bucket::new(unix_s));
        }
        while self.seconds.front().is_some_and(|b| b.unix_s + WINDOW_SECONDS <= unix_s) {
            self.seconds.pop_front();
        }
        // A clock that stepped back counts in the newest second.
        let bucket = self.seconds.back_mut().expect("just pushed");
        let _ = bucket.latency.record(decision.latency_us.max(1));
        let counter = match decision.ended {
            Ended::Committed => (&mut bucket.committed, &mut self.totals.committed),
            Ended::Aborted => (&mut bucket.aborted, &mut self.totals.aborted),
            Ended::Unknown => (&mut bucket.unknown, &mut self.totals.unknown),
        };
        *counter.0 += 1;
        *counter.1 += 1;
        self.recent.push_front(decision);
        self.recent.truncate(RECENT);
    }

    /// The last `n` seconds up to `now_unix_s` (at most [`WINDOW_SECONDS`]),
    /// oldest first, every second present (zero when nothing was decided).
    pub fn seconds(&self, now_unix_s: u64, n: u64) -> Vec<Second> {
        let n = n.clamp(1, WINDOW_SECONDS);
        let from = now_unix_s.saturating_sub(n - 1);
        let mut found = self.seconds.iter().filter(|b| b.unix_s >= from && b.unix_s <= now_unix_s).peekable();
        (from..=now_unix_s)
            .map(|second| match found.peek() {
                Some(b) if b.unix_s == second => found.next().expect("peeked").view(),
                _ => Bucket::new(second).view(),
            })
            .collect()
    }

    /// The most recent decisions, newest first: those of `txid` only when given.
    pub fn recent(&self, txid: Option<TxId>, limit: usize) -> Vec<Decision> {
        self.recent.iter().filter(|d| txid.is_none_or(|t| d.txid == t)).take(limit).cloned().collect()
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(seq: u64, ended: Ended, at_ms: u64, latency_us: u64) -> Decision {
        Decision {
            txid: TxId { coordinator: 1, incarnation: 1, sequence: seq },
            ended,
            code: Reason::Unspecified,
            reason: String::new(),
            participants: vec!["p1".into()],
            started_unix_ms: at_ms - latency_us / 1000,
            decided_unix_ms: at_ms,
            latency_us,
        }
    }

    #[test]
    fn seconds_count_decisions_and_their_latency() {
        let mut stats = Stats::default();
        for i in 0..100 {
            stats.record(decision(i + 1, Ended::Committed, 10_000 + i, 1000 + i * 10));
        }
        stats.record(decision(101, Ended::Aborted, 12_500, 50_000));
        let seconds = stats.seconds(13, 4);
        assert_eq!(seconds.iter().map(|s| s.unix_s).collect::<Vec<_>>(), vec![10, 11, 12, 13]);
        assert_eq!((seconds[0].committed, seconds[0].aborted), (100, 0));
        assert!((seconds[0].p50_ms - 1.5).abs() < 0.05, "{}", seconds[0].p50_ms);
        assert!((seconds[0].max_ms - 1.99).abs() < 0.05, "{}", seconds[0].max_ms);
        assert_eq!((seconds[1].committed, seconds[1].aborted, seconds[1].p99_ms), (0, 0, 0.0));
        assert_eq!(seconds[2].aborted, 1);
        assert_eq!(stats.totals(), Totals { committed: 100, aborted: 1, unknown: 0 });
    }

    #[test]
    fn the_window_and_the_recent_list_are_bounded() {
        let mut stats = Stats::default();
        for i in 0..(RECENT as u64 + 50) {
            stats.record(decision(i + 1, Ended::Committed, i * 1000, 10));
        }
        assert!(stats.seconds.len() as u64 <= WINDOW_SECONDS);
        let recent = stats.recent(None, usize::MAX);
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].txid.sequence, RECENT as u64 + 50, "newest first");
        let last = RECENT as u64 + 49;
        assert_eq!(stats.seconds(last, 1000).len() as u64, WINDOW_SECONDS);
        let one = TxId { coordinator: 1, incarnation: 1, sequence: 700 };
        assert_eq!(stats.recent(Some(one), 10).len(), 1);
        let gone = TxId { coordinator: 1, incarnation: 1, sequence: 3 };
        assert!(stats.recent(Some(gone), 10).is_empty());
    }
}
