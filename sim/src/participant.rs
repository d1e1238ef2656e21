//! The simulated participant: its engine, branch log and KV resource (one
//! memory disk, as one RocksDB holds both in the server), driven as
//! `participant/src/runtime.rs` and `service.rs` drive them: Prepares, Commits
//! and Aborts become engine events, the engine's votes and acks go back
//! through `decree_participant::wire`, and the resolver asks the coordinator
//! about branches in doubt.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use decree_participant::engine::{
    Command, Engine, Event, InDoubt, LockEntry, TombstoneRetention, Validated, Vote,
};
use decree_participant::kv::{self, KvStore};
use decree_participant::store::BranchLog;
use decree_participant::wire;
use decree_proto::{v1, KvOp, ParticipantName, TxId};
use decree_runtime::crash;
use decree_runtime::storage::now_or_never;
use decree_runtime::MemLog;
use prost::Message;
use rand::Rng;

use crate::check::Retention;
use crate::coordinator::name;
use crate::{Ctx, Item, Msg, Mutation, Node, Time, MS};

const LOCK_WAIT: Duration = Duration::from_millis(200);
const IN_DOUBT_AFTER: Time = 1_000 * MS;
const RESOLVE_INTERVAL: Time = 250 * MS;
const HEARTBEAT: Time = 500 * MS;
const IDLE_TIMEOUT: Time = 3_000 * MS;
const CALL_TIMEOUT: Time = 500 * MS;
/// With DecideAlone, how long a branch waits before it decides by itself.
const ALONE_AFTER: Time = 300 * MS;

#[derive(Debug)]
pub enum Work {
    Engine(Event),
    Disk(Disk),
    Deadline(u64),
    Resolve,
    Heartbeat,
    Tick,
}

#[derive(Debug)]
pub enum Disk {
    Prepared { txid: TxId, keys: Vec<String>, redo: Vec<u8> },
    Commit { txid: TxId, redo: Vec<u8>, one_phase: bool },
    Abort { txid: TxId },
    Forget { horizons: Vec<TxId> },
}

#[derive(Debug)]
enum Call {
    GetOutcome { txid: TxId },
    Enroll,
    Heartbeat,
    Enlist { work: u64 },
}

/// Interactive work waiting for its locks, or for its enlistment.
#[derive(Debug)]
struct PendingWork {
    client: Node,
    rpc: u64,
    txid: TxId,
    ops: Vec<KvOp>,
    so_far: Vec<u8>,
}

struct Process {
    engine: Engine,
    store: BranchLog<MemLog>,
    kv: KvStore<MemLog>,
    /// Prepares waiting for their vote: the callers and their call ids (a
    /// repeated Prepare waits for the vote of the one in progress).
    votes: BTreeMap<TxId, Vec<(Node, u64)>>,
    /// Waiting for an ack: the caller, its call id, and whether it asked for a typed ack.
    commit_waiters: BTreeMap<TxId, Vec<(Node, u64, bool)>>,
    abort_waiters: BTreeMap<TxId, Vec<(Node, u64, bool)>>,
    works: BTreeMap<u64, PendingWork>,
    next_work: u64,
    calls: BTreeMap<u64, Call>,
    enrolled: bool,
    /// The newest coordinator incarnation heard of.
    incarnation: u64,
    /// Branches were recovered: ask about all of them at the first resolve.
    first_resolve: bool,
    disk_free: Time,
}

pub struct Participant {
    index: usize,
    /// Answers as a participant that predates typed answers: status codes for
    /// refusals, no reason codes (the seed picks).
    legacy: bool,
    name: ParticipantName,
    disk: MemLog,
    process: Option<Process>,
    epoch: u64,
    retention: TombstoneRetention,
    base: Instant,
}

impl Participant {
    pub fn start(ctx: &mut Ctx, index: usize, retention: Retention) -> Participant {
        let legacy = ctx.rng().random_bool(0.3);
        let mut participant = Participant {
            index,
            legacy,
            name: name(index),
            disk: MemLog::new(),
            process: None,
            epoch: 0,
            retention: retention.participant,
            base: Instant::now(),
        };
        participant.boot(ctx, participant.disk.clone());
        participant
    }

    fn node(&self) -> Node {
        Node::Participant(self.index)
    }

    pub fn up(&self) -> bool {
        self.process.is_some()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn disk(&self) -> &MemLog {
        &self.disk
    }

    fn instant(&self, at: Time) -> Instant {
        self.base + Duration::from_micros(at)
    }

    /// The committed value of a KV key, as a reader of this participant sees it.
    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        let process = self.process.as_ref()?;
        process.kv.get(key).expect("memory")
    }

    /// Every committed KV key with `prefix` and its value.
    pub fn scan(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        use decree_runtime::Storage;
        let Some(process) = &self.process else { return Vec::new() };
        let from = format!("k/{prefix}");
        process
            .store
            .log()
            .scan_prefix(from.as_bytes())
            .expect("memory")
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k[2..]).into_owned(), v))
            .collect()
    }

    pub fn in_doubt(&self) -> Vec<InDoubt> {
        self.process.as_ref().map(|p| p.engine.in_doubt()).unwrap_or_default()
    }

    pub fn locks(&self) -> Vec<LockEntry> {
        self.process.as_ref().map(|p| p.engine.lock_table()).unwrap_or_default()
    }

    pub fn waiting(&self) -> usize {
        self.process.as_ref().map_or(0, |p| p.engine.waiting().len())
    }

    /// The PrepareResponse for `vote`, as this participant's version sends it.
    fn vote_response(&self, vote: Vote) -> v1::PrepareResponse {
        let mut response = wire::prepare_response(vote);
        if self.legacy {
            response.reason_code = 0;
        }
        response
    }

    fn boot(&mut self, ctx: &mut Ctx, disk: MemLog) {
        let store = BranchLog::open_on(disk.clone(), "coord");
        let kv = KvStore::new(disk);
        let loaded = now_or_never(store.load()).expect("the memory log loads");
        let now = self.instant(ctx.now);
        let mut engine = Engine::with_waits(LOCK_WAIT, Duration::ZERO).with_tombstones(self.retention);
        let recovered = loaded.prepared.len();
        loaded.replay_into(&mut engine, now);
        ctx.trace(|| format!("p{} starts: {recovered} prepared branches recovered", self.index));
        self.process = Some(Process {
            engine,
            store,
            kv,
            votes: BTreeMap::new(),
            commit_waiters: BTreeMap::new(),
            abort_waiters: BTreeMap::new(),
            works: BTreeMap::new(),
            next_work: 0,
            calls: BTreeMap::new(),
            enrolled: false,
            incarnation: 0,
            first_resolve: recovered > 0,
            disk_free: ctx.now,
        });
        let epoch = self.epoch;
        let p = self.index;
        ctx.schedule(0, Item::Participant { p, epoch, work: Work::Heartbeat });
        ctx.schedule(RESOLVE_INTERVAL, Item::Participant { p, epoch, work: Work::Resolve });
        ctx.schedule(100 * MS, Item::Participant { p, epoch, work: Work::Tick });
        self.execute(ctx);
    }

    pub fn crash(&mut self, ctx: &mut Ctx, machine: bool) {
        self.process = None;
        self.epoch += 1;
        self.disk = if machine {
            let keep = ctx.rng().random_range(0..=self.disk.unsynced_batches());
            self.disk.crash_machine(keep)
        } else {
            self.disk.crash_process()
        };
    }

    pub fn restart(&mut self, ctx: &mut Ctx) {
        let disk = self.disk.clone();
        self.boot(ctx, disk);
    }

    fn schedule(&self, ctx: &mut Ctx, after: Time, work: Work) {
        ctx.schedule(after, Item::Participant { p: self.index, epoch: self.epoch, work });
    }

    fn feed(&mut self, ctx: &mut Ctx, event: Event) {
        let Some(process) = self.process.as_mut() else { return };
        process.engine.on_event(event);
        self.execute(ctx);
    }

    fn call(&mut self, ctx: &mut Ctx, call: Call, msg: impl FnOnce(u64) -> Msg) {
        let rpc = ctx.rpc();
        let Some(process) = self.process.as_mut() else { return };
        process.calls.insert(rpc, call);
        ctx.send(self.node(), Node::Coordinator, msg(rpc));
        self.schedule(ctx, CALL_TIMEOUT, Work::Deadline(rpc));
    }

    fn write(&mut self, ctx: &mut Ctx, disk: Disk, synced: bool) {
        let Some(process) = self.process.as_mut() else { return };
        let after = ctx.disk_write(&mut process.disk_free, synced);
        self.schedule(ctx, after, Work::Disk(disk));
    }

    pub fn work(&mut self, ctx: &mut Ctx, work: Work) {
        match work {
            Work::Engine(event) => self.feed(ctx, event),
            Work::Disk(disk) => self.disk_done(ctx, disk),
            Work::Deadline(rpc) => self.unanswered(ctx, rpc),
            Work::Resolve => self.resolve(ctx),
            Work::Heartbeat => self.heartbeat(ctx),
            Work::Tick => {
                let now = self.instant(ctx.now);
                let since = now.checked_sub(Duration::from_micros(IDLE_TIMEOUT));
                self.feed(ctx, Event::ForgetOld { now });
                if let Some(since) = since {
                    self.feed(ctx, Event::IdleCheck { since });
                }
                self.schedule(ctx, 100 * MS, Work::Tick);
            }
        }
    }

    fn heartbeat(&mut self, ctx: &mut Ctx) {
        let Some(process) = self.process.as_ref() else { return };
        let name = self.name.clone();
        if process.enrolled {
            self.call(ctx, Call::Heartbeat, |rpc| Msg::Heartbeat(rpc, name));
        } else {
            self.call(ctx, Call::Enroll, |rpc| Msg::Enroll(rpc, name));
        }
        self.schedule(ctx, HEARTBEAT, Work::Heartbeat);
    }

    /// As the runtime's resolver: ask about branches in doubt that recovery
    /// found, that belong to an older coordinator incarnation, or that waited
    /// longer than the in-doubt bound.
    fn resolve(&mut self, ctx: &mut Ctx) {
        let now = self.instant(ctx.now);
        let Some(process) = self.process.as_mut() else { return };
        let first = std::mem::take(&mut process.first_resolve);
        let current = process.incarnation;
        let branches = process.engine.in_doubt();
        if first
            && !branches.is_empty()
            && ctx.crash_point(self.node(), crash::PARTICIPANT_RECOVERY_BEFORE_RESOLVE)
        {
            return;
        }
        for branch in branches {
            let age = now.duration_since(branch.since).as_micros() as Time;
            if ctx.mutated(Mutation::DecideAlone) && age >= ALONE_AFTER {
                // Planted: tired of waiting, the branch aborts on its own.
                let event = Event::OutcomeLearned {
                    txid: branch.txid,
                    outcome: decree_participant::engine::Outcome::Aborted,
                };
                self.feed(ctx, event);
                continue;
            }
            if first || branch.txid.incarnation < current || age >= IN_DOUBT_AFTER {
                let txid = branch.txid;
                self.call(ctx, Call::GetOutcome { txid }, |rpc| Msg::GetOutcome(rpc, txid));
            }
        }
        self.schedule(ctx, RESOLVE_INTERVAL, Work::Resolve);
    }

    fn unanswered(&mut self, ctx: &mut Ctx, rpc: u64) {
        let Some(process) = self.process.as_mut() else { return };
        match process.calls.remove(&rpc) {
            Some(Call::Heartbeat) => process.enrolled = false,
            Some(Call::Enlist { work }) => {
                // The coordinator did not answer the enlistment: the work fails, the branch aborts.
                if let Some(pending) = process.works.remove(&work) {
                    let txid = pending.txid;
                    ctx.send(
                        self.node(),
                        pending.client,
                        Msg::Executed(pending.rpc, Err("enlist failed".into())),
                    );
                    self.feed(ctx, Event::WorkDone { txid, done: None, at: self.instant(ctx.now) });
                    self.feed(ctx, Event::AbortRequested { txid });
                }
            }
            Some(Call::GetOutcome { .. } | Call::Enroll) | None => {}
        }
    }

    pub fn receive(&mut self, ctx: &mut Ctx, from: Node, msg: Msg) {
        let at = self.instant(ctx.now);
        let Some(process) = self.process.as_mut() else { return };
        match msg {
            Msg::Prepare(rpc, request) => {
                let Ok(txid) = request.txid.parse::<TxId>() else { return };
                let keys = match kv::ops(&request.payload) {
                    Ok(ops) => kv::keys(&ops),
                    Err(reason) => {
                        let code = decree_proto::Reason::ValidationFailed;
                        let response = self.vote_response(Vote::No { code, reason });
                        ctx.send(self.node(), from, Msg::Vote(rpc, Ok(response)));
                        return;
                    }
                };
                if let Some(waiting) = process.votes.get_mut(&txid) {
                    waiting.push((from, rpc));
                    return;
                }
                process.votes.insert(txid, vec![(from, rpc)]);
                self.feed(
                    ctx,
                    Event::PrepareRequested {
                        txid,
                        keys,
                        payload: request.payload,
                        one_phase: request.one_phase,
                        incarnation: request.coordinator_incarnation,
                        interactive: request.interactive,
                    },
                );
            }
            Msg::Commit(rpc, txid, typed) => {
                process.commit_waiters.entry(txid).or_default().push((from, rpc, typed && !self.legacy));
                self.feed(ctx, Event::CommitRequested { txid });
            }
            Msg::Abort(rpc, txid, typed) => {
                process.abort_waiters.entry(txid).or_default().push((from, rpc, typed && !self.legacy));
                self.feed(ctx, Event::AbortRequested { txid });
            }
            Msg::Execute(rpc, txid, ops) => {
                let keys = kv::keys(&ops);
                let work = process.next_work;
                process.next_work += 1;
                process.works.insert(work, PendingWork { client: from, rpc, txid, ops, so_far: Vec::new() });
                self.feed(ctx, Event::WorkRequested { txid, work, keys, at });
            }
            Msg::Outcome(rpc, answer) => {
                let Some(Call::GetOutcome { txid }) = process.calls.remove(&rpc) else { return };
                let Ok(outcome) = answer else { return };
                if let Some(outcome) = wire::learned(outcome) {
                    self.feed(ctx, Event::OutcomeLearned { txid, outcome });
                }
            }
            Msg::Enrolled(rpc, incarnation) => {
                match process.calls.remove(&rpc) {
                    Some(Call::Enroll | Call::Heartbeat) => {}
                    _ => return,
                }
                process.enrolled = true;
                process.incarnation = process.incarnation.max(incarnation);
                self.feed(ctx, Event::CoordinatorIncarnation { incarnation });
            }
            Msg::Enlisted(rpc, result) => {
                let Some(Call::Enlist { work }) = process.calls.remove(&rpc) else { return };
                let Some(pending) = process.works.remove(&work) else { return };
                match result {
                    Ok(()) => self.run_work(ctx, pending),
                    Err(reason) => {
                        let txid = pending.txid;
                        ctx.send(self.node(), pending.client, Msg::Executed(pending.rpc, Err(reason)));
                        self.feed(ctx, Event::WorkDone { txid, done: None, at });
                        self.feed(ctx, Event::AbortRequested { txid });
                    }
                }
            }
            Msg::Refused(rpc) => self.unanswered(ctx, rpc),
            other => ctx.trace(|| format!("p{} ignores {other}", self.index)),
        }
    }

    /// Granted work runs over the branch's work so far, as the KV service's Execute does.
    fn run_work(&mut self, ctx: &mut Ctx, pending: PendingWork) {
        let at = self.instant(ctx.now);
        let Some(process) = self.process.as_mut() else { return };
        let PendingWork { client, rpc, txid, ops, so_far } = pending;
        let outcome = kv::ops(&so_far).and_then(|mut all| {
            all.extend(ops.iter().cloned());
            process.kv.evaluate(&all).map(drop)
        });
        match outcome {
            Ok(()) => {
                let done = v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: None }
                    .encode_to_vec();
                ctx.send(self.node(), client, Msg::Executed(rpc, Ok(())));
                self.feed(ctx, Event::WorkDone { txid, done: Some(done), at });
            }
            Err(reason) => {
                ctx.send(self.node(), client, Msg::Executed(rpc, Err(reason)));
                self.feed(ctx, Event::WorkDone { txid, done: None, at });
            }
        }
    }

    fn disk_done(&mut self, ctx: &mut Ctx, disk: Disk) {
        let at = self.instant(ctx.now);
        let node = self.node();
        let Some(process) = self.process.as_mut() else { return };
        match disk {
            Disk::Prepared { txid, keys, redo } => {
                now_or_never(process.store.log_prepared(txid, &keys, &redo)).expect("memory");
                if !ctx.mutated(Mutation::YesBeforeDurable) {
                    self.feed(ctx, Event::PreparedLogged { txid, at });
                }
            }
            Disk::Commit { txid, redo, one_phase } => {
                let writes = process.kv.apply(&redo).expect("a redo this resource made");
                now_or_never(process.store.log_commit(txid, writes, one_phase)).expect("memory");
                ctx.ghost.applied_commit(ctx.now, self.index, txid, one_phase);
                if ctx.mutated(Mutation::AckBeforeDurable) && !one_phase {
                    return;
                }
                if ctx.crash_point(node, crash::PARTICIPANT_COMMIT_AFTER_APPLY) {
                    return;
                }
                self.feed(ctx, Event::CommitLogged { txid });
            }
            Disk::Abort { txid } => {
                now_or_never(process.store.log_abort(txid)).expect("memory");
                self.feed(ctx, Event::AbortLogged { txid });
            }
            Disk::Forget { horizons } => {
                now_or_never(process.store.forget_tombstones(&horizons)).expect("memory");
            }
        }
    }

    fn execute(&mut self, ctx: &mut Ctx) {
        loop {
            let Some(process) = self.process.as_mut() else { return };
            let commands = process.engine.take_commands();
            if commands.is_empty() {
                return;
            }
            for command in commands {
                if ctx.dying == Some(self.node()) || self.process.is_none() {
                    return;
                }
                self.command(ctx, command);
            }
        }
    }

    fn command(&mut self, ctx: &mut Ctx, command: Command) {
        let node = self.node();
        let at = self.instant(ctx.now);
        let Some(process) = self.process.as_mut() else { return };
        match command {
            Command::Validate { txid, payload } => {
                let result: Validated = process.kv.validate(&payload);
                self.schedule(ctx, 20, Work::Engine(Event::Validated { txid, result }));
            }
            Command::LogPrepared { txid, keys, redo } => {
                if ctx.crash_point(node, crash::PARTICIPANT_PREPARE_BEFORE_LOG) {
                    return;
                }
                if ctx.mutated(Mutation::YesBeforeDurable) {
                    // Planted: the engine hears "durable" before the write is.
                    self.schedule(ctx, 0, Work::Engine(Event::PreparedLogged { txid, at }));
                }
                self.write(ctx, Disk::Prepared { txid, keys, redo }, true);
            }
            Command::LogCommit { txid, redo, one_phase } => {
                if !one_phase && ctx.crash_point(node, crash::PARTICIPANT_COMMIT_BEFORE_APPLY) {
                    return;
                }
                ctx.ghost.deciding_commit(ctx.now, self.index, txid, one_phase);
                if ctx.mutated(Mutation::AckBeforeDurable) && !one_phase {
                    self.schedule(ctx, 0, Work::Engine(Event::CommitLogged { txid }));
                }
                self.write(ctx, Disk::Commit { txid, redo, one_phase }, true);
            }
            Command::LogAbort { txid, prepared } => {
                if ctx.crash_point(node, crash::PARTICIPANT_ABORT_BEFORE_APPLY) {
                    return;
                }
                ctx.ghost.deciding_abort(ctx.now, self.index, txid, prepared);
                self.write(ctx, Disk::Abort { txid }, false);
            }
            Command::ForgetTombstones { horizons, .. } => self.write(ctx, Disk::Forget { horizons }, false),
            Command::Vote { txid, vote } => {
                if vote == Vote::Yes {
                    ctx.ghost.yes_sent(ctx.now, self.index, txid, &self.disk);
                    if ctx.crash_point(node, crash::PARTICIPANT_PREPARE_AFTER_LOG) {
                        return;
                    }
                }
                let response = self.vote_response(vote);
                let Some(process) = self.process.as_mut() else { return };
                for (to, rpc) in process.votes.remove(&txid).unwrap_or_default() {
                    ctx.send(node, to, Msg::Vote(rpc, Ok(response.clone())));
                }
            }
            Command::ArmLockWait { txid, after } => {
                self.schedule(ctx, after.as_micros() as Time, Work::Engine(Event::LockWaitExpired { txid }));
            }
            Command::ArmReadWait { read, after } => {
                self.schedule(ctx, after.as_micros() as Time, Work::Engine(Event::ReadWaitExpired { read }));
            }
            Command::Read { .. } => {}
            Command::WorkGranted { work, so_far, first } => {
                let Some(pending) = process.works.get_mut(&work) else { return };
                pending.so_far = so_far;
                if first {
                    let (txid, name) = (pending.txid, self.name.clone());
                    self.call(ctx, Call::Enlist { work }, |rpc| Msg::Enlist(rpc, txid, name));
                } else if let Some(pending) = process.works.remove(&work) {
                    self.run_work(ctx, pending);
                }
            }
            Command::WorkRefused { work, reason, .. } => {
                if let Some(pending) = process.works.remove(&work) {
                    ctx.send(node, pending.client, Msg::Executed(pending.rpc, Err(reason)));
                }
            }
            Command::LogHeuristic { .. }
            | Command::HeuristicAnswer { .. }
            | Command::HeuristicOutcome { .. } => {}
            Command::AckCommit { txid, ack } => {
                for (to, rpc, typed) in process.commit_waiters.remove(&txid).unwrap_or_default() {
                    ctx.send(node, to, Msg::Ack(rpc, wire::commit_response(ack.clone(), typed)));
                }
            }
            Command::AckAbort { txid, ack } => {
                for (to, rpc, typed) in process.abort_waiters.remove(&txid).unwrap_or_default() {
                    let answer = wire::abort_response(ack.clone(), typed).map(|r| v1::CommitResponse {
                        ack: r.ack,
                        reason_code: r.reason_code,
                        reason: r.reason,
                    });
                    ctx.send(node, to, Msg::Ack(rpc, answer));
                }
            }
        }
    }
}
