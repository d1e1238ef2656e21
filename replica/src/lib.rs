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
//! - [`network`]: the `decree.v1.Replica` gRPC service between replicas,
//!   each message addressed to the identity of the data directory the group
//!   admitted ([`Member`]: a wiped replica takes no part until re-added);
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

use decree_runtime::log::{Done, Durability, LogStats};
use decree_runtime::{LogError, Storage, Write};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub mod codec;
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
        Node = Member,
);

/// A member of the group as its membership records it: where it is reached,
/// and the identity of the data directory the group admitted it with.
///
/// Every Raft message to it names that identity, and a replica refuses
/// messages meant for another identity ([`network`]): a replica whose data
/// directory was wiped has a new identity, so it cannot vote again in a term
/// it already voted in, nor count towards a majority for entries it lost,
/// until it is removed and added back (admitted anew, with no vote to keep).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addr: String,
    /// 0: admitted before identities were recorded (not checked).
    #[serde(default)]
    pub identity: u64,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (identity {:016x})", self.addr, self.identity)
    }
}

pub type Raft = openraft::Raft<TypeConfig>;

/// One replicated write batch: what a [`Storage::write`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub writes: Vec<Change>,
}

/// One change of a [`Batch`], as [`Write`] but serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    SingleDelete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    DeleteRange {
        #[serde(with = "serde_bytes")]
        from: Vec<u8>,
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
    },
}

impl From<Write> for Change {
    fn from(write: Write) -> Change {
        match write {
            Write::Put { key, value } => Change::Put { key, value },
            Write::Delete { key } => Change::Delete { key },
            Write::SingleDelete { key } => Change::SingleDelete { key },
            Write::DeleteRange { from, to } => Change::DeleteRange { from, to },
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
    /// A membership change asked of a replica that does not lead the group.
    #[error("replica {id} is not the leader{}", leader_url.as_deref().map(|u| format!("; the leader is at {u}")).unwrap_or_default())]
    NotLeader { id: NodeId, leader_url: Option<String> },
}

/// Entries a replica may lag behind the leader and count as up to date.
const CAUGHT_UP: u64 = 100;

/// How long a replica being added has to catch up before it would vote.
const CATCH_UP: Duration = Duration::from_secs(30);

/// How long a bootstrap waits for every other member to answer who it is.
pub const BOOTSTRAP_WAIT: Duration = Duration::from_secs(60);

/// How long adding a replica waits for it to answer who it is.
const ADD_WAIT: Duration = Duration::from_secs(5);

/// Asks the replica listed as `id` at `address` who it is, again until it
/// answers or `wait` has passed; refused if it is another replica.
async fn identify(
    id: NodeId,
    address: &str,
    wait: Duration,
) -> Result<decree_proto::v1::ReplicaIdentity, ReplicaError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match network::identify(address).await {
            Ok(who) if who.replica_id == id => return Ok(who),
            Ok(who) => {
                return Err(ReplicaError::Invalid(format!(
                    "{address} is replica {}, not replica {id}: the replicas' peer lists disagree",
                    who.replica_id
                )))
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                return Err(ReplicaError::Invalid(status.message().to_owned()))
            }
            Err(status) if tokio::time::Instant::now() >= deadline => {
                return Err(ReplicaError::Invalid(format!(
                    "replica {id} at {address} did not say who it is within {wait:?} ({}): is it running, \
                     started with --replica-id {id}?",
                    status.message()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// How a group elects and keeps a leader.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The identity of its data directory ([`Member`], [`log_store::identity`]).
    pub identity: u64,
    pub raft: Raft,
    storage: Replicated<S>,
    /// Its own server, when [`Replica::start`] runs one (a coordinator
    /// serves [`Replica::service`] beside its other services instead).
    server: Option<tokio::task::JoinHandle<()>>,
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
        let mut replica = Replica::open(id, store, timing).await?;
        replica.server = Some(network::serve(replica.raft.clone(), id, replica.identity, listener));
        Ok(replica)
    }

    /// Opens replica `id` over `store` without a server of its own: the
    /// caller serves [`Replica::service`] for the other replicas to reach it.
    pub async fn open(id: NodeId, store: S, timing: &Timing) -> Result<Replica<S>, ReplicaError> {
        if id == 0 {
            return Err(ReplicaError::Invalid("replica ids start at 1".into()));
        }
        let config = openraft::Config {
            cluster_name: "decree".into(),
            heartbeat_interval: timing.heartbeat.as_millis() as u64,
            election_timeout_min: timing.election_min.as_millis() as u64,
            election_timeout_max: timing.election_max.as_millis() as u64,
            ..openraft::Config::default()
        };
        let config = Arc::new(config.validate().map_err(|e| ReplicaError::Invalid(e.to_string()))?);
        let identity = log_store::identity(&store).await?;
        let log = log_store::LogStore::open(store.clone())?;
        let machine = state_machine::StateMachine::new(store.clone());
        let raft = Raft::new(id, config, network::Network { id }, log, machine)
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?;
        let storage = Replicated::new(raft.clone(), store);
        Ok(Replica { id, identity, raft, storage, server: None })
    }

    /// The `decree.v1.Replica` service the other replicas send this one's Raft messages to.
    pub fn service(&self) -> network::Server {
        network::service(self.raft.clone(), self.id, self.identity)
    }

    /// Whether this replica is part of a group yet (bootstrapped, or has
    /// heard from a leader that added it).
    pub async fn is_initialized(&self) -> Result<bool, ReplicaError> {
        self.raft.is_initialized().await.map_err(|e| ReplicaError::Raft(e.to_string()))
    }

    /// Makes this replica and `members` (id and address of each, this one
    /// included) a new group. Done once, on one replica; refused where a
    /// group exists already.
    ///
    /// Every other member must run: each is asked who it is (for up to
    /// [`BOOTSTRAP_WAIT`], while they start), and the group records the
    /// identity of each one's data directory. Refused, with nothing changed,
    /// where an address reaches another replica than the one listed (the
    /// peer lists disagree) or a replica that is part of a group already.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, String>) -> Result<(), ReplicaError> {
        if !members.contains_key(&self.id) {
            return Err(ReplicaError::Invalid(format!(
                "the members do not include this replica ({})",
                self.id
            )));
        }
        if self.is_initialized().await? {
            return Err(ReplicaError::Invalid(format!(
                "replica {} is part of a group already (its data directory holds the group's log): \
                 a group is bootstrapped once",
                self.id
            )));
        }
        let mut nodes = BTreeMap::new();
        for (id, addr) in members {
            let identity = if id == self.id {
                self.identity
            } else {
                let who = identify(id, &addr, BOOTSTRAP_WAIT).await?;
                if who.initialized {
                    return Err(ReplicaError::Invalid(format!(
                        "replica {id} at {addr} is part of a group already: a group is bootstrapped once, on \
                         replicas that are not part of one"
                    )));
                }
                who.identity
            };
            nodes.insert(id, Member { addr, identity });
        }
        self.raft.initialize(nodes).await.map_err(|e| ReplicaError::Raft(e.to_string()))
    }

    /// Adds replica `id` at `address`: a learner until it has caught up,
    /// then a voter. Only the leader can; answered once the new membership
    /// is committed.
    pub async fn add(&self, id: NodeId, address: String) -> Result<(), ReplicaError> {
        if id == 0 {
            return Err(ReplicaError::Invalid("replica ids start at 1".into()));
        }
        let view = self.raft.metrics().borrow().membership_config.clone();
        let membership = view.membership();
        if let Some(node) = membership.get_node(&id) {
            if membership.voter_ids().any(|v| v == id) {
                return Err(ReplicaError::Invalid(format!(
                    "replica {id} is a member already (at {})",
                    node.addr
                )));
            }
        }
        if let Some((other, _)) = membership.nodes().find(|(other, n)| **other != id && n.addr == address) {
            return Err(ReplicaError::Invalid(format!("{address} is replica {other}'s address")));
        }
        self.leading()?;
        let identity = identify(id, &address, ADD_WAIT).await?.identity;
        let member = Member { addr: address.clone(), identity };
        if membership.get_node(&id).is_some() {
            // A learner already (an add that did not finish): openraft keeps
            // a learner's record on a second add, so it is replaced, with the
            // identity now at that address. A learner has no vote to lose.
            let nodes = [(id, member)].into_iter().collect();
            self.raft
                .change_membership(openraft::ChangeMembers::SetNodes(nodes), false)
                .await
                .map_err(|e| self.refused(e))?;
        } else {
            self.raft.add_learner(id, member, false).await.map_err(|e| self.refused(e))?;
        }
        // A voter that cannot keep up would stall every write: it votes once it has caught up.
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        while !self.caught_up(id) {
            if tokio::time::Instant::now() > deadline {
                return Err(ReplicaError::Invalid(format!(
                    "replica {id} at {address} has not caught up within {CATCH_UP:?} (is it running, with an \
                     empty data directory?); it stays a learner until removed"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let voters: std::collections::BTreeSet<NodeId> = [id].into();
        self.raft
            .change_membership(openraft::ChangeMembers::AddVoterIds(voters), false)
            .await
            .map_err(|e| self.refused(e))?;
        Ok(())
    }

    /// Removes replica `id` from the group. The last voter cannot be removed.
    pub async fn remove(&self, id: NodeId) -> Result<(), ReplicaError> {
        let view = self.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<NodeId> = view.membership().voter_ids().collect();
        let learner = view.membership().learner_ids().any(|l| l == id);
        if !voters.contains(&id) && !learner {
            return Err(ReplicaError::Invalid(format!(
                "replica {id} is not a member (members: {})",
                voters.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        if voters.len() == 1 && voters.contains(&id) {
            return Err(ReplicaError::Invalid(format!(
                "replica {id} is the last voter: a group cannot remove its last replica"
            )));
        }
        self.leading()?;
        // The new membership must have a majority that is up: else the change
        // (and every write after it) waits for replicas that are down.
        // Up: holds an entry written now, within a moment.
        let staying: Vec<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
        let probe = self
            .raft
            .client_write(Batch { writes: Vec::new() })
            .await
            .map_err(|e| ReplicaError::Raft(e.to_string()))?
            .log_id
            .index;
        let holds = |v: NodeId| {
            let metrics = self.raft.metrics().borrow().clone();
            v == self.id
                || metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&v).cloned())
                    .flatten()
                    .is_some_and(|m| m.index >= probe)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut up = staying.iter().filter(|v| holds(**v)).count();
        while up <= staying.len() / 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            up = staying.iter().filter(|v| holds(**v)).count();
        }
        if !learner && up <= staying.len() / 2 {
            return Err(ReplicaError::Invalid(format!(
                "removing replica {id} would leave voters {staying:?} of which only {up} are up to date: \
                 not a majority; bring the others back first"
            )));
        }
        let change = if learner {
            openraft::ChangeMembers::RemoveNodes([id].into())
        } else {
            openraft::ChangeMembers::RemoveVoters([id].into())
        };
        self.raft.change_membership(change, false).await.map_err(|e| self.refused(e))?;
        Ok(())
    }

    /// Refuses with the leader's URL unless this replica leads.
    fn leading(&self) -> Result<(), ReplicaError> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state == openraft::ServerState::Leader && metrics.current_leader == Some(self.id) {
            return Ok(());
        }
        Err(ReplicaError::NotLeader { id: self.id, leader_url: self.leader_url() })
    }

    /// Whether the leader (this replica) has replicated to `id` all but
    /// [`CAUGHT_UP`] entries of its log.
    fn caught_up(&self, id: NodeId) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let last = metrics.last_log_index.unwrap_or(0);
        let matched = metrics.replication.as_ref().and_then(|r| r.get(&id).cloned()).flatten();
        matched.is_some_and(|m| last.saturating_sub(m.index) <= CAUGHT_UP)
    }

    /// A membership change's error: a typed "not the leader" where it is one.
    fn refused(
        &self,
        err: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, Member>>,
    ) -> ReplicaError {
        use openraft::error::ClientWriteError;
        match err.api_error() {
            Some(ClientWriteError::ForwardToLeader(forward)) => ReplicaError::NotLeader {
                id: self.id,
                leader_url: forward.leader_node.as_ref().map(|n| url(&n.addr)),
            },
            _ => ReplicaError::Raft(err.to_string()),
        }
    }

    /// The URL of the leader this replica knows of.
    pub fn leader_url(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics.membership_config.membership().get_node(&leader).map(|n| url(&n.addr))
    }

    /// This replica's view of the group, as `decree.v1.Group` answers it.
    pub fn status(&self) -> decree_proto::v1::GroupStatus {
        use openraft::ServerState;
        let metrics = self.raft.metrics().borrow().clone();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = metrics.membership_config.membership();
        let last = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.clone().unwrap_or_default();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let matched = replication.get(id).map(|m| m.map(|l| l.index).unwrap_or(0));
                decree_proto::v1::GroupMember {
                    id: *id,
                    address: node.addr.clone(),
                    identity: node.identity,
                    voter: voters.contains(id),
                    replication_known: matched.is_some(),
                    matched_index: matched.unwrap_or(0),
                    lag: matched.map(|m| last.saturating_sub(m)).unwrap_or(0),
                }
            })
            .collect();
        decree_proto::v1::GroupStatus {
            replica_id: self.id,
            role: role.into(),
            term: metrics.current_term,
            leader_id: metrics.current_leader.unwrap_or(0),
            leader_url: self.leader_url().unwrap_or_default(),
            last_log_index: last,
            applied_index: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            leader_changes: 0,
            identity: self.identity,
        }
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

    /// Waits up to `timeout` until every entry in this replica's own log is
    /// applied. A leader whose coordinator stopped within its term (its
    /// majority went silent) may hold entries of that coordinator not yet
    /// committed; they can still commit, so the next coordinator of the term
    /// starts only once they are applied and it sees them.
    pub async fn apply_own_log(&self, timeout: Duration) -> Result<(), ReplicaError> {
        let last = self.raft.metrics().borrow().last_log_index;
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(last, "this replica's own log applied")
            .await
            .map(drop)
            .map_err(|e| ReplicaError::Raft(e.to_string()))
    }

    /// Stops this replica (its Raft node and its server).
    pub async fn shutdown(self) {
        let _ = self.raft.shutdown().await;
        if let Some(server) = self.server {
            server.abort();
        }
    }
}

/// The URL clients reach a replica at, from its `host:port` (https once
/// the process speaks TLS).
pub fn url(address: &str) -> String {
    let scheme = if decree_tls::installed().is_some() { "https" } else { "http" };
    format!("{scheme}://{address}")
}

/// A coordinator's storage: its own log, or its group's replicated one.
#[derive(Clone)]
pub enum Store<S> {
    Local(S),
    Replicated(Replicated<S>),
}

impl<S: Storage> Storage for Store<S> {
    fn write_with(
        &self,
        writes: Vec<Write>,
        durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        let store = self.clone();
        async move {
            match store {
                Store::Local(log) => log.write_with(writes, durability).await,
                Store::Replicated(group) => group.write_with(writes, durability).await,
            }
        }
    }

    fn write_then(
        &self,
        writes: Vec<Write>,
        durability: Durability,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    ) {
        match self {
            Store::Local(log) => log.write_then(writes, durability, then),
            Store::Replicated(group) => group.write_then(writes, durability, then),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        match self {
            Store::Local(log) => log.get(key),
            Store::Replicated(group) => group.get(key),
        }
    }

    fn scan_range(&self, from: &[u8], to: &[u8]) -> Result<decree_runtime::log::Entries, LogError> {
        match self {
            Store::Local(log) => log.scan_range(from, to),
            Store::Replicated(group) => group.scan_range(from, to),
        }
    }

    fn compact(&self, from: &[u8], to: &[u8]) {
        match self {
            Store::Local(log) => log.compact(from, to),
            Store::Replicated(group) => group.compact(from, to),
        }
    }

    fn stats(&self) -> &LogStats {
        match self {
            Store::Local(log) => log.stats(),
            Store::Replicated(group) => group.stats(),
        }
    }
}

/// A [`Storage`] whose writes are replicated through the group's Raft log
/// and whose reads are of this replica's applied state.
///
/// Writes are proposed in call order by one task that gathers every write
/// waiting while earlier entries are being replicated into one entry (one
/// atomic batch holding each write's batch whole, in order), with at most
/// [`IN_FLIGHT`] entries in flight: group commit over consensus, as the
/// local log shares its fsyncs.
#[derive(Clone)]
pub struct Replicated<S> {
    data: S,
    proposals: tokio::sync::mpsc::UnboundedSender<Proposal>,
}

/// One write waiting to be proposed.
struct Proposal {
    writes: Vec<Write>,
    /// Called back (`write_then`) by the task that awaited the entry's
    /// commit, in call order, or woken (`write_with`).
    done: Done,
}

/// Entries proposed and not yet committed, at most. One: every write that
/// arrives while an entry replicates waits for the next, so entries are as
/// large and as few as the load makes them. On two shared cores the group is
/// CPU-bound and its cost is per entry (the messages, wake-ups and log
/// writes of each replica), so fewer, larger entries are faster: bank, C=64,
/// side by side, one in flight 6,240-6,382 tx/s (0.50-0.51 of a single
/// coordinator), two 5,554-5,762 (0.47), four 5,462-5,502 (0.44-0.47).
const IN_FLIGHT: usize = 1;

/// Most writes gathered into one entry.
const MOST_GATHERED: usize = 4096;

impl<S: Storage> Replicated<S> {
    fn new(raft: Raft, data: S) -> Replicated<S> {
        let (proposals, queue) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(propose(raft, queue));
        Replicated { data, proposals }
    }
}

/// Seconds from an entry's proposal until a majority holds it and this
/// replica applied it: the replicated log's commit latency, on the leader
/// (`decree_group_commit_seconds`).
pub const COMMIT_SECONDS: &str = "decree_group_commit_seconds";

/// Proposes what `queue` brings, gathered (see [`Replicated`]), until every sender is gone.
async fn propose(raft: Raft, mut queue: tokio::sync::mpsc::UnboundedReceiver<Proposal>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    // Looked up once: each `histogram!` allocates a handle.
    let commit_seconds = metrics::histogram!(COMMIT_SECONDS);
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut gathered = vec![first];
        let mut count = gathered[0].writes.len();
        while count < MOST_GATHERED {
            let Ok(next) = queue.try_recv() else { break };
            count += next.writes.len();
            gathered.push(next);
        }
        let mut writes = Vec::with_capacity(count);
        let mut waiting = Vec::with_capacity(gathered.len());
        for proposal in gathered {
            writes.extend(proposal.writes.into_iter().map(Change::from));
            waiting.push(proposal.done);
        }
        let proposed = std::time::Instant::now();
        let answer = raft.client_write_ff(Batch { writes }).await;
        let commit_seconds = commit_seconds.clone();
        tokio::spawn(async move {
            let result = match answer {
                Ok(committed) => match committed.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("the Raft node stopped".to_owned()),
                },
                Err(fatal) => Err(fatal.to_string()),
            };
            if result.is_ok() {
                commit_seconds.record(proposed.elapsed().as_secs_f64());
            }
            for done in waiting {
                done.finish(result.clone().map_err(LogError::Replication));
            }
            drop(slot);
        });
    }
}

impl<S> Replicated<S> {
    /// Queues `writes` now, so proposals keep the order of the calls;
    /// resolves once they are committed and applied.
    fn queue(
        &self,
        writes: Vec<Write>,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send + 'static {
        let (done, committed) = tokio::sync::oneshot::channel();
        let queued = self.proposals.send(Proposal { writes, done: Done::Wake(done) });
        async move {
            queued.map_err(|_| LogError::Replication("the replica stopped".into()))?;
            committed.await.map_err(|_| LogError::Replication("the replica stopped".into()))?
        }
    }
}

impl<S: Storage> Storage for Replicated<S> {
    /// Every write is durable at a majority when this returns, whatever
    /// `durability` asks: a replicated write has no weaker kind.
    fn write_with(
        &self,
        writes: Vec<Write>,
        _durability: Durability,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send {
        self.queue(writes)
    }

    fn write_then(
        &self,
        writes: Vec<Write>,
        _durability: Durability,
        then: impl FnOnce(Result<(), LogError>) + Send + 'static,
    ) {
        // Queued now, in call order, as `write_with` (durable at a majority
        // whatever `durability` asks); `then` is called by the task that
        // awaits the entry's commit.
        let proposal = Proposal { writes, done: Done::Call(Box::new(then)) };
        if let Err(tokio::sync::mpsc::error::SendError(proposal)) = self.proposals.send(proposal) {
            proposal.done.finish(Err(LogError::Replication("the replica stopped".into())));
        }
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
