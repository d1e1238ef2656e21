//! Lock waits: whether a request that conflicts may wait, by the wait rule
//! of [`super::locks`], and what happens to waiters as locks are released:
//! granted oldest first, or refused when the rule no longer lets them wait.

use decree_proto::{Reason, TxId};
use foldhash::HashMap;

use super::locks::{may_wait_for, Waiter, Wanted};
use super::{Branch, Command, Engine, Outcome, Vote};

impl Engine {
    /// The wait rule for one edge: see [`locks::may_wait_for`].
    pub fn may_wait_for(txid: TxId, work: bool, other: TxId, other_is_work: bool) -> bool {
        may_wait_for(txid, work, other, other_is_work)
    }

    /// Whether the holder of a lock is interactive work (an active branch).
    pub(super) fn is_work(branches: &HashMap<TxId, Branch>, holder: TxId) -> bool {
        matches!(branches.get(&holder), Some(Branch::Active { .. }))
    }

    /// Queues a lock request, or refuses it if it may not wait.
    pub(super) fn wait_or_refuse(&mut self, txid: TxId, waiter: Waiter, reason: String) {
        let branches = &self.branches;
        if self.locks.may_wait(txid, &waiter, |h| Engine::is_work(branches, h)) {
            self.locks.enqueue(txid, waiter);
            self.commands.push(Command::ArmLockWait { txid, after: self.locks.lock_wait });
            // An older work waiter goes first: younger work waiting for the same keys dies.
            self.settle_waiters();
        } else {
            self.locks.stats.conflicts += 1;
            self.refuse_waiter(txid, waiter, reason);
        }
    }

    /// Answers a lock request that will not be granted. Work loses its branch:
    /// a transaction that dies releases its locks, so the older one it was in
    /// the way of can go on.
    pub(super) fn refuse_waiter(&mut self, txid: TxId, waiter: Waiter, reason: String) {
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

    /// Grants waiting requests whose keys are all free, oldest first (a
    /// waiter never overtakes an older one that wants one of its keys).
    pub(super) fn grant_waiters(&mut self) {
        for (txid, Waiter { keys, wanted }) in self.locks.grantable() {
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
    pub(super) fn settle_waiters(&mut self) {
        loop {
            self.grant_waiters();
            let branches = &self.branches;
            let dying = self.locks.dying(|h| Engine::is_work(branches, h));
            if dying.is_empty() {
                return;
            }
            for (txid, waiter) in dying {
                let reason = "lock conflict: an older transaction wants the same keys (wait-die)".to_owned();
                self.refuse_waiter(txid, waiter, reason);
            }
        }
    }
}
