//! The participant's protocol engine: branch states, the lock table and
//! tombstones, with no I/O.
//!
//! Events come from the coordinator's messages, from the resource (a branch
//! validated) and from the log (a record is durable). Commands ask the runtime
//! to validate, persist, answer. The rules it enforces:
//! - YES is answered only after the prepared record is durable (I3);
//! - keys stay locked from Prepare until the decision is applied, and a
//!   prepared branch found at start locks them again before anything is served;
//! - after YES the branch waits for the coordinator: it never decides alone (I7);
//! - interactive work (Kv.Execute) locks the keys it reads and writes from
//!   the first touch until the decision, and buffers its writes in the branch;
//! - a lock request that conflicts waits (up to the lock wait bound) or is
//!   refused at once, by a rule under which no cycle of waits can form (see
//!   [`Engine::may_wait_for`]): among interactive work it is wait-die (an older
//!   transaction waits, a younger one dies, its branch aborted); a one-shot
//!   Prepare waits only for older branches that are already preparing, and
//!   never for interactive work;
//! - a read of a locked key waits (up to the read wait bound) until the lock is
//!   released: a transaction is decided before its client hears of it and
//!   applied before its locks go, so a read never misses a transaction whose
//!   commit its client already saw;
//! - Commit and Abort are idempotent; a Prepare for a decided txid votes NO
//!   (or repeats the committed answer), and a Prepare from an older coordinator
//!   incarnation votes NO (I8);
//! - decided txids are remembered within a bound (count and age, see
//!   [`tombstones`]); a txid below what was forgotten is refused as stale, never
//!   taken for new, and an Abort for it is answered "forgotten", never "done".

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use decree_proto::{Reason, TxId};

mod tombstones;

pub use tombstones::Retention as TombstoneRetention;

/// Most decided txids remembered, by default (`--tombstones`).
pub const TOMBSTONES: usize = 100_000;

/// What the runtime answers to a Prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No {
        code: Reason,
        reason: String,
    },
    ReadOnly,
    /// One-phase only: applied and durable.
    Committed,
}

/// A branch's final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted,
}

/// What the resource made of a branch's payload, with its locks held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validated {
    /// The branch can commit; `redo` applies it.
    Ready { redo: Vec<u8> },
    /// The branch changes nothing.
    ReadOnly,
    /// The branch cannot commit.
    Refused { reason: String },
}

/// Answer to a Commit or Abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Done,
    /// The request contradicts what this participant knows (a protocol
    /// violation, or, for an Abort, "it committed").
    Refused {
        code: Reason,
        reason: String,
    },
    /// The txid is older than this participant remembers: what it knew of it
    /// was pruned, so it can tell neither "committed" nor "aborted".
    Forgotten {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The coordinator's current incarnation (from enrollment).
    CoordinatorIncarnation {
        incarnation: u64,
    },
    /// Prepare: lock `keys`, then validate. `keys` come from the payload; an
    /// `interactive` Prepare prepares the branch's work instead.
    PrepareRequested {
        txid: TxId,
        keys: Vec<String>,
        payload: Vec<u8>,
        one_phase: bool,
        incarnation: u64,
        interactive: bool,
    },
    /// Interactive work under `txid` (numbered `work` by the runtime) wants
    /// `keys` locked; the branch starts with its first work.
    WorkRequested {
        txid: TxId,
        work: u64,
        keys: Vec<String>,
        at: Instant,
    },
    /// Granted work finished: `done` (if it succeeded) joins the branch's work.
    WorkDone {
        txid: TxId,
        done: Option<Vec<u8>>,
        at: Instant,
    },
    /// Interactive branches untouched since before `since` abort (their client is gone).
    IdleCheck {
        since: Instant,
    },
    /// Tombstones older than the age bound are forgotten, by `now`; a
    /// horizon that moved is made durable (ForgetTombstones).
    ForgetOld {
        now: Instant,
    },
    /// An operator decides a branch in doubt by hand (numbered `op` by the runtime).
    HeuristicRequested {
        txid: TxId,
        commit: bool,
        op: u64,
    },
    /// The heuristic decision's record is durable: apply it.
    HeuristicLogged {
        txid: TxId,
        commit: bool,
        op: u64,
    },
    /// Found at start: a heuristic decision, and whether the coordinator's
    /// outcome was compared with it already.
    RecoveredHeuristic {
        txid: TxId,
        commit: bool,
        settled: bool,
    },
    /// The resource validated the branch.
    Validated {
        txid: TxId,
        result: Validated,
    },
    /// The prepared record is durable.
    PreparedLogged {
        txid: TxId,
        at: Instant,
    },
    CommitRequested {
        txid: TxId,
    },
    AbortRequested {
        txid: TxId,
    },
    /// Commit (or a one-phase commit) is applied and durable.
    CommitLogged {
        txid: TxId,
    },
    /// The abort is applied.
    AbortLogged {
        txid: TxId,
    },
    /// Found at start: a prepared branch with no decision.
    Recovered {
        txid: TxId,
        keys: Vec<String>,
        redo: Vec<u8>,
        at: Instant,
    },
    /// Tombstones found at start, in txid order.
    RecoveredTombstone {
        txid: TxId,
        outcome: Outcome,
    },
    /// Found at start: a coordinator's horizon of forgotten txids.
    RecoveredHorizon {
        horizon: TxId,
    },
    /// A Prepare waiting for locks waited as long as it may.
    LockWaitExpired {
        txid: TxId,
    },
    /// A read of `keys` (numbered by the runtime) wants them unlocked.
    ReadRequested {
        read: u64,
        keys: Vec<String>,
    },
    /// A read waited as long as it may.
    ReadWaitExpired {
        read: u64,
    },
    /// The coordinator answered an in-doubt query.
    OutcomeLearned {
        txid: TxId,
        outcome: Outcome,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Make these horizons durable (one per coordinator) and delete the
    /// tombstone records at or below them, in one batch (not synced: a lost
    /// batch leaves the records and the old horizon, which agree).
    ForgetTombstones {
        horizons: Vec<TxId>,
        /// Tombstones forgotten so far (for compacting their records away).
        forgotten: u64,
    },
    /// Ask the resource to validate `payload` (its keys are locked).
    Validate {
        txid: TxId,
        payload: Vec<u8>,
    },
    /// Write the prepared record with a synced write, then feed back PreparedLogged.
    LogPrepared {
        txid: TxId,
        keys: Vec<String>,
        redo: Vec<u8>,
    },
    /// Apply `redo`, record the commit and drop the prepared record, in one
    /// synced batch; then feed back CommitLogged.
    LogCommit {
        txid: TxId,
        redo: Vec<u8>,
        one_phase: bool,
    },
    /// Drop the prepared record (if `prepared`) and record the abort; then feed back AbortLogged.
    LogAbort {
        txid: TxId,
        prepared: bool,
    },
    Vote {
        txid: TxId,
        vote: Vote,
    },
    /// Feed back [`Event::LockWaitExpired`] after `after`.
    ArmLockWait {
        txid: TxId,
        after: Duration,
    },
    /// The read may go ahead: none of its keys is locked (or it waited as long as it may).
    Read {
        read: u64,
    },
    /// Feed back [`Event::ReadWaitExpired`] after `after`.
    ArmReadWait {
        read: u64,
        after: Duration,
    },
    /// The work's keys are locked: run it over `so_far`, the branch's work
    /// until now, then feed back [`Event::WorkDone`].
    WorkGranted {
        work: u64,
        so_far: Vec<u8>,
        /// The branch began with this work: the participant enlists.
        first: bool,
    },
    /// The work may not run. `aborted`: the branch is aborted here (it lost a
    /// lock conflict, or was decided or timed out before).
    WorkRefused {
        work: u64,
        code: Reason,
        reason: String,
        aborted: bool,
    },
    /// Write the heuristic decision's record (synced), then feed back
    /// [`Event::HeuristicLogged`].
    LogHeuristic {
        txid: TxId,
        commit: bool,
        op: u64,
    },
    /// Answer the operator: the heuristic decision is recorded and being applied,
    /// or refused with the reason.
    HeuristicAnswer {
        op: u64,
        refused: Option<String>,
    },
    /// The coordinator's outcome is known for a heuristically decided branch:
    /// record it, and whether it contradicts the heuristic decision.
    HeuristicOutcome {
        txid: TxId,
        coordinator: Outcome,
        contradicted: bool,
    },
    AckCommit {
        txid: TxId,
        ack: Ack,
    },
    AckAbort {
        txid: TxId,
        ack: Ack,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Branch {
    /// Interactive, before Prepare: locks held, writes buffered in `work`
    /// (the concatenated payloads of its work); `busy` while work runs.
    Active { keys: Vec<String>, work: Vec<u8>, busy: bool, touched: Instant },
    /// Locks held; the resource is validating.
    Validating { keys: Vec<String>, one_phase: bool, abort_requested: bool },
    /// Validated; the prepared record (or, one-phase, the commit) is being written.
    Logging { keys: Vec<String>, redo: Vec<u8>, one_phase: bool, abort_requested: bool },
    /// Voted YES; waiting for the decision.
    Prepared { keys: Vec<String>, redo: Vec<u8>, since: Instant },
    /// Decided COMMIT; being applied.
    Committing { keys: Vec<String> },
    /// Decided ABORT; being applied.
    Aborting { keys: Vec<String> },
}

impl Branch {
    fn keys(&self) -> &[String] {
        match self {
            Branch::Active { keys, .. }
            | Branch::Validating { keys, .. }
            | Branch::Logging { keys, .. }
            | Branch::Prepared { keys, .. }
            | Branch::Committing { keys }
            | Branch::Aborting { keys } => keys,
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Branch::Active { .. } => "active",
            Branch::Validating { .. } => "preparing",
            Branch::Logging { .. } => "preparing",
            Branch::Prepared { .. } => "prepared",
            Branch::Committing { .. } => "committing",
            Branch::Aborting { .. } => "aborting",
        }
    }
}

/// What a lock waiter wants to do once it has its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    Prepare { payload: Vec<u8>, one_phase: bool },
    Work { work: u64, first: bool },
}

/// A lock request waiting for its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiter {
    keys: Vec<String>,
    wanted: Wanted,
}

impl Waiter {
    fn is_work(&self) -> bool {
        matches!(self.wanted, Wanted::Work { .. })
    }
}

/// One locked key: its holder, the holder's state, and who waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEntry {
    pub key: String,
    pub holder: TxId,
    pub state: &'static str,
    /// Oldest first.
    pub waiters: Vec<TxId>,
}

/// Counters of the lock table since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockStats {
    /// Requests that waited for a lock.
    pub waits: u64,
    /// Waits that ran out (the request was refused).
    pub wait_timeouts: u64,
    /// Requests refused at once, or waiters that had to die, by the wait rule.
    pub conflicts: u64,
}

/// A prepared branch awaiting its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub txid: TxId,
    pub since: Instant,
    pub keys: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Engine {
    branches: HashMap<TxId, Branch>,
    locks: HashMap<String, TxId>,
    /// Prepares waiting for locks, oldest first.
    waiting: BTreeMap<TxId, Waiter>,
    lock_wait: Duration,
    /// Reads waiting for their keys to be unlocked.
    readers: BTreeMap<u64, Vec<String>>,
    read_wait: Duration,
    tombstones: tombstones::Tombstones,
    coordinator_incarnation: u64,
    /// Heuristic decisions: commit or abort, and whether the coordinator's
    /// outcome has been compared with them.
    heuristics: HashMap<TxId, (bool, bool)>,
    stats: LockStats,
    commands: Vec<Command>,
}

impl Engine {
    /// An engine whose conflicting Prepares vote NO at once.
    pub fn new() -> Self {
        Engine::default()
    }

    /// An engine whose conflicting Prepares may wait up to `lock_wait`, and
    /// whose reads of locked keys up to `read_wait`.
    pub fn with_waits(lock_wait: Duration, read_wait: Duration) -> Self {
        Engine { lock_wait, read_wait, ..Engine::default() }
    }

    /// The engine, remembering decided txids within `retention`.
    pub fn with_tombstones(self, retention: TombstoneRetention) -> Self {
        Engine { tombstones: tombstones::Tombstones::new(retention), ..self }
    }

    /// True if `txid` has a branch here (active, preparing, prepared or being decided).
    pub fn knows(&self, txid: TxId) -> bool {
        self.branches.contains_key(&txid) || self.waiting.contains_key(&txid)
    }

    /// Decided txids remembered now.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Prepares waiting for locks, oldest first.
    pub fn waiting(&self) -> Vec<TxId> {
        self.waiting.keys().copied().collect()
    }

    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Prepared branches waiting for a decision, oldest first.
    pub fn in_doubt(&self) -> Vec<InDoubt> {
        let mut out: Vec<_> = self
            .branches
            .iter()
            .filter_map(|(txid, branch)| match branch {
                Branch::Prepared { keys, since, .. } => {
                    Some(InDoubt { txid: *txid, since: *since, keys: keys.clone() })
                }
                _ => None,
            })
            .collect();
        out.sort_by_key(|b| (b.since, b.txid));
        out
    }

    /// Locked keys and their holders, in key order.
    pub fn locks(&self) -> BTreeMap<String, TxId> {
        self.locks.iter().map(|(k, t)| (k.clone(), *t)).collect()
    }

    /// The lock table: every locked key, its holder and its waiters, in key order.
    pub fn lock_table(&self) -> Vec<LockEntry> {
        let mut table: Vec<LockEntry> = self
            .locks
            .iter()
            .map(|(key, holder)| LockEntry {
                key: key.clone(),
                holder: *holder,
                state: self.branches.get(holder).map_or("unknown", Branch::state),
                waiters: self
                    .waiting
                    .iter()
                    .filter(|(_, w)| w.keys.contains(key))
                    .map(|(txid, _)| *txid)
                    .collect(),
            })
            .collect();
        table.sort_by(|a, b| a.key.cmp(&b.key));
        table
    }

    pub fn lock_stats(&self) -> LockStats {
        self.stats
    }

    /// Heuristically decided txids whose coordinator outcome is not known yet.
    pub fn unsettled_heuristics(&self) -> Vec<TxId> {
        let mut out: Vec<TxId> =
            self.heuristics.iter().filter(|(_, (_, settled))| !settled).map(|(t, _)| *t).collect();
        out.sort();
        out
    }

    /// Compares the coordinator's outcome with a heuristic decision of `txid`,
    /// once. Returns true if there was one (the caller then acks without
    /// refusing: the coordinator cannot undo it, the operator must).
    fn settle_heuristic(&mut self, txid: TxId, coordinator: Outcome) -> bool {
        let Some((commit, settled)) = self.heuristics.get_mut(&txid) else { return false };
        if !*settled {
            *settled = true;
            let contradicted = *commit != (coordinator == Outcome::Committed);
            self.commands.push(Command::HeuristicOutcome { txid, coordinator, contradicted });
        }
        true
    }

    fn on_heuristic(&mut self, txid: TxId, commit: bool, op: u64) {
        let refused = match self.branches.get(&txid) {
            Some(Branch::Prepared { .. }) if !self.heuristics.contains_key(&txid) => None,
            Some(Branch::Prepared { .. }) => {
                Some(format!("transaction {txid} is being decided by hand already"))
            }
            Some(_) => Some(format!("transaction {txid} is not in doubt here: it is being decided")),
            None => Some(match self.tombstones.get(&txid) {
                Some(Outcome::Committed) => format!("transaction {txid} is committed here already"),
                Some(Outcome::Aborted) => format!("transaction {txid} is aborted here already"),
                None => format!("transaction {txid} is not in doubt here"),
            }),
        };
        match refused {
            None => {
                // Recorded before it is applied: the record is the audit trail.
                self.heuristics.insert(txid, (commit, false));
                self.commands.push(Command::LogHeuristic { txid, commit, op });
            }
            Some(reason) => self.commands.push(Command::HeuristicAnswer { op, refused: Some(reason) }),
        }
    }

    pub fn outcome(&self, txid: TxId) -> Option<Outcome> {
        self.tombstones.get(&txid).copied()
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::CoordinatorIncarnation { incarnation } => {
                self.coordinator_incarnation = self.coordinator_incarnation.max(incarnation);
            }
            Event::PrepareRequested { txid, keys, payload, one_phase, incarnation, interactive } => {
                if interactive {
                    self.on_interactive_prepare(txid, one_phase, incarnation)
                } else {
                    self.on_prepare(txid, keys, payload, one_phase, incarnation)
                }
            }
            Event::WorkRequested { txid, work, keys, at } => self.on_work(txid, work, keys, at),
            Event::WorkDone { txid, done, at } => {
                if let Some(Branch::Active { work, busy, touched, .. }) = self.branches.get_mut(&txid) {
                    work.extend(done.unwrap_or_default());
                    (*busy, *touched) = (false, at);
                }
            }
            Event::HeuristicRequested { txid, commit, op } => self.on_heuristic(txid, commit, op),
            Event::HeuristicLogged { txid, commit, op } => {
                self.commands.push(Command::HeuristicAnswer { op, refused: None });
                // Still in doubt (nothing arrived meanwhile): decide it as the operator said.
                if matches!(self.branches.get(&txid), Some(Branch::Prepared { .. })) {
                    if commit {
                        self.on_commit(txid, false);
                    } else {
                        self.on_abort(txid, false);
                    }
                }
            }
            Event::RecoveredHeuristic { txid, commit, settled } => {
                self.heuristics.insert(txid, (commit, settled));
                // Recorded but not applied before a crash: apply it now.
                if matches!(self.branches.get(&txid), Some(Branch::Prepared { .. })) {
                    if commit {
                        self.on_commit(txid, false);
                    } else {
                        self.on_abort(txid, false);
                    }
                }
            }
            Event::ForgetOld { now } => {
                self.tombstones.age_out(now);
                if let Some(horizons) = self.tombstones.take_moved_horizons() {
                    let forgotten = self.tombstones.forgotten_count();
                    self.commands.push(Command::ForgetTombstones { horizons, forgotten });
                }
            }
            Event::RecoveredHorizon { horizon } => self.tombstones.recover_horizon(horizon),
            Event::IdleCheck { since } => {
                let mut idle: Vec<TxId> = self
                    .branches
                    .iter()
                    .filter(
                        |(_, b)| matches!(b, Branch::Active { busy: false, touched, .. } if *touched < since),
                    )
                    .map(|(txid, _)| *txid)
                    .collect();
                // In txid order: the same events always give the same commands.
                idle.sort();
                for txid in idle {
                    self.abort_active(txid);
                }
            }
            Event::Validated { txid, result } => self.on_validated(txid, result),
            Event::PreparedLogged { txid, at } => self.on_prepared_logged(txid, at),
            Event::CommitRequested { txid } => self.on_commit(txid, true),
            Event::OutcomeLearned { txid, outcome: Outcome::Committed } => self.on_commit(txid, false),
            Event::AbortRequested { txid } => self.on_abort(txid, true),
            Event::OutcomeLearned { txid, outcome: Outcome::Aborted } => self.on_abort(txid, false),
            Event::CommitLogged { txid } => {
                let Some(branch) = self.branches.remove(&txid) else {
                    panic!("commit logged for {txid}, which has no branch");
                };
                let one_phase = matches!(branch, Branch::Logging { one_phase: true, .. });
                let asked = matches!(branch, Branch::Logging { abort_requested: true, .. });
                assert!(
                    one_phase || matches!(branch, Branch::Committing { .. }),
                    "commit logged in state {branch:?}"
                );
                self.release(txid, branch.keys());
                self.remember(txid, Outcome::Committed);
                if one_phase {
                    self.commands.push(Command::Vote { txid, vote: Vote::Committed });
                    if asked {
                        let reason = format!("transaction {txid} was committed here");
                        let ack = Ack::Refused { code: Reason::AlreadyDecided, reason };
                        self.commands.push(Command::AckAbort { txid, ack });
                    }
                } else {
                    self.commands.push(Command::AckCommit { txid, ack: Ack::Done });
                }
            }
            Event::AbortLogged { txid } => {
                match self.branches.remove(&txid) {
                    Some(branch @ Branch::Aborting { .. }) => self.release(txid, branch.keys()),
                    // The record of an abort decided without a branch here: a
                    // branch of that txid now is another request's, untouched.
                    Some(branch) => {
                        self.branches.insert(txid, branch);
                        return;
                    }
                    None => {}
                }
                self.remember(txid, Outcome::Aborted);
                self.commands.push(Command::AckAbort { txid, ack: Ack::Done });
            }
            Event::Recovered { txid, keys, redo, at } => {
                for key in &keys {
                    // Two prepared branches never hold one key: prepare takes the lock first.
                    let holder = self.locks.insert(key.clone(), txid);
                    assert!(holder.is_none() || holder == Some(txid), "key {key:?} recovered locked twice");
                }
                self.branches.insert(txid, Branch::Prepared { keys, redo, since: at });
            }
            Event::RecoveredTombstone { txid, outcome } => self.remember(txid, outcome),
            Event::ReadRequested { read, keys } => {
                if self.read_wait.is_zero() || keys.iter().all(|k| !self.locks.contains_key(k)) {
                    self.commands.push(Command::Read { read });
                } else {
                    self.readers.insert(read, keys);
                    self.commands.push(Command::ArmReadWait { read, after: self.read_wait });
                }
            }
            Event::ReadWaitExpired { read } => {
                // Still locked (a branch in doubt): read what is committed here.
                if self.readers.remove(&read).is_some() {
                    self.commands.push(Command::Read { read });
                }
            }
            Event::LockWaitExpired { txid } => {
                if let Some(waiter) = self.waiting.remove(&txid) {
                    self.stats.wait_timeouts += 1;
                    let reason = match self.conflict(txid, &waiter.keys) {
                        Some((key, holder)) => format!(
                            "lock conflict on key {key:?} (held by {holder}; waited {} ms)",
                            self.lock_wait.as_millis()
                        ),
                        None => "lock wait expired".into(),
                    };
                    self.refuse_waiter(txid, waiter, reason);
                    // Its place in the queue is free: younger waiters may go now.
                    self.settle_waiters();
                }
            }
        }
    }

    /// The first of `keys` locked by another transaction, and its holder.
    fn conflict(&self, txid: TxId, keys: &[String]) -> Option<(String, TxId)> {
        keys.iter().find_map(|k| self.locks.get(k).filter(|h| **h != txid).map(|h| (k.clone(), *h)))
    }

    /// The wait rule, one edge at a time: may `txid` (asking for interactive
    /// `work`, or a one-shot Prepare) wait for `other` (which is interactive
    /// work: an active branch or a work waiter, or else a branch that is
    /// preparing or decided, or a waiting Prepare)?
    ///
    /// No cycle of waits can form. Waits among interactive work go from older
    /// to younger (wait-die). Waits among one-shot Prepares and branches in
    /// phase one or two go from younger to older. Interactive work may wait
    /// for a preparing branch, but a one-shot Prepare never waits for
    /// interactive work: so a chain of waits that leaves interactive work never
    /// comes back to it, and each of the two kinds of chain is ordered by age.
    /// (A branch past Prepare takes no further locks anywhere, as its keys are
    /// taken whole at Prepare, or were taken by its work before it.)
    pub fn may_wait_for(txid: TxId, work: bool, other: TxId, other_is_work: bool) -> bool {
        match (work, other_is_work) {
            (true, true) => txid < other,
            (true, false) => true,
            (false, true) => false,
            (false, false) => txid > other,
        }
    }

    /// Conflicting holders of `keys` and waiters for them (older waiters only
    /// if `older_waiters_only`), each with whether it is interactive work.
    fn blockers(&self, txid: TxId, keys: &[String], older_waiters_only: bool) -> Vec<(TxId, bool)> {
        let holders = keys
            .iter()
            .filter_map(|k| self.locks.get(k))
            .filter(|h| **h != txid)
            .map(|h| (*h, matches!(self.branches.get(h), Some(Branch::Active { .. }))));
        let waiters = self
            .waiting
            .iter()
            .filter(|(w, waiter)| {
                **w != txid
                    && (!older_waiters_only || **w < txid)
                    && waiter.keys.iter().any(|k| keys.contains(k))
            })
            .map(|(w, waiter)| (*w, waiter.is_work()));
        holders.chain(waiters).collect()
    }

    /// True if `txid` may wait for every holder and waiter in its way.
    fn may_wait(&self, txid: TxId, keys: &[String], work: bool) -> bool {
        self.blockers(txid, keys, false)
            .into_iter()
            .all(|(other, is_work)| Engine::may_wait_for(txid, work, other, is_work))
    }

    /// Queues a lock request, or refuses it if it may not wait.
    fn wait_or_refuse(&mut self, txid: TxId, waiter: Waiter, reason: String) {
        if !self.lock_wait.is_zero() && self.may_wait(txid, &waiter.keys, waiter.is_work()) {
            self.stats.waits += 1;
            self.waiting.insert(txid, waiter);
            self.commands.push(Command::ArmLockWait { txid, after: self.lock_wait });
            // An older work waiter goes first: younger work waiting for the same keys dies.
            self.settle_waiters();
        } else {
            self.stats.conflicts += 1;
            self.refuse_waiter(txid, waiter, reason);
        }
    }

    /// Answers a lock request that will not be granted. Work loses its branch:
    /// a transaction that dies releases its locks, so the older one it was in
    /// the way of can go on.
    fn refuse_waiter(&mut self, txid: TxId, waiter: Waiter, reason: String) {
        match waiter.wanted {
            Wanted::Prepare { .. } => {
                // NO means aborted: remembered, so that a late or repeated
                // Prepare of it votes NO too, never commits. (A restart drops
                // the connections a stale copy could come on.)
                self.remember(txid, Outcome::Aborted);
                self.commands
                    .push(Command::Vote { txid, vote: Vote::No { code: Reason::LockConflict, reason } });
            }
            Wanted::Work { work, .. } => {
                self.abort_active(txid);
                self.commands.push(Command::WorkRefused {
                    work,
                    code: Reason::LockConflict,
                    reason,
                    aborted: true,
                });
            }
        }
    }

    /// Aborts an interactive branch before Prepare: releases its locks and
    /// remembers the abort, so its Prepare votes NO.
    fn abort_active(&mut self, txid: TxId) {
        if let Some(branch @ Branch::Active { .. }) = self.branches.remove(&txid) {
            self.commands.push(Command::LogAbort { txid, prepared: false });
            self.remember(txid, Outcome::Aborted);
            self.release(txid, branch.keys());
        }
    }

    /// Takes the locks of `keys` and starts validating.
    fn start_validating(&mut self, txid: TxId, keys: Vec<String>, payload: Vec<u8>, one_phase: bool) {
        for key in &keys {
            self.locks.insert(key.clone(), txid);
        }
        self.branches.insert(txid, Branch::Validating { keys, one_phase, abort_requested: false });
        self.commands.push(Command::Validate { txid, payload });
    }

    /// Grants waiting Prepares whose keys are all free, oldest first. A waiter
    /// never overtakes an older waiter that wants one of its keys.
    fn grant_waiters(&mut self) {
        let mut blocked: Vec<String> = Vec::new();
        let mut granted = Vec::new();
        for (txid, waiter) in &self.waiting {
            let free = self.conflict(*txid, &waiter.keys).is_none()
                && !waiter.keys.iter().any(|k| blocked.contains(k));
            if free {
                granted.push(*txid);
            }
            // Granted or not, its keys are spoken for ahead of younger waiters.
            blocked.extend(waiter.keys.iter().cloned());
        }
        for txid in granted {
            let Waiter { keys, wanted } = self.waiting.remove(&txid).expect("listed above");
            match wanted {
                Wanted::Prepare { payload, one_phase } => {
                    self.start_validating(txid, keys, payload, one_phase)
                }
                Wanted::Work { work, first } => self.grant_work(txid, work, first, keys),
            }
        }
    }

    /// Grants what can be granted, then refuses waiters that the new holders
    /// and the waiters ahead of them no longer allow to wait (wait-die: a
    /// younger work waiter behind older interactive work dies), until stable.
    fn settle_waiters(&mut self) {
        loop {
            self.grant_waiters();
            let dying: Vec<TxId> = self
                .waiting
                .iter()
                .filter(|(txid, waiter)| {
                    !self.blockers(**txid, &waiter.keys, true).into_iter().all(|(other, is_work)| {
                        Engine::may_wait_for(**txid, waiter.is_work(), other, is_work)
                    })
                })
                .map(|(txid, _)| *txid)
                .collect();
            if dying.is_empty() {
                return;
            }
            for txid in dying {
                if let Some(waiter) = self.waiting.remove(&txid) {
                    self.stats.conflicts += 1;
                    let reason =
                        "lock conflict: an older transaction wants the same keys (wait-die)".to_owned();
                    self.refuse_waiter(txid, waiter, reason);
                }
            }
        }
    }

    /// Locks `keys` for the active branch `txid` and lets its work run.
    fn grant_work(&mut self, txid: TxId, work: u64, first: bool, keys: Vec<String>) {
        for key in &keys {
            self.locks.insert(key.clone(), txid);
        }
        match self.branches.get_mut(&txid) {
            Some(Branch::Active { keys: held, work: so_far, .. }) => {
                held.extend(keys);
                let so_far = so_far.clone();
                self.commands.push(Command::WorkGranted { work, so_far, first });
            }
            _ => unreachable!("work is granted only to an active branch"),
        }
    }

    fn on_work(&mut self, txid: TxId, work: u64, keys: Vec<String>, at: Instant) {
        let refuse = |code: Reason, reason: String, aborted: bool| Command::WorkRefused {
            work,
            code,
            reason,
            aborted,
        };
        if let Some(outcome) = self.tombstones.get(&txid) {
            let done = if *outcome == Outcome::Aborted { "aborted" } else { "committed" };
            let reason = format!("transaction {txid} was {done} here");
            self.commands.push(refuse(Reason::AlreadyDecided, reason, *outcome == Outcome::Aborted));
            return;
        }
        if let (Some(horizon), false) = (self.tombstones.forgotten(txid), self.branches.contains_key(&txid)) {
            self.commands.push(refuse(Reason::Stale, forgotten(txid, horizon), true));
            return;
        }
        if txid.incarnation < self.coordinator_incarnation {
            let reason = format!("transaction {txid} is from an earlier coordinator incarnation");
            self.commands.push(refuse(Reason::Stale, reason, true));
            return;
        }
        if self.waiting.contains_key(&txid) {
            // Its Prepare (or other work) waits for locks: one request at a time.
            let reason = "another request of this transaction is waiting for locks here".into();
            self.commands.push(refuse(Reason::InProgress, reason, false));
            return;
        }
        let first = !self.branches.contains_key(&txid);
        match self.branches.get_mut(&txid) {
            None => {
                let branch = Branch::Active { keys: Vec::new(), work: Vec::new(), busy: true, touched: at };
                self.branches.insert(txid, branch);
            }
            Some(Branch::Active { busy: busy @ false, touched, .. }) => (*busy, *touched) = (true, at),
            Some(Branch::Active { busy: true, .. }) => {
                let reason = "other work of this transaction is running here: one request at a time".into();
                self.commands.push(refuse(Reason::InProgress, reason, false));
                return;
            }
            Some(_) => {
                self.commands.push(refuse(
                    Reason::AlreadyDecided,
                    format!("transaction {txid} is committing here"),
                    false,
                ));
                return;
            }
        }
        let held = self.branches.get(&txid).map(|b| b.keys().to_vec()).unwrap_or_default();
        let mut wanted: Vec<String> = keys.into_iter().filter(|k| !held.contains(k)).collect();
        wanted.sort();
        wanted.dedup();
        let queued = self.waiting.values().any(|w| w.keys.iter().any(|k| wanted.contains(k)));
        match self.conflict(txid, &wanted) {
            None if !queued => self.grant_work(txid, work, first, wanted),
            conflict => {
                let reason = match conflict {
                    Some((key, holder)) => format!("lock conflict on key {key:?} (held by {holder})"),
                    None => "lock conflict: another transaction is waiting for the same keys".to_owned(),
                };
                self.wait_or_refuse(
                    txid,
                    Waiter { keys: wanted, wanted: Wanted::Work { work, first } },
                    reason,
                );
            }
        }
    }

    fn on_interactive_prepare(&mut self, txid: TxId, one_phase: bool, incarnation: u64) {
        let no = |code: Reason, reason: String| Command::Vote { txid, vote: Vote::No { code, reason } };
        match self.branches.remove(&txid) {
            Some(Branch::Active { keys, work, busy: false, .. })
                if incarnation >= self.coordinator_incarnation =>
            {
                self.start_validating(txid, keys, work, one_phase);
            }
            Some(branch @ Branch::Active { busy: true, .. }) => {
                self.branches.insert(txid, branch);
                self.commands
                    .push(no(Reason::InProgress, "work of this transaction is still running here".into()));
            }
            Some(Branch::Active { .. }) => {
                self.abort_active(txid);
                self.commands.push(no(
                    Reason::Stale,
                    format!("stale Prepare from coordinator incarnation {incarnation}"),
                ));
            }
            Some(other) => {
                self.branches.insert(txid, other);
                // Already preparing or decided: answer like a repeated one-shot Prepare.
                self.on_prepare(txid, Vec::new(), Vec::new(), one_phase, incarnation);
            }
            None => match self.tombstones.get(&txid) {
                Some(_) => self.on_prepare(txid, Vec::new(), Vec::new(), one_phase, incarnation),
                // Decided long ago and forgotten: stale. Remember nothing (it may have committed).
                None if self.tombstones.forgotten(txid).is_some() => {
                    self.on_prepare(txid, Vec::new(), Vec::new(), one_phase, incarnation)
                }
                None => {
                    // The work is gone (lost in a restart): it must not commit without it.
                    self.remember(txid, Outcome::Aborted);
                    self.commands.push(no(
                        Reason::WorkLost,
                        "no work of this transaction here (lost in a restart, or timed out)".into(),
                    ));
                }
            },
        }
    }

    fn on_prepare(
        &mut self,
        txid: TxId,
        keys: Vec<String>,
        payload: Vec<u8>,
        one_phase: bool,
        incarnation: u64,
    ) {
        let no = |code: Reason, reason: String| Command::Vote { txid, vote: Vote::No { code, reason } };
        if let Some(outcome) = self.tombstones.get(&txid) {
            let vote = match outcome {
                Outcome::Aborted => Vote::No {
                    code: Reason::AlreadyDecided,
                    reason: "transaction already aborted here".into(),
                },
                Outcome::Committed if one_phase => Vote::Committed,
                Outcome::Committed => Vote::Yes,
            };
            self.commands.push(Command::Vote { txid, vote });
            return;
        }
        if let Some(branch) = self.branches.get(&txid) {
            let command = match branch {
                Branch::Prepared { .. } | Branch::Committing { .. } => {
                    Command::Vote { txid, vote: Vote::Yes }
                }
                // A repeated Prepare while the first is under way: the one vote
                // to come answers both (never a NO for a branch that may commit).
                Branch::Validating { .. } | Branch::Logging { .. } => return,
                Branch::Aborting { .. } => {
                    no(Reason::AlreadyDecided, "transaction is being aborted here".into())
                }
                Branch::Active { .. } => {
                    no(Reason::InProgress, "this transaction has interactive work here".into())
                }
            };
            self.commands.push(command);
            return;
        }
        if let Some(horizon) = self.tombstones.forgotten(txid) {
            self.commands.push(no(Reason::Stale, forgotten(txid, horizon)));
            return;
        }
        if incarnation < self.coordinator_incarnation {
            self.commands.push(no(
                Reason::Stale,
                format!(
                    "stale Prepare from coordinator incarnation {incarnation} (current is {})",
                    self.coordinator_incarnation
                ),
            ));
            return;
        }
        match self.waiting.get(&txid) {
            Some(waiter) if waiter.is_work() => {
                self.commands.push(no(
                    Reason::InProgress,
                    "interactive work of this transaction is waiting here".into(),
                ));
                return;
            }
            Some(_) => return, // a repeated Prepare: the waiting one's vote answers both
            None => {}
        }
        if let Some((key, holder)) = self.conflict(txid, &keys) {
            let reason = format!("lock conflict on key {key:?} (held by {holder})");
            self.wait_or_refuse(
                txid,
                Waiter { keys, wanted: Wanted::Prepare { payload, one_phase } },
                reason,
            );
            return;
        }
        if self.waiting.values().any(|w| w.keys.iter().any(|k| keys.contains(k))) {
            // The keys are free, but an older Prepare queues for one of them:
            // do not overtake it.
            let reason = "lock conflict: an older transaction is waiting for the same keys".to_owned();
            self.wait_or_refuse(
                txid,
                Waiter { keys, wanted: Wanted::Prepare { payload, one_phase } },
                reason,
            );
            return;
        }
        self.start_validating(txid, keys, payload, one_phase);
    }

    fn on_validated(&mut self, txid: TxId, result: Validated) {
        let Some(Branch::Validating { keys, one_phase, abort_requested }) = self.branches.remove(&txid)
        else {
            panic!("validated {txid}, which was not validating");
        };
        if abort_requested {
            // Aborted while validating: whatever validation found, the branch
            // ends here, remembered as aborted so a late Prepare votes NO.
            self.release(txid, &keys);
            self.commands.push(Command::LogAbort { txid, prepared: false });
            self.remember(txid, Outcome::Aborted);
            let vote = Vote::No { code: Reason::AlreadyDecided, reason: "aborted while preparing".into() };
            self.commands.push(Command::Vote { txid, vote });
            return;
        }
        match result {
            Validated::Ready { redo } => {
                if one_phase {
                    self.commands.push(Command::LogCommit { txid, redo: redo.clone(), one_phase: true });
                } else {
                    self.commands.push(Command::LogPrepared { txid, keys: keys.clone(), redo: redo.clone() });
                }
                self.branches.insert(txid, Branch::Logging { keys, redo, one_phase, abort_requested: false });
            }
            Validated::ReadOnly => {
                self.release(txid, &keys);
                let vote = if one_phase { Vote::Committed } else { Vote::ReadOnly };
                self.commands.push(Command::Vote { txid, vote });
            }
            Validated::Refused { reason } => {
                self.release(txid, &keys);
                self.remember(txid, Outcome::Aborted);
                self.commands
                    .push(Command::Vote { txid, vote: Vote::No { code: Reason::ValidationFailed, reason } });
            }
        }
    }

    fn on_prepared_logged(&mut self, txid: TxId, at: Instant) {
        let Some(Branch::Logging { keys, redo, one_phase: false, abort_requested }) =
            self.branches.remove(&txid)
        else {
            panic!("prepared record logged for {txid}, which was not logging one");
        };
        if abort_requested {
            // The coordinator already gave up on it: never vote YES now.
            self.commands.push(Command::LogAbort { txid, prepared: true });
            let vote = Vote::No { code: Reason::AlreadyDecided, reason: "aborted while preparing".into() };
            self.commands.push(Command::Vote { txid, vote });
            self.branches.insert(txid, Branch::Aborting { keys });
            return;
        }
        self.branches.insert(txid, Branch::Prepared { keys, redo, since: at });
        self.commands.push(Command::Vote { txid, vote: Vote::Yes });
    }

    /// Commit from the coordinator (`ack` set) or learned by asking it.
    fn on_commit(&mut self, txid: TxId, ack: bool) {
        let reply = |engine: &mut Engine, result: Ack| {
            if ack {
                engine.commands.push(Command::AckCommit { txid, ack: result });
            }
        };
        match self.branches.remove(&txid) {
            Some(Branch::Prepared { keys, redo, .. }) => {
                self.commands.push(Command::LogCommit { txid, redo, one_phase: false });
                self.branches.insert(txid, Branch::Committing { keys });
            }
            Some(branch @ Branch::Committing { .. }) => {
                // Already being applied: every waiting Commit is acked when it is durable.
                self.branches.insert(txid, branch);
            }
            Some(branch) => {
                self.branches.insert(txid, branch);
                let reason = format!("transaction {txid} is not prepared here");
                reply(self, Ack::Refused { code: Reason::NotPrepared, reason });
            }
            None if self.settle_heuristic(txid, Outcome::Committed) => reply(self, Ack::Done),
            None => match self.tombstones.get(&txid) {
                Some(Outcome::Aborted) => {
                    let reason = format!("transaction {txid} was aborted here");
                    reply(self, Ack::Refused { code: Reason::AlreadyDecided, reason })
                }
                // Committed already, or never seen: nothing to do.
                Some(Outcome::Committed) | None => reply(self, Ack::Done),
            },
        }
    }

    /// Abort from the coordinator (`ack` set) or learned by asking it.
    fn on_abort(&mut self, txid: TxId, ack: bool) {
        if let Some(waiter) = self.waiting.remove(&txid) {
            // Its request never took a lock: answer it, and remember the abort below.
            match waiter.wanted {
                Wanted::Prepare { .. } => {
                    let reason = "aborted while waiting for locks".to_owned();
                    self.commands.push(Command::Vote {
                        txid,
                        vote: Vote::No { code: Reason::AlreadyDecided, reason },
                    });
                }
                Wanted::Work { work, .. } => {
                    let reason = format!("transaction {txid} was aborted while waiting for locks");
                    let code = Reason::AlreadyDecided;
                    self.commands.push(Command::WorkRefused { work, code, reason, aborted: true });
                }
            }
        }
        let reply = |engine: &mut Engine, result: Ack| {
            if ack {
                engine.commands.push(Command::AckAbort { txid, ack: result });
            }
        };
        match self.branches.remove(&txid) {
            Some(Branch::Prepared { keys, .. }) => {
                self.commands.push(Command::LogAbort { txid, prepared: true });
                self.branches.insert(txid, Branch::Aborting { keys });
            }
            Some(branch @ Branch::Active { .. }) => {
                // Acked once the abort is recorded.
                self.branches.insert(txid, branch);
                self.abort_active(txid);
            }
            Some(Branch::Validating { keys, one_phase, .. }) => {
                self.branches.insert(txid, Branch::Validating { keys, one_phase, abort_requested: true });
                reply(self, Ack::Done);
            }
            Some(Branch::Logging { keys, redo, one_phase: false, .. }) => {
                self.branches
                    .insert(txid, Branch::Logging { keys, redo, one_phase: false, abort_requested: true });
                reply(self, Ack::Done);
            }
            Some(Branch::Logging { keys, redo, one_phase: true, .. }) => {
                // A one-phase commit is being written: the Abort is answered
                // "committed" once it is durable (it is how a coordinator that
                // lost the vote learns the outcome), never before.
                self.branches
                    .insert(txid, Branch::Logging { keys, redo, one_phase: true, abort_requested: true });
            }
            Some(branch @ Branch::Committing { .. }) => {
                self.branches.insert(txid, branch);
                let reason = format!("transaction {txid} is committing here");
                reply(self, Ack::Refused { code: Reason::AlreadyDecided, reason });
            }
            Some(branch @ Branch::Aborting { .. }) => {
                // Already being applied: every waiting Abort is acked when it is done.
                self.branches.insert(txid, branch);
            }
            None if self.settle_heuristic(txid, Outcome::Aborted) => reply(self, Ack::Done),
            None => match self.tombstones.get(&txid) {
                Some(Outcome::Committed) => {
                    let reason = format!("transaction {txid} was committed here");
                    reply(self, Ack::Refused { code: Reason::AlreadyDecided, reason })
                }
                Some(Outcome::Aborted) => reply(self, Ack::Done),
                None if self.tombstones.forgotten(txid).is_some() => {
                    // It may have been a one-phase commit here: "aborted" could be a lie.
                    let horizon = self.tombstones.forgotten(txid).expect("just checked");
                    reply(self, Ack::Forgotten { reason: forgotten(txid, horizon) })
                }
                None => {
                    // Never seen: remember it, so that a late Prepare votes NO.
                    self.commands.push(Command::LogAbort { txid, prepared: false });
                    self.remember(txid, Outcome::Aborted);
                }
            },
        }
    }

    fn release(&mut self, txid: TxId, keys: &[String]) {
        for key in keys {
            if self.locks.get(key) == Some(&txid) {
                self.locks.remove(key);
            }
        }
        if !self.waiting.is_empty() {
            self.settle_waiters();
        }
        if !self.readers.is_empty() {
            let ready: Vec<u64> = self
                .readers
                .iter()
                .filter(|(_, keys)| keys.iter().all(|k| !self.locks.contains_key(k)))
                .map(|(read, _)| *read)
                .collect();
            for read in ready {
                self.readers.remove(&read);
                self.commands.push(Command::Read { read });
            }
        }
    }

    fn remember(&mut self, txid: TxId, outcome: Outcome) {
        self.tombstones.remember(txid, outcome);
    }
}

/// Why a message for a forgotten txid is refused.
fn forgotten(txid: TxId, horizon: TxId) -> String {
    format!(
        "transaction {txid} is older than this participant remembers (decided transactions up to {horizon} \
         are forgotten): a stale message"
    )
}

#[cfg(test)]
mod tests;
