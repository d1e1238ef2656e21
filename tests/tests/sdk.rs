//! The SDK sends one-shot transactions as messages on one TransactStream; a
//! coordinator without it (a stand-in served from the test, answering
//! UNIMPLEMENTED) gets unary Transacts, with the same answers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{init, serve_in_test};
use decree_client::{v1, Client, Outcome};
use decree_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use decree_proto::v1::registry_server::{Registry, RegistryServer};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct UnaryOnly {
    transacts: Arc<AtomicUsize>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this stand-in"))
}

#[tonic::async_trait]
impl Coordinator for UnaryOnly {
    async fn transact(
        &self,
        request: Request<v1::TransactRequest>,
    ) -> Result<Response<v1::TransactResponse>, Status> {
        let n = self.transacts.fetch_add(1, Ordering::SeqCst) + 1;
        let participants = request.into_inner().branches.into_iter().map(|b| b.participant).collect();
        Ok(Response::new(v1::TransactResponse {
            txid: format!("0000abcd-1-{n}"),
            outcome: v1::Outcome::Committed as i32,
            reason: String::new(),
            participants,
            ..Default::default()
        }))
    }

    type TransactStreamStream = tokio_stream::Empty<Result<v1::TransactStreamAnswer, Status>>;

    async fn transact_stream(
        &self,
        _request: Request<tonic::Streaming<v1::TransactStreamRequest>>,
    ) -> Result<Response<Self::TransactStreamStream>, Status> {
        unimplemented()
    }

    async fn begin(&self, _: Request<v1::BeginRequest>) -> Result<Response<v1::BeginResponse>, Status> {
        unimplemented()
    }

    async fn enlist(&self, _: Request<v1::EnlistRequest>) -> Result<Response<v1::EnlistResponse>, Status> {
        unimplemented()
    }

    async fn commit(
        &self,
        _: Request<v1::CommitTransactionRequest>,
    ) -> Result<Response<v1::TransactResponse>, Status> {
        unimplemented()
    }

    async fn abort(
        &self,
        _: Request<v1::AbortTransactionRequest>,
    ) -> Result<Response<v1::AbortTransactionResponse>, Status> {
        unimplemented()
    }

    async fn get_outcome(
        &self,
        _: Request<v1::GetOutcomeRequest>,
    ) -> Result<Response<v1::GetOutcomeResponse>, Status> {
        unimplemented()
    }

    async fn retry(&self, _: Request<v1::RetryRequest>) -> Result<Response<v1::RetryResponse>, Status> {
        unimplemented()
    }

    async fn list_stuck(
        &self,
        _: Request<v1::ListStuckRequest>,
    ) -> Result<Response<v1::ListStuckResponse>, Status> {
        unimplemented()
    }

    async fn list_transactions(
        &self,
        _: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        unimplemented()
    }

    async fn get_stats(
        &self,
        _: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        unimplemented()
    }
}

#[tonic::async_trait]
impl Registry for UnaryOnly {
    async fn enroll(&self, _: Request<v1::EnrollRequest>) -> Result<Response<v1::EnrollResponse>, Status> {
        unimplemented()
    }

    async fn heartbeat(
        &self,
        _: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        unimplemented()
    }

    async fn move_participant(
        &self,
        _: Request<v1::MoveParticipantRequest>,
    ) -> Result<Response<v1::MoveParticipantResponse>, Status> {
        unimplemented()
    }

    async fn list_participants(
        &self,
        _: Request<v1::ListParticipantsRequest>,
    ) -> Result<Response<v1::ListParticipantsResponse>, Status> {
        let p1 = v1::ParticipantInfo {
            name: "p1".into(),
            address: "http://127.0.0.1:9".into(),
            state: "up".into(),
            ..Default::default()
        };
        Ok(Response::new(v1::ListParticipantsResponse { participants: vec![p1] }))
    }

    // A coordinator from before the ring had epochs: the SDK routes by the participant list.
    async fn get_ring(
        &self,
        _: Request<v1::GetRingRequest>,
    ) -> Result<Response<v1::GetRingResponse>, Status> {
        unimplemented()
    }

    async fn change_ring(
        &self,
        _: Request<v1::ChangeRingRequest>,
    ) -> Result<Response<v1::ChangeRingResponse>, Status> {
        unimplemented()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_transact_stream_gets_unary_transacts() {
    init();
    let coordinator = UnaryOnly::default();
    let routes = Routes::new(CoordinatorServer::new(coordinator.clone()))
        .add_service(RegistryServer::new(coordinator.clone()));
    let url = serve_in_test(routes).await;
    let client = Client::connect(&url).await.unwrap();
    for n in 1..=3 {
        let branch = v1::Branch { participant: "p1".into(), payload: Vec::new() };
        let result = client.transact_branches(vec![branch]).await.unwrap();
        assert_eq!(result.outcome, Outcome::Committed);
        assert_eq!(result.txid, format!("0000abcd-1-{n}"));
        assert_eq!(result.participants, vec!["p1".to_string()]);
    }
    assert_eq!(coordinator.transacts.load(Ordering::SeqCst), 3, "each went as a unary Transact");
}

/// A TransactStream handles at most `--max-concurrent-streams` transactions at
/// once, like the HTTP/2 stream limit for unary calls; with 40 in flight and a
/// limit of 2 the rest wait their turn (the stream is not read): none is
/// refused or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_small_stream_limit_every_streamed_transaction_completes() {
    init();
    let mut options = decree_tests::Options::new(2);
    options.coordinator_args = vec!["--max-concurrent-streams".into(), "2".into()];
    let cluster = decree_tests::Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let transfers = (0..40).map(|i| {
        let ops = vec![
            decree_client::KvOp::Add { key: format!("a{i}"), delta: -1 },
            decree_client::KvOp::Add { key: format!("b{i}"), delta: 1 },
        ];
        client.transact(ops)
    });
    for answer in futures::future::join_all(transfers).await {
        assert_eq!(answer.unwrap().outcome, Outcome::Committed);
    }
}
