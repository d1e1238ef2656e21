//! Mutual TLS and roles between real processes: every node of these clusters
//! speaks TLS with a certificate of its own from one development CA, and
//! checks every RPC against the role policy beside it. This process speaks
//! as `harness` (client, operator, observer); the `decree` commands a test
//! runs speak as whichever identity the test gives them.
//!
//! The process has one identity, so every test here shares one PKI
//! ([`decree_tests::shared_pki`]) and this binary starts no plaintext cluster.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{init, metric, scrape, Run};
use decree_client::{Client, KvOp, Outcome};
use decree_tests::{decree_binary, poll, shared_pki, Cluster, Options};
use decree_tls::certs;

/// A TLS cluster of `participants` KV members.
fn options(participants: usize) -> Options {
    let mut options = Options::new(participants);
    options.tls = Some(shared_pki());
    options
}

/// Runs `decree <args>` speaking as `identity` (its certificate and key from
/// `pki`, the CA of the shared PKI).
async fn decree_as(pki: &Path, identity: &str, args: &[&str]) -> Run {
    let files = certs::files(pki, identity);
    let ca = certs::ca_path(&shared_pki());
    let mut command = std::process::Command::new(decree_binary());
    command
        .args(args)
        .env_remove("DECREE_POLICY")
        .env("DECREE_TLS_CERT", &files.cert)
        .env("DECREE_TLS_KEY", &files.key)
        .env("DECREE_TLS_CA", ca);
    let output = tokio::task::spawn_blocking(move || command.output().expect("decree runs")).await.unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn log_of(cluster: &Cluster, node: &str) -> String {
    std::fs::read_to_string(cluster.dir().join(format!("{node}.log"))).unwrap_or_default()
}

async fn value(client: &Client, key: &str) -> Option<String> {
    let values = client.get(&[key.to_owned()]).await.unwrap();
    values.get(key).cloned().flatten().map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn put(key: &str, value: &str) -> KvOp {
    KvOp::Put { key: key.into(), value: value.as_bytes().to_vec() }
}

/// Over TLS a cluster commits as it does in plaintext; each identity reaches
/// the methods its role allows and is refused the others with
/// PERMISSION_DENIED naming the role it lacks, counted, logged with the
/// identity, and changing nothing; a peer without a certificate, or with one
/// from another CA, does not get past the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_its_methods_and_no_others() {
    init();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut options = options(2);
    options.coordinator_args = vec!["--metrics-listen".into(), metrics.clone()];
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let url = cluster.coordinator_url();
    assert!(url.starts_with("https://"), "{url}");
    let pki = shared_pki();

    // This process (client role among others) commits and reads.
    let result = client.transact(vec![put("k-a", "1"), put("k-b", "1")]).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    assert_eq!(value(&client, "k-a").await.as_deref(), Some("1"));

    // The client role: transactions and reads, nothing an operator does.
    let run = decree_as(&pki, "client", &["txn", "--coordinator", &url, "--put", "k-a=2"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = decree_as(&pki, "client", &["get", "k-a", "--coordinator", &url]).await;
    assert_eq!((run.code, run.stdout.trim()), (0, "k-a=2"), "{}", run.stderr);
    let run = decree_as(&pki, "client", &["ring", "remove", "p2", "--coordinator", &url]).await;
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("client (roles: client)") && run.stderr.contains("needs the operator role"),
        "{}",
        run.stderr
    );

    // The observer lists; it may not write.
    let run = decree_as(&pki, "observer", &["participants", "--coordinator", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("p1") && run.stdout.contains("p2"), "{}", run.stdout);
    let run = decree_as(&pki, "observer", &["txn", "--coordinator", &url, "--put", "k-a=3"]).await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stderr.contains("observer") && run.stderr.contains("needs the client role"),
        "{}",
        run.stderr
    );

    // A participant's certificate is not a client's, nor an operator's.
    let run = decree_as(&pki, "p1", &["txn", "--coordinator", &url, "--put", "k-a=4"]).await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(run.stderr.contains("p1 (roles: participant)"), "{}", run.stderr);
    let p1 = cluster.url_of(decree_tests::NodeId::Participant(0));
    let resolve = ["resolve", "--participant", &p1, "--commit", "--reason", "test", "00000001-1-1"];
    let run = decree_as(&pki, "p1", &resolve).await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(run.stderr.contains("needs the operator role"), "{}", run.stderr);

    // The operator reaches the operator's methods (the ring, through the coordinator).
    let run = decree_as(&pki, "operator", &["ring", "--coordinator", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = decree_as(&pki, "operator", &["stuck", "--coordinator", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    // Refused calls changed nothing, and were counted and logged with the identity.
    assert_eq!(value(&client, "k-a").await.as_deref(), Some("2"));
    assert_eq!(client.ring_status().await.unwrap().members.len(), 2);
    let page = scrape(&metrics).await;
    assert!(metric(&page, decree_tls::policy::DENIED) >= 3.0, "{page}");
    let log = log_of(&cluster, "coordinator");
    assert!(log.contains("refused: observer") && log.contains("identity=\"observer\""), "{log}");

    // No certificate: the handshake fails, nothing is asked.
    let plain = tonic::transport::Endpoint::from_shared(url.replacen("https://", "http://", 1)).unwrap();
    let asked = async {
        let channel = plain.connect().await.map_err(|e| e.to_string())?;
        let mut registry = decree_client::v1::registry_client::RegistryClient::new(channel);
        registry
            .list_participants(decree_client::v1::ListParticipantsRequest {})
            .await
            .map_err(|e| e.to_string())
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), asked).await.map_or(true, |r| r.is_err()));
    // A certificate from another CA, for a name the policy knows: refused at the handshake too.
    let stranger = tempfile::tempdir().unwrap();
    certs::make(stranger.path(), &[certs::Identity::parse("client").unwrap()]).unwrap();
    let run = decree_as(stranger.path(), "client", &["txn", "--coordinator", &url, "--put", "k-a=5"]).await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert_eq!(value(&client, "k-a").await.as_deref(), Some("2"));
    let refused = metric(&scrape(&metrics).await, decree_tls::HANDSHAKES_REFUSED);
    assert!(refused >= 2.0, "handshakes refused: {refused}");
    assert!(log_of(&cluster, "coordinator").contains("TLS handshake refused"));
}

/// A certificate its CA revoked is refused at the handshake by a process
/// given the CA's revocation list (`--tls-crl`), and the list, changed while
/// the process runs, is taken up without a restart: the revoked client
/// cannot commit and changes nothing while the others go on; revoking the
/// operator's certificate then shuts it out too. Counted and logged as
/// refused handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_and_a_new_revocation_is_taken_up_while_running() {
    init();
    // The shared CA's list, kept in this test's own directory.
    let pki = shared_pki();
    let own = tempfile::tempdir().unwrap();
    for file in ["ca.crt", "ca.key", "client.crt", "operator.crt"] {
        std::fs::copy(pki.join(file), own.path().join(file)).unwrap();
    }
    certs::revoke(own.path(), &["client".to_owned()], 30).unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut options = options(1);
    options.coordinator_args = vec![
        "--tls-crl".into(),
        certs::crl_path(own.path()).display().to_string(),
        "--metrics-listen".into(),
        metrics.clone(),
    ];
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let url = cluster.coordinator_url();
    let result = client.transact(vec![put("r-a", "1")]).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);

    let run = decree_as(&pki, "client", &["txn", "--coordinator", &url, "--put", "r-a=2"]).await;
    assert_ne!(run.code, 0, "a revoked client committed: {}", run.stdout);
    assert_eq!(value(&client, "r-a").await.as_deref(), Some("1"));
    let run = decree_as(&pki, "operator", &["participants", "--coordinator", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(log_of(&cluster, "coordinator").contains("1 certificate(s) revoked"));

    certs::revoke(own.path(), &["operator".to_owned()], 30).unwrap();
    poll(Duration::from_secs(15), "the operator's certificate refused once revoked", || async {
        let run = decree_as(&pki, "operator", &["participants", "--coordinator", &url]).await;
        (run.code != 0).then_some(())
    })
    .await
    .unwrap();
    assert!(log_of(&cluster, "coordinator").contains("2 certificate(s) revoked"));
    // The cluster's own traffic goes on.
    let result = client.transact(vec![put("r-a", "3")]).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    let refused = metric(&scrape(&metrics).await, decree_tls::HANDSHAKES_REFUSED);
    assert!(refused >= 2.0, "handshakes refused: {refused}");
    let log = log_of(&cluster, "coordinator");
    assert!(log.contains("TLS handshake refused") && log.to_lowercase().contains("revoked"), "{log}");
}

/// A participant enrolls under the name its certificate gives, and no other:
/// p3's certificate claiming p2 is refused with PERMISSION_DENIED and the
/// process exits 2, leaving the registry as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_enrolls_under_its_own_name_only() {
    init();
    let cluster = Cluster::start(options(1)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let pki = shared_pki();
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let files = certs::files(&pki, "p3");
    let mut impostor = std::process::Command::new(decree_binary());
    impostor
        .args(["participant", "--name", "p2", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data.path().join("p2"))
        .args(["--coordinator", &cluster.coordinator_url()])
        .env("DECREE_TLS_CERT", &files.cert)
        .env("DECREE_TLS_KEY", &files.key)
        .env("DECREE_TLS_CA", &files.ca)
        .env("DECREE_POLICY", certs::policy_path(&pki))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(data.path().join("impostor.log")).unwrap());
    let mut impostor = impostor.spawn().unwrap();
    let exited = poll(Duration::from_secs(30), "the impostor to exit", || {
        let status = impostor.try_wait().unwrap();
        async move { status }
    })
    .await;
    if exited.is_err() {
        let _ = impostor.kill();
    }
    let stderr = std::fs::read_to_string(data.path().join("impostor.log")).unwrap();
    assert_eq!(exited.ok().and_then(|status| status.code()), Some(2), "{stderr}");
    assert!(stderr.contains("p3 may not act as participant \"p2\""), "{stderr}");
    let names: Vec<String> = client.participants().await.unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, vec!["p1".to_owned()]);
}

/// Copies `identity`'s certificate and key into `dir` (for a node whose
/// files a test replaces), and the shared policy.
fn own_copy(dir: &Path, identity: &str) -> (PathBuf, PathBuf, PathBuf) {
    let shared = certs::files(&shared_pki(), identity);
    let (cert, key, policy) = (dir.join("node.crt"), dir.join("node.key"), dir.join("policy.toml"));
    std::fs::copy(&shared.cert, &cert).unwrap();
    std::fs::copy(&shared.key, &key).unwrap();
    std::fs::copy(certs::policy_path(&shared_pki()), &policy).unwrap();
    (cert, key, policy)
}

/// Replaces `path` whole (a rename: a watcher never reads it half written).
fn replace(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// The coordinator's certificate is replaced by a new one (another key, a
/// shorter validity) and its policy rewritten while transfers run: both are
/// reloaded without a single transfer failing; new connections get the new
/// certificate; a policy change takes effect at once; a broken file is
/// refused and the material in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_policy_reload_without_dropping_a_transaction() {
    init();
    let own = tempfile::tempdir().unwrap();
    let (cert, key, policy) = own_copy(own.path(), "coordinator");
    let mut options = options(2);
    for (variable, path) in [("DECREE_TLS_CERT", &cert), ("DECREE_TLS_KEY", &key), ("DECREE_POLICY", &policy)]
    {
        options.env_for.push(("coordinator".into(), variable.into(), path.display().to_string()));
    }
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let url = cluster.coordinator_url();
    let pki = shared_pki();

    // Transfers all along: every one must end committed or aborted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut committed, mut failed) = (0u64, Vec::new());
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let ops = vec![
                    KvOp::Add { key: format!("acct-{}", i % 7), delta: -1 },
                    KvOp::Add { key: format!("acct-{}", (i + 3) % 7), delta: 1 },
                ];
                match client.transact(ops).await {
                    Ok(result) if result.outcome == Outcome::Committed => committed += 1,
                    Ok(result) if result.outcome == Outcome::Aborted => {}
                    other => failed.push(format!("{other:?}")),
                }
            }
            (committed, failed)
        })
    };

    let started = log_of(&cluster, "coordinator");
    let validity = |line: &str| {
        let after = line.split_once("valid until ")?.1;
        Some(after.split_once("+00:00")?.0.to_owned())
    };
    let refusals = |log: &str| log.matches("tls not reloaded").count();
    let first = started.lines().find(|l| l.contains("speaks mutual TLS as identity coordinator")).unwrap();
    let first_validity = validity(first).unwrap();

    // A new certificate from the same CA: another key, valid one day.
    let issued = tempfile::tempdir().unwrap();
    std::fs::copy(certs::ca_path(&pki), certs::ca_path(issued.path())).unwrap();
    std::fs::copy(pki.join("ca.key"), issued.path().join("ca.key")).unwrap();
    certs::make_valid_for(issued.path(), &[certs::Identity::parse("coordinator").unwrap()], 1).unwrap();
    let new = certs::files(issued.path(), "coordinator");
    replace(&key, &std::fs::read(&new.key).unwrap());
    replace(&cert, &std::fs::read(&new.cert).unwrap());
    let reloaded = poll(Duration::from_secs(15), "the new certificate in use", || async {
        let log = log_of(&cluster, "coordinator");
        let line = log.lines().rev().find(|l| l.contains("tls reloaded"))?.to_owned();
        (validity(&line)? != first_validity).then_some(line)
    })
    .await
    .unwrap();
    assert!(reloaded.contains("identity coordinator"), "{reloaded}");
    // A new connection verifies the new certificate.
    let run = decree_as(&pki, "client", &["txn", "--coordinator", &url, "--put", "after-reload=1"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    // SIGHUP reloads too (the certificate and the policy).
    let pid = cluster.pid(decree_tests::NodeId::Coordinator).unwrap();
    // SAFETY: kill has no memory-safety preconditions; the pid is the cluster's child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    poll(Duration::from_secs(15), "a reload on SIGHUP", || async {
        let log = log_of(&cluster, "coordinator");
        (log.contains("tls reloaded (SIGHUP)") && log.contains("policy reloaded (SIGHUP)")).then_some(())
    })
    .await
    .unwrap();

    // A broken certificate is refused; the one in use stays, and new connections still succeed.
    let refused_before = refusals(&log_of(&cluster, "coordinator"));
    replace(&cert, b"not a certificate");
    poll(Duration::from_secs(15), "the broken certificate refused", || async {
        (refusals(&log_of(&cluster, "coordinator")) > refused_before).then_some(())
    })
    .await
    .unwrap();
    let run = decree_as(&pki, "client", &["txn", "--coordinator", &url, "--put", "after-broken=1"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    // The policy: the observer loses its role, then gets it back.
    let run = decree_as(&pki, "observer", &["stuck", "--coordinator", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = std::fs::read_to_string(&policy).unwrap();
    replace(&policy, text.replace("observer = [\"observer\"]", "observer = []").as_bytes());
    poll(Duration::from_secs(15), "the observer refused", || async {
        let run = decree_as(&pki, "observer", &["stuck", "--coordinator", &url]).await;
        (run.code != 0 && run.stderr.contains("observer (no role)")).then_some(())
    })
    .await
    .unwrap();
    replace(&policy, text.as_bytes());
    poll(Duration::from_secs(15), "the observer allowed again", || async {
        (decree_as(&pki, "observer", &["stuck", "--coordinator", &url]).await.code == 0).then_some(())
    })
    .await
    .unwrap();

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (committed, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "transfers that failed across the reloads: {failed:?}");
    assert!(committed > 20, "only {committed} transfers committed");
    let keys: Vec<String> = (0..7).map(|i| format!("acct-{i}")).collect();
    let balances = client.get(&keys).await.unwrap();
    let sum: i64 =
        balances.values().flatten().map(|v| String::from_utf8_lossy(v).parse::<i64>().unwrap()).sum();
    assert_eq!(sum, 0, "{balances:?}");
}

/// An operator's certificate can decide a branch in doubt by hand while its
/// coordinator is gone; a participant's or a client's cannot, and their
/// refusals leave the branch in doubt. The decision is recorded under the
/// operator certificate's identity, whatever name the command declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_a_branch_in_doubt_and_no_other_role_can() {
    init();
    let mut options = options(2);
    options.services = true;
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--heartbeat-ms", "200"].map(String::from).to_vec();
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let url = cluster.coordinator_url();
    let urls: Vec<String> = (0..2).map(|i| cluster.url_of(decree_tests::NodeId::Participant(i))).collect();
    cluster
        .restart_armed(decree_tests::NodeId::Coordinator, "coordinator.decision.before_log")
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    assert!(client
        .transact_branches(decree_tests::check::marked_transfer("t1", &names, 0, 5))
        .await
        .is_err());
    cluster.wait_exit(decree_tests::NodeId::Coordinator, Duration::from_secs(20)).await.unwrap();
    let (in_doubt, _) = decree_client::in_doubt_at_urls(&urls).await.unwrap();
    assert_eq!(in_doubt.len(), 2, "{in_doubt:?}");
    let txid = in_doubt[0].txid.clone();

    let resolve = common::abort_by_hand(&txid, &url, &urls);
    let resolve: Vec<&str> = resolve.iter().map(String::as_str).collect();
    let pki = shared_pki();
    for who in ["p1", "client", "observer"] {
        let run = decree_as(&pki, who, &resolve).await;
        assert_eq!(run.code, 2, "{who}: {}", run.stdout);
        assert!(run.stderr.contains("needs the operator role"), "{who}: {}", run.stderr);
        let (still, _) = decree_client::in_doubt_at_urls(&urls).await.unwrap();
        assert_eq!(still.len(), 2, "{who}'s refused resolve changed something: {still:?}");
    }
    let run = decree_as(&pki, "operator", &resolve).await;
    assert_eq!(run.code, 0, "{} {}", run.stdout, run.stderr);
    let (left, _) = decree_client::in_doubt_at_urls(&urls).await.unwrap();
    assert!(left.is_empty(), "decided by hand: {left:?}");
    let (heuristics, _) = decree_client::heuristics_at_urls(&urls).await.unwrap();
    let recorded: Vec<&str> =
        heuristics.iter().flat_map(|h| &h.heuristics).map(|h| h.operator.as_str()).collect();
    assert_eq!(recorded, vec!["operator (declared \"alice\")"; 2]);

    // The coordinator returns: it never logged a decision, so presumed abort agrees.
    cluster.restart(decree_tests::NodeId::Coordinator).unwrap();
    cluster.wait_back(decree_tests::NodeId::Coordinator).await.unwrap();
    let client = cluster.client().await.unwrap();
    assert_eq!(client.status(&txid).await.unwrap(), Outcome::Aborted);
    assert_eq!(decree_tests::check::markers(&client, "t1", &names).await.unwrap(), 0);
}

/// A coordinator group over mutual TLS: its replicas reach each other as
/// the coordinator identity (Raft's messages checked against the policy
/// like any RPC), elect a leader and replicate; clients and participants
/// follow it; the group's view is an operator's and an observer's, not a
/// client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_group_replicates_over_mutual_tls() {
    init();
    let mut options = options(2);
    options.coordinators = 3;
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let result = client.transact(vec![put("g-a", "1"), put("g-b", "1")]).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    let url = cluster.coordinator_url();
    let pki = shared_pki();
    let run = decree_as(&pki, "operator", &["coordinators", "--coordinator", &url, "--json"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let group = run.json();
    assert_eq!(group["members"].as_array().map(Vec::len), Some(3), "{group}");
    assert!(group["leader_url"].as_str().is_some_and(|u| u.starts_with("https://")), "{group}");
    let run = decree_as(&pki, "client", &["coordinators", "--coordinator", &url]).await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(run.stderr.contains("needs one of the roles operator, observer"), "{}", run.stderr);
}

/// `decree console` speaking as `identity`, and its port; killed when dropped.
struct ConsoleAs {
    _process: common::KillOnDrop,
    port: u16,
}

fn console_as(pki: &Path, identity: &str, url: &str, log: &Path) -> ConsoleAs {
    let files = certs::files(pki, identity);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(log).unwrap();
    let child = std::process::Command::new(decree_binary())
        .args(["console", "--coordinator", url, "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("DECREE_POLICY")
        .env("DECREE_TLS_CERT", &files.cert)
        .env("DECREE_TLS_KEY", &files.key)
        .env("DECREE_TLS_CA", certs::ca_path(&shared_pki()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    ConsoleAs { _process: common::KillOnDrop(child), port }
}

/// The console acts as the identity it runs under: an observer's sees every
/// page and is refused an operator's action (the refusal names the role); an
/// operator's acts. The coordinator's own console is refused under TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_is_its_identity_an_observer_sees_and_an_operator_acts() {
    use common::webdriver::http;
    init();
    let cluster = Cluster::start(options(1)).await.unwrap();
    let url = cluster.coordinator_url();
    let pki = shared_pki();
    let client = cluster.client().await.unwrap();
    let done = client.transact(vec![put("k-console", "1")]).await.unwrap();
    assert_eq!(done.outcome, Outcome::Committed);
    let observer = console_as(&pki, "observer", &url, &cluster.dir().join("console-observer.log"));
    let operator = console_as(&pki, "operator", &url, &cluster.dir().join("console-operator.log"));

    let page = poll(Duration::from_secs(20), "the observer's console", || async {
        let (status, page) = http(observer.port, "GET", "/api/cluster", None).await.ok()?;
        (status == 200).then_some(page)
    })
    .await
    .unwrap();
    assert_eq!(page["participants"][0]["name"], "p1", "{page}");
    let (status, found) =
        http(observer.port, "GET", &format!("/api/transactions?txid={}", done.txid), None).await.unwrap();
    assert_eq!((status, found["outcome"].as_str()), (200, Some("committed")), "{found}");

    let retry = serde_json::json!({ "txid": done.txid });
    let (status, refused) = http(observer.port, "POST", "/api/retry", Some(retry.clone())).await.unwrap();
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["code"], "PermissionDenied", "the refusal's gRPC code, as data");
    let why = refused["error"].as_str().unwrap();
    assert!(why.contains("permission denied") && why.contains("needs the operator role"), "{why}");

    let answered = poll(Duration::from_secs(20), "the operator's console", || async {
        let (status, answer) = http(operator.port, "POST", "/api/retry", Some(retry.clone())).await.ok()?;
        (status == 200).then_some(answer)
    })
    .await
    .unwrap();
    assert_eq!(answered["outcome"], "committed", "{answered}");

    let files = certs::files(&pki, "coordinator");
    let data = tempfile::tempdir().unwrap();
    let run = decree_as(
        &pki,
        "coordinator",
        &[
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.path().display().to_string(),
            "--console-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &files.cert.display().to_string(),
            "--tls-key",
            &files.key.display().to_string(),
            "--tls-ca",
            &certs::ca_path(&pki).display().to_string(),
        ],
    )
    .await;
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(run.stderr.contains("--console-listen is for plaintext clusters"), "{}", run.stderr);
}

/// The Python SDK under mutual TLS and the policy: its participant framework
/// (the ledger example, as p2, with the certificate and policy the harness
/// gives every node) serves only the CA's peers and each method only to the
/// roles the policy names; in one transaction with a KV participant it
/// commits; and a Python client speaks https as the harness's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_sdk_participant_and_client_speak_mutual_tls_under_the_policy() {
    use decree_client::{kv_payload, v1};
    init();
    let scripts = tempfile::tempdir().unwrap();
    let ledger = common::ledger_program(scripts.path());
    let mut options = options(2);
    options.participant_program_for = vec![("p2".into(), ledger)];
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();

    let ops = vec![
        KvOp::Put { key: "marker-tls".into(), value: b"1".to_vec() },
        KvOp::Add { key: "balance".into(), delta: -10 },
    ];
    let branches = vec![
        v1::Branch { participant: "p1".into(), payload: kv_payload(ops) },
        v1::Branch { participant: "p2".into(), payload: br#"{"changes": {"acct": 10}}"#.to_vec() },
    ];
    let done = client.transact_branches(branches).await.unwrap();
    assert_eq!(done.outcome, Outcome::Committed, "{}", done.reason);
    // Phase two reaches the ledger after the client hears the outcome: until
    // then its branch is (rightly) in doubt there.
    cluster.wait_settled(Duration::from_secs(10)).await.unwrap();

    // The harness is client, operator and observer, not coordinator: the
    // ledger refuses it Prepare, before its handler runs, and lists its
    // in-doubt branches for it.
    let url = cluster.url_of(decree_tests::NodeId::Participant(1));
    assert!(url.starts_with("https://"), "{url}");
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone()).unwrap();
    let channel = decree_tls::connect(endpoint).await.unwrap();
    let mut ledger = v1::participant_client::ParticipantClient::new(channel);
    let refused = ledger.prepare(v1::PrepareRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("may not call /decree.v1.Participant/Prepare: it needs the coordinator role"),
        "{}",
        refused.message()
    );
    let listed = ledger.list_in_doubt(v1::ListInDoubtRequest::default()).await.unwrap().into_inner();
    assert!(listed.branches.is_empty(), "{listed:?}");

    // A Python client over https, as the harness's identity.
    let files = certs::files(&shared_pki(), "harness");
    let code = "import decree, sys\n\
                with decree.connect(sys.argv[1]) as c:\n\
                \x20   r = c.transact(put={'py-tls': 'yes'})\n\
                \x20   assert r.committed, r.reason\n\
                \x20   print(c.get('py-tls').decode(), c.status(sys.argv[2]).value)\n";
    let out = std::process::Command::new(common::python())
        .args(["-c", code, &cluster.coordinator_url(), &done.txid])
        .env("DECREE_TLS_CERT", &files.cert)
        .env("DECREE_TLS_KEY", &files.key)
        .env("DECREE_TLS_CA", &files.ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes committed");
    // And without an identity it cannot connect to an https URL.
    let out = std::process::Command::new(common::python())
        .args(["-c", "import decree, sys\ndecree.connect(sys.argv[1])", &cluster.coordinator_url()])
        .env_remove("DECREE_TLS_CERT")
        .env_remove("DECREE_TLS_KEY")
        .env_remove("DECREE_TLS_CA")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is https: give tls="), "{out:?}");
}
