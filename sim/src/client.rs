//! The workload: bank transfers between accounts on the participants, each
//! writing a marker key and bumping a counter on every participant it
//! changes, one-shot (Transact) or interactive (Begin, Execute, Commit).
//! Clients retry a transfer whose answer never came (as a new transaction,
//! with its own marker) and ask GetOutcome after an unknown outcome.

use decree_coordinator::engine::Decided;
use decree_proto::{v1, KvOp, TxId};
use prost::Message;
use rand::Rng;

use crate::check::Reported;
use crate::coordinator::name;
use crate::{Ctx, Item, Msg, Node, Time, MS, SECOND};

/// How long a client waits for an answer before it gives up on it.
const PATIENCE: Time = 3 * SECOND;
const POLL: Time = 200 * MS;
/// Accounts per participant.
pub const ACCOUNTS: usize = 2;

#[derive(Debug)]
pub enum Work {
    Next,
    Deadline(u64),
    Poll,
}

/// One transfer: who loses `amount`, who gains it, and a branch that may be
/// refused (`frozen`) or read-only (`reader`).
#[derive(Debug, Clone)]
struct Transfer {
    tag: String,
    from: (usize, usize),
    to: (usize, usize),
    amount: i64,
    /// This participant's branch also expects a key that never exists: it votes NO.
    frozen: Option<usize>,
    /// This participant only reads (votes READ-ONLY).
    reader: Option<usize>,
}

impl Transfer {
    /// The ops of each participant's branch, in participant order.
    fn branches(&self) -> Vec<(usize, Vec<KvOp>)> {
        let mut out: Vec<(usize, Vec<KvOp>)> = Vec::new();
        let mut add = |p: usize, op: KvOp| match out.iter_mut().find(|(q, _)| *q == p) {
            Some((_, ops)) => ops.push(op),
            None => out.push((p, vec![op])),
        };
        add(self.from.0, KvOp::Add { key: account(self.from.1), delta: -self.amount });
        add(self.to.0, KvOp::Add { key: account(self.to.1), delta: self.amount });
        for p in self.writers() {
            add(p, KvOp::Put { key: format!("m/{}", self.tag), value: b"1".to_vec() });
            add(p, KvOp::Add { key: "count".into(), delta: 1 });
        }
        if let Some(p) = self.frozen {
            add(p, KvOp::Expect { key: "frozen".into(), value: Some(b"yes".to_vec()) });
        }
        if let Some(p) = self.reader {
            add(p, KvOp::Expect { key: format!("m/{}", self.tag), value: None });
        }
        out.sort_by_key(|(p, _)| *p);
        out
    }

    /// The participants it changes.
    fn writers(&self) -> Vec<usize> {
        let mut out = vec![self.from.0, self.to.0];
        out.sort();
        out.dedup();
        out
    }
}

pub fn account(a: usize) -> String {
    format!("acct/{a}")
}

#[derive(Debug)]
enum Phase {
    Idle,
    Transacting { rpc: u64, transfer: Transfer },
    Beginning { rpc: u64, transfer: Transfer },
    Executing { rpc: u64, txid: TxId, transfer: Transfer, step: usize },
    Committing { rpc: u64, txid: TxId, transfer: Transfer },
    Polling { rpc: Option<u64>, txid: TxId, tag: String },
    Done,
}

pub struct Client {
    index: usize,
    participants: usize,
    left: usize,
    started: u64,
    phase: Phase,
}

impl Client {
    pub fn new(ctx: &mut Ctx, index: usize, participants: usize) -> Client {
        let left = ctx.rng().random_range(5..=25);
        Client { index, participants, left, started: 0, phase: Phase::Idle }
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
        let n = self.participants;
        let rng = ctx.rng();
        let from = (rng.random_range(0..n), rng.random_range(0..ACCOUNTS));
        let to = loop {
            let to = (rng.random_range(0..n), rng.random_range(0..ACCOUNTS));
            if to != from {
                break to;
            }
        };
        let amount = rng.random_range(1..100);
        let writers = {
            let mut w = vec![from.0, to.0];
            w.sort();
            w.dedup();
            w
        };
        let frozen = rng.random_bool(0.05).then(|| writers[rng.random_range(0..writers.len())]);
        let reader = if rng.random_bool(0.1) { (0..n).find(|p| !writers.contains(p)) } else { None };
        let transfer = Transfer { tag, from, to, amount, frozen, reader };
        ctx.ghost.planned(&transfer.tag, transfer.writers());
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
                .branches()
                .into_iter()
                .map(|(p, ops)| {
                    (
                        name(p),
                        v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: None }
                            .encode_to_vec(),
                    )
                })
                .collect();
            ctx.send(self.node(), Node::Coordinator, Msg::Transact(rpc, branches));
            self.phase = Phase::Transacting { rpc, transfer };
        }
        self.schedule(ctx, PATIENCE, Work::Deadline(rpc));
    }

    /// No answer came in time.
    fn gave_up(&mut self, ctx: &mut Ctx, rpc: u64) {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Transacting { rpc: r, transfer } if r == rpc => {
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
        match (std::mem::replace(&mut self.phase, Phase::Idle), msg) {
            (Phase::Transacting { rpc, transfer }, Msg::Decided(r, answer)) if r == rpc => match answer {
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
    fn execute(&mut self, ctx: &mut Ctx, txid: TxId, transfer: Transfer, step: usize) {
        let branches = transfer.branches();
        let rpc = ctx.rpc();
        match branches.get(step) {
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
