//! The simulated coordinator: its engine and decision log (over memory),
//! driven as `coordinator/src/runtime.rs` drives them: each command becomes
//! a message, a disk write on the node's FIFO disk, or a timer, and each
//! answer goes back to the engine through the same `wire` conversions.
//! Begin and each new Enlist are answered once their `a/` record lands, as
//! the runtime answers them once durable, so an interactive transaction
//! outlives a restart or a failover with its enlisted branches.
//!
//! As a **group** (a third of the seeds), it is the leader of a replicated
//! coordinator, as `coordinator/src/group.rs` runs one: it names each
//! one-shot transaction's txid to its client at once (`announce_txid`), so
//! `GetOutcome` of a txid it holds nothing of asks every participant (a
//! one-phase branch may have committed), and each write is durable
//! only once a follower holds it too (the leader's fsync, and a follower's
//! a round trip away), whatever durability the store asked for. Losing the
//! leader (its process, its machine, or a crash point) is a failover, not
//! a restart on the same disk: the next leader's state holds every write
//! the old one saw finish and, of those still replicating, a prefix the
//! seed picks (Raft's next leader commits some prefix of the old leader's
//! log, perhaps none of its unanswered entries); the rest are gone. It
//! takes over after an election (the restart's delay) with a new
//! incarnation, recovering as a restarted coordinator does. A deposed
//! leader that keeps running cut off from the group is not modelled here:
//! its writes never finish, so it decides nothing, and the real-process
//! test `a_leader_cut_off_from_the_others_decides_nothing_while_clients_reach_it`
//! checks that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_coordinator::engine::{Command, Engine, Event};
use decree_coordinator::retention::Window;
use decree_coordinator::store::{DecisionLog, RingRecord};
use decree_coordinator::wire::{self, Unanswered};
use decree_proto::ring::Routing;
use decree_proto::{v1, ParticipantName, TxId};
use decree_runtime::backoff::{Backoff, Jitter};
use decree_runtime::crash;
use decree_runtime::storage::now_or_never;
use decree_runtime::MemLog;
use rand::Rng;

use crate::check::Retention;
use crate::{Ctx, Item, Msg, Mutation, Node, Time, MS, SECOND};

mod ring;
pub use ring::Driver;

const PREPARE_TIMEOUT: Time = SECOND;
/// Deadline of a Commit or Abort RPC.
const CALL_TIMEOUT: Time = 500 * MS;
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
const PRUNE_INTERVAL: Time = 200 * MS;
const REDELIVERY: Backoff =
    Backoff { base: Duration::from_millis(20), cap: Duration::from_secs(1), jitter: Jitter::Half };

/// What the coordinator does by itself (not a message).
#[derive(Debug)]
pub enum Work {
    Engine(Event),
    /// A disk write finished.
    Disk(Disk),
    /// A call's deadline passed.
    Deadline(u64),
    Prune,
    /// The migration task's turn (after a backoff).
    Drive,
}

#[derive(Debug)]
pub enum Disk {
    Decision {
        txid: TxId,
        participants: Vec<ParticipantName>,
    },
    OnePhase {
        txid: TxId,
        participant: ParticipantName,
        in_doubt: bool,
    },
    InDoubt {
        txid: TxId,
        participant: ParticipantName,
    },
    OnePhaseAborted {
        txid: TxId,
    },
    OnePhaseForgotten {
        txid: TxId,
    },
    End {
        txid: TxId,
    },
    /// An interactive transaction begun (idle deadline in simulated ms);
    /// Began goes to `to` once it lands.
    Begin {
        txid: TxId,
        deadline_ms: u64,
        to: Node,
        rpc: u64,
    },
    /// A participant enlisted; Enlisted goes to `to` once it lands.
    Enlist {
        txid: TxId,
        participant: ParticipantName,
        run: u64,
        to: Node,
        rpc: u64,
    },
    /// An interactive transaction left the active state.
    ForgetActive {
        txid: TxId,
    },
    /// The ring record, and what the migration task does once it is written.
    Ring {
        record: Box<RingRecord>,
        synced: bool,
        then: Box<ring::Then>,
    },
}

/// The answer to `GetOutcome`, unless a planted bug changes it.
fn presumed(ctx: &Ctx, outcome: v1::Outcome) -> v1::Outcome {
    if ctx.mutated(Mutation::PresumeCommit) && outcome == v1::Outcome::Aborted {
        return v1::Outcome::Committed;
    }
    outcome
}

/// A call in flight to a participant.
#[derive(Debug)]
enum Call {
    Prepare {
        txid: TxId,
        participant: ParticipantName,
    },
    Commit {
        txid: TxId,
        participant: ParticipantName,
        recovery: bool,
    },
    Abort,
    Resolve {
        txid: TxId,
    },
    /// An Abort asking about a txid a group's leader holds nothing of, for
    /// the `GetOutcome` call `query` (see [`Asking`]).
    Ask {
        query: u64,
    },
    /// A call of the migration task.
    Ring,
}

/// A process's memory: gone with it.
struct Process {
    engine: Engine,
    store: DecisionLog<MemLog>,
    id: u32,
    incarnation: u64,
    next_sequence: u64,
    calls: BTreeMap<u64, Call>,
    /// Clients waiting for a decision: their node and call id.
    replies: BTreeMap<TxId, (Node, u64)>,
    window: Window,
    disk_free: Time,
    /// The ring record as last written, its routing, and the migration task.
    record: RingRecord,
    routing: Arc<Routing>,
    driver: Driver,
    /// A ring record write in flight (the runtime holds the record's lock across it).
    ring_write: bool,
    /// When each participant was last heard from (enroll or heartbeat).
    heard: BTreeMap<ParticipantName, Time>,
    /// `GetOutcome` calls waiting for the participants' answers, by query.
    asking: BTreeMap<u64, Asking>,
}

/// A group leader's `GetOutcome` of a txid it holds nothing of, as
/// `Handle::outcome` answers one: every participant is asked to abort it.
struct Asking {
    /// The client and its call.
    from: Node,
    rpc: u64,
    waiting: usize,
    found: Vec<decree_coordinator::engine::OnePhaseFound>,
}

pub struct Coordinator {
    /// The decision log; a group's replicated state, which no failover loses.
    disk: MemLog,
    /// The leader of a coordinator group (see the module).
    group: bool,
    process: Option<Process>,
    epoch: u64,
    participants: Vec<ParticipantName>,
    retention: Retention,
    /// The ring recorded before the run (as if its members had joined).
    initial: Routing,
    /// Keys per migration batch, by the seed.
    batch_keys: u32,
    /// Time zero of the simulated clock, as an Instant (the engines want Instants).
    base: Instant,
}

pub fn name(p: usize) -> ParticipantName {
    format!("p{p}").parse().expect("a valid name")
}

pub fn index(name: &ParticipantName) -> usize {
    name.as_str()[1..].parse().expect("named by name()")
}

impl Coordinator {
    pub fn start(
        ctx: &mut Ctx,
        participants: usize,
        retention: Retention,
        initial: Routing,
        batch_keys: u32,
        group: bool,
    ) -> Coordinator {
        let mut coordinator = Coordinator {
            disk: MemLog::new(),
            group,
            process: None,
            epoch: 0,
            participants: (0..participants).map(name).collect(),
            retention,
            initial,
            batch_keys,
            base: Instant::now(),
        };
        coordinator.boot(ctx, coordinator.disk.clone());
        coordinator
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

    pub fn engine(&self) -> Option<&Engine> {
        self.process.as_ref().map(|p| &p.engine)
    }

    fn instant(&self, at: Time) -> Instant {
        self.base + Duration::from_micros(at)
    }

    fn boot(&mut self, ctx: &mut Ctx, disk: MemLog) {
        let id: u32 = ctx.rng().random();
        let (store, recovered) =
            now_or_never(DecisionLog::open_with_id(disk, || id)).expect("the memory log opens");
        ctx.trace(|| {
            format!(
                "coord starts: incarnation {} unfinished {}",
                recovered.incarnation,
                recovered.unfinished.len()
            )
        });
        let record = self.ring_at_start(&store, recovered.ring.clone());
        let routing = Arc::new(record.routing.as_ref().map(Routing::from_wire).unwrap_or_default());
        let next = TxId::new(recovered.coordinator_id, recovered.incarnation, 1);
        let window = Window::new(self.retention.coordinator, self.instant(ctx.now), next, store.ended());
        let mut process = Process {
            engine: Engine::new(),
            store,
            id: recovered.coordinator_id,
            incarnation: recovered.incarnation,
            next_sequence: 1,
            calls: BTreeMap::new(),
            replies: BTreeMap::new(),
            window,
            disk_free: ctx.now,
            record,
            routing,
            driver: Driver::Idle,
            ring_write: false,
            heard: BTreeMap::new(),
            asking: BTreeMap::new(),
        };
        for (txid, participants) in recovered.unfinished {
            process.engine.on_event(Event::Recovered { txid, participants }).expect("distinct decisions");
        }
        for active in recovered.active {
            let idle_remaining = Duration::from_micros((active.deadline_ms * MS).saturating_sub(ctx.now));
            let (txid, enlisted) = (active.txid, active.enlisted);
            if let Err(err) =
                process.engine.on_event(Event::RecoveredActive { txid, enlisted, idle_remaining })
            {
                ctx.violation("recovery", format!("an active transaction found twice: {err}"));
            }
        }
        for (txid, participant) in recovered.one_phase_in_doubt {
            if let Err(err) = process.engine.on_event(Event::RecoveredOnePhase { txid, participant }) {
                // Only a planted bug writes both a decision and a one-phase question for one txid.
                ctx.violation("recovery", format!("the decision log contradicts itself: {err}"));
            }
        }
        self.process = Some(process);
        ctx.ghost.coordinator_id = recovered.coordinator_id;
        ctx.schedule(PRUNE_INTERVAL, Item::Coordinator { epoch: self.epoch, work: Work::Prune });
        self.execute(ctx);
        self.drive(ctx);
    }

    pub fn crash(&mut self, ctx: &mut Ctx, machine: bool) {
        if self.group {
            return self.fail_over(ctx);
        }
        self.process = None;
        self.epoch += 1;
        self.disk = if machine {
            let keep = ctx.rng().random_range(0..=self.disk.unsynced_batches());
            self.disk.crash_machine(keep)
        } else {
            self.disk.crash_process()
        };
    }

    /// The group's leader is lost (see the module): of its writes still
    /// replicating, in the order it proposed them, the next leader holds a
    /// prefix the seed picks. A ring record ends the prefix (the migration
    /// task that wrote it is gone: the next leader resumes from what is
    /// recorded).
    fn fail_over(&mut self, ctx: &mut Ctx) {
        let Some(process) = self.process.take() else { return };
        let epoch = self.epoch;
        self.epoch += 1;
        let replicating: Vec<(Time, u64)> = ctx
            .queue
            .iter()
            .filter(|(_, item)| matches!(item, Item::Coordinator { epoch: e, work: Work::Disk(_) } if *e == epoch))
            .map(|(at, _)| *at)
            .collect();
        let in_flight: Vec<Disk> = replicating
            .into_iter()
            .filter_map(|at| match ctx.queue.remove(&at) {
                Some(Item::Coordinator { work: Work::Disk(disk), .. }) => Some(disk),
                _ => None,
            })
            .collect();
        let held = ctx.rng().random_range(0..=in_flight.len());
        let mut kept = 0;
        for disk in in_flight.iter().take(held) {
            if !land(ctx, &process.store, disk) {
                break;
            }
            kept += 1;
        }
        let dropped = in_flight.len() - kept;
        ctx.stats.leader_changes += 1;
        ctx.stats.replicating_kept += kept as u64;
        ctx.stats.replicating_lost += dropped as u64;
        ctx.trace(|| {
            format!("coord: leader lost; the next holds {kept} of its {} writes replicating", in_flight.len())
        });
    }

    pub fn restart(&mut self, ctx: &mut Ctx) {
        let disk = self.disk.clone();
        self.boot(ctx, disk);
    }

    fn dying(ctx: &Ctx) -> bool {
        ctx.dying == Some(Node::Coordinator)
    }

    /// The engine takes `event`; its commands run.
    fn feed(&mut self, ctx: &mut Ctx, event: Event) {
        let Some(process) = self.process.as_mut() else { return };
        if let Err(err) = process.engine.on_event(event) {
            ctx.trace(|| format!("coord engine refused an event: {err}"));
        }
        self.execute(ctx);
    }

    pub fn work(&mut self, ctx: &mut Ctx, work: Work) {
        match work {
            Work::Engine(event) => self.feed(ctx, event),
            Work::Disk(disk) => self.disk_done(ctx, disk),
            Work::Deadline(rpc) => self.answered(ctx, rpc, Err(Unanswered::Deadline), None),
            Work::Prune => self.prune(ctx),
            Work::Drive => {
                if let Some(process) = self.process.as_mut() {
                    if matches!(process.driver, Driver::Waiting) {
                        process.driver = Driver::Idle;
                    }
                }
                self.drive(ctx);
            }
        }
    }

    fn prune(&mut self, ctx: &mut Ctx) {
        let now = self.instant(ctx.now);
        let Some(process) = self.process.as_mut() else { return };
        let next = TxId::new(process.id, process.incarnation, process.next_sequence);
        let ended = process.store.ended();
        if let Some(horizon) = process.window.tick(now, next, ended) {
            // The in-memory horizon rises now; the batch lands like any unsynced write.
            now_or_never(process.store.forget_before(horizon)).expect("memory");
            ctx.trace(|| format!("coord forgets outcomes below {horizon}"));
        }
        ctx.schedule(PRUNE_INTERVAL, Item::Coordinator { epoch: self.epoch, work: Work::Prune });
    }

    fn disk_done(&mut self, ctx: &mut Ctx, disk: Disk) {
        let Some(process) = self.process.as_mut() else { return };
        if let Disk::Ring { record, synced, then } = disk {
            return self.ring_written(ctx, *record, synced, *then);
        }
        land(ctx, &process.store, &disk);
        match disk {
            Disk::Decision { txid, .. } => {
                if ctx.mutated(Mutation::CommitBeforeDurable) {
                    return; // the engine heard already
                }
                if ctx.crash_point(Node::Coordinator, crash::COORDINATOR_DECISION_AFTER_LOG) {
                    return;
                }
                self.feed(ctx, Event::DecisionLogged { txid });
            }
            Disk::InDoubt { txid, .. } => self.feed(ctx, Event::OnePhaseInDoubtLogged { txid }),
            Disk::Begin { txid, to, rpc, .. } => ctx.send(Node::Coordinator, to, Msg::Began(rpc, Ok(txid))),
            Disk::Enlist { to, rpc, .. } => ctx.send(Node::Coordinator, to, Msg::Enlisted(rpc, Ok(()))),
            _ => {}
        }
    }

    /// Queues a write on the node's disk: FIFO, like the log's writer thread
    /// (a group's: proposed in order, done once replicated).
    fn write(&mut self, ctx: &mut Ctx, disk: Disk, synced: bool) {
        let Some(process) = self.process.as_mut() else { return };
        let after = if self.group {
            ctx.replicated_write(&mut process.disk_free)
        } else {
            ctx.disk_write(&mut process.disk_free, synced)
        };
        ctx.schedule(after, Item::Coordinator { epoch: self.epoch, work: Work::Disk(disk) });
    }

    /// Asks every participant to abort `txid`, and answers the client's
    /// `GetOutcome` call `rpc` once all have answered (see [`Asking`]).
    fn ask_every_participant(&mut self, ctx: &mut Ctx, from: Node, rpc: u64, txid: TxId) {
        let Some(process) = self.process.as_mut() else { return };
        let query = ctx.rpc();
        let asking = Asking { from, rpc, waiting: self.participants.len(), found: Vec::new() };
        process.asking.insert(query, asking);
        for participant in self.participants.clone() {
            let call = Call::Ask { query };
            self.call(ctx, participant, call, |rpc| Msg::Abort(rpc, txid, true), CALL_TIMEOUT);
        }
        if self.participants.is_empty() {
            ctx.send(Node::Coordinator, from, Msg::Outcome(rpc, Ok(v1::Outcome::Aborted)));
        }
    }

    fn call(
        &mut self,
        ctx: &mut Ctx,
        to: ParticipantName,
        call: Call,
        msg: impl FnOnce(u64) -> Msg,
        deadline: Time,
    ) {
        let rpc = ctx.rpc();
        let Some(process) = self.process.as_mut() else { return };
        process.calls.insert(rpc, call);
        ctx.send(Node::Coordinator, Node::Participant(index(&to)), msg(rpc));
        ctx.schedule(deadline, Item::Coordinator { epoch: self.epoch, work: Work::Deadline(rpc) });
    }

    fn execute(&mut self, ctx: &mut Ctx) {
        loop {
            let Some(process) = self.process.as_mut() else { return };
            let commands = process.engine.take_commands();
            if commands.is_empty() {
                return;
            }
            let prepares = commands.iter().filter(|c| matches!(c, Command::SendPrepare { .. })).count();
            let commits =
                commands.iter().filter(|c| matches!(c, Command::SendCommit { recovery: false, .. })).count();
            let (mut sent_prepares, mut sent_commits) = (0, 0);
            for command in commands {
                if Self::dying(ctx) || self.process.is_none() {
                    return;
                }
                if sent_prepares == 1 && prepares > 1 {
                    sent_prepares += 1;
                    if ctx.crash_point(Node::Coordinator, crash::COORDINATOR_PREPARE_PARTIAL_FANOUT) {
                        return;
                    }
                }
                if sent_commits == 1 && commits > 1 {
                    sent_commits += 1;
                    if ctx.crash_point(Node::Coordinator, crash::COORDINATOR_COMMIT_PARTIAL_FANOUT) {
                        return;
                    }
                }
                match &command {
                    Command::SendPrepare { .. } => sent_prepares += 1,
                    Command::SendCommit { recovery: false, .. } => sent_commits += 1,
                    _ => {}
                }
                self.command(ctx, command);
            }
        }
    }

    fn command(&mut self, ctx: &mut Ctx, command: Command) {
        let epoch = self.epoch;
        let Some(process) = self.process.as_mut() else { return };
        let incarnation = process.incarnation;
        match command {
            Command::SendPrepare { txid, participant, payload, one_phase, interactive } => {
                let request = wire::prepare_request(txid, payload, one_phase, interactive, incarnation);
                let call = Call::Prepare { txid, participant: participant.clone() };
                self.call(ctx, participant, call, |rpc| Msg::Prepare(rpc, request), PREPARE_TIMEOUT);
            }
            Command::LogDecision { txid, participants } => {
                if ctx.crash_point(Node::Coordinator, crash::COORDINATOR_DECISION_BEFORE_LOG) {
                    return;
                }
                if ctx.mutated(Mutation::CommitBeforeDurable) {
                    // Planted: the engine hears "durable" before the write is.
                    ctx.schedule(
                        0,
                        Item::Coordinator { epoch, work: Work::Engine(Event::DecisionLogged { txid }) },
                    );
                }
                self.write(ctx, Disk::Decision { txid, participants }, true);
            }
            Command::LogOnePhaseCommit { txid, participant, in_doubt } => {
                self.write(ctx, Disk::OnePhase { txid, participant, in_doubt }, in_doubt);
            }
            Command::LogOnePhaseInDoubt { txid, participant } => {
                self.write(ctx, Disk::InDoubt { txid, participant }, true);
            }
            Command::LogOnePhaseAborted { txid } => self.write(ctx, Disk::OnePhaseAborted { txid }, true),
            Command::LogOnePhaseForgotten { txid } => {
                ctx.trace(|| format!("coord: {txid}'s participant forgot its outcome: FORGOTTEN"));
                ctx.stats.forgotten_one_phase += 1;
                self.write(ctx, Disk::OnePhaseForgotten { txid }, true)
            }
            Command::SendCommit { txid, participant, recovery } => {
                ctx.ghost.commit_sent(ctx.now, txid, &self.disk);
                let call = Call::Commit { txid, participant: participant.clone(), recovery };
                self.call(ctx, participant, call, |rpc| Msg::Commit(rpc, txid, true), CALL_TIMEOUT);
            }
            Command::SendAbort { txid, participant } => {
                self.call(ctx, participant, Call::Abort, |rpc| Msg::Abort(rpc, txid, true), CALL_TIMEOUT);
            }
            Command::ResolveOnePhase { txid, participant } => {
                self.call(
                    ctx,
                    participant,
                    Call::Resolve { txid },
                    |rpc| Msg::Abort(rpc, txid, true),
                    CALL_TIMEOUT,
                );
            }
            Command::ForgetActive { txid } => self.write(ctx, Disk::ForgetActive { txid }, false),
            Command::LogEnd { txid } => {
                if ctx.crash_point(Node::Coordinator, crash::COORDINATOR_COMMIT_BEFORE_END) {
                    return;
                }
                self.write(ctx, Disk::End { txid }, false);
            }
            Command::Reply { txid, decided } => {
                if ctx.crash_point(Node::Coordinator, crash::COORDINATOR_REPLY_BEFORE_CLIENT) {
                    return;
                }
                match process.replies.remove(&txid) {
                    Some((Node::Coordinator, _)) => self.batch_decided(ctx, txid, decided),
                    Some((client, rpc)) => {
                        ctx.send(Node::Coordinator, client, Msg::Decided(rpc, Ok((txid, decided))))
                    }
                    None => {}
                }
            }
            Command::ArmTimer { txid, kind, after } => {
                let work = Work::Engine(Event::TimerFired { txid, kind });
                ctx.schedule(after.as_micros() as Time, Item::Coordinator { epoch, work });
            }
            Command::ScheduleRedelivery { txid, participant, attempt } => {
                if attempt > 0 && ctx.mutated(Mutation::SkipRedelivery) {
                    return;
                }
                let delay = match attempt {
                    0 => Duration::ZERO,
                    n => REDELIVERY.delay(n - 1, ctx.rng()),
                };
                let work = Work::Engine(Event::RedeliveryDue { txid, participant });
                ctx.schedule(delay.as_micros() as Time, Item::Coordinator { epoch, work });
            }
        }
    }

    /// A participant answered a call (or its deadline passed: `Err(Deadline)`).
    fn answered(
        &mut self,
        ctx: &mut Ctx,
        rpc: u64,
        answer: Result<wire::Acked, Unanswered>,
        vote: Option<v1::PrepareResponse>,
    ) {
        let Some(process) = self.process.as_mut() else { return };
        let Some(call) = process.calls.remove(&rpc) else { return };
        let event = match call {
            Call::Prepare { txid, participant } => {
                let answer = match (answer, vote) {
                    (Ok(_), Some(response)) => Ok(response),
                    (Ok(_), None) => Err(Unanswered::Refused(tonic::Status::internal("no vote"))),
                    (Err(unanswered), _) => Err(unanswered),
                };
                let mut vote = wire::voted(answer);
                if ctx.mutated(Mutation::FailedVoteIsYes)
                    && matches!(vote, decree_coordinator::engine::VoteResult::Failed { .. })
                {
                    vote = decree_coordinator::engine::VoteResult::Yes;
                }
                Event::Voted { txid, participant, vote }
            }
            Call::Commit { txid, participant, recovery } => {
                if answer.is_ok()
                    && recovery
                    && ctx.crash_point(Node::Coordinator, crash::COORDINATOR_RECOVERY_MID_REDRIVE)
                {
                    return;
                }
                wire::commit_event(txid, participant, answer)
            }
            Call::Abort => return,
            Call::Ask { query } => {
                let Some(asking) = process.asking.get_mut(&query) else { return };
                asking.found.push(wire::one_phase_found(answer));
                asking.waiting -= 1;
                if asking.waiting == 0 {
                    let Asking { from, rpc, found, .. } = process.asking.remove(&query).expect("just found");
                    let outcome = presumed(ctx, wire::outcome_asked(found));
                    ctx.send(Node::Coordinator, from, Msg::Outcome(rpc, Ok(outcome)));
                }
                return;
            }
            Call::Resolve { txid } => Event::OnePhaseResolved { txid, found: wire::one_phase_found(answer) },
            Call::Ring => {
                // An Abort of a batch left undecided, or a call that went unanswered.
                let answer = wire::abort_ended(answer).map(|()| ring::Answer::None);
                return self.ring_step(ctx, rpc, answer);
            }
        };
        self.feed(ctx, event);
    }

    pub fn receive(&mut self, ctx: &mut Ctx, from: Node, msg: Msg) {
        let Some(process) = self.process.as_mut() else { return };
        match msg {
            Msg::Vote(rpc, vote) => match vote {
                Ok(response) => self.answered(ctx, rpc, Ok(wire::Acked::Done), Some(response)),
                Err(status) => self.answered(ctx, rpc, Err(Unanswered::Refused(status)), None),
            },
            Msg::Ack(rpc, ack) => {
                let ack =
                    ack.map(|r| wire::acked(r.ack, r.reason_code, r.reason)).map_err(Unanswered::Refused);
                self.answered(ctx, rpc, ack, None)
            }
            Msg::Refused(rpc) => {
                let refused = Unanswered::Refused(tonic::Status::unavailable("connection refused"));
                self.answered(ctx, rpc, Err(refused), None)
            }
            Msg::GetOutcome(rpc, txid) => {
                let answer = if txid.coordinator != process.id {
                    Err(format!("txid {txid} was not issued by this coordinator"))
                } else {
                    let known = process.engine.known(txid);
                    let store = &process.store;
                    let outcome = wire::outcome_of(known, || store.recorded(txid).expect("memory"));
                    if self.group
                        && known.is_none()
                        && outcome == v1::Outcome::Aborted
                        && !ctx.mutated(Mutation::PresumeAbortUnasked)
                    {
                        return self.ask_every_participant(ctx, from, rpc, txid);
                    }
                    Ok(presumed(ctx, outcome))
                };
                ctx.send(Node::Coordinator, from, Msg::Outcome(rpc, answer));
            }
            Msg::Enroll(rpc, participant) => {
                process.heard.insert(participant.clone(), ctx.now);
                ctx.send(Node::Coordinator, from, Msg::Enrolled(rpc, process.incarnation));
                self.feed(ctx, Event::Enrolled { participant });
            }
            Msg::Heartbeat(rpc, participant) => {
                process.heard.insert(participant, ctx.now);
                ctx.send(Node::Coordinator, from, Msg::Enrolled(rpc, process.incarnation))
            }
            Msg::GetRing(rpc) => ctx.send(Node::Coordinator, from, Msg::Ring(rpc, process.routing.clone())),
            Msg::Scanned(rpc, answer) => {
                let answer = answer.map(|r| ring::Answer::End(r.end)).map_err(|s| s.message().to_owned());
                self.ring_reply(ctx, rpc, answer)
            }
            Msg::Stepped(rpc, answer) => {
                let answer = answer.map(ring::Answer::Values).map_err(|s| s.message().to_owned());
                self.ring_reply(ctx, rpc, answer)
            }
            Msg::Enlist(rpc, txid, participant, run) => {
                let run = if ctx.mutated(Mutation::ReenlistTaken) { 0 } else { run };
                match process.engine.enlist(txid, participant.clone(), run) {
                    // Answered once its record lands (a restart or the next
                    // leader prepares the branch), a repeat's too.
                    Ok(run) if !ctx.mutated(Mutation::EnlistNotDurable) => {
                        self.write(ctx, Disk::Enlist { txid, participant, run, to: from, rpc }, true)
                    }
                    Ok(_) => ctx.send(Node::Coordinator, from, Msg::Enlisted(rpc, Ok(()))),
                    Err(err) => ctx.send(Node::Coordinator, from, Msg::Enlisted(rpc, Err(err.to_string()))),
                }
            }
            Msg::Transact(rpc, branches) => {
                let distinct: BTreeSet<&ParticipantName> = branches.iter().map(|(p, _)| p).collect();
                if distinct.len() != branches.len()
                    || branches.iter().any(|(p, _)| !self.participants.contains(p))
                {
                    ctx.send(Node::Coordinator, from, Msg::Decided(rpc, Err("invalid branches".into())));
                    return;
                }
                let txid = TxId::new(process.id, process.incarnation, process.next_sequence);
                process.next_sequence += 1;
                if self.group {
                    ctx.send(Node::Coordinator, from, Msg::Announced(rpc, txid));
                }
                process.replies.insert(txid, (from, rpc));
                let timeout = Duration::from_micros(PREPARE_TIMEOUT);
                self.feed(ctx, Event::Transact { txid, branches, timeout });
            }
            Msg::Begin(rpc) => {
                let txid = TxId::new(process.id, process.incarnation, process.next_sequence);
                process.next_sequence += 1;
                process
                    .engine
                    .on_event(Event::Begin { txid, idle_timeout: IDLE_TIMEOUT })
                    .expect("fresh txid");
                // Answered once its record lands.
                let deadline_ms = (ctx.now + IDLE_TIMEOUT.as_micros() as Time) / MS;
                self.write(ctx, Disk::Begin { txid, deadline_ms, to: from, rpc }, true);
                self.execute(ctx);
            }
            Msg::CommitTxn(rpc, txid) => {
                let timeout = Duration::from_micros(PREPARE_TIMEOUT);
                match process.engine.on_event(Event::CommitRequested { txid, timeout }) {
                    Ok(()) => {
                        process.replies.insert(txid, (from, rpc));
                        self.execute(ctx);
                    }
                    Err(err) => ctx.send(Node::Coordinator, from, Msg::Decided(rpc, Err(err.to_string()))),
                }
            }
            Msg::AbortTxn(_, txid) => {
                let _ = process.engine.on_event(Event::AbortRequested { txid });
                self.execute(ctx);
            }
            other => ctx.trace(|| format!("coord ignores {other}")),
        }
    }
}

/// Lands a finished write in the decision log (what [`Coordinator::disk_done`]
/// does before it tells the engine, and what a group's next leader holds of
/// its predecessor's writes). A ring record is not landed here: false.
fn land(ctx: &mut Ctx, store: &DecisionLog<MemLog>, disk: &Disk) -> bool {
    let written = match disk {
        Disk::Decision { txid, participants } => {
            ctx.ghost.decision_durable(ctx.now, *txid);
            now_or_never(store.log_decision(*txid, participants))
        }
        Disk::OnePhase { txid, participant, in_doubt } => {
            now_or_never(store.log_one_phase_commit(*txid, participant, *in_doubt))
        }
        Disk::InDoubt { txid, participant } => now_or_never(store.log_one_phase_in_doubt(*txid, participant)),
        Disk::OnePhaseAborted { txid } => now_or_never(store.log_one_phase_aborted(*txid)),
        Disk::OnePhaseForgotten { txid } => now_or_never(store.log_one_phase_forgotten(*txid)),
        Disk::End { txid } => now_or_never(store.log_end(*txid)),
        Disk::Begin { txid, deadline_ms, .. } => now_or_never(store.log_begin(*txid, *deadline_ms)),
        Disk::Enlist { txid, participant, run, .. } => {
            now_or_never(store.log_enlist(*txid, participant, *run))
        }
        Disk::ForgetActive { txid } => now_or_never(store.forget_active(*txid)),
        Disk::Ring { .. } => return false,
    };
    written.expect("memory");
    true
}
