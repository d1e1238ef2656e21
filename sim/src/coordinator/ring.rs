//! The simulated coordinator's ring and migration task, driven as
//! `coordinator/src/membership.rs` drives them, over the same decisions
//! (`decree_coordinator::migration`): a change is checked by `plan` and
//! recorded (synced) before it counts; each batch scans the old owners for
//! its end, begins a transaction, records it (synced), runs the OUT steps at
//! every old owner and then the IN steps at every new one, and commits; its
//! cursor is recorded unsynced (start rebuilds it from the decision); a batch
//! left by an earlier incarnation is aborted at every member first.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use decree_coordinator::engine::{Decided, Event};
use decree_coordinator::migration::{self as decide, Change};
use decree_coordinator::store::{Recorded, RingRecord};
use decree_coordinator::Role;
use decree_proto::ring::{Cursor, Move, Routing};
use decree_proto::{v1, TxId};
use decree_runtime::backoff::{Backoff, Jitter};
use decree_runtime::crash;
use decree_runtime::storage::now_or_never;

use super::{index, Call, Coordinator, Disk, Work, IDLE_TIMEOUT, PREPARE_TIMEOUT};
use crate::{Ctx, Item, Msg, Mutation, Node, Time, SECOND};

/// How long one step of a batch may take at a participant.
const STEP_TIMEOUT: Time = 2 * SECOND;
/// A participant heard from within this long is up (the registry's liveness window).
const LIVENESS: Time = 2 * SECOND;
const BACKOFF: Backoff =
    Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(3), jitter: Jitter::Half };

/// Where the migration task is.
#[derive(Debug)]
pub enum Driver {
    /// Nothing under way: looks for work after every event.
    Idle,
    /// Waiting for a record write or a backoff timer.
    Waiting,
    /// Aborting, at every member, a batch an earlier incarnation left undecided.
    Ending {
        txid: TxId,
        pending: BTreeSet<u64>,
    },
    Scanning {
        lo: String,
        pending: BTreeSet<u64>,
        ends: Vec<Option<String>>,
    },
    Out {
        txid: TxId,
        step: Routing,
        lo: String,
        pending: BTreeSet<u64>,
        leaving: Vec<v1::KeyValue>,
    },
    In {
        txid: TxId,
        step: Routing,
        keys: u64,
        pending: BTreeSet<u64>,
    },
    Committing {
        txid: TxId,
        step: Routing,
        keys: u64,
    },
}

/// What the task does once a ring record write is done.
#[derive(Debug)]
pub enum Then {
    Changed,
    Cleared,
    BatchRecorded {
        txid: TxId,
        step: Routing,
        lo: String,
    },
    BatchSaved {
        step: Routing,
    },
    Finished,
    /// A failed batch forgotten: the backoff's timer drives again.
    Failed,
}

/// What a participant answered a call of the task.
#[derive(Debug)]
pub enum Answer {
    None,
    End(Option<String>),
    Values(Vec<v1::KeyValue>),
}

impl Coordinator {
    /// The ring at start: the recorded one (a batch committed before the
    /// crash taking effect), or, on the very first start, the ring the run
    /// begins with.
    pub(super) fn ring_at_start(
        &self,
        store: &decree_coordinator::store::DecisionLog<decree_runtime::MemLog>,
        recovered: Option<RingRecord>,
    ) -> RingRecord {
        let mut record = recovered.unwrap_or_else(|| {
            let record = RingRecord { routing: Some(self.initial.to_wire()), ..RingRecord::default() };
            now_or_never(store.save_ring(&record)).expect("memory");
            record
        });
        if let Ok(txid) = record.batch.parse::<TxId>() {
            let committed = store.recorded(txid).expect("memory") == Recorded::Committed;
            if decide::settle_at_start(&mut record, committed) {
                now_or_never(store.save_ring(&record)).expect("memory");
            }
        }
        record
    }

    /// Where every key lives, as the coordinator says (`None`: it is down).
    pub fn routing(&self) -> Option<Arc<Routing>> {
        self.process.as_ref().map(|p| p.routing.clone())
    }

    /// The migration task's state, for the liveness check.
    pub fn driver(&self) -> Option<&Driver> {
        self.process.as_ref().map(|p| &p.driver)
    }

    /// An operator's ring change: checked and, if safe, recorded (synced)
    /// before its migration starts. Refused with the reason otherwise.
    pub fn ring_change(&mut self, ctx: &mut Ctx, change: &Change) -> Result<(), String> {
        let now = ctx.now;
        let Some(process) = self.process.as_mut() else { return Err("the coordinator is down".into()) };
        if process.ring_write {
            return Err("the ring record is being written".into());
        }
        let known = &self.participants;
        let heard = &process.heard;
        let status = |name: &decree_proto::ParticipantName| {
            known.contains(name).then(|| {
                let up = heard.get(name).is_some_and(|at| now.saturating_sub(*at) <= LIVENESS);
                (Role::Member, up)
            })
        };
        let next = decide::plan(&process.routing, change, status).map_err(|e| e.to_string())?;
        let mut record = process.record.clone();
        record.routing = Some(next.to_wire());
        record.migration = Some(v1::Migration { change: change.to_string(), ..v1::Migration::default() });
        self.write_ring(ctx, record, true, Then::Changed);
        Ok(())
    }

    fn write_ring(&mut self, ctx: &mut Ctx, record: RingRecord, synced: bool, then: Then) {
        let Some(process) = self.process.as_mut() else { return };
        process.ring_write = true;
        if matches!(process.driver, Driver::Idle) {
            process.driver = Driver::Waiting;
        }
        self.write(ctx, Disk::Ring { record: Box::new(record), synced, then: Box::new(then) }, synced);
    }

    pub(super) fn ring_written(&mut self, ctx: &mut Ctx, record: RingRecord, synced: bool, then: Then) {
        let Some(process) = self.process.as_mut() else { return };
        let store = &process.store;
        if synced {
            now_or_never(store.save_ring(&record)).expect("memory");
        } else {
            now_or_never(store.save_ring_unsynced(&record)).expect("memory");
        }
        process.ring_write = false;
        process.record = record;
        match then {
            Then::Changed => {
                let routing = process.record.routing.as_ref().map(Routing::from_wire).unwrap_or_default();
                ctx.trace(|| {
                    format!("coord ring epoch {} recorded: {:?}", routing.epoch, process.record.migration)
                });
                process.routing = Arc::new(routing);
                ctx.stats.ring_changes += 1;
                if matches!(process.driver, Driver::Waiting) {
                    process.driver = Driver::Idle;
                }
            }
            Then::Cleared => process.driver = Driver::Idle,
            Then::BatchRecorded { txid, step, lo } => {
                let wire = step.to_wire();
                let mut pending = BTreeSet::new();
                for name in step.current.names().to_vec() {
                    let request = decide::step(v1::migration_step::Direction::Out, &wire, &lo, Vec::new());
                    pending.insert(self.ring_call(ctx, &name, |rpc| Msg::Step(rpc, txid, request)));
                }
                let Some(process) = self.process.as_mut() else { return };
                process.driver = Driver::Out { txid, step, lo, pending, leaving: Vec::new() };
            }
            Then::BatchSaved { step } => {
                process.routing = Arc::new(step);
                process.driver = Driver::Idle;
            }
            Then::Failed => {}
            Then::Finished => {
                let routing = process.record.routing.as_ref().map(Routing::from_wire).unwrap_or_default();
                ctx.trace(|| format!("coord migration done: ring {:?}", routing.current.names()));
                process.routing = Arc::new(routing);
                process.driver = Driver::Idle;
                ctx.stats.migrations += 1;
            }
        }
        self.drive(ctx);
    }

    fn ring_call(&mut self, ctx: &mut Ctx, to: &str, msg: impl FnOnce(u64) -> Msg) -> u64 {
        let rpc = ctx.rpc();
        let epoch = self.epoch;
        if let Some(process) = self.process.as_mut() {
            process.calls.insert(rpc, Call::Ring);
        }
        let to = index(&to.parse().expect("a member's name"));
        ctx.send(Node::Coordinator, Node::Participant(to), msg(rpc));
        ctx.schedule(STEP_TIMEOUT, Item::Coordinator { epoch, work: Work::Deadline(rpc) });
        rpc
    }

    /// Looks for the migration's next move when nothing is under way.
    pub(super) fn drive(&mut self, ctx: &mut Ctx) {
        let incarnation = match &self.process {
            Some(p) if matches!(p.driver, Driver::Idle) && !p.ring_write => p.incarnation,
            _ => return,
        };
        let process = self.process.as_mut().expect("checked");
        let routing = process.routing.clone();
        let Some(Move { cursor, .. }) = routing.migration.clone() else { return };
        if let Ok(txid) = process.record.batch.parse::<TxId>() {
            // A batch begun and not decided: it can never commit (presumed abort).
            let mut record = process.record.clone();
            record.batch.clear();
            record.batch_routing = None;
            let recorded = process.store.recorded(txid).expect("memory");
            if txid.incarnation == incarnation {
                let _ = process.engine.on_event(Event::AbortRequested { txid });
                self.execute(ctx);
                return self.write_ring(ctx, record, true, Then::Cleared);
            }
            if recorded != Recorded::Absent {
                // Decided: recovery redelivers its Commits; running the batch again moves nothing twice.
                return self.write_ring(ctx, record, true, Then::Cleared);
            }
            let mut pending = BTreeSet::new();
            for name in decide::members(&routing) {
                let msg = |rpc| Msg::Abort(rpc, txid, true);
                pending.insert(self.ring_call(ctx, &name, msg));
            }
            if let Some(process) = self.process.as_mut() {
                process.driver = Driver::Ending { txid, pending };
            }
            return;
        }
        let lo = match cursor {
            Cursor::End => {
                let mut record = process.record.clone();
                decide::finished(&mut record, 0);
                return self.write_ring(ctx, record, true, Then::Finished);
            }
            Cursor::Key(lo) => lo,
        };
        let wire = routing.to_wire();
        let limit = self.batch_keys;
        let mut pending = BTreeSet::new();
        for name in routing.current.names().to_vec() {
            let request = v1::ScanMovingRequest { routing: Some(wire.clone()), after: lo.clone(), limit };
            pending.insert(self.ring_call(ctx, &name, |rpc| Msg::ScanMoving(rpc, request)));
        }
        if let Some(process) = self.process.as_mut() {
            process.driver = Driver::Scanning { lo, pending, ends: Vec::new() };
        }
    }

    /// A participant's answer to a call of the task.
    pub(super) fn ring_reply(&mut self, ctx: &mut Ctx, rpc: u64, answer: Result<Answer, String>) {
        let Some(process) = self.process.as_mut() else { return };
        if let Some(Call::Ring) = process.calls.remove(&rpc) {
            self.ring_step(ctx, rpc, answer);
        }
    }

    pub(super) fn ring_step(&mut self, ctx: &mut Ctx, rpc: u64, answer: Result<Answer, String>) {
        let Some(process) = self.process.as_mut() else { return };
        let pending = match &mut process.driver {
            Driver::Ending { pending, .. }
            | Driver::Scanning { pending, .. }
            | Driver::Out { pending, .. }
            | Driver::In { pending, .. } => pending,
            _ => return,
        };
        if !pending.remove(&rpc) {
            return;
        }
        let answer = match answer {
            Ok(answer) => answer,
            Err(why) => return self.batch_failed(ctx, why),
        };
        match (&mut process.driver, answer) {
            (Driver::Scanning { ends, .. }, Answer::End(end)) => ends.push(end),
            (Driver::Out { leaving, .. }, Answer::Values(values)) => leaving.extend(values),
            _ => {}
        }
        let done = match &process.driver {
            Driver::Ending { pending, .. }
            | Driver::Scanning { pending, .. }
            | Driver::Out { pending, .. }
            | Driver::In { pending, .. } => pending.is_empty(),
            _ => false,
        };
        if done {
            self.ring_next(ctx);
        }
    }

    /// Every call of the task's current phase answered: the next phase.
    fn ring_next(&mut self, ctx: &mut Ctx) {
        let Some(process) = self.process.as_mut() else { return };
        match std::mem::replace(&mut process.driver, Driver::Waiting) {
            Driver::Ending { txid, .. } => {
                ctx.trace(|| format!("coord aborted the batch {txid} left by an earlier start"));
                let mut record = process.record.clone();
                record.batch.clear();
                record.batch_routing = None;
                self.write_ring(ctx, record, true, Then::Cleared);
            }
            Driver::Scanning { lo, ends, .. } => {
                let routing = process.routing.clone();
                let Some(Move { target, .. }) = &routing.migration else { return };
                let step = decide::batch_routing(&routing, target, decide::batch_end(ends));
                let txid = TxId::new(process.id, process.incarnation, process.next_sequence);
                process.next_sequence += 1;
                let idle_timeout = IDLE_TIMEOUT;
                process.engine.on_event(Event::Begin { txid, idle_timeout }).expect("fresh txid");
                let mut record = process.record.clone();
                record.batch = txid.to_string();
                record.batch_routing = Some(step.to_wire());
                ctx.trace(|| {
                    format!("coord batch {txid}: [{lo:?}, {:?})", step.migration.as_ref().map(|m| &m.cursor))
                });
                self.execute(ctx);
                self.write_ring(ctx, record, true, Then::BatchRecorded { txid, step, lo });
            }
            Driver::Out { txid, step, lo, leaving, .. } => {
                if ctx.crash_point(Node::Coordinator, crash::MIGRATION_BATCH_AFTER_OUT) {
                    return;
                }
                let Some(Move { target, .. }) = &step.migration else { return };
                let (mut arriving, keys, _) = match decide::arrivals(leaving, target) {
                    Ok(arrivals) => arrivals,
                    Err(why) => return self.batch_failed(ctx, why),
                };
                let wire = step.to_wire();
                let mut pending = BTreeSet::new();
                for name in target.names().to_vec() {
                    let entries = arriving.remove(&name).unwrap_or_default();
                    let request = decide::step(v1::migration_step::Direction::In, &wire, &lo, entries);
                    pending.insert(self.ring_call(ctx, &name, |rpc| Msg::Step(rpc, txid, request)));
                }
                if let Some(process) = self.process.as_mut() {
                    process.driver = Driver::In { txid, step, keys, pending };
                }
            }
            Driver::In { txid, step, keys, .. } => {
                let timeout = Duration::from_micros(PREPARE_TIMEOUT);
                match process.engine.on_event(Event::CommitRequested { txid, timeout }) {
                    Ok(()) => {
                        if ctx.mutated(Mutation::CursorBeforeCommit) {
                            process.routing = Arc::new(step.clone());
                        }
                        process.replies.insert(txid, (Node::Coordinator, 0));
                        process.driver = Driver::Committing { txid, step, keys };
                        self.execute(ctx);
                    }
                    Err(err) => self.batch_failed(ctx, format!("batch {txid}: {err}")),
                }
            }
            other => process.driver = other,
        }
    }

    /// The batch's transaction was decided.
    pub(super) fn batch_decided(&mut self, ctx: &mut Ctx, txid: TxId, decided: Decided) {
        let Some(process) = self.process.as_mut() else { return };
        let Driver::Committing { txid: batch, .. } = &process.driver else { return };
        if *batch != txid {
            return;
        }
        let Driver::Committing { step, keys, .. } = std::mem::replace(&mut process.driver, Driver::Waiting)
        else {
            unreachable!("matched above")
        };
        if !matches!(decided, Decided::Committed) {
            return self.batch_failed(ctx, format!("batch {txid}: {decided:?}"));
        }
        if ctx.crash_point(Node::Coordinator, crash::MIGRATION_BATCH_AFTER_DECISION) {
            return;
        }
        ctx.stats.batches += 1;
        ctx.stats.moved_keys += keys;
        let Some(process) = self.process.as_mut() else { return };
        let mut record = process.record.clone();
        decide::batch_committed(&mut record, &step, keys, 0);
        // Not synced: lost in a crash, start rebuilds it from the decision and `batch_routing`.
        self.write_ring(ctx, record, false, Then::BatchSaved { step });
    }

    /// A batch failed: it is aborted, forgotten in the record, and tried again after a backoff.
    fn batch_failed(&mut self, ctx: &mut Ctx, why: String) {
        let epoch = self.epoch;
        let Some(process) = self.process.as_mut() else { return };
        ctx.trace(|| format!("coord migration batch failed: {why}"));
        ctx.stats.batch_failures += 1;
        let txid = match std::mem::replace(&mut process.driver, Driver::Waiting) {
            Driver::Out { txid, .. } | Driver::In { txid, .. } | Driver::Committing { txid, .. } => {
                Some(txid)
            }
            _ => None,
        };
        let failures = ctx.stats.batch_failures;
        let delay = BACKOFF.delay((failures % 5) as u32, ctx.rng());
        ctx.schedule(delay.as_micros() as Time, Item::Coordinator { epoch, work: Work::Drive });
        if let Some(txid) = txid {
            let _ = process.engine.on_event(Event::AbortRequested { txid });
            process.replies.remove(&txid);
            let mut record = process.record.clone();
            record.batch.clear();
            record.batch_routing = None;
            self.execute(ctx);
            self.write_ring(ctx, record, true, Then::Failed);
        }
    }
}
