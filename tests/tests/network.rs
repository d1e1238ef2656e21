//! Network faults between real processes: every link between the coordinator
//! and a participant, each way, and the client's link to the coordinator go
//! through a fault proxy (`decree_cluster::faults`) that cuts, blackholes,
//! delays, or loses one way. What each test shows is in its name; the
//! participants are asked directly, on their own ports, around the proxies.

mod common;

use std::time::Duration;

use common::{decree_async, init, metric, scrape};
use decree_client::{v1, Client, KvOp, Outcome, Reason};
use decree_tests::{check, poll, Cluster, Fault, Link, NodeId, Options};
use tracing::info;

const SETTLE: Duration = Duration::from_secs(30);

/// Three named KV services behind proxies, with quick deadlines.
async fn start() -> Cluster {
    let mut options = common::quick_options();
    options.faults = true;
    Cluster::start(options).await.unwrap()
}

/// The branches in doubt at participant `i`, asked on its own port.
async fn in_doubt_at(cluster: &Cluster, i: usize) -> Vec<decree_client::InDoubt> {
    let url = cluster.url_of(NodeId::Participant(i));
    decree_client::in_doubt_at_urls(&[url]).await.unwrap().0
}

/// A read of `key` at participant `i`, on its own port.
async fn read_at(cluster: &Cluster, i: usize, key: &str) -> Result<Option<Vec<u8>>, tonic::Status> {
    let url = cluster.url_of(NodeId::Participant(i));
    let mut kv = v1::kv_client::KvClient::connect(url).await.unwrap();
    let response = kv.get(v1::GetRequest { keys: vec![key.into()], ring_epoch: 0 }).await?;
    Ok(response.into_inner().values.pop().and_then(|kv| kv.value))
}

fn put(participant: &str, key: &str, value: &str) -> v1::Branch {
    let ops = vec![KvOp::Put { key: key.into(), value: value.as_bytes().to_vec() }];
    v1::Branch { participant: participant.into(), payload: decree_client::kv_payload(ops) }
}

/// One transaction over `pair`, ended, so the coordinator's connections to
/// them are up before a fault: a fault below then acts on the Prepares, not on the
/// connection's set-up.
async fn warm_up(cluster: &Cluster, client: &Client, pair: &[String]) {
    let result = client.transact_branches(vec![put(&pair[0], "warm", "1"), put(&pair[1], "warm", "1")]).await;
    assert_eq!(result.unwrap().outcome, Outcome::Committed);
    // Its phase two done: the next branch prepared at either is the test's.
    cluster.wait_settled(SETTLE).await.unwrap();
}

/// Waits until participant `i` holds a prepared branch (its vote is on its way).
async fn until_prepared(cluster: &Cluster, i: usize) -> decree_client::InDoubt {
    poll(Duration::from_secs(10), "a branch prepared at the participant", || async {
        in_doubt_at(cluster, i).await.into_iter().next()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_unreachable_during_prepare_aborts_and_every_lock_is_released() {
    init();
    let cluster = start().await;
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let pair = &names[..2];
    for (fault, tag) in [(Fault::Cut, "cut"), (Fault::Blackhole, "blackhole")] {
        info!("--- the link to p2: {fault:?}; a transfer over p1 and p2");
        cluster.link(Link::ToParticipant(1)).set(fault);
        let result = client.transact_branches(check::marked_transfer(tag, pair, 0, 5)).await.unwrap();
        assert_eq!(result.outcome, Outcome::Aborted, "{fault:?}: {}", result.reason);
        assert!(
            matches!(result.code, Reason::ParticipantUnreachable | Reason::Timeout),
            "{fault:?}: {:?} {}",
            result.code,
            result.reason
        );
        info!("--- p1 released its locks while p2 is still unreachable");
        let keys = [check::balance_key(0), format!("marker-{tag}")];
        check::unlocked(&client, &names[..1], &keys).await.unwrap();
        assert!(in_doubt_at(&cluster, 1).await.is_empty(), "{fault:?}: nothing reached p2");
        cluster.link(Link::ToParticipant(1)).heal();
        assert_eq!(check::markers(&client, tag, pair).await.unwrap(), 0, "{fault:?}: nowhere");
        check::unlocked(&client, pair, &keys).await.unwrap();
    }
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0);
}

/// The coordinator decides COMMIT, then loses p2 both ways: p2's branch stays
/// prepared with its keys locked, and a read of them at p2 (which clients
/// still reach) is refused rather than answered with the value the committed
/// transaction overwrote. Healed, p2 commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_after_the_decision_keeps_the_branch_locked_and_unread_until_healed() {
    init();
    let cluster = start().await;
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let (p1, p2) = (names[0].clone(), names[1].clone());
    let before = client.transact_branches(vec![put(&p1, "k", "old"), put(&p2, "k", "old")]).await.unwrap();
    assert_eq!(before.outcome, Outcome::Committed);
    // Its phase two done: the only branch p2 prepares next is the one below.
    cluster.wait_settled(SETTLE).await.unwrap();

    info!("--- p2's votes take a second; a transaction over p1 and p2 starts");
    cluster.link(Link::ToParticipant(1)).set(Fault::DelayAnswers(Duration::from_millis(1000)));
    let transaction = {
        let client = client.clone();
        let branches = vec![put(&p1, "k", "new"), put(&p2, "k", "new")];
        tokio::spawn(async move { client.transact_branches(branches).await })
    };
    let branch = until_prepared(&cluster, 1).await;
    info!(txid = %branch.txid, "--- p2 prepared, its YES in flight: p2 cut off from the coordinator both ways");
    cluster.link(Link::ToParticipant(1)).set(Fault::DropRequests);
    cluster.link(Link::FromParticipant(1)).set(Fault::Blackhole);
    let result = transaction.await.unwrap().unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    assert_eq!(result.txid, branch.txid);
    assert_eq!(read_at(&cluster, 0, "k").await.unwrap().as_deref(), Some(&b"new"[..]), "p1 committed");

    info!("--- p2 holds the branch, keys locked; its read is refused, not answered \"old\"");
    let status = read_at(&cluster, 1, "k").await.expect_err("a read of a key in doubt");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(Reason::of_status(&status), Reason::InDoubt, "{status:?}");
    assert!(status.message().contains(&branch.txid), "{}", status.message());
    let held = in_doubt_at(&cluster, 1).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (held[0].txid.as_str(), held[0].locked_keys.as_slice()),
        (branch.txid.as_str(), &["k".to_owned()][..])
    );
    // Past the in-doubt delay and several resolver rounds: p2 cannot learn the outcome, and waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(in_doubt_at(&cluster, 1).await.len(), 1, "p2 never decides alone");
    assert!(read_at(&cluster, 1, "k").await.is_err());

    info!("--- healed: p2 commits");
    cluster.heal_all();
    poll(SETTLE, "p2 to commit", || async { in_doubt_at(&cluster, 1).await.is_empty().then_some(()) })
        .await
        .unwrap();
    assert_eq!(read_at(&cluster, 1, "k").await.unwrap().as_deref(), Some(&b"new"[..]));
    check::unlocked(&client, &names[..2], &["k".to_owned()]).await.unwrap();
}

/// p2's YES never reaches the coordinator, though the Prepare reached p2:
/// the prepare deadline aborts the transaction, and p2, whose requests still
/// arrive (and which can still ask), aborts and unlocks before the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_lost_one_way_abort_and_the_voter_still_ends_its_branch() {
    init();
    let cluster = start().await;
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let pair = &names[..2];
    warm_up(&cluster, &client, pair).await;
    cluster.link(Link::ToParticipant(1)).set(Fault::DropAnswers);
    let transaction = {
        let (client, pair) = (client.clone(), pair.to_vec());
        tokio::spawn(async move {
            client.transact_branches(check::marked_transfer("lost-votes", &pair, 0, 5)).await
        })
    };
    let branch = until_prepared(&cluster, 1).await;
    let result = transaction.await.unwrap().unwrap();
    assert_eq!(result.txid, branch.txid, "the Prepare reached p2, which voted");
    assert_eq!(result.outcome, Outcome::Aborted, "{}", result.reason);
    assert!(
        matches!(result.code, Reason::Timeout | Reason::ParticipantUnreachable),
        "{:?} {}",
        result.code,
        result.reason
    );
    poll(SETTLE, "p2 to end its branch while its answers are still lost", || async {
        in_doubt_at(&cluster, 1).await.is_empty().then_some(())
    })
    .await
    .unwrap();
    assert_eq!(read_at(&cluster, 1, "marker-lost-votes").await.unwrap(), None);
    cluster.heal_all();
    assert_eq!(check::markers(&client, "lost-votes", pair).await.unwrap(), 0);
    check::unlocked(&client, pair, &[check::balance_key(0)]).await.unwrap();
}

/// The Commit reaches p2 and is applied; its acknowledgements are lost, so the
/// coordinator delivers it again and again: applied once all the same (the
/// transfer's Add counts once), and when the link heals the decision ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_lost_one_way_are_redelivered_and_applied_exactly_once() {
    init();
    let metrics = common::metrics_address();
    let mut options = common::quick_options();
    options.faults = true;
    options.coordinator_args.extend(["--metrics-listen".to_owned(), metrics.clone()]);
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let pair = names[..2].to_vec();

    warm_up(&cluster, &client, &pair).await;
    info!("--- what reaches p2 takes 600 ms: its vote comes back, the decision is COMMIT");
    let to_p2 = cluster.link(Link::ToParticipant(1));
    to_p2.set(Fault::DelayRequests(Duration::from_millis(600)));
    let result = client.transact_branches(check::marked_transfer("acks", &pair, 0, 7)).await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    info!("--- the Commit to p2 still in flight: from now on nothing p2 answers arrives");
    to_p2.set(Fault::DropAnswers);
    poll(SETTLE, "p2 to apply the Commit", || async {
        in_doubt_at(&cluster, 1).await.is_empty().then_some(())
    })
    .await
    .unwrap();
    let balance = || async { read_at(&cluster, 1, &check::balance_key(0)).await.unwrap() };
    assert_eq!(balance().await.as_deref(), Some(&b"7"[..]));

    info!("--- the coordinator, hearing no ack, delivers the Commit again");
    let redeliveries = || async { metric(&scrape(&metrics).await, "decree_redeliveries_total") };
    poll(SETTLE, "two redeliveries", || async { (redeliveries().await >= 2.0).then_some(()) }).await.unwrap();
    assert_eq!(balance().await.as_deref(), Some(&b"7"[..]), "applied once");
    assert!(client.stuck().await.unwrap().is_empty(), "lost acks are not a stuck branch");

    info!("--- healed: the next delivery is acked and the decision ends");
    cluster.heal_all();
    cluster.wait_settled(SETTLE).await.unwrap();
    let ended = redeliveries().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(redeliveries().await, ended, "no more deliveries once acked");
    assert_eq!(balance().await.as_deref(), Some(&b"7"[..]), "applied once");
    assert!(check::all_or_nothing(&client, "acks", &pair).await.unwrap());
    assert_eq!(check::balance_sum(&client, &names, 1).await.unwrap(), 0);
}

/// A client loses its link while its Commit is under way: the coordinator
/// commits, the client hears nothing until the link is back, when its SDK
/// asks the outcome (`GetOutcome`), and `decree status` tells it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_mid_transaction_learns_the_outcome_from_decree_status() {
    init();
    let mut options = Options::new(2);
    options.faults = true;
    let cluster = Cluster::start(options).await.unwrap();
    let direct = cluster.coordinator_url();
    let client = Client::connect(&cluster.proxied_url()).await.unwrap();
    let mut txn = client.begin().await.unwrap();
    txn.put("cut-key", "v").await.unwrap();
    let txid = txn.txid().to_owned();

    info!(%txid, "--- the client's answers are lost; it sends Commit");
    cluster.link(Link::Client).set(Fault::DropAnswers);
    let commit = tokio::spawn(txn.commit());
    let status = |txid: String| {
        let direct = direct.clone();
        async move {
            decree_async(vec!["status".into(), txid, "--coordinator".into(), direct, "--json".into()]).await
        }
    };
    poll(SETTLE, "the coordinator to commit", || async {
        let run = status(txid.clone()).await;
        (run.code == 0 && run.json()["outcome"] == "committed").then_some(())
    })
    .await
    .unwrap();
    info!("--- the client's link is cut: it never heard the outcome");
    cluster.link(Link::Client).set(Fault::Cut);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!commit.is_finished(), "the client cannot have heard an answer");

    info!("--- healed: the SDK's Commit asks the outcome; decree status tells it too; the value is there");
    cluster.heal_all();
    let told = commit.await.unwrap().expect("the SDK asks until it knows");
    assert_eq!(told.outcome, Outcome::Committed, "{}", told.reason);
    let run = decree_async(vec!["status".into(), txid.clone(), "--coordinator".into(), direct.clone()]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("committed"), "{}", run.stdout);
    let values = cluster.client().await.unwrap().get(&["cut-key".into()]).await.unwrap();
    assert_eq!(values["cut-key"].as_deref(), Some(&b"v"[..]));
}

/// An interactive transaction's branch holds a key at p1 (active, not
/// prepared); the coordinator's link to p1 is cut when the client aborts, so
/// its first Abort is lost. An active branch never asks for its outcome, so
/// only a resent Abort frees the key before the participant's idle timeout
/// (here far longer than the test): once healed, the key is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_lost_to_a_cut_link_is_sent_again_and_frees_an_active_branch() {
    init();
    let metrics = common::metrics_address();
    let mut options = Options::new(2);
    options.faults = true;
    options.coordinator_args = common::quick_options().coordinator_args;
    options
        .coordinator_args
        .extend(["--idle-timeout-ms", "600000", "--metrics-listen", &metrics].map(String::from));
    options.participant_args = ["--idle-timeout-ms", "600000"].map(String::from).to_vec();
    let cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let key = client.key_at(&names[0], "abort-").unwrap();
    let mut tx = client.begin().await.unwrap();
    tx.put(&key, "1").await.unwrap();
    let txid = tx.txid().to_string();
    // p1's lock table, asked on its own port, around the proxies.
    let p1 = [cluster.url_of(NodeId::Participant(0))];
    let holds = || async {
        let (tables, _) = decree_client::locks_at_urls(&p1).await.unwrap();
        tables.iter().flat_map(|t| &t.locks).any(|l| l.key == key && l.holder == txid)
    };
    assert!(holds().await, "the work locked the key");

    info!("--- the coordinator's link to p1 is cut; the client aborts");
    cluster.link(Link::ToParticipant(0)).set(Fault::Cut);
    tokio::time::timeout(SETTLE, tx.abort()).await.unwrap().unwrap();
    let resent = || async { metric(&scrape(&metrics).await, "decree_aborts_resent_total") };
    poll(SETTLE, "the Abort lost twice and sent again", || async { (resent().await >= 2.0).then_some(()) })
        .await
        .unwrap();
    assert!(holds().await, "no Abort reached p1 through the cut");

    info!("--- healed: the Abort sent again reaches p1, which lets the key go");
    cluster.heal_all();
    check::unlocked(&client, &names[..1], std::slice::from_ref(&key)).await.unwrap();
}
