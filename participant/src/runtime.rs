//! Executes the participant engine's commands: validation on blocking
//! threads, log writes through the group-commit log, answers to waiting RPCs.
//! Also the two background duties: enrollment with heartbeats, and asking the
//! coordinator about branches in doubt. Crash points sit here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_client::Coordinators;
use decree_proto::v1::coordinator_client::CoordinatorClient;
use decree_proto::v1::registry_client::RegistryClient;
use decree_proto::{v1, TxId};
use decree_runtime::backoff::{Backoff, Jitter};
use decree_runtime::crash;
use foldhash::{HashMap, HashMapExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::engine::{Ack, Command, Engine, Event, InDoubt, LockEntry, LockStats, Outcome, Vote};
use crate::resource::Resource;
use crate::store::{BranchLog, HeuristicRecord};

/// Prepared branches waiting for the coordinator's decision.
pub const IN_DOUBT: &str = "decree_in_doubt_branches";
/// Age of the oldest of them, in seconds.
pub const IN_DOUBT_OLDEST: &str = "decree_in_doubt_oldest_seconds";
/// Lock requests that waited, waits that ran out, requests refused by the wait rule.
pub const LOCK_WAITS: &str = "decree_lock_waits_total";
pub const LOCK_WAIT_TIMEOUTS: &str = "decree_lock_wait_timeouts_total";
pub const LOCK_CONFLICTS: &str = "decree_lock_conflicts_total";
/// Batches that deleted forgotten tombstones up to a new horizon (counted once written).
pub const TOMBSTONE_PRUNES: &str = "decree_tombstone_prunes_total";
/// Decided txids remembered, as of the last prune written (on disk there are
/// no more than these, plus what was decided since).
pub const TOMBSTONES: &str = "decree_tombstones";

/// Most requests, and most events, the actor takes in one turn before it executes their commands.
const PER_TURN: usize = 256;

pub(crate) enum Request {
    Prepare {
        txid: TxId,
        keys: Vec<String>,
        payload: Vec<u8>,
        one_phase: bool,
        incarnation: u64,
        interactive: bool,
        reply: oneshot::Sender<Vote>,
    },
    /// Interactive work wants `keys` locked.
    Work {
        txid: TxId,
        keys: Vec<String>,
        reply: oneshot::Sender<Result<Granted, Refused>>,
    },
    Locks {
        reply: oneshot::Sender<(Vec<LockEntry>, LockStats)>,
    },
    LockStats {
        reply: oneshot::Sender<LockStats>,
    },
    /// An operator decides a branch in doubt.
    Heuristic {
        txid: TxId,
        commit: bool,
        reason: String,
        operator: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The heuristic decisions recorded here.
    Heuristics {
        reply: oneshot::Sender<Result<Vec<(TxId, HeuristicRecord)>, String>>,
    },
    /// Heuristic decisions whose coordinator outcome is not known yet.
    UnsettledHeuristics {
        reply: oneshot::Sender<Vec<TxId>>,
    },
    Commit {
        txid: TxId,
        reply: oneshot::Sender<Ack>,
    },
    Abort {
        txid: TxId,
        reply: oneshot::Sender<Ack>,
    },
    InDoubt {
        reply: oneshot::Sender<Vec<InDoubt>>,
    },
    /// See [`Engine::supersede`].
    Supersede {
        txid: TxId,
        reply: oneshot::Sender<bool>,
    },
    /// Answered when none of `keys` is locked (or the read wait ran out:
    /// `Err` if a branch in doubt still holds one).
    Read {
        keys: Vec<String>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// An operator's decision on its way to its record: reason, operator, answer.
type PendingHeuristic = (String, String, oneshot::Sender<Result<(), String>>);

/// Interactive work may run: its keys are locked.
pub(crate) struct Granted {
    /// The branch's work until now.
    pub so_far: Vec<u8>,
    /// The branch began with this work: enlist it with the coordinator.
    pub first: bool,
}

/// Interactive work may not run; `aborted`: the branch is aborted here.
pub(crate) struct Refused {
    pub code: decree_proto::Reason,
    pub reason: String,
    pub aborted: bool,
}

#[derive(Clone)]
pub struct Handle {
    requests: mpsc::Sender<Request>,
    events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug, thiserror::Error)]
#[error("the participant is shutting down")]
pub struct ShuttingDown;

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, ShuttingDown> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(make(reply)).await.map_err(|_| ShuttingDown)?;
        answer.await.map_err(|_| ShuttingDown)
    }

    pub(crate) async fn prepare(
        &self,
        txid: TxId,
        keys: Vec<String>,
        payload: Vec<u8>,
        one_phase: bool,
        incarnation: u64,
        interactive: bool,
    ) -> Result<Vote, ShuttingDown> {
        self.ask(|reply| Request::Prepare { txid, keys, payload, one_phase, incarnation, interactive, reply })
            .await
    }

    /// Locks `keys` for interactive work under `txid` (waiting by the wait rule).
    pub(crate) async fn work(
        &self,
        txid: TxId,
        keys: Vec<String>,
    ) -> Result<Result<Granted, Refused>, ShuttingDown> {
        self.ask(|reply| Request::Work { txid, keys, reply }).await
    }

    /// Granted work finished; `done` (if it succeeded) joins the branch's work.
    pub(crate) fn work_done(&self, txid: TxId, done: Option<Vec<u8>>) {
        self.event(Event::WorkDone { txid, done, at: Instant::now() });
    }

    /// Aborts `txid`'s interactive work if it has not been prepared; true if
    /// it can no longer commit here.
    pub(crate) async fn supersede(&self, txid: TxId) -> Result<bool, ShuttingDown> {
        self.ask(|reply| Request::Supersede { txid, reply }).await
    }

    pub(crate) async fn locks(&self) -> Result<(Vec<LockEntry>, LockStats), ShuttingDown> {
        self.ask(|reply| Request::Locks { reply }).await
    }

    pub(crate) async fn heuristic(
        &self,
        txid: TxId,
        commit: bool,
        reason: String,
        operator: String,
    ) -> Result<Result<(), String>, ShuttingDown> {
        self.ask(|reply| Request::Heuristic { txid, commit, reason, operator, reply }).await
    }

    pub(crate) async fn heuristics(
        &self,
    ) -> Result<Result<Vec<(TxId, HeuristicRecord)>, String>, ShuttingDown> {
        self.ask(|reply| Request::Heuristics { reply }).await
    }

    pub(crate) async fn lock_stats(&self) -> Result<LockStats, ShuttingDown> {
        self.ask(|reply| Request::LockStats { reply }).await
    }

    pub(crate) async fn commit(&self, txid: TxId) -> Result<Ack, ShuttingDown> {
        self.ask(|reply| Request::Commit { txid, reply }).await
    }

    pub(crate) async fn abort(&self, txid: TxId) -> Result<Ack, ShuttingDown> {
        self.ask(|reply| Request::Abort { txid, reply }).await
    }

    pub(crate) async fn in_doubt(&self) -> Result<Vec<InDoubt>, ShuttingDown> {
        self.ask(|reply| Request::InDoubt { reply }).await
    }

    /// Waits until none of `keys` is locked, within the read wait; `Err` with
    /// why when one is still held, after it, by a branch in doubt.
    pub(crate) async fn until_unlocked(&self, keys: Vec<String>) -> Result<Result<(), String>, ShuttingDown> {
        self.ask(|reply| Request::Read { keys, reply }).await
    }

    fn event(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

struct Actor {
    engine: Engine,
    resource: Arc<dyn Resource>,
    store: BranchLog,
    events: mpsc::UnboundedSender<Event>,
    /// Prepares waiting for their branch's vote: a repeated Prepare waits
    /// for the vote of the one in progress (never a NO while it may commit).
    votes: HashMap<TxId, Vec<oneshot::Sender<Vote>>>,
    commit_waiters: HashMap<TxId, Vec<oneshot::Sender<Ack>>>,
    abort_waiters: HashMap<TxId, Vec<oneshot::Sender<Ack>>>,
    readers: HashMap<u64, oneshot::Sender<Result<(), String>>>,
    next_read: u64,
    works: HashMap<u64, oneshot::Sender<Result<Granted, Refused>>>,
    next_work: u64,
    /// Operator decisions waiting to be recorded.
    heuristics: HashMap<u64, PendingHeuristic>,
    next_op: u64,
    /// Tombstones forgotten when their records were last compacted away.
    compacted_at: u64,
    /// Compact again once this many more were forgotten.
    compact_every: u64,
    /// New branches are refused while the disk is short of its reserve.
    disk: Arc<decree_runtime::disk::DiskGuard>,
}

/// Starts the actor over an engine that already holds the recovered state.
/// Interactive branches idle for `idle_timeout` are aborted.
pub(crate) fn start(
    engine: Engine,
    resource: Arc<dyn Resource>,
    store: BranchLog,
    idle_timeout: Duration,
    request_queue: usize,
    tombstones: crate::engine::TombstoneRetention,
    disk: Arc<decree_runtime::disk::DiskGuard>,
) -> Handle {
    let (requests, request_rx) = mpsc::channel(request_queue);
    // Answers to the actor's own commands (records logged, from the log's
    // writer thread), one per command it issued, which its bounded request
    // queue paces: a bound here would block the writer's callback, which the
    // actor itself waits on, and could deadlock it.
    let (events, event_rx) = mpsc::unbounded_channel();
    let actor = Actor {
        engine,
        resource,
        store,
        events: events.clone(),
        votes: HashMap::new(),
        commit_waiters: HashMap::new(),
        abort_waiters: HashMap::new(),
        readers: HashMap::new(),
        next_read: 0,
        works: HashMap::new(),
        next_work: 0,
        heuristics: HashMap::new(),
        next_op: 0,
        compacted_at: 0,
        compact_every: (tombstones.max as u64).max(100_000),
        disk,
    };
    tokio::spawn(actor.run(request_rx, event_rx));
    // Tombstones past their age are forgotten within a quarter of it (at most a second late).
    let forget = events.clone();
    let every = (tombstones.max_age / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        loop {
            ticker.tick().await;
            if forget.send(Event::ForgetOld { now: Instant::now() }).is_err() {
                return;
            }
        }
    });
    let ticks = events.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(10)));
        loop {
            ticker.tick().await;
            let Some(since) = Instant::now().checked_sub(idle_timeout) else { continue };
            if ticks.send(Event::IdleCheck { since }).is_err() {
                return;
            }
        }
    });
    Handle { requests, events }
}

impl Actor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        // What recovery queued (a heuristic decision recorded but not applied before a crash).
        let commands = self.engine.take_commands();
        self.execute(commands);
        loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => {
                    self.engine.on_event(event);
                    for _ in 1..PER_TURN {
                        let Ok(event) = events.try_recv() else { break };
                        self.engine.on_event(event);
                    }
                }
                request = requests.recv() => match request {
                    // A burst (a CommitBatch's commits, a stream's Prepares) is taken in one
                    // turn: its commands are executed together, its commit records in one write.
                    Some(request) => {
                        self.on_request(request);
                        for _ in 1..PER_TURN {
                            let Ok(request) = requests.try_recv() else { break };
                            self.on_request(request);
                        }
                    }
                    None => break,
                },
            }
            let commands = self.engine.take_commands();
            self.execute(commands);
        }
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Prepare { txid, keys, payload, one_phase, incarnation, interactive, reply } => {
                if let Some(waiting) = self.votes.get_mut(&txid) {
                    waiting.push(reply);
                    return;
                }
                // A branch new here would need a prepared record: not while the disk is short.
                if let (false, Err(short)) = (self.engine.knows(txid), self.disk.admit()) {
                    let _ = reply
                        .send(Vote::No { code: decree_proto::Reason::DiskFull, reason: short.to_string() });
                    return;
                }
                self.votes.insert(txid, vec![reply]);
                self.engine.on_event(Event::PrepareRequested {
                    txid,
                    keys,
                    payload,
                    one_phase,
                    incarnation,
                    interactive,
                });
            }
            Request::Work { txid, keys, reply } => {
                if let (false, Err(short)) = (self.engine.knows(txid), self.disk.admit()) {
                    let refused = Refused {
                        code: decree_proto::Reason::DiskFull,
                        reason: short.to_string(),
                        aborted: false,
                    };
                    let _ = reply.send(Err(refused));
                    return;
                }
                let work = self.next_work;
                self.next_work += 1;
                self.works.insert(work, reply);
                self.engine.on_event(Event::WorkRequested { txid, work, keys, at: Instant::now() });
            }
            Request::Heuristic { txid, commit, reason, operator, reply } => {
                let op = self.next_op;
                self.next_op += 1;
                self.heuristics.insert(op, (reason, operator, reply));
                self.engine.on_event(Event::HeuristicRequested { txid, commit, op });
            }
            Request::Heuristics { reply } => {
                let _ = reply.send(self.store.heuristics().map_err(|e| e.to_string()));
            }
            Request::UnsettledHeuristics { reply } => {
                let _ = reply.send(self.engine.unsettled_heuristics());
            }
            Request::LockStats { reply } => {
                let _ = reply.send(self.engine.lock_stats());
            }
            Request::Locks { reply } => {
                let _ = reply.send((self.engine.lock_table(), self.engine.lock_stats()));
            }
            Request::Commit { txid, reply } => {
                self.commit_waiters.entry(txid).or_default().push(reply);
                self.engine.on_event(Event::CommitRequested { txid });
            }
            Request::Abort { txid, reply } => {
                self.abort_waiters.entry(txid).or_default().push(reply);
                self.engine.on_event(Event::AbortRequested { txid });
            }
            Request::InDoubt { reply } => {
                let _ = reply.send(self.engine.in_doubt());
            }
            Request::Supersede { txid, reply } => {
                let _ = reply.send(self.engine.supersede(txid));
            }
            Request::Read { keys, reply } => {
                let read = self.next_read;
                self.next_read += 1;
                self.readers.insert(read, reply);
                self.engine.on_event(Event::ReadRequested { read, keys });
            }
        }
    }

    fn execute(&mut self, commands: Vec<Command>) {
        // The commit records of branches applied on this turn, and what each does once durable.
        let (mut commits, mut dones) = (Vec::new(), Vec::new());
        for command in commands {
            match command {
                Command::Validate { txid, payload } => {
                    let (resource, events) = (self.resource.clone(), self.events.clone());
                    let at_once = resource.answers_at_once();
                    let validating = async move { resource.prepare(txid, &payload).await };
                    now_or_in_task(at_once, validating, move |result| {
                        let _ = events.send(Event::Validated { txid, result });
                    });
                }
                Command::LogPrepared { txid, keys, redo } => {
                    crash::point(crash::PARTICIPANT_PREPARE_BEFORE_LOG);
                    let events = self.events.clone();
                    // Called where the write finished (the log's writer thread): no task in between.
                    self.store.log_prepared_then(txid, &keys, &redo, move |written| {
                        if let Err(err) = written {
                            fatal(&err);
                        }
                        let _ = events.send(Event::PreparedLogged { txid, at: Instant::now() });
                    });
                }
                Command::LogCommit { txid, redo, one_phase } => {
                    if !one_phase {
                        crash::point(crash::PARTICIPANT_COMMIT_BEFORE_APPLY);
                    }
                    let (store, events, resource) =
                        (self.store.clone(), self.events.clone(), self.resource.clone());
                    let at_once = resource.answers_at_once();
                    let applying = {
                        let resource = resource.clone();
                        async move {
                            let writes = until_done("commit", txid, || resource.commit(txid, &redo)).await;
                            (writes, redo)
                        }
                    };
                    let done = move |redo: Vec<u8>| {
                        resource.committed(txid, &redo);
                        crash::point(crash::PARTICIPANT_COMMIT_AFTER_APPLY);
                        debug!(%txid, one_phase, "branch committed");
                        let _ = events.send(Event::CommitLogged { txid });
                    };
                    if at_once {
                        // Applied on this turn, its commit record joins the turn's
                        // others in one write, which calls back where it finished.
                        match poll_now(Box::pin(applying)) {
                            Ok((writes, redo)) => {
                                commits.push((txid, writes, one_phase));
                                dones.push((done, redo));
                            }
                            Err(applying) => {
                                tokio::spawn(async move {
                                    let (writes, redo) = applying.await;
                                    store.log_commit_then(txid, writes, one_phase, move |written| {
                                        if let Err(err) = written {
                                            fatal(&err);
                                        }
                                        done(redo);
                                    });
                                });
                            }
                        }
                    } else {
                        tokio::spawn(async move {
                            let (writes, redo) = applying.await;
                            if let Err(err) = store.log_commit(txid, writes, one_phase).await {
                                fatal(&err);
                            }
                            done(redo);
                        });
                    }
                }
                Command::LogAbort { txid, prepared } => {
                    crash::point(crash::PARTICIPANT_ABORT_BEFORE_APPLY);
                    let (store, events, resource) =
                        (self.store.clone(), self.events.clone(), self.resource.clone());
                    tokio::spawn(async move {
                        until_done("abort", txid, || resource.abort(txid)).await;
                        if let Err(err) = store.log_abort(txid, prepared).await {
                            fatal(&err);
                        }
                        debug!(%txid, prepared, "branch aborted");
                        let _ = events.send(Event::AbortLogged { txid });
                    });
                }
                Command::ForgetTombstones { horizons, forgotten } => {
                    let remembered = self.engine.tombstone_count();
                    let store = self.store.clone();
                    let compact = forgotten - self.compacted_at >= self.compact_every;
                    if compact {
                        self.compacted_at = forgotten;
                    }
                    tokio::spawn(async move {
                        if let Err(err) = store.forget_tombstones(&horizons).await {
                            fatal(&err);
                        }
                        metrics::counter!(TOMBSTONE_PRUNES).increment(1);
                        metrics::gauge!(TOMBSTONES).set(remembered as f64);
                        debug!(?horizons, "tombstones at or below the horizons forgotten");
                        if compact {
                            let _ = tokio::task::spawn_blocking(move || store.compact_tombstones()).await;
                        }
                    });
                }
                Command::Vote { txid, vote } => {
                    if vote == Vote::Yes {
                        crash::point(crash::PARTICIPANT_PREPARE_AFTER_LOG);
                    }
                    debug!(%txid, ?vote, "vote");
                    for reply in self.votes.remove(&txid).unwrap_or_default() {
                        let _ = reply.send(vote.clone());
                    }
                }
                Command::ArmLockWait { txid, after } => {
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = events.send(Event::LockWaitExpired { txid });
                    });
                }
                Command::Read { read } => {
                    if let Some(reply) = self.readers.remove(&read) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Command::RefuseRead { read, key, holder } => {
                    if let Some(reply) = self.readers.remove(&read) {
                        let _ = reply.send(Err(format!(
                            "key {key:?} is locked by {holder}, prepared here and not decided yet (its coordinator \
                             has not answered): its value may have changed already; read again later"
                        )));
                    }
                }
                Command::ArmReadWait { read, after } => {
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = events.send(Event::ReadWaitExpired { read });
                    });
                }
                Command::WorkGranted { work, so_far, first } => {
                    if let Some(reply) = self.works.remove(&work) {
                        let _ = reply.send(Ok(Granted { so_far, first }));
                    }
                }
                Command::WorkRefused { work, code, reason, aborted } => {
                    if let Some(reply) = self.works.remove(&work) {
                        let _ = reply.send(Err(Refused { code, reason, aborted }));
                    }
                }
                Command::LogHeuristic { txid, commit, op } => {
                    let (reason, operator) = match self.heuristics.get(&op) {
                        Some((reason, operator, _)) => (reason.clone(), operator.clone()),
                        None => (String::new(), String::new()),
                    };
                    let decided_at_unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let record = HeuristicRecord {
                        commit,
                        reason,
                        operator,
                        decided_at_unix_ms,
                        coordinator: 0,
                        contradicted: false,
                    };
                    let (store, events) = (self.store.clone(), self.events.clone());
                    tokio::spawn(async move {
                        if let Err(err) = store.log_heuristic(txid, &record).await {
                            fatal(&err);
                        }
                        warn!(%txid, commit, reason = %record.reason, operator = %record.operator, "heuristic decision recorded");
                        let _ = events.send(Event::HeuristicLogged { txid, commit, op });
                    });
                }
                Command::HeuristicAnswer { op, refused } => {
                    if let Some((_, _, reply)) = self.heuristics.remove(&op) {
                        let _ = reply.send(refused.map_or(Ok(()), Err));
                    }
                }
                Command::HeuristicOutcome { txid, coordinator, contradicted } => {
                    if contradicted {
                        tracing::error!(%txid, ?coordinator, "heuristic decision contradicts the coordinator's outcome");
                    } else {
                        info!(%txid, ?coordinator, "heuristic decision agrees with the coordinator's outcome");
                    }
                    let store = self.store.clone();
                    tokio::spawn(async move {
                        let committed = coordinator == Outcome::Committed;
                        if let Err(err) = store.settle_heuristic(txid, committed, contradicted).await {
                            fatal(&err);
                        }
                    });
                }
                Command::AckCommit { txid, ack } => {
                    for reply in self.commit_waiters.remove(&txid).unwrap_or_default() {
                        let _ = reply.send(ack.clone());
                    }
                }
                Command::AckAbort { txid, ack } => {
                    for reply in self.abort_waiters.remove(&txid).unwrap_or_default() {
                        let _ = reply.send(ack.clone());
                    }
                }
            }
        }
        if !commits.is_empty() {
            self.store.log_commits_then(commits, move |written| {
                if let Err(err) = written {
                    fatal(&err);
                }
                for (done, redo) in dones {
                    done(redo);
                }
            });
        }
    }
}

/// Runs a resource's phase-two step until it succeeds: the decision is made,
/// so the branch stays locked and the step is retried with capped backoff.
/// Runs `work` and hands its output to `then`: at once, on the caller's
/// turn, when `at_once` and `work` finishes without waiting (a resource that
/// [`Resource::answers_at_once`]); otherwise in a task of its own, as it goes
/// on from where it first waited.
fn now_or_in_task<T: Send + 'static>(
    at_once: bool,
    work: impl std::future::Future<Output = T> + Send + 'static,
    then: impl FnOnce(T) + Send + 'static,
) {
    let mut work = Box::pin(work);
    if at_once {
        match poll_now(work) {
            Ok(out) => return then(out),
            Err(waiting) => work = waiting,
        }
    }
    tokio::spawn(async move { then(work.await) });
}

/// `work`'s output if it finishes without waiting; else `work`, to go on in a task.
fn poll_now<F: std::future::Future>(
    mut work: std::pin::Pin<Box<F>>,
) -> Result<F::Output, std::pin::Pin<Box<F>>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match work.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Ok(out),
        std::task::Poll::Pending => Err(work),
    }
}

async fn until_done<T, F, Fut>(what: &str, txid: TxId, mut step: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let backoff =
        Backoff { base: Duration::from_millis(10), cap: Duration::from_secs(2), jitter: Jitter::Half };
    let mut attempt = 0;
    loop {
        match step().await {
            Ok(done) => return done,
            Err(err) => {
                warn!(%txid, error = %err, attempt, "resource {what} failed; retrying");
                let delay = backoff.delay(attempt, &mut rand::rng());
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// A storage failure: stop at once rather than retry (a failed fsync must not be trusted).
fn fatal(err: &dyn std::fmt::Display) -> ! {
    tracing::error!(error = %err, "fatal storage error; stopping");
    eprintln!("decree-participant: fatal storage error: {err}");
    std::process::exit(70)
}

/// Asks the coordinator about branches in doubt: at once for those recovered at
/// start and for those of an older coordinator incarnation than the latest one
/// seen, then for any prepared longer than `in_doubt_after`, every `interval`.
/// A branch that voted YES is only ever decided by the coordinator's answer.
pub(crate) async fn resolve_in_doubt(
    handle: Handle,
    mut coordinator: CoordinatorClient<Coordinators>,
    recovered: usize,
    in_doubt_after: Duration,
    interval: Duration,
    mut incarnation: watch::Receiver<u64>,
) {
    if recovered > 0 {
        crash::point(crash::PARTICIPANT_RECOVERY_BEFORE_RESOLVE);
    }
    let mut first = recovered > 0;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            // A new coordinator incarnation: its predecessor's branches can be asked about now.
            Ok(()) = incarnation.changed() => {}
        }
        let current = *incarnation.borrow_and_update();
        let Ok(branches) = handle.in_doubt().await else { return };
        let now = Instant::now();
        let oldest = branches.iter().map(|b| now.duration_since(b.since)).max().unwrap_or_default();
        metrics::gauge!(IN_DOUBT).set(branches.len() as f64);
        metrics::gauge!(IN_DOUBT_OLDEST).set(oldest.as_secs_f64());
        if let Ok(stats) = handle.lock_stats().await {
            metrics::counter!(LOCK_WAITS).absolute(stats.waits);
            metrics::counter!(LOCK_WAIT_TIMEOUTS).absolute(stats.wait_timeouts);
            metrics::counter!(LOCK_CONFLICTS).absolute(stats.conflicts);
        }
        // A branch of an older incarnation can no longer be PENDING: ask at once.
        let mut ask: Vec<TxId> = branches
            .into_iter()
            .filter(|b| {
                first || b.txid.incarnation < current || now.duration_since(b.since) >= in_doubt_after
            })
            .map(|b| b.txid)
            .collect();
        // Decided by hand: ask too, to compare the coordinator's outcome (never to undo).
        if let Ok(unsettled) = handle.ask(|reply| Request::UnsettledHeuristics { reply }).await {
            ask.extend(unsettled);
        }
        for txid in ask {
            let request = crate::wire::get_outcome_request(txid);
            let answer = tokio::time::timeout(Duration::from_secs(2), coordinator.get_outcome(request)).await;
            let outcome = match answer {
                Ok(Ok(response)) => {
                    v1::Outcome::try_from(response.into_inner().outcome).unwrap_or(v1::Outcome::Unspecified)
                }
                Ok(Err(status)) => {
                    debug!(%txid, error = status.message(), "in doubt: coordinator did not answer");
                    break;
                }
                Err(_) => break,
            };
            let Some(outcome) = crate::wire::learned(outcome) else { continue };
            info!(%txid, ?outcome, "in doubt: resolved by the coordinator");
            handle.event(Event::OutcomeLearned { txid, outcome });
        }
        first = false;
    }
}

/// Longest a participant refused its name waits for the holder's claim to lapse.
const LONGEST_NAME_WAIT: Duration = Duration::from_secs(60);

/// Enrolls with the coordinator, then heartbeats; enrolls again whenever the
/// coordinator does not know this participant. Tells the engine each
/// coordinator incarnation it learns of.
///
/// A name held by another live participant is waited for once, until the
/// holder's claim lapses (it may be this participant's own earlier process, on
/// another address, not yet seen to be down); refused again, the holder is
/// alive, and the refusal goes to `taken` (the server stops: exit 2).
pub(crate) async fn stay_enrolled(
    handle: Handle,
    mut registry: RegistryClient<Coordinators>,
    name: String,
    address: String,
    (role, join): (crate::config::Role, bool),
    heartbeat: Duration,
    (incarnation, taken): (watch::Sender<u64>, watch::Sender<Option<String>>),
) {
    let learn = |handle: &Handle, seen: u64| {
        handle.event(Event::CoordinatorIncarnation { incarnation: seen });
        incarnation.send_if_modified(|latest| {
            let newer = seen > *latest;
            *latest = (*latest).max(seen);
            newer
        });
    };
    // Gentle (at most ~4 attempts a second) but quick to notice the coordinator is back.
    let backoff = Backoff {
        base: Duration::from_millis(20),
        cap: heartbeat.min(Duration::from_millis(250)),
        jitter: Jitter::Half,
    };
    let mut attempt = 0;
    let mut enrolled = false;
    let mut waited_for_name = false;
    loop {
        if !enrolled {
            let request = crate::wire::enroll_request(&name, &address, role, join);
            match tokio::time::timeout(Duration::from_secs(2), registry.enroll(request)).await {
                Ok(Ok(response)) => {
                    let response = response.into_inner();
                    info!(
                        coordinator_incarnation = response.coordinator_incarnation,
                        "enrolled with the coordinator"
                    );
                    handle.event(Event::CoordinatorIncarnation {
                        incarnation: response.coordinator_incarnation,
                    });
                    enrolled = true;
                    attempt = 0;
                    waited_for_name = false;
                }
                Ok(Err(status)) if status.code() == tonic::Code::AlreadyExists => {
                    let held = status
                        .metadata()
                        .get(decree_proto::HELD_METADATA)
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .map(Duration::from_millis)
                        .filter(|held| *held <= LONGEST_NAME_WAIT);
                    match held {
                        Some(held) if !waited_for_name => {
                            warn!(error = status.message(), wait = ?held, "the name is held: waiting once for its holder's claim to lapse");
                            waited_for_name = true;
                            tokio::time::sleep(held + heartbeat.min(Duration::from_millis(250))).await;
                        }
                        _ => {
                            tracing::error!(
                                error = status.message(),
                                "the coordinator refused this name: another live participant holds it"
                            );
                            let _ = taken.send(Some(status.message().to_owned()));
                            return;
                        }
                    }
                    continue;
                }
                Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => {
                    tracing::error!(
                        error = status.message(),
                        "the coordinator's policy refused this enrollment"
                    );
                    let _ = taken.send(Some(status.message().to_owned()));
                    return;
                }
                Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                    warn!(error = status.message(), "the coordinator refused enrollment");
                }
                _ => {}
            }
            if !enrolled {
                let delay = backoff.delay(attempt, &mut rand::rng());
                tokio::time::sleep(delay).await;
                attempt += 1;
                continue;
            }
        }
        tokio::time::sleep(heartbeat).await;
        let request = crate::wire::heartbeat_request(&name, &address);
        match tokio::time::timeout(Duration::from_secs(2), registry.heartbeat(request)).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                learn(&handle, response.coordinator_incarnation);
                enrolled = response.known;
            }
            // The coordinator is away: enroll again when it is back, so owed Commits come at once.
            _ => enrolled = false,
        }
    }
}
