//! A full disk is a state, not a crash: below its reserve a server refuses new
//! work with a message saying so, what was admitted finishes (a committed
//! decision in doubt is delivered, pruning goes on), and when space returns
//! work resumes without a restart.
//!
//! The disk is a tmpfs with a size limit, which takes root to mount; CI runs
//! as root. Run as another user, the test says it cannot and passes nothing off
//! as checked.

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
