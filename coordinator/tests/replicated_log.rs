//! The coordinator's decision log over a replicated store (three replicas):
//! what the replicated coordinator will stand on. A leader's decisions
//! survive its loss; the next leader opens the log with the same coordinator
//! id and a higher incarnation (so txids stay unique across leaders) and
//! finds every unfinished decision to redrive; the stopped leader can no
//! longer write a decision.

use decree_coordinator::store::{DecisionLog, Recorded};
use decree_proto::{ParticipantName, TxId};
use decree_replica::testing::Group;

fn p(name: &str) -> ParticipantName {
    name.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_survive_the_leader_and_the_next_one_recovers_them_under_a_new_incarnation() {
    let mut group = Group::start(3).await;
    let first = group.leader().await;
    group.replica(first).ensure_linearizable().await.unwrap();
    let (store, recovered) = DecisionLog::open_on(group.replica(first).storage()).await.unwrap();
    let (id, incarnation) = (recovered.coordinator_id, recovered.incarnation);
    let (unfinished, ended) = (TxId::new(id, incarnation, 1), TxId::new(id, incarnation, 2));
    store.log_decision(unfinished, &[p("a"), p("b")]).await.unwrap();
    store.log_decision(ended, &[p("a")]).await.unwrap();
    store.log_end(ended).await.unwrap();

    group.stop(first).await;
    let second = group.leader().await;
    assert_ne!(second, first);
    group.replica(second).ensure_linearizable().await.unwrap();
    let (next, recovered) = DecisionLog::open_on(group.replica(second).storage()).await.unwrap();
    assert_eq!(recovered.coordinator_id, id, "one coordinator id for the group");
    assert!(recovered.incarnation > incarnation, "the new leader's txids are new");
    assert_eq!(recovered.unfinished, vec![(unfinished, vec![p("a"), p("b")])], "redriven by the new leader");
    assert_eq!(next.recorded(ended).unwrap(), Recorded::Committed);
    assert_eq!(
        next.recorded(TxId::new(id, incarnation, 3)).unwrap(),
        Recorded::Absent,
        "never decided: aborted"
    );

    // The stopped leader's handle decides nothing any more (a live leader without a majority
    // cannot either: decree-replica's two_replicas_down_of_three_stop_every_write_and_change_nothing).
    let late = TxId::new(id, incarnation, 4);
    let deposed =
        tokio::time::timeout(std::time::Duration::from_secs(2), store.log_decision(late, &[p("a")])).await;
    assert!(!matches!(deposed, Ok(Ok(()))), "a stopped leader wrote a decision");
    assert_eq!(next.recorded(late).unwrap(), Recorded::Absent);
    group.shutdown().await;
}
