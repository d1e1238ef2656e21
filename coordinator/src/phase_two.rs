//! Phase two, coalesced: the Commits due to one participant go out together,
//! in CommitBatch RPCs, at most [`BATCHES_IN_FLIGHT`] at a time per
//! participant. Whatever falls due while those are out rides the next one, so
//! under load one RPC carries many commits, and an idle participant still gets
//! a lone Commit at once: nothing waits for a batch to fill.
//!
//! A participant that answers CommitBatch with UNIMPLEMENTED (one speaking
//! only the required RPCs, in any language) gets one Commit per transaction
//! from then on. Each commit's answer becomes the engine event its own Commit
//! would have produced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{ParticipantName, TxId};
use decree_runtime::{crash, trace};
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
/// Commits per CommitBatch RPC, at the coordinator.
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

impl Sender {
    async fn drain(self, mut due: mpsc::UnboundedReceiver<Due>) {
        let permits = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        loop {
            let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
            let Some(first) = due.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MOST_PER_BATCH {
                match due.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let sender = self.clone();
            crate::tasks::spawn(async move {
                sender.send(batch).await;
                drop(permit);
            });
        }
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
                        let code = tonic::Code::from_i32(result.code);
                        let answer = match code {
                            tonic::Code::Ok => {
                                Ok(wire::acked(result.ack, result.reason_code, result.message))
                            }
                            _ => Err(Unanswered::Refused(tonic::Status::new(code, result.message))),
                        };
                        self.answered(due, answer);
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
