//! A full disk is a state, not a crash: below its reserve a server refuses new
//! work with a message saying so, what was admitted finishes (a committed
//! decision in doubt is delivered, pruning goes on), and when space returns
//! work resumes without a restart.
//!
//! The disk is a tmpfs with a size limit, which takes root to mount; CI runs
//! as root. Run as another user, the test says it cannot and passes nothing off
//! as checked.
//!
//! And the disk failing: an fsync that fails (an `LD_PRELOAD` shim, built
//! here with the C compiler) stops the process, never retried and trusted;
//! a corrupted write-ahead log refuses to start, naming it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{init, metric, scrape};
use decree_client::{v1, ClientError, Outcome};
use decree_tests::{check, Cluster, NodeId, Options};
use tracing::info;

const SETTLE: Duration = Duration::from_secs(30);
const DISK_MIB: u64 = 320;
const RESERVE_MIB: u64 = 48;

/// A tmpfs of `DISK_MIB` MiB mounted for the test, unmounted when dropped.
struct SmallDisk {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SmallDisk {
    fn mount() -> SmallDisk {
        let dir = tempfile::Builder::new().prefix("decree-disk-").tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={DISK_MIB}m"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs at {}", path.display());
        SmallDisk { _dir: dir, path }
    }

    fn free_mib(&self) -> u64 {
        free_bytes(&self.path) >> 20
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Free bytes on the file system of `path` (as the servers measure it).
fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap()
}

/// Fills the disk until `leave_mib` MiB are free; returns the filler's path.
fn fill(disk: &SmallDisk, leave_mib: u64) -> PathBuf {
    let filler = disk.path.join("filler");
    let size = (disk.free_mib().saturating_sub(leave_mib)) << 20;
    let status = Command::new("fallocate").args(["-l", &size.to_string()]).arg(&filler).status().unwrap();
    assert!(status.success(), "fallocate the filler");
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_work_finishes_what_was_admitted_and_resumes_when_space_returns() {
    init();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("disk: needs root to mount a size-limited tmpfs; NOT CHECKED as this user");
        return;
    }
    let disk = SmallDisk::mount();
    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let reserve = ["--disk-reserve-mb".to_string(), RESERVE_MIB.to_string()];
    let mut options = Options::new(2);
    options.coordinator_args =
        ["--retain-ended", "0", "--prune-interval-ms", "20", "--metrics-listen", &metrics]
            .map(String::from)
            .to_vec();
    options.coordinator_args.extend(reserve.clone());
    options.participant_args = ["--in-doubt-after-ms", "300"].map(String::from).to_vec();
    options.participant_args.extend(reserve);
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    let mut cluster = Cluster::start_in_dir(disk.path.join("cluster"), options).await.unwrap();
    let names = cluster.participant_names();
    let client = cluster.client().await.unwrap();
    for i in 0..5 {
        let result =
            client.transact_branches(check::marked_transfer(&format!("before-{i}"), &names, 0, 3)).await;
        assert_eq!(result.unwrap().outcome, Outcome::Committed);
    }

    info!("--- a committed decision left in doubt: the coordinator dies right after logging it");
    cluster.restart_armed(NodeId::Coordinator, "coordinator.decision.after_log").await.unwrap();
    let client = cluster.client().await.unwrap();
    let answer = client.transact_branches(check::marked_transfer("in-doubt", &names, 0, 5)).await;
    assert!(answer.is_err(), "the coordinator died before answering: {answer:?}");
    cluster.wait_exit(NodeId::Coordinator, SETTLE).await.unwrap();

    info!(free_mib = disk.free_mib(), "--- fill the disk below the reserve");
    let filler = fill(&disk, RESERVE_MIB / 2);
    assert!(disk.free_mib() < RESERVE_MIB);
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    let client = cluster.client().await.unwrap();

    info!("--- what was admitted finishes inside the reserve: the decision reaches both participants");
    cluster.wait_settled(SETTLE).await.unwrap();
    assert!(
        check::all_or_nothing(&client, "in-doubt", &names).await.unwrap(),
        "the committed decision is applied"
    );
    info!("--- pruning goes on while space is short (the restarted coordinator never had more)");
    decree_tests::poll(SETTLE, "a prune while the disk is short", || async {
        (metric(&scrape(&metrics).await, "decree_outcome_prunes_total") >= 1.0).then_some(())
    })
    .await
    .unwrap();

    info!("--- new work is refused with a message saying why; nothing crashes");
    let refused = client.transact_branches(check::marked_transfer("refused", &names, 0, 7)).await;
    match refused {
        Err(ClientError::Status(status)) => {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert_eq!(
                decree_client::Reason::of_status(&status),
                decree_client::Reason::DiskFull,
                "{status:?}"
            );
        }
        other => panic!("a new transaction on a full disk must be refused, got {other:?}"),
    }
    let channel = tonic::transport::Endpoint::from_shared(cluster.url_of(NodeId::Participant(0)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let vote = v1::participant_client::ParticipantClient::new(channel)
        .prepare(v1::PrepareRequest {
            txid: "0000abcd-1-1".into(),
            payload: decree_client::kv_payload(vec![decree_client::KvOp::Put {
                key: "k".into(),
                value: vec![1],
            }]),
            one_phase: false,
            coordinator_incarnation: 0,
            interactive: false,
            trace_context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vote.vote, v1::Vote::No as i32);
    assert_eq!(vote.reason_code, v1::Reason::DiskFull as i32, "{vote:?}");
    for node in [NodeId::Coordinator, NodeId::Participant(0), NodeId::Participant(1)] {
        assert!(cluster.is_running(node), "{node:?} crashed on a full disk:\n{}", cluster.report());
    }
    let values = client.get_at("p1", vec!["balance-0".to_string()]).await;
    assert!(values.is_ok(), "reads go on: {values:?}");

    info!("--- space returns: new work is admitted again, with no restart");
    std::fs::remove_file(&filler).unwrap();
    decree_tests::poll(SETTLE, "a transfer to commit once space is back", || async {
        let result = client.transact_branches(check::marked_transfer("after", &names, 0, 11)).await.ok()?;
        (result.outcome == Outcome::Committed).then_some(())
    })
    .await
    .unwrap();

    cluster.wait_settled(SETTLE).await.unwrap();
    for i in 0..5 {
        assert!(check::all_or_nothing(&client, &format!("before-{i}"), &names).await.unwrap());
    }
    assert!(
        !check::all_or_nothing(&client, "refused", &names).await.unwrap(),
        "refused means nothing written"
    );
    assert!(check::all_or_nothing(&client, "after", &names).await.unwrap());
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0, "money created or lost");
    check::unlocked(&client, &names, &[check::balance_key(0)]).await.unwrap();
    drop(cluster);
}

/// An `LD_PRELOAD` shim whose `fsync` and `fdatasync` fail with EIO while
/// the file `$DECREE_FAIL_FSYNC_FLAG` exists; built with the machine's C
/// compiler into `dir`.
fn fsync_shim(dir: &Path) -> PathBuf {
    let source = dir.join("failing_fsync.c");
    std::fs::write(
        &source,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int failing(void) {
    const char *flag = getenv("DECREE_FAIL_FSYNC_FLAG");
    return flag && access(flag, F_OK) == 0;
}
int fsync(int fd) {
    if (failing()) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}
int fdatasync(int fd) {
    if (failing()) { errno = EIO; return -1; }
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
"#,
    )
    .unwrap();
    let shim = dir.join("failing_fsync.so");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("the C compiler ({compiler}) builds the fsync shim: {e}"));
    assert!(status.success(), "build the fsync shim");
    shim
}

/// A failed fsync is never retried and trusted: the process whose fsync
/// failed (a participant preparing, then the coordinator logging a decision)
/// stops at once with exit 70, and nothing half-commits: restarted on its
/// data directory, every transfer is at all of its participants or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_process_and_nothing_half_commits() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let shim = fsync_shim(dir.path());
    // A flag of its own for each victim: its fsyncs fail while it exists.
    let flag = |node: &str| dir.path().join(format!("fail-fsync-{node}"));
    let mut options = common::quick_options();
    for node in ["coordinator", "p2"] {
        options.env_for.push((node.into(), "LD_PRELOAD".into(), shim.display().to_string()));
        options.env_for.push((
            node.into(),
            "DECREE_FAIL_FSYNC_FLAG".into(),
            flag(node).display().to_string(),
        ));
    }
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let pair = names[..2].to_vec();
    let mut told: check::Told = Vec::new();
    let client = cluster.client().await.unwrap();
    let result = client.transact_branches(check::marked_transfer("before", &pair, 0, 3)).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "the shim passes fsyncs while the flag is absent");
    told.push(("before".into(), pair.clone(), Some(result.outcome)));

    for (victim, name) in [(NodeId::Participant(1), "p2"), (NodeId::Coordinator, "coordinator")] {
        info!(?victim, "--- its fsyncs fail from now on");
        let (flag, tag) = (flag(name), format!("{name}-fsync"));
        std::fs::write(&flag, b"").unwrap();
        let client = cluster.client().await.unwrap();
        let answer = client.transact_branches(check::marked_transfer(&tag, &pair, 0, 5)).await;
        let status = cluster.wait_exit(victim, SETTLE).await.unwrap();
        assert_eq!(
            status.code(),
            Some(70),
            "{victim:?} stops on a failed fsync:\n{}",
            cluster.log_of(victim)
        );
        assert!(cluster.log_of(victim).contains("fatal storage error"), "{}", cluster.log_of(victim));
        if let Ok(result) = &answer {
            // A participant's failed prepare record is no YES: the transaction cannot have committed.
            assert!(victim == NodeId::Coordinator || result.outcome == Outcome::Aborted, "{result:?}");
        }
        told.push((tag, pair.clone(), answer.ok().map(|r| r.outcome)));
        std::fs::remove_file(&flag).unwrap();
        cluster.restart(victim).unwrap();
        cluster.wait_back(victim).await.unwrap();
    }

    cluster.wait_settled(SETTLE).await.unwrap();
    let client = cluster.client().await.unwrap();
    let (committed, _, _) = check::told_agrees(&client, &told).await.unwrap();
    assert!(committed >= 1);
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0, "money created or lost");
    check::unlocked(&client, &pair, &[check::balance_key(0)]).await.unwrap();
    let result = client.transact_branches(check::marked_transfer("after", &pair, 0, 1)).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "both run again on their data");
}

/// A flipped byte in the middle of a participant's write-ahead log: it refuses
/// to start with a message naming its log and the corruption, rather than
/// starting without the records after it (RocksDB's default recovery would
/// stop replaying there and open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_log_refuses_to_start_and_says_where() {
    init();
    let mut cluster = Cluster::start(common::quick_options()).await.unwrap();
    let names = cluster.participant_names();
    let client = cluster.client().await.unwrap();
    for i in 0..20 {
        let result = client.transact_branches(check::marked_transfer(&format!("t{i}"), &names, 0, 1)).await;
        assert_eq!(result.unwrap().outcome, Outcome::Committed);
    }
    let p1 = NodeId::Participant(0);
    cluster.kill(p1);
    let data = cluster.dir().join("p1");
    let wal = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a write-ahead log");
    let mut bytes = std::fs::read(&wal).unwrap();
    assert!(bytes.len() > 4096, "{} holds the records: {} bytes", wal.display(), bytes.len());
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&wal, bytes).unwrap();

    cluster.restart(p1).unwrap();
    let status = cluster.wait_exit(p1, SETTLE).await.unwrap();
    let log = cluster.log_of(p1);
    assert_eq!(status.code(), Some(1), "refuses to start: {log}");
    assert!(log.contains("Corruption"), "{log}");
    assert!(log.contains(&data.display().to_string()), "names its data directory: {log}");
}
