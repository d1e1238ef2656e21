//! One-shot transactions over one long-lived `TransactStream` to the
//! coordinator, shared by every clone of a [`crate::Client`]: a message per
//! transaction instead of an RPC, answers matched by request id.
//!
//! The answers mean what a unary `Transact` would have answered. If the
//! coordinator ends the stream (it is shutting down), what it had not answered
//! was not started and is reported UNAVAILABLE, as a refused `Transact` would
//! be; if the connection breaks, what was not answered has an unknown outcome,
//! as for a unary call cut off. A coordinator without `TransactStream` gets
//! unary `Transact`s.
//!
//! Against a coordinator group, each transaction is named by a txid leased
//! to the stream before it is sent: whatever becomes of the stream or of the
//! leader, the caller is told the txid of every transaction that was sent and
//! not answered, and can ask its outcome.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use decree_proto::v1;
use decree_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::{mpsc, oneshot};

use crate::leader::Coordinators;
use tonic::Status;

type Answer = Result<v1::TransactResponse, Status>;

struct Pending {
    id: u64,
    request: v1::TransactRequest,
    reply: oneshot::Sender<Answer>,
}

pub(crate) struct Multiplexer {
    coordinator: CoordinatorClient<Coordinators>,
    /// A group: name each transaction by a leased txid, and tell the caller
    /// which ones the stream lost after sending them (their outcome can be asked).
    lease: bool,
    /// The open stream's queue; a closed one means: open another.
    link: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    /// Set once the coordinator said it has no TransactStream.
    unary: Arc<AtomicBool>,
    next_id: AtomicU64,
    /// How long a transaction may wait for its answer.
    deadline: Duration,
}

impl Multiplexer {
    pub fn new(coordinator: CoordinatorClient<Coordinators>, deadline: Duration, lease: bool) -> Self {
        Multiplexer {
            coordinator,
            lease,
            link: Mutex::new(None),
            unary: Arc::new(AtomicBool::new(false)),
            next_id: AtomicU64::new(1),
            deadline,
        }
    }

    /// Runs one one-shot transaction.
    pub async fn transact(&self, request: v1::TransactRequest) -> Answer {
        if self.unary.load(Ordering::Relaxed) {
            return unary(self.coordinator.clone(), request).await;
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending { id: self.next_id.fetch_add(1, Ordering::Relaxed), request, reply };
        self.send(pending);
        match tokio::time::timeout(self.deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                Err(Status::unknown("the transaction stream ended without an answer: outcome not known"))
            }
            Err(_) => {
                Err(Status::deadline_exceeded("no answer from the coordinator in time: outcome not known"))
            }
        }
    }

    fn send(&self, pending: Pending) {
        let mut link = self.link.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let pending = match link.as_ref() {
            Some(queue) => match queue.send(pending) {
                Ok(()) => return,
                // That stream ended: open another.
                Err(mpsc::error::SendError(pending)) => pending,
            },
            None => pending,
        };
        // Each entry is one caller's transaction, its `transact` awaiting the
        // answer: what waits here is at most the callers' own concurrency, as
        // many unary calls would be in flight.
        let (queue, drained) = mpsc::unbounded_channel();
        // Queued before the stream starts: a stream that fails at once (UNIMPLEMENTED)
        // closes its queue, and a send after that would drop the transaction.
        queue.send(pending).unwrap_or_else(|_| unreachable!("the receiver is alive until run() gets it"));
        let stream =
            Stream { coordinator: self.coordinator.clone(), unary: self.unary.clone(), lease: self.lease };
        tokio::spawn(stream.run(drained));
        *link = Some(queue);
    }
}

struct Stream {
    coordinator: CoordinatorClient<Coordinators>,
    unary: Arc<AtomicBool>,
    lease: bool,
}

/// How many txids a stream asks for at a time.
const LEASE_ASK: u32 = 1024;
/// The request id of a lease request (transactions' ids start at 1).
const LEASE_ID: u64 = 0;

/// Txids leased to a stream, taken in order.
struct Lease {
    next: decree_proto::TxId,
    end: u64,
    /// Asked again after this, or when few are left.
    renew_at: Instant,
    /// Not used after this: the coordinator's lease outlives it by half.
    usable_until: Instant,
}

impl Lease {
    fn of(lease: &v1::TxidLease, now: Instant) -> Option<Lease> {
        let first: decree_proto::TxId = lease.first.parse().ok()?;
        let valid = Duration::from_millis(lease.valid_ms.into());
        Some(Lease {
            next: first,
            end: first.sequence + u64::from(lease.count),
            renew_at: now + valid / 4,
            usable_until: now + valid / 2,
        })
    }

    fn take(&mut self, now: Instant) -> Option<decree_proto::TxId> {
        if self.next.sequence >= self.end || now >= self.usable_until {
            return None;
        }
        let txid = self.next;
        self.next.sequence += 1;
        Some(txid)
    }

    fn low(&self, now: Instant) -> bool {
        self.end - self.next.sequence < u64::from(LEASE_ASK / 4) || now >= self.renew_at
    }
}

/// What a stream sends: transactions, once each has a txid when leasing.
struct Outbox {
    wire: mpsc::UnboundedSender<v1::TransactStreamRequest>,
    /// Leasing, or no longer (the coordinator does not lease).
    leasing: bool,
    lease: Option<Lease>,
    asked: bool,
    /// Waiting for a leased txid.
    waiting: VecDeque<Pending>,
}

impl Outbox {
    fn lease_request() -> v1::TransactStreamRequest {
        v1::TransactStreamRequest { id: LEASE_ID, lease_txids: LEASE_ASK, ..Default::default() }
    }

    /// Sends what can be sent; false once the stream is closed.
    fn flush(
        &mut self,
        pending: &mut HashMap<u64, oneshot::Sender<Answer>>,
        named: &mut HashMap<u64, String>,
    ) -> bool {
        let now = Instant::now();
        while !self.waiting.is_empty() {
            let txid = match self.lease.as_mut() {
                _ if !self.leasing => None,
                Some(lease) => match lease.take(now) {
                    Some(txid) => Some(txid),
                    None => break,
                },
                None => break,
            };
            let Pending { id, request, reply } = self.waiting.pop_front().expect("front was some");
            pending.insert(id, reply);
            if let Some(txid) = txid {
                named.insert(id, txid.to_string());
            }
            let message = v1::TransactStreamRequest {
                id,
                request: Some(request),
                trace_context: HashMap::new(),
                lease_txids: 0,
                txid: txid.map(|t| t.to_string()).unwrap_or_default(),
            };
            if self.wire.send(message).is_err() {
                return false;
            }
        }
        let low = self.lease.as_ref().is_none_or(|lease| lease.low(now));
        if self.leasing && !self.asked && low {
            self.asked = true;
            return self.wire.send(Self::lease_request()).is_ok();
        }
        true
    }
}

impl Stream {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Pending>) {
        let (wire, outbound) = mpsc::unbounded_channel::<v1::TransactStreamRequest>();
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
        let mut answers = match self.coordinator.transact_stream(outbound).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                // Nothing was sent: each transaction goes as a unary Transact,
                // which fails (or not) on its own.
                self.unary.store(true, Ordering::Relaxed);
                self.all_unary(queue).await;
                return;
            }
            Err(status) => {
                // Nothing was sent (messages go only once the stream is open).
                queue.close();
                while let Some(queued) = queue.recv().await {
                    let _ = queued.reply.send(Err(unsent(Status::new(
                        status.code(),
                        format!("the transaction stream could not open ({}); not started", status.message()),
                    ))));
                }
                return;
            }
        };
        let mut pending: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
        // The txids of requests not answered yet, leased or announced.
        let mut named: HashMap<u64, String> = HashMap::new();
        let mut outbox =
            Outbox { wire, leasing: self.lease, lease: None, asked: false, waiting: VecDeque::new() };
        let closed = || Status::unknown("the transaction stream closed: outcome not known");
        let ended = loop {
            if !outbox.flush(&mut pending, &mut named) {
                break closed();
            }
            tokio::select! {
                next = queue.recv() => {
                    // The multiplexer keeps the queue's sender while the stream is in use.
                    let Some(next) = next else { return };
                    outbox.waiting.push_back(next);
                }
                answer = answers.message() => match answer {
                    Ok(Some(answer)) if answer.id == LEASE_ID => {
                        outbox.asked = false;
                        match answer.lease.as_ref().and_then(|l| Lease::of(l, Instant::now())) {
                            Some(lease) => outbox.lease = Some(lease),
                            // A coordinator that does not lease: its txids are its own.
                            None => outbox.leasing = false,
                        }
                    }
                    Ok(Some(answer)) if answer.started => {
                        named.insert(answer.id, answer.txid);
                    }
                    Ok(Some(answer)) => {
                        named.remove(&answer.id);
                        if decree_proto::Reason::from_wire(answer.reason_code) == decree_proto::Reason::TxidRefused {
                            // Fenced, or expired on the way: the next ones would be too.
                            outbox.lease = None;
                        }
                        if let Some(reply) = pending.remove(&answer.id) {
                            let _ = reply.send(answer_of(answer));
                        }
                    }
                    // Every request the coordinator read was answered: the rest were not started.
                    Ok(None) => break unsent(Status::unavailable("the coordinator is shutting down; the transaction was not started")),
                    Err(status) => break Status::unknown(format!("the connection to the coordinator broke ({}): outcome not known", status.message())),
                },
            }
        };
        for queued in outbox.waiting.drain(..) {
            let _ = queued.reply.send(Err(unsent(Status::unavailable(
                "the transaction stream ended before sending it; not started",
            ))));
        }
        queue.close();
        for (id, reply) in pending {
            let mut status = ended.clone();
            if let Some(txid) = named.get(&id).and_then(|t| t.parse().ok()) {
                // Its txid is known: its outcome can be asked.
                status = Status::unknown(format!("{}; its txid is known", ended.message()));
                status.metadata_mut().insert(decree_proto::TXID_METADATA, txid);
            }
            let _ = reply.send(Err(status));
        }
        // recv until None: after close, only that is sure to see every queued one.
        while let Some(queued) = queue.recv().await {
            let _ = queued.reply.send(Err(unsent(Status::unavailable(
                "the transaction stream ended before sending it; not started",
            ))));
        }
    }

    /// Sends everything queued as unary Transacts; no more can be queued here
    /// (a closed queue makes the multiplexer open another stream).
    async fn all_unary(&self, mut queue: mpsc::UnboundedReceiver<Pending>) {
        queue.close();
        // recv until None: after close, only that is sure to see every queued one.
        while let Some(pending) = queue.recv().await {
            let coordinator = self.coordinator.clone();
            tokio::spawn(async move {
                let _ = pending.reply.send(unary(coordinator, pending.request).await);
            });
        }
    }
}

/// Marks what this module knows was never sent to a coordinator.
const NOT_SENT: &str = "decree-client-not-sent";

fn unsent(mut status: Status) -> Status {
    status.metadata_mut().insert(NOT_SENT, tonic::metadata::MetadataValue::from_static("1"));
    status
}

/// True when the transaction that met `status` was never sent: it did not start.
pub(crate) fn not_sent(status: &Status) -> bool {
    status.metadata().get(NOT_SENT).is_some()
}

/// One transaction as a unary Transact.
async fn unary(mut coordinator: CoordinatorClient<Coordinators>, request: v1::TransactRequest) -> Answer {
    Ok(coordinator.transact(request).await?.into_inner())
}

/// A stream answer as the unary Transact's result.
fn answer_of(answer: v1::TransactStreamAnswer) -> Answer {
    if answer.code == 0 {
        return answer.response.ok_or_else(|| Status::internal("an answer without a response"));
    }
    let status = Status::new(tonic::Code::from_i32(answer.code), answer.message);
    let mut status = decree_proto::Reason::from_wire(answer.reason_code).on_status(status);
    if let Ok(txid) = answer.txid.parse() {
        if !answer.txid.is_empty() {
            status.metadata_mut().insert(decree_proto::TXID_METADATA, txid);
        }
    }
    Err(status)
}
