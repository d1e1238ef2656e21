//! The invariants of TESTING.md, checked as the run goes (what must hold at
//! the moment a message leaves or a branch is decided) and at its end (what
//! the data says once everything has ended).
//!
//! - I1 all-or-nothing: each transfer's two markers are both committed, or
//!   neither;
//! - I2 reported outcomes hold: COMMITTED means every marker, ABORTED none;
//! - I3 a Commit leaves only once the decision is synced, a YES only once
//!   the prepared record is;
//! - I4 exactly once: each client's counter equals its transfers' markers,
//!   and no branch is applied twice;
//! - I5 the balances sum to zero, as they started;
//! - I6 and liveness: within [`SETTLE`](crate::SETTLE) of the faults
//!   stopping, nothing is in doubt, no lock is held, nothing waits and every
//!   client has its answer;
//! - I7 no participant decides alone: a branch commits only under a durable
//!   decision, and a branch that voted YES never aborts under one;
//! - I8 stale messages change nothing: the late, duplicated and
//!   old-incarnation messages the network delivers are held to I1-I7 too;
//! - I9 a read returns the latest committed value: what a participant
//!   serves is the value the last commit applied to the key, wherever (a
//!   key that moved away, or has not arrived, is redirected, never missed);
//! - I10 each key is at exactly one participant in the end, the owner the
//!   final ring names (and no migration is left unfinished).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use decree_coordinator::retention::Retention as Window;
use decree_participant::engine::TombstoneRetention;
use decree_participant::membership::RING_KEY;
use decree_proto::TxId;
use decree_runtime::{MemLog, Write};
use rand::rngs::StdRng;
use rand::Rng;

use crate::client::{counter, markers, Client};
use crate::coordinator::{index, Coordinator};
use crate::participant::Participant;
use crate::{Ctx, Time};

/// An invariant that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    /// Simulated time it was seen.
    pub at: Time,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {} us: {}", self.invariant, self.at, self.what)
    }
}

/// What a client was told in the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    Committed,
    Aborted,
}

/// How much the servers remember of what ended, by the seed: the defaults,
/// or small bounds that make forgetting happen within the run.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub coordinator: Window,
    pub participant: TombstoneRetention,
}

impl Retention {
    pub fn choose(rng: &mut StdRng) -> Retention {
        let coordinator = if rng.random_bool(0.3) {
            Window { max_ended: 20, max_age: Duration::from_secs(5) }
        } else {
            Window { max_ended: 1_000_000, max_age: Duration::from_secs(3600) }
        };
        let participant = if rng.random_bool(0.3) {
            TombstoneRetention { max: 30, max_age: Duration::from_secs(20) }
        } else {
            TombstoneRetention::default()
        };
        Retention { coordinator, participant }
    }
}

/// What the checker knows that no process does.
#[derive(Debug, Default)]
pub struct Ghost {
    pub violations: Vec<crate::Violation>,
    /// Skip the checks made as messages leave (I3): only what the data and
    /// the outcomes show counts, to see a planted bug caught by its effects.
    pub effects_only: bool,
    pub coordinator_id: u32,
    /// Every transfer tried, with its client.
    tags: BTreeMap<String, usize>,
    /// Each key's value as the last commit applied to it left it (a
    /// migration batch moves values, it changes none).
    latest: BTreeMap<String, Vec<u8>>,
    reported: BTreeMap<String, Reported>,
    /// Transactions whose COMMIT decision reached the disk.
    decided: BTreeSet<TxId>,
    /// Branches that voted YES.
    yes: BTreeSet<(usize, TxId)>,
    /// Transactions a participant aborted after voting YES.
    aborted_yes: BTreeSet<TxId>,
    /// Branches applied.
    applied: BTreeSet<(usize, TxId)>,
}

fn violation(ghost: &mut Ghost, at: Time, invariant: &'static str, what: String) {
    ghost.violations.push(Violation { invariant, at, what });
}

impl Ghost {
    pub fn new(effects_only: bool) -> Ghost {
        Ghost { effects_only, ..Ghost::default() }
    }

    pub fn planned(&mut self, tag: &str, client: usize) {
        self.tags.insert(tag.to_owned(), client);
    }

    /// A commit's writes reached the disk.
    pub fn applied_writes(&mut self, writes: &[Write]) {
        let migration = writes.iter().any(|w| matches!(w, Write::Put { key, .. } if key == RING_KEY));
        if migration {
            return;
        }
        for write in writes {
            match write {
                Write::Put { key, value } if key.starts_with(b"k/") => {
                    self.latest.insert(String::from_utf8_lossy(&key[2..]).into_owned(), value.clone());
                }
                Write::Delete { key } if key.starts_with(b"k/") => {
                    self.latest.remove(&*String::from_utf8_lossy(&key[2..]));
                }
                _ => {}
            }
        }
    }

    /// I9: participant `p` serves `value` for `key`.
    pub fn read_served(&mut self, at: Time, p: usize, key: &str, value: Option<&[u8]>) {
        let latest = self.latest.get(key).map(Vec::as_slice);
        if value != latest {
            let show = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
            violation(
                self,
                at,
                "I9",
                format!(
                    "p{p} served {key} = {:?}, the latest committed value is {:?}",
                    show(value),
                    show(latest)
                ),
            );
        }
    }

    pub fn reported(&mut self, at: Time, tag: &str, reported: Reported) {
        if let Some(before) = self.reported.insert(tag.to_owned(), reported) {
            if before != reported {
                violation(self, at, "I2", format!("{tag} was reported {before:?}, then {reported:?}"));
            }
        }
    }

    pub fn decision_durable(&mut self, at: Time, txid: TxId) {
        self.decided.insert(txid);
        if self.aborted_yes.contains(&txid) {
            violation(
                self,
                at,
                "I7",
                format!("{txid} decided COMMIT after a participant aborted its YES branch"),
            );
        }
    }

    /// I3: a Commit leaves only once its decision survives a machine crash.
    pub fn commit_sent(&mut self, at: Time, txid: TxId, disk: &MemLog) {
        let durable = disk.synced_get(&decree_coordinator::store::decision_key(txid)).is_some()
            || disk.synced_get(&decree_coordinator::store::committed_key(txid)).is_some();
        if !durable && !self.effects_only {
            violation(self, at, "I3", format!("Commit of {txid} sent before its decision is durable"));
        }
    }

    /// I3: a YES leaves only once the prepared record (or the commit) survives a machine crash.
    pub fn yes_sent(&mut self, at: Time, p: usize, txid: TxId, disk: &MemLog) {
        let durable = disk.synced_get(&decree_participant::store::prepared_key(txid)).is_some()
            || disk.synced_get(&decree_participant::store::tombstone_key(txid)).is_some();
        if !durable && !self.effects_only {
            violation(
                self,
                at,
                "I3",
                format!("p{p} voted YES on {txid} before its prepared record is durable"),
            );
        }
        self.yes.insert((p, txid));
    }

    /// I7: a two-phase branch commits only under a durable decision.
    pub fn deciding_commit(&mut self, at: Time, p: usize, txid: TxId, one_phase: bool) {
        if !one_phase && !self.decided.contains(&txid) {
            violation(self, at, "I7", format!("p{p} commits {txid}, which has no durable COMMIT decision"));
        }
    }

    /// I7: a branch that voted YES aborts only if the transaction never commits.
    pub fn deciding_abort(&mut self, at: Time, p: usize, txid: TxId, _prepared: bool) {
        if self.yes.contains(&(p, txid)) {
            self.aborted_yes.insert(txid);
            if self.decided.contains(&txid) {
                violation(
                    self,
                    at,
                    "I7",
                    format!("p{p} aborts its YES branch of {txid}, which is committed"),
                );
            }
        }
    }

    /// I4: no branch is applied twice.
    pub fn applied_commit(&mut self, at: Time, p: usize, txid: TxId, _one_phase: bool) {
        if !self.applied.insert((p, txid)) {
            violation(self, at, "I4", format!("p{p} applied {txid} twice"));
        }
    }
}

/// I6 and liveness: nothing in doubt, locked or waiting, every client answered.
pub fn settled(coordinator: &Coordinator, participants: &[Participant], clients: &[Client]) -> bool {
    unsettled(coordinator, participants, clients).is_empty()
}

/// What is not over yet, in words (empty when everything is).
pub fn unsettled(coordinator: &Coordinator, participants: &[Participant], clients: &[Client]) -> String {
    let mut out = Vec::new();
    match coordinator.engine() {
        None => out.push("the coordinator is down".to_owned()),
        Some(engine) if engine.in_flight() > 0 => out.push(format!(
            "the coordinator has {} transactions in flight: {:?}",
            engine.in_flight(),
            engine.unacked()
        )),
        Some(_) => {}
    }
    if let Some(routing) = coordinator.routing() {
        if let Some(m) = &routing.migration {
            out.push(format!(
                "a migration to {:?} is at {:?} ({:?})",
                m.target.names(),
                m.cursor,
                coordinator.driver()
            ));
        }
    }
    for (p, participant) in participants.iter().enumerate() {
        if !participant.up() {
            out.push(format!("p{p} is down"));
            continue;
        }
        let doubt = participant.in_doubt();
        if !doubt.is_empty() {
            out.push(format!(
                "p{p} has {} branches in doubt: {:?}",
                doubt.len(),
                doubt.iter().map(|b| b.txid.to_string()).collect::<Vec<_>>()
            ));
        }
        let locks = participant.locks();
        if !locks.is_empty() {
            out.push(format!(
                "p{p} holds {} locks: {:?}",
                locks.len(),
                locks.iter().map(|l| format!("{}@{}", l.key, l.holder)).collect::<Vec<_>>()
            ));
        }
        if participant.waiting() > 0 {
            out.push(format!("p{p} has {} lock waiters", participant.waiting()));
        }
    }
    for client in clients {
        if !client.done() {
            out.push(client.describe());
        }
    }
    out.join("; ")
}

/// The end-of-run checks on the data (I1, I2, I4, I5) and on phase two.
pub fn finish(ctx: &mut Ctx, coordinator: &Coordinator, participants: &[Participant], clients: &[Client]) {
    let at = ctx.now();
    let ghost = &mut ctx.ghost;
    if participants.iter().any(|p| !p.up()) || !coordinator.up() {
        return; // the liveness violation says why
    }
    // I10: every key at one participant, its owner by the final ring.
    let routing = coordinator.routing().unwrap_or_default();
    let mut values: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (p, participant) in participants.iter().enumerate() {
        for (key, value) in participant.scan("") {
            holders.entry(key.clone()).or_default().push(p);
            values.insert(key, value);
        }
    }
    for (key, at_) in &holders {
        let owner = routing.route(key).map(|name| index(&name.parse().expect("a member")));
        if at_.len() != 1 || Some(at_[0]) != owner {
            violation(ghost, at, "I10", format!("{key} is at {at_:?}; the ring's owner is {owner:?}"));
        }
    }
    let number = |key: &str| {
        values.get(key).map_or(0, |v| String::from_utf8_lossy(v).parse::<i64>().expect("a number"))
    };
    let sum: i64 = values.keys().filter(|k| k.starts_with("acct/")).map(|k| number(k)).sum();
    if sum != 0 {
        violation(ghost, at, "I5", format!("the balances sum to {sum}, not 0"));
    }
    let tags = std::mem::take(&mut ghost.tags);
    let mut counted: BTreeMap<usize, i64> = BTreeMap::new();
    for (tag, client) in &tags {
        let found = markers(tag).iter().filter(|m| values.contains_key(*m)).count();
        if found == 2 {
            *counted.entry(*client).or_default() += 1;
        }
        if found == 1 {
            violation(ghost, at, "I1", format!("{tag} applied in part: one marker of two"));
        }
        match ghost.reported.get(tag) {
            Some(Reported::Committed) if found != 2 => {
                violation(ghost, at, "I2", format!("{tag} reported COMMITTED, {found} markers of 2"));
            }
            Some(Reported::Aborted) if found != 0 => {
                violation(ghost, at, "I2", format!("{tag} reported ABORTED, {found} markers of 2"));
            }
            _ => {}
        }
    }
    for key in values.keys().filter(|k| k.starts_with("m/")) {
        let tag = key[2..].rsplit_once('.').map_or("", |(tag, _)| tag);
        if !tags.contains_key(tag) {
            violation(ghost, at, "I1", format!("marker {key} belongs to no transfer"));
        }
    }
    for c in 0..clients.len() {
        let (count, markers) = (number(&counter(c)), counted.get(&c).copied().unwrap_or(0));
        if count != markers {
            violation(
                ghost,
                at,
                "I4",
                format!("client{c} counted {count} transfers, {markers} have markers"),
            );
        }
    }
    if let Some(engine) = coordinator.engine() {
        for stuck in engine.stuck() {
            violation(
                ghost,
                at,
                "I6",
                format!("{} stuck at {}: {}", stuck.txid, stuck.participant, stuck.reason),
            );
        }
    }
}
