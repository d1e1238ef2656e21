//! Running it in production: the standard gRPC health service and server
//! reflection on both servers, Prometheus metrics that move under load, and a
//! graceful SIGTERM that lets transactions in flight finish.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{init, metric, scrape};
use decree_client::{v1, Client, ClientError, KvOp, Outcome};
use decree_tests::{check, poll, Cluster, NodeId, Options};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tracing::info;

async fn channel(url: String) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap()
}

/// The services a server lists through reflection, asked in grpc.reflection.v1
/// and in the older v1alpha (which many tools still use): both must agree.
async fn reflected(url: String) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel(url.clone()).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let mut names: Vec<String> = match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    };
    names.sort();

    use tonic_reflection::pb::v1alpha as alpha;
    let mut client = alpha::server_reflection_client::ServerReflectionClient::new(channel(url).await);
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let mut alpha_names: Vec<String> = match answer.message_response {
        Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected v1alpha reflection answer: {other:?}"),
    };
    alpha_names.sort();
    assert_eq!(names, alpha_names, "v1 and v1alpha reflection list the same services");
    names
}

async fn health(url: String, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(url).await);
    let response = client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_health_says_serving() {
    init();
    let cluster = Cluster::start(Options::new(1)).await.unwrap();
    let reflection = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];
    let expected = |own: &[&str]| {
        let mut names: Vec<String> =
            own.iter().chain(&["grpc.health.v1.Health"]).chain(&reflection).map(|s| s.to_string()).collect();
        names.sort();
        names
    };
    // Each server lists exactly what it serves: the coordinator serves no Participant or Kv.
    let coordinator = reflected(cluster.coordinator_url()).await;
    assert_eq!(coordinator, expected(&["decree.v1.Coordinator", "decree.v1.Registry"]));
    let participant = reflected(cluster.url_of(NodeId::Participant(0))).await;
    assert_eq!(participant, expected(&["decree.v1.Participant", "decree.v1.Kv"]));
    assert_eq!(health(cluster.coordinator_url(), "").await, ServingStatus::Serving);
    assert_eq!(health(cluster.coordinator_url(), "decree.v1.Coordinator").await, ServingStatus::Serving);
    assert_eq!(
        health(cluster.url_of(NodeId::Participant(0)), "decree.v1.Participant").await,
        ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_what_is_in_flight_and_exits_0() {
    init();
    let mut options = Options::new(3);
    options.coordinator_args = vec!["--shutdown-grace-ms".into(), "10000".into()];
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let url = cluster.coordinator_url();
    let client = cluster.client().await.unwrap();

    info!("--- four clients run marked transfers without pause");
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, names, stop, progress) =
                (client.clone(), names.clone(), stop.clone(), progress.clone());
            tokio::spawn(async move {
                // (tag, the answer) of every transaction that got one.
                let mut answered = Vec::new();
                // Tags of the transactions refused as not started (UNAVAILABLE).
                let mut refused = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let tag = format!("w{w}-{i}");
                    match client.transact_branches(check::marked_transfer(&tag, &names, w, 1)).await {
                        Ok(result) => {
                            answered.push((tag, result.outcome));
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err @ ClientError::OutcomeUnknown { .. }) => panic!("{tag}: a client saw {err}"),
                        Err(ClientError::Status(status)) if status.code() == tonic::Code::Unavailable => {
                            refused.push(tag)
                        }
                        // Not connected: the coordinator is gone.
                        Err(_) => {}
                    }
                }
                (answered, refused)
            })
        })
        .collect();
    poll(Duration::from_secs(30), "the load to run", || async {
        (progress.load(Ordering::Relaxed) >= 40).then_some(())
    })
    .await
    .unwrap();

    info!("--- SIGTERM the coordinator");
    cluster.terminate(NodeId::Coordinator);
    let status = cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(15)).await.unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM: {status}");
    assert!(cluster
        .log_of(NodeId::Coordinator)
        .contains("every transaction in flight is decided and acknowledged"));
    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    for worker in workers {
        let (mine, not_started) = worker.await.unwrap();
        answered.extend(mine);
        refused.extend(not_started);
    }
    assert!(answered.len() > 10, "the load ran: {} answered", answered.len());

    info!("--- restart: nothing in doubt, every answer true");
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();
    let client = Client::connect(&url).await.unwrap();
    let in_doubt = client.in_doubt().await.unwrap();
    assert!(in_doubt.0.is_empty(), "{in_doubt:?}");
    for (tag, outcome) in answered.iter().rev().take(40) {
        let everywhere = check::all_or_nothing(&client, tag, &names).await.unwrap();
        assert_eq!(everywhere, *outcome == Outcome::Committed, "{tag} was answered {outcome:?}");
    }
    info!(answered = answered.len(), refused = refused.len(), "--- refused transactions wrote nothing");
    for tag in &refused {
        assert_eq!(check::markers(&client, tag, &names).await.unwrap(), 0, "{tag} was refused, yet it wrote");
    }
    assert_eq!(check::balance_sum(&client, &names, 4).await.unwrap(), 0);
    let put = vec![KvOp::Put { key: "after".into(), value: b"1".to_vec() }];
    let branch = v1::Branch { participant: "p1".into(), payload: decree_client::kv_payload(put) };
    let after = client.transact_branches(vec![branch]).await.unwrap();
    assert_eq!(after.outcome, Outcome::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_load() {
    init();
    let addr = common::metrics_address();
    let mut options = Options::new(2);
    options.coordinator_args = vec!["--metrics-listen".into(), addr.clone()];
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let before = poll(Duration::from_secs(10), "the metrics endpoint", || async {
        let stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
        drop(stream);
        Some(scrape(&addr).await)
    })
    .await
    .unwrap();
    for i in 0..20 {
        let ops = vec![
            KvOp::Put { key: format!("a{i}"), value: b"1".to_vec() },
            KvOp::Put { key: format!("b{i}"), value: b"1".to_vec() },
        ];
        client.transact(ops).await.unwrap();
    }
    let refused = vec![
        KvOp::Expect { key: "a0".into(), value: Some(b"2".to_vec()) },
        KvOp::Put { key: "b0".into(), value: b"3".to_vec() },
    ];
    assert_eq!(client.transact(refused).await.unwrap().outcome, Outcome::Aborted);
    let after = scrape(&addr).await;
    let committed = |page: &str| metric(page, "decree_transactions_total{outcome=\"committed\"}");
    assert_eq!(committed(&after) - committed(&before), 20.0, "{after}");
    let refused = |page: &str| metric(page, "decree_aborts_total{reason=\"validation_failed\"}");
    assert_eq!(refused(&after) - refused(&before), 1.0, "{after}");
    assert!(metric(&after, "decree_transaction_seconds_count{phase=\"decide\"}") >= 21.0, "{after}");
    // One-shot transactions arrive as messages on the SDK's TransactStream.
    let received = |page: &str| {
        metric(page, "decree_grpc_requests_total") + metric(page, "decree_grpc_stream_messages_total")
    };
    assert!(received(&after) >= received(&before) + 21.0, "{after}");
    assert!(metric(&after, "decree_log_fsyncs_total") > metric(&before, "decree_log_fsyncs_total"));
    // Each synced batch's time, fsync included: as many as the fsyncs, each taking some time.
    let synced = |page: &str| metric(page, "decree_log_write_seconds_count{synced=\"true\"}");
    assert!(synced(&after) - synced(&before) >= 1.0, "{after}");
    assert!(metric(&after, "decree_log_write_seconds_sum{synced=\"true\"}") > 0.0, "{after}");
    // One client, one transaction at a time: no group ever waits for company.
    assert!(after.lines().any(|l| l == "decree_log_company_waits_total 0"), "{after}");
}

/// A cluster where transfer "t1" committed and p2 died at
/// `participant.commit.before_apply`, so the coordinator still owes it the Commit.
async fn committed_with_p2_down(mut options: Options) -> (Cluster, Vec<String>, decree_client::TxnResult) {
    options.services = true;
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let p2 = NodeId::Participant(1);
    cluster.restart_armed(p2, "participant.commit.before_apply").await.unwrap();
    let client = cluster.client().await.unwrap();
    let result = client.transact_branches(check::marked_transfer("t1", &names, 0, 5)).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed);
    cluster.wait_exit(p2, Duration::from_secs(20)).await.unwrap();
    (cluster, names, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_commit_is_redelivered_after_restart() {
    init();
    let mut options = Options::new(2);
    options.coordinator_args = vec!["--shutdown-grace-ms".into(), "60000".into()];
    options.participant_args = vec!["--in-doubt-after-ms".into(), "300".into()];
    let (mut cluster, names, _) = committed_with_p2_down(options).await;
    let p2 = NodeId::Participant(1);

    info!(
        "--- SIGTERM: the coordinator waits (up to a minute) for p2's ack; a second SIGTERM ends it at once"
    );
    cluster.terminate(NodeId::Coordinator);
    poll(Duration::from_secs(10), "the coordinator to start draining", || async {
        cluster.log_of(NodeId::Coordinator).contains("shutting down").then_some(())
    })
    .await
    .unwrap();
    cluster.terminate(NodeId::Coordinator);
    let status = cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(130), "{status}");

    cluster.restart(p2).unwrap();
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(
        check::all_or_nothing(&client, "t1", &names).await.unwrap(),
        "the commit reached p2 after the restart"
    );
}

#[test]
fn config_file_then_environment_then_flags_and_bad_values_exit_2_naming_the_option() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.toml");
    std::fs::write(&file, "data-dir = \"/tmp/d\"\nprepare_timeout_ms = 1500\ncommit-timeout-ms = 700\n")
        .unwrap();
    let file = file.display().to_string();
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let mut command = std::process::Command::new(decree_tests::decree_binary());
        command.args(["coordinator", "--config", &file, "--print-config"]).args(extra);
        command.env_remove("DECREE_PREPARE_TIMEOUT_MS").env_remove("DECREE_COMMIT_TIMEOUT_MS");
        for (k, v) in env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, printed, _) = run(&[], &[]);
    assert_eq!(code, Some(0));
    let printed: toml::Table = printed.parse().unwrap();
    assert_eq!(printed["prepare_timeout_ms"].as_integer(), Some(1500), "from the file");
    assert_eq!(printed["commit_timeout_ms"].as_integer(), Some(700), "from the file");
    assert_eq!(printed["idle_timeout_ms"].as_integer(), Some(30000), "the default");
    let (_, printed, _) = run(&[("DECREE_PREPARE_TIMEOUT_MS", "900")], &[]);
    assert!(printed.contains("prepare_timeout_ms = 900"), "the environment beats the file: {printed}");
    let (_, printed, _) = run(&[("DECREE_PREPARE_TIMEOUT_MS", "900")], &["--prepare-timeout-ms", "800"]);
    assert!(printed.contains("prepare_timeout_ms = 800"), "a flag beats both: {printed}");
    let (code, _, stderr) = run(&[], &["--prepare-timeout-ms", "0"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--prepare-timeout-ms"), "{stderr}");
    // A negative number is a value, refused by its option's parser, not an unknown flag.
    for (flag, bad) in [
        ("--request-queue", "0"),
        ("--max-concurrent-streams", "0"),
        ("--log-format", "xml"),
        ("--prepare-timeout-ms", "-5"),
        ("--worker-threads", "0"),
        ("--worker-threads", "-1"),
        ("--log-writer", "fifo"),
    ] {
        let (code, _, stderr) = run(&[], &[flag, bad]);
        assert_eq!(code, Some(2), "{flag} {bad}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    std::fs::write(dir.path().join("coordinator.toml"), "data-dir = \"/tmp/d\"\nno-such-option = 1\n")
        .unwrap();
    let (code, _, stderr) = run(&[], &[]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("no-such-option"), "{stderr}");
}

#[test]
fn durations_on_the_command_line_take_the_forms_people_type() {
    let bench = |duration: &str| {
        let out = std::process::Command::new(decree_tests::decree_binary())
            .args(["bench", "--coordinator", "http://127.0.0.1:1", "--duration", duration])
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Accepted by the parser, then refused by the bench's own check: zero is no run.
    for zero in ["0s", "0ms", "0m", "0"] {
        let (code, stderr) = bench(zero);
        assert_eq!(code, Some(2), "{zero}: {stderr}");
        assert!(stderr.contains("--duration > 0"), "{zero} parsed, then refused as zero: {stderr}");
    }
    for bad in ["15x", "-5", "fast"] {
        let (code, stderr) = bench(bad);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--duration") && stderr.contains("e.g. 15s"), "{bad}: {stderr}");
    }
}

#[test]
fn an_open_loop_rate_no_client_can_pace_is_refused_before_anything_starts() {
    for bad in ["0", "-5", "nan", "inf", "1e9"] {
        let out = std::process::Command::new(decree_tests::decree_binary())
            .args([
                "bench",
                "--coordinator",
                "http://127.0.0.1:1",
                "--duration",
                "1",
                &format!("--rate={bad}"),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("--rate must be a positive number") && stderr.contains("at most 1000000"),
            "{bad}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_doubt_gauges_rise_while_the_coordinator_is_away_and_fall_after() {
    init();
    let addr = common::metrics_address();
    let mut options = Options::new(2);
    options.participant_args = vec!["--resolve-interval-ms".into(), "50".into()];
    options.participant_args_for = vec![("p1".into(), vec!["--metrics-listen".into(), addr.clone()])];
    options.coordinator_args = vec!["--log-format".into(), "json".into()];
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(client.transact_branches(check::marked_transfer("t1", &names, 0, 5)).await.is_err());
    cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(20)).await.unwrap();
    let gauge = |page: &str, name: &str| metric(page, name);
    poll(Duration::from_secs(20), "p1's in-doubt gauges to rise", || async {
        let page = scrape(&addr).await;
        (gauge(&page, "decree_in_doubt_branches ") == 1.0
            && gauge(&page, "decree_in_doubt_oldest_seconds ") > 0.0)
            .then_some(())
    })
    .await
    .unwrap();
    cluster.restart(NodeId::Coordinator).unwrap();
    poll(Duration::from_secs(30), "p1's in-doubt gauges to fall to zero", || async {
        let page = scrape(&addr).await;
        (gauge(&page, "decree_in_doubt_branches ") == 0.0
            && gauge(&page, "decree_in_doubt_oldest_seconds ") == 0.0)
            .then_some(())
    })
    .await
    .unwrap();
    // t1's Prepare here took its time, from arrival to vote.
    let page = scrape(&addr).await;
    assert!(metric(&page, "decree_prepare_seconds_count") >= 1.0, "{page}");
    assert!(metric(&page, "decree_prepare_seconds_sum") > 0.0, "{page}");

    info!("--- the coordinator logs one JSON object per line with --log-format json");
    let log = cluster.log_of(NodeId::Coordinator);
    let line = log.lines().find(|l| l.contains("recovery: redriving")).expect("a recovery line");
    let object: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(object["level"], "INFO");
    assert!(object["fields"]["txid"].is_string(), "{object}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decree_retry_redelivers_phase_two_to_the_participants_that_owe_an_ack() {
    init();
    let mut options = Options::new(2);
    options.coordinator_args =
        vec!["--redelivery-base-ms".into(), "60000".into(), "--redelivery-cap-ms".into(), "60000".into()];
    let (mut cluster, names, result) = committed_with_p2_down(options).await;
    let p2 = NodeId::Participant(1);

    info!("--- while p2 is down, decree retry names it: it owes the ack");
    let url = cluster.coordinator_url();
    let run = common::decree_async(vec![
        "retry".into(),
        result.txid.clone(),
        "--json".into(),
        "--coordinator".into(),
        url.clone(),
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let answer = run.json();
    assert_eq!(answer["outcome"], "committed");
    assert_eq!(answer["redelivered"], serde_json::json!(["p2"]), "{answer}");
    cluster.restart(p2).unwrap();
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(check::all_or_nothing(&client, "t1", &names).await.unwrap());
    // p2 is settled once its commit is applied; the coordinator hears its ack just after.
    let ended =
        decree_tests::poll(Duration::from_secs(30), "phase two to end at the coordinator", || async {
            let listed = client.transactions(Some(&result.txid), 0).await.ok()?;
            listed.in_flight.is_empty().then_some(())
        })
        .await;
    ended.unwrap();

    let run =
        common::decree_async(vec!["retry".into(), result.txid.clone(), "--coordinator".into(), url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("nothing to redeliver"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heuristic_decision_is_refused_while_the_coordinator_knows_recorded_listed_and_flagged_when_contradicted(
) {
    init();
    let mut options = Options::new(2);
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--resolve-interval-ms", "50", "--heartbeat-ms", "200"]
            .map(String::from)
            .to_vec();
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let url = cluster.coordinator_url();
    let urls: Vec<String> = (0..2).map(|i| cluster.url_of(NodeId::Participant(i))).collect();
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    assert!(client.transact_branches(check::marked_transfer("t1", &names, 0, 5)).await.is_err());
    cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(20)).await.unwrap();
    let (in_doubt, _) = decree_client::in_doubt_at_urls(&urls).await.unwrap();
    assert_eq!(in_doubt.len(), 2);
    let txid = in_doubt[0].txid.clone();

    info!("--- the coordinator is gone: an operator aborts by hand (wrongly: it had decided commit)");
    let args = common::abort_by_hand(&txid, &url, &urls);
    let run = common::decree_async(args.clone()).await;
    assert_eq!(run.code, 0, "{} {}", run.stdout, run.stderr);
    let (in_doubt, _) = decree_client::in_doubt_at_urls(&urls).await.unwrap();
    assert!(in_doubt.is_empty(), "decided by hand: {in_doubt:?}");

    let mut list: Vec<String> = ["heuristics", "--json"].map(String::from).to_vec();
    for u in &urls {
        list.extend(["--participant".to_string(), u.clone()]);
    }
    let listed = common::decree_async(list.clone()).await.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for h in listed {
        assert_eq!((h["txid"].as_str(), h["decision"].as_str()), (Some(txid.as_str()), Some("abort")));
        assert_eq!(
            (h["operator"].as_str(), h["reason"].as_str()),
            (Some("alice"), Some("coordinator host lost"))
        );
        assert_eq!(
            (h["coordinator_outcome"].as_str(), h["contradicted"].as_bool()),
            (Some("unknown"), Some(false))
        );
    }

    info!("--- the coordinator returns with its COMMIT decision: the contradiction is flagged at both");
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    poll(Duration::from_secs(30), "both heuristic records to be flagged", || {
        let list = list.clone();
        async move {
            let listed = common::decree_async(list).await.json();
            listed
                .as_array()?
                .iter()
                .all(|h| h["contradicted"] == true && h["coordinator_outcome"] == "committed")
                .then_some(())
        }
    })
    .await
    .unwrap();
    let client = cluster.client().await.unwrap();
    assert_eq!(client.status(&txid).await.unwrap(), Outcome::Committed);
    assert_eq!(
        check::markers(&client, "t1", &names).await.unwrap(),
        0,
        "the operator's abort stands; flagged"
    );
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();

    info!("--- with the coordinator up, a heuristic decision is refused");
    let run = common::decree_async(args).await;
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("knows its outcome: committed"), "{}", run.stderr);
}

/// A batch of more commits than a participant takes (4,096) is refused as a
/// whole, naming the bound, on both calls that carry batches: the CommitBatch
/// call fails INVALID_ARGUMENT; on a CommitStream each commit of that message
/// is answered INVALID_ARGUMENT, and the stream goes on to answer the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_commit_batch_is_refused_on_either_call_and_the_stream_goes_on() {
    init();
    let cluster = Cluster::start(Options::new(1)).await.unwrap();
    let p1 = cluster.url_of(NodeId::Participant(0));
    let channel = tonic::transport::Endpoint::from_shared(p1).unwrap().connect().await.unwrap();
    let mut participant = v1::participant_client::ParticipantClient::new(channel);
    let batch = |n: u64| v1::CommitBatchRequest {
        commits: (1..=n)
            .map(|s| v1::BatchedCommit {
                txid: decree_client::TxId::new(77, 1, s).to_string(),
                ..Default::default()
            })
            .collect(),
        typed_ack: true,
    };
    let bound = "at most 4096 commits per batch";

    let status = participant.commit_batch(batch(4097)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(bound), "{status:?}");

    let (send, outbound) = tokio::sync::mpsc::unbounded_channel();
    send.send(batch(4097)).unwrap();
    let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
    let mut answers = participant.commit_stream(outbound).await.unwrap().into_inner();
    let refused = answers.message().await.unwrap().expect("an answer to the oversized message");
    assert_eq!(refused.results.len(), 4097);
    for result in &refused.results {
        assert_eq!(result.code, tonic::Code::InvalidArgument as i32, "{result:?}");
        assert!(result.message.contains(bound), "{result:?}");
    }
    // Commits of txids the participant never saw: done, without effect.
    send.send(batch(2)).unwrap();
    let next = answers.message().await.unwrap().expect("an answer to the next message");
    let answered: Vec<(String, i32)> = next.results.into_iter().map(|r| (r.txid, r.code)).collect();
    let want: Vec<(String, i32)> =
        (1..=2).map(|s| (decree_client::TxId::new(77, 1, s).to_string(), 0)).collect();
    assert_eq!(answered, want);
}

/// The rule "a hand-made decision is refused while the coordinator answers"
/// is the participant's, not only the CLI's: a Resolve RPC sent straight to
/// a participant is refused while its coordinator can answer for the txid,
/// and recorded once the coordinator is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_resolve_is_refused_while_the_coordinator_answers() {
    init();
    let mut options = Options::new(1);
    // The branch below stays in doubt for the whole test unless decided by hand.
    options.participant_args = ["--in-doubt-after-ms", "600000"].map(String::from).to_vec();
    let mut cluster = Cluster::start(options).await.unwrap();
    let p1 = cluster.url_of(NodeId::Participant(0));
    let client = cluster.client().await.unwrap();
    let seen = client.transact(vec![KvOp::Put { key: "k".into(), value: b"1".to_vec() }]).await.unwrap();
    let seen: decree_client::TxId = seen.txid.parse().unwrap();

    info!("--- a branch in doubt at the participant: its Prepare came straight from this test");
    let txid = decree_client::TxId::new(seen.coordinator, seen.incarnation, seen.sequence + 1000).to_string();
    let channel = tonic::transport::Endpoint::from_shared(p1.clone()).unwrap().connect().await.unwrap();
    let mut participant = decree_client::v1::participant_client::ParticipantClient::new(channel);
    let prepare = decree_client::v1::PrepareRequest {
        txid: txid.clone(),
        payload: decree_client::kv_payload(vec![KvOp::Put { key: "held".into(), value: b"x".to_vec() }]),
        coordinator_incarnation: seen.incarnation,
        ..Default::default()
    };
    let vote = participant.prepare(prepare).await.unwrap().into_inner();
    assert_eq!(vote.vote, decree_client::v1::Vote::Yes as i32, "{vote:?}");

    info!("--- the coordinator answers for it: a direct Resolve is refused and records nothing");
    match decree_client::resolve_at(&p1, &txid, true, "by hand", "alice").await {
        Err(ClientError::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            assert_eq!(
                status.message(),
                "refused: the coordinator answers OUTCOME_ABORTED; this participant learns it by asking; \
                 a heuristic decision is only for when it is gone"
            );
        }
        other => panic!("a direct Resolve was not refused: {other:?}"),
    }
    let (lists, _) = decree_client::heuristics_at_urls(std::slice::from_ref(&p1)).await.unwrap();
    assert!(lists.iter().all(|l| l.heuristics.is_empty()), "{lists:?}");
    let (in_doubt, _) = decree_client::in_doubt_at_urls(std::slice::from_ref(&p1)).await.unwrap();
    assert_eq!(in_doubt.len(), 1, "still in doubt: {in_doubt:?}");

    info!("--- the coordinator is gone: the same Resolve is recorded and applied");
    cluster.kill(NodeId::Coordinator);
    decree_client::resolve_at(&p1, &txid, false, "coordinator host lost", "alice").await.unwrap();
    let (lists, _) = decree_client::heuristics_at_urls(std::slice::from_ref(&p1)).await.unwrap();
    assert_eq!(lists.iter().map(|l| l.heuristics.len()).sum::<usize>(), 1, "{lists:?}");
    poll(Duration::from_secs(10), "the branch to be decided by hand", || {
        let p1 = p1.clone();
        async move {
            let (in_doubt, _) = decree_client::in_doubt_at_urls(std::slice::from_ref(&p1)).await.ok()?;
            in_doubt.is_empty().then_some(())
        }
    })
    .await
    .unwrap();
}

/// Passes gRPC messages through as the bytes they are, so a test can send
/// what no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// A valid request of each unary RPC a stranger can reach, encoded: the
/// seeds the mutations start from. Names and keys are ones the cluster does
/// not use, so that what a mutation makes valid touches nothing a test reads.
fn seed_requests(participant: &str) -> Vec<(&'static str, bool, Vec<u8>)> {
    use prost::Message;
    let txid = "0000abcd-1-7".to_owned();
    let put = decree_client::kv_payload(vec![KvOp::Put { key: "fuzz-key".into(), value: b"1".to_vec() }]);
    let branch = v1::Branch { participant: participant.into(), payload: put.clone() };
    let coordinator = |path, bytes| (path, true, bytes);
    let participant_ = |path, bytes| (path, false, bytes);
    vec![
        coordinator(
            "/decree.v1.Coordinator/Transact",
            v1::TransactRequest { branches: vec![branch], ..Default::default() }.encode_to_vec(),
        ),
        coordinator("/decree.v1.Coordinator/Begin", v1::BeginRequest { timeout_ms: 50 }.encode_to_vec()),
        coordinator(
            "/decree.v1.Coordinator/Enlist",
            v1::EnlistRequest { txid: txid.clone(), participant: "fuzz-p".into(), ..Default::default() }
                .encode_to_vec(),
        ),
        coordinator(
            "/decree.v1.Coordinator/Commit",
            v1::CommitTransactionRequest { txid: txid.clone(), pending_outcome: true }.encode_to_vec(),
        ),
        coordinator(
            "/decree.v1.Coordinator/Abort",
            v1::AbortTransactionRequest { txid: txid.clone() }.encode_to_vec(),
        ),
        coordinator(
            "/decree.v1.Coordinator/GetOutcome",
            v1::GetOutcomeRequest { txid: txid.clone() }.encode_to_vec(),
        ),
        coordinator("/decree.v1.Coordinator/Retry", v1::RetryRequest { txid: txid.clone() }.encode_to_vec()),
        coordinator("/decree.v1.Coordinator/ListStuck", v1::ListStuckRequest {}.encode_to_vec()),
        coordinator(
            "/decree.v1.Registry/Enroll",
            v1::EnrollRequest {
                name: "fuzz-p".into(),
                address: "http://127.0.0.1:9".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        coordinator(
            "/decree.v1.Registry/Heartbeat",
            v1::HeartbeatRequest { name: "fuzz-p".into(), address: "http://127.0.0.1:9".into() }
                .encode_to_vec(),
        ),
        coordinator(
            "/decree.v1.Registry/MoveParticipant",
            v1::MoveParticipantRequest {
                name: "fuzz-q".into(),
                address: "http://127.0.0.1:9".into(),
                operator: "fuzz".into(),
                reason: "fuzz".into(),
            }
            .encode_to_vec(),
        ),
        coordinator("/decree.v1.Registry/ListParticipants", v1::ListParticipantsRequest {}.encode_to_vec()),
        coordinator("/decree.v1.Registry/GetRing", v1::GetRingRequest {}.encode_to_vec()),
        coordinator(
            "/decree.v1.Registry/ChangeRing",
            v1::ChangeRingRequest { op: 3, name: "fuzz-q".into(), weight: 2 }.encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Participant/Prepare",
            v1::PrepareRequest { txid: txid.clone(), payload: put.clone(), ..Default::default() }
                .encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Participant/Commit",
            v1::CommitRequest { txid: txid.clone(), typed_ack: true }.encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Participant/CommitBatch",
            v1::CommitBatchRequest {
                commits: vec![v1::BatchedCommit { txid: txid.clone(), ..Default::default() }],
                typed_ack: true,
            }
            .encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Participant/Abort",
            v1::AbortRequest { txid: txid.clone(), ..Default::default() }.encode_to_vec(),
        ),
        participant_("/decree.v1.Participant/ListInDoubt", v1::ListInDoubtRequest {}.encode_to_vec()),
        participant_("/decree.v1.Participant/ListLocks", v1::ListLocksRequest {}.encode_to_vec()),
        participant_("/decree.v1.Participant/ListHeuristics", v1::ListHeuristicsRequest {}.encode_to_vec()),
        participant_(
            "/decree.v1.Participant/Resolve",
            v1::ResolveRequest {
                txid: txid.clone(),
                commit: true,
                reason: "fuzz".into(),
                operator: "fuzz".into(),
            }
            .encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Kv/Get",
            v1::GetRequest { keys: vec!["fuzz-key".into()], ring_epoch: 0 }.encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Kv/Execute",
            v1::ExecuteRequest { txid: txid.clone(), ..Default::default() }.encode_to_vec(),
        ),
        participant_(
            "/decree.v1.Kv/ScanMoving",
            v1::ScanMovingRequest { after: "fuzz".into(), limit: 10, ..Default::default() }.encode_to_vec(),
        ),
    ]
}

/// A valid first message of each stream, encoded.
fn seed_streams(participant: &str) -> Vec<(&'static str, bool, Vec<u8>)> {
    use prost::Message;
    let put = decree_client::kv_payload(vec![KvOp::Put { key: "fuzz-key".into(), value: b"1".to_vec() }]);
    let branch = v1::Branch { participant: participant.into(), payload: put.clone() };
    let transact = v1::TransactRequest { branches: vec![branch], ..Default::default() };
    vec![
        (
            "/decree.v1.Coordinator/TransactStream",
            true,
            v1::TransactStreamRequest { id: 1, request: Some(transact), ..Default::default() }
                .encode_to_vec(),
        ),
        (
            "/decree.v1.Participant/PrepareStream",
            false,
            v1::PrepareRequest { txid: "0000abcd-1-9".into(), payload: put, ..Default::default() }
                .encode_to_vec(),
        ),
        (
            "/decree.v1.Participant/CommitStream",
            false,
            v1::CommitBatchRequest {
                commits: vec![v1::BatchedCommit { txid: "0000abcd-1-9".into(), ..Default::default() }],
                typed_ack: true,
            }
            .encode_to_vec(),
        ),
    ]
}

/// How a server answered a hostile call: a label for the tally, or why the
/// answer shows something broke.
fn judged(answer: Result<(), tonic::Status>) -> Result<String, String> {
    let status = match answer {
        Ok(()) => return Ok("Ok".into()),
        Err(status) => status,
    };
    // What the decoder refuses is INTERNAL by gRPC's convention, and says so.
    let undecodable = status.message().starts_with("failed to decode Protobuf message");
    match status.code() {
        tonic::Code::Internal if undecodable => Ok("undecodable".into()),
        // A handler that panics resets its stream: the call ends CANCELLED (or
        // UNKNOWN), which a server never answers on its own.
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss | tonic::Code::Cancelled => {
            Err(format!("{:?}: {}", status.code(), status.message()))
        }
        code => Ok(format!("{code:?}")),
    }
}

/// A seed changed as a mutation fuzzer would: bytes flipped, replaced,
/// inserted or removed, a tail cut, or a run of random bytes spliced in.
fn mutate(seed: &[u8], rng: &mut impl rand::Rng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..6) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.random_range(0..8),
            1 if at < bytes.len() => bytes[at] = rng.random(),
            2 => bytes.insert(at, rng.random()),
            3 if at < bytes.len() => {
                bytes.remove(at);
            }
            4 => bytes.truncate(at),
            _ => {
                let run: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                bytes.splice(at..at, run);
            }
        }
    }
    bytes
}

/// Every unary RPC a stranger can reach, at the coordinator and at a
/// participant, fed mutations of a valid request (arbitrary field values,
/// lengths and tags: what a decoder meets from a hostile peer), and pure
/// garbage: each gets an answer, OK or a status, never a dropped connection
/// or an internal error; both processes keep running; what was committed
/// before is intact and a transaction after commits. DECREE_FUZZ_CASES
/// (default 40 per RPC) and DECREE_FUZZ_SEED run longer or replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_to_every_rpc_are_answered_and_break_nothing() {
    use rand::{Rng, SeedableRng};
    init();
    let mut cluster = Cluster::start(Options::new(2)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let keep = vec![
        KvOp::Put { key: "kept-1".into(), value: b"one".to_vec() },
        KvOp::Add { key: "kept-2".into(), delta: 7 },
    ];
    assert_eq!(client.transact(keep).await.unwrap().outcome, Outcome::Committed);
    let cases: usize = std::env::var("DECREE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let seed: u64 =
        std::env::var("DECREE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    info!(seed, cases, "--- fuzzing every RPC (replay: DECREE_FUZZ_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let coordinator =
        tonic::transport::Endpoint::from_shared(cluster.coordinator_url()).unwrap().connect_lazy();
    let participant = tonic::transport::Endpoint::from_shared(cluster.url_of(NodeId::Participant(0)))
        .unwrap()
        .connect_lazy();
    let p1 = cluster.participant_names()[0].clone();
    let mut answered = std::collections::BTreeMap::<String, usize>::new();
    for (path, to_coordinator, request) in seed_requests(&p1) {
        let channel = if to_coordinator { coordinator.clone() } else { participant.clone() };
        let mut grpc = tonic::client::Grpc::new(channel);
        for case in 0..cases {
            let bytes = match case % 8 {
                7 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
                _ => mutate(&request, &mut rng),
            };
            grpc.ready().await.unwrap();
            let path_and_query = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            let call = grpc.unary(tonic::Request::new(bytes.clone()), path_and_query, RawCodec);
            let answer = tokio::time::timeout(Duration::from_secs(10), call).await;
            let answer =
                answer.unwrap_or_else(|_| panic!("{path}: no answer in 10 s to {bytes:?} (seed {seed})"));
            let label = judged(answer.map(|_| ())).unwrap_or_else(|broke| {
                panic!("{path}: {broke} for {bytes:?} (seed {seed})");
            });
            *answered.entry(label).or_default() += 1;
        }
    }
    // The two streams: a few mutated messages on one stream, read to its end.
    for (path, to_coordinator, request) in seed_streams(&p1) {
        let channel = if to_coordinator { coordinator.clone() } else { participant.clone() };
        let mut grpc = tonic::client::Grpc::new(channel);
        for _ in 0..cases / 4 {
            let messages: Vec<Vec<u8>> = (0..4).map(|_| mutate(&request, &mut rng)).collect();
            grpc.ready().await.unwrap();
            let path_and_query = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            let outgoing = tonic::Request::new(tokio_stream::iter(messages.clone()));
            let call = grpc.streaming(outgoing, path_and_query, RawCodec);
            let read = async {
                let mut answers = call.await?.into_inner();
                while answers.message().await?.is_some() {}
                Ok(())
            };
            let answer = tokio::time::timeout(Duration::from_secs(10), read).await;
            let answer =
                answer.unwrap_or_else(|_| panic!("{path}: no end in 10 s to {messages:?} (seed {seed})"));
            let label = judged(answer).unwrap_or_else(|broke| {
                panic!("{path}: {broke} for {messages:?} (seed {seed})");
            });
            *answered.entry(format!("stream {label}")).or_default() += 1;
        }
    }
    info!(?answered, "--- every message answered");
    assert!(answered.get("InvalidArgument").copied().unwrap_or(0) > 0, "{answered:?}");
    for node in [NodeId::Coordinator, NodeId::Participant(0), NodeId::Participant(1)] {
        assert!(cluster.is_running(node), "{node:?} stopped:\n{}", cluster.report());
    }
    let values = client.get(&["kept-1".to_owned(), "kept-2".to_owned()]).await.unwrap();
    assert_eq!(values["kept-1"].as_deref(), Some(&b"one"[..]));
    assert_eq!(values["kept-2"].as_deref(), Some(&b"7"[..]));
    let after = client.transact(vec![KvOp::Add { key: "kept-2".into(), delta: 1 }]).await.unwrap();
    assert_eq!(after.outcome, Outcome::Committed, "{}", after.reason);
}

/// The KV store's cache of committed values: values read again are answered
/// from memory, a commit's new value is what the next read sees, and after a
/// restart (the cache empty) reads come from the log again; the figures show
/// in the participant's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_answers_reads_sees_commits_and_shows_in_the_metrics() {
    init();
    let addr = common::metrics_address();
    let mut options = Options::new(1);
    options.participant_args_for = vec![("p1".into(), vec!["--metrics-listen".into(), addr.clone()])];
    let mut cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let keys: Vec<String> = (0..10).map(|i| format!("cached{i}")).collect();
    let puts = keys.iter().map(|key| KvOp::Put { key: key.clone(), value: b"1".to_vec() }).collect();
    assert_eq!(client.transact(puts).await.unwrap().outcome, Outcome::Committed);
    let read = |client: Client, keys: Vec<String>| async move {
        let values = client.get(&keys).await.unwrap();
        keys.iter().map(|k| String::from_utf8(values[k].clone().unwrap()).unwrap()).collect::<Vec<_>>()
    };
    for _ in 0..3 {
        assert_eq!(read(client.clone(), keys.clone()).await, vec!["1"; 10]);
    }
    let add = vec![KvOp::Add { key: keys[0].clone(), delta: 5 }];
    assert_eq!(client.transact(add).await.unwrap().outcome, Outcome::Committed);
    let mut expected = vec!["1"; 10];
    expected[0] = "6";
    assert_eq!(read(client.clone(), keys.clone()).await, expected, "the commit's value, not the cached one");
    // Thirty reads and the Add's validation of values the Puts wrote through.
    let page = poll(Duration::from_secs(10), "the cache's figures", || async {
        let page = scrape(&addr).await;
        eprintln!("{}", page.lines().filter(|l| l.contains("kv_cache")).collect::<Vec<_>>().join(" | "));
        (metric(&page, "decree_kv_cache_hits_total") >= 31.0).then_some(page)
    })
    .await
    .unwrap();
    assert!(metric(&page, "decree_kv_cache_bytes") > 0.0, "{page}");

    info!("--- restarted, p1's cache is empty: the values come from its log");
    cluster.restart(NodeId::Participant(0)).unwrap();
    cluster.wait_back(NodeId::Participant(0)).await.unwrap();
    assert_eq!(read(client.clone(), keys.clone()).await, expected);
    let page = poll(Duration::from_secs(10), "the cache's figures after the restart", || async {
        let page = scrape(&addr).await;
        (metric(&page, "decree_kv_cache_misses_total") >= 10.0).then_some(page)
    })
    .await
    .unwrap();
    assert!(metric(&page, "decree_kv_cache_hits_total") < 31.0, "counted afresh: {page}");
}

/// `--kv-cache-mib`: 64 by default, 0 turns the cache off, more than 1 TiB is
/// refused, exit 2 naming the flag.
#[test]
fn the_kv_cache_size_is_a_flag_with_a_default_and_a_bound() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(decree_tests::decree_binary())
            .args([
                "participant",
                "--data-dir",
                "/tmp/d",
                "--coordinator",
                "http://127.0.0.1:1",
                "--name",
                "p1",
            ])
            .arg("--print-config")
            .args(extra)
            .env_remove("DECREE_KV_CACHE_MIB")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, printed, stderr) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(printed.contains("kv_cache_mib = 64"), "{printed}");
    let (code, printed, _) = run(&["--kv-cache-mib", "0"]);
    assert_eq!(code, Some(0));
    assert!(printed.contains("kv_cache_mib = 0"), "{printed}");
    for bad in ["2000000", "-1", "lots"] {
        let (code, _, stderr) = run(&["--kv-cache-mib", bad]);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--kv-cache-mib"), "{bad}: {stderr}");
    }
}
