//! Executes the engine's commands with tokio, tonic and RocksDB.
//!
//! One actor task owns the [`Engine`]. gRPC handlers send it [`Request`]s;
//! the I/O it starts (Prepare and Commit RPCs, log writes, timers) runs in
//! spawned tasks that report back as engine [`Event`]s. The actor never blocks
//! on I/O, except where a crash point asks it to finish one send before dying.
//! Crash points sit here, at the boundaries the engine's commands cross.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_proto::v1;
use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{InvalidInput, ParticipantName, Reason, TxId};
use decree_runtime::backoff::RetryBudget;
use decree_runtime::crash;
use decree_runtime::trace;
use foldhash::{HashMap, HashMapExt};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;
use tracing::{debug, info, warn, Instrument, Span};

use crate::config::Config;
use crate::engine::{Command, Decided, Engine, Event, InFlight, Known, Stuck};
use crate::phase_one::{self, Outgoing, Prepares};
use crate::phase_two::{self, Deliveries, Due};
use crate::registry::Registry;
use crate::retention::Window;
use crate::stats;
use crate::store::{DecisionLog, Recorded};
use crate::timers::Timers;
use crate::wire::{self, Unanswered};
use crate::CoordinatorError;

/// Most client requests queued for the actor.
/// Transactions answered, by outcome.
pub const TRANSACTIONS: &str = "decree_transactions_total";
/// Transactions in memory: deciding, or committed with phase two under way.
pub const IN_FLIGHT: &str = "decree_transactions_in_flight";
/// Aborted transactions by reason code (`Reason::label`): lock_conflict,
/// validation_failed, unreachable, timeout, client, stale, work_lost, ...
pub const ABORTS: &str = "decree_aborts_total";
/// Seconds from a transaction's start (Transact, or an interactive Commit) to
/// its answer (`phase="decide"`) and, committed, to its last ack (`phase="complete"`).
pub const LATENCY: &str = "decree_transaction_seconds";
/// Commit redeliveries scheduled (a participant did not ack in time).
pub const REDELIVERIES: &str = "decree_redeliveries_total";
/// Aborts sent again because the participant did not answer the last one.
pub const ABORTS_RESENT: &str = "decree_aborts_resent_total";
/// Redeliveries that waited for their participant's retry budget.
pub const REDELIVERIES_PACED: &str = "decree_redeliveries_paced_total";
/// Committed branches whose redelivery stopped on a refusal retrying cannot
/// mend, waiting for an operator (`decree stuck`, `decree retry`).
pub const STUCK: &str = "decree_branches_stuck";

type Decision = oneshot::Sender<(TxId, Decided)>;

pub(crate) enum Request {
    Transact {
        branches: Vec<(ParticipantName, Vec<u8>)>,
        timeout: Duration,
        span: Span,
        /// Its txid, issued already (and announced to its client): [`Handle::issue_txid`].
        txid: Option<TxId>,
        reply: Decision,
        refused: oneshot::Sender<CoordinatorError>,
    },
    Begin {
        timeout: Duration,
        reply: oneshot::Sender<Result<TxId, CoordinatorError>>,
    },
    Commit {
        txid: TxId,
        timeout: Duration,
        span: Span,
        reply: Decision,
        refused: oneshot::Sender<CoordinatorError>,
    },
    Abort {
        txid: TxId,
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    Enlist {
        txid: TxId,
        participant: ParticipantName,
        run: u64,
        reply: oneshot::Sender<Result<(), CoordinatorError>>,
    },
    Known {
        txid: TxId,
        reply: oneshot::Sender<Option<Known>>,
    },
    /// An operator asks to redeliver phase two now.
    Retry {
        txid: TxId,
        reply: oneshot::Sender<Vec<ParticipantName>>,
    },
    /// Committed branches whose redelivery stopped.
    ListStuck {
        reply: oneshot::Sender<Vec<Stuck>>,
    },
    /// Transactions in memory and the recent decisions.
    ListTransactions {
        txid: Option<TxId>,
        limit: usize,
        reply: oneshot::Sender<(Vec<InFlight>, Vec<stats::Decision>)>,
    },
    /// Decisions per second over the last `seconds`, the totals, and how many are in memory.
    Stats {
        seconds: u64,
        reply: oneshot::Sender<(Vec<stats::Second>, stats::Totals, usize)>,
    },
    /// Refuse new transactions; answered when none is deciding or in phase two.
    Drain {
        reply: oneshot::Sender<()>,
    },
}

/// How far beyond the issued sequence an outcome query may ask (and fence).
const FAR_AHEAD: u64 = 1 << 32;

/// Most events, or requests, the actor takes in one turn before it executes their commands.
const PER_TURN: usize = 256;

/// How many of `commands` `message` picks for the transaction of the first it picks.
fn first_fanout(commands: &[Command], message: impl Fn(&Command) -> Option<TxId>) -> usize {
    let Some(first) = commands.iter().find_map(&message) else { return 0 };
    commands.iter().filter(|c| message(c) == Some(first)).count()
}

/// What handlers hold: a way to the actor and to the shared read-only state.
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::Sender<Request>,
    events: mpsc::UnboundedSender<Event>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: DecisionLog,
    pub(crate) config: Arc<Config>,
    /// New transactions are refused while the disk is short of its reserve.
    disk: Arc<decree_runtime::disk::DiskGuard>,
    /// Paces redeliveries per participant.
    budget: Arc<RetryBudget<ParticipantName>>,
    pub coordinator_id: u32,
    pub incarnation: u64,
    /// The sequence of the next txid to be issued (the actor advances it).
    next_sequence: Arc<AtomicU64>,
    /// What a failed storage write ends.
    failure: Failure,
    /// Turns true when this replica stops leading (a group only).
    deposed: Arc<tokio::sync::watch::Sender<bool>>,
    /// Notified once the actor has answered its waiting transactions and stopped.
    abdicated: Arc<tokio::sync::Notify>,
}

/// What a failed storage write ends: the process (a single coordinator) or
/// this replica's term as its group's leader (the reason goes to the group).
#[derive(Clone)]
pub(crate) enum Failure {
    Process,
    Term(mpsc::Sender<String>),
}

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(make(reply)).await.map_err(|_| CoordinatorError::ShuttingDown)?;
        answer.await.map_err(|_| CoordinatorError::ShuttingDown)
    }

    pub(crate) async fn transact(
        &self,
        branches: Vec<(ParticipantName, Vec<u8>)>,
        timeout: Duration,
        span: Span,
        txid: Option<TxId>,
    ) -> Result<(TxId, Decided), CoordinatorError> {
        self.decide(txid, |reply, refused| Request::Transact {
            branches,
            timeout,
            span,
            txid,
            reply,
            refused,
        })
        .await
    }

    /// A new txid, never issued before. The actor issues them, and a
    /// TransactStream handler does for a transaction whose client asked to
    /// hear its txid first (issued as soon as the request is read, so the
    /// client knows it before anything of the transaction happens). The
    /// pruner reads where the sequence stands.
    pub(crate) fn issue_txid(&self) -> TxId {
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        TxId::new(self.coordinator_id, self.incarnation, sequence)
    }

    /// `count` new txids, never issued before, for a TransactStream's lease:
    /// the first of them (the rest follow it in sequence).
    pub(crate) fn lease_txids(&self, count: u32) -> TxId {
        let sequence = self.next_sequence.fetch_add(u64::from(count), Ordering::Relaxed);
        TxId::new(self.coordinator_id, self.incarnation, sequence)
    }

    /// True when `txid` is one this coordinator issues now (its current incarnation).
    pub(crate) fn issues(&self, txid: TxId) -> bool {
        txid.coordinator == self.coordinator_id && txid.incarnation == self.incarnation
    }

    /// A storage write failed: a single coordinator stops at once; a
    /// group's leader ends its term (the group's log is the truth, and the
    /// next leader, maybe this replica again, recovers from it).
    pub(crate) fn failed(&self, err: CoordinatorError) {
        match &self.failure {
            Failure::Process => fatal(&err),
            Failure::Term(ended) => {
                warn!(error = %err, "a replicated write failed: this term as leader ends");
                // Full: the term is ending already.
                let _ = ended.try_send(err.to_string());
            }
        }
    }

    /// This replica no longer leads its group: every transaction waiting
    /// for its answer hears "unknown, ask the leader", and the actor stops;
    /// returns once it has (or after `wait`).
    pub(crate) async fn depose(&self, wait: Duration) {
        let _ = self.deposed.send(true);
        if tokio::time::timeout(wait, self.abdicated.notified()).await.is_err() {
            warn!(?wait, "the actor did not stop in time; its waiting transactions hear nothing");
        }
    }

    /// Sends a request that ends in a decision, or is refused before it
    /// starts. Once the actor has it, only its answer or its refusal says
    /// what became of it: an actor gone without either (a group's term
    /// stopped, its actor not answering in time) may have started it, so
    /// that is "outcome unknown" (with `txid` when the caller named it),
    /// never the "not started" of a refusal.
    async fn decide(
        &self,
        txid: Option<TxId>,
        make: impl FnOnce(Decision, oneshot::Sender<CoordinatorError>) -> Request,
    ) -> Result<(TxId, Decided), CoordinatorError> {
        let (refused, refusal) = oneshot::channel();
        let (reply, answer) = oneshot::channel();
        self.requests.send(make(reply, refused)).await.map_err(|_| CoordinatorError::ShuttingDown)?;
        tokio::select! {
            Ok(decided) = answer => Ok(decided),
            Ok(err) = refusal => Err(err),
            else => Err(CoordinatorError::Abandoned { txid }),
        }
    }

    pub(crate) async fn begin(&self, timeout: Duration) -> Result<TxId, CoordinatorError> {
        self.ask(|reply| Request::Begin { timeout, reply }).await?
    }

    pub(crate) async fn commit(
        &self,
        txid: TxId,
        timeout: Duration,
        span: Span,
    ) -> Result<Decided, CoordinatorError> {
        let (_, decided) = self
            .decide(Some(txid), |reply, refused| Request::Commit { txid, timeout, span, reply, refused })
            .await?;
        Ok(decided)
    }

    pub(crate) async fn abort(&self, txid: TxId) -> Result<(), CoordinatorError> {
        self.ask(|reply| Request::Abort { txid, reply }).await?
    }

    pub(crate) async fn enlist(
        &self,
        txid: TxId,
        participant: ParticipantName,
        run: u64,
    ) -> Result<(), CoordinatorError> {
        self.ask(|reply| Request::Enlist { txid, participant, run, reply }).await?
    }

    /// Stops admitting transactions and waits until none is deciding or in
    /// phase two (participants that are down keep theirs pending: bound the
    /// wait).
    pub(crate) async fn drain(&self) {
        let _ = self.ask(|reply| Request::Drain { reply }).await;
    }

    /// Redelivers phase two of `txid` now; returns the participants asked again.
    pub(crate) async fn retry(&self, txid: TxId) -> Result<Vec<ParticipantName>, CoordinatorError> {
        self.ask(|reply| Request::Retry { txid, reply }).await
    }

    /// Committed branches whose redelivery stopped, waiting for an operator.
    pub(crate) async fn stuck(&self) -> Result<Vec<Stuck>, CoordinatorError> {
        self.ask(|reply| Request::ListStuck { reply }).await
    }

    /// Transactions in memory, and the last `limit` decisions (of `txid` only, when given).
    pub(crate) async fn transactions(
        &self,
        txid: Option<TxId>,
        limit: usize,
    ) -> Result<(Vec<InFlight>, Vec<stats::Decision>), CoordinatorError> {
        self.ask(|reply| Request::ListTransactions { txid, limit, reply }).await
    }

    /// Decisions per second over the last `seconds`, the totals since start, and how many are in memory.
    pub(crate) async fn stats(
        &self,
        seconds: u64,
    ) -> Result<(Vec<stats::Second>, stats::Totals, usize), CoordinatorError> {
        self.ask(|reply| Request::Stats { seconds, reply }).await
    }

    /// The outcome of `txid`: from memory if it is in flight, else from the log.
    pub(crate) async fn outcome(&self, txid: TxId) -> Result<v1::Outcome, CoordinatorError> {
        if txid.coordinator != self.coordinator_id {
            return Err(CoordinatorError::ForeignTxid { txid, coordinator_id: self.coordinator_id });
        }
        if self.issues(txid) && txid.sequence >= self.next_sequence.load(Ordering::Relaxed) + FAR_AHEAD {
            // Not a txid anyone was given: fencing it would burn the sequence space.
            return Err(InvalidInput::Field {
                field: "txid",
                why: format!("{txid} is far beyond any txid issued"),
            }
            .into());
        }
        let known = self.ask(|reply| Request::Known { txid, reply }).await?;
        let mut failed = None;
        let outcome = wire::outcome_of(known, || {
            self.store.recorded(txid).unwrap_or_else(|err| {
                failed = Some(err);
                Recorded::Absent
            })
        });
        if let Some(err) = failed {
            return Err(err.into());
        }
        if known.is_none() && outcome == v1::Outcome::Aborted && matches!(self.failure, Failure::Term(_)) {
            return Ok(self.ask_every_participant(txid).await);
        }
        Ok(outcome)
    }

    /// A group's leader holds nothing of `txid`: presumed abort cannot say
    /// ABORTED yet, for a group records no question before a one-shot
    /// one-phase Prepare (its client hears the txid first, so it may ask a
    /// later leader, or this one in the moment between the branch's commit
    /// and its note). Asks every participant ever enrolled to abort it and
    /// answers from what they found ([`wire::outcome_asked`]): the one that
    /// committed it refuses; the others ack, and vote NO on a late Prepare.
    async fn ask_every_participant(&self, txid: TxId) -> v1::Outcome {
        let timeout = self.config.commit_timeout();
        let asks = self.registry.list().into_iter().map(|listed| {
            let client = self.registry.client(&listed.name);
            let request = wire::abort_request(txid);
            async move {
                let answer = call(client, timeout, |mut c| async move { c.abort(request).await }).await;
                let found =
                    wire::one_phase_found(answer.map(|r| wire::acked(r.ack, r.reason_code, r.reason)));
                debug!(%txid, participant = %listed.name, ?found, "asked about a txid held nothing of");
                found
            }
        });
        let outcome = wire::outcome_asked(futures::future::join_all(asks).await);
        info!(%txid, ?outcome, "outcome of a txid held nothing of, from its participants");
        outcome
    }

    /// Tells the engine a participant enrolled, so owed Commits go out at once.
    pub(crate) fn enrolled(&self, participant: ParticipantName) {
        let _ = self.events.send(Event::Enrolled { participant });
    }
}

struct Started {
    at: Instant,
    span: Span,
    /// When it started, for the recent decisions.
    unix_ms: u64,
    participants: Vec<String>,
}

impl Started {
    fn new(span: Span, participants: Vec<String>) -> Self {
        Started { at: Instant::now(), span, unix_ms: unix_ms(), participants }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Actor {
    engine: Engine,
    handle: Handle,
    meters: Meters,
    replies: HashMap<TxId, Decision>,
    /// Each transaction in memory since it started: for [`LATENCY`], and
    /// the span its RPCs run in.
    started: HashMap<TxId, Started>,
    /// Phase one's Prepares, streamed per participant.
    prepares: Prepares,
    /// Phase two's Commits, coalesced per participant.
    deliveries: Deliveries,
    /// Decisions per second and the recent ones, for operators.
    stats: stats::Stats,
    /// Refusing new transactions (graceful shutdown).
    shutting_down: bool,
    /// Answered once nothing is deciding or in phase two.
    draining: Option<oneshot::Sender<()>>,
    /// No transaction starts under a txid of this incarnation at or below
    /// this sequence: an outcome query found nothing of one of them here
    /// (and answers from the log, ABORTED if it holds nothing).
    fenced: u64,
    /// The engine's timers ([`Command::ArmTimer`]).
    timers: Timers,
}

/// Starts the actor with what was found at start: the decisions to redrive
/// and the one-phase questions to ask again.
pub(crate) fn start(
    config: Arc<Config>,
    store: DecisionLog,
    registry: Arc<Registry>,
    disk: Arc<decree_runtime::disk::DiskGuard>,
    recovered: crate::store::Recovered,
    failure: Failure,
) -> Handle {
    let crate::store::Recovered {
        coordinator_id, incarnation, unfinished, one_phase_in_doubt, active, ..
    } = recovered;
    let (requests, request_rx) = mpsc::channel(config.process.request_queue);
    // Answers to the actor's own commands (votes, acks, logged records, from
    // tasks and the log's writer thread), at most a few per admitted
    // transaction: a bound here would block a sender that the actor itself
    // waits on (the writer's callback) and could deadlock it.
    let (events, event_rx) = mpsc::unbounded_channel();
    let budget = Arc::new(RetryBudget::per_second(
        std::num::NonZeroU32::new(config.retry_budget_per_s).expect("validated: greater than 0"),
    ));
    let next_sequence = Arc::new(AtomicU64::new(1));
    let engine = Engine::new();
    let (deposed, deposition) = tokio::sync::watch::channel(false);
    let handle = Handle {
        requests,
        events,
        registry,
        store,
        config,
        disk,
        budget,
        coordinator_id,
        incarnation,
        next_sequence,
        failure,
        deposed: Arc::new(deposed),
        abdicated: Arc::default(),
    };
    let mut actor = Actor {
        engine,
        handle: handle.clone(),
        meters: Meters::new(),
        replies: HashMap::new(),
        started: HashMap::new(),
        prepares: Prepares::new(
            handle.registry.clone(),
            handle.events.clone(),
            handle.config.prepare_timeout(),
        ),
        deliveries: Deliveries::new(
            handle.registry.clone(),
            handle.events.clone(),
            handle.config.commit_timeout(),
        ),
        stats: stats::Stats::default(),
        shutting_down: false,
        draining: None,
        fenced: 0,
        timers: Timers::default(),
    };
    for (txid, participants) in unfinished {
        info!(%txid, participants = ?participants.iter().map(|p| p.as_str()).collect::<Vec<_>>(), "recovery: redriving committed transaction");
        if let Err(err) = actor.engine.on_event(Event::Recovered { txid, participants }) {
            warn!(%txid, error = %err, "recovery: skipping duplicate decision");
        }
    }
    for (txid, participant) in one_phase_in_doubt {
        info!(%txid, %participant, "recovery: asking a one-phase participant whether it committed");
        if let Err(err) = actor.engine.on_event(Event::RecoveredOnePhase { txid, participant }) {
            warn!(%txid, error = %err, "recovery: skipping duplicate one-phase record");
        }
    }
    let now = unix_ms();
    for crate::store::Active { txid, deadline_ms, enlisted } in active {
        let idle_remaining = Duration::from_millis(deadline_ms.saturating_sub(now));
        info!(%txid, enlisted = ?enlisted.keys().map(|p| p.as_str()).collect::<Vec<_>>(), ?idle_remaining, "recovery: an interactive transaction is active again");
        if let Err(err) = actor.engine.on_event(Event::RecoveredActive { txid, enlisted, idle_remaining }) {
            warn!(%txid, error = %err, "recovery: skipping an active transaction already known");
        }
    }
    crate::tasks::spawn(actor.run(request_rx, event_rx, deposition));
    handle
}

/// The handles of the metrics recorded on every transaction, looked up
/// once: each `counter!` or `histogram!` looks its key up and allocates a
/// handle, which on the hot path was several allocations per transaction.
struct Meters {
    committed: metrics::Counter,
    aborted: metrics::Counter,
    unknown: metrics::Counter,
    decide: metrics::Histogram,
    complete: metrics::Histogram,
}

impl Meters {
    fn new() -> Meters {
        Meters {
            committed: metrics::counter!(TRANSACTIONS, "outcome" => "committed"),
            aborted: metrics::counter!(TRANSACTIONS, "outcome" => "aborted"),
            unknown: metrics::counter!(TRANSACTIONS, "outcome" => "unknown"),
            decide: metrics::histogram!(LATENCY, "phase" => "decide"),
            complete: metrics::histogram!(LATENCY, "phase" => "complete"),
        }
    }
}

impl Actor {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut deposed: tokio::sync::watch::Receiver<bool>,
    ) {
        let commands = self.engine.take_commands();
        self.execute(commands).await;
        // One handle for the loop: each `gauge!` looks its key up and
        // allocates a handle (a fifth of this process's allocations when it
        // was set that way on every turn).
        let in_flight = metrics::gauge!(IN_FLIGHT);
        // One sleep for every timer, reset to the earliest deadline left.
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        let mut sleeping_until = None;
        loop {
            if let Some(next) = self.timers.next() {
                // Waking early is harmless (the next turn looks again); a reset only for an earlier deadline.
                if sleeping_until.is_none_or(|at| next < at) {
                    sleep.as_mut().reset(next);
                    sleeping_until = Some(next);
                }
            }
            tokio::select! {
                biased;
                // Its sender is in `self.handle`: this resolves only on a deposition.
                _ = deposed.wait_for(|deposed| *deposed) => {
                    self.abdicate();
                    self.handle.abdicated.notify_one();
                    return;
                }
                Some(event) = events.recv() => {
                    self.on_event(event);
                    // A burst (a CommitBatch's acks, one event each) is taken in one
                    // turn: its commands are executed together, its end records in one write.
                    for _ in 1..PER_TURN {
                        let Ok(event) = events.try_recv() else { break };
                        self.on_event(event);
                    }
                }
                request = requests.recv() => match request {
                    // A burst (a TransactStream's transactions, read together) is
                    // taken in one turn: its Prepares go out together.
                    Some(request) => {
                        self.on_request(request);
                        for _ in 1..PER_TURN {
                            let Ok(request) = requests.try_recv() else { break };
                            self.on_request(request);
                        }
                    }
                    None => break,
                },
                () = &mut sleep, if sleeping_until.is_some() => sleeping_until = None,
            }
            let engine = &self.engine;
            for (txid, kind) in
                self.timers.expire(tokio::time::Instant::now(), |txid| engine.known(txid).is_some())
            {
                let _ = self.engine.on_event(Event::TimerFired { txid, kind });
            }
            let commands = self.engine.take_commands();
            if !commands.is_empty() {
                self.execute(commands).await;
            }
            in_flight.set(self.engine.in_flight() as f64);
            if self.draining.is_some() && self.engine.settled() {
                if let Some(reply) = self.draining.take() {
                    let _ = reply.send(());
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        let refused = matches!(event, Event::CommitRefused { .. });
        if let Err(err) = self.engine.on_event(event) {
            debug!(error = %err, "event refused by the engine");
        }
        if refused {
            metrics::gauge!(STUCK).set(self.engine.stuck().len() as f64);
        }
    }

    /// Answers every transaction waiting here "unknown: ask the leader".
    /// Whatever the group's log holds of them is the truth the next leader
    /// answers `GetOutcome` from: a COMMIT decision it holds is redriven,
    /// a one-phase question is asked again, and a txid it holds nothing of
    /// is asked of every participant: a two-phase one did not commit and now
    /// cannot (this replica can no longer write), a one-shot one-phase one
    /// committed or not at its participant, which says which.
    fn abdicate(&mut self) {
        let count = self.replies.len();
        for (txid, reply) in self.replies.drain() {
            let reason = "the coordinator that ran it stopped leading its group before it was decided \
                          here; ask the leader (GetOutcome)"
                .to_owned();
            let _ = reply.send((txid, Decided::Unknown { code: decree_proto::Reason::NotLeader, reason }));
        }
        info!(waiting = count, "no longer the leader: transactions in flight are answered unknown");
    }

    fn next_txid(&mut self) -> TxId {
        self.handle.issue_txid()
    }

    fn admit(&self) -> Result<(), CoordinatorError> {
        if self.shutting_down {
            return Err(CoordinatorError::ShuttingDown);
        }
        let limit = self.handle.config.max_in_flight;
        if self.engine.in_flight() >= limit {
            return Err(CoordinatorError::Overloaded { limit });
        }
        // What is admitted finishes inside the reserve; new work waits for space.
        self.handle.disk.admit()?;
        Ok(())
    }

    fn on_request(&mut self, request: Request) {
        match request {
            Request::Transact { branches, timeout, span, txid, reply, refused } => {
                if let Err(err) = self.admit() {
                    let _ = refused.send(err);
                    return;
                }
                let txid = match txid {
                    None => self.next_txid(),
                    Some(txid) if txid.sequence <= self.fenced => {
                        let _ = refused.send(CoordinatorError::TxidRefused {
                            txid,
                            why: "an outcome query answered for it before it started".into(),
                        });
                        return;
                    }
                    Some(txid) => txid,
                };
                span.record("txid", tracing::field::display(txid));
                debug!(parent: &span, %txid, participants = branches.len(), "transaction starts");
                let participants = branches.iter().map(|(p, _)| p.to_string()).collect();
                if let Err(err) = self.engine.on_event(Event::Transact { txid, branches, timeout }) {
                    // Only a txid the client named can be known already.
                    let _ = refused.send(CoordinatorError::TxidRefused { txid, why: err.to_string() });
                    return;
                }
                self.started.insert(txid, Started::new(span, participants));
                self.replies.insert(txid, reply);
            }
            Request::Begin { timeout, reply } => {
                if let Err(err) = self.admit() {
                    let _ = reply.send(Err(err));
                    return;
                }
                let txid = self.next_txid();
                self.engine.on_event(Event::Begin { txid, idle_timeout: timeout }).expect("fresh txid");
                // Durable before the client has the txid: a restart or the
                // group's next leader knows it is active.
                let deadline_ms =
                    unix_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
                let (store, handle) = (self.handle.store.clone(), self.handle.clone());
                crate::tasks::spawn(async move {
                    match store.log_begin(txid, deadline_ms).await {
                        Ok(()) => drop(reply.send(Ok(txid))),
                        // Unanswered: the client hears the coordinator stopped.
                        Err(err) => handle.failed(err.into()),
                    }
                });
            }
            Request::Commit { txid, timeout, span, reply, refused } => {
                let participants = self.engine.participants(txid).iter().map(ToString::to_string).collect();
                match self.engine.on_event(Event::CommitRequested { txid, timeout }) {
                    Ok(()) => {
                        span.record("txid", tracing::field::display(txid));
                        self.replies.insert(txid, reply);
                        self.started.insert(txid, Started::new(span, participants));
                    }
                    Err(err) => {
                        let _ = refused.send(err.into());
                    }
                }
            }
            Request::Abort { txid, reply } => {
                let _ = reply.send(self.engine.on_event(Event::AbortRequested { txid }).map_err(Into::into));
            }
            Request::Enlist { txid, participant, run, reply } => {
                match self.engine.enlist(txid, participant.clone(), run) {
                    // Durable before the participant goes on with the work,
                    // so every restart or next leader prepares it; a repeat
                    // too, as its first record may still be on its way.
                    Ok(run) => {
                        let (store, handle) = (self.handle.store.clone(), self.handle.clone());
                        crate::tasks::spawn(async move {
                            match store.log_enlist(txid, &participant, run).await {
                                Ok(()) => drop(reply.send(Ok(()))),
                                Err(err) => handle.failed(err.into()),
                            }
                        });
                    }
                    Err(err) => drop(reply.send(Err(err.into()))),
                }
            }
            Request::Known { txid, reply } => {
                let known = self.engine.known(txid);
                if known.is_none() && self.handle.issues(txid) {
                    // The answer comes from the log (ABORTED if it holds
                    // nothing): a txid issued, or leased, and not started yet
                    // must never start now.
                    // One not issued yet never will be: the sequence moves past it.
                    self.fenced = self.fenced.max(txid.sequence);
                    self.handle.next_sequence.fetch_max(txid.sequence + 1, Ordering::Relaxed);
                }
                let _ = reply.send(known);
            }
            Request::Retry { txid, reply } => {
                let _ = reply.send(self.engine.retry(txid));
                metrics::gauge!(STUCK).set(self.engine.stuck().len() as f64);
            }
            Request::ListStuck { reply } => {
                let _ = reply.send(self.engine.stuck());
            }
            Request::ListTransactions { txid, limit, reply } => {
                let mut in_flight = self.engine.in_flight_view();
                in_flight.retain(|t| txid.is_none_or(|id| t.txid == id));
                let _ = reply.send((in_flight, self.stats.recent(txid, limit)));
            }
            Request::Stats { seconds, reply } => {
                let now = unix_ms() / 1000;
                let _ = reply.send((
                    self.stats.seconds(now, seconds),
                    self.stats.totals(),
                    self.engine.in_flight(),
                ));
            }
            Request::Drain { reply } => {
                self.shutting_down = true;
                self.draining = Some(reply);
            }
        }
    }

    async fn execute(&mut self, commands: Vec<Command>) {
        // A turn may carry several transactions' messages: a partial fan-out is
        // the first transaction's, where it sends more than one.
        let prepares = first_fanout(&commands, |c| match c {
            Command::SendPrepare { txid, .. } => Some(*txid),
            _ => None,
        });
        let commits = first_fanout(&commands, |c| match c {
            Command::SendCommit { txid, recovery: false, .. } => Some(*txid),
            _ => None,
        });
        let mut first_prepare = true;
        let mut first_commit = true;
        // The end records of the turn (a CommitBatch's acks end many
        // transactions at once), written together after its other commands.
        let mut ended = Vec::new();
        for command in commands {
            match command {
                Command::SendPrepare { txid, participant, payload, one_phase, interactive } => {
                    let request =
                        wire::prepare_request(txid, payload, one_phase, interactive, self.handle.incarnation);
                    let outgoing = Outgoing { txid, request, span: self.span_of(txid) };
                    if prepares > 1
                        && first_prepare
                        && crash::is_armed(crash::COORDINATOR_PREPARE_PARTIAL_FANOUT)
                    {
                        let client = self.handle.registry.client(&participant);
                        let (timeout, events) =
                            (self.handle.config.prepare_timeout(), self.handle.events.clone());
                        phase_one::prepare_one(client, timeout, participant, outgoing, events).await;
                        crash::point(crash::COORDINATOR_PREPARE_PARTIAL_FANOUT);
                    } else {
                        self.prepares.prepare(&participant, outgoing);
                    }
                    first_prepare = false;
                }
                Command::LogDecision { txid, participants } => {
                    crash::point(crash::COORDINATOR_DECISION_BEFORE_LOG);
                    let (events, handle) = (self.handle.events.clone(), self.handle.clone());
                    // Called where the write finished (the log's writer thread): no task in between.
                    self.handle.store.log_decision_then(txid, &participants, move |written| {
                        if let Err(err) = written {
                            return handle.failed(err.into());
                        }
                        crash::point(crash::COORDINATOR_DECISION_AFTER_LOG);
                        debug!(%txid, "decision COMMIT durable");
                        let _ = events.send(Event::DecisionLogged { txid });
                    });
                }
                Command::LogOnePhaseCommit { txid, participant, in_doubt } => {
                    let (store, handle) = (self.handle.store.clone(), self.handle.clone());
                    crate::tasks::spawn(async move {
                        if let Err(err) = store.log_one_phase_commit(txid, &participant, in_doubt).await {
                            handle.failed(err.into());
                        }
                    });
                }
                Command::LogOnePhaseInDoubt { txid, participant } => {
                    let (store, events, handle) =
                        (self.handle.store.clone(), self.handle.events.clone(), self.handle.clone());
                    crate::tasks::spawn(async move {
                        if let Err(err) = store.log_one_phase_in_doubt(txid, &participant).await {
                            return handle.failed(err.into());
                        }
                        let _ = events.send(Event::OnePhaseInDoubtLogged { txid });
                    });
                }
                Command::ForgetActive { txid } => {
                    let (store, handle) = (self.handle.store.clone(), self.handle.clone());
                    crate::tasks::spawn(async move {
                        if let Err(err) = store.forget_active(txid).await {
                            handle.failed(err.into());
                        }
                    });
                }
                Command::LogOnePhaseAborted { txid } => {
                    let (store, handle) = (self.handle.store.clone(), self.handle.clone());
                    crate::tasks::spawn(async move {
                        if let Err(err) = store.log_one_phase_aborted(txid).await {
                            handle.failed(err.into());
                        }
                    });
                }
                Command::LogOnePhaseForgotten { txid } => {
                    warn!(%txid, "the participant forgot this one-phase outcome before it was learned: it is FORGOTTEN");
                    let (store, handle) = (self.handle.store.clone(), self.handle.clone());
                    crate::tasks::spawn(async move {
                        if let Err(err) = store.log_one_phase_forgotten(txid).await {
                            handle.failed(err.into());
                        }
                    });
                }
                Command::SendCommit { txid, participant, recovery } => {
                    let due = Due { txid, recovery, span: self.span_of(txid) };
                    if !recovery
                        && commits > 1
                        && first_commit
                        && crash::is_armed(crash::COORDINATOR_COMMIT_PARTIAL_FANOUT)
                    {
                        let client = self.handle.registry.client(&participant);
                        let answer =
                            phase_two::commit_one(client, self.handle.config.commit_timeout(), &due).await;
                        let _ = self.handle.events.send(phase_two::delivered(
                            txid,
                            participant,
                            recovery,
                            answer,
                        ));
                        crash::point(crash::COORDINATOR_COMMIT_PARTIAL_FANOUT);
                    } else {
                        self.deliveries.commit(&participant, due);
                    }
                    first_commit &= recovery;
                }
                Command::SendAbort { txid, participant } => {
                    crate::tasks::spawn(self.send_abort(txid, participant));
                }
                Command::ResolveOnePhase { txid, participant } => {
                    crate::tasks::spawn(self.resolve_one_phase(txid, participant));
                }
                Command::LogEnd { txid } => {
                    crash::point(crash::COORDINATOR_COMMIT_BEFORE_END);
                    if let Some(started) = self.started.remove(&txid) {
                        self.meters.complete.record(started.at.elapsed().as_secs_f64());
                    }
                    debug!(%txid, "every participant acked; ending");
                    ended.push(txid);
                }
                Command::Reply { txid, decided } => {
                    crash::point(crash::COORDINATOR_REPLY_BEFORE_CLIENT);
                    let outcome = match &decided {
                        Decided::Committed => {
                            debug!(%txid, "committed");
                            self.meters.committed.increment(1);
                            "committed"
                        }
                        Decided::Aborted { code, reason } => {
                            debug!(%txid, %reason, "aborted");
                            metrics::counter!(ABORTS, "reason" => code.label()).increment(1);
                            self.meters.aborted.increment(1);
                            "aborted"
                        }
                        Decided::Unknown { reason, .. } => {
                            warn!(%txid, %reason, "outcome unknown to the client");
                            self.meters.unknown.increment(1);
                            "unknown"
                        }
                    };
                    // Committed and still in memory: phase two is under way (one-phase ones are done).
                    let started = if outcome == "committed" && self.engine.known(txid).is_some() {
                        // Kept for its span while phase two runs; the participants are needed once.
                        self.started
                            .get_mut(&txid)
                            .map(|s| (s.at, s.unix_ms, std::mem::take(&mut s.participants)))
                    } else {
                        self.started.remove(&txid).map(|s| (s.at, s.unix_ms, s.participants))
                    };
                    if let Some((at, started_unix_ms, participants)) = started {
                        let elapsed = at.elapsed();
                        self.meters.decide.record(elapsed.as_secs_f64());
                        let (ended, code, reason) = match &decided {
                            Decided::Committed => {
                                (stats::Ended::Committed, Reason::Unspecified, String::new())
                            }
                            Decided::Aborted { code, reason } => {
                                (stats::Ended::Aborted, *code, reason.clone())
                            }
                            Decided::Unknown { code, reason } => {
                                (stats::Ended::Unknown, *code, reason.clone())
                            }
                        };
                        self.stats.record(stats::Decision {
                            txid,
                            ended,
                            code,
                            reason,
                            participants,
                            started_unix_ms,
                            decided_unix_ms: unix_ms(),
                            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                        });
                    }
                    if let Some(reply) = self.replies.remove(&txid) {
                        let _ = reply.send((txid, decided));
                    }
                }
                Command::ArmTimer { txid, kind, after } => {
                    self.timers.arm(tokio::time::Instant::now() + after, txid, kind);
                }
                Command::ScheduleRedelivery { txid, participant, attempt } => {
                    metrics::counter!(REDELIVERIES).increment(1);
                    // Attempt 0: the participant came back; only its budget paces it.
                    let delay = match attempt {
                        0 => Duration::ZERO,
                        n => self.handle.config.redelivery().delay(n - 1, &mut rand::rng()),
                    };
                    debug!(%txid, %participant, attempt, delay_ms = delay.as_millis() as u64, "commit redelivery scheduled");
                    let (events, budget) = (self.handle.events.clone(), self.handle.budget.clone());
                    crate::tasks::spawn(async move {
                        tokio::time::sleep(delay).await;
                        if !budget.try_take(&participant) {
                            metrics::counter!(REDELIVERIES_PACED).increment(1);
                            budget.take(&participant).await;
                        }
                        let _ = events.send(Event::RedeliveryDue { txid, participant });
                    });
                }
            }
        }
        if !ended.is_empty() {
            let handle = self.handle.clone();
            self.handle.store.log_ends_then(&ended, move |written| {
                if let Err(err) = written {
                    handle.failed(err.into());
                }
            });
        }
    }

    /// The span `txid`'s RPCs run in: its transaction's, or for one found
    /// at recovery (or already answered and forgotten), a new one keyed by txid.
    fn span_of(&self, txid: TxId) -> Span {
        match self.started.get(&txid) {
            Some(started) => started.span.clone(),
            None => tracing::info_span!(target: trace::TXN, "transaction", %txid),
        }
    }

    fn send_abort(
        &self,
        txid: TxId,
        participant: ParticipantName,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.handle.registry.client(&participant);
        let timeout = self.handle.config.commit_timeout();
        let span = self.span_of(txid);
        let backoff = self.handle.config.redelivery();
        let budget = self.handle.budget.clone();
        let sent_in = span.clone();
        async move {
            // A prepared branch that misses it asks, and presumed abort
            // answers; an active (unprepared) interactive branch never asks,
            // and would hold its keys until its idle timeout. So the Abort
            // goes again, paced as phase two's redeliveries and within the
            // participant's retry budget, while the participant does not
            // answer, for as long as a participant keeps an idle branch by
            // default.
            let until = tokio::time::Instant::now() + ABORT_REDELIVERY;
            for attempt in 0.. {
                let request = traced(wire::abort_request(txid), &sent_in);
                let Err(error) = call(client.clone(), timeout, |mut c| async move { c.abort(request).await }).await
                else {
                    return;
                };
                let pause = backoff.delay(attempt, &mut rand::rng());
                if !unanswered(&error) || tokio::time::Instant::now() + pause >= until {
                    debug!(%txid, %participant, %error, "abort not delivered");
                    return;
                }
                tokio::time::sleep(pause).await;
                if !budget.try_take(&participant) {
                    debug!(%txid, %participant, %error, "abort not delivered; the participant's retry budget is spent");
                    return;
                }
                debug!(%txid, %participant, %error, "abort not delivered; sending it again");
                metrics::counter!(ABORTS_RESENT).increment(1);
            }
        }
        .instrument(span)
    }

    /// Learns a one-phase outcome by sending Abort: acked means it did not
    /// commit (and now cannot: the participant keeps an abort tombstone);
    /// FAILED_PRECONDITION means it committed (answered once durable).
    fn resolve_one_phase(
        &self,
        txid: TxId,
        participant: ParticipantName,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.handle.registry.client(&participant);
        let events = self.handle.events.clone();
        let timeout = self.handle.config.commit_timeout();
        let span = self.span_of(txid);
        let request = traced(wire::abort_request(txid), &span);
        async move {
            let answer = call(client, timeout, |mut c| async move { c.abort(request).await }).await;
            let found = wire::one_phase_found(answer.map(|r| wire::acked(r.ack, r.reason_code, r.reason)));
            info!(%txid, %participant, ?found, "one-phase outcome asked");
            let _ = events.send(Event::OnePhaseResolved { txid, found });
        }
        .instrument(span)
    }
}

/// Ended outcomes forgotten (one range delete per prune).
pub const PRUNES: &str = "decree_outcome_prunes_total";

/// Forgets ended outcomes beyond the retention window, every prune interval,
/// until `stop`: the policy ([`Window`]) picks the horizon; the store deletes
/// below it in one batch with the durable horizon. Every time as many outcomes
/// as the window holds (at least 100,000) were forgotten, the forgotten range
/// is compacted, so the disk gives the space back rather than when RocksDB's
/// compaction next reaches it.
pub(crate) async fn prune_ended(handle: Handle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let config = &handle.config;
    // Where the issued sequence stood a lease's life ago: a leased txid may
    // start until its lease expires, and the horizon must not pass it.
    let issued = || handle.next_sequence.load(Ordering::Relaxed);
    let mut trailing = crate::lease::Trailing::new(Instant::now(), issued());
    let mut next = || {
        let sequence = trailing.note(Instant::now(), issued());
        TxId::new(handle.coordinator_id, handle.incarnation, sequence)
    };
    let mut window = Window::new(config.retention(), Instant::now(), next(), handle.store.ended());
    let compact_every = config.retain_ended.max(100_000);
    let mut compacted_at = handle.store.ended();
    let mut ticker = tokio::time::interval(config.prune_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let ended = handle.store.ended();
        let Some(horizon) = window.tick(Instant::now(), next(), ended) else { continue };
        match handle.store.forget_before(horizon).await {
            Ok(true) => {
                metrics::counter!(PRUNES).increment(1);
                debug!(%horizon, "ended outcomes below the horizon forgotten");
            }
            Ok(false) => {}
            Err(err) => return handle.failed(err.into()),
        }
        if ended - compacted_at >= compact_every {
            compacted_at = ended;
            let store = handle.store.clone();
            let started = Instant::now();
            let _ = tokio::task::spawn_blocking(move || store.compact_forgotten()).await;
            info!(%horizon, elapsed_ms = started.elapsed().as_millis() as u64, "forgotten outcomes compacted away");
        }
    }
}

/// `message` as a request carrying `span`'s trace context.
pub(crate) fn traced<T>(message: T, span: &Span) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    trace::inject(span, request.metadata_mut());
    request
}

/// How long an Abort that no participant answers is sent again: a
/// participant's default `--idle-timeout-ms`, after which it has rolled an
/// idle branch back by itself.
const ABORT_REDELIVERY: Duration = Duration::from_secs(60);

/// The participant did not answer (no reply in time, or the call broke):
/// a message may be sent again. An answer, even a refusal, is final.
fn unanswered(error: &Unanswered) -> bool {
    match error {
        Unanswered::Deadline => true,
        Unanswered::Refused(status) => decree_proto::unanswered(status),
        Unanswered::NotEnrolled => false,
    }
}

/// One RPC to a participant (looked up before, `None` if not enrolled), under `timeout`.
pub(crate) async fn call<T, F, Fut>(
    client: Option<ParticipantClient<Channel>>,
    timeout: Duration,
    rpc: F,
) -> Result<T, Unanswered>
where
    F: FnOnce(ParticipantClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let client = client.ok_or(Unanswered::NotEnrolled)?;
    match tokio::time::timeout(timeout, rpc(client)).await {
        Err(_) => Err(Unanswered::Deadline),
        Ok(Err(status)) => Err(Unanswered::Refused(status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// A storage failure: stop at once. Retrying a failed fsync and trusting it
/// would be lying about durability.
pub(crate) fn fatal(err: &CoordinatorError) -> ! {
    tracing::error!(error = %err, "fatal storage error; stopping");
    eprintln!("decree-coordinator: fatal storage error: {err}");
    std::process::exit(70)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(txid: TxId, participant: &str) -> Command {
        Command::SendPrepare {
            txid,
            participant: participant.parse().unwrap(),
            payload: Vec::new(),
            one_phase: false,
            interactive: false,
        }
    }

    /// A turn's commands may hold several transactions' Prepares: the fan-out
    /// the crash point splits is the first transaction's alone.
    #[test]
    fn the_first_fanout_counts_the_first_transactions_messages_only() {
        let (a, b) = (TxId::new(1, 1, 1), TxId::new(1, 1, 2));
        let pick = |c: &Command| match c {
            Command::SendPrepare { txid, .. } => Some(*txid),
            _ => None,
        };
        let reply = Command::Reply { txid: b, decided: Decided::Committed };
        let one_then_two = [reply.clone(), prepare(a, "p1"), prepare(b, "p1"), prepare(b, "p2")];
        assert_eq!(first_fanout(&one_then_two, pick), 1, "a's single Prepare is no fan-out");
        let two_then_one = [prepare(b, "p1"), reply, prepare(a, "p1"), prepare(b, "p2")];
        assert_eq!(first_fanout(&two_then_one, pick), 2);
        assert_eq!(first_fanout(&[], pick), 0);
    }
}
