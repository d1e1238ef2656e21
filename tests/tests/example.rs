//! The inventory example (participant/examples/inventory.rs), a service built
//! on the participant library, in a transaction with the KV participant: an
//! order reserves stock there and books revenue at the KV store, both or
//! neither; through a kill -9 and a crash point, the stock stays exact.

mod common;

use std::time::Duration;

use common::init;
use decree_client::{kv_payload, v1, Client, KvOp, Outcome, Reason, TxnResult};
use decree_tests::{built_program, Cluster, NodeId, Options};
use tracing::info;

const INVENTORY: NodeId = NodeId::Participant(1);

/// An order: reserve `quantity` widgets at p2 (inventory), book the revenue at p1 (KV).
async fn order(client: &Client, quantity: u64) -> TxnResult {
    let branches = vec![
        v1::Branch {
            participant: "p1".into(),
            payload: kv_payload(vec![KvOp::Add { key: "revenue".into(), delta: 10 * quantity as i64 }]),
        },
        v1::Branch { participant: "p2".into(), payload: format!("reserve widget {quantity}\n").into_bytes() },
    ];
    client.transact_branches(branches).await.unwrap()
}

async fn revenue(client: &Client) -> Option<Vec<u8>> {
    client.get_at("p1", vec!["revenue".into()]).await.unwrap().pop().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_reserve_stock_and_book_revenue_together_through_crashes() {
    init();
    let mut options = Options::new(2);
    options.participant_args =
        ["--in-doubt-after-ms", "300", "--heartbeat-ms", "200"].map(String::from).to_vec();
    options.coordinator_args =
        ["--commit-timeout-ms", "500", "--redelivery-cap-ms", "300"].map(String::from).to_vec();
    options.participant_program_for = vec![("p2".into(), built_program("examples/inventory"))];
    options.participant_args_for = vec![("p2".into(), vec!["--stock".into(), "widget=10".into()])];
    let mut cluster = Cluster::start(options).await.unwrap();
    let client = cluster.client().await.unwrap();

    for _ in 0..3 {
        let result = order(&client, 3).await;
        assert_eq!(result.outcome, Outcome::Committed, "{}", result.reason);
    }
    info!("--- 1 widget left: an order of 3 is refused by the inventory, and no revenue is booked");
    let result = order(&client, 3).await;
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.code, Reason::ValidationFailed, "{}", result.reason);
    assert_eq!(result.reason, "participant p2 voted NO: only 1 widget left, 3 wanted");
    assert_eq!(revenue(&client).await, Some(b"90".to_vec()));

    info!("--- kill -9 the inventory and restart it on its data: the stock is durable");
    cluster.kill(INVENTORY);
    cluster.restart(INVENTORY).unwrap();
    cluster.wait_back(INVENTORY).await.unwrap();
    assert_eq!(order(&client, 2).await.outcome, Outcome::Aborted, "still only 1 left");

    info!("--- the inventory dies at participant.commit.before_apply; after restart the commit applies once");
    cluster.restart_armed(INVENTORY, "participant.commit.before_apply").await.unwrap();
    let result = order(&client, 1).await;
    assert_eq!(result.outcome, Outcome::Committed, "the decision was durable before the crash");
    cluster.wait_exit(INVENTORY, Duration::from_secs(20)).await.unwrap();
    assert!(cluster.log_of(INVENTORY).contains("crash point participant.commit.before_apply reached"));
    cluster.restart(INVENTORY).unwrap();
    cluster.wait_settled(Duration::from_secs(30)).await.unwrap();
    let result = order(&client, 1).await;
    assert_eq!(result.outcome, Outcome::Aborted, "the last widget was reserved exactly once");
    assert_eq!(result.code, Reason::ValidationFailed, "{}", result.reason);
    assert_eq!(result.reason, "participant p2 voted NO: only 0 widget left, 1 wanted");
    assert_eq!(revenue(&client).await, Some(b"100".to_vec()));
}
