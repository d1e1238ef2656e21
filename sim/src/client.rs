//! The workload: bank transfers between accounts, each writing two marker
//! keys and bumping its client's counter, every key routed to its owner by
//! the ring as the client last heard it from the coordinator, one-shot
//! (Transact) or interactive (Begin, Execute, Commit). Clients retry a
//! transfer whose answer never came (as a new transaction, with its own
//! markers), ask GetOutcome after an unknown outcome, ask for the ring again
//! after anything but a commit, and read keys back now and then (following
//! redirects), which the checker holds to the latest committed values.

use std::collections::BTreeMap;
use std::sync::Arc;

use decree_coordinator::engine::Decided;
use decree_proto::ring::Routing;
use decree_proto::{v1, KvOp, TxId};
use prost::Message;
use rand::Rng;

use crate::check::Reported;
use crate::coordinator::index;
use crate::{Ctx, Item, Msg, Node, Time, MS, SECOND};

/// How long a client waits for an answer before it gives up on it.
const PATIENCE: Time = 3 * SECOND;
const POLL: Time = 200 * MS;
/// Accounts in all.
pub const ACCOUNTS: usize = 8;
/// Times a read follows a redirect before it gives up.
const READ_TRIES: u32 = 10;

#[derive(Debug)]
pub enum Work {
    Next,
    Deadline(u64),
    Poll,
    /// Read `key` (again, after a redirect).
    Read {
        key: String,
        tries: u32,
    },
}

/// One transfer: which account loses `amount`, which gains it, and a key
/// whose branch may be refused (`frozen`) or only read (`reader`).
#[derive(Debug, Clone)]
struct Transfer {
    tag: String,
    client: usize,
    from: usize,
    to: usize,
    amount: i64,
    /// Also expect a key that never exists: its branch votes NO.
    frozen: bool,
    /// Also read a key that is never written (its owner may only read).
    reader: bool,
    /// An interactive transfer's branches, routed once when it began.
    routed: Vec<(usize, Vec<KvOp>)>,
}

impl Transfer {
    /// The ops of each participant's branch, in participant order, routed by `routing`.
    fn branches(&self, routing: &Routing) -> Vec<(usize, Vec<KvOp>)> {
        let mut ops = vec![
            KvOp::Add { key: account(self.from), delta: -self.amount },
            KvOp::Add { key: account(self.to), delta: self.amount },
        ];
        for marker in markers(&self.tag) {
            ops.push(KvOp::Put { key: marker, value: b"1".to_vec() });
        }
        ops.push(KvOp::Add { key: counter(self.client), delta: 1 });
        if self.frozen {
            ops.push(KvOp::Expect { key: "frozen".into(), value: Some(b"yes".to_vec()) });
        }
        if self.reader {
            ops.push(KvOp::Expect { key: format!("r/{}", self.tag), value: None });
        }
        let mut out: BTreeMap<usize, Vec<KvOp>> = BTreeMap::new();
        for op in ops {
            let owner = routing.route(op.key()).map_or(0, |name| index(&name.parse().expect("a member")));
            out.entry(owner).or_default().push(op);
        }
        out.into_iter().collect()
    }
}

pub fn account(a: usize) -> String {
    format!("acct/{a}")
}

/// A transfer's two marker keys (routed apart, mostly to different owners).
pub fn markers(tag: &str) -> [String; 2] {
    [format!("m/{tag}.a"), format!("m/{tag}.b")]
}

/// The key counting client `c`'s transfers.
pub fn counter(c: usize) -> String {
    format!("count/{c}")
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// `txid`: announced by a group's leader, once it is.
    Transacting {
        rpc: u64,
        transfer: Transfer,
        txid: Option<TxId>,
    },
    Beginning {
        rpc: u64,
        transfer: Transfer,
    },
    Executing {
        rpc: u64,
        txid: TxId,
        transfer: Transfer,
        step: usize,
    },
    Committing {
        rpc: u64,
        txid: TxId,
        transfer: Transfer,
    },
    Polling {
        rpc: Option<u64>,
        txid: TxId,
        tag: String,
    },
    Done,
}

pub struct Client {
    index: usize,
    left: usize,
    started: u64,
    phase: Phase,
    /// The routing as last heard from the coordinator.
    view: Arc<Routing>,
    /// The GetRing in flight, if any.
    asking: Option<u64>,
    /// Reads in flight: their key and tries so far.
    reads: BTreeMap<u64, (String, u32)>,
    /// Tags of transfers started, to read their markers back.
    tags: Vec<String>,
}

impl Client {
    pub fn new(ctx: &mut Ctx, index: usize, view: Arc<Routing>) -> Client {
        let left = ctx.rng().random_range(5..=25);
        Client {
            index,
            left,
            started: 0,
            phase: Phase::Idle,
            view,
            asking: None,
            reads: BTreeMap::new(),
            tags: Vec::new(),
        }
    }

    /// Asks the coordinator for the ring (once at a time).
    fn refresh(&mut self, ctx: &mut Ctx) {
        if self.asking.is_none() {
            let rpc = ctx.rpc();
            self.asking = Some(rpc);
            ctx.send(self.node(), Node::Coordinator, Msg::GetRing(rpc));
            self.schedule(ctx, PATIENCE, Work::Deadline(rpc));
        }
    }

    /// Reads `key` at its owner as this client routes it.
    fn read(&mut self, ctx: &mut Ctx, key: String, tries: u32) {
        let Some(owner) = self.view.route(&key).map(|name| index(&name.parse().expect("a member"))) else {
            return;
        };
        let rpc = ctx.rpc();
        self.reads.insert(rpc, (key.clone(), tries));
        ctx.send(self.node(), Node::Participant(owner), Msg::Get(rpc, vec![key]));
        self.schedule(ctx, PATIENCE, Work::Deadline(rpc));
    }

    /// After each transfer, a key read back: an account, this client's counter, or a marker.
    fn maybe_read(&mut self, ctx: &mut Ctx) {
        let key = match ctx.rng().random_range(0..3) {
            0 => account(ctx.rng().random_range(0..ACCOUNTS)),
            1 => counter(self.index),
            _ if !self.tags.is_empty() => {
                let tag = self.tags[ctx.rng().random_range(0..self.tags.len())].clone();
                markers(&tag)[ctx.rng().random_range(0..2)].clone()
            }
            _ => counter(self.index),
        };
        self.read(ctx, key, 0);
    }

    fn node(&self) -> Node {
        Node::Client(self.index)
    }

    pub fn done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    pub fn describe(&self) -> String {
        format!("client{} {:?} ({} left)", self.index, self.phase, self.left)
    }

    fn schedule(&self, ctx: &mut Ctx, after: Time, work: Work) {
        ctx.schedule(after, Item::Client { c: self.index, work });
    }

    fn plan(&mut self, ctx: &mut Ctx) -> Transfer {
        self.started += 1;
        let tag = format!("c{}.{}", self.index, self.started);
        let rng = ctx.rng();
        let from = rng.random_range(0..ACCOUNTS);
        let to = loop {
            let to = rng.random_range(0..ACCOUNTS);
            if to != from {
                break to;
            }
        };
        let amount = rng.random_range(1..100);
        let frozen = rng.random_bool(0.05);
        let reader = rng.random_bool(0.1);
        let transfer =
            Transfer { tag, client: self.index, from, to, amount, frozen, reader, routed: Vec::new() };
        ctx.ghost.planned(&transfer.tag, self.index);
        self.tags.push(transfer.tag.clone());
        transfer
    }

    fn finish(&mut self, ctx: &mut Ctx, tag: &str, reported: Option<Reported>) {
        let index = self.index;
        ctx.trace(|| format!("client{index} ends {tag}: {reported:?}"));
        if let Some(reported) = reported {
            ctx.ghost.reported(ctx.now(), tag, reported);
            match reported {
                Reported::Committed => ctx.stats.committed += 1,
                Reported::Aborted => ctx.stats.aborted += 1,
            }
        } else {
            ctx.stats.unknown += 1;
        }
        if reported != Some(Reported::Committed) || ctx.rng().random_bool(0.1) {
            self.refresh(ctx);
        }
        self.maybe_read(ctx);
        self.phase = Phase::Idle;
        let after = ctx.rng().random_range(0..20 * MS);
        self.schedule(ctx, after, Work::Next);
    }

    pub fn work(&mut self, ctx: &mut Ctx, work: Work) {
        match work {
            Work::Next => self.next(ctx),
            Work::Deadline(rpc) => self.gave_up(ctx, rpc),
            Work::Poll => {
                if let Phase::Polling { rpc: None, txid, tag } = &self.phase {
                    let (txid, tag) = (*txid, tag.clone());
                    let rpc = ctx.rpc();
                    self.phase = Phase::Polling { rpc: Some(rpc), txid, tag };
                    ctx.send(self.node(), Node::Coordinator, Msg::GetOutcome(rpc, txid));
                    self.schedule(ctx, PATIENCE, Work::Deadline(rpc));
                }
            }
            Work::Read { key, tries } => self.read(ctx, key, tries),
        }
    }

    fn next(&mut self, ctx: &mut Ctx) {
        if !matches!(self.phase, Phase::Idle) {
            return;
        }
        if self.left == 0 {
            self.phase = Phase::Done;
            return;
        }
        self.left -= 1;
        ctx.stats.transactions += 1;
        let transfer = self.plan(ctx);
        let rpc = ctx.rpc();
        let interactive = ctx.rng().random_bool(0.3);
        let index = self.index;
        ctx.trace(|| {
            format!(
                "client{index} starts {} {transfer:?} (#{rpc}, {})",
                transfer.tag,
                if interactive { "interactive" } else { "one-shot" }
            )
        });
        if interactive {
            ctx.send(self.node(), Node::Coordinator, Msg::Begin(rpc));
            self.phase = Phase::Beginning { rpc, transfer };
        } else {
            let branches = transfer
                .branches(&self.view)
                .into_iter()
                .map(|(p, ops)| {
                    (
                        crate::coordinator::name(p),
                        v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: None }
                            .encode_to_vec(),
                    )
                })
                .collect();
            ctx.send(self.node(), Node::Coordinator, Msg::Transact(rpc, branches));
            self.phase = Phase::Transacting { rpc, transfer, txid: None };
        }
        self.schedule(ctx, PATIENCE, Work::Deadline(rpc));
    }

    /// No answer came in time.
    fn gave_up(&mut self, ctx: &mut Ctx, rpc: u64) {
        if self.asking == Some(rpc) {
            self.asking = None;
            return;
        }
        if self.reads.remove(&rpc).is_some() {
            return;
        }
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Transacting { rpc: r, transfer, txid: Some(txid) } if r == rpc => {
                // Announced: its outcome is asked, not guessed.
                self.phase = Phase::Polling { rpc: None, txid, tag: transfer.tag };
                self.schedule(ctx, POLL, Work::Poll);
            }
            Phase::Transacting { rpc: r, transfer, txid: None } if r == rpc => {
                // Unknown, and no txid to ask about: try the transfer again, as a new transaction.
                ctx.stats.unknown += 1;
                self.left += 1;
                let _ = transfer;
                self.schedule(ctx, 0, Work::Next);
            }
            Phase::Beginning { rpc: r, transfer } if r == rpc => {
                self.finish(ctx, &transfer.tag, Some(Reported::Aborted))
            }
            Phase::Executing { rpc: r, txid, transfer, .. } if r == rpc => {
                // The work's fate is unknown: abort the transaction (the coordinator's idle timeout would too).
                let abort = ctx.rpc();
                ctx.send(self.node(), Node::Coordinator, Msg::AbortTxn(abort, txid));
                self.phase = Phase::Polling { rpc: None, txid, tag: transfer.tag };
                self.schedule(ctx, POLL, Work::Poll);
            }
            Phase::Committing { rpc: r, txid, transfer } if r == rpc => {
                self.phase = Phase::Polling { rpc: None, txid, tag: transfer.tag };
                self.schedule(ctx, POLL, Work::Poll);
            }
            Phase::Polling { rpc: Some(r), txid, tag } if r == rpc => {
                self.phase = Phase::Polling { rpc: None, txid, tag };
                self.schedule(ctx, POLL, Work::Poll);
            }
            other => self.phase = other,
        }
    }

    pub fn receive(&mut self, ctx: &mut Ctx, msg: Msg) {
        let msg = match msg {
            Msg::Ring(rpc, routing) if self.asking == Some(rpc) => {
                self.asking = None;
                self.view = routing;
                return;
            }
            Msg::Got(rpc, _, redirect) => {
                let Some((key, tries)) = self.reads.remove(&rpc) else { return };
                ctx.stats.reads += 1;
                if redirect.is_some() {
                    // The key moved (or is moving): ask for the ring, then read again.
                    ctx.stats.redirects += 1;
                    self.refresh(ctx);
                    if tries < READ_TRIES {
                        self.schedule(ctx, 20 * MS, Work::Read { key, tries: tries + 1 });
                    }
                }
                return;
            }
            msg => msg,
        };
        match (std::mem::replace(&mut self.phase, Phase::Idle), msg) {
            (Phase::Transacting { rpc, transfer, txid: None }, Msg::Announced(r, txid)) if r == rpc => {
                let index = self.index;
                ctx.trace(|| format!("client{index}: {} is {txid}", transfer.tag));
                self.phase = Phase::Transacting { rpc, transfer, txid: Some(txid) };
            }
            (Phase::Transacting { rpc, transfer, .. }, Msg::Decided(r, answer)) if r == rpc => match answer {
                Ok((_, Decided::Committed)) => self.finish(ctx, &transfer.tag, Some(Reported::Committed)),
                Ok((_, Decided::Aborted { .. })) => self.finish(ctx, &transfer.tag, Some(Reported::Aborted)),
                Ok((txid, Decided::Unknown { .. })) => {
                    self.phase = Phase::Polling { rpc: None, txid, tag: transfer.tag };
                    self.schedule(ctx, POLL, Work::Poll);
                }
                Err(_) => self.finish(ctx, &transfer.tag, Some(Reported::Aborted)),
            },
            (Phase::Beginning { rpc, transfer }, Msg::Began(r, answer)) if r == rpc => match answer {
                Ok(txid) => {
                    let index = self.index;
                    ctx.trace(|| format!("client{index}: {} is {txid}", transfer.tag));
                    self.execute(ctx, txid, transfer, 0)
                }
                Err(_) => self.finish(ctx, &transfer.tag, Some(Reported::Aborted)),
            },
            (Phase::Executing { rpc, txid, transfer, step }, Msg::Executed(r, result)) if r == rpc => {
                match result {
                    Ok(()) => self.execute(ctx, txid, transfer, step + 1),
                    Err(_) => {
                        // Refused work: the client aborts. Whether the abort lands or the
                        // idle timeout does it, the outcome is asked, not assumed.
                        let abort = ctx.rpc();
                        ctx.send(self.node(), Node::Coordinator, Msg::AbortTxn(abort, txid));
                        self.phase = Phase::Polling { rpc: None, txid, tag: transfer.tag };
                        self.schedule(ctx, POLL, Work::Poll);
                    }
                }
            }
            (Phase::Committing { rpc, txid, transfer }, Msg::Decided(r, answer)) if r == rpc => {
                match answer {
                    Ok((_, Decided::Committed)) => self.finish(ctx, &transfer.tag, Some(Reported::Committed)),
                    Ok((_, Decided::Aborted { .. })) => {
                        self.finish(ctx, &transfer.tag, Some(Reported::Aborted))
                    }
                    Ok((_, Decided::Unknown { .. })) | Err(_) => {
                        self.phase = Phase::Polling { rpc: None, txid, tag: transfer.tag };
                        self.schedule(ctx, POLL, Work::Poll);
                    }
                }
            }
            (Phase::Polling { rpc: Some(rpc), txid, tag }, Msg::Outcome(r, answer)) if r == rpc => {
                match answer {
                    Ok(v1::Outcome::Committed) => self.finish(ctx, &tag, Some(Reported::Committed)),
                    Ok(v1::Outcome::Aborted) => self.finish(ctx, &tag, Some(Reported::Aborted)),
                    Ok(v1::Outcome::Forgotten) => self.finish(ctx, &tag, None),
                    _ => {
                        self.phase = Phase::Polling { rpc: None, txid, tag };
                        self.schedule(ctx, POLL, Work::Poll);
                    }
                }
            }
            (phase, Msg::Refused(r)) => {
                self.phase = phase;
                self.gave_up(ctx, r);
            }
            (phase, _) => self.phase = phase,
        }
    }

    /// Interactive: the work of `step` at its participant, then Commit.
    fn execute(&mut self, ctx: &mut Ctx, txid: TxId, mut transfer: Transfer, step: usize) {
        if step == 0 {
            transfer.routed = transfer.branches(&self.view);
            if ctx.rng().random_bool(0.5) {
                // Each op its own Execute: a branch built of several works, so that a
                // participant's restart between two of them is exercised.
                transfer.routed = transfer
                    .routed
                    .into_iter()
                    .flat_map(|(p, ops)| ops.into_iter().map(move |op| (p, vec![op])))
                    .collect();
            }
        }
        let rpc = ctx.rpc();
        match transfer.routed.get(step) {
            Some((p, ops)) => {
                ctx.send(self.node(), Node::Participant(*p), Msg::Execute(rpc, txid, ops.clone()));
                self.phase = Phase::Executing { rpc, txid, transfer, step };
            }
            None => {
                ctx.send(self.node(), Node::Coordinator, Msg::CommitTxn(rpc, txid));
                self.phase = Phase::Committing { rpc, txid, transfer };
            }
        }
        self.schedule(ctx, PATIENCE, Work::Deadline(rpc));
    }
}
