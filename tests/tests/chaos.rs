//! The seeded chaos test: concurrent marked transfers across 3 participants
//! while a randomized schedule SIGKILLs and restarts the coordinator and the
//! participants at random instants. Prints its seed; replay with DECREE_SEED=.
//!
//! At the end: the sum of balances is unchanged (I5), every transfer is at all
//! of its participants or at none (I1), every transfer the client was told
//! committed is present and every one told aborted is absent (I2), nothing is
//! in doubt and no lock is held (I6).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_client::Reason;
use decree_tests::{check, Cluster, Fault, NodeId, Options};
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tracing::info;

/// How long the chaos lasts.
const CHAOS: Duration = Duration::from_secs(25);
const CLIENTS: usize = 4;
/// Accounts the transfers spread over (each at every participant).
const ACCOUNTS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_atomic_under_random_kills() {
    chaos(1, Disruption::Kills).await;
}

/// The same against a coordinator group of three: the victims are its
/// replicas (the leader half the time) and the participants, one at a time;
/// one disruption in four instead cuts a replica (the leader half the time)
/// off from the other two for 0.2-2 s, its Raft messages lost both ways
/// (`DECREE_PARTITION_FILE`) while clients and participants still reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_atomic_under_random_kills_of_a_coordinator_group() {
    chaos(3, Disruption::Kills).await;
}

/// Network chaos: every link (coordinator to each participant, each
/// participant to the coordinator, the clients to the coordinator) behind a
/// fault proxy; random faults (cut, blackhole, delay, one way lost) on random
/// links for random spells, nothing killed. After healing, the same
/// invariants, and every process still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_atomic_under_random_network_faults() {
    chaos(1, Disruption::Network).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disruption {
    Kills,
    Network,
}

/// A random fault for a link.
fn random_fault(rng: &mut impl Rng) -> Fault {
    let delay = Duration::from_millis(rng.random_range(20..400));
    match rng.random_range(0..6) {
        0 => Fault::Cut,
        1 => Fault::Blackhole,
        2 => Fault::Delay(delay),
        3 => Fault::DelayAnswers(delay),
        4 => Fault::DropAnswers,
        _ => Fault::DropRequests,
    }
}

async fn chaos(coordinators: usize, disruption: Disruption) {
    common::init();
    let seed: u64 =
        std::env::var("DECREE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("chaos seed: {seed} (replay with DECREE_SEED={seed})");
    info!(seed, "chaos seed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut options = Options::new(3);
    options.coordinators = coordinators;
    options.coordinator_args =
        ["--prepare-timeout-ms", "1000", "--commit-timeout-ms", "500", "--redelivery-cap-ms", "300"]
            .map(String::from)
            .to_vec();
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--heartbeat-ms", "200"].map(String::from).to_vec();
    // The same keys go to several participants by name: KV stores as named services.
    options.services = true;
    options.faults = disruption == Disruption::Network;
    // A group's replica is cut off from the others while its file exists.
    let cuts_dir = tempfile::tempdir().unwrap();
    let cut_file = |replica: usize| cuts_dir.path().join(format!("c{}.partitioned", replica + 1));
    if coordinators > 1 {
        options.env_for = (0..coordinators)
            .map(|r| {
                (format!("c{}", r + 1), "DECREE_PARTITION_FILE".to_owned(), cut_file(r).display().to_string())
            })
            .collect();
    }
    let cluster = Cluster::start(options).await.unwrap();
    let url =
        if disruption == Disruption::Network { cluster.proxied_url() } else { cluster.coordinator_url() };
    let names = cluster.participant_names();
    let cluster = Arc::new(Mutex::new(cluster));
    let stop = Arc::new(AtomicBool::new(false));

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, names, stop) = (url.clone(), names.clone(), stop.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(c as u64 + 1));
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut client = None;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        // The coordinator may be down (killed): wait until it accepts again.
                        let connected =
                            decree_tests::poll(Duration::from_secs(30), "the coordinator", || {
                                let url = url.clone();
                                async move { decree_client::Client::connect(&url).await.ok() }
                            })
                            .await;
                        client = connected.ok();
                        continue;
                    }
                    let Some(connected) = &client else { continue };
                    // Two or three participants, in a random order.
                    let mut chosen = names.clone();
                    let keep = rng.random_range(2..=names.len());
                    for j in (1..chosen.len()).rev() {
                        chosen.swap(j, rng.random_range(0..=j));
                    }
                    chosen.truncate(keep);
                    let tag = format!("c{c}-{i}");
                    i += 1;
                    let answer = connected
                        .transact_branches(check::marked_transfer(
                            &tag,
                            &chosen,
                            rng.random_range(0..ACCOUNTS),
                            rng.random_range(1..50),
                        ))
                        .await;
                    // A participant or the coordinator is down: back off a little
                    // instead of spinning on fast failures.
                    let down = match &answer {
                        Ok(result) => result.code == Reason::ParticipantUnreachable,
                        Err(_) => true,
                    };
                    let told = answer.ok().map(|r| r.outcome);
                    if told.is_none() {
                        client = None;
                    }
                    results.push((tag, chosen, told));
                    if down {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                results
            })
        })
        .collect();

    info!("--- chaos for {CHAOS:?}");
    let started = Instant::now();
    let mut kills = 0;
    let mut cuts = 0;
    // The sleeps below are the fault schedule under test (when the next fault
    // comes, how long it lasts), random by the seed; nothing waits on them.
    while disruption == Disruption::Network && started.elapsed() < CHAOS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        let links = cluster.lock().await.links();
        let link = links[rng.random_range(0..links.len())];
        let fault = random_fault(&mut rng);
        info!(?link, ?fault, "network fault");
        cluster.lock().await.link(link).set(fault);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        cluster.lock().await.link(link).heal();
    }
    while disruption == Disruption::Kills && started.elapsed() < CHAOS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
        if coordinators > 1 && rng.random_bool(0.25) {
            let replica = if rng.random_bool(0.5) {
                match cluster.lock().await.leader(Duration::from_secs(30)).await.unwrap() {
                    NodeId::Replica(r) => r,
                    other => unreachable!("a group's leader is a replica, not {other:?}"),
                }
            } else {
                rng.random_range(0..coordinators)
            };
            let spell = Duration::from_millis(rng.random_range(200..2000));
            info!(replica, ?spell, "cutting a replica off from the others");
            std::fs::write(cut_file(replica), b"").unwrap();
            cuts += 1;
            tokio::time::sleep(spell).await;
            std::fs::remove_file(cut_file(replica)).unwrap();
            continue;
        }
        let victim = match rng.random_range(0..=names.len()) {
            0 if coordinators == 1 => NodeId::Coordinator,
            // The leader half the time, else a replica at random.
            0 if rng.random_bool(0.5) => cluster.lock().await.leader(Duration::from_secs(30)).await.unwrap(),
            0 => NodeId::Replica(rng.random_range(0..coordinators)),
            i => NodeId::Participant(i - 1),
        };
        info!(?victim, "SIGKILL");
        cluster.lock().await.kill(victim);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        cluster.lock().await.restart(victim).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for client in clients {
        results.extend(client.await.unwrap());
    }

    info!("--- everything back; waiting until nothing is in doubt");
    let mut cluster = cluster.lock().await;
    cluster.heal_all();
    for node in std::iter::once(NodeId::Coordinator).chain((0..names.len()).map(NodeId::Participant)) {
        if disruption == Disruption::Network {
            assert!(cluster.is_running(node), "seed {seed}: {node:?} stopped under network faults");
        }
    }
    cluster.wait_enrolled(Duration::from_secs(30)).await.unwrap();
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let (committed, aborted, unknown) =
        check::told_agrees(&client, &results).await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    info!(kills, cuts, committed, aborted, unknown, "chaos done");
    println!(
        "chaos ({coordinators} coordinator replicas, {disruption:?}): {kills} kills or faults, {cuts} replicas cut off, {committed} committed, {aborted} aborted, {unknown} unknown to the client"
    );
    assert!(committed > 0, "seed {seed}: nothing committed at all");
    assert_eq!(
        check::balance_sum(&client, &names, ACCOUNTS).await.unwrap(),
        0,
        "seed {seed}: money created or lost"
    );
    check::unlocked(&client, &names, &(0..ACCOUNTS).map(check::balance_key).collect::<Vec<_>>())
        .await
        .unwrap();
}
