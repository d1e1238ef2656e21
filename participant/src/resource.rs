//! What a service plugs into the participant: the [`Resource`] trait.
//!
//! The library owns the protocol: the lock table, the durable prepared record,
//! idempotent phase two, tombstones, recovery, enrollment and crash points.
//! A resource only says what a branch means. The library calls it like this:
//!
//! 1. [`Resource::keys`] when a Prepare arrives; the keys are then locked.
//! 2. [`Resource::prepare`] with the keys locked. `Ready` means the branch can
//!    commit; the library then writes its prepared record (synced) and votes YES.
//! 3. Exactly one of [`Resource::commit`] (after a COMMIT decision; its writes
//!    go into the library's synced commit batch) or [`Resource::abort`].
//!    Either may be called again for the same branch after a crash: both must
//!    be idempotent.
//! 4. At start, [`Resource::recover`] with the txids the library holds prepared
//!    records for, before anything is served.

use decree_proto::TxId;
use decree_runtime::Write;

use crate::engine::Validated;

/// A service's part in decree transactions.
#[async_trait::async_trait]
pub trait Resource: Send + Sync + 'static {
    /// The keys a branch locks, from its payload, without I/O. An error votes
    /// NO with that reason and locks nothing.
    fn keys(&self, payload: &[u8]) -> Result<Vec<String>, String>;

    /// Phase one, with the branch's keys locked: checks `payload` against the
    /// committed state and readies the branch. `Ready { redo }` promises that
    /// [`Resource::commit`] with that redo will succeed, even after a crash: a
    /// resource with its own prepare (PostgreSQL's `PREPARE TRANSACTION`) does
    /// it here and answers `Ready` only once it succeeded. `Refused` and
    /// `ReadOnly` must leave nothing behind.
    async fn prepare(&self, txid: TxId, payload: &[u8]) -> Validated;

    /// Phase two after a COMMIT decision. The returned writes go into the
    /// library's log in the same synced batch as the commit record, so a
    /// resource that keeps its data in that log (see [`crate::kv`]) is applied
    /// exactly once. Called again after a crash if the commit record was not
    /// durable yet: a resource with its own storage must treat "already
    /// committed" as success. An error is retried with backoff.
    async fn commit(&self, txid: TxId, redo: &[u8]) -> Result<Vec<Write>, String>;

    /// Phase two after an ABORT decision, also for a branch aborted while it
    /// was being prepared and for txids never seen here. Idempotent; an error is
    /// retried with backoff.
    async fn abort(&self, _txid: TxId) -> Result<(), String> {
        Ok(())
    }

    /// Phase two's commit of `txid` is durable (its writes are in the log):
    /// state the resource keeps in memory about the branch may change now.
    /// Called before the branch's locks are released (for every commit, also
    /// that of a branch recovered after a restart), so a cache of committed values
    /// updated here is never read stale by a transaction that locks the keys next.
    fn committed(&self, _txid: TxId, _redo: &[u8]) {}

    /// True for a resource whose [`Resource::prepare`] and
    /// [`Resource::commit`] never wait (no I/O of their own beyond reads of
    /// the library's log, no lock held long; the KV store): the library then
    /// calls them on its protocol actor's turn instead of in a task each, and
    /// [`Resource::committed`] where the commit record was written (the log's
    /// writer thread), which saves a task, a hand-off and a wake-up per
    /// branch. A call that does wait all the same still works (it goes on in
    /// a task), but holds up the actor until it first waits. The default,
    /// false, runs each in a task of its own.
    fn answers_at_once(&self) -> bool {
        false
    }

    /// At start, before serving, for each branch with a durable prepared
    /// record: its redo, for state the resource keeps in memory while a
    /// branch is in doubt.
    fn in_doubt(&self, _txid: TxId, _redo: &[u8]) {}

    /// At start, before serving: `prepared` are the branches with a durable
    /// prepared record (in doubt; the coordinator decides them). Work of the
    /// resource's own that is not among them never voted YES: undo it.
    async fn recover(&self, _prepared: &[TxId]) -> Result<(), String> {
        Ok(())
    }
}
