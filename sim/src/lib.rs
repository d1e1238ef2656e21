//! Deterministic simulation of decree.
//!
//! One coordinator engine and N participant engines (the KV resource over
//! [`MemLog`](decree_runtime::MemLog)) run on one thread, under one seeded
//! random source and a simulated clock, connected by a simulated network.
//! Everything that happens is an item in one time-ordered queue: a message
//! delivered, a disk write finished, a timer fired, a process crashed or
//! restarted, a partition opened or healed. The seed chooses the faults (loss,
//! duplication, reordering and delay, one-way and two-way partitions, process
//! and machine crashes at any moment and at the named crash points), the
//! workload (bank transfers with marker keys, one-shot and interactive, with
//! clients that retry and ask `GetOutcome` after an unknown outcome) and every
//! latency. The same seed replays the same run, event for event.
//!
//! After the faults stop, the run goes on until everything has ended, and the
//! invariants of TESTING.md are checked ([`check`]). Bugs can be planted
//! ([`Mutation`]) to show that the checks catch them.
//!
//! The engines, the stores and the wire conversions are the servers' own
//! code; what the simulator writes itself is the glue the runtimes are made
//! of (which command becomes which message, disk write or timer), kept as
//! close to theirs as the modules below say.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use decree_coordinator::migration::Change;
use decree_proto::ring::{Ring, Routing};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod check;
mod client;
mod coordinator;
mod net;
mod participant;

pub use check::Violation;
use client::Client;
use coordinator::Coordinator;
pub use net::Msg;
use net::{Faults, Net};
use participant::Participant;

/// Simulated time, in microseconds since the start of the run.
pub type Time = u64;

pub const MS: Time = 1_000;
pub const SECOND: Time = 1_000_000;

/// A process of the simulated system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Coordinator,
    Participant(usize),
    Client(usize),
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Coordinator => f.write_str("coord"),
            Node::Participant(p) => write!(f, "p{p}"),
            Node::Client(c) => write!(f, "client{c}"),
        }
    }
}

/// A bug planted on purpose, to show that the simulator catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// The coordinator sends Commit before the decision record is synced.
    CommitBeforeDurable,
    /// A participant votes YES before its prepared record is synced.
    YesBeforeDurable,
    /// A participant acks Commit before the commit is durable.
    AckBeforeDurable,
    /// A participant in doubt for a while aborts on its own, without asking.
    DecideAlone,
    /// The coordinator takes a Prepare that brought no answer for YES.
    FailedVoteIsYes,
    /// The coordinator answers GetOutcome COMMITTED for a txid it has no record of.
    PresumeCommit,
    /// The coordinator never redelivers a Commit that failed.
    SkipRedelivery,
    /// A group's leader answers `GetOutcome` ABORTED for a txid it holds
    /// nothing of without asking the participants (as a single coordinator
    /// may, whose one-shot clients have no txid to ask about): after a
    /// failover a client, asking, hears ABORTED for a one-phase branch that
    /// committed.
    PresumeAbortUnasked,
    /// An old owner's OUT step reads what leaves but does not delete it.
    KeepMovedKeys,
    /// A new owner's IN step takes no fence: it serves keys before they arrive
    /// (and reads of keys in doubt are answered, as before participants refused
    /// them, which would mask it).
    NoFenceAtNewOwner,
    /// The coordinator moves its cursor once the IN steps answer, before the batch commits.
    CursorBeforeCommit,
    /// The coordinator takes an Enlist from another run of a participant (whose earlier work is lost).
    ReenlistTaken,
    /// The coordinator answers a new Enlist without recording it: a restart
    /// or the next leader commits the transaction without that branch.
    EnlistNotDurable,
}

impl Mutation {
    pub const ALL: [Mutation; 13] = [
        Mutation::CommitBeforeDurable,
        Mutation::YesBeforeDurable,
        Mutation::AckBeforeDurable,
        Mutation::DecideAlone,
        Mutation::FailedVoteIsYes,
        Mutation::PresumeCommit,
        Mutation::SkipRedelivery,
        Mutation::PresumeAbortUnasked,
        Mutation::KeepMovedKeys,
        Mutation::NoFenceAtNewOwner,
        Mutation::CursorBeforeCommit,
        Mutation::ReenlistTaken,
        Mutation::EnlistNotDurable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::CommitBeforeDurable => "commit-before-durable",
            Mutation::YesBeforeDurable => "yes-before-durable",
            Mutation::AckBeforeDurable => "ack-before-durable",
            Mutation::DecideAlone => "decide-alone",
            Mutation::FailedVoteIsYes => "failed-vote-is-yes",
            Mutation::PresumeCommit => "presume-commit",
            Mutation::SkipRedelivery => "skip-redelivery",
            Mutation::PresumeAbortUnasked => "presume-abort-unasked",
            Mutation::KeepMovedKeys => "keep-moved-keys",
            Mutation::NoFenceAtNewOwner => "no-fence-at-new-owner",
            Mutation::CursorBeforeCommit => "cursor-before-commit",
            Mutation::ReenlistTaken => "reenlist-taken",
            Mutation::EnlistNotDurable => "enlist-not-durable",
        }
    }
}

impl std::str::FromStr for Mutation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mutation::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mutation {s:?}; one of: {}", names.join(", "))
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub mutation: Option<Mutation>,
    /// Keep the event trace (its hash is always computed).
    pub trace: bool,
    /// Check only effects (the data, the outcomes, liveness), not I3 as messages leave.
    pub effects_only: bool,
}

impl Options {
    pub fn seed(seed: u64) -> Options {
        Options { seed, mutation: None, trace: false, effects_only: false }
    }
}

/// Counts of what a run did: the fault kinds it exercised, and its workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub transactions: u64,
    pub committed: u64,
    pub aborted: u64,
    pub unknown: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub partitioned: u64,
    pub process_crashes: u64,
    pub machine_crashes: u64,
    /// A coordinator group's runs: leaders lost, and of their writes still
    /// replicating, those the next leader held and those it did not.
    pub group: bool,
    /// Runs whose participants' resource waits to validate (see
    /// `Participant::start`), and the Aborts that reached a branch still validating.
    pub slow_resource: bool,
    pub aborts_while_validating: u64,
    pub leader_changes: u64,
    pub replicating_kept: u64,
    pub replicating_lost: u64,
    /// Ring changes recorded, migrations finished, batches committed, keys
    /// they moved, batches that failed (and were tried again).
    pub ring_changes: u64,
    pub migrations: u64,
    pub batches: u64,
    pub moved_keys: u64,
    pub batch_failures: u64,
    /// One-phase outcomes their participant forgot before the coordinator learned them.
    pub forgotten_one_phase: u64,
    /// Reads served, and reads that found a key moved away (redirected).
    pub reads: u64,
    pub redirects: u64,
    /// Named crash points where a process died.
    pub crash_points: BTreeMap<&'static str, u64>,
    /// Simulated time the run took, and when its faults stopped.
    pub end: Time,
    pub faults_end: Time,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub stats: Stats,
    /// A hash of the whole event trace: equal for equal runs.
    pub trace_hash: u64,
    pub trace: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// What the queue holds.
#[derive(Debug)]
enum Item {
    /// `epoch`: the destination's incarnation when it was sent; a process that
    /// restarted since never gets it (its connections died with it).
    Deliver {
        from: Node,
        to: Node,
        epoch: u64,
        msg: Msg,
    },
    Coordinator {
        epoch: u64,
        work: coordinator::Work,
    },
    Participant {
        p: usize,
        epoch: u64,
        work: participant::Work,
    },
    Client {
        c: usize,
        work: client::Work,
    },
    Crash(Node),
    Restart(Node),
    Partition {
        from: Node,
        to: Node,
        until: Time,
    },
    Heal {
        from: Node,
        to: Node,
    },
    FaultsEnd,
    /// An operator asks for a ring change (`tries` left if it is refused).
    Operator {
        tries: u32,
    },
    /// Is everything over? Checked every so often once the faults stopped.
    Settled,
}

/// The world every node acts on: the clock, the queue, the randomness, the
/// network, the trace and the checker's ghost state.
pub struct Ctx {
    now: Time,
    seq: u64,
    queue: BTreeMap<(Time, u64), Item>,
    rng: StdRng,
    net: Net,
    next_rpc: u64,
    mutation: Option<Mutation>,
    pub ghost: check::Ghost,
    stats: Stats,
    keep_trace: bool,
    trace: Vec<String>,
    hasher: std::collections::hash_map::DefaultHasher,
    /// Chance that a process crossing a named crash point dies there.
    crash_point_odds: f64,
    /// Chance that a crash is of the machine (unsynced writes may go), not the process.
    machine_odds: f64,
    faults_on: bool,
    /// A process that must die now (at a crash point), before it does anything else.
    dying: Option<Node>,
    /// How long a restart takes.
    downtime: (Time, Time),
    /// Each process's incarnation, bumped by every crash.
    epochs: BTreeMap<Node, u64>,
}

impl Ctx {
    fn schedule(&mut self, after: Time, item: Item) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), item);
    }

    pub fn now(&self) -> Time {
        self.now
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// A write queued on a node's FIFO disk (free from `disk_free` on):
    /// returns how long until it is done, and moves `disk_free` past it.
    /// A synced write takes 0.2-4 ms (fsync), an unsynced one 5-50 us.
    fn disk_write(&mut self, disk_free: &mut Time, synced: bool) -> Time {
        let latency = if synced { self.rng.random_range(200..4_000) } else { self.rng.random_range(5..50) };
        *disk_free = (*disk_free).max(self.now) + latency;
        *disk_free - self.now
    }

    /// A write of a group's leader, as [`Ctx::disk_write`]: done once the
    /// leader's fsync and the faster of two followers' (each a round trip of
    /// 0.1-1 ms away) are.
    fn replicated_write(&mut self, disk_free: &mut Time) -> Time {
        let own = self.rng.random_range(200..4_000);
        let mut follower = || self.rng.random_range(100..1_000) + self.rng.random_range(200..4_000);
        let quorum = own.max(follower().min(follower()));
        *disk_free = (*disk_free).max(self.now) + quorum;
        *disk_free - self.now
    }

    pub fn mutated(&self, mutation: Mutation) -> bool {
        self.mutation == Some(mutation)
    }

    /// A fresh RPC id, unique in the run (a late answer never matches a newer call).
    fn rpc(&mut self) -> u64 {
        self.next_rpc += 1;
        self.next_rpc
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        let line = format!("{:>12} {}", self.now, line());
        line.hash(&mut self.hasher);
        if self.keep_trace {
            self.trace.push(line);
        }
    }

    /// Sends `msg` over the network, which may lose, delay, duplicate or cut it.
    fn send(&mut self, from: Node, to: Node, msg: Msg) {
        self.stats.messages += 1;
        if self.faults_on && self.net.cut(from, to) {
            self.stats.partitioned += 1;
            self.trace(|| format!("{from} -x {to} {msg} (partition)"));
            return;
        }
        if self.faults_on && self.rng.random_bool(self.net.faults.loss) {
            self.stats.lost += 1;
            self.trace(|| format!("{from} -x {to} {msg} (lost)"));
            return;
        }
        // A client's request is never duplicated: it would be a second
        // transaction, not a second copy of one (clients resend only what
        // the coordinator never read). Between servers a copy stands for a
        // slow first attempt of a call that is made again, or a stale message.
        let duplicable = !matches!(from, Node::Client(_));
        let copies = if duplicable && self.faults_on && self.rng.random_bool(self.net.faults.duplication) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let epoch = self.epochs.get(&to).copied().unwrap_or(0);
        for _ in 0..copies {
            let delay = self.net.delay(&mut self.rng, self.faults_on);
            self.schedule(delay, Item::Deliver { from, to, epoch, msg: msg.clone() });
        }
    }

    /// A process crossing a named crash point: dies there by the seed's odds.
    fn crash_point(&mut self, node: Node, point: &'static str) -> bool {
        if self.faults_on && self.dying.is_none() && self.rng.random_bool(self.crash_point_odds) {
            *self.stats.crash_points.entry(point).or_default() += 1;
            self.trace(|| format!("{node} dies at crash point {point}"));
            self.dying = Some(node);
            return true;
        }
        false
    }

    fn violation(&mut self, invariant: &'static str, what: String) {
        self.trace(|| format!("VIOLATION {invariant}: {what}"));
        self.ghost.violations.push(Violation { invariant, at: self.now, what });
    }
}

/// The whole simulated system.
struct Sim {
    ctx: Ctx,
    coordinator: Coordinator,
    participants: Vec<Participant>,
    clients: Vec<Client>,
    /// Simulated time after which, not settled, the run is a liveness failure.
    deadline: Time,
}

/// How long after the faults stop everything must have ended.
pub const SETTLE: Time = 60 * SECOND;

/// Ring points per unit of weight in the simulation: few, so that a run
/// builds its rings cheaply; the routing and migration code is the same.
pub const SIM_VNODES: u32 = 16;

/// Runs one seed to its end and checks it.
pub fn run(options: &Options) -> Report {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let faults = Faults::choose(&mut rng);
    let participants = rng.random_range(2..=5usize);
    // The ring starts with some of them; the operator adds and removes members as the run goes.
    let members = rng.random_range(1..=participants);
    let changes = if rng.random_bool(0.4) { 0 } else { rng.random_range(1..=3u32) };
    let batch_keys = rng.random_range(1..=12u32);
    let clients = rng.random_range(1..=3usize);
    let faults_end = rng.random_range(5..=30) * SECOND;
    // A third of the seeds run a coordinator group's leader (see `coordinator`).
    let group = options.seed % 3 == 2;
    // A quarter of them, whatever the coordinator, participants whose
    // resource waits to validate (picked apart from the random choices, so
    // that the other seeds run as they did before).
    let slow_resource = (options.seed / 3).is_multiple_of(4);
    let crash_odds = faults.crashes;
    let mut ctx = Ctx {
        now: 0,
        seq: 0,
        queue: BTreeMap::new(),
        net: Net::new(faults.clone()),
        next_rpc: 0,
        mutation: options.mutation,
        ghost: check::Ghost::new(options.effects_only),
        stats: Stats { faults_end, group, slow_resource, ..Stats::default() },
        keep_trace: options.trace,
        trace: Vec::new(),
        hasher: std::collections::hash_map::DefaultHasher::new(),
        crash_point_odds: faults.crash_points,
        machine_odds: faults.machine_crashes,
        faults_on: true,
        dying: None,
        downtime: (10 * MS, 2 * SECOND),
        epochs: BTreeMap::new(),
        rng,
    };
    ctx.trace(|| {
        format!(
            "seed {} {} participants {participants} (ring of {members}, {changes} changes, batches of \
             {batch_keys}) clients {clients}{} faults {faults:?}",
            options.seed,
            if group { "group" } else { "single" },
            if slow_resource { " slow resource" } else { "" }
        )
    });
    let retention = check::Retention::choose(&mut ctx.rng);
    let ring = Ring::weighted((0..members).map(|p| (coordinator::name(p).to_string(), 1)), SIM_VNODES);
    let routing = Routing { epoch: 1, current: ring, migration: None };
    let coordinator =
        Coordinator::start(&mut ctx, participants, retention, routing.clone(), batch_keys, group);
    let participants: Vec<Participant> = (0..participants)
        .map(|p| Participant::start(&mut ctx, p, retention, (p < members).then_some(&routing), slow_resource))
        .collect();
    let view = Arc::new(routing);
    let clients: Vec<Client> = (0..clients).map(|c| Client::new(&mut ctx, c, view.clone())).collect();
    for c in 0..clients.len() {
        let after = ctx.rng.random_range(0..50 * MS);
        ctx.schedule(after, Item::Client { c, work: client::Work::Next });
    }
    // Crashes and partitions, at times the seed picks, until the faults stop.
    let mut at = 0;
    loop {
        at += ctx.rng.random_range(200 * MS..3 * SECOND);
        if at >= faults_end {
            break;
        }
        let nodes = participants.len() + 1;
        let pick = |rng: &mut StdRng| match rng.random_range(0..nodes) {
            0 => Node::Coordinator,
            p => Node::Participant(p - 1),
        };
        if ctx.rng.random_bool(crash_odds) {
            let node = pick(&mut ctx.rng);
            ctx.seq += 1;
            ctx.queue.insert((at, ctx.seq), Item::Crash(node));
        }
        if ctx.rng.random_bool(faults.partitions) {
            let (a, b) = (pick(&mut ctx.rng), pick(&mut ctx.rng));
            let (a, b) = if a == b {
                let c = ctx.rng.random_range(0..clients.len());
                (Node::Client(c), Node::Coordinator)
            } else {
                (a, b)
            };
            let until = at + ctx.rng.random_range(100 * MS..4 * SECOND);
            let both = ctx.rng.random_bool(0.5);
            for (from, to) in if both { vec![(a, b), (b, a)] } else { vec![(a, b)] } {
                ctx.seq += 1;
                ctx.queue.insert((at, ctx.seq), Item::Partition { from, to, until });
            }
        }
    }
    for _ in 0..changes {
        let at = ctx.rng.random_range(100 * MS..faults_end);
        ctx.seq += 1;
        ctx.queue.insert((at, ctx.seq), Item::Operator { tries: 20 });
    }
    ctx.seq += 1;
    ctx.queue.insert((faults_end, ctx.seq), Item::FaultsEnd);
    let mut sim = Sim { ctx, coordinator, participants, clients, deadline: faults_end + SETTLE };
    sim.run();
    let mut report = Report {
        seed: options.seed,
        violations: Vec::new(),
        stats: sim.ctx.stats.clone(),
        trace_hash: 0,
        trace: Vec::new(),
    };
    check::finish(&mut sim.ctx, &sim.coordinator, &sim.participants, &sim.clients);
    report.stats = sim.ctx.stats.clone();
    report.violations = std::mem::take(&mut sim.ctx.ghost.violations);
    report.trace_hash = sim.ctx.hasher.finish();
    report.trace = std::mem::take(&mut sim.ctx.trace);
    report
}

impl Sim {
    fn run(&mut self) {
        while let Some(((at, _), item)) = self.ctx.queue.pop_first() {
            self.ctx.now = at;
            self.ctx.stats.events += 1;
            if self.ctx.now > self.deadline {
                let what = check::unsettled(&self.coordinator, &self.participants, &self.clients);
                self.ctx.violation(
                    "liveness",
                    format!("not settled {} s after the faults stopped: {what}", SETTLE / SECOND),
                );
                break;
            }
            match item {
                Item::Settled => {
                    if check::settled(&self.coordinator, &self.participants, &self.clients) {
                        self.ctx.trace(|| "settled".into());
                        break;
                    }
                    self.ctx.schedule(100 * MS, Item::Settled);
                }
                item => self.step(item),
            }
            if let Some(node) = self.ctx.dying.take() {
                self.crash(node);
            }
            if self.ctx.ghost.violations.len() > 20 {
                break;
            }
        }
        self.ctx.stats.end = self.ctx.now;
    }

    fn step(&mut self, item: Item) {
        match item {
            Item::Deliver { from, to, epoch, msg } => {
                if self.ctx.epochs.get(&to).copied().unwrap_or(0) != epoch {
                    self.ctx.trace(|| format!("{from} -> {to} {msg} (connection reset: {to} restarted)"));
                    return;
                }
                let up = match to {
                    Node::Coordinator => self.coordinator.up(),
                    Node::Participant(p) => self.participants[p].up(),
                    Node::Client(_) => true,
                };
                if !up {
                    self.ctx.trace(|| format!("{from} -> {to} {msg} (down)"));
                    // Connection refused: the caller hears at once.
                    if let Some(rpc) = msg.request() {
                        self.ctx.send(to, from, Msg::Refused(rpc));
                    }
                    return;
                }
                self.ctx.trace(|| format!("{from} -> {to} {msg}"));
                match to {
                    Node::Coordinator => self.coordinator.receive(&mut self.ctx, from, msg),
                    Node::Participant(p) => self.participants[p].receive(&mut self.ctx, from, msg),
                    Node::Client(c) => self.clients[c].receive(&mut self.ctx, msg),
                }
            }
            Item::Coordinator { epoch, work } => {
                if epoch == self.coordinator.epoch() {
                    self.coordinator.work(&mut self.ctx, work);
                }
            }
            Item::Participant { p, epoch, work } => {
                if epoch == self.participants[p].epoch() {
                    self.participants[p].work(&mut self.ctx, work);
                }
            }
            Item::Client { c, work } => self.clients[c].work(&mut self.ctx, work),
            Item::Crash(node) => {
                if self.ctx.faults_on {
                    self.crash(node);
                }
            }
            Item::Restart(node) => self.restart(node),
            Item::Partition { from, to, until } => {
                self.ctx.trace(|| format!("partition {from} -x {to}"));
                self.ctx.net.partition(from, to);
                let after = until.saturating_sub(self.ctx.now);
                self.ctx.schedule(after, Item::Heal { from, to });
            }
            Item::Operator { tries } => self.operate(tries),
            Item::Heal { from, to } => {
                self.ctx.trace(|| format!("heal {from} -> {to}"));
                self.ctx.net.heal(from, to);
            }
            Item::FaultsEnd => {
                self.ctx.trace(|| "faults stop".into());
                self.ctx.faults_on = false;
                self.ctx.net.heal_all();
                for node in self.down() {
                    self.restart(node);
                }
                self.ctx.schedule(100 * MS, Item::Settled);
            }
            Item::Settled => unreachable!("handled by the loop"),
        }
    }

    /// An operator's ring change, chosen from what `decree ring` shows: a
    /// participant added, a member removed, or a weight changed. A refused
    /// change is asked again a second later, some times.
    fn operate(&mut self, tries: u32) {
        let Some(routing) = self.coordinator.routing() else {
            return self.ctx.schedule(SECOND, Item::Operator { tries });
        };
        let ring = routing.settled();
        let name = |p: usize| coordinator::name(p);
        let outside: Vec<usize> =
            (0..self.participants.len()).filter(|p| !ring.contains(name(*p).as_str())).collect();
        let inside: Vec<usize> =
            (0..self.participants.len()).filter(|p| ring.contains(name(*p).as_str())).collect();
        let rng = &mut self.ctx.rng;
        let change = match rng.random_range(0..4) {
            0 | 1 if !outside.is_empty() => {
                Change::Add { name: name(outside[rng.random_range(0..outside.len())]), weight: 1 }
            }
            0 | 2 if inside.len() > 1 => {
                Change::Remove { name: name(inside[rng.random_range(0..inside.len())]) }
            }
            _ => {
                let p = inside[rng.random_range(0..inside.len())];
                Change::Weight { name: name(p), weight: rng.random_range(1..=3) }
            }
        };
        match self.coordinator.ring_change(&mut self.ctx, &change) {
            Ok(()) => self.ctx.trace(|| format!("operator: ring {change}")),
            Err(why) => {
                self.ctx.trace(|| format!("operator: ring {change} refused: {why}"));
                if tries > 1 {
                    self.ctx.schedule(SECOND, Item::Operator { tries: tries - 1 });
                }
            }
        }
    }

    fn down(&self) -> Vec<Node> {
        let mut out = Vec::new();
        if !self.coordinator.up() {
            out.push(Node::Coordinator);
        }
        for (p, participant) in self.participants.iter().enumerate() {
            if !participant.up() {
                out.push(Node::Participant(p));
            }
        }
        out
    }

    fn crash(&mut self, node: Node) {
        let up = match node {
            Node::Coordinator => self.coordinator.up(),
            Node::Participant(p) => self.participants[p].up(),
            Node::Client(_) => false,
        };
        if !up {
            return;
        }
        let machine = self.ctx.rng.random_bool(self.ctx.machine_odds);
        if machine {
            self.ctx.stats.machine_crashes += 1;
        } else {
            self.ctx.stats.process_crashes += 1;
        }
        self.ctx.trace(|| format!("{node} crashes ({})", if machine { "machine" } else { "process" }));
        *self.ctx.epochs.entry(node).or_default() += 1;
        match node {
            Node::Coordinator => self.coordinator.crash(&mut self.ctx, machine),
            Node::Participant(p) => self.participants[p].crash(&mut self.ctx, machine),
            Node::Client(_) => unreachable!(),
        }
        let (low, high) = self.ctx.downtime;
        let after = self.ctx.rng.random_range(low..high);
        self.ctx.schedule(after, Item::Restart(node));
    }

    fn restart(&mut self, node: Node) {
        let down = match node {
            Node::Coordinator => !self.coordinator.up(),
            Node::Participant(p) => !self.participants[p].up(),
            Node::Client(_) => false,
        };
        if !down {
            return;
        }
        self.ctx.trace(|| format!("{node} restarts"));
        match node {
            Node::Coordinator => self.coordinator.restart(&mut self.ctx),
            Node::Participant(p) => self.participants[p].restart(&mut self.ctx),
            Node::Client(_) => unreachable!(),
        }
    }
}

/// The trace of a report, one event per line.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for line in &report.trace {
        let _ = writeln!(out, "{line}");
    }
    out
}
