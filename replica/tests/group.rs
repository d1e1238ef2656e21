//! A group of three replicas on one machine: a write through the leader is
//! at every replica, a follower refuses writes, the loss of the leader elects
//! another that holds everything committed, a replica that restarts on its
//! store finds its log and vote again, a machine crash loses nothing a replica
//! acknowledged, a replica whose log lost a tail it had applied starts and
//! follows on, and two replicas down of three stop every write without
//! changing anything.

use std::time::Duration;

use decree_replica::testing::{until_applied, Group};
use decree_runtime::{Storage, Write};

fn put(key: &str) -> Vec<Write> {
    vec![Write::put(key.as_bytes().to_vec(), b"1".to_vec())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_leader_is_at_every_replica_and_a_follower_refuses_writes() {
    let group = Group::start(3).await;
    let id = group.leader().await;
    let storage = group.replica(id).storage();
    storage.write(put("d/1"), true).await.unwrap();
    assert_eq!(storage.get(b"d/1").unwrap().as_deref(), Some(&b"1"[..]), "read your write");
    for node in group.nodes.values() {
        until_applied(&node.store, b"d/1", b"1").await;
    }
    let follower = group.nodes.keys().copied().find(|f| *f != id).unwrap();
    let refused = group.replica(follower).storage().write(put("x"), true).await;
    let err = refused.expect_err("a follower cannot decide");
    assert!(err.to_string().contains("forward") || err.to_string().contains("leader"), "{err}");
    assert_eq!(group.nodes[&follower].store.get(b"x").unwrap(), None, "nothing changed");
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_leader_elects_one_that_holds_everything_committed() {
    let mut group = Group::start(3).await;
    let first = group.leader().await;
    for i in 0..20 {
        group.replica(first).storage().write(put(&format!("d/{i}")), true).await.unwrap();
    }
    group.stop(first).await;
    let second = group.leader().await;
    assert_ne!(second, first);
    // A new leader has every committed entry in its log, but may not have applied the
    // last ones yet: a read is linearizable only after the read index is confirmed.
    group.replica(second).ensure_linearizable().await.unwrap();
    let storage = group.replica(second).storage();
    for i in 0..20 {
        assert_eq!(
            storage.get(format!("d/{i}").as_bytes()).unwrap().as_deref(),
            Some(&b"1"[..]),
            "d/{i} lost"
        );
    }
    storage.write(put("d/after"), true).await.unwrap();
    // The old leader restarts on its store: it finds its log and vote, and catches up.
    let store = group.nodes[&first].store.clone();
    group.restart(first, store.clone()).await;
    until_applied(&store, b"d/after", b"1").await;
    until_applied(&store, b"d/19", b"1").await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_crash_of_the_leader_loses_no_entry_it_acknowledged() {
    use decree_replica::log_store::LogStore;
    use openraft::{EntryPayload, RaftLogReader};
    let mut group = Group::start(3).await;
    let id = group.leader().await;
    for i in 0..10 {
        group.replica(id).storage().write(put(&format!("d/{i}")), true).await.unwrap();
    }
    group.stop(id).await;
    // Everything not synced is gone: the state machine's unsynced applies, never the log's entries.
    let crashed = group.nodes[&id].store.crash_machine(0);
    let mut log = LogStore::open(crashed.clone()).unwrap();
    let entries = log.try_get_log_entries(..).await.unwrap();
    let batches = entries.iter().filter(|e| matches!(e.payload, EntryPayload::Normal(_))).count();
    assert_eq!(batches, 10, "every acknowledged write is in the crashed leader's log");
    // Restarted on what survived, it applies them again and catches up.
    group.restart(id, crashed.clone()).await;
    until_applied(&crashed, b"d/9", b"1").await;
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_down_of_three_stop_every_write_and_change_nothing() {
    let mut group = Group::start(3).await;
    let id = group.leader().await;
    group.replica(id).storage().write(put("d/1"), true).await.unwrap();
    for other in group.nodes.keys().copied().filter(|o| *o != id).collect::<Vec<_>>() {
        group.stop(other).await;
    }
    let storage = group.replica(id).storage();
    let write = storage.write(put("d/2"), true);
    // Without a majority the write cannot commit: it does not return (or fails), and is not applied.
    let outcome = tokio::time::timeout(Duration::from_secs(2), write).await;
    assert!(!matches!(outcome, Ok(Ok(()))), "a lone replica committed a write");
    assert_eq!(group.nodes[&id].store.get(b"d/2").unwrap(), None, "nothing applied without a majority");
    let confirmed =
        tokio::time::timeout(Duration::from_secs(2), group.replica(id).ensure_linearizable()).await;
    assert!(!matches!(confirmed, Ok(Ok(()))), "a lone replica confirmed that it leads");
    group.shutdown().await;
}

/// A leader applies an entry a majority of followers holds, at once, perhaps
/// before its own append of it is synced (the apply does not queue behind the
/// log's appends): a machine crash can then keep the applied id and lose the
/// log's tail. Such a replica starts (the entries up to the applied id are
/// committed at the others), keeps what it applied and follows on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_log_lost_entries_it_had_applied_starts_and_follows_on() {
    use decree_replica::log_store::LogStore;
    use openraft::RaftLogReader;
    let mut group = Group::start(3).await;
    let first = group.leader().await;
    for i in 0..10 {
        group.replica(first).storage().write(put(&format!("d/{i}")), true).await.unwrap();
    }
    let store = group.nodes[&first].store.clone();
    group.stop(first).await;
    // Its log loses its last three entries; its state machine keeps them applied.
    let entries = LogStore::open(store.clone()).unwrap().try_get_log_entries(..).await.unwrap();
    let last = entries.last().expect("entries").log_id.index;
    let key = |index: u64| [b"\xferaft/log/".as_slice(), &index.to_be_bytes()].concat();
    store.write(vec![Write::delete_range(key(last - 2), key(last + 1))], true).await.unwrap();
    let left = LogStore::open(store.clone()).unwrap().try_get_log_entries(..).await.unwrap();
    assert_eq!(left.last().map(|e| e.log_id.index), Some(last - 3), "the tail is gone");
    let second = group.leader().await;
    group.replica(second).storage().write(put("d/after"), true).await.unwrap();
    group.restart(first, store.clone()).await;
    until_applied(&store, b"d/after", b"1").await;
    for i in 0..10 {
        assert_eq!(
            store.get(format!("d/{i}").as_bytes()).unwrap().as_deref(),
            Some(b"1".as_slice()),
            "d/{i}"
        );
    }
    group.shutdown().await;
}
