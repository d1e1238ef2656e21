//! The participant's durable state: prepared records and tombstones, in the
//! same RocksDB log as the resource's data.
//!
//! # Correctness
//!
//! - [`BranchLog::log_prepared`] returns only after the prepared record (the
//!   redo, the locked keys) is **synced**: a YES vote is never sent for a
//!   branch that a crash could forget.
//! - [`BranchLog::log_commit`] writes the resource's writes, the committed
//!   tombstone and the removal of the prepared record in **one synced batch**:
//!   a branch is applied exactly once, and a crash leaves it either prepared
//!   (redo not applied) or committed (applied), never half.
//! - [`BranchLog::log_abort`] of a prepared branch is **not synced**: if it
//!   is lost, the prepared record comes back at start and the coordinator
//!   answers ABORTED again (presumed abort). Of a branch never prepared here
//!   (an Abort before or instead of its Prepare) it is **synced soon**: the
//!   tombstone alone then keeps a late Prepare out, and its ack tells a
//!   coordinator asking about a one-phase branch that it never commits.
//! - [`BranchLog::forget_tombstones`] deletes the tombstones at or below each
//!   coordinator's new horizon with one range delete, in the batch that makes
//!   that horizon durable (`w/<coordinator>`), **not synced**: a lost batch
//!   leaves the old horizon and the records it would have deleted, which
//!   agree. Prepared records (`p/`) and heuristic records (`h/`) are never
//!   touched.
//! - [`BranchLog::load`] reads the prepared records (what is undecided), the
//!   heuristic records, the horizons and the tombstones; the tombstones on
//!   disk are bounded by the same retention as in memory (plus what was
//!   decided since the last prune), so a start never reads the history.
//! - A record that fails its checksum is an error: the participant refuses to
//!   start rather than forget a YES vote.

use std::path::Path;
use std::sync::Arc;

use decree_proto::TxId;
use decree_runtime::record::TxIdRecord;
use decree_runtime::{record, Durability, Log, RecordError, Storage, Write};

use crate::engine::Outcome;

const PREPARED: &[u8] = b"p/";
const TOMBSTONE: &[u8] = b"t/";
const HEURISTIC: &[u8] = b"h/";
/// The horizon of forgotten txids, per coordinator: `w/<coordinator id>`.
const HORIZON: &[u8] = b"w/";

/// An operator's decision of a branch in doubt, kept for audit (never pruned).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeuristicRecord {
    #[prost(bool, tag = "1")]
    pub commit: bool,
    #[prost(string, tag = "2")]
    pub reason: String,
    #[prost(string, tag = "3")]
    pub operator: String,
    #[prost(uint64, tag = "4")]
    pub decided_at_unix_ms: u64,
    /// The coordinator's outcome once known: 0 not yet, 1 committed, 2 aborted.
    #[prost(uint32, tag = "5")]
    pub coordinator: u32,
    /// The coordinator decided otherwise than the operator.
    #[prost(bool, tag = "6")]
    pub contradicted: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PreparedRecord {
    #[prost(string, repeated, tag = "1")]
    keys: Vec<String>,
    #[prost(bytes = "vec", tag = "2")]
    redo: Vec<u8>,
    /// The coordinator that owns the decision.
    #[prost(string, tag = "3")]
    coordinator: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TombstoneRecord {
    #[prost(bool, tag = "1")]
    committed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Log(#[from] decree_runtime::LogError),
    #[error("corrupt record at {key}: {source}")]
    Corrupt { key: String, source: RecordError },
}

/// A prepared branch found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedBranch {
    pub txid: TxId,
    pub keys: Vec<String>,
    pub redo: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Loaded {
    pub prepared: Vec<PreparedBranch>,
    /// Heuristic decisions: txid, commit, whether the coordinator's outcome is known.
    pub heuristics: Vec<(TxId, bool, bool)>,
    /// The tombstones on disk, in txid order.
    pub tombstones: Vec<(TxId, Outcome)>,
    /// Each coordinator's horizon of forgotten txids.
    pub horizons: Vec<TxId>,
    /// Records read: what the start cost, machine-independently.
    pub records_read: u64,
}

impl Loaded {
    /// Feeds what start found to a fresh engine, in the order recovery needs:
    /// horizons, tombstones, the prepared branches (their keys locked again,
    /// in doubt since `at`), then heuristic decisions (one recorded but not
    /// applied is applied now). The server and the simulator both start so.
    pub fn replay_into(self, engine: &mut crate::engine::Engine, at: std::time::Instant) {
        use crate::engine::Event;
        for horizon in self.horizons {
            engine.on_event(Event::RecoveredHorizon { horizon });
        }
        for (txid, outcome) in self.tombstones {
            engine.on_event(Event::RecoveredTombstone { txid, outcome });
        }
        for branch in self.prepared {
            engine.on_event(Event::Recovered { txid: branch.txid, keys: branch.keys, redo: branch.redo, at });
        }
        for (txid, commit, settled) in self.heuristics {
            engine.on_event(Event::RecoveredHeuristic { txid, commit, settled });
        }
    }
}

/// The branch log, over any [`Storage`]: RocksDB in the server, memory in
/// the simulator and the conformance cases.
#[derive(Clone)]
pub struct BranchLog<S = Log> {
    log: S,
    /// Shared: the runtime clones the branch log for each write it hands off.
    coordinator: Arc<str>,
}

/// The key of `txid`'s prepared record (for checkers that read the disk).
pub fn prepared_key(txid: TxId) -> Vec<u8> {
    key(PREPARED, txid)
}

/// The key of `txid`'s tombstone (for checkers that read the disk).
pub fn tombstone_key(txid: TxId) -> Vec<u8> {
    key(TOMBSTONE, txid)
}

fn key(prefix: &[u8], txid: TxId) -> Vec<u8> {
    [prefix, &txid.to_key_bytes()].concat()
}

fn txid_of(prefix: &[u8], key: &[u8]) -> Result<TxId, StoreError> {
    TxId::from_key_bytes(&key[prefix.len()..]).ok_or_else(|| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source: RecordError::Truncated { len: key.len() },
    })
}

fn corrupt(key: &[u8], source: RecordError) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), source }
}

impl BranchLog<Log> {
    pub fn open(dir: &Path, coordinator: &str) -> Result<BranchLog, StoreError> {
        Ok(BranchLog::open_on(Log::open(dir)?, coordinator))
    }
}

impl<S: Storage> BranchLog<S> {
    /// The branch log in `log`, for branches whose decisions `coordinator` owns.
    pub fn open_on(log: S, coordinator: &str) -> BranchLog<S> {
        BranchLog { log, coordinator: Arc::from(coordinator) }
    }

    /// The storage the branch log and the resource's data share.
    pub fn log(&self) -> &S {
        &self.log
    }

    /// Reads every prepared branch, the heuristic decisions, the horizons and
    /// the tombstones (bounded: see the module's Correctness section).
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        let stats = &self.log.stats().records_read;
        let read_before = stats.load(std::sync::atomic::Ordering::Relaxed);
        let mut loaded = Loaded::default();
        for (k, value) in self.log.scan_prefix(PREPARED)? {
            let txid = txid_of(PREPARED, &k)?;
            let record: PreparedRecord = record::decode(&value).map_err(|e| corrupt(&k, e))?;
            loaded.prepared.push(PreparedBranch { txid, keys: record.keys, redo: record.redo });
        }
        for (txid, record) in self.heuristics()? {
            loaded.heuristics.push((txid, record.commit, record.coordinator != 0));
        }
        for (k, value) in self.log.scan_prefix(HORIZON)? {
            let record: TxIdRecord = record::decode(&value).map_err(|e| corrupt(&k, e))?;
            loaded.horizons.push(record.into());
        }
        for (k, value) in self.log.scan_prefix(TOMBSTONE)? {
            let txid = txid_of(TOMBSTONE, &k)?;
            let record: TombstoneRecord = record::decode(&value).map_err(|e| corrupt(&k, e))?;
            let outcome = if record.committed { Outcome::Committed } else { Outcome::Aborted };
            loaded.tombstones.push((txid, outcome));
        }
        loaded.records_read = stats.load(std::sync::atomic::Ordering::Relaxed) - read_before;
        Ok(loaded)
    }

    /// Deletes every tombstone at or below each horizon (one per coordinator),
    /// in the batch that makes the horizons durable; not synced.
    pub async fn forget_tombstones(&self, horizons: &[TxId]) -> Result<(), StoreError> {
        let mut writes = Vec::with_capacity(horizons.len() * 2);
        for horizon in horizons {
            let from = [TOMBSTONE, &horizon.coordinator.to_be_bytes()[..], &[0u8; 16][..]].concat();
            // The first key after the horizon's own: the range ends past it.
            let to = [key(TOMBSTONE, *horizon).as_slice(), &[0u8]].concat();
            writes.push(Write::delete_range(from, to));
            let record = TxIdRecord::from(*horizon);
            writes.push(Write::put(
                [HORIZON, &horizon.coordinator.to_be_bytes()[..]].concat(),
                record::encode(&record),
            ));
        }
        self.log.write(writes, false).await?;
        Ok(())
    }

    /// Compacts the tombstones' range, so forgotten ones leave the disk now.
    /// Blocks: call it off the async threads.
    pub fn compact_tombstones(&self) {
        self.log.compact(TOMBSTONE, &decree_runtime::log::prefix_end(TOMBSTONE));
    }

    /// Makes the prepared record durable (synced).
    pub async fn log_prepared(&self, txid: TxId, keys: &[String], redo: &[u8]) -> Result<(), StoreError> {
        self.log.write(self.prepared(txid, keys, redo), true).await?;
        Ok(())
    }

    /// [`Self::log_prepared`], calling `then` once the record is synced (or
    /// the write failed) instead of returning a future ([`Storage::write_then`]).
    pub fn log_prepared_then(
        &self,
        txid: TxId,
        keys: &[String],
        redo: &[u8],
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        let writes = self.prepared(txid, keys, redo);
        self.log
            .write_then(writes, Durability::Synced, move |written| then(written.map_err(StoreError::from)));
    }

    /// The batch of [`Self::log_prepared`].
    fn prepared(&self, txid: TxId, keys: &[String], redo: &[u8]) -> Vec<Write> {
        let value = record::encode(&PreparedRecord {
            keys: keys.to_vec(),
            redo: redo.to_vec(),
            coordinator: self.coordinator.to_string(),
        });
        vec![Write::put(key(PREPARED, txid), value)]
    }

    /// Applies `writes` and records the commit in one synced batch. `urgent`
    /// (a one-phase commit, whose vote waits for it) syncs at once; a commit
    /// after a durable decision may wait up to [`decree_runtime::log::SOON`] to
    /// share its fsync.
    pub async fn log_commit(
        &self,
        txid: TxId,
        mut writes: Vec<Write>,
        urgent: bool,
    ) -> Result<(), StoreError> {
        let durability = commit(txid, &mut writes, urgent);
        self.log.write_with(writes, durability).await?;
        Ok(())
    }

    /// [`Self::log_commit`], calling `then` once the batch is synced (or the
    /// write failed) instead of returning a future ([`Storage::write_then`]).
    pub fn log_commit_then(
        &self,
        txid: TxId,
        writes: Vec<Write>,
        urgent: bool,
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.log_commits_then(vec![(txid, writes, urgent)], then);
    }

    /// [`Self::log_commit_then`] for several branches in one write (synced at
    /// once if any of them is urgent), calling `then` once.
    pub fn log_commits_then(
        &self,
        commits: Vec<(TxId, Vec<Write>, bool)>,
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        let (mut all, mut durability) = (Vec::new(), Durability::SyncedSoon);
        for (txid, mut writes, urgent) in commits {
            if commit(txid, &mut writes, urgent) == Durability::Synced {
                durability = Durability::Synced;
            }
            all.append(&mut writes);
        }
        self.log.write_then(all, durability, move |written| then(written.map_err(StoreError::from)));
    }

    /// Every heuristic decision recorded here, in txid order.
    pub fn heuristics(&self) -> Result<Vec<(TxId, HeuristicRecord)>, StoreError> {
        let mut out = Vec::new();
        for (k, value) in self.log.scan_prefix(HEURISTIC)? {
            let txid = txid_of(HEURISTIC, &k)?;
            out.push((txid, record::decode(&value).map_err(|e| corrupt(&k, e))?));
        }
        Ok(out)
    }

    /// Records an operator's decision (synced) before it is applied.
    pub async fn log_heuristic(&self, txid: TxId, record: &HeuristicRecord) -> Result<(), StoreError> {
        self.log.write(vec![Write::put(key(HEURISTIC, txid), record::encode(record))], true).await?;
        Ok(())
    }

    /// Adds the coordinator's outcome to a heuristic decision's record (synced).
    pub async fn settle_heuristic(
        &self,
        txid: TxId,
        committed: bool,
        contradicted: bool,
    ) -> Result<(), StoreError> {
        let k = key(HEURISTIC, txid);
        let Some(value) = self.log.get(&k)? else { return Ok(()) };
        let mut record: HeuristicRecord = record::decode(&value).map_err(|e| corrupt(&k, e))?;
        record.coordinator = if committed { 1 } else { 2 };
        record.contradicted = contradicted;
        self.log.write(vec![Write::put(k, record::encode(&record))], true).await?;
        Ok(())
    }

    /// Drops the prepared record and records the abort. Not synced if the
    /// branch was `prepared`: lost, the prepared record comes back and the
    /// coordinator answers ABORTED again. Synced soon (sharing an fsync)
    /// if not: then the tombstone alone keeps a late Prepare out, and the
    /// ack tells the coordinator asking about a one-phase branch that it
    /// never commits.
    pub async fn log_abort(&self, txid: TxId, prepared: bool) -> Result<(), StoreError> {
        let writes = vec![
            Write::delete(key(PREPARED, txid)),
            Write::put(key(TOMBSTONE, txid), record::encode(&TombstoneRecord { committed: false })),
        ];
        let durability = if prepared { Durability::Buffered } else { Durability::SyncedSoon };
        self.log.write_with(writes, durability).await?;
        Ok(())
    }
}

/// Completes the batch of [`BranchLog::log_commit`] (the prepared record
/// goes, the committed tombstone comes) and says how durable it must be.
fn commit(txid: TxId, writes: &mut Vec<Write>, urgent: bool) -> Durability {
    writes.push(Write::delete(key(PREPARED, txid)));
    writes.push(Write::put(key(TOMBSTONE, txid), record::encode(&TombstoneRecord { committed: true })));
    if urgent {
        Durability::Synced
    } else {
        Durability::SyncedSoon
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use decree_runtime::storage::testing;

    fn reopen<S: Storage>(open: &impl Fn() -> S) -> BranchLog<S> {
        BranchLog::open_on(open(), "http://c")
    }

    /// Each case runs against RocksDB and against memory (reopened after a process crash).
    macro_rules! both {
        ($($case:ident),* $(,)?) => {
            mod rocksdb { $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$case(&decree_runtime::storage::testing::rocks(dir.path())).await
                }
            )* }
            mod memory { $(
                #[tokio::test]
                async fn $case() { super::$case(&decree_runtime::storage::testing::memory()).await }
            )* }
        };
    }

    both!(
        prepared_branches_survive_until_decided,
        forgotten_tombstones_leave_the_disk_and_the_horizon_stays,
        a_corrupt_prepared_record_is_an_error_not_absent,
    );

    async fn prepared_branches_survive_until_decided<S: Storage>(open: &impl Fn() -> S) {
        let (t1, t2, t3) = (TxId::new(1, 1, 1), TxId::new(1, 1, 2), TxId::new(1, 1, 3));
        {
            let log = reopen(open);
            for t in [t1, t2, t3] {
                log.log_prepared(t, &["k".to_string()], b"redo").await.unwrap();
            }
            log.log_commit(t1, vec![Write::put("k/k", "v")], false).await.unwrap();
            log.log_abort(t2, true).await.unwrap();
        }
        let log = reopen(open);
        let loaded = log.load().await.unwrap();
        assert_eq!(
            loaded.prepared,
            vec![PreparedBranch { txid: t3, keys: vec!["k".into()], redo: b"redo".to_vec() }]
        );
        assert_eq!(loaded.tombstones, vec![(t1, Outcome::Committed), (t2, Outcome::Aborted)]);
        assert_eq!(log.log().get(b"k/k").unwrap(), Some(b"v".to_vec()));
    }

    /// Several branches' commits in one write: each applied, its prepared
    /// record gone and its tombstone there, the branch left out still prepared.
    #[test]
    fn commits_written_together_each_commit() {
        use decree_runtime::storage::now_or_never;
        let t = |s| TxId::new(1, 1, s);
        let disk = decree_runtime::MemLog::new();
        let log = BranchLog::open_on(disk.clone(), "http://c");
        for s in 1..=4 {
            now_or_never(log.log_prepared(t(s), &[format!("k{s}")], b"redo")).unwrap();
        }
        let commits = (1..=3).map(|s| (t(s), vec![Write::put(format!("k/k{s}"), "v")], s == 2)).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        log.log_commits_then(commits, move |written| tx.send(written.is_ok()).unwrap());
        assert!(rx.recv().unwrap());
        let log = BranchLog::open_on(disk.crash_process(), "http://c");
        let loaded = now_or_never(log.load()).unwrap();
        assert_eq!(loaded.prepared.iter().map(|b| b.txid).collect::<Vec<_>>(), vec![t(4)]);
        assert_eq!(
            loaded.tombstones,
            vec![(t(1), Outcome::Committed), (t(2), Outcome::Committed), (t(3), Outcome::Committed)]
        );
        for s in 1..=4 {
            let value = log.log().get(format!("k/k{s}").as_bytes()).unwrap();
            assert_eq!(value, (s < 4).then(|| b"v".to_vec()), "k{s}");
        }
    }

    async fn forgotten_tombstones_leave_the_disk_and_the_horizon_stays<S: Storage>(open: &impl Fn() -> S) {
        let (a, b) = (|s| TxId::new(1, 1, s), |s| TxId::new(2, 5, s));
        {
            let log = reopen(open);
            for s in 1..=10 {
                log.log_abort(a(s), true).await.unwrap();
                log.log_abort(b(s), true).await.unwrap();
            }
            log.log_prepared(a(3), &["k".into()], b"redo").await.unwrap();
            log.forget_tombstones(&[a(6), b(2)]).await.unwrap();
        }
        let log = reopen(open);
        let loaded = log.load().await.unwrap();
        let kept: Vec<TxId> = loaded.tombstones.iter().map(|(t, _)| *t).collect();
        let want: Vec<TxId> = (7..=10).map(a).chain((3..=10).map(b)).collect();
        assert_eq!(kept, want, "at or below each coordinator's horizon: gone");
        assert_eq!(loaded.horizons, vec![a(6), b(2)]);
        assert_eq!(loaded.prepared.len(), 1, "a prepared record below the horizon is never touched");
        assert_eq!(loaded.records_read, (want.len() + 2 + 1) as u64);
    }

    /// A long history through the store, forgotten as the engine forgets it: a
    /// start reads the prepared branches and the bounded window, never the history.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_million_decided_branches_start_reads_only_the_window() {
        const DECIDED: u64 = 1_000_000;
        const RETAIN: u64 = 10_000;
        const WRITERS: u64 = 100;
        let dir = tempfile::tempdir().unwrap();
        let t = |s| TxId::new(7, 1, s);
        {
            let log = BranchLog::open(dir.path(), "http://c").unwrap();
            let rounds = 20;
            let per = DECIDED / rounds / WRITERS;
            for round in 0..rounds {
                let tasks: Vec<_> = (0..WRITERS)
                    .map(|w| {
                        let log = log.clone();
                        tokio::spawn(async move {
                            for i in 0..per {
                                let s = 1 + round * WRITERS * per + w * per + i;
                                log.log_abort(t(s), true).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                let decided = (round + 1) * WRITERS * per;
                log.forget_tombstones(&[t(decided - RETAIN)]).await.unwrap();
            }
            for s in DECIDED + 1..=DECIDED + 3 {
                log.log_prepared(t(s), &["k".into()], b"redo").await.unwrap();
            }
            log.compact_tombstones();
        }
        let log = BranchLog::open_on(testing::rocks(dir.path())(), "http://c");
        let loaded = log.load().await.unwrap();
        assert_eq!(loaded.prepared.len(), 3);
        assert_eq!(loaded.tombstones.len() as u64, RETAIN, "the window, not the million");
        assert_eq!(loaded.horizons, vec![t(DECIDED - RETAIN)]);
        assert_eq!(loaded.records_read, RETAIN + 3 + 1);
    }

    async fn a_corrupt_prepared_record_is_an_error_not_absent<S: Storage>(open: &impl Fn() -> S) {
        let log = reopen(open);
        let mut value = record::encode(&PreparedRecord {
            keys: vec!["a".into()],
            redo: vec![1],
            coordinator: String::new(),
        });
        value[6] ^= 1;
        log.log().write(vec![Write::put(key(PREPARED, TxId::new(1, 1, 1)), value)], true).await.unwrap();
        assert!(matches!(log.load().await, Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn a_machine_crash_never_loses_a_prepared_record_and_loses_an_abort_whole() {
        use decree_runtime::storage::now_or_never;
        let disk = decree_runtime::MemLog::new();
        let log = BranchLog::open_on(disk.clone(), "http://c");
        let (t1, t2) = (TxId::new(1, 1, 1), TxId::new(1, 1, 2));
        now_or_never(log.log_prepared(t1, &["a".into()], b"redo")).unwrap();
        now_or_never(log.log_prepared(t2, &["b".into()], b"redo")).unwrap();
        now_or_never(log.log_abort(t2, true)).unwrap();
        let log = BranchLog::open_on(disk.crash_machine(0), "http://c");
        let loaded = now_or_never(log.load()).unwrap();
        let prepared: Vec<TxId> = loaded.prepared.iter().map(|b| b.txid).collect();
        assert_eq!(prepared, [t1, t2], "the lost abort leaves t2 prepared: it asks, presumed abort answers");
        assert!(loaded.tombstones.is_empty(), "and no half of it survived");
    }

    #[test]
    fn a_machine_crash_keeps_the_abort_of_a_txid_never_prepared_here() {
        use decree_runtime::storage::now_or_never;
        let disk = decree_runtime::MemLog::new();
        let log = BranchLog::open_on(disk.clone(), "http://c");
        let t = TxId::new(1, 1, 7);
        now_or_never(log.log_abort(t, false)).unwrap();
        let log = BranchLog::open_on(disk.crash_machine(0), "http://c");
        let loaded = now_or_never(log.load()).unwrap();
        assert_eq!(loaded.tombstones, [(t, Outcome::Aborted)], "a late Prepare of it still votes NO");
    }
}
