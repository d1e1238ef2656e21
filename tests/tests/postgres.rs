//! PostgreSQL as a participant, against a real PostgreSQL 15 started per test:
//! transactions spanning a KV participant (p1) and a PostgreSQL participant
//! (p2) commit together and abort together, also through the participant
//! crash points, and nothing is ever left in `pg_prepared_xacts`. Values and
//! prepared transactions are read back with `psql`.

mod common;

use std::time::Duration;

use common::init;
use decree_client::{kv_payload, v1, KvOp, Outcome};
use decree_tests::postgres::PgServer;
use decree_tests::{check, Cluster, NodeId, Options};
use tracing::info;

const SETTLE: Duration = Duration::from_secs(30);
const DIE: Duration = Duration::from_secs(20);
const PG: NodeId = NodeId::Participant(1);

fn options(pg: &PgServer) -> Options {
    let mut options = Options::new(2);
    options.coordinator_args =
        ["--prepare-timeout-ms", "3000", "--commit-timeout-ms", "500", "--redelivery-cap-ms", "300"]
            .map(String::from)
            .to_vec();
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--heartbeat-ms", "200"].map(String::from).to_vec();
    options.participant_args_for =
        vec![("p2".into(), vec!["--backend".into(), "postgres".into(), "--pg-url".into(), pg.url()])];
    options
}

/// The value of `key` in the PostgreSQL participant's table, by psql.
fn pg_value(pg: &PgServer, key: &str) -> Option<String> {
    let out =
        pg.psql(&format!("SELECT convert_from(value, 'UTF8') FROM decree_kv WHERE key = '{key}'")).unwrap();
    (!out.is_empty()).then_some(out)
}

fn pg_prepared(pg: &PgServer) -> usize {
    pg.psql("SELECT count(*) FROM pg_prepared_xacts").unwrap().parse().unwrap()
}

/// The invariants once everything is back: `tag` everywhere or nowhere as
/// expected, seen by the client and by psql; the sum kept; nothing prepared
/// left in PostgreSQL; no lock held.
async fn must_end(cluster: &Cluster, pg: &PgServer, tag: &str, committed: bool) {
    cluster.wait_settled(SETTLE).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    assert_eq!(check::all_or_nothing(&client, tag, &names).await.unwrap(), committed, "transaction {tag}");
    assert_eq!(pg_value(pg, &format!("marker-{tag}")).is_some(), committed, "psql sees the marker of {tag}");
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0, "money created or lost");
    check::unlocked(&client, &names, &[check::balance_key(0), format!("marker-{tag}")]).await.unwrap();
    decree_tests::poll(SETTLE, "pg_prepared_xacts to empty", || async {
        (pg_prepared(pg) == 0).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_postgres_commit_together_and_abort_together() {
    init();
    let pg = PgServer::start().unwrap();
    let cluster = Cluster::start(options(&pg)).await.unwrap();
    let names = cluster.participant_names();
    let client = cluster.client().await.unwrap();

    info!("--- a transfer from the KV store to PostgreSQL commits on both");
    let result = client.transact_branches(check::marked_transfer("t1", &names, 0, 10)).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    assert_eq!(pg_value(&pg, "balance-0").as_deref(), Some("10"));
    assert_eq!(client.get_at("p1", vec![check::balance_key(0)]).await.unwrap(), vec![Some(b"-10".to_vec())]);
    must_end(&cluster, &pg, "t1", true).await;

    info!("--- an expect failing at the KV participant rolls the PostgreSQL side back");
    let mut branches = check::marked_transfer("t2", &names, 0, 5);
    branches[0].payload = kv_payload(vec![
        KvOp::Put { key: "marker-t2".into(), value: b"t2".to_vec() },
        KvOp::Expect { key: "never-set".into(), value: Some(b"x".to_vec()) },
    ]);
    let result = client.transact_branches(branches).await.unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.code, decree_client::Reason::ValidationFailed, "{}", result.reason);
    assert_eq!(pg_value(&pg, "balance-0").as_deref(), Some("10"), "PostgreSQL rolled back");
    must_end(&cluster, &pg, "t2", false).await;

    info!("--- an expect failing in PostgreSQL rolls the KV side back");
    let mut branches = check::marked_transfer("t3", &names, 0, 5);
    branches[1].payload = kv_payload(vec![
        KvOp::Add { key: check::balance_key(0), delta: 5 },
        KvOp::Put { key: "marker-t3".into(), value: b"t3".to_vec() },
        KvOp::Expect { key: check::balance_key(0), value: Some(b"999".to_vec()) },
    ]);
    let result = client.transact_branches(branches).await.unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.code, decree_client::Reason::ValidationFailed, "{}", result.reason);
    assert_eq!(client.get_at("p1", vec![check::balance_key(0)]).await.unwrap(), vec![Some(b"-10".to_vec())]);
    must_end(&cluster, &pg, "t3", false).await;

    info!("--- a PostgreSQL-only transaction takes the one-phase path");
    let branch = v1::Branch {
        participant: "p2".into(),
        payload: kv_payload(vec![KvOp::Put { key: "solo".into(), value: b"1".to_vec() }]),
    };
    let result = client.transact_branches(vec![branch]).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    assert_eq!(pg_value(&pg, "solo").as_deref(), Some("1"));
    assert_eq!(pg_prepared(&pg), 0);
}

/// Arms `point` on the PostgreSQL participant, runs a transfer, sees the
/// participant die there, restarts it, and checks the outcome.
async fn pg_crash_case(point: &str, committed: bool, recovery_says: Option<&str>) {
    init();
    let pg = PgServer::start().unwrap();
    let mut cluster = Cluster::start(options(&pg)).await.unwrap();
    let names = cluster.participant_names();
    cluster.restart_armed(PG, point).await.unwrap();
    let client = cluster.client().await.unwrap();
    let answer = client.transact_branches(check::marked_transfer("t1", &names, 0, 10)).await;
    info!(?answer, "client's answer");
    let status = cluster.wait_exit(PG, DIE).await.unwrap();
    assert!(!status.success());
    assert!(cluster.log_of(PG).contains(&format!("crash point {point} reached")), "died elsewhere");
    if let Ok(result) = &answer {
        assert_eq!(result.outcome == Outcome::Committed, committed, "told {:?}", result.outcome);
    }
    cluster.restart(PG).unwrap();
    must_end(&cluster, &pg, "t1", committed).await;
    if let Some(line) = recovery_says {
        assert!(cluster.log_of(PG).contains(line), "recovery should say {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_after_prepare_transaction_is_rolled_back_after_restart() {
    // PREPARE TRANSACTION succeeded, the prepared record was not written: no YES was sent.
    pg_crash_case(
        "participant.prepare.before_log",
        false,
        Some("rolling back a PostgreSQL branch that never voted YES"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_prepared_and_logged_then_killed_is_resolved_after_restart() {
    pg_crash_case("participant.prepare.after_log", false, Some("PostgreSQL branch prepared, in doubt")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_before_commit_prepared_commits_after_restart() {
    pg_crash_case("participant.commit.before_apply", true, Some("PostgreSQL branch prepared, in doubt"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_after_commit_prepared_commits_exactly_once() {
    pg_crash_case("participant.commit.after_apply", true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_in_doubt_through_a_coordinator_crash_and_a_kill_commits() {
    init();
    let pg = PgServer::start().unwrap();
    let mut cluster = Cluster::start(options(&pg)).await.unwrap();
    let names = cluster.participant_names();
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(client.transact_branches(check::marked_transfer("t1", &names, 0, 10)).await.is_err());
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();
    assert_eq!(pg_prepared(&pg), 1, "the branch is a prepared transaction in PostgreSQL");

    info!("--- kill -9 the PostgreSQL participant while in doubt; it recovers from its log and pg_prepared_xacts");
    cluster.kill(PG);
    cluster.restart(PG).unwrap();
    cluster.wait_serving(PG, SETTLE).await.unwrap();
    assert_eq!(pg_prepared(&pg), 1, "an in-doubt branch is kept for the coordinator to decide");
    assert_eq!(pg_value(&pg, "marker-t1"), None);

    cluster.restart(NodeId::Coordinator).unwrap();
    must_end(&cluster, &pg, "t1", true).await;
    assert_eq!(pg_value(&pg, "balance-0").as_deref(), Some("10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_participant_needs_a_url() {
    init();
    let run = common::decree_async(
        [
            "participant",
            "--coordinator",
            "http://127.0.0.1:1",
            "--name",
            "pg",
            "--data-dir",
            "/nonexistent/x",
        ]
        .into_iter()
        .chain(["--backend", "postgres"])
        .map(String::from)
        .collect(),
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--pg-url is required"), "{}", run.stderr);
}
