//! Phase two, coalesced: the Commits due to one participant go out together,
//! as messages on one long-lived CommitStream call: whatever fell due on one
//! turn of the actor rides one message, answered (naming each txid) once all
//! of its commits are durable. Under load one message carries many commits,
//! and an idle participant still gets a lone commit at once: nothing waits
//! for a batch to fill.
//!
//! A stream that breaks (the participant restarted or shut down, the
//! connection dropped) fails the commits it carried that have no answer yet,
//! and those not answered by the deadline fail alone; either way the engine
//! redelivers them. The next commit opens a new stream. A participant that
//! answers CommitStream with UNIMPLEMENTED gets CommitBatch RPCs (at most
//! [`BATCHES_IN_FLIGHT`] at a time); one that answers that with UNIMPLEMENTED
//! too (one speaking only the required RPCs, in any language) gets one Commit
//! per transaction. Each commit's answer becomes the engine event its own
//! Commit would have produced.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{v1, ParticipantName, TxId};
use decree_runtime::{crash, trace};
use foldhash::{HashMap, HashMapExt};
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;
use tracing::{debug, info, warn, Instrument, Span};

use crate::engine::Event;
use crate::registry::Registry;
use crate::runtime::{call, traced};
use crate::wire::{self, Unanswered};

/// Commits per participant on the wire at once, each a batch.
const BATCHES_IN_FLIGHT: usize = 2;
/// Most commits in one batch.
const MOST_PER_BATCH: usize = 1024;
/// Commits per CommitStream message or CommitBatch RPC, at the coordinator.
pub const BATCH_SIZE: &str = "decree_commit_batch_size";

/// A Commit due to a participant.
pub(crate) struct Due {
    pub txid: TxId,
    /// A redrive of a decision found at start (logged when delivered).
    pub recovery: bool,
    /// The transaction's span.
    pub span: Span,
}

/// One queue per participant, each drained by its own task.
pub(crate) struct Deliveries {
    queues: HashMap<ParticipantName, mpsc::UnboundedSender<Due>>,
    registry: Arc<Registry>,
    events: mpsc::UnboundedSender<Event>,
    timeout: Duration,
}

impl Deliveries {
    pub fn new(registry: Arc<Registry>, events: mpsc::UnboundedSender<Event>, timeout: Duration) -> Self {
        Deliveries { queues: HashMap::new(), registry, events, timeout }
    }

    /// Queues a Commit of `due.txid` to `participant`; its answer comes back as an event.
    pub fn commit(&mut self, participant: &ParticipantName, due: Due) {
        let queue = self.queues.entry(participant.clone()).or_insert_with(|| {
            // Bounded by admission: only a transaction holding one of
            // `--max-in-flight` slots (or a recovered decision) has a Commit due.
            let (queue, due) = mpsc::unbounded_channel();
            let sender = Sender {
                participant: participant.clone(),
                registry: self.registry.clone(),
                events: self.events.clone(),
                timeout: self.timeout,
                batching: Arc::new(AtomicBool::new(true)),
            };
            crate::tasks::spawn(sender.drain(due));
            queue
        });
        // The task ends only when this sender is dropped.
        let _ = queue.send(due);
    }
}

#[derive(Clone)]
struct Sender {
    participant: ParticipantName,
    registry: Arc<Registry>,
    events: mpsc::UnboundedSender<Event>,
    timeout: Duration,
    /// False once the participant said it has no CommitBatch.
    batching: Arc<AtomicBool>,
}

/// How a CommitStream ended.
enum Streamed {
    /// It broke (or could not open): the next commit opens another.
    Broke,
    /// The participant has none: these commits go by CommitBatch.
    Unimplemented(Vec<Due>),
    /// The actor is gone.
    Closed,
}

/// The commits on a CommitStream without an answer yet.
#[derive(Default)]
struct InFlight {
    /// Each txid's commits in the order sent, with the message each rode (a
    /// redelivery may be out beside the first).
    dues: HashMap<TxId, VecDeque<(u64, Due)>>,
    /// The messages sent, oldest first, from the oldest with a commit unanswered.
    messages: VecDeque<Message>,
    /// The sequence number of the front of `messages`.
    oldest: u64,
}

struct Message {
    deadline: tokio::time::Instant,
    txids: Vec<TxId>,
    /// Its commits without an answer.
    left: usize,
}

impl InFlight {
    fn carry(&mut self, batch: Vec<Due>, deadline: tokio::time::Instant) {
        let seq = self.oldest + self.messages.len() as u64;
        let txids: Vec<TxId> = batch.iter().map(|due| due.txid).collect();
        for due in batch {
            self.dues.entry(due.txid).or_default().push_back((seq, due));
        }
        self.messages.push_back(Message { deadline, left: txids.len(), txids });
    }

    /// The deadline of the oldest message with a commit unanswered.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.messages.front().map(|message| message.deadline)
    }

    /// The oldest commit of `txid` without an answer, now answered.
    fn answer(&mut self, txid: TxId) -> Option<Due> {
        let dues = self.dues.get_mut(&txid)?;
        let (seq, due) = dues.pop_front()?;
        if dues.is_empty() {
            self.dues.remove(&txid);
        }
        self.messages[(seq - self.oldest) as usize].left -= 1;
        self.settle();
        Some(due)
    }

    /// The commits of the oldest message still without an answer: past its deadline.
    fn expire(&mut self) -> Vec<Due> {
        let Some(message) = self.messages.pop_front() else { return Vec::new() };
        let seq = self.oldest;
        self.oldest += 1;
        let mut expired = Vec::new();
        for txid in message.txids {
            let Some(dues) = self.dues.get_mut(&txid) else { continue };
            if let Some(at) = dues.iter().position(|(rode, _)| *rode == seq) {
                expired.extend(dues.remove(at).map(|(_, due)| due));
            }
            if dues.is_empty() {
                self.dues.remove(&txid);
            }
        }
        self.settle();
        expired
    }

    /// Drops the answered messages from the front.
    fn settle(&mut self) {
        while self.messages.front().is_some_and(|message| message.left == 0) {
            self.messages.pop_front();
            self.oldest += 1;
        }
    }
}

impl Sender {
    async fn drain(self, mut due: mpsc::UnboundedReceiver<Due>) {
        // On a CommitStream while the participant has one.
        loop {
            let Some(first) = due.recv().await else { return };
            match self.stream(first, &mut due).await {
                Streamed::Broke => continue,
                Streamed::Closed => return,
                Streamed::Unimplemented(batch) => {
                    info!(participant = %self.participant, "no CommitStream: sending CommitBatch calls");
                    self.send(batch).await;
                    break;
                }
            }
        }
        let permits = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        loop {
            let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
            let Some(first) = due.recv().await else { return };
            let batch = gather(first, &mut due);
            let sender = self.clone();
            crate::tasks::spawn(async move {
                sender.send(batch).await;
                drop(permit);
            });
        }
    }

    /// Carries commits on one CommitStream, `first` and whatever falls due
    /// after it, until the stream breaks.
    async fn stream(&self, first: Due, due: &mut mpsc::UnboundedReceiver<Due>) -> Streamed {
        let Some(mut client) = self.registry.client(&self.participant) else {
            self.answered(first, Err(Unanswered::NotEnrolled));
            return Streamed::Broke;
        };
        let (wire, outbound) = mpsc::unbounded_channel::<v1::CommitBatchRequest>();
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
        let mut answers = match tokio::time::timeout(self.timeout, client.commit_stream(outbound)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                return Streamed::Unimplemented(gather(first, due));
            }
            Ok(Err(status)) => {
                self.answered(first, Err(Unanswered::Refused(status)));
                return Streamed::Broke;
            }
            Err(_) => {
                self.answered(first, Err(Unanswered::Deadline));
                return Streamed::Broke;
            }
        };
        let mut in_flight = InFlight::default();
        let mut next = Some(first);
        let timer = tokio::time::sleep(self.timeout);
        tokio::pin!(timer);
        let ended = loop {
            if let Some(first) = next.take() {
                let batch = gather(first, due);
                metrics::histogram!(BATCH_SIZE).record(batch.len() as f64);
                let request = wire::commit_batch_request(
                    batch.iter().map(|due| (due.txid, trace::context_of(&due.span))),
                );
                in_flight.carry(batch, tokio::time::Instant::now() + self.timeout);
                if wire.send(request).is_err() {
                    break "the stream closed".to_owned();
                }
            }
            let deadline = in_flight.deadline();
            if let Some(at) = deadline.filter(|at| *at != timer.deadline()) {
                timer.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                answer = answers.message() => match answer {
                    Ok(Some(response)) => {
                        for result in response.results {
                            let Ok(txid) = result.txid.parse::<TxId>() else { continue };
                            if let Some(due) = in_flight.answer(txid) {
                                self.answered(due, result_answer(result));
                            }
                        }
                    }
                    Ok(None) => break "the participant ended the stream".to_owned(),
                    Err(status) => break status.message().to_owned(),
                },
                more = due.recv() => match more {
                    Some(more) => next = Some(more),
                    None => return Streamed::Closed,
                },
                () = &mut timer, if deadline.is_some() => {
                    for due in in_flight.expire() {
                        self.answered(due, Err(Unanswered::Deadline));
                    }
                }
            }
        };
        debug!(participant = %self.participant, reason = %ended, unanswered = in_flight.dues.len(), "commit stream ended");
        // A broken stream is the wire's failure, never the commit's: redelivered.
        let status = tonic::Status::unavailable(format!("the commit stream broke: {ended}"));
        for (_, due) in in_flight.dues.into_values().flatten() {
            self.answered(due, Err(Unanswered::Refused(status.clone())));
        }
        Streamed::Broke
    }

    async fn send(&self, batch: Vec<Due>) {
        let client = self.registry.client(&self.participant);
        if batch.len() > 1 && self.batching.load(Ordering::Relaxed) {
            metrics::histogram!(BATCH_SIZE).record(batch.len() as f64);
            let request =
                wire::commit_batch_request(batch.iter().map(|due| (due.txid, trace::context_of(&due.span))));
            let answer =
                call(client.clone(), self.timeout, |mut c| async move { c.commit_batch(request).await });
            match answer.await {
                Ok(response) if response.results.len() == batch.len() => {
                    for (due, result) in batch.into_iter().zip(response.results) {
                        self.answered(due, result_answer(result));
                    }
                    return;
                }
                Ok(response) => {
                    let error = format!("{} results for {} commits", response.results.len(), batch.len());
                    warn!(participant = %self.participant, %error, "bad CommitBatch answer; redelivering");
                    for due in batch {
                        let _ = self.events.send(Event::CommitFailed {
                            txid: due.txid,
                            participant: self.participant.clone(),
                        });
                    }
                    return;
                }
                Err(Unanswered::Refused(status)) if status.code() == tonic::Code::Unimplemented => {
                    info!(participant = %self.participant, "no CommitBatch: sending one Commit per transaction");
                    self.batching.store(false, Ordering::Relaxed);
                }
                Err(unanswered) => {
                    for due in batch {
                        let answer = Err(unanswered.clone());
                        self.answered(due, answer);
                    }
                    return;
                }
            }
        }
        let singles = batch.into_iter().map(|due| {
            let client = client.clone();
            async move {
                let answer = commit_one(client, self.timeout, &due).await;
                self.answered(due, answer);
            }
        });
        futures::future::join_all(singles).await;
    }

    /// Turns a commit's answer into the engine's event.
    fn answered(&self, due: Due, answer: Result<wire::Acked, Unanswered>) {
        let (txid, participant) = (due.txid, self.participant.clone());
        let _entered = due.span.enter();
        let _ = self.events.send(delivered(txid, participant, due.recovery, answer));
    }
}

/// `first` and whatever else is due already, up to [`MOST_PER_BATCH`]: never waits.
fn gather(first: Due, due: &mut mpsc::UnboundedReceiver<Due>) -> Vec<Due> {
    let mut batch = vec![first];
    while batch.len() < MOST_PER_BATCH {
        match due.try_recv() {
            Ok(more) => batch.push(more),
            Err(_) => break,
        }
    }
    batch
}

/// One commit's answer in a CommitBatchResponse, as its own Commit's would be.
fn result_answer(result: v1::CommitResult) -> Result<wire::Acked, Unanswered> {
    match tonic::Code::from_i32(result.code) {
        tonic::Code::Ok => Ok(wire::acked(result.ack, result.reason_code, result.message)),
        code => Err(Unanswered::Refused(tonic::Status::new(code, result.message))),
    }
}

/// One Commit RPC, alone.
pub(crate) async fn commit_one(
    client: Option<ParticipantClient<Channel>>,
    timeout: Duration,
    due: &Due,
) -> Result<wire::Acked, Unanswered> {
    let request = traced(wire::commit_request(due.txid), &due.span);
    call(client, timeout, |mut c| async move { c.commit(request).await })
        .instrument(due.span.clone())
        .await
        .map(|r| wire::acked(r.ack, r.reason_code, r.reason))
}

/// The engine event a Commit's answer makes.
pub(crate) fn delivered(
    txid: TxId,
    participant: ParticipantName,
    recovery: bool,
    answer: Result<wire::Acked, Unanswered>,
) -> Event {
    match &answer {
        Ok(_) if recovery => {
            info!(%txid, %participant, "recovery: commit delivered");
            crash::point(crash::COORDINATOR_RECOVERY_MID_REDRIVE);
        }
        Ok(_) => {}
        Err(error) => debug!(%txid, %participant, %error, "commit not delivered"),
    }
    let event = wire::commit_event(txid, participant, answer);
    if let Event::CommitRefused { txid, participant, reason } = &event {
        warn!(%txid, %participant, %reason, "commit refused for good: redelivery stops until an operator retries");
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(n: u64) -> Due {
        Due { txid: TxId::new(1, 1, n), recovery: false, span: Span::none() }
    }

    fn txids(dues: &[Due]) -> Vec<u64> {
        dues.iter().map(|due| due.txid.sequence).collect()
    }

    #[test]
    fn a_message_leaves_the_deadlines_once_all_its_commits_are_answered() {
        let start = tokio::time::Instant::now();
        let second = Duration::from_secs(1);
        let mut in_flight = InFlight::default();
        in_flight.carry(vec![due(1), due(2)], start + second);
        in_flight.carry(vec![due(3)], start + 2 * second);
        assert_eq!(in_flight.deadline(), Some(start + second));
        // The second message answered first: the first still sets the deadline.
        assert_eq!(in_flight.answer(TxId::new(1, 1, 3)).map(|due| due.txid.sequence), Some(3));
        assert_eq!(in_flight.deadline(), Some(start + second));
        assert!(in_flight.answer(TxId::new(1, 1, 1)).is_some());
        assert_eq!(in_flight.deadline(), Some(start + second), "one of its commits is out still");
        assert!(in_flight.answer(TxId::new(1, 1, 2)).is_some());
        assert_eq!(in_flight.deadline(), None, "nothing out");
        assert!(in_flight.dues.is_empty());
        // An answer for nothing out (late, or never asked) is ignored.
        assert!(in_flight.answer(TxId::new(1, 1, 2)).is_none());
        assert!(in_flight.answer(TxId::new(1, 1, 9)).is_none());
    }

    #[test]
    fn the_deadline_expires_only_the_oldest_message_s_unanswered_commits() {
        let start = tokio::time::Instant::now();
        let second = Duration::from_secs(1);
        let mut in_flight = InFlight::default();
        in_flight.carry(vec![due(1), due(2), due(3)], start + second);
        // A redelivery of 2 rides the next message beside 4.
        in_flight.carry(vec![due(2), due(4)], start + 2 * second);
        assert!(in_flight.answer(TxId::new(1, 1, 1)).is_some());
        assert_eq!(txids(&in_flight.expire()), vec![2, 3], "the first message's unanswered commits");
        assert_eq!(in_flight.deadline(), Some(start + 2 * second));
        assert_eq!(in_flight.dues.len(), 2, "the redelivery of 2 and 4 are still out");
        // An answer for 2 now answers the redelivery.
        assert!(in_flight.answer(TxId::new(1, 1, 2)).is_some());
        assert_eq!(txids(&in_flight.expire()), vec![4]);
        assert_eq!(in_flight.deadline(), None);
        assert!(in_flight.expire().is_empty());
    }

    #[test]
    fn an_answer_to_a_txid_out_twice_answers_the_older() {
        let start = tokio::time::Instant::now();
        let mut in_flight = InFlight::default();
        in_flight.carry(vec![due(7)], start + Duration::from_secs(1));
        in_flight.carry(vec![due(7)], start + Duration::from_secs(2));
        assert!(in_flight.answer(TxId::new(1, 1, 7)).is_some());
        assert_eq!(
            in_flight.deadline(),
            Some(start + Duration::from_secs(2)),
            "the older message is settled"
        );
        assert!(in_flight.answer(TxId::new(1, 1, 7)).is_some());
        assert_eq!(in_flight.deadline(), None);
    }
}
