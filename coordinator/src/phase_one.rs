//! Phase one over streams: the Prepares for one participant go out on one
//! long-lived PrepareStream call, and each vote comes back as soon as it is
//! ready, naming its txid. Under load that turns two unary RPCs per
//! transaction into two messages on open streams.
//!
//! A stream that breaks (the participant restarted or shut down, the
//! connection dropped) fails the Prepares it carried that have no answer yet,
//! exactly as a failed Prepare RPC would (the engine aborts those
//! transactions, and tells the participant in case it prepared); the next
//! Prepare opens a new stream. Votes not in by the prepare deadline are the
//! engine's timer's business, as for unary Prepares. A participant that
//! answers PrepareStream with UNIMPLEMENTED gets unary Prepares from then on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{v1, ParticipantName, TxId};
use decree_runtime::trace;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{debug, info, Instrument, Span};

use crate::engine::{Event, VoteResult};
use crate::registry::Registry;
use crate::runtime::{call, traced};
use crate::wire::{self, vote_of};

/// A Prepare to send.
pub(crate) struct Outgoing {
    pub txid: TxId,
    pub request: v1::PrepareRequest,
    /// The transaction's span.
    pub span: Span,
}

/// The open stream to one participant: a queue its task drains.
struct Link {
    queue: mpsc::UnboundedSender<Outgoing>,
    /// Set once the participant said it has no PrepareStream; outlives the link.
    unary: Arc<AtomicBool>,
}

pub(crate) struct Prepares {
    links: HashMap<ParticipantName, Link>,
    registry: Arc<Registry>,
    events: mpsc::UnboundedSender<Event>,
    /// Deadline of a unary Prepare, and of opening a stream.
    timeout: Duration,
}

impl Prepares {
    pub fn new(registry: Arc<Registry>, events: mpsc::UnboundedSender<Event>, timeout: Duration) -> Self {
        Prepares { links: HashMap::new(), registry, events, timeout }
    }

    /// Sends a Prepare to `participant`; its vote comes back as [`Event::Voted`].
    pub fn prepare(&mut self, participant: &ParticipantName, outgoing: Outgoing) {
        let unary = self.links.get(participant).map(|link| link.unary.clone()).unwrap_or_default();
        if unary.load(Ordering::Relaxed) {
            let client = self.registry.client(participant);
            crate::tasks::spawn(prepare_one(
                client,
                self.timeout,
                participant.clone(),
                outgoing,
                self.events.clone(),
            ));
            return;
        }
        let outgoing = match self.links.get(participant) {
            Some(link) => match link.queue.send(outgoing) {
                Ok(()) => return,
                // That stream ended: open another.
                Err(mpsc::error::SendError(outgoing)) => outgoing,
            },
            None => outgoing,
        };
        // Bounded by admission: a transaction holds one of `--max-in-flight`
        // slots before its Prepares are queued, so at most that many wait here.
        let (queue, drained) = mpsc::unbounded_channel();
        let stream = Stream {
            participant: participant.clone(),
            client: self.registry.client(participant),
            events: self.events.clone(),
            timeout: self.timeout,
            unary: unary.clone(),
        };
        // The first Prepare goes with the stream, not through its queue: the
        // stream may end (UNIMPLEMENTED, say) and close the queue before a
        // send here, which would drop that Prepare unanswered.
        crate::tasks::spawn(stream.run(outgoing, drained));
        self.links.insert(participant.clone(), Link { queue, unary });
    }
}

struct Stream {
    participant: ParticipantName,
    client: Option<ParticipantClient<Channel>>,
    events: mpsc::UnboundedSender<Event>,
    timeout: Duration,
    unary: Arc<AtomicBool>,
}

impl Stream {
    async fn run(self, first: Outgoing, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
        let Some(mut client) = self.client.clone() else {
            return self.fail_all(&mut queue, [first.txid].into(), "not enrolled");
        };
        let (wire, outbound) = mpsc::unbounded_channel::<v1::PrepareRequest>();
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
        let mut answers = match tokio::time::timeout(self.timeout, client.prepare_stream(outbound)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                info!(participant = %self.participant, "no PrepareStream: sending one Prepare per branch");
                self.unary.store(true, Ordering::Relaxed);
                queue.close();
                let queued = std::iter::from_fn(|| queue.try_recv().ok());
                for outgoing in std::iter::once(first).chain(queued) {
                    let participant = self.participant.clone();
                    crate::tasks::spawn(prepare_one(
                        self.client.clone(),
                        self.timeout,
                        participant,
                        outgoing,
                        self.events.clone(),
                    ));
                }
                return;
            }
            Ok(Err(status)) => return self.fail_all(&mut queue, [first.txid].into(), status.message()),
            Err(_) => return self.fail_all(&mut queue, [first.txid].into(), "no answer before the deadline"),
        };
        let mut pending = HashSet::new();
        let ended = if !carry(&wire, &mut pending, first) {
            "the stream closed".to_owned()
        } else {
            loop {
                tokio::select! {
                    outgoing = queue.recv() => {
                        // The actor keeps the queue's sender while the stream is in use.
                        let Some(outgoing) = outgoing else { return };
                        if !carry(&wire, &mut pending, outgoing) {
                            break "the stream closed".to_owned();
                        }
                    }
                    answer = answers.message() => match answer {
                        Ok(Some(answer)) => self.answered(&mut pending, answer),
                        Ok(None) => break "the participant ended the stream".to_owned(),
                        Err(status) => break status.message().to_owned(),
                    },
                }
            }
        };
        debug!(participant = %self.participant, reason = %ended, unanswered = pending.len(), "prepare stream ended");
        self.fail_all(&mut queue, pending, &ended);
    }

    fn answered(&self, pending: &mut HashSet<TxId>, answer: v1::PrepareAnswer) {
        let Ok(txid) = answer.txid.parse::<TxId>() else { return };
        if !pending.remove(&txid) {
            return; // not a Prepare of this stream
        }
        let vote = match (answer.code, answer.response) {
            (0, Some(response)) => vote_of(response),
            (0, None) => VoteResult::Failed { error: "an answer without a vote".into() },
            (_, _) => VoteResult::Failed { error: answer.message },
        };
        let _ = self.events.send(Event::Voted { txid, participant: self.participant.clone(), vote });
    }

    /// The stream is over: what it carried without an answer, and what is
    /// still queued for it, failed. Closing the queue first makes the next
    /// Prepare open a new stream instead of landing here.
    fn fail_all(&self, queue: &mut mpsc::UnboundedReceiver<Outgoing>, pending: HashSet<TxId>, error: &str) {
        queue.close();
        let queued = std::iter::from_fn(|| queue.try_recv().ok()).map(|outgoing| outgoing.txid);
        for txid in pending.into_iter().chain(queued) {
            let vote = VoteResult::Failed { error: error.to_owned() };
            let _ = self.events.send(Event::Voted { txid, participant: self.participant.clone(), vote });
        }
    }
}

/// Puts a Prepare on the stream, its txid among those awaiting an answer;
/// false if the stream has closed.
fn carry(
    wire: &mpsc::UnboundedSender<v1::PrepareRequest>,
    pending: &mut HashSet<TxId>,
    outgoing: Outgoing,
) -> bool {
    let Outgoing { txid, mut request, span } = outgoing;
    request.trace_context = trace::context_of(&span);
    pending.insert(txid);
    wire.send(request).is_ok()
}

/// One unary Prepare RPC; its vote comes back as [`Event::Voted`].
pub(crate) async fn prepare_one(
    client: Option<ParticipantClient<Channel>>,
    timeout: Duration,
    participant: ParticipantName,
    outgoing: Outgoing,
    events: mpsc::UnboundedSender<Event>,
) {
    let Outgoing { txid, request, span } = outgoing;
    let request = traced(request, &span);
    let answer =
        call(client, timeout, |mut c| async move { c.prepare(request).await }).instrument(span).await;
    let vote = wire::voted(answer);
    let _ = events.send(Event::Voted { txid, participant, vote });
}
