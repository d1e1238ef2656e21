//! Bounded state: ended outcomes and tombstones are pruned while the servers
//! run; a pruned txid is FORGOTTEN (never ABORTED), across a kill -9; and a
//! start reads what is undecided, not the history.

mod common;

use std::time::Duration;

use common::{decree_async, init};
use decree_client::Outcome;
use decree_tests::{check, Cluster, NodeId, Options};
use tracing::info;

const SETTLE: Duration = Duration::from_secs(30);

/// The number after `field=` on the last line of `log` that contains `line`.
fn logged(log: &str, line: &str, field: &str) -> Option<u64> {
    let found = log.lines().rev().find(|l| l.contains(line))?;
    let at = found.find(&format!("{field}="))? + field.len() + 1;
    found[at..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

async fn status(cluster: &Cluster, txid: &str) -> common::Run {
    let args = ["status", txid, "--coordinator", &cluster.coordinator_url()];
    decree_async(args.map(String::from).to_vec()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_txid_is_forgotten_never_aborted_and_a_restart_reads_only_what_is_undecided() {
    init();
    let mut options = Options::new(2);
    options.coordinator_args =
        ["--retain-ended", "5", "--prune-interval-ms", "20"].map(String::from).to_vec();
    options.participant_args = ["--tombstones", "5", "--tombstone-age-ms", "200"].map(String::from).to_vec();
    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    options.participant_args_for = vec![("p1".into(), vec!["--metrics-listen".into(), metrics.clone()])];
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    let mut cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();

    info!("--- one transfer that aborts (a failed expectation), then 30 that commit");
    let mut refused = check::marked_transfer("refused", &names, 0, 10);
    refused[1].payload = decree_client::kv_payload(vec![decree_client::KvOp::Expect {
        key: "no-such-key".into(),
        value: Some(b"x".to_vec()),
    }]);
    let aborted = client.transact_branches(refused).await.unwrap();
    assert_eq!(aborted.outcome, Outcome::Aborted, "{}", aborted.reason);
    info!("--- transfers commit until the oldest outcomes are pruned while the coordinator runs");
    let mut committed: Vec<String> = Vec::new();
    loop {
        let i = committed.len();
        let result =
            client.transact_branches(check::marked_transfer(&format!("t{i}"), &names, 0, 1)).await.unwrap();
        assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
        committed.push(result.txid);
        if i >= 10 && client.status(&committed[0]).await.unwrap() == Outcome::Forgotten {
            break;
        }
        assert!(i < 20_000, "the first outcome was never forgotten");
    }
    let (first, last) = (committed[0].clone(), committed.last().unwrap().clone());
    info!(transfers = committed.len(), "--- forgotten: decree status says so, exit 3");
    let run = status(&cluster, &first).await;
    assert_eq!(run.code, 3, "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with(&format!("{first} forgotten: ")), "{}", run.stdout);
    let json = decree_async(
        ["status", &first, "--coordinator", &cluster.coordinator_url(), "--json"].map(String::from).to_vec(),
    )
    .await;
    assert_eq!(json.code, 3);
    assert_eq!(json.json()["outcome"], "forgotten");
    assert_eq!(
        client.status(&aborted.txid).await.unwrap(),
        Outcome::Forgotten,
        "an old abort is forgotten too"
    );
    let run = status(&cluster, &last).await;
    assert_eq!(
        (run.code, run.stdout.trim()),
        (0, format!("{last} committed").as_str()),
        "the newest is kept"
    );

    info!("--- kill -9 the coordinator: the horizon is durable, nothing forgotten turns into aborted");
    cluster.kill(NodeId::Coordinator);
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    let client = cluster.client().await.unwrap();
    assert_eq!(client.status(&first).await.unwrap(), Outcome::Forgotten);
    assert_eq!(client.status(&aborted.txid).await.unwrap(), Outcome::Forgotten);
    assert_eq!(client.status(&last).await.unwrap(), Outcome::Committed);
    let log = cluster.log_of(NodeId::Coordinator);
    let read = logged(&log, "coordinator starting", "records_read").expect("the start logs what it read");
    // meta, the horizon, the registry's two participants and the ring: no decision is undecided.
    assert_eq!(read, 5, "{log}");

    info!("--- every transfer is all-or-nothing, nothing is locked");
    cluster.wait_settled(SETTLE).await.unwrap();
    for i in 0..committed.len() {
        assert!(check::all_or_nothing(&client, &format!("t{i}"), &names).await.unwrap(), "t{i}");
    }
    assert!(!check::all_or_nothing(&client, "refused", &names).await.unwrap());
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0);

    info!("--- p1 forgets its tombstones by age (200 ms); after a kill -9 it reads none of them");
    let p1 = NodeId::Participant(0);
    decree_tests::poll(SETTLE, "p1 to have forgotten every tombstone on disk", || async {
        let page = common::scrape(&metrics).await;
        (page.contains("decree_tombstones ") && common::metric(&page, "decree_tombstones") == 0.0)
            .then_some(())
    })
    .await
    .unwrap();
    cluster.kill(p1);
    cluster.restart(p1).unwrap();
    cluster.wait_back(p1).await.unwrap();
    let log = cluster.log_of(p1);
    let tombstones =
        logged(&log, "participant starting", "tombstones").expect("the start logs its tombstones");
    let read = logged(&log, "participant starting", "records_read").expect("the start logs what it read");
    assert_eq!(tombstones, 0, "{log}");
    // Its horizon alone: none of the hundreds decided here.
    assert_eq!(read, 1, "p1 read {read} records at start after {} transfers: {log}", committed.len());
    info!("--- a late Prepare of a forgotten transaction is refused as stale");
    let stale = decree_client::v1::PrepareRequest {
        txid: first.clone(),
        payload: decree_client::kv_payload(vec![decree_client::KvOp::Put {
            key: "late".into(),
            value: b"x".to_vec(),
        }]),
        one_phase: false,
        // The coordinator's current incarnation: only the horizon makes it stale.
        coordinator_incarnation: 2,
        interactive: false,
        trace_context: Default::default(),
    };
    let channel =
        tonic::transport::Endpoint::from_shared(cluster.url_of(p1)).unwrap().connect().await.unwrap();
    let vote = decree_client::v1::participant_client::ParticipantClient::new(channel)
        .prepare(stale)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vote.vote, decree_client::v1::Vote::No as i32, "{vote:?}");
    assert_eq!(vote.reason_code, decree_client::v1::Reason::Stale as i32, "{vote:?}");
    assert!(client.get_at("p1", vec!["late".into()]).await.unwrap()[0].is_none());
}
