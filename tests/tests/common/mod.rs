//! Helpers shared by the integration tests: run the `decree` CLI, narrate steps.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};

pub mod standin;
pub mod webdriver;

use decree_tests::decree_binary;

/// Three named KV services (the same keys go to several participants by
/// name) and quick deadlines and redelivery, which keep each case short.
pub fn quick_options() -> decree_tests::Options {
    let mut options = decree_tests::Options::new(3);
    options.services = true;
    options.coordinator_args =
        ["--prepare-timeout-ms", "1500", "--commit-timeout-ms", "500", "--redelivery-cap-ms", "300"]
            .map(String::from)
            .to_vec();
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--heartbeat-ms", "200"].map(String::from).to_vec();
    options
}

/// Installs a test log subscriber once (RUST_LOG, default info).
pub fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// What one `decree` command printed, and its exit code.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
}

/// Runs `decree <args>` and waits for it.
pub fn decree(args: &[&str]) -> Run {
    let output = Command::new(decree_binary()).args(args).output().expect("decree runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `decree resolve TXID --abort` as operator "alice" ("coordinator host
/// lost"), asking `coordinator` first and deciding at every participant.
pub fn abort_by_hand(txid: &str, coordinator: &str, participants: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "resolve",
        txid,
        "--abort",
        "--reason",
        "coordinator host lost",
        "--operator",
        "alice",
        "--coordinator",
        coordinator,
    ]
    .map(String::from)
    .to_vec();
    for url in participants {
        args.extend(["--participant".to_owned(), url.clone()]);
    }
    args
}

/// Runs `decree` off the async threads.
pub async fn decree_async(args: Vec<String>) -> Run {
    tokio::task::spawn_blocking(move || decree(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
}

/// The sum of the values of `name` (every label set) on a Prometheus page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A local address nothing listens on now, for a node's `--metrics-listen`.
pub fn metrics_address() -> String {
    let lease = decree_tests::free_port().unwrap();
    let address = format!("127.0.0.1:{lease}");
    // Held until this test binary exits (a handful per binary): no other cluster is handed it.
    std::mem::forget(lease);
    address
}

/// The Prometheus page served at `addr`.
pub async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).await.unwrap();
    page
}

/// Serves `routes` (stand-ins for a participant, a coordinator, a collector)
/// on an ephemeral port in this process; returns its URL.
pub async fn serve_in_test(routes: tonic::service::Routes) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    url
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python of the tests' virtualenv: `$DECREE_PYTHON`, else
/// `$DECREE_VENV/bin/python` (default ~/.cache/decree/venv), which
/// scripts/ensure-python-grpc.sh makes (`make test` runs it).
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("DECREE_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = std::env::var_os("DECREE_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/decree/venv")
    });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/ensure-python-grpc.sh (make test does)",
        python.display()
    );
    python
}

/// A script that runs the Python SDK's ledger example (sdk/python/examples)
/// with the venv's Python, written into `dir`: a participant program.
pub fn ledger_program(dir: &std::path::Path) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let script = dir.join("ledger.sh");
    let body = format!(
        "#!/bin/sh\nexec {} {} \"$@\"\n",
        python().display(),
        root.join("sdk/python/examples/ledger.py").display()
    );
    std::fs::write(&script, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}
