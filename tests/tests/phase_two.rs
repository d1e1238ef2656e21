//! Phase two against a participant that will not ack: a refusal retrying
//! cannot mend stops redelivery and waits for an operator (`decree stuck`,
//! `decree retry`); transient failures keep being redelivered, but never
//! faster than the participant's retry budget.
//!
//! The misbehaving participant is a stand-in served from the test itself:
//! it votes YES to every Prepare and answers Commit as the test says (and has
//! neither PrepareStream nor CommitBatch, so the coordinator's fallbacks to
//! unary Prepares and Commits are used).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{decree_async, init, metric, scrape, serve_in_test};
use decree_client::{kv_payload, v1, KvOp, Outcome};
use decree_proto::v1::participant_server::{Participant, ParticipantServer};
use decree_proto::v1::registry_client::RegistryClient;
use decree_tests::{poll, Cluster, Options};
use tonic::service::Routes;
use tonic::{Request, Response, Status};

/// How the stand-in answers Commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ack,
    /// FAILED_PRECONDITION: the kind of refusal retrying cannot mend.
    Refuse,
    /// UNAVAILABLE: the kind that may go away by itself.
    Unavailable,
}

#[derive(Clone)]
struct StandIn {
    answer: Arc<Mutex<Answer>>,
    commits: Arc<AtomicUsize>,
}

impl StandIn {
    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn commits(&self) -> usize {
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
async fn stand_in(cluster: &Cluster, answer: Answer) -> StandIn {
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

/// A cluster of one KV participant, whose coordinator serves metrics.
async fn cluster_with_metrics(coordinator_args: &[&str]) -> (Cluster, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut options = Options::new(1);
    options.coordinator_args = vec!["--metrics-listen".into(), addr.clone()];
    options.coordinator_args.extend(coordinator_args.iter().map(|a| a.to_string()));
    let cluster = Cluster::start(options).await.unwrap();
    poll(Duration::from_secs(10), "the metrics endpoint", || async {
        tokio::net::TcpStream::connect(&addr).await.ok().map(drop)
    })
    .await
    .unwrap();
    (cluster, addr)
}

/// Branches on the KV participant (one put of `key`) and on the stand-in.
fn branches(cluster: &Cluster, key: &str) -> Vec<v1::Branch> {
    let kv = cluster.participant_names()[0].clone();
    vec![
        v1::Branch {
            participant: kv,
            payload: kv_payload(vec![KvOp::Put { key: key.into(), value: b"1".to_vec() }]),
        },
        v1::Branch { participant: "standin".into(), payload: Vec::new() },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_stops_redelivery_until_an_operator_retries() {
    init();
    // Redeliveries every few milliseconds, were there any.
    let (cluster, metrics) =
        cluster_with_metrics(&["--redelivery-base-ms", "5", "--redelivery-cap-ms", "20"]).await;
    let url = cluster.coordinator_url();
    let standin = stand_in(&cluster, Answer::Refuse).await;
    let client = cluster.client().await.unwrap();

    let done = client.transact_branches(branches(&cluster, "k")).await.unwrap();
    assert_eq!(done.outcome, Outcome::Committed, "{}", done.reason);
    let listed = poll(Duration::from_secs(10), "the branch to be listed as stuck", || async {
        let run =
            decree_async(vec!["stuck".into(), "--coordinator".into(), url.clone(), "--json".into()]).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        let list = run.json().as_array().unwrap().clone();
        (!list.is_empty()).then_some(list)
    })
    .await
    .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["txid"], done.txid.as_str());
    assert_eq!(listed[0]["participant"], "standin");
    let reason = listed[0]["reason"].as_str().unwrap();
    assert_eq!(reason, "FailedPrecondition: this branch was rolled back by hand");

    // Retrying would have asked dozens of times by now; it asked once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(standin.commits(), 1, "a refusal retrying cannot mend is not retried");
    let page = scrape(&metrics).await;
    assert_eq!(metric(&page, "decree_branches_stuck"), 1.0, "{page}");
    assert_eq!(client.status(&done.txid).await.unwrap(), Outcome::Committed, "still committed, still owed");
    let read = client.get(&["k".to_owned()]).await.unwrap();
    assert_eq!(read["k"].as_deref(), Some(&b"1"[..]), "the other branch committed");

    // The operator mends the cause and retries: delivered, listed no more, ended.
    standin.answer(Answer::Ack);
    let run =
        decree_async(vec!["retry".into(), done.txid.clone(), "--coordinator".into(), url.clone()]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("redelivered to standin"), "{}", run.stdout);
    poll(Duration::from_secs(10), "the retried branch to end", || async {
        let page = scrape(&metrics).await;
        (metric(&page, "decree_transactions_in_flight") == 0.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(standin.commits(), 2);
    assert!(client.stuck().await.unwrap().is_empty());
    assert_eq!(metric(&scrape(&metrics).await, "decree_branches_stuck"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_to_a_failing_participant_stay_within_its_retry_budget() {
    init();
    const BUDGET: usize = 20;
    const TRANSACTIONS: usize = 100;
    // Unpaced, 100 transactions redelivering every 1-5 ms would ask thousands of times a second.
    let budget = BUDGET.to_string();
    let (cluster, metrics) = cluster_with_metrics(&[
        "--redelivery-base-ms",
        "1",
        "--redelivery-cap-ms",
        "5",
        "--retry-budget-per-s",
        &budget,
    ])
    .await;
    let standin = stand_in(&cluster, Answer::Unavailable).await;
    let client = cluster.client().await.unwrap();

    let answers = futures::future::join_all(
        (0..TRANSACTIONS).map(|i| client.transact_branches(branches(&cluster, &format!("k{i}")))),
    )
    .await;
    for answer in answers {
        assert_eq!(answer.unwrap().outcome, Outcome::Committed);
    }
    // Every transaction's first delivery is made (those are not retries)...
    poll(Duration::from_secs(10), "a first Commit of every transaction", || async {
        (standin.commits() >= TRANSACTIONS).then_some(())
    })
    .await
    .unwrap();
    // ...then only redeliveries are counted.
    let start = tokio::time::Instant::now();
    let before = standin.commits();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = standin.commits() - before;
    let seconds = start.elapsed().as_secs_f64();
    // At most the budget's rate over the window, plus one burst of it.
    let most = (BUDGET as f64 * (seconds + 1.0)).ceil() as usize;
    assert!(asked <= most, "{asked} redeliveries in {seconds:.2} s; the budget allows {most}");
    assert!(asked > 0, "redelivery goes on within the budget");
    assert!(metric(&scrape(&metrics).await, "decree_redeliveries_paced_total") > 0.0);

    // Once it acks, every transaction ends: nothing was dropped for want of budget.
    standin.answer(Answer::Ack);
    poll(Duration::from_secs(60), "every transaction to end", || async {
        let page = scrape(&metrics).await;
        (metric(&page, "decree_transactions_in_flight") == 0.0).then_some(())
    })
    .await
    .unwrap();
    assert!(client.stuck().await.unwrap().is_empty());
}
