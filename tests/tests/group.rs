//! A coordinator group of three replicas, as real processes: the leader
//! SIGKILLed under load, a follower SIGKILLed, two of three down, every
//! coordinator and replica crash point on the leader and on a follower, a
//! wiped replica rejoining, partitions (the leader cut off from both
//! others, from one, one way), and the bad input a group refuses. After each,
//! the invariants of TESTING.md: every transfer at all of its participants
//! or at none (I1), what clients were told agrees with the data (I2), no
//! money created or lost (I5), nothing in doubt and no lock held (I6).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use decree_client::{Client, Outcome};
use decree_runtime::crash;
use decree_tests::{check, Cluster, NodeId, Options};
use tokio::sync::Mutex;
use tracing::info;

const ACCOUNTS: usize = 8;
const SETTLE: Duration = Duration::from_secs(30);

/// Three replicas, three named KV services, quick deadlines.
fn options() -> Options {
    Options { coordinators: 3, ..common::quick_options() }
}

use check::Told;

/// `clients` clients running marked transfers until `stop`: two of three
/// over every participant, one of three at one participant alone (a
/// one-phase transaction, which a group records nothing of before it
/// commits: see docs/ha.md).
/// The load's switch, and how many of its transfers committed so far.
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    committed: AtomicUsize,
}

impl Progress {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits until `more` transfers more than now have committed.
    async fn commits(&self, more: usize) {
        let target = self.committed.load(Ordering::Relaxed) + more;
        decree_tests::poll(SETTLE, &format!("{more} more commits"), || async {
            (self.committed.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await
        .unwrap();
    }
}

fn load(cluster: &Cluster, clients: usize, stop: Arc<Progress>) -> Vec<tokio::task::JoinHandle<Told>> {
    let (url, names) = (cluster.coordinator_url(), cluster.participant_names());
    (0..clients)
        .map(|c| {
            let (url, names, stop) = (url.clone(), names.clone(), stop.clone());
            tokio::spawn(async move {
                let client = Client::connect(&url).await.expect("the group answers");
                let mut told = Vec::new();
                let mut i = 0;
                while !stop.stop.load(Ordering::Relaxed) {
                    let tag = format!("c{c}-{i}");
                    let over = match i % 3 {
                        2 => vec![names[(c + i) % names.len()].clone()],
                        _ => names.clone(),
                    };
                    let transfer = check::marked_transfer(&tag, &over, i % ACCOUNTS, 1 + (i % 7) as i64);
                    let answer = client.transact_branches(transfer).await;
                    match &answer {
                        Ok(result) if result.outcome == Outcome::Committed => {
                            stop.committed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(err) => {
                            info!(%tag, error = %err, "no outcome");
                            // Pacing, not waiting: a client that heard nothing does not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    told.push((tag, over, answer.ok().map(|r| r.outcome)));
                    i += 1;
                }
                told
            })
        })
        .collect()
}

/// Waits for every client, then checks I1, I2, I5 and I6 with everything
/// back; returns (committed, aborted, unknown).
async fn verify(cluster: &Cluster, clients: Vec<tokio::task::JoinHandle<Told>>) -> (usize, usize, usize) {
    let mut told = Vec::new();
    for client in clients {
        told.extend(client.await.unwrap());
    }
    cluster.wait_enrolled(SETTLE).await.unwrap();
    cluster.wait_settled(SETTLE).await.unwrap();
    let client = cluster.client().await.unwrap();
    let (committed, aborted, unknown) = check::told_agrees(&client, &told).await.unwrap();
    let names = cluster.participant_names();
    assert_eq!(check::balance_sum(&client, &names, ACCOUNTS).await.unwrap(), 0, "money created or lost");
    check::unlocked(&client, &names, &(0..ACCOUNTS).map(check::balance_key).collect::<Vec<_>>())
        .await
        .unwrap();
    (committed, aborted, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_twice_under_load_fails_over_and_every_transfer_ends_whole() {
    common::init();
    let cluster = Cluster::start(options()).await.unwrap();
    let stop = Arc::new(Progress::default());
    let clients = load(&cluster, 4, stop.clone());
    let cluster = Arc::new(Mutex::new(cluster));
    for round in 0..2 {
        stop.commits(200).await;
        let mut group = cluster.lock().await;
        let leader = group.leader(SETTLE).await.unwrap();
        info!(round, ?leader, "SIGKILL the leader");
        group.kill(leader);
        let next = group.leader(SETTLE).await.unwrap();
        assert_ne!(next, leader, "a new leader coordinates");
        group.restart(leader).unwrap();
        group.wait_serving(leader, SETTLE).await.unwrap();
    }
    stop.commits(200).await;
    stop.stop();
    let cluster = cluster.lock().await;
    let (committed, aborted, unknown) = verify(&cluster, clients).await;
    println!("leader killed twice: {committed} committed, {aborted} aborted, {unknown} without an outcome");
    assert!(committed > 0, "nothing committed");
    // Every transaction sent was named by a leased txid: its outcome was asked of the next leader.
    assert_eq!(unknown, 0, "clients left without an outcome although every replica is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_under_load_changes_nothing_for_clients() {
    common::init();
    let mut options = options();
    // Each replica's metrics, to read the group's own on the leader and a follower.
    let metrics: Vec<String> = (0..3).map(|_| common::metrics_address()).collect();
    for (r, addr) in metrics.iter().enumerate() {
        options
            .participant_args_for
            .push((format!("c{}", r + 1), vec!["--metrics-listen".into(), addr.clone()]));
    }
    let mut cluster = Cluster::start(options).await.unwrap();
    let leader = cluster.leader(SETTLE).await.unwrap();
    let follower = cluster.replicas().into_iter().find(|r| *r != leader).unwrap();
    let other = cluster.replicas().into_iter().find(|r| *r != leader && *r != follower).unwrap();
    let stop = Arc::new(Progress::default());
    let clients = load(&cluster, 4, stop.clone());
    stop.commits(100).await;
    cluster.kill(follower);
    // Transfers go on without the follower.
    stop.commits(200).await;
    cluster.restart(follower).unwrap();
    cluster.wait_serving(follower, SETTLE).await.unwrap();
    stop.commits(100).await;
    stop.stop();
    let (committed, _, unknown) = verify(&cluster, clients).await;
    assert!(committed > 0, "nothing committed");
    assert_eq!(unknown, 0, "a follower's loss left clients without an outcome");
    assert_eq!(cluster.leader(SETTLE).await.unwrap(), leader, "the leader kept leading");

    info!("--- the group's metrics: the leader's and a follower's (the one never killed)");
    let page = |id: NodeId| common::scrape(&metrics[index_of(id).0]);
    let (on_leader, on_follower) = (page(leader).await, page(other).await);
    let metric = common::metric;
    assert_eq!(metric(&on_leader, "decree_group_leader "), 1.0, "the leader says it leads");
    assert_eq!(metric(&on_follower, "decree_group_leader "), 0.0, "a follower says it does not");
    for page in [&on_leader, &on_follower] {
        assert!(metric(page, "decree_group_term ") >= 1.0, "a term is reported:\n{page}");
    }
    assert!(
        metric(&on_leader, "decree_group_commit_seconds_count") >= 1.0,
        "the leader measures its replicated writes' commit latency:\n{on_leader}"
    );
    assert!(metric(&on_leader, "decree_group_commit_seconds_sum") > 0.0);
    assert_eq!(metric(&on_follower, "decree_group_commit_seconds_count"), 0.0, "a follower proposes nothing");
    assert!(
        on_leader.lines().any(|l| l.starts_with("decree_group_lag_entries{")),
        "the leader reports its followers' lag:\n{on_leader}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_down_stop_every_commit_and_one_back_resumes() {
    common::init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let first = client.transact_branches(check::marked_transfer("before", &names, 0, 5)).await.unwrap();
    assert_eq!(first.outcome, Outcome::Committed);
    let leader = cluster.leader(SETTLE).await.unwrap();
    let followers: Vec<NodeId> = cluster.replicas().into_iter().filter(|r| *r != leader).collect();
    cluster.kill(followers[0]);
    cluster.kill(followers[1]);
    // The leader alone cannot make a decision durable: the transfer gets no
    // COMMIT (its client waits, or hears no outcome), and nothing is applied.
    let stuck = {
        let client = client.clone();
        let names = names.clone();
        tokio::spawn(
            async move { client.transact_branches(check::marked_transfer("alone", &names, 1, 5)).await },
        )
    };
    // What is under test: three seconds without a majority commit nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!stuck.is_finished(), "a transfer was decided without a majority: {:?}", stuck.await);
    check::unapplied(&client, "alone", &names).await.unwrap();
    cluster.restart(followers[0]).unwrap();
    let answer = stuck.await.unwrap();
    info!(?answer, "the transfer held up by the lost majority");
    let next = cluster.client().await.unwrap();
    let after = next.transact_branches(check::marked_transfer("after", &names, 2, 5)).await.unwrap();
    assert_eq!(after.outcome, Outcome::Committed, "progress once a majority is back");
    cluster.restart(followers[1]).unwrap();
    cluster.wait_settled(SETTLE).await.unwrap();
    let everywhere = check::all_or_nothing(&next, "alone", &names).await.unwrap();
    match answer {
        Ok(result) => assert_eq!(everywhere, result.outcome == Outcome::Committed, "told {result:?}"),
        Err(err) => info!(%err, everywhere, "its client heard no outcome; it is whole either way"),
    }
    assert_eq!(check::balance_sum(&next, &names, ACCOUNTS).await.unwrap(), 0);
}

/// The leader cut off from the other replicas (its Raft messages lost both
/// ways, `DECREE_PARTITION_FILE`) while clients and participants still
/// reach it: it decides nothing. Transfers sent to it alone after the cut
/// are never told committed and end nowhere; the others elect a leader
/// that goes on committing; healed, the old leader follows, and every
/// transfer of every client is whole and agrees with what it was told.
/// The partition file of replica `index` (`DECREE_PARTITION_FILE`), in `dir`.
fn partition_file(dir: &std::path::Path, index: usize) -> std::path::PathBuf {
    dir.join(format!("c{}.partitioned", index + 1))
}

/// [`options`], each replica reading its partition file in `dir`.
fn partitionable(dir: &std::path::Path) -> Options {
    let mut options = options();
    options.env_for = (0..3)
        .map(|r| {
            let file = partition_file(dir, r).display().to_string();
            (format!("c{}", r + 1), "DECREE_PARTITION_FILE".to_owned(), file)
        })
        .collect();
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_others_decides_nothing_while_clients_reach_it() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let cut = |replica: usize| partition_file(dir.path(), replica);
    let cluster = Cluster::start_in_dir(dir.path().join("cluster"), partitionable(dir.path())).await.unwrap();
    let stop = Arc::new(Progress::default());
    let clients = load(&cluster, 3, stop.clone());
    stop.commits(100).await;
    let old = cluster.leader(SETTLE).await.unwrap();
    let NodeId::Replica(index) = old else { unreachable!("a group's replica") };
    info!(?old, "cutting the leader off from the other replicas");
    std::fs::write(cut(index), b"").unwrap();
    // The replica notices within milliseconds; transfers begun after this
    // are decided after the cut.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pinned = {
        let (url, names) = (cluster.url_of(old), cluster.participant_names());
        (0..4)
            .map(|c| {
                let (url, names) = (url.clone(), names.clone());
                tokio::spawn(async move {
                    let client = Client::connect(&url).await.expect("the old leader answers");
                    let tag = format!("pinned{c}");
                    let transfer = check::marked_transfer(&tag, &names, c, 1);
                    let answer = client.transact_branches(transfer).await;
                    info!(%tag, ?answer, "a transfer sent to the cut-off leader alone");
                    (tag, names, answer.ok().map(|r| r.outcome))
                })
            })
            .collect::<Vec<_>>()
    };
    let next = cluster.leader_other_than(Some(old), SETTLE).await.unwrap();
    info!(?next, "a new leader among the other two");
    stop.commits(100).await;
    // The cut-off leader has not told anyone committed, however long it is cut off.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for task in &pinned {
        if task.is_finished() {
            info!("a pinned transfer already has its answer");
        }
    }
    // Its majority silent, it stopped coordinating rather than hold its clients.
    let log = cluster.log_of(old);
    assert!(log.contains("no majority has acknowledged this leader"), "the cut-off leader kept coordinating");
    info!("healing the partition");
    std::fs::remove_file(cut(index)).unwrap();
    let mut told = Vec::new();
    for task in pinned {
        told.push(task.await.unwrap());
    }
    stop.commits(50).await;
    stop.stop();
    let (committed, aborted, unknown) = verify(&cluster, clients).await;
    println!(
        "leader cut off: {committed} committed, {aborted} aborted, {unknown} without an outcome elsewhere"
    );
    assert!(committed > 0, "nothing committed");
    let client = cluster.client().await.unwrap();
    for (tag, names, outcome) in &told {
        assert_ne!(*outcome, Some(Outcome::Committed), "{tag}: the cut-off leader told a client committed");
        assert!(
            !check::all_or_nothing(&client, tag, names).await.unwrap(),
            "{tag}: decided by the cut-off leader"
        );
    }
    check::told_agrees(&client, &told).await.unwrap();
}

/// The replica index and 1-based id of a group member.
fn index_of(id: NodeId) -> (usize, u64) {
    let NodeId::Replica(index) = id else { unreachable!("a group's replica") };
    (index, index as u64 + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_between_two_replicas_or_one_way_leave_the_group_deciding_and_every_transfer_whole() {
    common::init();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_in_dir(dir.path().join("cluster"), partitionable(dir.path())).await.unwrap();
    let stop = Arc::new(Progress::default());
    let clients = load(&cluster, 3, stop.clone());
    stop.commits(100).await;

    // The leader and one follower cannot reach each other; the third
    // replica reaches both. The leader keeps its majority with the third;
    // the cut-off follower's elections find no vote (the third hears its
    // leader), so the group goes on deciding.
    let two_way =
        |leader: u64, follower: u64| vec![(leader, follower.to_string()), (follower, leader.to_string())];
    let campaigned = partitioned(&cluster, dir.path(), &stop, "cut from each other", two_way).await;
    // One way: the leader's messages to a follower are lost, the
    // follower's to the leader arrive. The follower hears no leader and
    // asks for votes the others can hear; its log lacks what it missed, so
    // it cannot win, and the group goes on deciding under some leader.
    let one_way = |leader: u64, follower: u64| vec![(leader, format!(">{follower}"))];
    let campaigned_one_way = partitioned(&cluster, dir.path(), &stop, "one way", one_way).await;
    stop.stop();
    let (committed, aborted, unknown) = verify(&cluster, clients).await;
    println!(
        "partial partitions: {committed} committed, {aborted} aborted, {unknown} without an outcome elsewhere; \
         the cut-off follower's terms: {campaigned:?} (two-replica cut), {campaigned_one_way:?} (one way)"
    );
    assert!(committed >= 300, "{committed} committed");
}

/// Cuts the links `links(leader id, follower id)` names (each a replica id
/// and what its partition file says) between the leader and a follower,
/// holds them while the follower campaigns ([`campaign`]), heals them and
/// waits for 50 more commits; returns what `campaign` does.
async fn partitioned(
    cluster: &Cluster,
    dir: &std::path::Path,
    progress: &Progress,
    what: &str,
    links: impl Fn(u64, u64) -> Vec<(u64, String)>,
) -> (u64, u64) {
    let leader = cluster.leader(SETTLE).await.unwrap();
    let follower = cluster.replicas().into_iter().find(|r| *r != leader).unwrap();
    info!(?leader, ?follower, "partitioning the leader and one follower: {what}");
    let term = cluster.group_status(leader).await.unwrap().term;
    let cuts = links(index_of(leader).1, index_of(follower).1);
    for (id, spec) in &cuts {
        std::fs::write(partition_file(dir, *id as usize - 1), spec).unwrap();
    }
    let campaigned = campaign(cluster, follower, term, progress).await;
    info!(leader = ?cluster.leader(SETTLE).await.unwrap(), "healing: every link flows");
    for (id, _) in &cuts {
        std::fs::remove_file(partition_file(dir, *id as usize - 1)).unwrap();
    }
    progress.commits(50).await;
    campaigned
}

/// While a partition keeps `follower` from hearing its leader (whose term
/// was `term`): waits until it campaigned (its term passed `term`: the case
/// is the one meant), then for 2 s more of its elections, then for 100 more
/// commits, so the group decided with the follower campaigning. Returns the
/// follower's term and the leader's term at the end.
async fn campaign(cluster: &Cluster, follower: NodeId, term: u64, progress: &Progress) -> (u64, u64) {
    decree_tests::poll(SETTLE, "the cut-off follower to campaign", || async {
        let now = cluster.group_status(follower).await.ok()?.term;
        (now > term).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    progress.commits(100).await;
    let leader = cluster.leader(SETTLE).await.unwrap();
    let follower_term = cluster.group_status(follower).await.unwrap().term;
    (follower_term, cluster.group_status(leader).await.unwrap().term)
}

/// One crash point armed at one replica's first start; transfers run until
/// it fires, then it comes back, and every transfer is whole. `early`: the
/// point fires before the group has formed (the bootstrapping replica's
/// first append or apply is the group's first membership entry), so the
/// group forms once it is back, and the transfers run after.
async fn crash_case(point: &str, replica: &str, early: bool) {
    info!(point, replica, "--- case");
    let mut options = options();
    options.crash_at_for = vec![(replica.to_owned(), point.to_owned())];
    options.wait = !early;
    let mut cluster = match Cluster::start(options).await {
        Ok(cluster) => cluster,
        Err(err) => panic!("{point} at {replica}: the group did not start: {err}"),
    };
    let index = replica.trim_start_matches('c').parse::<usize>().unwrap() - 1;
    let victim = NodeId::Replica(index);
    let stop = Arc::new(Progress::default());
    let mut clients = Vec::new();
    if !early {
        clients = load(&cluster, 2, stop.clone());
    }
    let died = cluster.wait_exit(victim, Duration::from_secs(20)).await;
    if !early && died.is_ok() {
        // The group goes on without it.
        stop.commits(50).await;
    }
    cluster.restart(victim).unwrap();
    cluster.wait_serving(victim, SETTLE).await.unwrap();
    if early {
        cluster.wait_enrolled(SETTLE).await.unwrap();
        clients = load(&cluster, 2, stop.clone());
    }
    // Transfers commit with the replica back.
    stop.commits(100).await;
    stop.stop();
    let (committed, aborted, unknown) = verify(&cluster, clients).await;
    println!(
        "{point} at {replica}: {} ; {committed} committed, {aborted} aborted, {unknown} without an outcome",
        if died.is_ok() { "fired" } else { "not reached" }
    );
    assert!(died.is_ok(), "{point} armed at {replica} was never reached");
    assert!(committed > 0, "{point} at {replica}: nothing committed");
}

/// Every coordinator crash point, on the first leader (c1 bootstraps the
/// group and leads first): the next leader recovers what it decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coordinator_crash_point_on_the_leader_ends_whole() {
    common::init();
    let points = crash::PROTOCOL.iter().filter(|p| p.starts_with("coordinator.") && !p.contains("recovery"));
    for point in points {
        crash_case(point, "c1", false).await;
    }
}

/// A one-phase transfer whose branch committed and whose leader died before
/// answering: the group holds nothing of it (no question is recorded before
/// a one-shot one-phase Prepare), and its client, which knows the txid, asks
/// the next leader, which asks the participants and answers COMMITTED,
/// never ABORTED by presumption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_transfer_whose_leader_died_before_answering_is_told_committed_by_the_next() {
    common::init();
    let mut options = options();
    options.crash_at_for = vec![("c1".to_owned(), crash::COORDINATOR_REPLY_BEFORE_CLIENT.to_owned())];
    let mut cluster = Cluster::start(options).await.unwrap();
    let names = cluster.participant_names();
    let client = Client::connect(&cluster.coordinator_url()).await.unwrap();
    let one = vec![names[1].clone()];
    let answer = client.transact_branches(check::marked_transfer("alone", &one, 0, 1)).await.unwrap();
    cluster.wait_exit(NodeId::Replica(0), SETTLE).await.expect("the leader died before answering");
    assert_eq!(answer.outcome, Outcome::Committed, "the next leader found the branch committed: {answer:?}");
    assert_eq!(
        check::markers(&client, "alone", &names).await.unwrap(),
        1,
        "committed at its one participant"
    );
    assert_eq!(client.status(&answer.txid).await.unwrap(), Outcome::Committed, "asked again, the same");
    // A txid of the dead leader's that ran nowhere: ABORTED, once every participant says so.
    let txid: decree_proto::TxId = answer.txid.parse().unwrap();
    let unused =
        decree_proto::TxId::new(txid.coordinator, txid.incarnation, txid.sequence + 1_000).to_string();
    assert_eq!(client.status(&unused).await.unwrap(), Outcome::Aborted, "{unused} ran nowhere");
    cluster.restart(NodeId::Replica(0)).unwrap();
    cluster.wait_serving(NodeId::Replica(0), SETTLE).await.unwrap();
    cluster.wait_settled(SETTLE).await.unwrap();
}

/// The replicated log's own crash points, on the leader and on a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicated_logs_crash_points_on_leader_and_follower_end_whole() {
    common::init();
    for point in crash::GROUP {
        // c1 bootstraps: its first append (and apply) is the group's first entry.
        crash_case(point, "c1", true).await;
        crash_case(point, "c2", false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_is_removed_and_added_back_and_catches_up() {
    common::init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    for i in 0..5 {
        let tag = format!("w{i}");
        let answer = client.transact_branches(check::marked_transfer(&tag, &names, i, 3)).await.unwrap();
        assert_eq!(answer.outcome, Outcome::Committed);
    }
    let leader = cluster.leader(SETTLE).await.unwrap();
    let victim = cluster.replicas().into_iter().find(|r| *r != leader).unwrap();
    let NodeId::Replica(index) = victim else { unreachable!() };
    let id = (index + 1).to_string();
    cluster.kill(victim);
    std::fs::remove_dir_all(cluster.dir().join(format!("c{id}"))).unwrap();
    let url = cluster.coordinator_url();
    let decree = |args: &[&str]| {
        let out = std::process::Command::new(decree_tests::decree_binary())
            .args(args)
            .args(["--coordinator", &url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Restarted on the empty directory under its old id, still a member: the
    // group admitted another data directory, so it refuses the group's
    // messages (it forgot its vote and log) while the others go on.
    cluster.restart(victim).unwrap();
    cluster.wait_serving(victim, SETTLE).await.unwrap();
    for i in 5..8 {
        let tag = format!("w{i}");
        let answer = client.transact_branches(check::marked_transfer(&tag, &names, i, 3)).await.unwrap();
        assert_eq!(answer.outcome, Outcome::Committed);
    }
    let (code, out) = decree(&["coordinators", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let view: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let wiped = view["members"].as_array().unwrap().iter().find(|m| m["id"] == index as u64 + 1).unwrap();
    assert_eq!(wiped["replaced"], true, "{out}");
    assert_eq!(wiped["last_log_index"], 0, "the wiped replica took entries: {out}");
    let (code, table) = decree(&["coordinators"]);
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains(&format!("decree coordinators remove {id}")), "{table}");
    // The leader's next message after its back-off meets the refusal.
    let refused = decree_tests::poll(SETTLE, "the wiped replica to refuse the leader's messages", || {
        let refused = cluster.log_of(victim).contains("refusing the group's Raft messages");
        async move { refused.then_some(()) }
    })
    .await;
    assert!(refused.is_ok(), "{}", cluster.log_of(victim));
    let (code, out) = decree(&["coordinators", "remove", &id]);
    assert_eq!(code, Some(0), "{out}");
    let address = cluster.url_of(victim).trim_start_matches("http://").to_owned();
    let (code, out) = decree(&["coordinators", "add", &id, &address]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = decree(&["coordinators", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let view: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let members = view["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{out}");
    assert!(members.iter().all(|m| m["voter"] == true), "{out}");
    // The wiped replica holds the whole log again: it can lead.
    decree_tests::poll(SETTLE, "the wiped replica to catch up", || {
        let (code, out) = decree(&["coordinators", "--json"]);
        async move {
            let view: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
            let caught_up = view["members"].as_array()?.iter().all(|m| m["lag"].as_u64().unwrap_or(0) == 0);
            (code == Some(0) && caught_up).then_some(())
        }
    })
    .await
    .unwrap();
    let leader = cluster.leader(SETTLE).await.unwrap();
    cluster.kill(leader);
    let next = Client::connect(&url).await.unwrap();
    let answer = next.transact_branches(check::marked_transfer("after", &names, 6, 3)).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Committed);
    for i in 0..8 {
        assert!(check::all_or_nothing(&next, &format!("w{i}"), &names).await.unwrap(), "w{i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_transactions_begun_under_one_leader_commit_abort_or_time_out_under_the_next() {
    common::init();
    // KV participants in the ring: interactive work is routed by key.
    let mut cluster = Cluster::start(Options { services: false, ..options() }).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    // Keys by owner: `key(p, tag)` is a key participant p owns.
    let key = |p: usize, tag: &str| client.key_at(&names[p], &format!("{tag}-")).unwrap();
    // Begun and worked on at two participants under the first leader...
    let mut committed = client.begin().await.unwrap();
    committed.add(&key(0, "commit"), 5).await.unwrap();
    committed.put(&key(1, "commit"), "x").await.unwrap();
    let mut aborted = client.begin().await.unwrap();
    aborted.put(&key(0, "abort"), "a").await.unwrap();
    aborted.put(&key(1, "abort"), "a").await.unwrap();
    let mut idle = client.begin_with_timeout(Duration::from_secs(4)).await.unwrap();
    idle.put(&key(0, "idle"), "i").await.unwrap();
    idle.put(&key(2, "idle"), "i").await.unwrap();
    let leader = cluster.leader(SETTLE).await.unwrap();
    info!(?leader, "killing the leader with three interactive transactions active");
    cluster.kill(leader);
    // ... and under the next: more work, at a participant already enlisted
    // and at one enlisting now, then the decisions.
    committed.add(&key(0, "commit"), 2).await.expect("work at an enlisted participant after the failover");
    committed.put(&key(2, "commit"), "y").await.expect("work enlisting with the next leader");
    let result = committed.commit().await.expect("the Commit, sent to the next leader");
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    aborted.abort().await.unwrap();
    let owned: Vec<(usize, &str)> =
        ["commit", "abort", "idle"].into_iter().flat_map(|tag| (0..3).map(move |p| (p, tag))).collect();
    // The idle one's timeout fires at the next leader, which aborts its branches.
    for (p, tag) in &owned {
        check::unlocked(&client, &names[*p..=*p], &[key(*p, tag)]).await.unwrap();
    }
    let keys: Vec<String> = owned.iter().map(|(p, tag)| key(*p, tag)).collect();
    let values = client.get(&keys).await.unwrap();
    let at = |p: usize, tag: &str| values[&key(p, tag)].clone();
    assert_eq!(at(0, "commit"), Some(b"7".to_vec()), "work before and after the failover");
    assert_eq!(at(1, "commit"), Some(b"x".to_vec()));
    assert_eq!(at(2, "commit"), Some(b"y".to_vec()), "work enlisted with the next leader");
    for (p, tag) in [(0, "abort"), (1, "abort"), (0, "idle"), (2, "idle")] {
        assert_eq!(at(p, tag), None, "{tag} at {}: an aborted transaction's work", names[p]);
    }
    assert!(cluster
        .log_of(cluster.leader(SETTLE).await.unwrap())
        .contains("an interactive transaction is active again"));
    cluster.restart(leader).unwrap();
    cluster.wait_serving(leader, SETTLE).await.unwrap();
    cluster.wait_settled(SETTLE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_input_is_refused_with_a_clear_error_and_changes_nothing() {
    common::init();
    let mut cluster = Cluster::start(options()).await.unwrap();
    let url = cluster.coordinator_url();
    let dir = cluster.dir().to_path_buf();
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(decree_tests::decree_binary()).args(&args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let coordinator = |extra: &[&str], data: &std::path::Path| {
        let mut args: Vec<String> =
            ["coordinator", "--listen", "127.0.0.1:0", "--data-dir"].map(String::from).to_vec();
        args.push(data.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        run(args)
    };
    let fresh = dir.join("fresh");
    for (extra, want) in [
        (
            vec!["--replica-id", "4", "--replicas", "1=127.0.0.1:1,2=127.0.0.1:2"],
            "does not list this replica",
        ),
        (vec!["--replica-id", "1", "--replicas", "1=127.0.0.1:0,1=127.0.0.1:9"], "listed twice"),
        (vec!["--replica-id", "1", "--replicas", "1=127.0.0.1:0,2=127.0.0.1:0"], "listed twice"),
        (vec!["--replica-id", "1", "--replicas", "1=nohost"], "ID=HOST:PORT"),
        (vec!["--replicas", "1=127.0.0.1:0"], "needs --replica-id"),
        (vec!["--bootstrap"], "needs --replica-id"),
    ] {
        let (code, err) = coordinator(&extra, &fresh);
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!fresh.exists(), "{extra:?} created its data directory");
    }
    // A bootstrap on a replica that has data: refused, its log untouched.
    let leader = cluster.leader(SETTLE).await.unwrap();
    let follower = cluster.replicas().into_iter().find(|r| *r != leader).unwrap();
    let NodeId::Replica(index) = follower else { unreachable!() };
    cluster.kill(follower);
    let port = cluster.url_of(follower).rsplit(':').next().unwrap().to_owned();
    let replicas = url
        .split(',')
        .enumerate()
        .map(|(i, u)| format!("{}={}", i + 1, u.trim_start_matches("http://")))
        .collect::<Vec<_>>()
        .join(",");
    let data = dir.join(format!("c{}", index + 1));
    let mut args: Vec<String> = ["coordinator", "--listen"].map(String::from).to_vec();
    args.extend([format!("127.0.0.1:{port}"), "--data-dir".into(), data.display().to_string()]);
    args.extend([
        "--replica-id".into(),
        (index + 1).to_string(),
        "--replicas".into(),
        replicas,
        "--bootstrap".into(),
    ]);
    let (code, err) = run(args);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("--bootstrap refused"), "{err}");
    // A single coordinator on a replica's data directory: refused.
    let (code, err) = coordinator(&[], &data);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("holds a replica of a coordinator group"), "{err}");
    cluster.restart(follower).unwrap();
    cluster.wait_serving(follower, SETTLE).await.unwrap();
    // Removing a replica that is not a member, the last one, or the leader
    // while a majority would not remain: refused, the group unchanged.
    let decree = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--coordinator".into(), url.clone()]);
        run(all)
    };
    let (code, err) = decree(&["coordinators", "remove", "9"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a member"), "{err}");
    let (code, err) = decree(&["coordinators", "add", "0", "127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{err}");
    let other = cluster.replicas().into_iter().find(|r| *r != leader && *r != follower).unwrap();
    cluster.kill(other);
    let NodeId::Replica(leader_index) = leader else { unreachable!() };
    let (code, err) = decree(&["coordinators", "remove", &(index + 1).to_string()]);
    assert_eq!(code, Some(2), "removing a live follower while the other is down: {err}");
    assert!(err.contains("not a majority"), "{err}");
    let (code, out) = decree(&["coordinators", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    cluster.restart(other).unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let answer = client.transact_branches(check::marked_transfer("still", &names, 0, 1)).await.unwrap();
    assert_eq!(answer.outcome, Outcome::Committed, "the group works as before (leader {leader_index})");
}
