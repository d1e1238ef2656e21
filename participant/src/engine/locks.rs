//! The lock table: which branch holds each key, which requests wait for
//! keys (oldest first), which reads wait for keys to be unlocked, and the
//! wait rule under which no cycle of waits can form. Pure bookkeeping: it
//! queues no command and knows no branch state; the engine asks it and acts.

use std::collections::BTreeMap;
use std::time::Duration;

use decree_proto::TxId;
use foldhash::HashMap;

/// What a lock waiter wants to do once it has its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Wanted {
    Prepare { payload: Vec<u8>, one_phase: bool },
    Work { work: u64, first: bool },
}

/// A lock request waiting for its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Waiter {
    pub keys: Vec<String>,
    pub wanted: Wanted,
}

impl Waiter {
    pub fn is_work(&self) -> bool {
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

/// What becomes of a read ([`LockTable::read`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadGate {
    Go,
    Waits,
    Locked(Vec<String>),
}

#[derive(Debug, Default)]
pub(super) struct LockTable {
    held: HashMap<String, TxId>,
    /// Lock requests waiting, oldest first.
    waiting: BTreeMap<TxId, Waiter>,
    /// Reads waiting for their keys to be unlocked.
    readers: BTreeMap<u64, Vec<String>>,
    /// How long a request may wait (zero: conflicts are refused at once).
    pub lock_wait: Duration,
    /// How long a read may wait (zero: reads never wait).
    pub read_wait: Duration,
    pub stats: LockStats,
}

impl LockTable {
    pub fn new(lock_wait: Duration, read_wait: Duration) -> LockTable {
        LockTable { lock_wait, read_wait, ..LockTable::default() }
    }

    /// Locked keys and their holders, in key order.
    pub fn holders(&self) -> BTreeMap<String, TxId> {
        self.held.iter().map(|(k, t)| (k.clone(), *t)).collect()
    }

    /// Every locked key with its holder (whose state `state_of` says) and its waiters, in key order.
    pub fn table(&self, state_of: impl Fn(TxId) -> &'static str) -> Vec<LockEntry> {
        let mut table: Vec<LockEntry> = self
            .held
            .iter()
            .map(|(key, holder)| LockEntry {
                key: key.clone(),
                holder: *holder,
                state: state_of(*holder),
                waiters: self.waiting.iter().filter(|(_, w)| w.keys.contains(key)).map(|(t, _)| *t).collect(),
            })
            .collect();
        table.sort_by(|a, b| a.key.cmp(&b.key));
        table
    }

    /// The first of `keys` locked by another transaction, and its holder.
    pub fn conflict(&self, txid: TxId, keys: &[String]) -> Option<(String, TxId)> {
        keys.iter().find_map(|k| self.held.get(k).filter(|h| **h != txid).map(|h| (k.clone(), *h)))
    }

    /// True if a waiting request wants one of `keys` (a newcomer may not overtake it).
    pub fn queued_for(&self, keys: &[String]) -> bool {
        self.waiting.values().any(|w| w.keys.iter().any(|k| keys.contains(k)))
    }

    /// Takes the locks of `keys` for `txid`; returns a key another held, if any.
    pub fn take(&mut self, txid: TxId, keys: &[String]) -> Option<(String, TxId)> {
        let mut taken_from = None;
        for key in keys {
            if let Some(other) = self.held.insert(key.clone(), txid).filter(|h| *h != txid) {
                taken_from.get_or_insert((key.clone(), other));
            }
        }
        taken_from
    }

    /// Releases the keys of `keys` that `txid` holds.
    pub fn release(&mut self, txid: TxId, keys: &[String]) {
        for key in keys {
            if self.held.get(key) == Some(&txid) {
                self.held.remove(key);
            }
        }
    }

    /// The waiting reads that may go now (none of their keys locked), taken off their queue.
    pub fn ready_reads(&mut self) -> Vec<u64> {
        if self.readers.is_empty() {
            return Vec::new();
        }
        let ready: Vec<u64> = self
            .readers
            .iter()
            .filter(|(_, keys)| keys.iter().all(|k| !self.held.contains_key(k)))
            .map(|(read, _)| *read)
            .collect();
        for read in &ready {
            self.readers.remove(read);
        }
        ready
    }

    /// Conflicting holders of `keys` and waiters for them (older waiters only
    /// if `older_waiters_only`), each with whether it is interactive work
    /// (`holder_is_work` says it of holders).
    fn blockers(
        &self,
        txid: TxId,
        keys: &[String],
        older_waiters_only: bool,
        holder_is_work: &impl Fn(TxId) -> bool,
    ) -> Vec<(TxId, bool)> {
        let holders = keys
            .iter()
            .filter_map(|k| self.held.get(k))
            .filter(|h| **h != txid)
            .map(|h| (*h, holder_is_work(*h)));
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
    pub fn may_wait(&self, txid: TxId, waiter: &Waiter, holder_is_work: impl Fn(TxId) -> bool) -> bool {
        !self.lock_wait.is_zero()
            && self
                .blockers(txid, &waiter.keys, false, &holder_is_work)
                .into_iter()
                .all(|(other, is_work)| may_wait_for(txid, waiter.is_work(), other, is_work))
    }

    pub fn enqueue(&mut self, txid: TxId, waiter: Waiter) {
        self.stats.waits += 1;
        self.waiting.insert(txid, waiter);
    }

    pub fn waiter(&self, txid: TxId) -> Option<&Waiter> {
        self.waiting.get(&txid)
    }

    pub fn dequeue(&mut self, txid: TxId) -> Option<Waiter> {
        self.waiting.remove(&txid)
    }

    pub fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Waiting requests, oldest first.
    pub fn waiting(&self) -> Vec<TxId> {
        self.waiting.keys().copied().collect()
    }

    /// The waiters whose keys are all free, oldest first, taken off the
    /// queue. A waiter never overtakes an older one that wants one of its keys.
    pub fn grantable(&mut self) -> Vec<(TxId, Waiter)> {
        let mut blocked: Vec<&str> = Vec::new();
        let mut granted = Vec::new();
        for (txid, waiter) in &self.waiting {
            let free = self.conflict(*txid, &waiter.keys).is_none()
                && !waiter.keys.iter().any(|k| blocked.contains(&k.as_str()));
            if free {
                granted.push(*txid);
            }
            // Granted or not, its keys are spoken for ahead of younger waiters.
            blocked.extend(waiter.keys.iter().map(String::as_str));
        }
        granted.into_iter().map(|txid| (txid, self.waiting.remove(&txid).expect("listed above"))).collect()
    }

    /// The waiters that the holders and the older waiters in their way no
    /// longer allow to wait (wait-die), taken off the queue.
    pub fn dying(&mut self, holder_is_work: impl Fn(TxId) -> bool) -> Vec<(TxId, Waiter)> {
        let dying: Vec<TxId> = self
            .waiting
            .iter()
            .filter(|(txid, waiter)| {
                !self
                    .blockers(**txid, &waiter.keys, true, &holder_is_work)
                    .into_iter()
                    .all(|(other, is_work)| may_wait_for(**txid, waiter.is_work(), other, is_work))
            })
            .map(|(txid, _)| *txid)
            .collect();
        self.stats.conflicts += dying.len() as u64;
        dying.into_iter().map(|txid| (txid, self.waiting.remove(&txid).expect("listed above"))).collect()
    }

    /// A read of `keys`: [`ReadGate::Go`] if none is locked; else it waits,
    /// up to `read_wait` ([`ReadGate::Waits`]), or with no wait at all is
    /// [`ReadGate::Locked`] now (what holds them decides whether it may go).
    pub fn read(&mut self, read: u64, keys: Vec<String>) -> ReadGate {
        if keys.iter().all(|k| !self.held.contains_key(k)) {
            ReadGate::Go
        } else if self.read_wait.is_zero() {
            ReadGate::Locked(keys)
        } else {
            self.readers.insert(read, keys);
            ReadGate::Waits
        }
    }

    /// A read's wait ran out: its keys if it was still waiting.
    pub fn read_expired(&mut self, read: u64) -> Option<Vec<String>> {
        self.readers.remove(&read)
    }

    /// Who holds `key`'s lock.
    pub fn holder(&self, key: &str) -> Option<TxId> {
        self.held.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(seq: u64) -> TxId {
        TxId::new(1, 1, seq)
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|k| k.to_string()).collect()
    }

    fn prepare(names: &[&str]) -> Waiter {
        Waiter { keys: keys(names), wanted: Wanted::Prepare { payload: vec![], one_phase: false } }
    }

    #[test]
    fn waiters_are_granted_oldest_first_and_never_overtaken() {
        let mut table = LockTable::new(Duration::from_millis(10), Duration::ZERO);
        table.take(tx(1), &keys(&["a"]));
        table.enqueue(tx(2), prepare(&["a", "b"]));
        table.enqueue(tx(3), prepare(&["b"]));
        assert!(table.grantable().is_empty(), "tx 3's key is free, but the older tx 2 wants it");
        table.release(tx(1), &keys(&["a"]));
        let granted: Vec<TxId> = table.grantable().into_iter().map(|(t, _)| t).collect();
        assert_eq!(granted, [tx(2)], "tx 3 still waits behind tx 2's claim on b");
    }

    #[test]
    fn a_read_waits_for_its_keys_and_goes_when_they_are_released() {
        let mut table = LockTable::new(Duration::ZERO, Duration::from_millis(10));
        table.take(tx(1), &keys(&["a"]));
        assert_eq!(table.read(7, keys(&["a", "b"])), ReadGate::Waits);
        assert_eq!(table.read(8, keys(&["b"])), ReadGate::Go, "an unlocked key is read at once");
        assert_eq!(table.ready_reads(), Vec::<u64>::new());
        table.release(tx(1), &keys(&["a"]));
        assert_eq!(table.ready_reads(), vec![7]);
        assert_eq!(table.read_expired(7), None, "gone already");
        table.take(tx(2), &keys(&["a"]));
        let mut no_wait = LockTable::new(Duration::ZERO, Duration::ZERO);
        no_wait.take(tx(2), &keys(&["a"]));
        assert_eq!(no_wait.read(9, keys(&["a"])), ReadGate::Locked(keys(&["a"])), "no wait: decided now");
    }
}
