//! Phase two against a participant that will not ack: a refusal retrying
//! cannot mend stops redelivery and waits for an operator (`decree stuck`,
//! `decree retry`); transient failures keep being redelivered, but never
//! faster than the participant's retry budget.
//!
//! The misbehaving participant is a stand-in served from the test itself:
//! it votes YES to every Prepare and answers Commit as the test says (it has
//! no PrepareStream, so the coordinator's fallback to unary Prepares is used,
//! and serves CommitStream and CommitBatch only where a test asks: the
//! coordinator uses the best of the three a participant serves).

mod common;

use std::time::Duration;

use common::standin::{stand_in, stand_in_on, Answer, Wire};
use common::{decree_async, init, metric, scrape};
use decree_client::{kv_payload, v1, KvOp, Outcome};
use decree_tests::{poll, Cluster, Options};

/// A cluster of one KV participant, whose coordinator serves metrics.
async fn cluster_with_metrics(coordinator_args: &[&str]) -> (Cluster, String) {
    let addr = common::metrics_address();
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

/// Commits `n` transactions at once, each a put of its own key and a branch on the stand-in.
async fn commit_many(cluster: &Cluster, client: &decree_client::Client, n: usize) {
    let answers = futures::future::join_all(
        (0..n).map(|i| client.transact_branches(branches(cluster, &format!("k{i}")))),
    )
    .await;
    for answer in answers {
        assert_eq!(answer.unwrap().outcome, Outcome::Committed);
    }
}

/// Waits until the coordinator whose metrics are at `metrics` has no transaction in flight.
async fn until_all_ended(metrics: &str, within: Duration) {
    poll(within, "every transaction to end", || async {
        let page = scrape(metrics).await;
        (metric(&page, "decree_transactions_in_flight") == 0.0).then_some(())
    })
    .await
    .unwrap();
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
    until_all_ended(&metrics, Duration::from_secs(10)).await;
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

    commit_many(&cluster, &client, TRANSACTIONS).await;
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
    until_all_ended(&metrics, Duration::from_secs(60)).await;
    assert!(client.stuck().await.unwrap().is_empty());
}

/// Commits go by the best call the participant serves: a CommitStream, else
/// CommitBatch calls (and a lone commit as its own Commit), else one Commit
/// each; whichever it is, every commit is delivered and every transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_go_by_the_best_call_the_participant_serves() {
    init();
    const TRANSACTIONS: usize = 40;
    for wire in [Wire::Stream, Wire::Batch, Wire::Unary] {
        let (cluster, metrics) = cluster_with_metrics(&[]).await;
        let standin = stand_in_on(&cluster, Answer::Ack, wire).await;
        let client = cluster.client().await.unwrap();
        commit_many(&cluster, &client, TRANSACTIONS).await;
        until_all_ended(&metrics, Duration::from_secs(10)).await;
        let by = |call| standin.commits_by(call);
        let seen = (by("CommitStream"), by("CommitBatch"), by("Commit"));
        assert_eq!(standin.commits(), TRANSACTIONS, "{wire:?}: each commit delivered once, {seen:?}");
        match wire {
            Wire::Stream => assert_eq!(seen, (TRANSACTIONS, 0, 0), "{wire:?}"),
            Wire::Batch => assert_eq!(seen.0, 0, "{wire:?}: {seen:?}"),
            Wire::Unary => assert_eq!(seen, (0, 0, TRANSACTIONS), "{wire:?}"),
        }
    }
}

/// Commits a CommitStream leaves unanswered fail at the commit deadline and
/// are redelivered on it (the stream itself is fine); once it answers again,
/// the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_a_stream_leaves_unanswered_are_redelivered_after_the_deadline() {
    init();
    let (cluster, metrics) = cluster_with_metrics(&[
        "--commit-timeout-ms",
        "200",
        "--redelivery-base-ms",
        "5",
        "--redelivery-cap-ms",
        "20",
    ])
    .await;
    let standin = stand_in_on(&cluster, Answer::Ack, Wire::Stream).await;
    standin.silent(true);
    let client = cluster.client().await.unwrap();

    let done = client.transact_branches(branches(&cluster, "k")).await.unwrap();
    assert_eq!(done.outcome, Outcome::Committed, "{}", done.reason);
    // The first delivery and two redeliveries, each after the last one's deadline.
    poll(Duration::from_secs(10), "two redeliveries", || async {
        (standin.commits_by("CommitStream") >= 3).then_some(())
    })
    .await
    .unwrap();
    let page = scrape(&metrics).await;
    assert_eq!(metric(&page, "decree_transactions_in_flight"), 1.0, "not acked, not ended: {page}");
    assert_eq!(standin.commits_by("CommitBatch") + standin.commits_by("Commit"), 0);

    standin.silent(false);
    until_all_ended(&metrics, Duration::from_secs(10)).await;
    assert_eq!(client.status(&done.txid).await.unwrap(), Outcome::Committed);
}
