//! Which keys this KV participant owns: its ring state, durable and changed
//! only by the migration batches it takes part in, and the fence of the batch
//! under way. See docs/elasticity.md.
//!
//! The rules, each checked with the keys concerned locked:
//! - a key is served (read, written, prepared) only if the participant's
//!   routing says it owns it; otherwise the answer is a typed redirect
//!   ([`Reason::WrongOwner`]);
//! - while a batch moves the keys of `[lo, hi)`, its fence covers every key
//!   of that range whose owner changes to or from this participant, present
//!   or not: nobody but the batch may touch them ([`Reason::Migrating`]), so
//!   no key is created behind a batch that has already read what leaves;
//! - the new routing (cursor at `hi`) takes effect, and the fence goes, only
//!   once the batch's commit is durable: a key is at exactly one owner at
//!   every instant a read can observe.

use std::sync::{Arc, Mutex, MutexGuard};

use decree_proto::ring::{Move, Routing};
use decree_proto::{v1, Reason, TxId};
use decree_runtime::{record, Storage, Write};

/// Where the participant's ring state is kept in its log.
pub const RING_KEY: &[u8] = b"r/ring";

/// A migration batch's hold on the keys of `[lo, routing's cursor)` that move.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fence {
    txid: TxId,
    lo: String,
    /// The routing the batch leads to (its cursor is the batch's end).
    step: Routing,
}

#[derive(Debug, Default)]
struct State {
    /// `None`: never part of a ring change, so every key sent here is taken
    /// (a participant from before rings had epochs, or one not yet in a ring).
    routing: Option<Routing>,
    fence: Option<Fence>,
    /// Bumped whenever `routing` or `fence` changes.
    generation: u64,
}

/// Why a key is not served here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Reason,
    pub reason: String,
    pub epoch: u64,
}

/// The participant's ownership, shared by its resource and its Kv service.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    me: Arc<str>,
    state: Arc<Mutex<State>>,
    /// Woken whenever a fence goes.
    lifted: Arc<tokio::sync::Notify>,
}

impl Ownership {
    /// The ownership of participant `me`, as its log records it.
    pub fn load<S: Storage>(log: &S, me: &str) -> Result<Ownership, String> {
        let routing = match log.get(RING_KEY).map_err(|e| e.to_string())? {
            None => None,
            Some(bytes) => {
                let wire: v1::Routing =
                    record::decode(&bytes).map_err(|e| format!("corrupt ring record: {e}"))?;
                Some(Routing::from_wire(&wire))
            }
        };
        let state = State { routing, ..State::default() };
        Ok(Ownership { me: me.into(), state: Arc::new(Mutex::new(state)), lifted: Default::default() })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.me
    }

    /// The ring epoch this participant is at (0: never in a ring change).
    pub fn epoch(&self) -> u64 {
        self.state().routing.as_ref().map_or(0, |r| r.epoch)
    }

    /// Changes whenever ownership or the fence does (a read compares it before and after).
    pub fn generation(&self) -> u64 {
        self.state().generation
    }

    /// May `txid` (`None`: a plain read) touch `key` here?
    pub fn check(&self, txid: Option<TxId>, key: &str) -> Result<(), Refusal> {
        self.check_in(&self.state(), txid, key)
    }

    fn check_in(&self, state: &State, txid: Option<TxId>, key: &str) -> Result<(), Refusal> {
        let epoch = state.routing.as_ref().map_or(0, |r| r.epoch);
        if let Some(fence) = &state.fence {
            if Some(fence.txid) != txid && self.fenced(fence, key) {
                return Err(Refusal {
                    code: Reason::Migrating,
                    reason: format!("key {key:?} is moving (migration batch {})", fence.txid),
                    epoch,
                });
            }
        }
        match &state.routing {
            None => Ok(()),
            Some(routing) => match routing.route(key) {
                Some(owner) if owner == &*self.me => Ok(()),
                owner => Err(Refusal {
                    code: Reason::WrongOwner,
                    reason: format!(
                        "key {key:?} is not owned by {} at ring epoch {epoch} (its owner is {})",
                        self.me,
                        owner.unwrap_or("nobody")
                    ),
                    epoch,
                }),
            },
        }
    }

    /// The first key of `keys` that `txid` may not touch here (one look at the state for all).
    pub fn check_all<'a>(
        &self,
        txid: Option<TxId>,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Refusal> {
        let state = self.state();
        if state.routing.is_none() && state.fence.is_none() {
            return Ok(()); // in no ring: every key is taken, nothing to route
        }
        keys.into_iter().try_for_each(|key| self.check_in(&state, txid, key))
    }

    fn fenced(&self, fence: &Fence, key: &str) -> bool {
        let Some(Move { cursor, .. }) = &fence.step.migration else { return false };
        cursor.covers(&fence.lo, key)
            && fence.step.moving(key).is_some_and(|(from, to)| from == Some(&*self.me) || to == &*self.me)
    }

    /// True if `key` leaves this participant in the batch `[lo, step's cursor)`.
    pub fn leaves(&self, step: &Routing, lo: &str, key: &str) -> bool {
        let Some(Move { cursor, .. }) = &step.migration else { return false };
        cursor.covers(lo, key) && step.moving(key).is_some_and(|(from, _)| from == Some(&*self.me))
    }

    /// True if `key` leaves this participant in `step`'s migration, wherever its batch.
    pub fn leaves_in(&self, step: &Routing, key: &str) -> bool {
        step.moving(key).is_some_and(|(from, _)| from == Some(&*self.me))
    }

    /// The batch `txid` takes the fence of `[lo, step's cursor)`; refused while
    /// another batch holds it. True if it was put up now, false if the batch
    /// held it already (another request of the batch put it up: a step sent
    /// again, its first copy still under way).
    pub fn fence(&self, txid: TxId, lo: &str, step: &Routing) -> Result<bool, Refusal> {
        let mut state = self.state();
        let epoch = state.routing.as_ref().map_or(0, |r| r.epoch);
        match &state.fence {
            Some(fence) if fence.txid != txid => Err(Refusal {
                code: Reason::Migrating,
                reason: format!("migration batch {} is under way here", fence.txid),
                epoch,
            }),
            Some(_) => Ok(false),
            None => {
                state.fence = Some(Fence { txid, lo: lo.to_owned(), step: step.clone() });
                state.generation += 1;
                Ok(true)
            }
        }
    }

    /// The batch holding the fence, if any.
    pub fn fence_holder(&self) -> Option<TxId> {
        self.state().fence.as_ref().map(|f| f.txid)
    }

    /// Resolves once a fence goes after this call (the future is registered
    /// when made: make it before looking at the fence, then await it).
    pub fn fence_lifted(&self) -> tokio::sync::futures::Notified<'_> {
        self.lifted.notified()
    }

    /// The batch `txid` ended without committing here: its fence goes.
    pub fn release(&self, txid: TxId) {
        let mut state = self.state();
        if state.fence.as_ref().is_some_and(|f| f.txid == txid) {
            state.fence = None;
            state.generation += 1;
            self.lifted.notify_waiters();
        }
    }

    /// The batch `txid`'s commit, leading to `step`, is durable: the
    /// participant now owns what `step` says, and the fence goes.
    pub fn applied(&self, txid: TxId, step: &Routing) {
        let mut state = self.state();
        state.routing = Some(advance(state.routing.take(), step));
        if state.fence.as_ref().is_some_and(|f| f.txid == txid) {
            state.fence = None;
            self.lifted.notify_waiters();
        }
        state.generation += 1;
    }

    /// A batch found prepared at start holds its fence again before anything is served.
    pub fn recovered(&self, txid: TxId, lo: &str, step: &Routing) {
        let mut state = self.state();
        state.fence = Some(Fence { txid, lo: lo.to_owned(), step: step.clone() });
        state.generation += 1;
    }

    /// The write that records `step` at commit, over what is recorded now.
    pub fn record(&self, step: &Routing) -> Write {
        let next = advance(self.state().routing.clone(), step);
        Write::put(RING_KEY, record::encode(&next.to_wire()))
    }
}

/// The routing after a batch leading to `step`: a newer epoch replaces what
/// was known; within one epoch the cursor only moves forward (a batch run
/// again after a crash never moves it back).
fn advance(known: Option<Routing>, step: &Routing) -> Routing {
    match known {
        Some(known) if known.epoch > step.epoch => known,
        Some(known) if known.epoch == step.epoch => {
            let cursor = |r: &Routing| r.migration.as_ref().map(|m| m.cursor.clone());
            match (cursor(&known), cursor(step)) {
                (Some(a), Some(b)) if a > b => known,
                _ => step.clone(),
            }
        }
        _ => step.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decree_proto::ring::{Cursor, Ring};

    fn txid(sequence: u64) -> TxId {
        TxId::new(1, 1, sequence)
    }

    fn step(cursor: Cursor) -> Routing {
        Routing {
            epoch: 2,
            current: Ring::new(["p1", "p2"]),
            migration: Some(Move { target: Ring::new(["p1", "p2", "p3"]), cursor }),
        }
    }

    fn owned_by(routing: &Routing, who: &str, leaving: bool) -> String {
        (0..10_000)
            .map(|i| format!("k{i:05}"))
            .find(|k| routing.current.route(k) == Some(who) && (routing.moving(k).is_some() == leaving))
            .unwrap()
    }

    #[test]
    fn a_participant_in_no_ring_takes_every_key() {
        let own = Ownership::load(&decree_runtime::MemLog::new(), "p1").unwrap();
        assert_eq!(own.epoch(), 0);
        assert!(own.check(None, "anything").is_ok());
    }

    #[test]
    fn the_fence_holds_moving_keys_for_its_batch_only_and_commit_moves_them() {
        let own = Ownership::load(&decree_runtime::MemLog::new(), "p1").unwrap();
        let all = step(Cursor::End);
        let leaving = owned_by(&all, "p1", true);
        let staying = owned_by(&all, "p1", false);
        let batch = step(Cursor::End);
        assert_eq!(own.fence(txid(1), "", &batch), Ok(true), "put up now");
        assert_eq!(own.fence(txid(1), "", &batch), Ok(false), "held already: a step of the batch sent again");
        assert_eq!(own.check(None, &leaving).unwrap_err().code, Reason::Migrating);
        assert_eq!(own.check(Some(txid(2)), &leaving).unwrap_err().code, Reason::Migrating);
        assert!(own.check(Some(txid(1)), &leaving).is_ok(), "the batch itself");
        assert!(own.check(None, &staying).is_ok(), "keys that stay are not fenced");
        assert_eq!(
            own.fence(txid(3), "", &batch).unwrap_err().code,
            Reason::Migrating,
            "one batch at a time"
        );
        let before = own.generation();
        own.applied(txid(1), &batch);
        assert!(own.generation() > before);
        assert_eq!(own.check(None, &leaving).unwrap_err().code, Reason::WrongOwner);
        assert!(own.check(None, &staying).is_ok());
        assert!(own.fence(txid(3), "", &batch).is_ok(), "the fence went with the commit");
    }

    #[test]
    fn a_joining_member_refuses_an_arriving_key_under_the_fence_until_its_batch_commits() {
        let own = Ownership::load(&decree_runtime::MemLog::new(), "p3").unwrap();
        let batch = step(Cursor::End);
        let arriving = (0..10_000)
            .map(|i| format!("k{i:05}"))
            .find(|k| batch.moving(k).is_some_and(|(_, to)| to == "p3"))
            .unwrap();
        assert!(own.check(None, &arriving).is_ok(), "in no ring yet: every key is taken");
        // The IN step's fence: the key is not served until the commit lands here.
        own.fence(txid(1), "", &batch).unwrap();
        assert_eq!(own.check(None, &arriving).unwrap_err().code, Reason::Migrating);
        assert!(own.check(Some(txid(1)), &arriving).is_ok(), "the batch itself writes it");
        own.applied(txid(1), &batch);
        assert!(own.check(None, &arriving).is_ok(), "committed here: served");
    }

    /// A step waiting for an earlier batch's fence wakes when that batch
    /// commits or ends here, not before, and not for another batch's end.
    #[tokio::test]
    async fn a_wait_for_the_fence_wakes_when_it_goes() {
        let own = Ownership::load(&decree_runtime::MemLog::new(), "p1").unwrap();
        let batch = step(Cursor::End);
        for commits in [true, false] {
            own.fence(txid(1), "", &batch).unwrap();
            let lifted = own.fence_lifted();
            tokio::pin!(lifted);
            assert!(futures::poll!(lifted.as_mut()).is_pending(), "the fence is up");
            own.release(txid(9));
            assert!(futures::poll!(lifted.as_mut()).is_pending(), "another batch's end lifts nothing");
            if commits {
                own.applied(txid(1), &batch);
            } else {
                own.release(txid(1));
            }
            assert!(futures::poll!(lifted.as_mut()).is_ready(), "woken once the fence goes");
            assert_eq!(own.fence_holder(), None);
        }
    }

    #[test]
    fn a_batch_run_again_never_moves_the_cursor_back() {
        let own = Ownership::load(&decree_runtime::MemLog::new(), "p3").unwrap();
        own.applied(txid(1), &step(Cursor::Key("k5".into())));
        own.applied(txid(2), &step(Cursor::Key("k2".into())));
        let state = own.state();
        assert_eq!(
            state.routing.as_ref().unwrap().migration.as_ref().unwrap().cursor,
            Cursor::Key("k5".into())
        );
    }
}
