//! The invariants of TESTING.md, checked as the run goes (what must hold at
//! the moment a message leaves or a branch is decided) and at its end (what
//! the data says once everything has ended).
//!
//! - I1 all-or-nothing: each transfer's marker is on every participant it
//!   changes, or on none;
//! - I2 reported outcomes hold: COMMITTED means every marker, ABORTED none;
//! - I3 a Commit leaves only once the decision is synced, a YES only once
//!   the prepared record is;
//! - I4 exactly once: each participant's counter equals its markers, and no
//!   branch is applied twice;
//! - I5 the balances sum to zero, as they started;
//! - I6 and liveness: within [`SETTLE`](crate::SETTLE) of the faults
//!   stopping, nothing is in doubt, no lock is held, nothing waits and every
//!   client has its answer;
//! - I7 no participant decides alone: a branch commits only under a durable
//!   decision, and a branch that voted YES never aborts under one;
//! - I8 stale messages change nothing: the late, duplicated and
//!   old-incarnation messages the network delivers are held to I1-I7 too.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use decree_coordinator::retention::Retention as Window;
use decree_participant::engine::TombstoneRetention;
use decree_proto::TxId;
use decree_runtime::MemLog;
use rand::rngs::StdRng;
use rand::Rng;

use crate::client::{account, Client, ACCOUNTS};
use crate::coordinator::Coordinator;
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
    /// Every transfer tried, with the participants it changes.
    tags: BTreeMap<String, Vec<usize>>,
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

    pub fn planned(&mut self, tag: &str, writers: Vec<usize>) {
        self.tags.insert(tag.to_owned(), writers);
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
pub fn finish(ctx: &mut Ctx, coordinator: &Coordinator, participants: &[Participant], _clients: &[Client]) {
    let at = ctx.now();
    let ghost = &mut ctx.ghost;
    if participants.iter().any(|p| !p.up()) || !coordinator.up() {
        return; // the liveness violation says why
    }
    let mut present: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut sum: i64 = 0;
    for (p, participant) in participants.iter().enumerate() {
        let markers = participant.scan("m/");
        for (key, _) in &markers {
            present.entry(key[2..].to_owned()).or_default().push(p);
        }
        let count = participant
            .value("count")
            .map(|v| String::from_utf8_lossy(&v).parse::<i64>().expect("a number"))
            .unwrap_or(0);
        if count != markers.len() as i64 {
            violation(
                ghost,
                at,
                "I4",
                format!("p{p} counted {count} transfers but holds {} markers", markers.len()),
            );
        }
        for a in 0..ACCOUNTS {
            if let Some(value) = participant.value(&account(a)) {
                sum += String::from_utf8_lossy(&value).parse::<i64>().expect("a number");
            }
        }
    }
    if sum != 0 {
        violation(ghost, at, "I5", format!("the balances sum to {sum}, not 0"));
    }
    let tags = std::mem::take(&mut ghost.tags);
    for (tag, writers) in &tags {
        let found = present.remove(tag).unwrap_or_default();
        if !found.is_empty() && found != *writers {
            violation(ghost, at, "I1", format!("{tag} applied at {found:?} of {writers:?}"));
        }
        match ghost.reported.get(tag) {
            Some(Reported::Committed) if found != *writers => {
                violation(
                    ghost,
                    at,
                    "I2",
                    format!("{tag} reported COMMITTED, applied at {found:?} of {writers:?}"),
                );
            }
            Some(Reported::Aborted) if !found.is_empty() => {
                violation(ghost, at, "I2", format!("{tag} reported ABORTED, applied at {found:?}"));
            }
            _ => {}
        }
    }
    for (tag, at_) in present {
        violation(ghost, at, "I1", format!("marker {tag} at {at_:?} belongs to no transfer"));
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
