//! A group of replicas over memory on one machine, for tests (this crate's
//! and the coordinator's): start, find the leader, stop and restart members.

use std::collections::BTreeMap;
use std::time::Duration;

use decree_runtime::{MemLog, Storage};
use tokio::net::TcpListener;

use crate::{NodeId, Replica, Timing};

/// How long a test waits for a leader, a bind or an apply.
pub const WAIT: Duration = Duration::from_secs(10);

/// Elections in a few hundred milliseconds.
pub fn fast() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(50),
        election_min: Duration::from_millis(200),
        election_max: Duration::from_millis(400),
    }
}

/// One member: its replica while it runs, its store (which outlives it) and its address.
pub struct Node {
    pub replica: Option<Replica<MemLog>>,
    pub store: MemLog,
    pub addr: String,
}

pub struct Group {
    pub nodes: BTreeMap<NodeId, Node>,
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

async fn node(id: NodeId, store: MemLog, addr: &str) -> Node {
    let listener = bind(addr).await;
    let addr = listener.local_addr().expect("bound").to_string();
    let replica = Replica::start(id, store.clone(), listener, &fast()).await.expect("a replica starts");
    Node { replica: Some(replica), store, addr }
}

impl Group {
    /// `n` replicas, bootstrapped as one group by the first.
    pub async fn start(n: NodeId) -> Group {
        let group = Group::unformed(n).await;
        group.replica(1).bootstrap(group.members()).await.expect("bootstrap");
        group
    }

    /// `n` replicas running, not yet a group.
    pub async fn unformed(n: NodeId) -> Group {
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(id, node(id, MemLog::new(), "127.0.0.1:0").await);
        }
        Group { nodes }
    }

    /// Every member's id and address.
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        self.nodes.iter().map(|(id, n)| (*id, n.addr.clone())).collect()
    }

    /// Replica `id`, which must run.
    pub fn replica(&self, id: NodeId) -> &Replica<MemLog> {
        self.nodes[&id].replica.as_ref().expect("running")
    }

    /// The leader, once a running replica is one (a stale view may name a stopped one).
    pub async fn leader(&self) -> NodeId {
        let any = self.nodes.values().find_map(|n| n.replica.as_ref()).expect("one runs");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let id = any.wait_for_leader(WAIT).await.expect("a leader");
            let runs = |n: &Node| n.replica.as_ref().is_some_and(|r| r.leader() == Some(id));
            if self.nodes.get(&id).is_some_and(runs) {
                return id;
            }
            assert!(tokio::time::Instant::now() < deadline, "no running leader within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops replica `id` (its store stays).
    pub async fn stop(&mut self, id: NodeId) {
        if let Some(replica) = self.nodes.get_mut(&id).and_then(|n| n.replica.take()) {
            replica.shutdown().await;
        }
    }

    /// Starts replica `id` again, on `store`, at its address.
    pub async fn restart(&mut self, id: NodeId, store: MemLog) {
        let addr = self.nodes[&id].addr.clone();
        self.nodes.insert(id, node(id, store, &addr).await);
    }

    pub async fn shutdown(mut self) {
        for id in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.stop(id).await;
        }
    }
}

/// Polls until `store` holds `key` = `value` (a follower applies after the leader).
pub async fn until_applied(store: &MemLog, key: &[u8], value: &[u8]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.get(key).expect("memory").as_deref() != Some(value) {
        assert!(tokio::time::Instant::now() < deadline, "{key:?} never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
