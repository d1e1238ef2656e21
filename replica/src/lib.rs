//! The decision log of a coordinator group, replicated by Raft.
//!
//! A coordinator keeps its durable state in a [`Storage`]: its identity and
//! incarnation, COMMIT decisions, ended outcomes, the ring. This crate makes
//! that state replicated: [`Replicated`] is a `Storage` whose writes are
//! entries of a Raft log, run by openraft (not a consensus algorithm written
//! here), and whose reads are of the local replica's state machine. A write
//! returns only once a majority of the group holds it (their logs are
//! synced, [`log_store`]) and this replica applied it, so a coordinator over
//! it decides nothing a majority does not hold.
//!
//! - [`log_store`]: the Raft log and vote, over a `Storage` (RocksDB in the
//!   servers, memory in tests); entries and votes are synced before openraft
//!   is told they are durable;
//! - [`state_machine`]: applies the replicated write batches to the data
//!   `Storage`, with the last applied log id in the same batch; snapshots;
//! - [`network`]: the `decree.v1.Replica` gRPC service between replicas;
//! - [`Replica`]: one member of a group (start, bootstrap, leadership).
//!
//! Keys: the replicated data keeps its own keys (below `0xfd`); the state
//! machine's own record is at `0xfd…`, the Raft log and vote at `0xfe…`, so
//! one RocksDB holds all of it.

// openraft's storage traits return its `StorageError` (large); the helpers here return what they return.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use decree_runtime::log::{Durability, LogStats};
use decree_runtime::{LogError, Storage, Write};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod testing;

/// A replica's id in its group.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft types of a coordinator group.
    pub TypeConfig:
        D = Batch,
        R = (),
        NodeId = NodeId,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// One replicated write batch: what a [`Storage::write`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub writes: Vec<Change>,
}

/// One change of a [`Batch`], as [`Write`] but serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
    SingleDelete { key: Vec<u8> },
    DeleteRange { from: Vec<u8>, to: Vec<u8> },
}

impl From<&Write> for Change {
    fn from(write: &Write) -> Change {
        match write {
            Write::Put { key, value } => Change::Put { key: key.clone(), value: value.clone() },
            Write::Delete { key } => Change::Delete { key: key.clone() },
            Write::SingleDelete { key } => Change::SingleDelete { key: key.clone() },
            Write::DeleteRange { from, to } => Change::DeleteRange { from: from.clone(), to: to.clone() },
        }
    }
}

impl From<Change> for Write {
    fn from(change: Change) -> Write {
        match change {
            Change::Put { key, value } => Write::Put { key, value },
            Change::Delete { key } => Write::Delete { key },
            Change::SingleDelete { key } => Write::SingleDelete { key },
            Change::DeleteRange { from, to } => Write::DeleteRange { from, to },
        }
    }
}

/// Why a replica could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(#[from] LogError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("invalid group: {0}")]
    Invalid(String),
}

/// How a group elects and keeps a leader.
#[derive(Debug, Clone)]
pub struct Timing {
    pub heartbeat: Duration,
    /// Elections start after a random time in `[election_min, election_max]` without a leader.
    pub election_min: Duration,
    pub election_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
        }
    }
}

/// One member of a coordinator group: its Raft node, the gRPC server other
/// replicas reach it by, and its replicated storage.
pub struct Replica<S: Storage> {
    pub id: NodeId,
    pub raft: Raft,
    storage: Replicated<S>,
    server: tokio::task::JoinHandle<()>,
}

impl<S: Storage> Replica<S> {
    /// Starts replica `id` over `store` (its log, vote and data), serving the
    /// other replicas on `listener`. A replica that was part of a group
    /// before finds its log and vote in `store` and rejoins.
    pub async fn start(
        id: NodeId,
        store: S,
        listener: TcpListener,
        timing: &Timing,
    ) -> Result<Replica<S>, ReplicaError> {
        let config = openraft::Config {
            cluster_name: "decree".into(),
            heartbeat_interval: timing.heartbeat.as_millis() as u64,
            election_timeout_min: timing.election_min.as_millis() as u64,
            election_timeout_max: timing.election_max.as_millis() as u64,
            ..openraft::Config::default()
        };
        let config = Arc::new(config.validate().map_err(|e| ReplicaError::Invalid(e.to_string()))?);
        let log = log_store::LogStore::open(store.clone())?;
        let machine = state_machine::StateMachine::new(store.clone());
        let raft = Raft::new(id, config, network::Network, log, machine)
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?;
        let server = network::serve(raft.clone(), listener);
        let storage = Replicated { raft: raft.clone(), data: store };
        Ok(Replica { id, raft, storage, server })
    }

    /// Makes this replica and `members` (id and address of each, this one
    /// included) a new group. Done once, on one replica; refused where a
    /// group exists already.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, String>) -> Result<(), ReplicaError> {
        if !members.contains_key(&self.id) {
            return Err(ReplicaError::Invalid(format!(
                "the members do not include this replica ({})",
                self.id
            )));
        }
        let nodes: BTreeMap<NodeId, BasicNode> =
            members.into_iter().map(|(id, addr)| (id, BasicNode::new(addr))).collect();
        self.raft.initialize(nodes).await.map_err(|e| ReplicaError::Raft(e.to_string()))
    }

    /// The leader this replica knows of, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Waits until some replica is known as leader here, for at most `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ReplicaError> {
        let metrics = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?;
        metrics.current_leader.ok_or_else(|| ReplicaError::Raft("no leader".into()))
    }

    /// The replicated storage: writes go through the group (only the leader's succeed).
    pub fn storage(&self) -> Replicated<S> {
        self.storage.clone()
    }

    /// Confirms with a majority that this replica is still the leader, and
    /// that its state machine has applied everything committed before: what
    /// it reads next is linearizable (read index), never a deposed leader's.
    pub async fn ensure_linearizable(&self) -> Result<(), ReplicaError> {
        self.raft.ensure_linearizable().await.map(drop).map_err(|e| ReplicaError::Raft(e.to_string()))
    }

    /// Stops this replica (its Raft node and its server).
    pub async fn shutdown(self) {
        let _ = self.raft.shutdown().await;
        self.server.abort();
    }
}

/// A [`Storage`] whose writes are replicated through the group's Raft log
/// and whose reads are of this replica's applied state.
#[derive(Clone)]
pub struct Replicated<S> {
    raft: Raft,
    data: S,
}

impl<S: Storage> Storage for Replicated<S> {
    /// Every write is durable at a majority when this returns, whatever
    /// `durability` asks: a replicated write has no weaker kind.
    fn write_with(
        &self,
        writes: Vec<Write>,
        _durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        let raft = self.raft.clone();
        let batch = Batch { writes: writes.iter().map(Change::from).collect() };
        async move { raft.client_write(batch).await.map(drop).map_err(|e| LogError::Replication(e.to_string())) }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        self.data.get(key)
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<decree_runtime::log::Entries, LogError> {
        self.data.scan_range(from, to)
    }

    fn compact(&self, from: &[u8], to: &[u8]) {
        self.data.compact(from, to);
    }

    fn stats(&self) -> &LogStats {
        self.data.stats()
    }
}
