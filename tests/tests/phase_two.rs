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

use std::time::Duration;

use common::standin::{stand_in, Answer};
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
