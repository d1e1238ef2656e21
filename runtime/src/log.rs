//! The RocksDB log, with group commit.
//!
//! # Correctness
//!
//! - [`Log::write`] with `sync = true` returns only after the writes are in the
//!   RocksDB write-ahead log *and* the log file is fsynced: they survive a
//!   process kill and a machine crash.
//! - With `sync = false` the writes are in the WAL in the OS page cache when it
//!   returns: they survive a process kill (SIGKILL, abort) but may be lost
//!   with the machine.
//! - The writes of one call are atomic (one RocksDB write batch), and calls are
//!   applied in the order they were queued.
//! - A failed write poisons the log: every later call fails with
//!   [`LogError::Poisoned`]. A failed fsync is never retried (the kernel may
//!   have dropped the dirty pages); the process must stop.
//! - Corruption is an error, never a missing record: a record whose checksum
//!   fails in the middle of the write-ahead log refuses the open (RocksDB's
//!   `TolerateCorruptedTailRecords`: only a torn last write, which was never
//!   acknowledged as synced, is dropped), and one in a table file fails the
//!   read that meets it; both errors name the file.
//!
//! - [`Durability::SyncedSoon`] is as durable as a synced write when the call
//!   returns; it only lets the writer wait up to [`SOON`] for other writes to
//!   share the fsync with.
//!
//! # Group commit
//!
//! One dedicated writer thread drains the queue: every request waiting when it
//! wakes goes into one write batch with one fsync (if any of them asked for a
//! sync). No synced request waits for an fsync it did not need beyond the one
//! in flight when it arrived. A group of only `SyncedSoon` (and unsynced)
//! requests waits up to [`SOON`] for more — writes off the critical path, like
//! a participant's commit after the decision is durable, then ride along with
//! the next urgent fsync instead of taking one of their own. Under load a
//! synced group waits up to [`BUSY_WAIT`] for company (see [`Arrivals`]),
//! and no longer than [`PAUSE`] after the last arrival.
//! While it waits, a caller wakes it only when the queue holds what it waits
//! for ([`queue`]): a wake-up per arrival was a context switch each, on cores
//! the processes saturate.
//!
//! # Scheduling
//!
//! On Linux the writer thread runs under `SCHED_BATCH` ([`WriterPolicy`],
//! `--log-writer`): woken by an arrival or a finished fsync, it does not
//! preempt the thread running on its core but runs when that one blocks or
//! its slice ends. On an idle core nothing changes; on saturated cores the
//! worker that woke it finishes its turn (queueing more writes) instead of
//! paying two context switches, and the writer takes a larger group.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::oneshot;

/// Keys and values read back, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

mod queue;

/// How a log's writer thread is scheduled (Linux; elsewhere the system's default).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriterPolicy {
    /// `SCHED_BATCH`: woken, the writer waits for the running thread's turn to end instead
    /// of preempting it (fewer context switches and larger groups on busy cores).
    #[default]
    Batch,
    /// `SCHED_OTHER`, as every other thread: woken, it may preempt the running one.
    Normal,
}

/// Whether the writer threads of logs opened from now on run as batch
/// threads ([`WriterPolicy::Batch`], the default): see [`set_writer_policy`].
static WRITER_BATCH: AtomicBool = AtomicBool::new(true);

/// Sets how the writer threads of logs opened from now on are scheduled
/// (a process sets it once, from `--log-writer`, before it opens a log).
pub fn set_writer_policy(policy: WriterPolicy) {
    WRITER_BATCH.store(policy == WriterPolicy::Batch, Ordering::Relaxed);
}

/// The policy set by [`set_writer_policy`] (the default until then).
pub fn writer_policy() -> WriterPolicy {
    if WRITER_BATCH.load(Ordering::Relaxed) {
        WriterPolicy::Batch
    } else {
        WriterPolicy::Normal
    }
}

impl WriterPolicy {
    /// The flag that asks another decree process for this policy, spelled as
    /// `--log-writer` parses it.
    pub fn flag(self) -> [String; 2] {
        let value = clap::ValueEnum::to_possible_value(&self).expect("no policy is skipped");
        ["--log-writer".to_owned(), value.get_name().to_owned()]
    }
}

/// Applies the policy set by [`set_writer_policy`] to the calling thread.
/// A refusal (a sandbox that forbids it) leaves the thread as it was: it
/// only costs CPU, never correctness.
fn schedule_writer() {
    #[cfg(target_os = "linux")]
    {
        let policy = match writer_policy() {
            WriterPolicy::Normal => libc::SCHED_OTHER,
            WriterPolicy::Batch => libc::SCHED_BATCH,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the call's duration;
        // pid 0 is the calling thread.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "the log writer keeps its scheduling policy");
        }
    }
}

/// Most requests one write batch takes.
const MAX_GROUP: usize = 4096;

/// How long a group of only [`Durability::SyncedSoon`] requests waits for
/// company before it is synced anyway.
pub const SOON: Duration = Duration::from_millis(1);

/// Under load, a synced group waits up to [`BUSY_WAIT`] to gather
/// [`BUSY_GROUP`] writes for its fsync: only when writes arrive fast enough
/// to fill it in that time (the last `BUSY_GROUP` came within `BUSY_WAIT`)
/// from writers in flight at once (synced requests queued together:
/// [`Arrivals`]). Then the process is saturated and the wait costs little
/// throughput; at lower rates, and for a lone client however fast, nothing
/// waits.
const BUSY_GROUP: usize = 16;
const BUSY_WAIT: Duration = Duration::from_millis(4);
/// A busy group stops waiting once no write came for this long: the company
/// it waits for is not on its way (its writers wait on this fsync, or on
/// another process's). A wait of the whole [`BUSY_WAIT`] for it made a
/// handful of clients stall every few transactions (C=4: p99 6.5 ms at p50
/// 0.64 ms on a disk that syncs in 0.06 ms; with the pause 2.0 ms at 0.54).
const PAUSE: Duration = Duration::from_micros(100);

/// What a write must be when [`Log::write_with`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the WAL in the page cache: survives a process kill, not a machine crash.
    Buffered,
    /// Synced now (with whatever else is waiting).
    Synced,
    /// Synced, within [`SOON`] of the call, sharing the fsync with other writes.
    SyncedSoon,
}

/// One change in a write batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Deletes a key that was put exactly once since it was last deleted (a
    /// record written once and removed once, like an unfinished decision):
    /// RocksDB drops the pair as soon as they meet, usually at the memtable's
    /// flush, so a stream of them leaves no tombstones for scans to skip.
    /// Undefined for a key put more than once.
    SingleDelete {
        key: Vec<u8>,
    },
    /// Deletes every key in `[from, to)` with one range tombstone, reclaimed by
    /// compaction (see [`Log::compact`]).
    DeleteRange {
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

impl Write {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Write::Put { key: key.into(), value: value.into() }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Write::Delete { key: key.into() }
    }

    pub fn single_delete(key: impl Into<Vec<u8>>) -> Self {
        Write::SingleDelete { key: key.into() }
    }

    pub fn delete_range(from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> Self {
        Write::DeleteRange { from: from.into(), to: to.into() }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("rocksdb: {0}")]
    Rocks(String),
    /// A record or file of the log failed its checksum or does not decode:
    /// never read as absent, never repaired in silence.
    #[error("the log is corrupted: {0}")]
    Corrupt(String),
    #[error("the log failed earlier and accepts no more writes")]
    Poisoned,
    #[error("the log writer has stopped")]
    Closed,
    /// A replicated log could not make the write durable at a majority (this
    /// replica is not the leader, or lost its leadership).
    #[error("replication: {0}")]
    Replication(String),
}

impl From<rocksdb::Error> for LogError {
    fn from(err: rocksdb::Error) -> Self {
        match err.kind() {
            rocksdb::ErrorKind::Corruption => LogError::Corrupt(err.into_string()),
            _ => LogError::Rocks(err.into_string()),
        }
    }
}

struct Request {
    writes: Vec<Write>,
    durability: Durability,
    done: Done,
}

/// Who hears that a write is done: here a request's batch written; in a
/// replicated store (`decree-replica`) its entry committed and applied.
pub enum Done {
    /// A caller awaiting it ([`Log::write_with`]).
    Wake(oneshot::Sender<Result<(), LogError>>),
    /// A callback ([`Log::write_then`]), called where the write finished
    /// (here on the writer thread).
    Call(Box<dyn FnOnce(Result<(), LogError>) + Send>),
}

impl Done {
    /// Tells whoever hears it; a caller that stopped waiting changes nothing.
    pub fn finish(self, result: Result<(), LogError>) {
        match self {
            // A caller that stopped waiting does not stop the write.
            Done::Wake(waiting) => drop(waiting.send(result)),
            Done::Call(then) => then(result),
        }
    }
}

/// Counters of the writer: machine-independent measures of cost.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Synced write batches (each is one fsync of the WAL).
    pub fsyncs: AtomicU64,
    /// Write batches of any kind.
    pub batches: AtomicU64,
    /// Requests written (a batch holds one or more).
    pub requests: AtomicU64,
    /// Synced groups that waited for company ([`BUSY_WAIT`]).
    pub company_waits: AtomicU64,
    /// Records returned by reads ([`Log::get`] hits and every entry a scan
    /// yields): what a start costs, machine-independently.
    pub records_read: AtomicU64,
}

/// The database, and a signal that it closed: the sender goes with it.
struct Database {
    db: DB,
    /// The log's metrics, looked up once (see [`Meters`]).
    meters: Meters,
    /// A write failed: every later one fails too (see [`LogError::Poisoned`]).
    poisoned: AtomicBool,
    /// Dropped right after `db` (fields drop in order): receivers see it closed.
    _closed: tokio::sync::watch::Sender<()>,
}

impl std::ops::Deref for Database {
    type Target = DB;
    fn deref(&self) -> &DB {
        &self.db
    }
}

/// A RocksDB database with one group-committing writer thread.
///
/// Dropping the last handle closes the database before the drop returns: the
/// handle's queue and database go first (fields drop in order), then the
/// writer thread, holding the other reference, is joined. A process that
/// exits right after dropping its log (a test's last one, a command) so never
/// tears down RocksDB's statics under a close still running on the writer
/// thread, which aborts the process ("pthread lock: Invalid argument").
#[derive(Clone)]
pub struct Log {
    db: Arc<Database>,
    /// Closed once the database is: see [`Log::closed`].
    closed: tokio::sync::watch::Receiver<()>,
    queue: queue::Sender,
    stats: Arc<LogStats>,
    /// Last: joined once every other field of every handle is gone.
    _writer: Arc<WriterThread>,
}

/// The writer thread, joined when dropped (see [`Log`]).
struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            // The writer returns once every sender is gone, which the last
            // handle's fields dropped before this one; a panic in it was
            // already reported, and poisons nothing here.
            let _ = thread.join();
        }
    }
}

/// The memtable keeps an insert position per key prefix (see [`Log::open`]).
const INSERT_HINTS: &str = "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.2";

impl Log {
    /// Opens (or creates) the database at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Log, LogError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        // Small logs: keep memory low and let RocksDB sync the WAL only when asked.
        options.set_max_background_jobs(2);
        // A participant's data keys arrive in random order, each inserted by a
        // search of the memtable's skip list from the top: a quarter of the
        // entries is a level or two fewer to walk (`FindSpliceForLevel` was the
        // top user-space symbol of the whole system at C=64). Each participant's
        // CPU per transaction 4 % lower than with 16 MiB (docs/performance.md),
        // and a restart replays at most that much unflushed WAL per memtable.
        options.set_write_buffer_size(4 * 1024 * 1024);
        // Bounded on disk however long the process runs: leveled compaction with
        // dynamic level sizes keeps space amplification near 1.1x; RocksDB's own
        // info log is capped and rotated; at most 64 MiB of WAL waits for a flush.
        options.set_level_compaction_dynamic_level_bytes(true);
        options.set_max_total_wal_size(64 * 1024 * 1024);
        options.set_max_log_file_size(4 * 1024 * 1024);
        options.set_keep_log_file_num(3);
        // The default (point in time) stops replaying the WAL at a corrupted
        // record and opens without what follows: synced records lost in silence.
        options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        options.set_paranoid_checks(true);
        // Most keys written are a two-byte prefix and a rising txid (a prepared
        // record, a tombstone, a decision): each is put next to the last key of
        // its prefix instead of searched for from the memtable's top level.
        let options = options
            .get_options_from_string(INSERT_HINTS)
            .map_err(|err| LogError::Rocks(format!("log options {INSERT_HINTS:?}: {}", err.into_string())))?;
        let (closed_tx, closed) = tokio::sync::watch::channel(());
        let db = DB::open(&options, path).map_err(|err| {
            let why = format!("cannot open the log in {}: {}", path.display(), err.clone().into_string());
            match LogError::from(err) {
                LogError::Corrupt(_) => LogError::Corrupt(why),
                _ => LogError::Rocks(why),
            }
        })?;
        let db = Arc::new(Database {
            db,
            meters: Meters::new(),
            poisoned: AtomicBool::new(false),
            _closed: closed_tx,
        });
        let stats = Arc::new(LogStats::default());
        let (queue, requests) = queue::queue();
        let writer_db = Arc::clone(&db);
        let writer_stats = Arc::clone(&stats);
        let writer = std::thread::Builder::new()
            .name("decree-log-writer".into())
            .spawn(move || {
                schedule_writer();
                run_writer(&writer_db, &requests, &writer_stats)
            })
            .map_err(|err| LogError::Rocks(format!("cannot start the log writer: {err}")))?;
        Ok(Log { db, closed, queue, stats, _writer: Arc::new(WriterThread(Some(writer))) })
    }

    /// Writes `writes` atomically; see the module's Correctness section.
    pub async fn write(&self, writes: Vec<Write>, sync: bool) -> Result<(), LogError> {
        self.write_with(writes, if sync { Durability::Synced } else { Durability::Buffered }).await
    }

    /// Writes `writes` atomically with the given durability.
    pub async fn write_with(&self, writes: Vec<Write>, durability: Durability) -> Result<(), LogError> {
        let (done, finished) = oneshot::channel();
        self.enqueue(Request { writes, durability, done: Done::Wake(done) });
        finished.await.map_err(|_| LogError::Closed)?
    }

    /// [`Log::write_with`] without a future: the batch is queued now and
    /// `then` is called with the result on the writer's thread once it is
    /// written as `durability` asks (see [`Storage::write_then`]: no task to
    /// wake and no hand-off between the writer and the caller's next step).
    /// `then` must not block.
    pub fn write_then(
        &self,
        writes: Vec<Write>,
        durability: Durability,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    ) {
        self.enqueue(Request { writes, durability, done: Done::Call(Box::new(then)) });
    }

    /// Hands `request` to the writer thread: at once, or, while its queue is
    /// full (65,536 writes waiting), from a blocking task, since `send`
    /// blocks (and a later request may then go first). A request that cannot
    /// be queued (the writer is gone) is finished with [`LogError::Closed`].
    fn enqueue(&self, request: Request) {
        match self.queue.try_send(request) {
            Ok(()) => {}
            Err(queue::SendError::Full(request)) => {
                let queue = self.queue.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(request) = queue.send(request) {
                        request.done.finish(Err(LogError::Closed));
                    }
                });
            }
            Err(queue::SendError::Closed(request)) => request.done.finish(Err(LogError::Closed)),
        }
    }

    /// Writes `writes` atomically, buffered, now on the calling thread
    /// (blocking it for RocksDB's memtable insert and WAL append, no fsync)
    /// instead of through the writer thread: see [`Storage::write_buffered_now`].
    pub fn write_buffered_now(&self, writes: &[Write]) -> Result<(), LogError> {
        write_batches(&self.db, [(writes, Durability::Buffered)], &self.stats)
    }

    /// Reads one key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        let value = self.db.get(key)?;
        if value.is_some() {
            self.stats.records_read.fetch_add(1, Ordering::Relaxed);
        }
        Ok(value)
    }

    /// Every key and value whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Entries, LogError> {
        self.scan_range(prefix, &prefix_end(prefix))
    }

    /// Every key and value in `[from, to)`, in key order. The bound is given to
    /// RocksDB, so the scan never looks past it.
    pub fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<Entries, LogError> {
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(to.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_opt(IteratorMode::From(from, rocksdb::Direction::Forward), options) {
            let (key, value) = item?;
            out.push((key.into_vec(), value.into_vec()));
        }
        self.stats.records_read.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Compacts the keys in `[from, to)` now, so that what range deletes and
    /// deletes removed there leaves the disk. Blocks: call it off the async
    /// threads.
    pub fn compact(&self, from: &[u8], to: &[u8]) {
        self.db.compact_range(Some(from), Some(to));
    }

    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    /// Resolves once the database is closed: every handle dropped and the
    /// writer thread done. A process that exits right after a server
    /// returns waits for it, so that RocksDB never closes while the process
    /// tears down.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.clone();
        async move { while closed.changed().await.is_ok() {} }
    }
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (or empty): no key is after all of them but "everything".
    vec![u8::MAX; prefix.len() + 1]
}

fn run_writer(db: &Database, requests: &queue::Receiver, stats: &LogStats) {
    let mut group = Vec::with_capacity(64);
    let mut recent = Arrivals::default();
    while requests.recv(&mut group, MAX_GROUP) {
        let gathered = group.len();
        recent.note(Instant::now(), gathered);
        let urgent = urgent(&group);
        let company = if urgent && recent.busy(Instant::now()) && recent.concurrent() {
            recent.company()
        } else {
            MAX_GROUP
        };
        if !urgent && group.iter().any(|r| r.durability == Durability::SyncedSoon) {
            // Only writes that may wait: give others up to SOON to share the
            // fsync, until an urgent one comes.
            requests.gather(&mut group, MAX_GROUP, MAX_GROUP, true, Instant::now() + SOON, None);
        } else if company < MAX_GROUP {
            stats.company_waits.fetch_add(1, Ordering::Relaxed);
            db.meters.company_waits.increment(1);
            // Writes arrive fast enough: wait for company to share the fsync,
            // as many as recent groups held (the writers in flight come back
            // about once a cycle; fewer than BUSY_GROUP of them never fill it).
            requests.gather(&mut group, company, MAX_GROUP, false, Instant::now() + BUSY_WAIT, Some(PAUSE));
        }
        recent.note(Instant::now(), group.len() - gathered);
        let synced = group.iter().filter(|r| r.durability == Durability::Synced).count();
        recent.grouped_after(group.len(), gathered, company, synced);
        let result = write_batches(db, group.iter().map(|r| (&r.writes[..], r.durability)), stats);
        for request in group.drain(..) {
            request.done.finish(result.clone());
        }
    }
}

/// Whether `group` holds a write that must be synced now.
fn urgent(group: &[Request]) -> bool {
    group.iter().any(|r| r.durability == Durability::Synced)
}

/// When the writer saw the last [`BUSY_GROUP`] requests arrive: the load is
/// busy when all of them came within [`BUSY_WAIT`], so a group waiting that
/// long would likely fill. (A rate smoothed over cycles was fooled by two
/// writes in quick succession at low load, and a lone client's fsync then
/// waited the whole window for company that never came.)
///
/// A high rate alone is not company: a lone client on a disk that syncs in
/// 0.06 ms makes 16 writes in 3 ms, each after the one before it was synced,
/// so a group waiting for the next one waited the whole window (C=1: p99 5.5
/// ms at p50 0.33 ms). Company is writers in flight at once, and the writer
/// sees them as [`Durability::Synced`] requests queued together: a busy group
/// waits only if one of the last [`GROUPS`] groups held two or more (as
/// other databases delay a commit for company only with enough transactions
/// active beside it).
#[derive(Default)]
struct Arrivals {
    seen: std::collections::VecDeque<Instant>,
    /// The sizes of the last [`GROUPS`] groups written.
    groups: [usize; GROUPS],
    next: usize,
    /// How many [`Durability::Synced`] requests each of them held.
    synced: [usize; GROUPS],
}

/// How many recent groups [`Arrivals::company`] looks back on.
const GROUPS: usize = 4;

impl Arrivals {
    /// A group of `size` written, `synced` of them [`Durability::Synced`].
    fn grouped(&mut self, size: usize, synced: usize) {
        self.groups[self.next % GROUPS] = size;
        self.synced[self.next % GROUPS] = synced;
        self.next += 1;
    }

    /// A group of `size` written: `gathered` were queued when the writer
    /// woke, and it waited for `company` (or for none: `MAX_GROUP`). What
    /// queued beyond that company rode along but is not counted: it would
    /// raise the company later groups wait for past what comes within
    /// [`BUSY_WAIT`] at a moderate load, and their fsyncs would wait the
    /// window out (C=4: p99 3.4-4.1 ms counting only the company, 5.3-5.7
    /// counting all).
    fn grouped_after(&mut self, size: usize, gathered: usize, company: usize, synced: usize) {
        self.grouped(size.min(gathered.max(company)), synced);
    }

    /// How large a busy group waits to grow: the largest of the recent
    /// groups, at most [`BUSY_GROUP`].
    fn company(&self) -> usize {
        self.groups.iter().copied().max().unwrap_or(0).clamp(2, BUSY_GROUP)
    }

    /// Whether writers are in flight at once: one of the last [`GROUPS`]
    /// groups held two synced requests or more.
    fn concurrent(&self) -> bool {
        self.synced.iter().any(|&synced| synced >= 2)
    }

    fn note(&mut self, now: Instant, count: usize) {
        for _ in 0..count.min(BUSY_GROUP) {
            if self.seen.len() == BUSY_GROUP {
                self.seen.pop_front();
            }
            self.seen.push_back(now);
        }
    }

    fn busy(&self, now: Instant) -> bool {
        self.seen.len() == BUSY_GROUP
            && self.seen.front().is_some_and(|oldest| now.duration_since(*oldest) <= BUSY_WAIT)
    }
}

/// Writes the requests' batches as one, synced if any asks for more than
/// [`Durability::Buffered`]. The first failure poisons the database.
fn write_batches<'a>(
    db: &Database,
    requests: impl IntoIterator<Item = (&'a [Write], Durability)>,
    stats: &LogStats,
) -> Result<(), LogError> {
    if db.poisoned.load(Ordering::Relaxed) {
        return Err(LogError::Poisoned);
    }
    let result = write_group(db, requests, stats);
    if let Err(err) = &result {
        tracing::error!(error = %err, "log write failed; the log is poisoned");
        db.poisoned.store(true, Ordering::Relaxed);
    }
    result
}

fn write_group<'a>(
    db: &Database,
    requests: impl IntoIterator<Item = (&'a [Write], Durability)>,
    stats: &LogStats,
) -> Result<(), LogError> {
    let mut batch = WriteBatch::default();
    let mut sync = false;
    let mut count = 0u64;
    for (writes, durability) in requests {
        count += 1;
        sync |= durability != Durability::Buffered;
        for write in writes {
            match write {
                Write::Put { key, value } => batch.put(key, value),
                Write::Delete { key } => batch.delete(key),
                Write::SingleDelete { key } => batch.single_delete(key),
                Write::DeleteRange { from, to } => batch.delete_range(from, to),
            }
        }
    }
    let mut options = WriteOptions::default();
    options.set_sync(sync);
    let started = Instant::now();
    db.write_opt(batch, &options)?;
    let took = started.elapsed().as_secs_f64();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    stats.requests.fetch_add(count, Ordering::Relaxed);
    let meters = &db.meters;
    meters.batches.increment(1);
    meters.writes.increment(count);
    meters.batch_size.record(count as f64);
    if sync {
        stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        meters.fsyncs.increment(1);
        meters.synced_seconds.record(took);
    } else {
        meters.buffered_seconds.record(took);
    }
    Ok(())
}

/// The log's metrics (`crate::metrics`), looked up in the exporter's
/// registry once, when the log opens, as the actors' and the streams' are:
/// each `counter!` or `histogram!` looks its key up and allocates a handle,
/// which the writer did for every batch. A process installs its exporter
/// before it opens its log; with none installed they record nothing.
struct Meters {
    batches: metrics::Counter,
    writes: metrics::Counter,
    batch_size: metrics::Histogram,
    fsyncs: metrics::Counter,
    company_waits: metrics::Counter,
    synced_seconds: metrics::Histogram,
    buffered_seconds: metrics::Histogram,
}

impl Meters {
    fn new() -> Meters {
        use crate::metrics::*;
        Meters {
            batches: metrics::counter!(LOG_BATCHES),
            writes: metrics::counter!(LOG_WRITES),
            batch_size: metrics::histogram!(LOG_BATCH_SIZE),
            fsyncs: metrics::counter!(LOG_FSYNCS),
            company_waits: metrics::counter!(LOG_COMPANY_WAITS),
            synced_seconds: metrics::histogram!(LOG_WRITE_SECONDS, "synced" => "true"),
            buffered_seconds: metrics::histogram!(LOG_WRITE_SECONDS, "synced" => "false"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_only_when_the_last_group_worth_came_within_the_wait() {
        let start = Instant::now();
        let at = |us: u64| start + Duration::from_micros(us);
        let mut recent = Arrivals::default();
        // A lone client: two writes in quick succession, then a pause.
        recent.note(at(0), 1);
        recent.note(at(20), 1);
        assert!(!recent.busy(at(30)), "two quick writes are not a busy load");
        // One write every 600 µs (1,700 a second): 16 take 9 ms, never busy.
        let mut recent = Arrivals::default();
        for i in 0..100 {
            recent.note(at(i * 600), 1);
            assert!(!recent.busy(at(i * 600)), "at write {i}");
        }
        // One every 100 µs (10,000 a second): busy once 16 came within 4 ms.
        let mut recent = Arrivals::default();
        for i in 0..16 {
            assert!(!recent.busy(at(i * 100)), "only {i} seen");
            recent.note(at(i * 100), 1);
        }
        assert!(recent.busy(at(1_600)));
        // The load stops: no longer busy once the window has passed.
        assert!(!recent.busy(at(1_500 + 4_001)));
        // A group of 16 gathered at once came fast enough.
        let mut recent = Arrivals::default();
        recent.note(at(0), 40);
        assert!(recent.busy(at(10)));
    }

    #[test]
    fn a_lone_client_however_fast_is_no_company() {
        let start = Instant::now();
        let at = |us: u64| start + Duration::from_micros(us);
        let mut recent = Arrivals::default();
        // One synced write every 100 µs, each alone in its group (the next
        // comes only once it is synced), with an unsynced one beside it.
        for i in 0..40 {
            recent.note(at(i * 100), 2);
            recent.grouped_after(2, 2, MAX_GROUP, 1);
        }
        assert!(recent.busy(at(4_000)), "the rate is high");
        assert!(!recent.concurrent(), "but no two synced writes were ever queued together");
        // Two writers in flight: one group holds two synced writes.
        recent.grouped_after(3, 3, MAX_GROUP, 2);
        assert!(recent.concurrent());
        // Four groups later, alone again: no longer.
        for _ in 0..GROUPS {
            assert!(recent.concurrent());
            recent.grouped_after(2, 2, MAX_GROUP, 1);
        }
        assert!(!recent.concurrent());
    }

    /// Each synced write awaited before the next, as fast as the disk
    /// allows: on a disk that syncs in 0.06 ms the rate alone armed the wait
    /// here, and every write then waited for company that could not come.
    #[tokio::test]
    async fn a_lone_writer_never_waits_for_company() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        for i in 0..300 {
            log.write(vec![Write::put(format!("k{i}"), "v")], true).await.unwrap();
            log.write(vec![Write::put(format!("e{i}"), "v")], false).await.unwrap();
        }
        assert_eq!(log.stats().fsyncs.load(Ordering::Relaxed), 300);
        assert_eq!(log.stats().company_waits.load(Ordering::Relaxed), 0);
    }

    /// The writer thread runs under `SCHED_BATCH` (the default policy, which
    /// no test here changes): once a synced write came back, this log's
    /// writer has set it, so at least one writer thread of this process has it.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_writer_thread_runs_as_a_batch_thread() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        log.write(vec![Write::put("k", "v")], true).await.unwrap();
        let policies: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|task| task.unwrap().path())
            .filter(|task| {
                std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == "decree-log-writ")
            })
            .map(|task| {
                let tid: i32 = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
                // SAFETY: a plain query of a thread of this process.
                unsafe { libc::sched_getscheduler(tid) }
            })
            .collect();
        assert!(policies.contains(&libc::SCHED_BATCH), "writer threads' policies: {policies:?}");
    }

    #[test]
    fn a_busy_group_waits_for_as_many_as_recent_groups_held() {
        let mut recent = Arrivals::default();
        assert_eq!(recent.company(), 2, "at least one more");
        for size in [6, 9, 7, 8] {
            recent.grouped(size, 1);
        }
        assert_eq!(recent.company(), 9, "the largest of the last four");
        for size in [3, 3, 3, 3] {
            recent.grouped(size, 1);
        }
        assert_eq!(recent.company(), 3, "the 9 is four groups back");
        recent.grouped(40, 1);
        assert_eq!(recent.company(), BUSY_GROUP, "never more than a full group");
    }

    #[test]
    fn what_rides_along_a_busy_group_does_not_raise_the_company_later_ones_wait_for() {
        let mut recent = Arrivals::default();
        for _ in 0..GROUPS {
            recent.grouped_after(12, 1, 3, 1);
        }
        assert_eq!(recent.company(), 3, "waited for 3: the 9 that came along are not company to wait for");
        recent.grouped_after(12, 7, 3, 1);
        assert_eq!(recent.company(), 7, "what was queued when the writer woke counts");
        recent.grouped_after(9, 9, MAX_GROUP, 1);
        assert_eq!(recent.company(), 9, "a group that waited for none counts whole");
    }

    #[tokio::test]
    async fn writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path()).unwrap();
            log.write(vec![Write::put("a", "1"), Write::put("b", "2")], true).await.unwrap();
            log.write(vec![Write::delete("a")], false).await.unwrap();
            assert_eq!(log.stats().fsyncs.load(Ordering::Relaxed), 1);
        }
        // Dropping the last handle closed the database (its lock is free) and
        // joined the writer: it opens again at once, with no retry.
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.get(b"a").unwrap(), None);
        assert_eq!(log.get(b"b").unwrap(), Some(b"2".to_vec()));
    }

    /// A process that exits as soon as its last handle is dropped: RocksDB
    /// must be closed by then, or exit tears down its statics under the close
    /// and the process aborts (it did, in about one exit in eight, when the
    /// writer thread closed the database after the drop returned). The test
    /// runs itself again as such a child, forty times.
    #[test]
    fn a_process_exiting_right_after_dropping_its_log_exits_cleanly() {
        const CHILD: &str = "DECREE_LOG_EXIT_CHILD";
        if let Ok(dir) = std::env::var(CHILD) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let log = Log::open(Path::new(&dir)).unwrap();
            for i in 0..50 {
                let write = Write::put(format!("k{i}"), "v".repeat(1000));
                runtime.block_on(log.write(vec![write], false)).unwrap();
            }
            drop(log);
            std::process::exit(0);
        }
        for run in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "log::tests::a_process_exiting_right_after_dropping_its_log_exits_cleanly"])
                .args(["--nocapture", "--test-threads=1"])
                .env(CHILD, dir.path())
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "exit {run} ended {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_synced_soon_write_alone_is_still_synced() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        log.write_with(vec![Write::put("k", "v")], Durability::SyncedSoon).await.unwrap();
        assert_eq!(log.stats().fsyncs.load(Ordering::Relaxed), 1);
        assert_eq!(log.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn concurrent_writers_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        let writers: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.write(vec![Write::put(format!("k{i}"), "v")], true).await })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        let fsyncs = log.stats().fsyncs.load(Ordering::Relaxed);
        assert!((1..=200).contains(&fsyncs));
        assert_eq!(log.stats().requests.load(Ordering::Relaxed), 200);
        assert_eq!(log.scan_prefix(b"k").unwrap().len(), 200);
    }

    #[tokio::test]
    async fn scan_prefix_stops_at_the_prefix_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        log.write(
            vec![Write::put("a/1", "x"), Write::put("b/1", "y"), Write::put("b/2", "z"), Write::put("c", "")],
            false,
        )
        .await
        .unwrap();
        let keys: Vec<_> = log.scan_prefix(b"b/").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"b/1".to_vec(), b"b/2".to_vec()]);
    }

    #[tokio::test]
    async fn a_buffered_write_now_is_read_at_once_and_kept_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path()).unwrap();
        let closed = log.closed();
        log.write_buffered_now(&[Write::put("applied", "7"), Write::put("data", "x")]).unwrap();
        assert_eq!(log.get(b"data").unwrap(), Some(b"x".to_vec()), "read as soon as it returns");
        assert_eq!(log.stats().batches.load(Ordering::Relaxed), 1);
        assert_eq!(log.stats().fsyncs.load(Ordering::Relaxed), 0, "buffered: no fsync of its own");
        log.write(vec![Write::put("log", "entry")], true).await.unwrap();
        assert_eq!(log.stats().fsyncs.load(Ordering::Relaxed), 1);
        drop(log);
        closed.await;
        let log = Log::open(dir.path()).unwrap();
        assert_eq!(log.get(b"applied").unwrap(), Some(b"7".to_vec()));
        assert_eq!(log.get(b"data").unwrap(), Some(b"x".to_vec()));
        assert_eq!(log.get(b"log").unwrap(), Some(b"entry".to_vec()));
    }

    /// Flips a byte at `at` (a fraction of its length) of the one file in
    /// `dir` whose name ends with `suffix`; returns its path.
    fn flip(dir: &Path, suffix: &str, at: f64) -> std::path::PathBuf {
        let files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(suffix) && std::fs::metadata(p).unwrap().len() > 0)
            .collect();
        assert_eq!(files.len(), 1, "one {suffix} file in {}: {files:?}", dir.display());
        let mut bytes = std::fs::read(&files[0]).unwrap();
        let i = (bytes.len() as f64 * at) as usize;
        bytes[i] ^= 0x5a;
        std::fs::write(&files[0], bytes).unwrap();
        files[0].clone()
    }

    /// Writes 100 synced records, then waits for the log to close.
    async fn hundred_records(path: &Path, compact: bool) {
        let log = Log::open(path).unwrap();
        let closed = log.closed();
        for i in 0..100u32 {
            let key = format!("key-{i:03}");
            log.write(vec![Write::put(key.as_str(), "a value long enough to fill a record")], true)
                .await
                .unwrap();
        }
        if compact {
            log.compact(b"key-", b"key.");
        }
        drop(log);
        closed.await;
    }

    #[tokio::test]
    async fn a_corrupted_record_in_the_middle_of_the_wal_refuses_the_open() {
        let dir = tempfile::tempdir().unwrap();
        hundred_records(dir.path(), false).await;
        let wal = flip(dir.path(), ".log", 0.5);
        let err = Log::open(dir.path()).err().expect("a corrupted WAL must not open");
        let message = err.to_string();
        assert!(matches!(err, LogError::Corrupt(_)), "{message}");
        assert!(message.contains(&dir.path().display().to_string()), "names the directory: {message}");
        assert!(wal.exists(), "nothing was repaired or dropped: {}", wal.display());
    }

    #[tokio::test]
    async fn a_corrupted_record_in_a_table_file_is_an_error_never_an_absent_record() {
        let dir = tempfile::tempdir().unwrap();
        hundred_records(dir.path(), true).await;
        let table = flip(dir.path(), ".sst", 0.1);
        let name = table.file_name().unwrap().to_string_lossy().into_owned();
        let failed = match Log::open(dir.path()) {
            Err(err) => err,
            Ok(log) => {
                let scan = log.scan_prefix(b"key-").expect_err("a scan over the corrupted block");
                let read =
                    (0..100u32).map(|i| log.get(format!("key-{i:03}").as_bytes())).find(Result::is_err);
                assert!(
                    matches!(read, Some(Err(LogError::Corrupt(_)))),
                    "some read meets the corrupted block and fails: {read:?}"
                );
                scan
            }
        };
        assert!(matches!(failed, LogError::Corrupt(_)), "{failed}");
        assert!(failed.to_string().contains(&name), "names the table file {name}: {failed}");
    }
}
