//! The storage contract both servers' durable state is written against, and
//! its two implementations: [`Log`] (RocksDB with group commit, what the
//! servers run on) and [`MemLog`] (in memory, what the simulator and the
//! conformance suite run on, with crashes that drop what was not synced).
//!
//! The coordinator's decision log and the participant's branch log are
//! written once, generically over [`Storage`]: their record layout, encoding
//! and checksums are the same code on either, so what the simulator proves
//! of them holds of the servers. The conformance suite (`tests` below) runs
//! the same cases against both implementations.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::log::{prefix_end, Durability, Entries, Log, LogError, LogStats, Write};

/// A key-value log with atomic write batches and explicit durability.
///
/// # Correctness
///
/// Every implementation keeps these promises; the conformance suite checks them.
pub trait Storage: Clone + Send + Sync + 'static {
    /// Writes `writes` as one atomic batch.
    ///
    /// # Correctness
    ///
    /// - When the future resolves `Ok` with [`Durability::Synced`] or
    ///   [`Durability::SyncedSoon`], the batch and every batch written before
    ///   it survive a process crash and a machine crash.
    /// - With [`Durability::Buffered`] the batch survives a process crash
    ///   (it is in the page cache) but may be lost with the machine; if it
    ///   is, so is every batch written after it and not yet synced (the log
    ///   is a prefix: a later batch never survives an earlier one).
    /// - A batch survives whole or not at all, never in part.
    /// - Batches apply in the order the calls were made, and a read after the
    ///   future resolved sees the batch.
    /// - An `Err` means the batch may or may not be durable; the caller must
    ///   stop rather than retry (a failed fsync is never trusted again).
    fn write_with(
        &self,
        writes: Vec<Write>,
        durability: Durability,
    ) -> impl Future<Output = Result<(), LogError>> + Send;

    /// [`Storage::write_with`], synced (`true`) or buffered (`false`).
    fn write(&self, writes: Vec<Write>, sync: bool) -> impl Future<Output = Result<(), LogError>> + Send {
        self.write_with(writes, if sync { Durability::Synced } else { Durability::Buffered })
    }

    /// [`Storage::write_with`] without a future to await: the batch is
    /// queued now, so batches keep the order of the calls (except that while
    /// the RocksDB log's queue is full, 65,536 writes waiting, a call may be
    /// overtaken by a later one: a caller that needs one write before
    /// another issues the second once the first is done, as every caller
    /// here does), and `then` is called with the result once the batch is
    /// written, on whatever thread finished it (the RocksDB log's writer
    /// thread; at once on the calling thread in memory). For a caller whose
    /// next step is only to say so (an actor's event), which otherwise
    /// awaited `write_with` in a task of its own.
    ///
    /// # Correctness
    ///
    /// As [`Storage::write_with`], with `then` in place of the future's
    /// resolving: when `then` is called with `Ok`, the batch is as durable as
    /// `durability` says; `then` is called exactly once, also when the write
    /// fails (an `Err` means the caller must stop). `then` must not block.
    fn write_then(
        &self,
        writes: Vec<Write>,
        durability: Durability,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    );

    /// Writes `writes` as one atomic batch with [`Durability::Buffered`],
    /// at once on the calling thread where the store allows (the RocksDB log
    /// does: no hop to its writer thread and back).
    ///
    /// # Correctness
    ///
    /// As [`Storage::write_with`] with [`Durability::Buffered`], except for
    /// order: the batch may apply before batches of earlier `write_with`
    /// calls that have not resolved yet (and may survive a machine crash that
    /// loses them). Only for a caller none of whose keys such a write touches
    /// and who awaits each of its own writes: a Raft state machine's apply,
    /// whose keys the log's appends never touch.
    fn write_buffered_now(&self, writes: Vec<Write>) -> impl Future<Output = Result<(), LogError>> + Send {
        self.write_with(writes, Durability::Buffered)
    }

    /// The value of `key`: what the last batch that wrote it left.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError>;

    /// Every key and value in `[from, to)`, in key order.
    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Entries, LogError>;

    /// Every key and value whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, LogError> {
        self.scan_range(prefix, &prefix_end(prefix))
    }

    /// Reclaims the space of what was deleted in `[from, to)`. Changes no
    /// value; may block (call it off the async threads).
    fn compact(&self, from: &[u8], to: &[u8]);

    /// Machine-independent counters of the work done.
    fn stats(&self) -> &LogStats;
}

impl Storage for Log {
    fn write_with(
        &self,
        writes: Vec<Write>,
        durability: Durability,
    ) -> impl Future<Output = Result<(), LogError>> + Send {
        Log::write_with(self, writes, durability)
    }

    fn write_then(
        &self,
        writes: Vec<Write>,
        durability: Durability,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    ) {
        Log::write_then(self, writes, durability, then);
    }

    fn write_buffered_now(&self, writes: Vec<Write>) -> impl Future<Output = Result<(), LogError>> + Send {
        let written = Log::write_buffered_now(self, &writes);
        std::future::ready(written)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        Log::get(self, key)
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Entries, LogError> {
        Log::scan_range(self, from, to)
    }

    fn compact(&self, from: &[u8], to: &[u8]) {
        Log::compact(self, from, to)
    }

    fn stats(&self) -> &LogStats {
        Log::stats(self)
    }
}

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
struct Disk {
    /// What a reader sees: every batch applied.
    current: Map,
    /// What survives a machine crash: every batch up to the last sync.
    synced: Map,
    /// Batches written since the last sync, oldest first.
    unsynced: Vec<Vec<Write>>,
    /// Bumped by every crash: handles of an older process are dead.
    epoch: u64,
}

/// An in-memory [`Storage`] that can crash.
///
/// Clones share one disk. [`MemLog::crash_process`] and
/// [`MemLog::crash_machine`] end the process that holds the handles: every
/// handle made before fails from then on with [`LogError::Closed`] (a dead
/// process writes nothing), and the returned handle is the restarted
/// process's view of what survived. Writes complete at once (the future is
/// ready on its first poll), so a single-threaded simulator can drive it
/// with a no-op waker.
#[derive(Clone, Default)]
pub struct MemLog {
    disk: Arc<Mutex<Disk>>,
    epoch: u64,
    stats: Arc<LogStats>,
}

fn apply(map: &mut Map, writes: &[Write]) {
    for write in writes {
        match write {
            Write::Put { key, value } => {
                map.insert(key.clone(), value.clone());
            }
            Write::Delete { key } | Write::SingleDelete { key } => {
                map.remove(key);
            }
            Write::DeleteRange { from, to } => {
                if from < to {
                    let doomed: Vec<Vec<u8>> = map
                        .range::<[u8], _>((Bound::Included(&from[..]), Bound::Excluded(&to[..])))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in doomed {
                        map.remove(&key);
                    }
                }
            }
        }
    }
}

impl MemLog {
    /// An empty disk.
    pub fn new() -> MemLog {
        MemLog::default()
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk, if this handle's process is still alive.
    fn live(&self) -> Result<MutexGuard<'_, Disk>, LogError> {
        let disk = self.disk();
        if disk.epoch == self.epoch {
            Ok(disk)
        } else {
            Err(LogError::Closed)
        }
    }

    fn write_now(&self, writes: Vec<Write>, durability: Durability) -> Result<(), LogError> {
        let mut disk = self.live()?;
        apply(&mut disk.current, &writes);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        disk.unsynced.push(writes);
        if durability != Durability::Buffered {
            let Disk { synced, unsynced, .. } = &mut *disk;
            for batch in unsynced.drain(..) {
                apply(synced, &batch);
            }
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn restart(&self, disk: &mut Disk) -> MemLog {
        disk.epoch += 1;
        disk.current = disk.synced.clone();
        MemLog { disk: Arc::clone(&self.disk), epoch: disk.epoch, stats: Arc::new(LogStats::default()) }
    }

    /// The process dies (kill -9): every batch written survives, synced or
    /// not (it reached the page cache). Returns the restarted process's handle.
    pub fn crash_process(&self) -> MemLog {
        let mut disk = self.disk();
        let Disk { synced, unsynced, .. } = &mut *disk;
        for batch in unsynced.drain(..) {
            apply(synced, &batch);
        }
        self.restart(&mut disk)
    }

    /// The machine dies: what was synced survives, and of the batches written
    /// since the last sync only the oldest `keep` do (the log is a prefix).
    /// Returns the restarted process's handle.
    pub fn crash_machine(&self, keep: usize) -> MemLog {
        let mut disk = self.disk();
        let Disk { synced, unsynced, .. } = &mut *disk;
        for batch in unsynced.drain(..).take(keep) {
            apply(synced, &batch);
        }
        unsynced.clear();
        self.restart(&mut disk)
    }

    /// Batches written since the last sync: what a machine crash may lose.
    pub fn unsynced_batches(&self) -> usize {
        self.disk().unsynced.len()
    }

    /// The value of `key` that a machine crash now would leave.
    pub fn synced_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.disk().synced.get(key).cloned()
    }

    /// Flips one bit of the stored value of `key`, synced and current alike
    /// (a disk that rots). Returns false if there is no such key.
    pub fn corrupt(&self, key: &[u8]) -> bool {
        let mut disk = self.disk();
        let Disk { current, synced, .. } = &mut *disk;
        let mut found = false;
        for map in [current, synced] {
            if let Some(value) = map.get_mut(key) {
                match value.last_mut() {
                    Some(byte) => *byte ^= 0x01,
                    None => value.push(0x01),
                }
                found = true;
            }
        }
        found
    }
}

impl Storage for MemLog {
    fn write_with(
        &self,
        writes: Vec<Write>,
        durability: Durability,
    ) -> impl Future<Output = Result<(), LogError>> + Send {
        std::future::ready(self.write_now(writes, durability))
    }

    fn write_then(
        &self,
        writes: Vec<Write>,
        durability: Durability,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    ) {
        then(self.write_now(writes, durability));
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        let value = self.live()?.current.get(key).cloned();
        if value.is_some() {
            self.stats.records_read.fetch_add(1, Ordering::Relaxed);
        }
        Ok(value)
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Entries, LogError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let disk = self.live()?;
        let out: Entries = disk
            .current
            .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.stats.records_read.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn compact(&self, _from: &[u8], _to: &[u8]) {}

    fn stats(&self) -> &LogStats {
        &self.stats
    }
}

/// Drives a future that never waits (every [`MemLog`] write, and anything
/// built only on them) to its end on the calling thread.
///
/// # Panics
///
/// If the future is not ready on its first poll: it waits on something a
/// single-threaded caller cannot drive.
pub fn now_or_never<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("a storage future waited: it is not an in-memory one"),
    }
}

/// Openers for tests that run one case against both implementations: each
/// call opens the store again (the previous handles must be dropped first for
/// RocksDB; for memory, each call is a process crash and restart).
pub mod testing {
    use std::path::{Path, PathBuf};

    use super::{Log, MemLog};

    /// Opens the RocksDB log at `dir` on every call, waiting (up to 10 s) for
    /// the previous handle's writer thread to let go of the database lock.
    pub fn rocks(dir: &Path) -> impl Fn() -> Log {
        let dir: PathBuf = dir.to_owned();
        move || reopen(&dir)
    }

    /// One in-memory disk; every call restarts the process on it.
    pub fn memory() -> impl Fn() -> MemLog {
        let disk = MemLog::new();
        move || disk.crash_process()
    }

    /// Opens `path`, waiting (up to 10 s) for a previous handle to close.
    pub fn reopen(path: &Path) -> Log {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Log::open(path) {
                Ok(log) => return log,
                Err(err) if std::time::Instant::now() > deadline => {
                    panic!("reopen {}: {err}", path.display())
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }
}

/// The conformance suite: every case runs against [`Log`] and [`MemLog`].
#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// What a case needs of a backend: a fresh store, a clean reopen, a crash.
    trait Backend: Sized {
        type S: Storage;
        fn fresh() -> Self;
        fn store(&self) -> Self::S;
        /// Closes cleanly and opens again.
        fn reopen(self) -> Self;
    }

    struct Rocks {
        dir: tempfile::TempDir,
        log: Option<Log>,
    }

    use super::testing::reopen as open_with_retry;

    impl Backend for Rocks {
        type S = Log;
        fn fresh() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path()).unwrap();
            Rocks { dir, log: Some(log) }
        }
        fn store(&self) -> Log {
            self.log.clone().expect("open")
        }
        fn reopen(mut self) -> Self {
            drop(self.log.take());
            let log = open_with_retry(self.dir.path());
            Rocks { log: Some(log), ..self }
        }
    }

    struct Mem(MemLog);

    impl Backend for Mem {
        type S = MemLog;
        fn fresh() -> Self {
            Mem(MemLog::new())
        }
        fn store(&self) -> MemLog {
            self.0.clone()
        }
        fn reopen(self) -> Self {
            Mem(self.0.crash_process())
        }
    }

    fn block<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    fn keys(entries: Entries) -> Vec<String> {
        entries.into_iter().map(|(k, _)| String::from_utf8(k).unwrap()).collect()
    }

    fn round_trips<B: Backend>() {
        let backend = B::fresh();
        let s = backend.store();
        block(async {
            s.write(vec![Write::put("a/1", "x"), Write::put("a/2", "y"), Write::put("b/1", "z")], true)
                .await
                .unwrap();
            s.write(vec![Write::delete("a/1"), Write::put("a/3", "w")], false).await.unwrap();
            s.write_with(vec![Write::put("a/2", "y2")], Durability::SyncedSoon).await.unwrap();
        });
        assert_eq!(s.get(b"a/1").unwrap(), None);
        assert_eq!(s.get(b"a/2").unwrap(), Some(b"y2".to_vec()));
        assert_eq!(keys(s.scan_prefix(b"a/").unwrap()), ["a/2", "a/3"]);
        assert_eq!(keys(s.scan_range(b"a/3", b"b/2").unwrap()), ["a/3", "b/1"]);
        assert_eq!(s.stats().fsyncs.load(Ordering::Relaxed), 2);
    }

    fn deletes_single_and_ranged<B: Backend>() {
        let backend = B::fresh();
        let s = backend.store();
        block(async {
            let puts = (0..10).map(|i| Write::put(format!("t/{i}"), "v")).collect();
            s.write(puts, false).await.unwrap();
            s.write(vec![Write::single_delete("t/0"), Write::delete_range("t/3", "t/6")], false)
                .await
                .unwrap();
        });
        s.compact(b"t/", b"t0");
        assert_eq!(keys(s.scan_prefix(b"t/").unwrap()), ["t/1", "t/2", "t/6", "t/7", "t/8", "t/9"]);
    }

    fn survives_a_clean_reopen<B: Backend>() {
        let backend = B::fresh();
        block(async {
            let s = backend.store();
            s.write(vec![Write::put("k", "synced")], true).await.unwrap();
            s.write(vec![Write::put("j", "buffered"), Write::delete("k")], false).await.unwrap();
        });
        let backend = backend.reopen();
        let s = backend.store();
        assert_eq!(s.get(b"k").unwrap(), None, "a buffered batch survives a clean close");
        assert_eq!(s.get(b"j").unwrap(), Some(b"buffered".to_vec()));
    }

    fn corrupt_records_are_errors_not_absent<B: Backend>() {
        let backend = B::fresh();
        let s = backend.store();
        let mut value =
            crate::record::encode(&crate::record::TxIdRecord::from(decree_proto::TxId::new(1, 2, 3)));
        let last = value.len() - 1;
        value[last] ^= 0x40;
        block(s.write(vec![Write::put("r", value)], true)).unwrap();
        let stored = s.get(b"r").unwrap().expect("a corrupt value is still there");
        assert!(crate::record::decode::<crate::record::TxIdRecord>(&stored).is_err());
    }

    fn write_then_calls_back_once_per_batch_and_keeps_call_order<B: Backend>() {
        let backend = B::fresh();
        let s = backend.store();
        let (told, heard) = std::sync::mpsc::channel();
        block(async {
            for n in 0..20u32 {
                let durability = if n % 2 == 0 { Durability::Synced } else { Durability::Buffered };
                let told = told.clone();
                s.write_then(
                    vec![Write::put("k", n.to_string()), Write::put(format!("n/{n:02}"), "")],
                    durability,
                    move |written| {
                        told.send((n, written)).unwrap();
                    },
                );
            }
        });
        drop(told);
        let mut calls: Vec<(u32, Result<(), LogError>)> = heard.iter().collect();
        calls.sort_by_key(|(n, _)| *n);
        assert_eq!(calls.len(), 20, "one call back per batch");
        for (n, (called, written)) in calls.into_iter().enumerate() {
            assert_eq!(called as usize, n);
            assert!(written.is_ok(), "batch {n}: {written:?}");
        }
        assert_eq!(
            s.get(b"k").unwrap(),
            Some(b"19".to_vec()),
            "the batches applied in the order of the calls"
        );
        assert_eq!(s.scan_prefix(b"n/").unwrap().len(), 20);
        drop(s);
        let backend = backend.reopen();
        assert_eq!(backend.store().get(b"n/18").unwrap(), Some(Vec::new()), "a synced batch survives");
    }

    macro_rules! conformance {
        ($($case:ident),* $(,)?) => {
            mod rocksdb { $( #[test] fn $case() { super::$case::<super::Rocks>() } )* }
            mod memory { $( #[test] fn $case() { super::$case::<super::Mem>() } )* }
        };
    }

    conformance!(
        round_trips,
        deletes_single_and_ranged,
        survives_a_clean_reopen,
        corrupt_records_are_errors_not_absent,
        write_then_calls_back_once_per_batch_and_keeps_call_order
    );

    /// Writes numbered batches of `BATCH` keys each, alternately synced and
    /// not, reporting each synced one; a crash then must leave a prefix of
    /// whole batches that includes every reported one.
    const BATCH: usize = 8;

    fn batch(n: usize) -> Vec<Write> {
        (0..BATCH).map(|i| Write::put(format!("b/{n:08}/{i}"), format!("{n}"))).collect()
    }

    /// The batches found after a crash: checks each is whole and that they
    /// are a prefix, and returns how many.
    fn surviving_prefix(s: &impl Storage) -> usize {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for (key, _) in s.scan_prefix(b"b/").unwrap() {
            let key = String::from_utf8(key).unwrap();
            let n: usize = key[2..10].parse().unwrap();
            *counts.entry(n).or_default() += 1;
        }
        for (n, count) in &counts {
            assert_eq!(*count, BATCH, "batch {n} survived in part");
        }
        let found: Vec<usize> = counts.keys().copied().collect();
        assert_eq!(found, (0..found.len()).collect::<Vec<_>>(), "the survivors are not a prefix");
        found.len()
    }

    #[test]
    fn memory_machine_crash_keeps_synced_and_whole_batches() {
        use rand::{Rng, SeedableRng};
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let log = MemLog::new();
            let mut synced = 0;
            let total = rng.random_range(1..40);
            for n in 0..total {
                let sync = rng.random_bool(0.3);
                block(log.write(batch(n), sync)).unwrap();
                if sync {
                    synced = n + 1;
                }
            }
            let keep = rng.random_range(0..=log.unsynced_batches());
            let restarted = log.crash_machine(keep);
            let survived = surviving_prefix(&restarted);
            assert!(survived >= synced, "seed {seed}: a synced batch was lost");
            assert_eq!(survived, synced + keep, "seed {seed}");
            assert!(matches!(log.get(b"b/"), Err(LogError::Closed)), "the dead process's handle is closed");
            assert!(block(log.write(batch(99), true)).is_err(), "a dead process writes nothing");
        }
    }

    #[test]
    fn memory_process_crash_keeps_every_batch() {
        let log = MemLog::new();
        for n in 0..5 {
            block(log.write(batch(n), n == 1)).unwrap();
        }
        assert_eq!(log.unsynced_batches(), 3);
        assert_eq!(surviving_prefix(&log.crash_process()), 5);
    }

    /// RocksDB under a real kill -9 mid-write: the test runs itself again as
    /// a child that writes batches until it is killed, and reads what survived.
    #[test]
    fn rocksdb_kill_9_mid_write_keeps_synced_and_whole_batches() {
        const CHILD: &str = "DECREE_STORAGE_CRASH_CHILD";
        if let Ok(dir) = std::env::var(CHILD) {
            let log = Log::open(std::path::Path::new(&dir)).unwrap();
            block(async {
                for n in 0.. {
                    let sync = n % 3 == 0;
                    log.write(batch(n), sync).await.unwrap();
                    if sync {
                        println!("synced {}", n + 1);
                    }
                }
            });
            unreachable!();
        }
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "storage::tests::rocksdb_kill_9_mid_write_keeps_synced_and_whole_batches"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut synced = 0;
        while synced < 300 {
            let line = lines.next().expect("the child ended early").unwrap();
            if let Some(n) = line.strip_prefix("synced ") {
                synced = n.parse().unwrap();
            }
        }
        child.kill().unwrap(); // SIGKILL, mid-write
        child.wait().unwrap();
        let path: PathBuf = dir.path().to_owned();
        let log = open_with_retry(&path);
        let survived = surviving_prefix(&log);
        assert!(survived >= synced, "{survived} batches survived, {synced} were synced");
    }
}
