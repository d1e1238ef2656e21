//! The simulated participant: its engine, branch log and KV resource (one
//! memory disk, as one RocksDB holds both in the server), driven as
//! `participant/src/runtime.rs` and `service.rs` drive them: Prepares, Commits
//! and Aborts become engine events, the engine's votes and acks go back
//! through `decree_participant::wire`, and the resolver asks the coordinator
//! about branches in doubt.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use decree_participant::engine::{
    Command, Engine, Event, InDoubt, LockEntry, TombstoneRetention, Validated, Vote,
};
use decree_participant::kv::{self, KvStore};
use decree_participant::membership::RING_KEY;
use decree_participant::migration;
use decree_participant::resource::Resource;
use decree_participant::store::BranchLog;
use decree_participant::wire;
use decree_proto::ring::Routing;
use decree_proto::{v1, KvOp, ParticipantName, TxId};
use decree_runtime::storage::now_or_never;
use decree_runtime::{crash, record, MemLog, Storage, Write};
use prost::Message;
use rand::Rng;

use crate::check::Retention;
use crate::coordinator::name;
use crate::{Ctx, Item, Msg, Mutation, Node, Time, MS, SECOND};

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
    /// A slow resource's own commit finished: the commit record goes to the disk.
    Apply(Disk),
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
    Abort { txid: TxId, prepared: bool },
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
    /// A migration batch's step, and the keys it locks.
    step: Option<(v1::MigrationStep, bool, Vec<String>)>,
    /// The step put its batch's fence up (not found held by another request of the batch).
    put_up: bool,
}

impl PendingWork {
    /// Tells the caller the work failed: a client hears the reason, the
    /// coordinator's batch a status.
    fn fail(&self, ctx: &mut Ctx, node: Node, status: tonic::Status) {
        let msg = match self.step {
            Some(_) => Msg::Stepped(self.rpc, Err(status)),
            None => Msg::Executed(self.rpc, Err(status.message().to_owned())),
        };
        ctx.send(node, self.client, msg);
    }
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
    /// Reads waiting for their keys to be unlocked: the caller, its call id, the keys.
    reads: BTreeMap<u64, (Node, u64, Vec<String>)>,
    calls: BTreeMap<u64, Call>,
    enrolled: bool,
    /// The newest coordinator incarnation heard of.
    incarnation: u64,
    /// Branches were recovered: ask about all of them at the first resolve.
    first_resolve: bool,
    /// This run of the process, named in every Enlist.
    run: u64,
    disk_free: Time,
    /// Branches whose validation is under way (the resource has not answered).
    validating: BTreeSet<TxId>,
}

/// Bytes of committed values the first participant caches (see `boot`).
const SMALL_CACHE: usize = 16 * 256;

pub struct Participant {
    index: usize,
    /// Its resource waits to validate a branch and to commit it (as a
    /// PostgreSQL resource's `PREPARE TRANSACTION` and `COMMIT PREPARED` do:
    /// its own locks, its own disk) instead of answering on the actor's turn
    /// as the KV store does: the branch stays validating, or committing
    /// before its record is written, while other messages arrive (the seed picks).
    slow: bool,
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
    /// Participant `index`; a member of the ring `routing` from the start if given.
    pub fn start(
        ctx: &mut Ctx,
        index: usize,
        retention: Retention,
        routing: Option<&Routing>,
        slow: bool,
    ) -> Participant {
        let legacy = ctx.rng().random_bool(0.3);
        let mut participant = Participant {
            index,
            slow,
            legacy,
            name: name(index),
            disk: MemLog::new(),
            process: None,
            epoch: 0,
            retention: retention.participant,
            base: Instant::now(),
        };
        if let Some(routing) = routing {
            // As if it had joined before the run: its ring state is on its disk.
            let write = Write::put(RING_KEY, record::encode(&routing.to_wire()));
            now_or_never(participant.disk.write(vec![write], true)).expect("memory");
        }
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
        // The first participant's cache holds about two values a shard: its
        // reads miss and evict all the time, beside the others' that keep all.
        let cache = if self.index == 0 { SMALL_CACHE } else { kv::CACHE_BYTES };
        let kv = KvStore::member(disk, self.name.as_str()).expect("the ring record loads").with_cache(cache);
        let loaded = now_or_never(store.load()).expect("the memory log loads");
        for branch in &loaded.prepared {
            kv.in_doubt(branch.txid, &branch.redo);
        }
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
            reads: BTreeMap::new(),
            calls: BTreeMap::new(),
            enrolled: false,
            incarnation: 0,
            first_resolve: recovered > 0,
            run: ctx.rng().random::<u64>() | 1,
            disk_free: ctx.now,
            validating: BTreeSet::new(),
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
            Work::Engine(event) => {
                if let (Event::Validated { txid, .. }, Some(process)) = (&event, self.process.as_mut()) {
                    process.validating.remove(txid);
                }
                self.feed(ctx, event)
            }
            Work::Apply(disk) => self.write(ctx, disk, true),
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
                    let status = tonic::Status::aborted("the coordinator did not answer the enlistment");
                    pending.fail(ctx, self.node(), status);
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
                if process.validating.contains(&txid) {
                    ctx.stats.aborts_while_validating += 1;
                }
                process.abort_waiters.entry(txid).or_default().push((from, rpc, typed && !self.legacy));
                self.feed(ctx, Event::AbortRequested { txid });
            }
            Msg::Execute(rpc, txid, ops) => {
                let keys = kv::keys(&ops);
                let work = process.next_work;
                process.next_work += 1;
                let pending = PendingWork {
                    client: from,
                    rpc,
                    txid,
                    ops,
                    so_far: Vec::new(),
                    step: None,
                    put_up: false,
                };
                process.works.insert(work, pending);
                self.feed(ctx, Event::WorkRequested { txid, work, keys, at });
            }
            Msg::Step(rpc, txid, step) => self.step(ctx, from, rpc, txid, step),
            Msg::ScanMoving(rpc, request) => {
                let answer = migration::scan_routing(&request).and_then(|routing| {
                    migration::scan_moving(&process.kv, &routing, &request.after, request.limit)
                        .map_err(|e| tonic::Status::internal(e.to_string()))
                });
                ctx.send(self.node(), from, Msg::Scanned(rpc, answer));
            }
            Msg::Get(rpc, keys) => {
                let read = process.next_work;
                process.next_work += 1;
                process.reads.insert(read, (from, rpc, keys.clone()));
                self.feed(ctx, Event::ReadRequested { read, keys });
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
                        let status =
                            tonic::Status::aborted(format!("the coordinator refused to enlist: {reason}"));
                        pending.fail(ctx, self.node(), status);
                        self.feed(ctx, Event::WorkDone { txid, done: None, at });
                        self.feed(ctx, Event::AbortRequested { txid });
                    }
                }
            }
            Msg::Refused(rpc) => self.unanswered(ctx, rpc),
            other => ctx.trace(|| format!("p{} ignores {other}", self.index)),
        }
    }

    /// A batch's step, as `decree_participant::migration::step` runs it: an
    /// OUT step puts up the fence (taking over from an older batch of the
    /// same coordinator), then its keys are locked as the batch's work. A
    /// fence held by an older batch prepared here is refused at once (the
    /// real step waits up to two seconds for its decision to land first:
    /// that only spares the coordinator a retry, which is modelled here).
    fn step(&mut self, ctx: &mut Ctx, from: Node, rpc: u64, txid: TxId, step: v1::MigrationStep) {
        let at = self.instant(ctx.now);
        let node = self.node();
        let Some(process) = self.process.as_mut() else { return };
        let own = process.kv.ownership().clone();
        let (routing, out) = match migration::check_step(&own, &step) {
            Ok(checked) => checked,
            Err(status) => return ctx.send(node, from, Msg::Stepped(rpc, Err(status))),
        };
        let planted = !out && ctx.mutated(Mutation::NoFenceAtNewOwner);
        let put_up = match if planted { Ok(false) } else { own.fence(txid, &step.lo, &routing) } {
            Ok(put_up) => put_up,
            Err(refusal) => {
                let taken = match migration::superseded(&own, txid) {
                    Some(holder) if process.engine.supersede(holder) => {
                        own.release(holder);
                        own.fence(txid, &step.lo, &routing)
                    }
                    _ => Err(refusal),
                };
                match taken {
                    Ok(put_up) => put_up,
                    Err(refusal) => {
                        ctx.send(node, from, Msg::Stepped(rpc, Err(migration::refused(refusal))));
                        return self.execute(ctx);
                    }
                }
            }
        };
        let keys = if out {
            if ctx.crash_point(node, crash::MIGRATION_OUT_AFTER_FENCE) {
                return;
            }
            let hi = migration::range_end(&routing);
            let present = process.kv.keys_between(&step.lo, hi.as_deref()).expect("memory");
            let locked = process.engine.lock_table().into_iter().map(|entry| entry.key);
            migration::out_keys(&own, &routing, &step.lo, present.into_iter().map(|(k, _)| k), locked)
        } else {
            match migration::in_keys(&step) {
                Ok(keys) => keys,
                Err(status) => {
                    if put_up {
                        own.release(txid);
                    }
                    return ctx.send(node, from, Msg::Stepped(rpc, Err(status)));
                }
            }
        };
        let work = process.next_work;
        process.next_work += 1;
        let step = Some((step, out, keys.clone()));
        let pending =
            PendingWork { client: from, rpc, txid, ops: Vec::new(), so_far: Vec::new(), step, put_up };
        process.works.insert(work, pending);
        self.feed(ctx, Event::WorkRequested { txid, work, keys, at });
    }

    /// Granted work runs over the branch's work so far, as the KV service's Execute does.
    fn run_work(&mut self, ctx: &mut Ctx, pending: PendingWork) {
        let at = self.instant(ctx.now);
        let node = self.node();
        let Some(process) = self.process.as_mut() else { return };
        let PendingWork { client, rpc, txid, ops, so_far, step, .. } = pending;
        if let Some((step, out, keys)) = step {
            let (done, values) = if out {
                let values = migration::read_out(&process.kv, keys).expect("memory");
                let deleted = if ctx.mutated(Mutation::KeepMovedKeys) { &[][..] } else { &values[..] };
                (migration::out_done(deleted, &step, &so_far), values)
            } else {
                (migration::in_done(&step, &so_far), Vec::new())
            };
            ctx.send(node, client, Msg::Stepped(rpc, Ok(values)));
            return self.feed(ctx, Event::WorkDone { txid, done: Some(done), at });
        }
        // The keys are locked by this transaction: their owner cannot change unless it is here.
        if let Err(refusal) = process.kv.ownership().check_all(Some(txid), ops.iter().map(KvOp::key)) {
            ctx.send(node, client, Msg::Executed(rpc, Err(refusal.reason)));
            return self.feed(ctx, Event::WorkDone { txid, done: None, at });
        }
        let outcome = kv::ops(&so_far).and_then(|mut all| {
            all.extend(ops.iter().cloned());
            process.kv.evaluate(&all).map(drop)
        });
        match outcome {
            Ok(()) => {
                let done = v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: None }
                    .encode_to_vec();
                ctx.send(node, client, Msg::Executed(rpc, Ok(())));
                self.feed(ctx, Event::WorkDone { txid, done: Some(done), at });
            }
            Err(reason) => {
                ctx.send(node, client, Msg::Executed(rpc, Err(reason)));
                self.feed(ctx, Event::WorkDone { txid, done: None, at });
            }
        }
    }

    /// A read whose keys are unlocked (or that waited as long as it may), as
    /// the KV service's Get serves it: the keys this participant owns now,
    /// and a redirect for the others.
    fn read(&mut self, ctx: &mut Ctx, read: u64) {
        let (node, index) = (self.node(), self.index);
        let Some(process) = self.process.as_mut() else { return };
        let Some((client, rpc, keys)) = process.reads.remove(&read) else { return };
        let own = process.kv.ownership();
        let (mine, refused): (Vec<String>, Vec<String>) =
            keys.into_iter().partition(|key| own.check(None, key).is_ok());
        let redirect = refused.first().map(|first| {
            let code = own.check(None, first).err().map_or(decree_proto::Reason::Migrating, |r| r.code);
            (code, refused.clone())
        });
        let values: Vec<v1::KeyValue> = mine
            .into_iter()
            .map(|key| {
                let value = process.kv.get(&key).expect("memory");
                v1::KeyValue { key, value }
            })
            .collect();
        for kv in &values {
            ctx.ghost.read_served(ctx.now, index, &kv.key, kv.value.as_deref());
        }
        ctx.send(node, client, Msg::Got(rpc, values, redirect));
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
                ctx.ghost.applied_writes(&writes);
                now_or_never(process.store.log_commit(txid, writes, one_phase)).expect("memory");
                process.kv.committed(txid, &redo);
                ctx.ghost.applied_commit(ctx.now, self.index, txid, one_phase);
                if ctx.mutated(Mutation::AckBeforeDurable) && !one_phase {
                    return;
                }
                if ctx.crash_point(node, crash::PARTICIPANT_COMMIT_AFTER_APPLY) {
                    return;
                }
                self.feed(ctx, Event::CommitLogged { txid });
            }
            Disk::Abort { txid, prepared } => {
                now_or_never(process.kv.abort(txid)).expect("memory");
                now_or_never(process.store.log_abort(txid, prepared)).expect("memory");
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
                let result: Validated = process.kv.validate_for(Some(txid), &payload);
                process.validating.insert(txid);
                let after = match self.slow {
                    // Most validations take a few milliseconds; one in fifty
                    // waits on the resource's own locks, past the coordinator's
                    // deadline for the vote.
                    true if ctx.rng().random_bool(0.02) => ctx.rng().random_range(500 * MS..2 * SECOND),
                    true => ctx.rng().random_range(100..5 * MS),
                    false => 20,
                };
                self.schedule(ctx, after, Work::Engine(Event::Validated { txid, result }));
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
                let disk = Disk::Commit { txid, redo, one_phase };
                if self.slow {
                    // The resource commits first (in a task of the runtime), then the record is written.
                    let after = ctx.rng().random_range(100..5 * MS);
                    self.schedule(ctx, after, Work::Apply(disk));
                } else {
                    self.write(ctx, disk, true);
                }
            }
            Command::LogAbort { txid, prepared } => {
                if ctx.crash_point(node, crash::PARTICIPANT_ABORT_BEFORE_APPLY) {
                    return;
                }
                ctx.ghost.deciding_abort(ctx.now, self.index, txid, prepared);
                // Synced unless prepared: see `BranchLog::log_abort`.
                self.write(ctx, Disk::Abort { txid, prepared }, !prepared);
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
            Command::Read { read } => self.read(ctx, read),
            // The planted missing fence is masked by this refusal (the arriving keys are
            // locked by the prepared IN step): with the bug planted, reads are answered
            // as they were before the refusal, so the simulator still shows the fence's window.
            Command::RefuseRead { read, .. } if ctx.mutated(Mutation::NoFenceAtNewOwner) => {
                self.read(ctx, read)
            }
            Command::RefuseRead { read, .. } => {
                // Refused: the client reads again later (as a redirect makes it).
                let node = self.node();
                let Some(process) = self.process.as_mut() else { return };
                let Some((client, rpc, keys)) = process.reads.remove(&read) else { return };
                ctx.send(
                    node,
                    client,
                    Msg::Got(rpc, Vec::new(), Some((decree_proto::Reason::InDoubt, keys))),
                );
            }
            Command::WorkGranted { work, so_far, first } => {
                let Some(pending) = process.works.get_mut(&work) else { return };
                pending.so_far = so_far;
                if first {
                    let (txid, name, run) = (pending.txid, self.name.clone(), process.run);
                    self.call(ctx, Call::Enlist { work }, |rpc| Msg::Enlist(rpc, txid, name, run));
                } else if let Some(pending) = process.works.remove(&work) {
                    self.run_work(ctx, pending);
                }
            }
            Command::WorkRefused { work, code, reason, aborted } => {
                if let Some(pending) = process.works.remove(&work) {
                    if pending.step.is_some() && migration::fence_goes(pending.put_up, code, aborted) {
                        process.kv.ownership().release(pending.txid);
                    }
                    pending.fail(ctx, node, wire::work_refused(code, reason, aborted));
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
