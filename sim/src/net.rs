//! The simulated network: the messages the processes exchange (the
//! `decree.v1` requests and answers, or the domain values the gRPC handlers
//! turn into them), and the faults the seed chose for it.

use std::collections::BTreeSet;
use std::sync::Arc;

use decree_coordinator::engine::Decided;
use decree_proto::ring::Routing;
use decree_proto::{v1, KvOp, ParticipantName, Reason, TxId};
use rand::rngs::StdRng;
use rand::Rng;

use crate::{Node, Time, MS};

/// A message. Requests carry a call id their answer repeats.
#[derive(Debug, Clone)]
pub enum Msg {
    // Coordinator to participant.
    Prepare(u64, v1::PrepareRequest),
    /// `typed_ack` as the request carries it.
    Commit(u64, TxId, bool),
    Abort(u64, TxId, bool),
    // Participant to coordinator, answers.
    Vote(u64, Result<v1::PrepareResponse, tonic::Status>),
    /// The answer to a Commit or an Abort (their responses have the same fields).
    Ack(u64, Result<v1::CommitResponse, tonic::Status>),
    // Participant to coordinator, requests.
    GetOutcome(u64, TxId),
    Enroll(u64, ParticipantName),
    Heartbeat(u64, ParticipantName),
    /// With the participant's run (a number it picks at start).
    Enlist(u64, TxId, ParticipantName, u64),
    // Coordinator to participant or client, answers.
    Outcome(u64, Result<v1::Outcome, String>),
    Enrolled(u64, u64),
    Enlisted(u64, Result<(), String>),
    // Client to coordinator.
    Transact(u64, Vec<(ParticipantName, Vec<u8>)>),
    Begin(u64),
    CommitTxn(u64, TxId),
    AbortTxn(u64, TxId),
    // Coordinator to client.
    Began(u64, Result<TxId, String>),
    /// A group's leader names a one-shot transaction's txid the moment it
    /// issues it (`announce_txid`), before deciding: its client can ask
    /// `GetOutcome` whatever becomes of the leader.
    Announced(u64, TxId),
    Decided(u64, Result<(TxId, Decided), String>),
    // Client to participant, and back.
    Execute(u64, TxId, Vec<KvOp>),
    Executed(u64, Result<(), String>),
    /// The destination was down: the caller's connection was refused.
    Refused(u64),
    // Coordinator to participant, for a migration batch, and back.
    ScanMoving(u64, v1::ScanMovingRequest),
    Scanned(u64, Result<v1::ScanMovingResponse, tonic::Status>),
    /// Kv.Execute carrying a migration step.
    Step(u64, TxId, v1::MigrationStep),
    Stepped(u64, Result<Vec<v1::KeyValue>, tonic::Status>),
    // Client to coordinator, and back.
    GetRing(u64),
    Ring(u64, Arc<Routing>),
    // Client to participant (Kv.Get), and back: the values of the keys served
    // here, and the redirect for the others.
    Get(u64, Vec<String>),
    Got(u64, Vec<v1::KeyValue>, Option<(Reason, Vec<String>)>),
}

impl Msg {
    /// The call id, if this is a request (answered with [`Msg::Refused`] by a dead process).
    pub fn request(&self) -> Option<u64> {
        match self {
            Msg::Prepare(rpc, _)
            | Msg::Commit(rpc, _, _)
            | Msg::Abort(rpc, _, _)
            | Msg::GetOutcome(rpc, _)
            | Msg::Enroll(rpc, _)
            | Msg::Heartbeat(rpc, _)
            | Msg::Enlist(rpc, _, _, _)
            | Msg::Transact(rpc, _)
            | Msg::Begin(rpc)
            | Msg::CommitTxn(rpc, _)
            | Msg::AbortTxn(rpc, _)
            | Msg::Execute(rpc, _, _)
            | Msg::ScanMoving(rpc, _)
            | Msg::Step(rpc, _, _)
            | Msg::GetRing(rpc)
            | Msg::Get(rpc, _) => Some(*rpc),
            _ => None,
        }
    }
}

fn status(result: &Result<impl std::fmt::Debug, tonic::Status>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(status) => format!("{:?} {:?}", status.code(), status.message()),
    }
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Prepare(rpc, r) => write!(
                f,
                "#{rpc} Prepare {} one_phase={} interactive={} incarnation={}",
                r.txid, r.one_phase, r.interactive, r.coordinator_incarnation
            ),
            Msg::Commit(rpc, txid, _) => write!(f, "#{rpc} Commit {txid}"),
            Msg::Abort(rpc, txid, _) => write!(f, "#{rpc} Abort {txid}"),
            Msg::Vote(rpc, vote) => match vote {
                Ok(r) => write!(
                    f,
                    "#{rpc} vote {:?} {:?} {:?}",
                    v1::Vote::try_from(r.vote),
                    v1::Reason::try_from(r.reason_code),
                    r.reason
                ),
                Err(_) => write!(f, "#{rpc} vote {}", status(vote)),
            },
            Msg::Ack(rpc, ack) => match ack {
                Ok(r) => write!(
                    f,
                    "#{rpc} ack {:?} {:?} {:?}",
                    v1::Ack::try_from(r.ack),
                    v1::Reason::try_from(r.reason_code),
                    r.reason
                ),
                Err(_) => write!(f, "#{rpc} ack {}", status(ack)),
            },
            Msg::GetOutcome(rpc, txid) => write!(f, "#{rpc} GetOutcome {txid}"),
            Msg::Enroll(rpc, name) => write!(f, "#{rpc} Enroll {name}"),
            Msg::Heartbeat(rpc, name) => write!(f, "#{rpc} Heartbeat {name}"),
            Msg::Enlist(rpc, txid, name, run) => write!(f, "#{rpc} Enlist {txid} {name} run {run:x}"),
            Msg::Outcome(rpc, outcome) => write!(f, "#{rpc} outcome {outcome:?}"),
            Msg::Enrolled(rpc, incarnation) => write!(f, "#{rpc} enrolled incarnation={incarnation}"),
            Msg::Enlisted(rpc, result) => write!(f, "#{rpc} enlisted {result:?}"),
            Msg::Transact(rpc, branches) => {
                let names: Vec<&str> = branches.iter().map(|(p, _)| p.as_str()).collect();
                write!(f, "#{rpc} Transact {}", names.join(","))
            }
            Msg::Begin(rpc) => write!(f, "#{rpc} Begin"),
            Msg::CommitTxn(rpc, txid) => write!(f, "#{rpc} Commit(txn) {txid}"),
            Msg::AbortTxn(rpc, txid) => write!(f, "#{rpc} Abort(txn) {txid}"),
            Msg::Began(rpc, txid) => write!(f, "#{rpc} began {txid:?}"),
            Msg::Announced(rpc, txid) => write!(f, "#{rpc} txid {txid}"),
            Msg::Decided(rpc, decided) => match decided {
                Ok((txid, decided)) => write!(f, "#{rpc} decided {txid} {decided:?}"),
                Err(error) => write!(f, "#{rpc} refused {error:?}"),
            },
            Msg::Execute(rpc, txid, ops) => write!(f, "#{rpc} Execute {txid} {} ops", ops.len()),
            Msg::Executed(rpc, result) => write!(f, "#{rpc} executed {result:?}"),
            Msg::Refused(rpc) => write!(f, "#{rpc} connection refused"),
            Msg::ScanMoving(rpc, r) => write!(f, "#{rpc} ScanMoving after {:?} limit {}", r.after, r.limit),
            Msg::Scanned(rpc, answer) => write!(f, "#{rpc} scanned {}", status(answer)),
            Msg::Step(rpc, txid, step) => write!(
                f,
                "#{rpc} Step {txid} {:?} from {:?} {} entries",
                v1::migration_step::Direction::try_from(step.direction),
                step.lo,
                step.entries.len()
            ),
            Msg::Stepped(rpc, answer) => match answer {
                Ok(values) => write!(f, "#{rpc} stepped {} values", values.len()),
                Err(_) => write!(f, "#{rpc} stepped {}", status(answer)),
            },
            Msg::GetRing(rpc) => write!(f, "#{rpc} GetRing"),
            Msg::Ring(rpc, routing) => write!(
                f,
                "#{rpc} ring epoch {} {:?}{}",
                routing.epoch,
                routing.current.names(),
                routing.migration.as_ref().map_or(String::new(), |m| format!(
                    " -> {:?} at {:?}",
                    m.target.names(),
                    m.cursor
                ))
            ),
            Msg::Get(rpc, keys) => write!(f, "#{rpc} Get {keys:?}"),
            Msg::Got(rpc, values, redirect) => {
                let shown: Vec<String> = values
                    .iter()
                    .map(|kv| format!("{}={:?}", kv.key, kv.value.as_deref().map(String::from_utf8_lossy)))
                    .collect();
                write!(f, "#{rpc} got {shown:?} redirect {redirect:?}")
            }
        }
    }
}

/// The faults a seed chose.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Chance a message is lost.
    pub loss: f64,
    /// Chance a message arrives twice.
    pub duplication: f64,
    /// Extra delay (uniform up to this), which reorders messages.
    pub jitter: Time,
    /// Chance, at each fault slot (every 0.2-3 s), of a crash and of a partition.
    pub crashes: f64,
    pub partitions: f64,
    /// Chance a process dies at a named crash point it crosses.
    pub crash_points: f64,
    /// Chance a crash is of the machine (unsynced writes may be lost).
    pub machine_crashes: f64,
}

impl Faults {
    /// Each kind on or off by the seed, so that some runs isolate one kind
    /// and some mix them all.
    pub fn choose(rng: &mut StdRng) -> Faults {
        let on = |rng: &mut StdRng, odds: f64| rng.random_bool(odds);
        Faults {
            loss: if on(rng, 0.5) { rng.random_range(0.001..0.08) } else { 0.0 },
            duplication: if on(rng, 0.4) { rng.random_range(0.001..0.05) } else { 0.0 },
            jitter: if on(rng, 0.5) { rng.random_range(1..30) * MS } else { 200 },
            crashes: if on(rng, 0.6) { rng.random_range(0.1..0.6) } else { 0.0 },
            partitions: if on(rng, 0.5) { rng.random_range(0.1..0.5) } else { 0.0 },
            crash_points: if on(rng, 0.5) { rng.random_range(0.002..0.03) } else { 0.0 },
            machine_crashes: if on(rng, 0.5) { rng.random_range(0.2..1.0) } else { 0.0 },
        }
    }
}

pub struct Net {
    pub faults: Faults,
    cut: BTreeSet<(Node, Node)>,
}

impl Net {
    pub fn new(faults: Faults) -> Net {
        Net { faults, cut: BTreeSet::new() }
    }

    /// A message's time in flight: 0.1-0.5 ms, plus the seed's jitter while faults are on.
    pub fn delay(&self, rng: &mut StdRng, faults: bool) -> Time {
        let base = rng.random_range(100..500);
        if faults {
            base + rng.random_range(0..=self.faults.jitter)
        } else {
            base
        }
    }

    pub fn cut(&self, from: Node, to: Node) -> bool {
        self.cut.contains(&(from, to))
    }

    pub fn partition(&mut self, from: Node, to: Node) {
        self.cut.insert((from, to));
    }

    pub fn heal(&mut self, from: Node, to: Node) {
        self.cut.remove(&(from, to));
    }

    pub fn heal_all(&mut self) {
        self.cut.clear();
    }
}
