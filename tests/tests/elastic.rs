//! Elastic membership with real processes: the ring grows 3 -> 4 -> 5 and
//! shrinks 5 -> 4 -> 3 under a bank workload with markers, while the
//! coordinator is SIGKILLed mid-migration and crashes at
//! `migration.batch.after_decision`, and a migrating participant crashes at
//! `migration.out.after_fence`. Checked: the money is conserved, every
//! transfer is all-or-nothing, no read of a marker once seen ever misses, and
//! at the end every key lives at exactly the owner the final ring names (read
//! from the participants' disks). Refused ring changes exit 2 and change nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{decree, init};
use decree_client::{Client, KvOp, Outcome, RingChange, Routing};
use decree_tests::{Cluster, NodeId, Options};
use rand::Rng;

const ACCOUNTS: usize = 64;
const BALANCE: i64 = 1_000;

fn account(i: usize) -> String {
    format!("acct-{i}")
}

fn marker(tag: u64) -> String {
    format!("m/{tag}")
}

/// What the workload did: markers of committed transfers, txids whose outcome
/// was not known, and misses the reader saw.
#[derive(Default)]
struct Ledger {
    committed: BTreeSet<u64>,
    aborted: BTreeSet<u64>,
    unknown: BTreeMap<u64, String>,
    misses: Vec<String>,
}

/// A transfer between two accounts with a marker, one-shot or interactive.
async fn transfer(client: &Client, tag: u64, interactive: bool) -> Result<(Outcome, String), String> {
    let (from, to, amount) = {
        let mut rng = rand::rng();
        let from = rng.random_range(0..ACCOUNTS);
        let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
        (from, to, rng.random_range(1..10))
    };
    if interactive {
        let mut tx = client.begin().await.map_err(|e| e.to_string())?;
        let txid = tx.txid().to_owned();
        let work = async {
            tx.add(&account(from), -amount).await?;
            tx.add(&account(to), amount).await?;
            tx.put(&marker(tag), tag.to_string()).await
        };
        if let Err(err) = work.await {
            return match err {
                decree_client::ClientError::Aborted { .. } => Ok((Outcome::Aborted, txid)),
                other => {
                    let _ = tx.abort().await;
                    Err(other.to_string())
                }
            };
        }
        return match tx.commit().await {
            Ok(result) => Ok((result.outcome, result.txid)),
            Err(err) => Err(format!("{txid} {err}")),
        };
    }
    let ops = vec![
        KvOp::Add { key: account(from), delta: -amount },
        KvOp::Add { key: account(to), delta: amount },
        KvOp::Put { key: marker(tag), value: tag.to_string().into_bytes() },
    ];
    match client.transact(ops).await {
        Ok(result) => Ok((result.outcome, result.txid)),
        Err(err) => Err(match err.unknown_txid() {
            Some(txid) => format!("{txid} {err}"),
            None => err.to_string(),
        }),
    }
}

/// Runs transfers until `stop`; a reader reads back every marker it has seen
/// and records any that is missing.
fn workload(
    url: String,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for writer in 0..3 {
        let (url, stop, ledger, next) = (url.clone(), stop.clone(), ledger.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&url).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let tag = next.fetch_add(1, Ordering::Relaxed);
                let answer = transfer(&client, tag, writer == 0).await;
                let failed = answer.is_err();
                {
                    let mut ledger = ledger.lock().unwrap();
                    match answer {
                        Ok((Outcome::Committed, _)) => {
                            ledger.committed.insert(tag);
                        }
                        Ok((Outcome::Aborted, _)) => {
                            ledger.aborted.insert(tag);
                        }
                        Ok((outcome, txid)) => panic!("{txid}: unexpected outcome {outcome:?}"),
                        // The coordinator was away, or the outcome is not known yet: settled at the end.
                        Err(why) => {
                            ledger.unknown.insert(tag, why);
                        }
                    }
                }
                if failed {
                    // The coordinator is away: wait until it answers again rather than spin.
                    coordinator_answers(&client).await;
                }
            }
        }));
    }
    let (stop_reading, ledger_read) = (stop.clone(), ledger.clone());
    tasks.push(tokio::spawn(async move {
        let client = Client::connect(&url).await.unwrap();
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        while !stop_reading.load(Ordering::Relaxed) {
            let committed: Vec<u64> = ledger_read.lock().unwrap().committed.iter().copied().collect();
            // New committed markers become "seen" once read back (their phase two may still be on its way).
            let fresh: Vec<String> =
                committed.iter().filter(|t| !seen.contains(t)).map(|t| marker(*t)).collect();
            let sample: Vec<u64> = {
                let mut rng = rand::rng();
                seen.iter().copied().filter(|_| rng.random_bool(0.2)).take(200).collect()
            };
            let keys: Vec<String> = fresh.iter().cloned().chain(sample.iter().map(|t| marker(*t))).collect();
            if keys.is_empty() {
                // Nothing to read back yet: wait until a transfer commits (or the test stops),
                // rather than a busy loop that starves the workload.
                let known = committed.len();
                let _ = decree_tests::poll(Duration::from_secs(60), "a transfer to read back", || async {
                    let more = ledger_read.lock().unwrap().committed.len() > known;
                    (more || stop_reading.load(Ordering::Relaxed)).then_some(())
                })
                .await;
                continue;
            }
            let Ok(values) = client.get(&keys).await else {
                coordinator_answers(&client).await;
                continue;
            };
            for tag in &sample {
                if values.get(&marker(*tag)).cloned().flatten().is_none() {
                    ledger_read
                        .lock()
                        .unwrap()
                        .misses
                        .push(format!("marker {tag} seen before, then missing"));
                }
            }
            for key in fresh {
                if values.get(&key).cloned().flatten().is_some() {
                    seen.insert(key[2..].parse().unwrap());
                }
            }
        }
    }));
    tasks
}

/// Returns once the workload has committed `n` more transfers (it runs between ring changes).
async fn more_committed(ledger: &Mutex<Ledger>, n: usize) {
    let from = ledger.lock().unwrap().committed.len();
    let ran =
        decree_tests::poll(Duration::from_secs(60), "the workload to commit more transfers", || async {
            (ledger.lock().unwrap().committed.len() >= from + n).then_some(())
        })
        .await;
    ran.unwrap();
}

/// Returns once the coordinator answers (it may be restarting), within 30 s.
async fn coordinator_answers(client: &Client) {
    let answered = decree_tests::poll(Duration::from_secs(30), "the coordinator to answer", || async {
        client.ring_status().await.ok().map(drop)
    })
    .await;
    answered.unwrap();
}

async fn ring_of(cluster: &Cluster) -> Routing {
    let client = cluster.client().await.unwrap();
    Routing::from_wire(client.ring_status().await.unwrap().routing.as_ref().unwrap())
}

/// Waits until the migration in progress has moved some keys, and is not done.
async fn until_migrating(cluster: &Cluster) {
    decree_tests::poll(Duration::from_secs(120), "a migration in progress with keys moved", || async {
        let client = cluster.client().await.ok()?;
        let ring = client.ring_status().await.ok()?;
        ring.migration.filter(|m| m.moved_keys > 0).map(|_| ())
    })
    .await
    .unwrap();
}

fn names(of: &[&str]) -> Vec<String> {
    of.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ring_grows_and_shrinks_under_load_with_crashes_and_no_read_misses() {
    init();
    let mut options = Options::new(5);
    options.join_first = Some(3);
    // Small batches: each migration takes many transactions, so crashes land inside one.
    options.coordinator_args = vec!["--migration-batch-keys".into(), "16".into()];
    let mut cluster = Cluster::start(options).await.unwrap();
    let url = cluster.coordinator_url();
    let client = cluster.client().await.unwrap();
    let accounts: Vec<KvOp> = (0..ACCOUNTS)
        .map(|i| KvOp::Put { key: account(i), value: BALANCE.to_string().into_bytes() })
        .collect();
    assert_eq!(client.transact(accounts).await.unwrap().outcome, Outcome::Committed);

    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let tasks = workload(url.clone(), stop.clone(), ledger.clone());
    more_committed(&ledger, 1000).await;

    // 3 -> 4, plainly.
    client.change_ring(RingChange::Add { name: "p4".into(), weight: 1 }).await.unwrap();
    cluster.wait_ring(&names(&["p1", "p2", "p3", "p4"]), Duration::from_secs(120)).await.unwrap();
    more_committed(&ledger, 400).await;

    // 4 -> 5: the coordinator crashes once its first batch is decided, before recording it.
    cluster.restart_armed(NodeId::Coordinator, "migration.batch.after_decision").await.unwrap();
    let client = cluster.client().await.unwrap();
    client.change_ring(RingChange::Add { name: "p5".into(), weight: 1 }).await.unwrap();
    let status = cluster.wait_exit(NodeId::Coordinator, Duration::from_secs(30)).await.unwrap();
    assert!(!status.success(), "the coordinator crashed at the armed point");
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    cluster.wait_ring(&names(&["p1", "p2", "p3", "p4", "p5"]), Duration::from_secs(120)).await.unwrap();
    more_committed(&ledger, 400).await;

    // 5 -> 4: p5, draining, crashes with its first batch's fence up, and comes back.
    let p5 = cluster.participant("p5");
    cluster.restart_armed(p5, "migration.out.after_fence").await.unwrap();
    let client = cluster.client().await.unwrap();
    client.change_ring(RingChange::Remove { name: "p5".into() }).await.unwrap();
    let status = cluster.wait_exit(p5, Duration::from_secs(30)).await.unwrap();
    assert!(!status.success(), "p5 crashed at the armed point");
    cluster.restart(p5).unwrap();
    cluster.wait_back(p5).await.unwrap();
    cluster.wait_ring(&names(&["p1", "p2", "p3", "p4"]), Duration::from_secs(120)).await.unwrap();
    more_committed(&ledger, 400).await;

    // 4 -> 3: kill -9 of the coordinator while keys move.
    client.change_ring(RingChange::Remove { name: "p4".into() }).await.unwrap();
    until_migrating(&cluster).await;
    cluster.kill(NodeId::Coordinator);
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    cluster.wait_ring(&names(&["p1", "p2", "p3"]), Duration::from_secs(120)).await.unwrap();
    more_committed(&ledger, 400).await;

    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    cluster.wait_settled(Duration::from_secs(120)).await.unwrap();

    let client = cluster.client().await.unwrap();
    let mut ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(ledger.misses.is_empty(), "reads missed committed keys: {:?}", ledger.misses);
    // Unknown outcomes are settled by the coordinator's answer, where it has a txid.
    // Without a txid (the coordinator died with the request on its stream) it may have gone
    // either way: the money check below still holds it to all-or-nothing.
    let mut either = 0;
    for (tag, why) in std::mem::take(&mut ledger.unknown) {
        let txid = why.split_whitespace().next().filter(|t| t.parse::<decree_client::TxId>().is_ok());
        match txid {
            Some(txid) => match client.status(txid).await.unwrap() {
                Outcome::Committed => ledger.committed.insert(tag),
                _ => ledger.aborted.insert(tag),
            },
            None => {
                either += 1;
                true
            }
        };
    }
    tracing::info!(
        committed = ledger.committed.len(),
        aborted = ledger.aborted.len(),
        either,
        "--- the workload's transfers"
    );
    assert!(ledger.committed.len() > 50, "the workload ran: {} committed", ledger.committed.len());
    let every_marker: Vec<String> =
        ledger.committed.iter().chain(&ledger.aborted).map(|t| marker(*t)).collect();
    let values = client.get(&every_marker).await.unwrap();
    for tag in &ledger.committed {
        assert!(values[&marker(*tag)].is_some(), "committed transfer {tag} lost its marker");
    }
    for tag in &ledger.aborted {
        assert!(values[&marker(*tag)].is_none(), "aborted transfer {tag} left its marker");
    }
    let balances = client.get(&(0..ACCOUNTS).map(account).collect::<Vec<_>>()).await.unwrap();
    let sum: i64 =
        balances.values().map(|v| String::from_utf8_lossy(v.as_ref().unwrap()).parse::<i64>().unwrap()).sum();
    assert_eq!(sum, ACCOUNTS as i64 * BALANCE, "money was created or lost");

    // Every key at exactly the owner the final ring names, on disk.
    let ring = ring_of(&cluster).await;
    assert!(ring.migration.is_none());
    for i in 0..5 {
        cluster.terminate(NodeId::Participant(i));
    }
    let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in ["p1", "p2", "p3", "p4", "p5"] {
        let id = cluster.participant(name);
        cluster.wait_exit(id, Duration::from_secs(20)).await.unwrap();
        let log = decree_runtime::Log::open(&cluster.dir().join(name)).unwrap();
        for (key, _) in decree_runtime::Storage::scan_prefix(&log, b"k/").unwrap() {
            held.entry(String::from_utf8(key[2..].to_vec()).unwrap()).or_default().push(name.to_owned());
        }
    }
    assert!(held.len() >= ACCOUNTS + ledger.committed.len());
    for (key, owners) in &held {
        assert_eq!(owners, &vec![ring.route(key).unwrap().to_owned()], "{key} is held by {owners:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_ring_changes_exit_2_and_change_nothing() {
    init();
    let mut options = Options::new(3);
    options.join_first = Some(1);
    options.participant_args_for = vec![("p3".into(), vec!["--role".into(), "service".into()])];
    let mut cluster = Cluster::start(options).await.unwrap();
    let url = cluster.coordinator_url();
    let before = ring_of(&cluster).await;
    assert_eq!(before.current.names(), ["p1"]);
    let refused = |args: &[&str], why: &str| {
        let mut all = vec!["ring"];
        all.extend_from_slice(args);
        all.extend(["--coordinator", &url]);
        let run = decree(&all);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(why), "{args:?}: {:?} does not say {why:?}", run.stderr);
    };
    refused(&["remove", "p1"], "last member");
    refused(&["remove", "p9"], "not in the ring");
    refused(&["add", "p9"], "not enrolled");
    refused(&["add", "p3"], "is a service");
    refused(&["add", "p1"], "in the ring already");
    refused(&["add", "p2", "--weight", "0"], "--weight");
    refused(&["weight", "p1", "65"], "between 1 and 64");
    refused(&["add", "bad name!"], "invalid participant name");
    cluster.kill(cluster.participant("p2"));
    decree_tests::poll(Duration::from_secs(20), "p2 to be down", || async {
        let listed = Client::connect(&url).await.ok()?.participants().await.ok()?;
        listed.iter().any(|p| p.name == "p2" && p.state == "down").then_some(())
    })
    .await
    .unwrap();
    refused(&["add", "p2"], "is down");
    assert_eq!(ring_of(&cluster).await, before, "refused changes changed nothing");

    // The participant list tells roles and shares.
    let listed = decree(&["participants", "--json", "--coordinator", &url]).json();
    let roles: Vec<(String, String, bool)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().into(),
                p["role"].as_str().unwrap().into(),
                p["in_ring"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        vec![
            ("p1".into(), "member".into(), true),
            ("p2".into(), "member".into(), false),
            ("p3".into(), "service".into(), false)
        ]
    );
    // A service never gets routed keys: every key routes to p1.
    let run =
        decree(&["txn", "--put", "a=1", "--put", "b=2", "--put", "c=3", "--json", "--coordinator", &url]);
    assert_eq!(run.json()["participants"], serde_json::json!(["p1"]));
}
