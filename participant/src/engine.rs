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
//! - interactive work of an older coordinator incarnation outlives a newer
//!   one: the coordinator records every interactive transaction it begins
//!   and each enlistment before answering, so its next incarnation (a
//!   restart, a group's next leader) prepares or aborts the work; a
//!   coordinator that lost it leaves it to the branch's idle timeout;
//! - decided txids are remembered within a bound (count and age, see
//!   [`tombstones`]); a txid below what was forgotten is refused as stale, never
//!   taken for new, and an Abort for it is answered "forgotten", never "done".
//!
//! Its parts, one job each: `locks` (the lock table and the wait rule: pure
//! bookkeeping, no commands), `waits` (what becomes of a request that
//! conflicts), `interactive` (work under a txid before its Prepare),
//! `heuristics` (decisions by hand), [`tombstones`] (decided txids, within a
//! bound); this file holds the branch states and phases one and two.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use decree_proto::{Reason, TxId};
use foldhash::HashMap;

mod heuristics;
mod interactive;
mod locks;
mod tombstones;
mod waits;

pub use locks::{may_wait_for, LockEntry, LockStats};
use locks::{LockTable, ReadGate, Waiter, Wanted};

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
    /// A key of the branch is not this participant's to serve now (a stale
    /// route, or a key moving): NO with `code` ([`Reason::WrongOwner`] or
    /// [`Reason::Migrating`]), so the client routes again.
    NotOwned { code: Reason, reason: String },
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
    /// The read may go ahead: none of its keys is locked (or it waited as long
    /// as it may, and what holds them cannot have committed).
    Read {
        read: u64,
    },
    /// The read is refused ([`decree_proto::Reason::InDoubt`]): a key it waited
    /// for is still held by a branch that voted YES (or is voting), whose
    /// transaction may have committed, so the value here may be stale.
    RefuseRead {
        read: u64,
        /// The key still held, and the branch holding it.
        key: String,
        holder: TxId,
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
    /// Who holds and who waits for which key.
    locks: LockTable,
    tombstones: tombstones::Tombstones,
    coordinator_incarnation: u64,
    /// Heuristic decisions: commit or abort, and whether the coordinator's
    /// outcome has been compared with them.
    heuristics: HashMap<TxId, (bool, bool)>,
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
        Engine { locks: LockTable::new(lock_wait, read_wait), ..Engine::default() }
    }

    /// The engine, remembering decided txids within `retention`.
    pub fn with_tombstones(self, retention: TombstoneRetention) -> Self {
        Engine { tombstones: tombstones::Tombstones::new(retention), ..self }
    }

    /// True if `txid` has a branch here (active, preparing, prepared or being decided).
    pub fn knows(&self, txid: TxId) -> bool {
        self.branches.contains_key(&txid) || self.locks.waiter(txid).is_some()
    }

    /// Decided txids remembered now.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// Prepares waiting for locks, oldest first.
    pub fn waiting(&self) -> Vec<TxId> {
        self.locks.waiting()
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
        self.locks.holders()
    }

    /// The lock table: every locked key, its holder and its waiters, in key order.
    pub fn lock_table(&self) -> Vec<LockEntry> {
        self.locks.table(|holder| self.branches.get(&holder).map_or("unknown", Branch::state))
    }

    pub fn lock_stats(&self) -> LockStats {
        self.locks.stats
    }

    pub fn outcome(&self, txid: TxId) -> Option<Outcome> {
        self.tombstones.get(&txid).copied()
    }

    pub fn on_event(&mut self, event: Event) {
        match event {
            Event::CoordinatorIncarnation { incarnation } => {
                if incarnation > self.coordinator_incarnation {
                    self.coordinator_incarnation = incarnation;
                }
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
                // Two prepared branches never hold one key: prepare takes the lock first.
                if let Some((key, other)) = self.locks.take(txid, &keys) {
                    panic!("key {key:?} recovered locked by {other} and {txid}");
                }
                self.branches.insert(txid, Branch::Prepared { keys, redo, since: at });
            }
            Event::RecoveredTombstone { txid, outcome } => self.remember(txid, outcome),
            Event::ReadRequested { read, keys } => match self.locks.read(read, keys) {
                ReadGate::Go => self.commands.push(Command::Read { read }),
                ReadGate::Waits => {
                    self.commands.push(Command::ArmReadWait { read, after: self.locks.read_wait })
                }
                ReadGate::Locked(keys) => self.read_locked(read, &keys),
            },
            Event::ReadWaitExpired { read } => {
                if let Some(keys) = self.locks.read_expired(read) {
                    self.read_locked(read, &keys);
                }
            }
            Event::LockWaitExpired { txid } => {
                if let Some(waiter) = self.locks.dequeue(txid) {
                    self.locks.stats.wait_timeouts += 1;
                    let reason = match self.locks.conflict(txid, &waiter.keys) {
                        Some((key, holder)) => format!(
                            "lock conflict on key {key:?} (held by {holder}; waited {} ms)",
                            self.locks.lock_wait.as_millis()
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

    /// Takes the locks of `keys` and starts validating.
    fn start_validating(&mut self, txid: TxId, keys: Vec<String>, payload: Vec<u8>, one_phase: bool) {
        self.locks.take(txid, &keys);
        self.branches.insert(txid, Branch::Validating { keys, one_phase, abort_requested: false });
        self.commands.push(Command::Validate { txid, payload });
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
                    // NO, so the transaction aborts; the coordinator tells
                    // only those that may hold a prepared branch, never a NO
                    // voter: roll the interactive branch back here now, or
                    // its keys stay locked until it idles out.
                    self.on_abort(txid, false);
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
        match self.locks.waiter(txid) {
            Some(waiter) if waiter.is_work() => {
                // NO: roll back as above (the waiting work is refused).
                self.on_abort(txid, false);
                self.commands.push(no(
                    Reason::InProgress,
                    "interactive work of this transaction is waiting here".into(),
                ));
                return;
            }
            Some(_) => return, // a repeated Prepare: the waiting one's vote answers both
            None => {}
        }
        if let Some((key, holder)) = self.locks.conflict(txid, &keys) {
            let reason = format!("lock conflict on key {key:?} (held by {holder})");
            self.wait_or_refuse(
                txid,
                Waiter { keys, wanted: Wanted::Prepare { payload, one_phase } },
                reason,
            );
            return;
        }
        if self.locks.queued_for(&keys) {
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
            Validated::NotOwned { code, reason } => {
                self.release(txid, &keys);
                self.remember(txid, Outcome::Aborted);
                self.commands.push(Command::Vote { txid, vote: Vote::No { code, reason } });
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
        if let Some(waiter) = self.locks.dequeue(txid) {
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
                // Acked once the abort tombstone that validation's end writes
                // is recorded (`AbortLogged`), as for any txid never prepared
                // here: the ack tells a coordinator asking about a one-phase
                // branch that it never commits, and only the tombstone keeps
                // a late Prepare from committing it after a restart.
                self.branches.insert(txid, Branch::Validating { keys, one_phase, abort_requested: true });
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

    /// A read whose keys are still locked once it may wait no longer: what is
    /// committed here is the value unless a holder voted YES (or is voting):
    /// its transaction may have committed elsewhere already, and a client told
    /// so must not read the value from before it (the read is refused).
    /// Interactive work not yet prepared, or a branch aborting, cannot have
    /// changed the value.
    fn read_locked(&mut self, read: u64, keys: &[String]) {
        let in_doubt = keys.iter().find_map(|key| {
            let holder = self.locks.holder(key)?;
            let may_commit = match self.branches.get(&holder)? {
                Branch::Logging { .. } | Branch::Prepared { .. } | Branch::Committing { .. } => true,
                Branch::Active { .. } | Branch::Validating { .. } | Branch::Aborting { .. } => false,
            };
            may_commit.then_some((key, holder))
        });
        match in_doubt {
            Some((key, holder)) => self.commands.push(Command::RefuseRead { read, key: key.clone(), holder }),
            None => self.commands.push(Command::Read { read }),
        }
    }

    fn release(&mut self, txid: TxId, keys: &[String]) {
        self.locks.release(txid, keys);
        if self.locks.has_waiters() {
            self.settle_waiters();
        }
        for read in self.locks.ready_reads() {
            self.commands.push(Command::Read { read });
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
