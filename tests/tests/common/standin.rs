//! A stand-in participant served from the test itself: it votes YES to
//! every Prepare and answers Commit as the test says (and has neither
//! PrepareStream nor CommitBatch, so the coordinator's fallbacks to unary
//! Prepares and Commits are used).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use decree_client::v1;
use decree_proto::v1::participant_server::{Participant, ParticipantServer};
use decree_proto::v1::registry_client::RegistryClient;
use decree_tests::Cluster;
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

#[derive(Clone)]
pub struct StandIn {
    answer: Arc<Mutex<Answer>>,
    commits: Arc<AtomicUsize>,
}

impl StandIn {
    pub fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
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
        self.commits.fetch_add(1, Ordering::SeqCst);
        let answer = *self.answer.lock().unwrap();
        match answer {
            Answer::Ack => Ok(Response::new(v1::CommitResponse::default())),
            Answer::Refuse => Err(Status::failed_precondition("this branch was rolled back by hand")),
            Answer::Unavailable => Err(Status::unavailable("busy")),
        }
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
        _request: Request<v1::CommitBatchRequest>,
    ) -> Result<Response<v1::CommitBatchResponse>, Status> {
        Err(Status::unimplemented("one Commit at a time here"))
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
    let participant =
        StandIn { answer: Arc::new(Mutex::new(answer)), commits: Arc::new(AtomicUsize::new(0)) };
    let address = serve_in_test(Routes::new(ParticipantServer::new(participant.clone()))).await;
    let mut registry = RegistryClient::connect(cluster.coordinator_url()).await.unwrap();
    registry
        .enroll(v1::EnrollRequest { name: "standin".into(), address, ..Default::default() })
        .await
        .unwrap();
    participant
}
