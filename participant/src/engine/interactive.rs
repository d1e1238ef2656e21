//! Interactive work (Kv.Execute under a txid): the branch starts with its
//! first work, locks what each work touches until the decision, buffers its
//! writes, and is prepared from that work at Commit.

use std::time::Instant;

use decree_proto::{Reason, TxId};

use super::locks::{Waiter, Wanted};
use super::{forgotten, Branch, Command, Engine, Outcome, Vote};

impl Engine {
    /// Aborts an interactive branch before Prepare: releases its locks and
    /// remembers the abort, so its Prepare votes NO.
    pub(super) fn abort_active(&mut self, txid: TxId) {
        if let Some(branch @ Branch::Active { .. }) = self.branches.remove(&txid) {
            self.commands.push(Command::LogAbort { txid, prepared: false });
            self.remember(txid, Outcome::Aborted);
            self.release(txid, branch.keys());
        }
    }

    /// A newer request makes `txid`'s work moot (a migration batch that the
    /// coordinator has given up): aborts it if it is active. True if `txid`
    /// can no longer commit here (it was active, or has no branch); false if
    /// it is preparing, prepared or being decided, which only its decision ends.
    pub fn supersede(&mut self, txid: TxId) -> bool {
        match self.branches.get(&txid) {
            None => true,
            Some(Branch::Active { .. }) => {
                self.abort_active(txid);
                true
            }
            Some(_) => false,
        }
    }

    /// Locks `keys` for the active branch `txid` and lets its work run.
    pub(super) fn grant_work(&mut self, txid: TxId, work: u64, first: bool, keys: Vec<String>) {
        match self.branches.get_mut(&txid) {
            Some(Branch::Active { keys: held, work: so_far, .. }) => {
                let so_far = so_far.clone();
                held.extend(keys.iter().cloned());
                self.locks.take(txid, &keys);
                self.commands.push(Command::WorkGranted { work, so_far, first });
            }
            // Decided (or aborted) while the work waited for its locks: it never runs.
            _ => self.commands.push(Command::WorkRefused {
                work,
                code: Reason::AlreadyDecided,
                reason: format!("transaction {txid} ended here while this work waited for locks"),
                aborted: !self.branches.contains_key(&txid),
            }),
        }
    }

    pub(super) fn on_work(&mut self, txid: TxId, work: u64, keys: Vec<String>, at: Instant) {
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
        // A txid of an earlier coordinator incarnation is taken: the next
        // incarnation knows every interactive transaction begun, and its
        // Enlist (which the first work here waits for) refuses one it does not.
        if self.locks.waiter(txid).is_some() {
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
        let queued = self.locks.queued_for(&wanted);
        match self.locks.conflict(txid, &wanted) {
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

    pub(super) fn on_interactive_prepare(&mut self, txid: TxId, one_phase: bool, incarnation: u64) {
        let no = |code: Reason, reason: String| Command::Vote { txid, vote: Vote::No { code, reason } };
        // Looked at in place: only a branch that starts validating leaves the
        // map here; every other arm finds it where its handlers look (a stale
        // arm that took it out aborted nothing and left its keys locked for
        // good: simulator seed 40113328, liveness).
        let active = match self.branches.get(&txid) {
            Some(Branch::Active { busy, .. }) => Some(*busy),
            Some(_) => None,
            None => return self.on_interactive_prepare_unknown(txid, one_phase, incarnation),
        };
        match active {
            Some(false) if incarnation >= self.coordinator_incarnation => {
                if let Some(Branch::Active { keys, work, .. }) = self.branches.remove(&txid) {
                    self.start_validating(txid, keys, work, one_phase);
                }
            }
            Some(true) => {
                // NO: the transaction aborts, and the coordinator tells only
                // those that may hold a prepared branch, never a NO voter. So
                // roll back here now, as every NO voter does: the keys go free
                // (the work still running finds its branch gone).
                self.on_abort(txid, false);
                self.commands
                    .push(no(Reason::InProgress, "work of this transaction is still running here".into()));
            }
            Some(false) => {
                self.abort_active(txid);
                self.commands.push(no(
                    Reason::Stale,
                    format!("stale Prepare from coordinator incarnation {incarnation}"),
                ));
            }
            // Already preparing or decided: answer like a repeated one-shot Prepare.
            None => self.on_prepare(txid, Vec::new(), Vec::new(), one_phase, incarnation),
        }
    }

    /// An interactive Prepare for a txid with no branch here.
    fn on_interactive_prepare_unknown(&mut self, txid: TxId, one_phase: bool, incarnation: u64) {
        let no = |code: Reason, reason: String| Command::Vote { txid, vote: Vote::No { code, reason } };
        match self.tombstones.get(&txid) {
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
        }
    }
}
