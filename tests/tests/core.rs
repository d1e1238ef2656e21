//! The core: atomic commit across participants, through the CLI a user runs,
//! across SIGKILL of every process, with locks and bad input.

mod common;

use std::time::Duration;

use common::{decree_async, init};
use decree_client::{v1, KvOp, Outcome, Reason};
use decree_tests::check;
use decree_tests::{free_port, Cluster, NodeId, Options};
use tracing::info;

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

async fn must_get(url: &str, keys: &[&str]) -> serde_json::Value {
    let mut args = s(&["get"]);
    args.extend(s(keys));
    args.extend(s(&["--coordinator", url, "--json"]));
    let run = decree_async(args).await;
    assert_eq!(run.code, 0, "decree get failed: {}", run.stderr);
    run.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_commits_aborts_and_survives_sigkill() {
    init();
    let mut cluster = Cluster::start(Options::new(3)).await.unwrap();
    let url = cluster.coordinator_url();

    info!("--- put a, b, c in one transaction");
    let run = decree_async(s(&[
        "txn",
        "--coordinator",
        &url,
        "--put",
        "a=1",
        "--put",
        "b=2",
        "--put",
        "c=3",
        "--json",
    ]))
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = run.json();
    assert_eq!(out["outcome"], "committed");
    assert!(out["txid"].as_str().is_some_and(|t| t.parse::<decree_client::TxId>().is_ok()));
    let participants = out["participants"].as_array().unwrap();
    assert!(participants.len() > 1, "a, b, c should land on more than one participant: {participants:?}");
    assert_eq!(must_get(&url, &["a", "b", "c"]).await, serde_json::json!({"a": "1", "b": "2", "c": "3"}));

    info!("--- a failed expect aborts the whole transaction");
    let run =
        decree_async(s(&["txn", "--coordinator", &url, "--expect", "a=9", "--put", "b=7", "--json"])).await;
    assert_eq!(run.code, 1, "aborted exits 1: {}", run.stderr);
    let out = run.json();
    assert_eq!(out["outcome"], "aborted");
    assert_eq!(out["reason_code"], "validation_failed", "{out}");
    assert_eq!(
        out["reason"],
        format!(
            "participant {} voted NO: expect on key \"a\" failed: expected \"9\", found \"1\"",
            decree_client::Client::connect(&url).await.unwrap().route("a").unwrap()
        ),
        "{out}"
    );
    assert_eq!(must_get(&url, &["b"]).await, serde_json::json!({"b": "2"}));

    info!("--- add moves 5 from b to a");
    let run = decree_async(s(&["txn", "--coordinator", &url, "--add", "a=5", "--add", "b=-5"])).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(must_get(&url, &["a", "b"]).await, serde_json::json!({"a": "6", "b": "-3"}));

    info!("--- status of a committed transaction");
    let txid = out["txid"].as_str().unwrap().to_owned();
    let status = decree_async(s(&["status", &txid, "--coordinator", &url, "--json"])).await;
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert_eq!(status.json(), serde_json::json!({"txid": txid, "outcome": "aborted"}));

    info!("--- SIGKILL every process, restart on the same directories");
    let ids = [NodeId::Coordinator, NodeId::Participant(0), NodeId::Participant(1), NodeId::Participant(2)];
    for id in ids {
        cluster.kill(id);
    }
    for id in ids {
        cluster.restart(id).unwrap();
    }
    cluster.wait_enrolled(Duration::from_secs(30)).await.unwrap();
    assert_eq!(must_get(&url, &["a", "b", "c"]).await, serde_json::json!({"a": "6", "b": "-3", "c": "3"}));

    let listed = decree_async(s(&["participants", "--coordinator", &url, "--json"])).await;
    assert_eq!(listed.code, 0);
    let names: Vec<_> =
        listed.json().as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, vec!["p1", "p2", "p3"]);
    let doubt = decree_async(s(&["in-doubt", "--coordinator", &url, "--json"])).await;
    assert_eq!(doubt.code, 0, "{}", doubt.stderr);
    assert_eq!(doubt.json(), serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_locks_its_keys_and_a_conflicting_transaction_votes_no() {
    init();
    let mut options = Options::new(2);
    // Keep the hand-made branch from asking the coordinator while the test holds it.
    options.participant_args = s(&["--in-doubt-after-ms", "600000"]);
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let owner = client.route("hot").unwrap().to_owned();
    let seeded = client.transact(vec![KvOp::Put { key: "hot".into(), value: b"0".to_vec() }]).await.unwrap();
    assert_eq!(seeded.outcome, Outcome::Committed);

    info!("--- a branch prepared by hand holds the lock on 'hot'");
    let real: decree_client::TxId = seeded.txid.parse().unwrap();
    let held = decree_client::TxId::new(real.coordinator, real.incarnation, 1_000_000);
    let address = client.participants().await.unwrap().into_iter().find(|p| p.name == owner).unwrap().address;
    let mut participant = v1::participant_client::ParticipantClient::connect(address).await.unwrap();
    let payload = decree_client::kv_payload(vec![KvOp::Put { key: "hot".into(), value: b"held".to_vec() }]);
    let prepare = v1::PrepareRequest {
        txid: held.to_string(),
        payload,
        one_phase: false,
        coordinator_incarnation: real.incarnation,
        interactive: false,
        ..Default::default()
    };
    let vote = participant.prepare(prepare).await.unwrap().into_inner();
    assert_eq!(vote.vote, v1::Vote::Yes as i32, "{}", vote.reason);

    info!("--- a concurrent transaction on 'hot' votes NO with 'lock conflict' and has no effect");
    let result = client
        .transact(vec![
            KvOp::Put { key: "hot".into(), value: b"2".to_vec() },
            KvOp::Put { key: "cold".into(), value: b"x".to_vec() },
        ])
        .await
        .unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.code, Reason::LockConflict, "{}", result.reason);
    let values = client.get(&["cold".into()]).await.unwrap();
    assert_eq!(values["cold"], None, "the other branch was rolled back");
    info!("--- a read of 'hot' is refused while the branch that voted YES holds it (it may have committed)");
    match client.get(&["hot".into()]).await {
        Err(decree_client::ClientError::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert_eq!(Reason::of_status(&status), Reason::InDoubt, "{status:?}");
        }
        other => panic!("a read of a key in doubt must be refused, got {other:?}"),
    }

    let listed = client.in_doubt().await.unwrap().0;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].locked_keys, vec!["hot"]);

    info!("--- aborting the held branch releases the lock");
    participant.abort(v1::AbortRequest { txid: held.to_string(), typed_ack: false }).await.unwrap();
    let result = client.transact(vec![KvOp::Put { key: "hot".into(), value: b"3".to_vec() }]).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    info!("--- a late Prepare after the Abort votes NO");
    let payload = decree_client::kv_payload(vec![KvOp::Put { key: "hot".into(), value: b"late".to_vec() }]);
    let prepare = v1::PrepareRequest {
        txid: held.to_string(),
        payload,
        one_phase: false,
        coordinator_incarnation: real.incarnation,
        interactive: false,
        ..Default::default()
    };
    assert_eq!(participant.prepare(prepare).await.unwrap().into_inner().vote, v1::Vote::No as i32);
    assert_eq!(client.get(&["hot".into()]).await.unwrap()["hot"].as_deref(), Some(&b"3"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_of_one_key_lose_no_update() {
    init();
    let cluster = Cluster::start(Options::new(3)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                // Each also touches a key of its own, so most are multi-participant.
                let ops = vec![
                    KvOp::Add { key: "counter".into(), delta: 1 },
                    KvOp::Put { key: format!("own-{i}"), value: b"1".to_vec() },
                ];
                client.transact(ops).await.unwrap()
            })
        })
        .collect();
    let mut committed = 0;
    let mut conflicts = 0;
    for task in tasks {
        let result = task.await.unwrap();
        match result.outcome {
            Outcome::Committed => committed += 1,
            _ => {
                assert_eq!(result.code, Reason::LockConflict, "unexpected abort: {}", result.reason);
                conflicts += 1;
            }
        }
    }
    info!(committed, conflicts, "64 concurrent increments");
    let value = client.get(&["counter".into()]).await.unwrap()["counter"].clone().unwrap();
    assert_eq!(
        String::from_utf8(value).unwrap(),
        committed.to_string(),
        "every committed increment counted once"
    );
    let owns: Vec<String> = (0..64).map(|i| format!("own-{i}")).collect();
    let present = client.get(&owns).await.unwrap().values().filter(|v| v.is_some()).count();
    assert_eq!(present, committed, "aborted transactions left no effect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    init();
    let mut cluster = Cluster::start(Options::new(2)).await.unwrap();
    let url = cluster.coordinator_url();
    let client = cluster.client().await.unwrap();
    assert_eq!(
        client.transact(vec![KvOp::Put { key: "k".into(), value: b"v".to_vec() }]).await.unwrap().outcome,
        Outcome::Committed
    );

    info!("--- the CLI refuses malformed input with exit 2");
    let cases: &[(&[&str], &str)] = &[
        (&["txn"], "empty transaction"),
        (&["txn", "--put", "novalue"], "expected K=V"),
        (&["txn", "--put", "=v"], "empty key"),
        (&["txn", "--add", "k=x"], "not a signed 64-bit integer"),
        (&["txn", "--add", "k=99999999999999999999"], "not a signed 64-bit integer"),
        (&["status", "not-a-txid"], "malformed txid"),
        (&["get", ""], "empty key"),
    ];
    for (args, message) in cases {
        let mut full = s(args);
        full.extend(s(&["--coordinator", &url]));
        let run = decree_async(full).await;
        assert_eq!(run.code, 2, "{args:?} should exit 2; stderr: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: expected {message:?} in {:?}", run.stderr);
    }
    let run = decree_async(s(&["txn", "--coordinator", &url, "--json"])).await;
    assert_eq!(run.code, 2);
    assert_eq!(run.json()["outcome"], "unknown");

    info!("--- a server with a bad flag or an unknown crash point refuses to start, naming it");
    let data = cluster.dir().join("refused");
    let data = data.to_str().unwrap();
    let servers: &[(&[&str], &str)] = &[
        (&["coordinator", "--data-dir", data, "--prepare-timeout-ms", "0"], "--prepare-timeout-ms"),
        (&["coordinator", "--data-dir", data, "--crash-at", "coordinator.nope"], "unknown crash point"),
        (&["participant", "--data-dir", data, "--coordinator", "nope", "--name", "x"], "--coordinator"),
        (&["participant", "--data-dir", data, "--coordinator", &url, "--name", "no spaces"], "--name"),
    ];
    for (args, message) in servers {
        let run = decree_async(s(args)).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: expected {message:?} in {:?}", run.stderr);
    }
    assert!(!cluster.dir().join("refused").exists(), "a refused start creates nothing");

    info!("--- the coordinator answers INVALID_ARGUMENT");
    let mut coordinator = v1::coordinator_client::CoordinatorClient::connect(url.clone()).await.unwrap();
    let branch = |p: &str, payload: Vec<u8>| v1::Branch { participant: p.into(), payload };
    let small = decree_client::kv_payload(vec![KvOp::Put { key: "k".into(), value: b"bad".to_vec() }]);
    let invalid: Vec<(&str, v1::TransactRequest)> = vec![
        ("empty transaction", v1::TransactRequest { branches: vec![], timeout_ms: 0, ..Default::default() }),
        (
            "unknown participant",
            v1::TransactRequest {
                branches: vec![branch("p9", small.clone())],
                timeout_ms: 0,
                ..Default::default()
            },
        ),
        (
            "bad name",
            v1::TransactRequest {
                branches: vec![branch("no spaces", small.clone())],
                timeout_ms: 0,
                ..Default::default()
            },
        ),
        (
            "duplicate participant",
            v1::TransactRequest {
                branches: vec![branch("p1", small.clone()), branch("p1", small.clone())],
                timeout_ms: 0,
                ..Default::default()
            },
        ),
        (
            "oversized payload",
            v1::TransactRequest {
                branches: vec![branch("p1", vec![0; 4 * 1024 * 1024 + 1])],
                timeout_ms: 0,
                ..Default::default()
            },
        ),
    ];
    for (what, request) in invalid {
        let status = coordinator.transact(request).await.expect_err(what);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().is_empty());
    }
    for txid in ["", "x", "00000000-0-1", "zzzzzzzz-1-1"] {
        let status =
            coordinator.get_outcome(v1::GetOutcomeRequest { txid: txid.into() }).await.expect_err(txid);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{txid:?}");
    }
    let status = coordinator
        .commit(v1::CommitTransactionRequest { txid: "00000001-1-1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "commit of a txid that is not active");

    info!("--- the participant refuses malformed messages and votes NO on bad payloads");
    let address = client.participants().await.unwrap()[0].address.clone();
    let mut participant = v1::participant_client::ParticipantClient::connect(address.clone()).await.unwrap();
    let status = participant
        .prepare(v1::PrepareRequest { txid: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let txid = "00000001-99-1".to_string();
    let garbage = v1::PrepareRequest {
        txid: txid.clone(),
        payload: vec![0xff, 0xff, 0xff],
        one_phase: false,
        coordinator_incarnation: 99,
        interactive: false,
        ..Default::default()
    };
    let vote = participant.prepare(garbage).await.unwrap().into_inner();
    assert_eq!(vote.vote, v1::Vote::No as i32);
    assert_eq!(vote.reason_code, v1::Reason::ValidationFailed as i32, "{}", vote.reason);
    let unknown_kind = v1::KvBatch {
        ops: vec![v1::KvOp { kind: 42, key: "k".into(), value: None, delta: 0 }],
        migration: None,
    };
    let request = v1::PrepareRequest {
        txid: "00000001-99-2".into(),
        payload: prost::Message::encode_to_vec(&unknown_kind),
        one_phase: false,
        coordinator_incarnation: 99,
        interactive: false,
        ..Default::default()
    };
    let vote = participant.prepare(request).await.unwrap().into_inner();
    assert_eq!(vote.vote, v1::Vote::No as i32);
    assert_eq!(vote.reason_code, v1::Reason::ValidationFailed as i32, "{}", vote.reason);
    participant
        .commit(v1::CommitRequest { txid: "00000001-99-3".into(), typed_ack: false })
        .await
        .expect("commit of an unknown txid is a no-op");
    let mut kv = v1::kv_client::KvClient::connect(address).await.unwrap();
    let status = kv.get(v1::GetRequest { keys: vec![String::new()], ring_epoch: 0 }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    info!("--- nothing changed and nothing crashed");
    assert_eq!(client.get(&["k".into()]).await.unwrap()["k"].as_deref(), Some(&b"v"[..]));
    for id in [NodeId::Coordinator, NodeId::Participant(0), NodeId::Participant(1)] {
        assert!(cluster.is_running(id), "{id:?} died");
    }
    check::unlocked(&client, &[client.route("k").unwrap()], &["k".to_string()]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_transactions_on_the_same_keys_wait_for_phase_two_instead_of_conflicting() {
    init();
    let cluster = Cluster::start(Options::new(3)).await.unwrap();
    let client = cluster.client().await.unwrap();
    assert_ne!(client.route("a").unwrap(), client.route("b").unwrap(), "a two-participant transaction");
    info!("--- the client hears COMMITTED before phase two releases the locks; the next one waits for them");
    for i in 0..300 {
        let ops = vec![KvOp::Add { key: "a".into(), delta: -1 }, KvOp::Add { key: "b".into(), delta: 1 }];
        let result = client.transact(ops).await.unwrap();
        assert_eq!(result.outcome, Outcome::Committed, "transfer {i}: {}", result.reason);
    }
    let values = client.get(&["a".into(), "b".into()]).await.unwrap();
    assert_eq!(values["a"].as_deref(), Some(&b"-300"[..]));
    assert_eq!(values["b"].as_deref(), Some(&b"300"[..]));
}

/// A TransactStream's leased txids: each usable once, in order, while its
/// lease holds; an outcome query of one not used yet answers ABORTED and
/// fences it, so it can never start and contradict that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_txids_are_used_once_and_an_outcome_query_fences_an_unused_one() {
    init();
    let cluster = Cluster::start(common::quick_options()).await.unwrap();
    let names = cluster.participant_names();
    let mut coordinator =
        v1::coordinator_client::CoordinatorClient::connect(cluster.coordinator_url()).await.unwrap();
    let (send, outbound) = tokio::sync::mpsc::unbounded_channel::<v1::TransactStreamRequest>();
    let mut answers = coordinator
        .transact_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    let ask = |id: u64, txid: String, lease_txids: u32| {
        let request = (lease_txids == 0).then(|| v1::TransactRequest {
            branches: check::marked_transfer(&format!("lease-{id}"), &names, 0, 1),
            ..Default::default()
        });
        send.send(v1::TransactStreamRequest { id, request, txid, lease_txids, ..Default::default() })
            .unwrap();
    };
    ask(0, String::new(), 8);
    let lease = answers.message().await.unwrap().unwrap().lease.expect("a lease");
    assert_eq!(lease.count, 8);
    assert!(lease.valid_ms > 0);
    let first: decree_proto::TxId = lease.first.parse().unwrap();
    let nth = |n: u64| {
        decree_proto::TxId::new(first.coordinator, first.incarnation, first.sequence + n).to_string()
    };

    info!("--- asked before it is used, a leased txid is aborted, and fenced");
    let outcome = |txid: String| {
        let mut coordinator = coordinator.clone();
        async move { coordinator.get_outcome(v1::GetOutcomeRequest { txid }).await }
    };
    let asked = outcome(nth(0)).await.unwrap().into_inner();
    assert_eq!(asked.outcome, v1::Outcome::Aborted as i32);
    ask(1, nth(0), 0);
    let refused = answers.message().await.unwrap().unwrap();
    assert_eq!((refused.id, refused.code), (1, tonic::Code::FailedPrecondition as i32), "{refused:?}");
    assert_eq!(Reason::from_wire(refused.reason_code), Reason::TxidRefused, "{refused:?}");
    assert_eq!(
        outcome(nth(0)).await.unwrap().into_inner().outcome,
        v1::Outcome::Aborted as i32,
        "the answer holds"
    );

    info!("--- the next one commits under its leased txid; used again, or not leased, it is refused");
    ask(2, nth(1), 0);
    let answer = answers.message().await.unwrap().unwrap();
    let response = answer.response.clone().unwrap_or_else(|| panic!("{answer:?}"));
    assert_eq!((answer.id, response.txid.as_str()), (2, nth(1).as_str()));
    assert_eq!(response.outcome, v1::Outcome::Committed as i32);
    for (id, txid) in [(3, nth(1)), (4, nth(8)), (5, "00000001-99-5".to_string())] {
        ask(id, txid.clone(), 0);
        let refused = answers.message().await.unwrap().unwrap();
        assert_eq!(refused.id, id);
        assert_eq!(Reason::from_wire(refused.reason_code), Reason::TxidRefused, "{txid}: {refused:?}");
    }
    assert_eq!(outcome(nth(1)).await.unwrap().into_inner().outcome, v1::Outcome::Committed as i32);
    info!("--- asked before it is issued, a txid is aborted, and the sequence moves past it");
    let ahead = outcome(nth(1_000_000)).await.unwrap().into_inner();
    assert_eq!(ahead.outcome, v1::Outcome::Aborted as i32);
    ask(0, String::new(), 8);
    let later = answers.message().await.unwrap().unwrap().lease.expect("a lease");
    let later: decree_proto::TxId = later.first.parse().unwrap();
    assert!(later.sequence > first.sequence + 1_000_000, "{later} is issued after the fenced one");
    let status = outcome(nth(1 << 40)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "far beyond any txid issued: {status:?}");
    let client = cluster.client().await.unwrap();
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0, "one transfer, whole");
}

/// A participant name held by a live participant is not taken by a second
/// process from another address (it exits 2, and keys keep going to the
/// holder); an operator's `decree participants move` gives the name to a new
/// address, and the old process, displaced while running, stops with exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_participants_name_is_not_taken_and_an_operator_moves_it() {
    init();
    let mut options = Options::new(2);
    options.participant_args = s(&["--heartbeat-ms", "200"]);
    let mut cluster = Cluster::start(options).await.unwrap();
    let url = cluster.coordinator_url();
    let client = cluster.client().await.unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    let puts = keys.iter().map(|k| KvOp::Put { key: k.clone(), value: b"1".to_vec() }).collect();
    assert_eq!(client.transact(puts).await.unwrap().outcome, Outcome::Committed);
    let address_of = |listed: &[decree_client::ParticipantInfo]| {
        listed.iter().find(|p| p.name == "p1").map(|p| p.address.clone()).unwrap()
    };
    let holder = address_of(&client.participants().await.unwrap());
    assert_eq!(holder, cluster.url_of(cluster.participant("p1")));

    info!("--- a second process named p1 is refused and exits 2; nothing changed");
    let impostor = cluster.dir().join("impostor");
    let port = free_port().unwrap();
    let run = decree_async(s(&[
        "participant",
        "--name",
        "p1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        impostor.to_str().unwrap(),
        "--coordinator",
        &url,
        "--heartbeat-ms",
        "200",
    ]))
    .await;
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    assert!(run.stderr.contains("held by a live participant at"), "{}", run.stderr);
    assert!(run.stderr.contains("decree participants move p1"), "{}", run.stderr);
    let listed = client.participants().await.unwrap();
    assert_eq!(address_of(&listed), holder, "the name stayed with its holder");
    assert!(listed.iter().all(|p| p.state == "up"), "{listed:?}");
    let values = client.get(&keys).await.unwrap();
    assert!(values.values().all(|v| v.as_deref() == Some(&b"1"[..])), "every committed value still reads");
    let bump = keys.iter().map(|k| KvOp::Put { key: k.clone(), value: b"2".to_vec() }).collect();
    assert_eq!(client.transact(bump).await.unwrap().outcome, Outcome::Committed);
    let values = client.get(&keys).await.unwrap();
    assert!(values.values().all(|v| v.as_deref() == Some(&b"2"[..])));

    info!("--- a move without a reason is refused; one of a name never enrolled is NOT_FOUND");
    let target_port = free_port().unwrap();
    let target = format!("http://127.0.0.1:{target_port}");
    let moving = |name: &str, reason: &str| {
        let args =
            ["participants", "move", name, "--address", &target, "--reason", reason, "--coordinator", &url];
        decree_async(s(&[&args[..], &["--json"]].concat()))
    };
    let run = moving("p1", " ").await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("reason"), "{}", run.stderr);
    let run = moving("p9", "r").await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("p9 never enrolled"), "{}", run.stderr);
    assert_eq!(address_of(&client.participants().await.unwrap()), holder);

    info!("--- the operator moves p1; the process started there enrolls; the old one stops with exit 2");
    let run = moving("p1", "machine replaced").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["previous"], holder.as_str());
    let moved = cluster.dir().join("moved");
    let listen = target.trim_start_matches("http://").to_owned();
    let mut new_holder = tokio::process::Command::new(decree_tests::decree_binary())
        .args([
            "participant",
            "--name",
            "p1",
            "--listen",
            &listen,
            "--coordinator",
            &url,
            "--heartbeat-ms",
            "200",
        ])
        .arg("--data-dir")
        .arg(&moved)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let old = cluster.participant("p1");
    let status = cluster.wait_exit(old, Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(2), "the displaced p1: {}", cluster.log_of(old));
    assert!(cluster.log_of(old).contains("another live participant holds it"), "{}", cluster.log_of(old));
    let listed = client.participants().await.unwrap();
    assert_eq!(address_of(&listed), target);
    assert!(listed.iter().all(|p| p.state == "up"), "the new p1 is heard from: {listed:?}");
    assert!(new_holder.try_wait().unwrap().is_none(), "the new p1 keeps running");
    assert!(cluster.log_of(NodeId::Coordinator).contains("participant moved by an operator"));
    let _ = new_holder.kill().await;
}
