//! A stand-in participant served from the test itself: it votes YES to
//! every Prepare and answers Commit as the test says. It has no
//! PrepareStream, so the coordinator's fallback to unary Prepares is used,
//! and serves the phase-two calls the test chooses ([`Wire`]): by default
//! neither CommitStream nor CommitBatch, so the fallback to one Commit each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use decree_client::v1;
use decree_proto::v1::participant_server::{Participant, ParticipantServer};
use decree_proto::v1::registry_client::RegistryClient;
use decree_tests::Cluster;
use futures::StreamExt;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use super::serve_in_test;

/// How the stand-in answers Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ack,
    /// FAILED_PRECONDITION: the kind of refusal retrying cannot mend.
    Refuse,
    /// UNAVAILABLE: the kind that may go away by itself.
    Unavailable,
}

/// The phase-two calls the stand-in serves besides Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Commit only.
    Unary,
    /// CommitBatch too.
    Batch,
    /// CommitStream and CommitBatch too.
    Stream,
}

#[derive(Clone)]
pub struct StandIn {
    answer: Arc<Mutex<Answer>>,
    commits: Arc<AtomicUsize>,
    wire: Wire,
    /// Set: what comes on a CommitStream is counted and never answered.
    silent: Arc<AtomicBool>,
    /// Commits received, by the call that carried them.
    by_call: Arc<Mutex<HashMap<&'static str, usize>>>,
}

impl StandIn {
    pub fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
    }

    /// Commits received by `call` ("Commit", "CommitBatch", "CommitStream").
    pub fn commits_by(&self, call: &str) -> usize {
        self.by_call.lock().unwrap().get(call).copied().unwrap_or(0)
    }

    /// Stops (or resumes) answering on CommitStreams.
    pub fn silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }

    /// Counts a commit that came by `call` and answers it as the test says.
    fn commit_by(&self, call: &'static str) -> Result<(), Status> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        *self.by_call.lock().unwrap().entry(call).or_default() += 1;
        match *self.answer.lock().unwrap() {
            Answer::Ack => Ok(()),
            Answer::Refuse => Err(Status::failed_precondition("this branch was rolled back by hand")),
            Answer::Unavailable => Err(Status::unavailable("busy")),
        }
    }

    /// Answers a batch of commits that came by `call`, each as its own Commit.
    fn commit_all(&self, call: &'static str, request: v1::CommitBatchRequest) -> v1::CommitBatchResponse {
        let results = (request.commits.into_iter())
            .map(|commit| {
                let (code, message) = match self.commit_by(call) {
                    Ok(()) => (0, String::new()),
                    Err(status) => (status.code() as i32, status.message().to_owned()),
                };
                v1::CommitResult { txid: commit.txid, code, message, ..Default::default() }
            })
            .collect();
        v1::CommitBatchResponse { results }
    }
}

#[tonic::async_trait]
impl Participant for StandIn {
    async fn prepare(
        &self,
        _request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        Ok(Response::new(v1::PrepareResponse { vote: v1::Vote::Yes as i32, ..Default::default() }))
    }

    async fn commit(
        &self,
        _request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        self.commit_by("Commit").map(|()| Response::new(v1::CommitResponse::default()))
    }

    type PrepareStreamStream = tokio_stream::Empty<Result<v1::PrepareAnswer, Status>>;

    /// Streams are optional: the coordinator falls back to one Prepare each.
    async fn prepare_stream(
        &self,
        _request: Request<tonic::Streaming<v1::PrepareRequest>>,
    ) -> Result<Response<Self::PrepareStreamStream>, Status> {
        Err(Status::unimplemented("one Prepare at a time here"))
    }

    /// Batches are optional: the coordinator falls back to one Commit each.
    async fn commit_batch(
        &self,
        request: Request<v1::CommitBatchRequest>,
    ) -> Result<Response<v1::CommitBatchResponse>, Status> {
        match self.wire {
            Wire::Unary => Err(Status::unimplemented("one Commit at a time here")),
            Wire::Batch | Wire::Stream => {
                Ok(Response::new(self.commit_all("CommitBatch", request.into_inner())))
            }
        }
    }

    type CommitStreamStream = futures::stream::BoxStream<'static, Result<v1::CommitBatchResponse, Status>>;

    /// Streams are optional: the coordinator falls back to CommitBatch, then to one Commit each.
    async fn commit_stream(
        &self,
        request: Request<tonic::Streaming<v1::CommitBatchRequest>>,
    ) -> Result<Response<Self::CommitStreamStream>, Status> {
        if self.wire != Wire::Stream {
            return Err(Status::unimplemented("no commit stream here"));
        }
        let this = self.clone();
        let answers = request.into_inner().filter_map(move |message| {
            let answer = message.ok().map(|request| this.commit_all("CommitStream", request));
            let silent = this.silent.load(Ordering::SeqCst);
            futures::future::ready(answer.filter(|_| !silent).map(Ok))
        });
        Ok(Response::new(answers.boxed()))
    }

    async fn abort(
        &self,
        _request: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        Ok(Response::new(v1::AbortResponse::default()))
    }

    async fn list_in_doubt(
        &self,
        _request: Request<v1::ListInDoubtRequest>,
    ) -> Result<Response<v1::ListInDoubtResponse>, Status> {
        Ok(Response::new(v1::ListInDoubtResponse::default()))
    }

    async fn list_locks(
        &self,
        _request: Request<v1::ListLocksRequest>,
    ) -> Result<Response<v1::ListLocksResponse>, Status> {
        Ok(Response::new(v1::ListLocksResponse::default()))
    }

    async fn resolve(
        &self,
        _request: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        Err(Status::unimplemented("not in this stand-in"))
    }

    async fn list_heuristics(
        &self,
        _request: Request<v1::ListHeuristicsRequest>,
    ) -> Result<Response<v1::ListHeuristicsResponse>, Status> {
        Ok(Response::new(v1::ListHeuristicsResponse::default()))
    }
}

/// Serves a stand-in participant named "standin" and enrolls it with the cluster's coordinator.
pub async fn stand_in(cluster: &Cluster, answer: Answer) -> StandIn {
    stand_in_on(cluster, answer, Wire::Unary).await
}

/// As [`stand_in`], serving the phase-two calls of `wire`.
pub async fn stand_in_on(cluster: &Cluster, answer: Answer, wire: Wire) -> StandIn {
    let participant = StandIn {
        answer: Arc::new(Mutex::new(answer)),
        commits: Arc::new(AtomicUsize::new(0)),
        wire,
        silent: Arc::new(AtomicBool::new(false)),
        by_call: Arc::new(Mutex::new(HashMap::new())),
    };
    let address = serve_in_test(Routes::new(ParticipantServer::new(participant.clone()))).await;
    let mut registry = RegistryClient::connect(cluster.coordinator_url()).await.unwrap();
    registry
        .enroll(v1::EnrollRequest { name: "standin".into(), address, ..Default::default() })
        .await
        .unwrap();
    participant
}
