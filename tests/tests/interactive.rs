//! Interactive transactions against a real cluster: Begin, reads and writes at
//! the participants under the txid, Commit or Abort; wait-die between
//! interactive transactions; the lock table as `decree locks` shows it; and
//! read-modify-write bank transfers that keep the sum and never go negative.

mod common;

use std::time::Duration;

use common::init;
use decree_client::{Client, ClientError, KvOp, Outcome, Reason};
use decree_tests::{Cluster, NodeId, Options};
use tracing::info;

/// Guards against a hang; never reached when things work.
const HANG: Duration = Duration::from_secs(30);

fn options(lock_wait_ms: u64) -> Options {
    let mut options = Options::new(3);
    options.participant_args = vec!["--lock-wait-ms".into(), lock_wait_ms.to_string()];
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_own_writes_and_commit_or_abort_applies_all_or_nothing() {
    init();
    let cluster = Cluster::start(options(100)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let mut owners = vec![client.route("a").unwrap(), client.route("b").unwrap()];
    owners.sort();
    owners.dedup();
    let mut tx = client.begin().await.unwrap();
    assert_eq!(tx.get("a").await.unwrap(), None);
    tx.put("a", "1").await.unwrap();
    tx.add("b", 5).await.unwrap();
    tx.add("b", 2).await.unwrap();
    assert_eq!(tx.get("a").await.unwrap(), Some(b"1".to_vec()), "a transaction reads its own writes");
    assert_eq!(tx.get_i64("b").await.unwrap(), 7);
    let result = tx.commit().await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    assert_eq!(result.participants, owners, "the owners of a and b");
    let values = client.get(&["a".into(), "b".into()]).await.unwrap();
    assert_eq!(values["a"], Some(b"1".to_vec()));
    assert_eq!(values["b"], Some(b"7".to_vec()));

    info!("--- an aborted transaction leaves nothing behind and releases its locks");
    let mut tx = client.begin().await.unwrap();
    tx.put("a", "2").await.unwrap();
    tx.put("hot", "x").await.unwrap();
    tx.abort().await.unwrap();
    let values = client.get(&["a".into(), "hot".into()]).await.unwrap();
    assert_eq!((values["a"].clone(), values["hot"].clone()), (Some(b"1".to_vec()), None));
    let mut tx = client.begin().await.unwrap();
    tx.put("a", "3").await.unwrap();
    assert_eq!(tx.commit().await.unwrap().outcome, Outcome::Committed);

    info!("--- a failing op is refused and changes nothing; the transaction goes on");
    let mut tx = client.begin().await.unwrap();
    tx.put("a", "not a number").await.unwrap();
    assert!(
        matches!(tx.add("a", 1).await, Err(ClientError::Status(s)) if s.code() == tonic::Code::FailedPrecondition)
    );
    assert_eq!(tx.get("a").await.unwrap(), Some(b"not a number".to_vec()));
    assert_eq!(tx.commit().await.unwrap().outcome, Outcome::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_transaction_survives_a_coordinator_restart_and_commits_whole() {
    init();
    let mut cluster = Cluster::start(options(100)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let key = |p: usize| client.key_at(&names[p], "restart-").unwrap();
    let mut tx = client.begin().await.unwrap();
    tx.put(&key(0), "1").await.unwrap();
    tx.add(&key(1), 5).await.unwrap();
    cluster.kill(NodeId::Coordinator);
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    // The restarted coordinator knows the transaction and both branches;
    // work after the restart enlists a third participant with it.
    tx.add(&key(1), 2).await.unwrap();
    tx.put(&key(2), "3").await.unwrap();
    let result = tx.commit().await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    let values = client.get(&[key(0), key(1), key(2)]).await.unwrap();
    assert_eq!(values[&key(0)], Some(b"1".to_vec()));
    assert_eq!(values[&key(1)], Some(b"7".to_vec()), "work before and after the restart");
    assert_eq!(values[&key(2)], Some(b"3".to_vec()));
    assert!(cluster.log_of(NodeId::Coordinator).contains("an interactive transaction is active again"));
}

/// An Abort sent while the coordinator is down is sent again until the
/// restarted coordinator takes it, and the branches let go of their keys:
/// they are not held until an idle timeout (here far longer than the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_sent_while_the_coordinator_restarts_reaches_it_and_frees_the_keys() {
    init();
    let mut options = options(100);
    options.coordinator_args = vec!["--idle-timeout-ms".into(), "600000".into()];
    let mut cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names = cluster.participant_names();
    let keys: Vec<String> = (0..2).map(|p| client.key_at(&names[p], "abort-").unwrap()).collect();
    let mut tx = client.begin().await.unwrap();
    tx.put(&keys[0], "1").await.unwrap();
    tx.put(&keys[1], "1").await.unwrap();
    cluster.kill(NodeId::Coordinator);
    let abort = tokio::spawn(tx.abort());
    cluster.restart(NodeId::Coordinator).unwrap();
    cluster.wait_back(NodeId::Coordinator).await.unwrap();
    tokio::time::timeout(HANG, abort).await.unwrap().unwrap().unwrap();
    let ops: Vec<KvOp> = keys.iter().map(|k| KvOp::Put { key: k.clone(), value: b"2".to_vec() }).collect();
    let freed = decree_tests::poll(HANG, "the aborted transaction's keys to be free", || async {
        let result = client.transact(ops.clone()).await.ok()?;
        (result.outcome == Outcome::Committed).then_some(())
    })
    .await;
    freed.unwrap();
    let values = client.get(&keys).await.unwrap();
    assert!(values.values().all(|v| v.as_deref() == Some(&b"2"[..])), "{values:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_transactions_that_would_deadlock_end_one_committed_one_aborted() {
    init();
    // A long wait bound: the outcome must come from wait-die, not from a timeout.
    let cluster = Cluster::start(options(10_000)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let mut older = client.begin().await.unwrap();
    let mut younger = client.begin().await.unwrap();
    older.put("a", "older").await.unwrap();
    younger.put("b", "younger").await.unwrap();

    info!("--- the older one asks for b (the younger's): it waits");
    let waiting = tokio::spawn(async move {
        let read = older.get("b").await;
        (older, read)
    });
    // Make sure it is waiting: the lock table shows it among b's waiters.
    let locks = decree_tests::poll(HANG, "the older transaction to wait for b", || async {
        let (tables, _) = client.locks().await;
        let waiting_for_b =
            tables.iter().flat_map(|t| &t.locks).any(|l| l.key == "b" && !l.waiters.is_empty());
        waiting_for_b.then_some(tables)
    })
    .await
    .unwrap();
    let b = locks.iter().flat_map(|t| &t.locks).find(|l| l.key == "b").unwrap();
    assert_eq!((b.holder.as_str(), b.state.as_str()), (younger.txid(), "active"));

    info!("--- the younger one asks for a (the older's): it dies at once, and the older goes on");
    let died = tokio::time::timeout(HANG, younger.get("a")).await.unwrap();
    match died {
        Err(ClientError::Aborted { code, reason, .. }) => assert_eq!(code, Reason::LockConflict, "{reason}"),
        other => panic!("the younger transaction should have died: {other:?}"),
    }
    let (older, read) = tokio::time::timeout(HANG, waiting).await.unwrap().unwrap();
    assert_eq!(read.unwrap(), None, "the younger one's write to b was dropped");
    let result = older.commit().await.unwrap();
    assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    let values = client.get(&["a".into(), "b".into()]).await.unwrap();
    assert_eq!((values["a"].clone(), values["b"].clone()), (Some(b"older".to_vec()), None));
    let (tables, _) = client.locks().await;
    assert!(tables.iter().all(|t| t.locks.is_empty()), "no lock left: {tables:?}");
    assert!(tables.iter().map(|t| t.waits).sum::<u64>() >= 1);
    assert!(tables.iter().map(|t| t.conflicts).sum::<u64>() >= 1);
}

/// One interactive transfer: read both balances, refuse to go negative, write both.
/// Returns whether it committed.
async fn transfer(client: &Client, from: &str, to: &str, amount: i64) -> Result<bool, ClientError> {
    let mut tx = client.begin().await?;
    let balance = match tx.get_i64(from).await {
        Ok(balance) => balance,
        Err(ClientError::Aborted { .. }) => return Ok(false),
        Err(err) => return Err(err),
    };
    if balance < amount {
        tx.abort().await?;
        return Ok(false);
    }
    let steps = async {
        let to_balance = tx.get_i64(to).await?;
        tx.put(from, (balance - amount).to_string()).await?;
        tx.put(to, (to_balance + amount).to_string()).await
    };
    match steps.await {
        Ok(()) => Ok(tx.commit().await?.outcome == Outcome::Committed),
        Err(ClientError::Aborted { .. }) => Ok(false),
        Err(err) => Err(err),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_bank_transfers_keep_the_sum_and_never_go_negative() {
    init();
    const ACCOUNTS: usize = 6;
    const START: i64 = 50;
    let cluster = Cluster::start(options(200)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("acct-{i}")).collect();
    let seed =
        names.iter().map(|n| decree_client::KvOp::Put { key: n.clone(), value: START.to_string().into() });
    assert_eq!(client.transact(seed.collect()).await.unwrap().outcome, Outcome::Committed);

    let workers = (0..4u64).map(|w| {
        let (client, names) = (client.clone(), names.clone());
        tokio::spawn(async move {
            let mut committed = 0;
            for i in 0..40u64 {
                let from = &names[((w * 7 + i * 3) % ACCOUNTS as u64) as usize];
                let to = &names[((w * 5 + i * 11 + 1) % ACCOUNTS as u64) as usize];
                if from == to {
                    continue;
                }
                // Big amounts, so that some transfers would go negative and are refused.
                let amount = 10 + ((w + i) % 5) as i64 * 10;
                if transfer(&client, from, to, amount).await.unwrap() {
                    committed += 1;
                }
            }
            committed
        })
    });
    let mut committed = 0;
    for worker in workers {
        committed += tokio::time::timeout(Duration::from_secs(120), worker).await.unwrap().unwrap();
    }
    info!(committed, "interactive transfers committed");
    assert!(committed > 0);
    let values = client.get(&names).await.unwrap();
    let balances: Vec<i64> =
        values.values().map(|v| String::from_utf8_lossy(v.as_deref().unwrap()).parse().unwrap()).collect();
    assert_eq!(balances.iter().sum::<i64>(), START * ACCOUNTS as i64, "money created or lost: {balances:?}");
    assert!(balances.iter().all(|b| *b >= 0), "a balance went negative: {balances:?}");
}

/// Work done at a participant, then a restart of it, then more work there:
/// the restarted run must not take the later work as the whole branch (the
/// first run's is gone), or the transaction would commit half of its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_work_after_a_participant_restart_is_refused_and_nothing_of_the_transaction_commits() {
    init();
    let mut cluster = Cluster::start(options(100)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let owner = client.route("b").unwrap();
    let also = (0..10_000).map(|i| format!("b{i}")).find(|k| client.route(k).unwrap() == owner).unwrap();
    let mut tx = client.begin().await.unwrap();
    tx.put("b", "1").await.unwrap();
    let p = cluster.participant(&owner);
    cluster.kill(p);
    cluster.restart(p).unwrap();
    cluster.wait_back(p).await.unwrap();
    let later = tx.put(&also, "1").await;
    let err =
        later.expect_err("the restarted participant took more work of a transaction whose work it lost");
    assert!(err.to_string().contains("another run"), "{err}");
    let result = tx.commit().await;
    assert!(
        !matches!(result, Ok(ref r) if r.outcome == Outcome::Committed),
        "committed without its first work: {result:?}"
    );
    let values = client.get(&["b".into(), also.clone()]).await.unwrap();
    assert_eq!((values["b"].as_deref(), values[&also].as_deref()), (None, None), "nothing of it committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decree_locks_lists_holders_and_a_participant_restart_loses_unprepared_work() {
    init();
    let mut cluster = Cluster::start(options(100)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let mut tx = client.begin().await.unwrap();
    tx.put("b", "1").await.unwrap();
    let run = common::decree_async(
        ["locks", "--json", "--coordinator", &cluster.coordinator_url()].map(String::from).to_vec(),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let tables = run.json();
    let owner = client.route("b").unwrap();
    let table = tables.as_array().unwrap().iter().find(|t| t["participant"] == owner.as_str()).unwrap();
    assert_eq!(table["locks"][0]["key"], "b");
    assert_eq!(table["locks"][0]["holder"], tx.txid());
    assert_eq!(table["locks"][0]["state"], "active");

    info!("--- the owner of b restarts: its unprepared work is gone, so the transaction cannot commit");
    let p2 = cluster.participant(&owner);
    cluster.kill(p2);
    cluster.restart(p2).unwrap();
    cluster.wait_back(p2).await.unwrap();
    let result = tx.commit().await.unwrap();
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.code, Reason::WorkLost, "{}", result.reason);
    assert_eq!(client.get(&["b".into()]).await.unwrap()["b"], None);
}
