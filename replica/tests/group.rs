//! A group of three replicas on one machine: a write through the leader is
//! at every replica, a follower refuses writes, the loss of the leader elects
//! another that holds everything committed, a replica that restarts on its
//! store finds its log and vote again, and two replicas down of three stop
//! every write without changing anything.

use std::collections::BTreeMap;
use std::time::Duration;

use decree_replica::{Replica, Timing};
use decree_runtime::{MemLog, Storage, Write};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

fn fast() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(200),
        election_max: Duration::from_millis(400),
    }
}

struct Node {
    replica: Option<Replica<MemLog>>,
    store: MemLog,
    addr: String,
}

async fn start(id: u64, store: MemLog, addr: Option<String>) -> Node {
    let listener = bind(addr.as_deref().unwrap_or("127.0.0.1:0")).await;
    let addr = listener.local_addr().unwrap().to_string();
    let replica = Replica::start(id, store.clone(), listener, &fast()).await.unwrap();
    Node { replica: Some(replica), store, addr }
}

/// Binds `addr`; a replica restarting on its address waits for its stopped server to let go of it.
async fn bind(addr: &str) -> TcpListener {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(err) if tokio::time::Instant::now() > deadline => panic!("bind {addr}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn group() -> BTreeMap<u64, Node> {
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, start(id, MemLog::new(), None).await);
    }
    let members = nodes.iter().map(|(id, n)| (*id, n.addr.clone())).collect();
    nodes[&1].replica.as_ref().unwrap().bootstrap(members).await.unwrap();
    nodes
}

fn replica(nodes: &BTreeMap<u64, Node>, id: u64) -> &Replica<MemLog> {
    nodes[&id].replica.as_ref().expect("running")
}

async fn leader(nodes: &BTreeMap<u64, Node>) -> u64 {
    let any = nodes.values().find_map(|n| n.replica.as_ref()).expect("one runs");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let id = any.wait_for_leader(WAIT).await.unwrap();
        // The leader must be one that runs (a stale view may name a stopped one).
        if nodes.get(&id).is_some_and(|n| n.replica.as_ref().is_some_and(|r| r.leader() == Some(id))) {
            return id;
        }
        assert!(tokio::time::Instant::now() < deadline, "no running leader within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `store` holds `key` = `value` (a follower applies after the leader).
async fn until_applied(store: &MemLog, key: &[u8], value: &[u8]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.get(key).unwrap().as_deref() != Some(value) {
        assert!(tokio::time::Instant::now() < deadline, "{key:?} never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_leader_is_at_every_replica_and_a_follower_refuses_writes() {
    let nodes = group().await;
    let id = leader(&nodes).await;
    let storage = replica(&nodes, id).storage();
    storage.write(vec![Write::put(b"d/1".to_vec(), b"commit".to_vec())], true).await.unwrap();
    assert_eq!(storage.get(b"d/1").unwrap().as_deref(), Some(&b"commit"[..]), "read your write");
    for node in nodes.values() {
        until_applied(&node.store, b"d/1", b"commit").await;
    }
    let follower = nodes.keys().copied().find(|f| *f != id).unwrap();
    let refused =
        replica(&nodes, follower).storage().write(vec![Write::put(b"x".to_vec(), b"y".to_vec())], true).await;
    let err = refused.expect_err("a follower cannot decide");
    assert!(err.to_string().contains("forward") || err.to_string().contains("leader"), "{err}");
    assert_eq!(nodes[&follower].store.get(b"x").unwrap(), None, "nothing changed");
    for (_, node) in nodes {
        node.replica.unwrap().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_one_that_holds_everything_committed() {
    let mut nodes = group().await;
    let first = leader(&nodes).await;
    for i in 0..20u32 {
        let key = format!("d/{i}").into_bytes();
        replica(&nodes, first).storage().write(vec![Write::put(key, b"1".to_vec())], true).await.unwrap();
    }
    nodes.get_mut(&first).unwrap().replica.take().unwrap().shutdown().await;
    let second = leader(&nodes).await;
    assert_ne!(second, first);
    // A new leader has every committed entry in its log, but may not have applied the
    // last ones yet: a read is linearizable only after the read index is confirmed.
    replica(&nodes, second).ensure_linearizable().await.unwrap();
    let storage = replica(&nodes, second).storage();
    for i in 0..20u32 {
        assert_eq!(
            storage.get(format!("d/{i}").as_bytes()).unwrap().as_deref(),
            Some(&b"1"[..]),
            "d/{i} lost"
        );
    }
    storage.write(vec![Write::put(b"d/after".to_vec(), b"1".to_vec())], true).await.unwrap();
    // The old leader restarts on its store: it finds its log and vote, and catches up.
    let (store, addr) = (nodes[&first].store.clone(), nodes[&first].addr.clone());
    nodes.insert(first, start(first, store.clone(), Some(addr)).await);
    until_applied(&store, b"d/after", b"1").await;
    until_applied(&store, b"d/19", b"1").await;
    for (_, node) in nodes {
        node.replica.unwrap().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_crash_of_the_leader_loses_no_entry_it_acknowledged() {
    use decree_replica::log_store::LogStore;
    use openraft::{EntryPayload, RaftLogReader};
    let mut nodes = group().await;
    let id = leader(&nodes).await;
    for i in 0..10u32 {
        let key = format!("d/{i}").into_bytes();
        replica(&nodes, id).storage().write(vec![Write::put(key, b"1".to_vec())], true).await.unwrap();
    }
    nodes.get_mut(&id).unwrap().replica.take().unwrap().shutdown().await;
    // Everything not synced is gone: the state machine's unsynced applies, never the log's entries.
    let crashed = nodes[&id].store.crash_machine(0);
    let mut log = LogStore::open(crashed.clone()).unwrap();
    let entries = log.try_get_log_entries(..).await.unwrap();
    let batches = entries.iter().filter(|e| matches!(e.payload, EntryPayload::Normal(_))).count();
    assert_eq!(batches, 10, "every acknowledged write is in the crashed leader's log");
    // Restarted on what survived, it applies them again and catches up.
    let addr = nodes[&id].addr.clone();
    nodes.insert(id, start(id, crashed.clone(), Some(addr)).await);
    until_applied(&crashed, b"d/9", b"1").await;
    for (_, node) in nodes {
        node.replica.unwrap().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_down_of_three_stop_every_write_and_change_nothing() {
    let mut nodes = group().await;
    let id = leader(&nodes).await;
    replica(&nodes, id)
        .storage()
        .write(vec![Write::put(b"d/1".to_vec(), b"1".to_vec())], true)
        .await
        .unwrap();
    let others: Vec<u64> = nodes.keys().copied().filter(|o| *o != id).collect();
    for other in &others {
        nodes.get_mut(other).unwrap().replica.take().unwrap().shutdown().await;
    }
    let storage = replica(&nodes, id).storage();
    let write = storage.write(vec![Write::put(b"d/2".to_vec(), b"1".to_vec())], true);
    // Without a majority the write cannot commit: it does not return (or fails), and is not applied.
    let outcome = tokio::time::timeout(Duration::from_secs(2), write).await;
    assert!(!matches!(outcome, Ok(Ok(()))), "a lone replica committed a write");
    assert_eq!(nodes[&id].store.get(b"d/2").unwrap(), None, "nothing applied without a majority");
    let confirmed =
        tokio::time::timeout(Duration::from_secs(2), replica(&nodes, id).ensure_linearizable()).await;
    assert!(!matches!(confirmed, Ok(Ok(()))), "a lone replica confirmed that it leads");
    for (_, node) in nodes {
        if let Some(replica) = node.replica {
            replica.shutdown().await;
        }
    }
}
