//! A group of three replicas on one machine: a write through the leader is
//! at every replica, a follower refuses writes, the loss of the leader elects
//! another that holds everything committed, a replica that restarts on its
//! store finds its log and vote again, a machine crash loses nothing a replica
//! acknowledged, a replica whose log lost a tail it had applied starts and
//! follows on, two replicas down of three stop every write without
//! changing anything, a replica whose store was wiped takes no part until it
//! is removed and added back, and a bootstrap whose peer list disagrees with
//! the replicas is refused.

use std::time::Duration;

use decree_replica::testing::{until_applied, Group};
use decree_runtime::{MemLog, Storage, Write};

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
async fn write_then_calls_back_once_per_write_in_call_order_once_committed_and_a_follower_refuses() {
    let group = Group::start(3).await;
    let id = group.leader().await;
    let storage = group.replica(id).storage();
    let (calls, mut heard) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..200 {
        let calls = calls.clone();
        let key = format!("t/{i:03}");
        let check = storage.clone();
        storage.write_then(put(&key), decree_runtime::Durability::Buffered, move |written| {
            // Committed and applied when called: the write reads back here.
            let applied = check.get(key.as_bytes()).unwrap().is_some();
            let _ = calls.send((i, written.is_ok(), applied));
        });
    }
    for expected in 0..200 {
        let (i, ok, applied) =
            tokio::time::timeout(Duration::from_secs(10), heard.recv()).await.unwrap().unwrap();
        assert_eq!((i, ok, applied), (expected, true, true), "called once each, in call order");
    }
    for node in group.nodes.values() {
        until_applied(&node.store, b"t/199", b"1").await;
    }
    let follower = group.nodes.keys().copied().find(|f| *f != id).unwrap();
    let (refused, answer) = tokio::sync::oneshot::channel();
    group.replica(follower).storage().write_then(
        put("y"),
        decree_runtime::Durability::Synced,
        move |written| {
            let _ = refused.send(written.is_err());
        },
    );
    assert!(answer.await.unwrap(), "a follower cannot decide: the callback hears an error");
    assert_eq!(group.nodes[&follower].store.get(b"y").unwrap(), None, "nothing changed");
    drop(calls);
    assert!(heard.recv().await.is_none(), "no call twice");
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

/// A wiped replica that rejoined under its old id would have forgotten its
/// vote and the entries it acknowledged: with a replica that lacks those
/// entries it would make a majority that elects a leader without them, and a
/// committed write would be lost. The group admitted each replica with the
/// identity of its store, and a wiped one refuses the group's messages (votes
/// included) until it is removed and added back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_rejoining_under_its_old_id_takes_no_part_and_nothing_committed_is_lost() {
    let mut group = Group::start(3).await;
    let leader = group.leader().await;
    let mut others = group.nodes.keys().copied().filter(|o| *o != leader);
    let (behind, wiped) = (others.next().unwrap(), others.next().unwrap());
    // Every replica holds the group's membership and d/0.
    group.replica(leader).storage().write(put("d/0"), true).await.unwrap();
    for node in group.nodes.values() {
        until_applied(&node.store, b"d/0", b"1").await;
    }
    // `behind` is down while d/1 commits: the leader and `wiped` hold it.
    group.stop(behind).await;
    group.replica(leader).storage().write(put("d/1"), true).await.unwrap();
    // `wiped` comes back on an empty store under its id, and the leader is lost.
    group.stop(wiped).await;
    group.restart(wiped, MemLog::new()).await;
    group.stop(leader).await;
    let store = group.nodes[&behind].store.clone();
    group.restart(behind, store).await;
    assert_eq!(group.nodes[&behind].store.get(b"d/1").unwrap(), None, "behind lacks d/1");
    // `behind` could lead only with the wiped replica's vote: refused, so no
    // leader in several election timeouts (200-400 ms each here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in [behind, wiped] {
        assert_eq!(group.replica(id).leader(), None, "replica {id} knows of a leader elected without d/1");
    }
    assert!(
        !group.replica(wiped).is_initialized().await.unwrap(),
        "the wiped replica took the group's messages"
    );
    // The old leader returns: the group leads again, with d/1.
    let store = group.nodes[&leader].store.clone();
    group.restart(leader, store).await;
    // Its return may take an election or two (`behind` campaigned meanwhile, in later terms).
    let deadline = tokio::time::Instant::now() + decree_replica::testing::WAIT;
    let now = loop {
        let now = group.leader().await;
        assert_ne!(now, wiped);
        if group.replica(now).storage().write(put("d/2"), true).await.is_ok() {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader took a write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for id in [leader, behind] {
        until_applied(&group.nodes[&id].store, b"d/1", b"1").await;
        until_applied(&group.nodes[&id].store, b"d/2", b"1").await;
    }
    assert_eq!(group.nodes[&wiped].store.get(b"d/1").unwrap(), None, "the wiped replica stays out");
    // Removed and added back (admitted with its new identity), it catches up and votes.
    group.replica(now).remove(wiped).await.unwrap();
    let addr = group.nodes[&wiped].addr.clone();
    group.replica(now).add(wiped, addr).await.unwrap();
    until_applied(&group.nodes[&wiped].store, b"d/2", b"1").await;
    until_applied(&group.nodes[&wiped].store, b"d/1", b"1").await;
    let members = group.replica(now).status().members;
    assert!(members.iter().all(|m| m.voter), "{members:?}");
    let admitted = members.iter().find(|m| m.id == wiped).unwrap().identity;
    assert_eq!(admitted, group.replica(wiped).identity, "admitted with its new identity");
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_whose_peer_list_disagrees_with_the_replicas_is_refused_and_changes_nothing() {
    let group = Group::unformed(3).await;
    let mut members = group.members();
    // Replica 2's address is given as replica 3's, and the other way round.
    let (two, three) = (members[&2].clone(), members[&3].clone());
    members.insert(2, three);
    members.insert(3, two);
    let err = group.replica(1).bootstrap(members).await.unwrap_err().to_string();
    assert!(err.contains("is replica 3, not replica 2"), "{err}");
    for id in 1..=3 {
        assert!(!group.replica(id).is_initialized().await.unwrap(), "replica {id} joined a group");
    }
    // With the right list the same replicas form a group.
    group.replica(1).bootstrap(group.members()).await.unwrap();
    group.leader().await;
    // A second bootstrap, from a member of the group: refused.
    let err = group.replica(1).bootstrap(group.members()).await.unwrap_err().to_string();
    assert!(err.contains("part of a group already"), "{err}");
    group.shutdown().await;
}
