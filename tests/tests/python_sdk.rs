//! The Python SDK (sdk/python) against the real binaries: its ring routes
//! exactly as the Rust SDK's (10,000 keys, a live ring and a weighted ring in
//! mid-migration), and a service built on its participant framework (the
//! ledger example) is proven the way the Rust participants are: in one
//! transaction with a KV participant it commits and aborts with it, each of
//! its crash points ends all-or-nothing after a restart, and killed with
//! SIGKILL after voting YES while its coordinator is down, it recovers and
//! applies the decision exactly once. The SDK is installed into the venv by
//! scripts/ensure-python-grpc.sh (`make test` runs it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{init, python};
use decree_client::{in_doubt_at_urls, kv_payload, v1, Client, KvOp, Outcome, Ring, Routing};
use decree_tests::{poll, Cluster, NodeId, Options};
use tracing::info;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `python -c <code>` with `input` on stdin; its stdout.
fn run_python(code: &str, input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(python())
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the venv's python (scripts/ensure-python-grpc.sh makes it)");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The Python participant framework checks the same roles per method as
/// the Rust servers: its table (decree.tls.METHODS) names every method of
/// the Participant service in the .proto, each with the roles the Rust
/// policy gives it, so the two cannot drift apart.
#[test]
fn the_python_policy_table_gives_every_participant_method_the_rust_roles() {
    let code = "import json\n\
                from decree.tls import METHODS\n\
                from decree.v1 import participant_pb2\n\
                service = participant_pb2.DESCRIPTOR.services_by_name['Participant']\n\
                paths = ['/decree.v1.Participant/' + m.name for m in service.methods]\n\
                print(json.dumps({p: sorted(METHODS.get(p, [])) for p in paths + sorted(METHODS)}))\n";
    let table: std::collections::BTreeMap<String, Vec<String>> =
        serde_json::from_str(&run_python(code, "")).unwrap();
    assert!(table.len() >= 9, "the Participant service's methods: {table:?}");
    for (path, roles) in &table {
        let rust = decree_tls::policy::needed(path)
            .unwrap_or_else(|| panic!("{path}: not a method the Rust policy knows"));
        let mut rust: Vec<String> = rust.iter().map(|r| r.as_str().to_owned()).collect();
        rust.sort();
        assert_eq!(*roles, rust, "{path}: the Python SDK's roles differ from the Rust servers'");
    }
}

fn keys() -> Vec<String> {
    (0..10_000).map(|i| format!("key-{i}-{}", i * 7919 % 1000)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_route_ten_thousand_keys_identically() {
    init();
    let keys = keys();
    let input = keys.join("\n");

    info!("--- a live ring: the Python client reads it from the coordinator, as the Rust client does");
    let mut options = Options::new(3);
    options.participant_args = vec!["--heartbeat-ms".into(), "200".into()];
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let rust: Vec<String> = keys.iter().map(|k| client.route(k).unwrap()).collect();
    let code = format!(
        "import sys, decree\nc = decree.connect({:?})\nprint('\\n'.join(c.route(k) for k in sys.stdin.read().split('\\n')))",
        cluster.coordinator_url()
    );
    let py: Vec<String> = run_python(&code, &input).lines().map(str::to_owned).collect();
    assert_eq!(py.len(), keys.len());
    let differ = keys.iter().zip(rust.iter().zip(&py)).filter(|(_, (r, p))| r != p).count();
    assert_eq!(differ, 0, "keys routed differently by the two SDKs");
    assert_eq!(rust.iter().collect::<std::collections::BTreeSet<_>>().len(), 3, "every member owns keys");

    info!("--- a weighted ring in mid-migration, built from the same descriptor on both sides");
    let current = Ring::weighted([("a".to_owned(), 1), ("b".to_owned(), 3), ("c".to_owned(), 2)], 2048);
    let target = Ring::weighted([("a".to_owned(), 1), ("b".to_owned(), 3), ("d".to_owned(), 5)], 512);
    let wire = v1::Routing {
        epoch: 7,
        current: Some(current.to_wire()),
        target: Some(target.to_wire()),
        cursor: "key-5".into(),
        cursor_end: false,
    };
    let routing = Routing::from_wire(&wire);
    let rust: Vec<&str> = keys.iter().map(|k| routing.route(k).unwrap()).collect();
    let code = format!(
        "import sys\nfrom decree.ring import Routing\nfrom decree.v1 import common_pb2\n\
         w = common_pb2.Routing.FromString(bytes.fromhex({:?}))\nr = Routing.from_wire(w)\n\
         print('\\n'.join(r.route(k) for k in sys.stdin.read().split('\\n')))",
        hex(&prost::Message::encode_to_vec(&wire))
    );
    let py = run_python(&code, &input);
    let py: Vec<&str> = py.lines().collect();
    let differ = rust.iter().zip(&py).filter(|(r, p)| r != p).count();
    assert_eq!(differ, 0, "keys routed differently in a migration");
    let moved = keys.iter().filter(|k| routing.moving(k).is_some()).count();
    assert!(moved > 1000, "the migration moves keys ({moved}), so both rings were used");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ledger example as a participant program the harness can start, kill
/// and restart with crash points (it takes the participant flags).
/// p1: a KV participant; p2: the ledger on the Python SDK; p3, when
/// `participants` is 3: another KV participant.
async fn ledger_cluster(scripts: &Path, participants: usize) -> Cluster {
    let mut options = common::quick_options();
    options.participants = participants;
    options.participant_program_for = vec![("p2".into(), common::ledger_program(scripts))];
    Cluster::start(options).await.unwrap()
}

const LEDGER: NodeId = NodeId::Participant(1);

/// What the ledger holds (`ledger.py --show`).
#[derive(Debug)]
struct Ledger {
    balances: std::collections::BTreeMap<String, i64>,
    applied: Vec<String>,
    in_doubt: Vec<String>,
}

fn ledger(cluster: &Cluster) -> Ledger {
    let data = cluster.dir().join("p2");
    let out = Command::new(python())
        .arg(root().join("sdk/python/examples/ledger.py"))
        .args(["--show", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "ledger --show: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |field: &str| -> Vec<String> {
        json[field].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect()
    };
    Ledger {
        balances: json["balances"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_i64().unwrap()))
            .collect(),
        applied: strings("applied"),
        in_doubt: strings("in_doubt"),
    }
}

/// Moves `amount` from the KV participant's `balance` to the ledger's
/// `acct`, writing `marker-<tag>` at the KV side; `kv_no` makes the KV side vote NO.
async fn transfer(
    client: &Client,
    tag: &str,
    amount: i64,
    kv_no: bool,
) -> Result<decree_client::TxnResult, String> {
    transfer_with(client, tag, amount, kv_no, &[]).await
}

/// [`transfer`], with a branch at each of `also` (KV participants) writing the marker too.
async fn transfer_with(
    client: &Client,
    tag: &str,
    amount: i64,
    kv_no: bool,
    also: &[&str],
) -> Result<decree_client::TxnResult, String> {
    let mut ops = vec![
        KvOp::Put { key: format!("marker-{tag}"), value: b"1".to_vec() },
        KvOp::Add { key: "balance".into(), delta: -amount },
    ];
    if kv_no {
        ops.push(KvOp::Expect { key: "never-set".into(), value: Some(b"x".to_vec()) });
    }
    let ledger = serde_json::json!({ "changes": { "acct": amount } }).to_string();
    let mut branches = vec![
        v1::Branch { participant: "p1".into(), payload: kv_payload(ops) },
        v1::Branch { participant: "p2".into(), payload: ledger.into_bytes() },
    ];
    branches.extend(also.iter().map(|p| v1::Branch {
        participant: (*p).into(),
        payload: kv_payload(vec![KvOp::Put { key: format!("marker-{tag}"), value: b"1".to_vec() }]),
    }));
    client.transact_branches(branches).await.map_err(|e| e.to_string())
}

async fn kv_value(client: &Client, key: &str) -> Option<Vec<u8>> {
    client.get_at("p1", vec![key.into()]).await.unwrap().pop().flatten()
}

/// Nothing in doubt anywhere; then the marker of `tag` is at the KV side
/// exactly when the ledger applied the transaction, once; money is neither
/// made nor lost; and the ledger's keys are free again.
async fn must_end(cluster: &Cluster, tag: &str, committed: bool) {
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let state = ledger(cluster);
    let marker = kv_value(&client, &format!("marker-{tag}")).await.is_some();
    assert_eq!(marker, committed, "the KV side of {tag}: {state:?}");
    let applied = state.applied.len();
    let acct = state.balances.get("acct").copied().unwrap_or(0);
    assert_eq!(acct, 10 * applied as i64, "each applied transfer counted once: {state:?}");
    let balance: i64 =
        kv_value(&client, "balance").await.map_or(0, |v| String::from_utf8_lossy(&v).parse().unwrap());
    assert_eq!(balance + acct, 0, "money made or lost: {state:?}");
    assert!(state.in_doubt.is_empty(), "{state:?}");
    let free = transfer(&client, &format!("{tag}-after"), 0, false).await.unwrap();
    assert_eq!(free.outcome, Outcome::Committed, "the ledger's key is free again: {}", free.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_sdk_service_commits_and_aborts_with_a_kv_participant() {
    init();
    let scripts = tempfile::tempdir().unwrap();
    let cluster = ledger_cluster(scripts.path(), 2).await;
    let client = cluster.client().await.unwrap();

    info!("--- committed: both sides apply");
    let done = transfer(&client, "t1", 10, false).await.unwrap();
    assert_eq!(done.outcome, Outcome::Committed, "{}", done.reason);
    let state = poll(Duration::from_secs(10), "the ledger to apply", || async {
        let state = ledger(&cluster);
        (state.applied == [done.txid.clone()]).then_some(state)
    })
    .await
    .unwrap();
    assert_eq!(state.balances.get("acct"), Some(&10));
    assert_eq!(kv_value(&client, "marker-t1").await, Some(b"1".to_vec()));

    info!("--- the ledger votes NO: the KV side rolls back");
    let refused = transfer(&client, "t2", -50, false).await.unwrap();
    assert_eq!(refused.outcome, Outcome::Aborted);
    assert_eq!(refused.reason, "participant p2 voted NO: insufficient funds in acct");
    assert_eq!(refused.code, decree_client::Reason::ValidationFailed);
    assert_eq!(kv_value(&client, "marker-t2").await, None);

    info!("--- the KV side votes NO: the ledger's prepared branch is aborted");
    let aborted = transfer(&client, "t3", 10, true).await.unwrap();
    assert_eq!(aborted.outcome, Outcome::Aborted);
    must_end(&cluster, "t3", false).await;
    let applied = ledger(&cluster).applied;
    assert_eq!(applied.len(), 2, "t1 and the check's own transfer: {applied:?}");
    assert!(applied.contains(&done.txid) && !applied.contains(&aborted.txid));
    assert_eq!(client.status(&done.txid).await.unwrap(), Outcome::Committed);
}

/// Arms `point` on the ledger, runs a transfer, sees the ledger die there,
/// restarts it, and checks the end.
async fn ledger_crash(point: &str, committed: bool) {
    init();
    let scripts = tempfile::tempdir().unwrap();
    let mut cluster = ledger_cluster(scripts.path(), 2).await;
    info!("--- arm {point} on the ledger");
    cluster.restart_armed(LEDGER, point).await.unwrap();
    let client = cluster.client().await.unwrap();
    let answer = transfer(&client, "t1", 10, false).await;
    info!(?answer, "the client's answer");
    let status = cluster.wait_exit(LEDGER, Duration::from_secs(20)).await.unwrap();
    assert!(!status.success(), "the ledger should have died at {point}");
    assert!(cluster.log_of(LEDGER).contains(&format!("crash point {point} reached")), "it died elsewhere");
    if let Ok(result) = &answer {
        assert_eq!(result.outcome == Outcome::Committed, committed, "the client was told {result:?}");
    }
    info!("--- restart the ledger on the same directory");
    cluster.restart(LEDGER).unwrap();
    cluster.wait_back(LEDGER).await.unwrap();
    must_end(&cluster, "t1", committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_crash_before_the_prepared_record_aborts() {
    ledger_crash("participant.prepare.before_log", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_crash_after_the_prepared_record_before_the_vote_aborts() {
    ledger_crash("participant.prepare.after_log", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_crash_before_applying_a_commit_commits_once_after_restart() {
    ledger_crash("participant.commit.before_apply", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_crash_after_applying_a_commit_commits_once() {
    ledger_crash("participant.commit.after_apply", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_crash_before_applying_an_abort_aborts() {
    init();
    let scripts = tempfile::tempdir().unwrap();
    let mut cluster = ledger_cluster(scripts.path(), 3).await;
    cluster.restart_armed(LEDGER, "participant.abort.before_apply").await.unwrap();
    info!("--- p3 stopped (SIGSTOP): its Prepare goes unanswered, so the prepare deadline aborts, long after the ledger voted YES");
    let p3 = NodeId::Participant(2);
    let pid = cluster.pid(p3).unwrap() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let client = cluster.client().await.unwrap();
    let answer = transfer_with(&client, "t1", 10, false, &["p3"]).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let answer = answer.unwrap();
    assert_eq!(answer.outcome, Outcome::Aborted, "{}", answer.reason);
    assert!(!cluster.wait_exit(LEDGER, Duration::from_secs(20)).await.unwrap().success());
    assert!(cluster.log_of(LEDGER).contains("crash point participant.abort.before_apply reached"));
    assert_eq!(ledger(&cluster).in_doubt.len(), 1, "still prepared: the abort was not applied");
    cluster.restart(LEDGER).unwrap();
    cluster.wait_back(LEDGER).await.unwrap();
    must_end(&cluster, "t1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_crash_in_recovery_before_asking_still_ends_right() {
    init();
    let scripts = tempfile::tempdir().unwrap();
    let mut cluster = ledger_cluster(scripts.path(), 2).await;
    info!("--- the ledger dies prepared (its YES never sent), then again in recovery");
    cluster.restart_armed(LEDGER, "participant.prepare.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    let _ = transfer(&client, "t1", 10, false).await;
    assert!(!cluster.wait_exit(LEDGER, Duration::from_secs(20)).await.unwrap().success());
    assert_eq!(ledger(&cluster).in_doubt.len(), 1, "the prepared record is durable");
    cluster.restart_with(LEDGER, Some("participant.recovery.before_resolve")).unwrap();
    assert!(!cluster.wait_exit(LEDGER, Duration::from_secs(20)).await.unwrap().success());
    assert!(cluster.log_of(LEDGER).contains("crash point participant.recovery.before_resolve reached"));
    cluster.restart(LEDGER).unwrap();
    cluster.wait_back(LEDGER).await.unwrap();
    must_end(&cluster, "t1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_sdk_service_killed_after_voting_yes_applies_the_commit_exactly_once() {
    init();
    let scripts = tempfile::tempdir().unwrap();
    let mut cluster = ledger_cluster(scripts.path(), 2).await;
    info!("--- the coordinator dies with the decision durable, before any Commit leaves");
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    let _ = transfer(&client, "t1", 10, false).await;
    assert!(!cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(20)).await.unwrap().success());

    info!("--- the ledger voted YES: SIGKILL it, restart it while the coordinator is still down");
    let state = ledger(&cluster);
    assert_eq!(state.in_doubt.len(), 1, "{state:?}");
    cluster.kill(LEDGER);
    cluster.restart(LEDGER).unwrap();
    let url = cluster.url_of(LEDGER);
    let branches = poll(Duration::from_secs(20), "the ledger to serve, in doubt", || async {
        let (branches, unreachable) = in_doubt_at_urls(std::slice::from_ref(&url)).await.ok()?;
        unreachable.is_empty().then_some(branches)
    })
    .await
    .unwrap();
    assert_eq!(branches.len(), 1, "still in doubt: it never decides alone");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(ledger(&cluster).applied.is_empty(), "nothing applied without the coordinator");

    info!("--- the coordinator comes back: the commit is redriven and applied once");
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    must_end(&cluster, "t1", true).await;
    assert_eq!(ledger(&cluster).applied.len(), 2, "t1 and the check's own transfer, each once");
}
