//! The crash matrix: every crash point of DESIGN.md, armed in the real binary,
//! with the outcome it must end in, and the invariants after recovery:
//! I1 all-or-nothing (markers), I2/I5 balance sum, I6 nothing in doubt and no
//! lock held, and the coordinator's answer agreeing with the participants.

mod common;

use std::time::Duration;

use common::init;
use decree_client::{Client, Outcome, TxnResult};
use decree_tests::{check, Cluster, NodeId, Options};
use tracing::info;

const SETTLE: Duration = Duration::from_secs(30);
const DIE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Committed,
    Aborted,
}

fn options() -> Options {
    common::quick_options()
}

/// Runs a marked transfer across every participant; `Err` if the client got no answer.
async fn transfer(client: &Client, tag: &str, participants: &[String]) -> Result<TxnResult, String> {
    client
        .transact_branches(check::marked_transfer(tag, participants, 0, 10))
        .await
        .map_err(|e| e.to_string())
}

/// Checks the invariants after everything is back, and that `tag` ended as `expect`.
async fn must_end(cluster: &Cluster, tag: &str, txid: Option<&str>, expect: Expect) {
    info!("--- waiting until nothing is in doubt");
    cluster.wait_settled(SETTLE).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let everywhere = check::all_or_nothing(&client, tag, &names).await.unwrap();
    assert_eq!(everywhere, expect == Expect::Committed, "transaction {tag} should have {expect:?}");
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0, "money created or lost");
    check::unlocked(&client, &names, &[check::balance_key(0), format!("marker-{tag}")]).await.unwrap();
    if let Some(txid) = txid {
        let outcome = client.status(txid).await.unwrap();
        let want = if expect == Expect::Committed { Outcome::Committed } else { Outcome::Aborted };
        assert_eq!(outcome, want, "the coordinator's answer for {txid}");
    }
}

/// The common shape: arm `point` on `node`, run a transfer, see `node` die,
/// restart it unarmed, check the outcome.
async fn crash_case(point: &str, node: NodeId, expect: Expect) {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    info!("--- arm {point} on {node:?}");
    cluster.restart_armed(node, point).await.unwrap();
    let client = cluster.client().await.unwrap();

    info!("--- run a transfer across every participant");
    let answer = transfer(&client, "t1", &names).await;
    info!(?answer, "client's answer");
    let status = cluster.wait_exit(node, DIE).await.unwrap();
    assert!(!status.success(), "{node:?} should have died at {point}");
    assert!(
        cluster.log_of(node).contains(&format!("crash point {point} reached")),
        "{node:?} died elsewhere"
    );

    info!("--- restart {node:?} on the same directory");
    cluster.restart(node).unwrap();
    let txid = answer.as_ref().ok().map(|r| r.txid.clone());
    if let Ok(result) = &answer {
        // A client that heard an outcome must find it true (I2).
        let heard = if result.outcome == Outcome::Committed { Expect::Committed } else { Expect::Aborted };
        assert_eq!(heard, expect, "the client was told {:?}: {}", result.outcome, result.reason);
    }
    must_end(&cluster, "t1", txid.as_deref(), expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_prepare_partial_fanout_aborts() {
    crash_case("coordinator.prepare.partial_fanout", NodeId::Coordinator, Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_decision_before_log_aborts() {
    crash_case("coordinator.decision.before_log", NodeId::Coordinator, Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_decision_after_log_commits() {
    crash_case("coordinator.decision.after_log", NodeId::Coordinator, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_commit_partial_fanout_commits() {
    crash_case("coordinator.commit.partial_fanout", NodeId::Coordinator, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_commit_before_end_commits() {
    crash_case("coordinator.commit.before_end", NodeId::Coordinator, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_reply_before_client_commits() {
    crash_case("coordinator.reply.before_client", NodeId::Coordinator, Expect::Committed).await;
}

/// The client of a one-shot transaction never learns its txid when the
/// coordinator dies before answering; an interactive client has it from
/// Begin, so its Commit, asked again, and `decree status` must tell it the
/// outcome after the restart. With
/// one participant this is the one-phase path, whose outcome the coordinator
/// keeps only because it recorded the question before the Prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_reply_before_client_then_status_tells_the_interactive_client() {
    init();
    let mut cluster = Cluster::start(Options::new(1)).await.unwrap();
    cluster.restart_armed(NodeId::Coordinator, "coordinator.reply.before_client").await.unwrap();
    let client = cluster.client().await.unwrap();
    let mut tx = client.begin().await.unwrap();
    let txid = tx.txid().to_owned();
    tx.put("a", "1").await.unwrap();
    tx.put("b", "2").await.unwrap();
    // The coordinator dies before answering: the SDK asks it again, once back.
    let commit = tokio::spawn(tx.commit());
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();
    assert!(cluster
        .log_of(NodeId::Coordinator)
        .contains("crash point coordinator.reply.before_client reached"));

    info!("--- restart the coordinator: status tells the client what it was not told");
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    let answer = commit.await.unwrap().expect("the Commit's outcome, from the restarted coordinator");
    assert_eq!(answer.outcome, Outcome::Committed, "{}", answer.reason);
    let client = cluster.client().await.unwrap();
    let outcome = decree_tests::poll(SETTLE, "the outcome to be known", || {
        let (client, txid) = (&client, &txid);
        async move {
            match client.status(txid).await.ok()? {
                Outcome::Pending => None,
                known => Some(known),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(outcome, Outcome::Committed, "the participant committed: status must never say otherwise");
    let values = client.get(&["a".into(), "b".into()]).await.unwrap();
    assert_eq!((values["a"].as_deref(), values["b"].as_deref()), (Some(&b"1"[..]), Some(&b"2"[..])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_prepare_before_log_aborts() {
    crash_case("participant.prepare.before_log", NodeId::Participant(1), Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_prepare_after_log_aborts_and_the_prepared_branch_resolves() {
    crash_case("participant.prepare.after_log", NodeId::Participant(1), Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_commit_before_apply_commits_after_restart() {
    crash_case("participant.commit.before_apply", NodeId::Participant(1), Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_commit_after_apply_commits_exactly_once() {
    crash_case("participant.commit.after_apply", NodeId::Participant(1), Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_abort_before_apply_aborts_after_restart() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    let p2 = NodeId::Participant(1);
    cluster.restart_armed(p2, "participant.abort.before_apply").await.unwrap();
    let client = cluster.client().await.unwrap();

    info!("--- p3's branch votes NO, so p2 is told to abort");
    let mut branches = check::marked_transfer("t1", &names, 0, 10);
    branches[2].payload = decree_client::kv_payload(vec![
        decree_client::KvOp::Put { key: "marker-t1".into(), value: b"t1".to_vec() },
        decree_client::KvOp::Expect { key: "never-set".into(), value: Some(b"x".to_vec()) },
    ]);
    let result = client.transact_branches(branches).await.unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    cluster.wait_exit(p2, DIE).await.unwrap();
    assert!(cluster.log_of(p2).contains("crash point participant.abort.before_apply reached"));
    cluster.restart(p2).unwrap();
    must_end(&cluster, "t1", Some(&result.txid), Expect::Aborted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_recovery_mid_redrive_commits() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    info!("--- the coordinator dies with a durable decision and no Commit sent");
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(transfer(&client, "t1", &names).await.is_err());
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();

    info!("--- recovery redrives to one participant and dies again");
    cluster.restart_with(NodeId::Coordinator, Some("coordinator.recovery.mid_redrive")).unwrap();
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();
    assert!(cluster
        .log_of(NodeId::Coordinator)
        .contains("crash point coordinator.recovery.mid_redrive reached"));

    cluster.restart(NodeId::Coordinator).unwrap();
    must_end(&cluster, "t1", None, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_recovery_before_resolve_then_commits() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    let p2 = NodeId::Participant(1);
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(transfer(&client, "t1", &names).await.is_err());
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();

    info!("--- p2 restarts with its branch in doubt and dies before asking");
    cluster.restart_with(p2, Some("participant.recovery.before_resolve")).unwrap();
    cluster.wait_exit(p2, DIE).await.unwrap();
    assert!(cluster.log_of(p2).contains("crash point participant.recovery.before_resolve reached"));

    cluster.restart(p2).unwrap();
    cluster.restart(NodeId::Coordinator).unwrap();
    must_end(&cluster, "t1", None, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_doubt_branches_stay_locked_until_the_coordinator_returns() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(transfer(&client, "t1", &names).await.is_err());
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();

    info!("--- every participant shows the branch in doubt, its keys locked");
    let (in_doubt, unreachable) = client.in_doubt().await.unwrap();
    assert!(unreachable.is_empty());
    assert_eq!(in_doubt.len(), 3, "{in_doubt:?}");
    for branch in &in_doubt {
        assert_eq!(branch.locked_keys, vec![check::balance_key(0), "marker-t1".into()]);
    }
    info!("--- decree in-doubt asks the participants directly while the coordinator is down");
    let mut args = vec!["in-doubt".to_string(), "--json".into()];
    for i in 0..names.len() {
        args.extend(["--participant".to_string(), cluster.url_of(NodeId::Participant(i))]);
    }
    let run = common::decree_async(args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let listed = run.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3, "decree in-doubt lists them: {listed:?}");
    assert!(listed.iter().all(|b| b["locked_keys"].as_array().unwrap().len() == 2));
    let names_listed: Vec<_> = listed.iter().map(|b| b["participant"].as_str().unwrap()).collect();
    assert_eq!(names_listed, vec!["p1", "p2", "p3"]);
    assert_eq!(
        check::unapplied(&client, "t1", &names).await.unwrap(),
        3,
        "nothing applied while in doubt, and nothing served: every read of the marker refused"
    );
    info!("--- a participant restarted meanwhile still holds the lock and does not decide alone");
    cluster.kill(NodeId::Participant(0));
    cluster.restart(NodeId::Participant(0)).unwrap();
    let again = decree_tests::poll(SETTLE, "p1 to list its recovered branch", || async {
        let (branches, unreachable) = client.in_doubt().await.ok()?;
        (unreachable.is_empty() && branches.len() == 3).then_some(branches)
    })
    .await
    .unwrap();
    assert!(again.iter().any(|b| b.participant == "p1"));

    info!("--- the coordinator returns: everything commits with no manual step");
    cluster.restart(NodeId::Coordinator).unwrap();
    must_end(&cluster, "t1", None, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_fault_coordinator_and_participant_in_one_transaction() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    let p1 = NodeId::Participant(0);
    // The first Commit goes to p1: it applies and dies before acking; the
    // coordinator, having sent that one Commit, dies too.
    cluster.restart_armed(NodeId::Coordinator, "coordinator.commit.partial_fanout").await.unwrap();
    cluster.restart_armed(p1, "participant.commit.after_apply").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(transfer(&client, "t1", &names).await.is_err());
    cluster.wait_exit(p1, DIE).await.unwrap();
    cluster.wait_exit(NodeId::Coordinator, DIE).await.unwrap();
    assert!(cluster.log_of(p1).contains("crash point participant.commit.after_apply reached"));
    info!("--- both restart on their directories");
    cluster.restart(p1).unwrap();
    cluster.restart(NodeId::Coordinator).unwrap();
    must_end(&cluster, "t1", None, Expect::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_dies_at_once_under_load() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    let client = cluster.client().await.unwrap();
    info!("--- transfers run while everything is SIGKILLed");
    let committed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let (client, names, committed) = (client.clone(), names.clone(), committed.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..100_000 {
                let tag = format!("x{i}");
                let answer = transfer(&client, &tag, &names).await;
                let failed = answer.is_err();
                if answer.as_ref().is_ok_and(|r| r.outcome == Outcome::Committed) {
                    committed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                results.push((tag, answer));
                if failed {
                    break;
                }
            }
            results
        })
    };
    decree_tests::poll(SETTLE, "20 transfers to commit", || async {
        (committed.load(std::sync::atomic::Ordering::Relaxed) >= 20).then_some(())
    })
    .await
    .unwrap();
    let ids = [NodeId::Coordinator, NodeId::Participant(0), NodeId::Participant(1), NodeId::Participant(2)];
    for id in ids {
        cluster.kill(id);
    }
    let results = load.await.unwrap();
    for id in ids {
        cluster.restart(id).unwrap();
    }
    cluster.wait_settled(SETTLE).await.unwrap();
    let client = cluster.client().await.unwrap();
    info!(transfers = results.len(), "--- checking every transfer");
    for (tag, answer) in &results {
        let everywhere = check::all_or_nothing(&client, tag, &names).await.unwrap();
        if let Ok(result) = answer {
            assert_eq!(everywhere, result.outcome == Outcome::Committed, "{tag}: told {:?}", result.outcome);
        }
    }
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0);
    check::unlocked(&client, &names, &[check::balance_key(0)]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_whose_vote_is_lost_is_never_reported_aborted() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let p1 = NodeId::Participant(0);
    let only = vec!["p1".to_string()];
    info!("--- p1 alone: it commits in one phase and dies before its vote leaves");
    cluster.restart_armed(p1, "participant.commit.after_apply").await.unwrap();
    let client = cluster.client().await.unwrap();
    let answer = client.transact_branches(check::marked_transfer("t1", &only, 0, 10)).await;
    cluster.wait_exit(p1, DIE).await.unwrap();
    let txid = match &answer {
        Ok(result) => {
            assert_eq!(result.outcome, Outcome::Committed, "told {:?}: {}", result.outcome, result.reason);
            result.txid.clone()
        }
        Err(err) => {
            let txid = err
                .unknown_txid()
                .unwrap_or_else(|| panic!("the client must hear 'unknown', not a guess: {err}"));
            txid.to_owned()
        }
    };
    info!(%txid, "--- the coordinator keeps asking until p1 is back");
    assert_ne!(
        client.status(&txid).await.unwrap(),
        Outcome::Aborted,
        "no presumed abort while it is unknown"
    );
    cluster.restart(p1).unwrap();
    decree_tests::poll(SETTLE, "the coordinator to learn the one-phase commit", || async {
        (client.status(&txid).await.ok()? == Outcome::Committed).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(check::markers(&client, "t1", &only).await.unwrap(), 1, "the commit is durable at p1");
    check::unlocked(&client, &only, &["marker-t1".to_string()]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_participant_that_is_down_is_unknown_then_aborted() {
    init();
    // p1 alone, a member of the ring: routed keys go to it too.
    let mut options = options();
    (options.participants, options.services) = (1, false);
    let mut cluster = Cluster::start(options).await.unwrap();
    let p1 = NodeId::Participant(0);
    let only = vec!["p1".to_string()];
    let client = cluster.client().await.unwrap();
    info!("--- p1 alone, and down: the client hears 'unknown', not a guess");
    cluster.kill(p1);
    let err = client.transact_branches(check::marked_transfer("t1", &only, 0, 10)).await.unwrap_err();
    let txid =
        err.unknown_txid().unwrap_or_else(|| panic!("expected an unknown outcome, got {err}")).to_owned();
    info!("--- decree txn --json says so too, with the txid");
    let run = common::decree_async(
        ["txn", "--coordinator", &cluster.coordinator_url(), "--put", "a=1", "--json"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(client.route("a").unwrap(), "p1", "the ring sends 'a' to p1");
    assert_eq!(run.code, 2, "{}", run.stderr);
    let out = run.json();
    assert_eq!(out["outcome"], "unknown");
    assert!(out["txid"].as_str().is_some_and(|t| t.parse::<decree_client::TxId>().is_ok()), "{out}");
    assert_eq!(client.status(&txid).await.unwrap(), Outcome::Pending, "still being asked");
    info!("--- p1 returns: the coordinator's Abort is acked, so it never committed");
    cluster.restart(p1).unwrap();
    decree_tests::poll(SETTLE, "the coordinator to learn the outcome", || async {
        (client.status(&txid).await.ok()? == Outcome::Aborted).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(check::markers(&client, "t1", &only).await.unwrap(), 0);
    info!("--- and p1 takes new work");
    let result = client
        .transact(vec![decree_client::KvOp::Put { key: "after".into(), value: b"1".to_vec() }])
        .await
        .unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
}

/// Prepares travel on one stream per participant. A participant that dies
/// (SIGKILL) or shuts down (SIGTERM: it ends its streams) between
/// transactions must not cost the next transaction anything: the coordinator
/// notices the stream ended and opens a new one for the next Prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_restarted_between_transactions_gets_the_next_prepares_on_a_new_stream() {
    init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let names = cluster.participant_names();
    let client = cluster.client().await.unwrap();
    let committed = |answer: Result<TxnResult, String>, tag: &str| match answer {
        Ok(result) => assert_eq!(result.outcome, Outcome::Committed, "{tag}: {}", result.reason),
        Err(err) => panic!("{tag}: no answer: {err}"),
    };
    committed(transfer(&client, "before", &names).await, "before");

    info!("--- p1 is killed and restarted: its prepare stream broke");
    cluster.kill(NodeId::Participant(0));
    cluster.restart(NodeId::Participant(0)).unwrap();
    cluster.wait_back(NodeId::Participant(0)).await.unwrap();
    for i in 0..5 {
        let tag = format!("after-kill-{i}");
        committed(transfer(&client, &tag, &names).await, &tag);
    }

    info!("--- p2 shuts down gracefully (ending its streams) and comes back");
    cluster.terminate(NodeId::Participant(1));
    let status = cluster.wait_exit(NodeId::Participant(1), DIE).await.unwrap();
    assert!(status.success(), "{status:?}:\n{}", cluster.log_of(NodeId::Participant(1)));
    cluster.restart(NodeId::Participant(1)).unwrap();
    cluster.wait_back(NodeId::Participant(1)).await.unwrap();
    for i in 0..5 {
        let tag = format!("after-stop-{i}");
        committed(transfer(&client, &tag, &names).await, &tag);
    }
    must_end(&cluster, "after-stop-4", None, Expect::Committed).await;
}
