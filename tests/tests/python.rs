//! A participant in another language: tests/python/participant.py, a Python
//! service built only on the documented protocol (grpcio, with code generated
//! from proto/decree/v1 when it starts), enrolls with the coordinator and
//! takes part in a committed and an aborted transaction next to the KV
//! participant. The Python environment comes from scripts/ensure-python-grpc.sh
//! (`make test` runs it), or `$DECREE_PYTHON`.
//!
//! It stays the conformance check "written only from the .proto": it uses no
//! SDK. The Python SDK (sdk/python) is proven in tests/tests/python_sdk.rs.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{init, python, KillOnDrop};
use decree_client::{kv_payload, v1, Client, KvOp, Outcome};
use decree_tests::{poll, Cluster, Options};
use tracing::info;

fn state(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn marker(client: &Client, key: &str) -> Option<Vec<u8>> {
    client.get_at("p1", vec![key.into()]).await.unwrap().pop().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_participant_commits_and_aborts_with_the_kv_participant() {
    init();
    let cluster = Cluster::start(Options::new(1)).await.unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let state_file = cluster.dir().join("py-state.json");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(cluster.dir().join("py.log")).unwrap();
    let _py = KillOnDrop(
        Command::new(python())
            .arg(root.join("tests/python/participant.py"))
            .args(["--proto".into(), root.join("proto").display().to_string()])
            .args(["--coordinator", &cluster.coordinator_url(), "--name", "py", "--port", &port.to_string()])
            .args(["--state".into(), state_file.display().to_string()])
            .args(["--gen-dir".into(), cluster.dir().join("py-gen").display().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let url = cluster.coordinator_url();
    let client = poll(Duration::from_secs(60), "the python participant to enroll", || async {
        let client = Client::connect(&url).await.ok()?;
        let listed = client.participants().await.ok()?;
        listed.iter().any(|p| p.name == "py" && p.state == "up").then_some(client)
    })
    .await
    .unwrap_or_else(|e| {
        panic!("{e}: {}", std::fs::read_to_string(cluster.dir().join("py.log")).unwrap_or_default())
    });

    let branches = |marker: &str, kv_extra: Option<KvOp>, py: &str| {
        let mut ops = vec![KvOp::Put { key: marker.into(), value: b"1".to_vec() }];
        ops.extend(kv_extra);
        vec![
            v1::Branch { participant: "p1".into(), payload: kv_payload(ops) },
            v1::Branch { participant: "py".into(), payload: py.as_bytes().to_vec() },
        ]
    };

    info!("--- committed: both sides apply");
    let result = client.transact_branches(branches("m1", None, "set color blue\n")).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    assert_eq!(marker(&client, "m1").await, Some(b"1".to_vec()));
    let committed = poll(Duration::from_secs(10), "the python side to commit", || async {
        let s = state(&state_file);
        (s["values"]["color"] == "blue").then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(committed["decided"][&result.txid], "committed");

    info!("--- the python participant votes NO: the KV side rolls back");
    let result = client.transact_branches(branches("m2", None, "set color red\nfail\n")).await.unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.reason, "participant py voted NO: the python participant was asked to fail");
    assert_eq!(
        result.code,
        decree_client::Reason::Unspecified,
        "a participant that predates reason codes sends none"
    );
    assert_eq!(marker(&client, "m2").await, None);

    info!("--- the KV participant votes NO: the python side is told to abort its prepared branch");
    let expect = KvOp::Expect { key: "never-set".into(), value: Some(b"x".to_vec()) };
    let result = client.transact_branches(branches("m3", Some(expect), "set color green\n")).await.unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    let aborted = poll(Duration::from_secs(10), "the python side to abort", || async {
        let s = state(&state_file);
        (s["decided"][&result.txid] == "aborted").then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(aborted["values"]["color"], "blue", "nothing of the aborted transactions applied");
    assert_eq!(aborted["prepared"], serde_json::json!({}), "nothing left prepared");
    assert_eq!(marker(&client, "m3").await, None);
}
