//! The decree client SDK: one-shot KV transactions routed by a consistent-hash
//! ring, reads, outcomes, and the operator views. No RocksDB here.
//!
//! ```no_run
//! # async fn example() -> Result<(), decree_client::ClientError> {
//! use decree_client::{Client, KvOp};
//! let client = Client::connect("http://127.0.0.1:7000").await?;
//! let result = client
//!     .transact(vec![
//!         KvOp::Add { key: "alice".into(), delta: -10 },
//!         KvOp::Add { key: "bob".into(), delta: 10 },
//!     ])
//!     .await?;
//! println!("{} {:?}", result.txid, result.outcome);
//! # Ok(()) }
//! ```

pub mod leader;
mod multiplex;
mod txn;

use std::collections::BTreeMap;
use std::time::Duration;

use decree_proto::v1::coordinator_client::CoordinatorClient;
use decree_proto::v1::kv_client::KvClient;
use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::v1::registry_client::RegistryClient;
pub use decree_proto::Reason;
pub use decree_proto::{v1, KvOp, TxId};
use prost::Message;
use tonic::transport::{Channel, Endpoint};

pub use decree_proto::ring::{self, Ring, Routing};
pub use leader::Coordinators;
pub use txn::Transaction;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("cannot reach {url}: {why}")]
    Connect { url: String, why: String },
    /// The server answered with an error (its message says why).
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    #[error(
        "the ring has no members: add one with `decree ring add NAME`, or start KV participants with --join"
    )]
    NoParticipants,
    #[error(transparent)]
    Invalid(#[from] decree_proto::InvalidInput),
    #[error("participant {0:?} is not enrolled")]
    UnknownParticipant(String),
    /// The coordinator could not learn the outcome yet (a one-phase
    /// participant is unreachable); ask [`Client::status`] later.
    #[error("outcome of {txid} unknown: {reason}")]
    OutcomeUnknown { txid: String, reason: String },
    /// An interactive transaction was aborted (e.g. it lost a lock conflict); it is over.
    #[error("transaction {txid} aborted: {reason}")]
    Aborted { txid: String, code: Reason, reason: String },
    #[error("key {key:?} holds {value:?}, not a decimal integer")]
    NotANumber { key: String, value: String },
}

impl ClientError {
    /// The txid of a transaction whose outcome is unknown.
    pub fn unknown_txid(&self) -> Option<&str> {
        match self {
            ClientError::OutcomeUnknown { txid, .. } => Some(txid),
            _ => None,
        }
    }
}

/// True when a one-shot transaction was refused before it started: by a
/// replica that does not lead, or on a stream that ended before sending it.
fn not_started(status: &tonic::Status) -> bool {
    leader::is_not_leader(status)
        || multiplex::not_sent(status)
        || Reason::of_status(status) == Reason::TxidRefused
}

/// True when no coordinator answered a call (see [`decree_proto::unanswered`]).
/// Only calls that may be repeated (Abort, Enlist) are sent again on it.
pub use decree_proto::unanswered;

/// Maps a Transact or Commit failure, keeping the txid of an unknown outcome.
fn decided_error(status: tonic::Status) -> ClientError {
    if status.code() == tonic::Code::Unknown {
        if let Some(txid) = status.metadata().get(decree_proto::TXID_METADATA).and_then(|v| v.to_str().ok()) {
            return ClientError::OutcomeUnknown {
                txid: txid.to_owned(),
                reason: status.message().to_owned(),
            };
        }
    }
    ClientError::Status(status)
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        tonic::Code::Unimplemented => "unimplemented",
        tonic::Code::Aborted => "aborted",
        tonic::Code::PermissionDenied => "permission denied",
        _ => "error",
    }
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted,
    Pending,
    /// Older than the coordinator remembers: it may have committed or aborted
    /// (its outcome was pruned after the retention window).
    Forgotten,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Aborted => "aborted",
            Outcome::Pending => "pending",
            Outcome::Forgotten => "forgotten",
        }
    }

    fn from_wire(value: i32) -> Result<Self, ClientError> {
        match v1::Outcome::try_from(value) {
            Ok(v1::Outcome::Committed) => Ok(Outcome::Committed),
            Ok(v1::Outcome::Aborted) => Ok(Outcome::Aborted),
            Ok(v1::Outcome::Pending) => Ok(Outcome::Pending),
            Ok(v1::Outcome::Forgotten) => Ok(Outcome::Forgotten),
            _ => {
                Err(tonic::Status::internal(format!("the coordinator sent an unknown outcome {value}"))
                    .into())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    pub txid: String,
    pub outcome: Outcome,
    /// Why it aborted, as a code ([`Reason::Unspecified`] when committed, or
    /// from a coordinator that predates the code).
    pub code: Reason,
    pub reason: String,
    pub participants: Vec<String>,
}

impl TxnResult {
    fn from_wire(response: v1::TransactResponse) -> Result<TxnResult, ClientError> {
        if response.outcome == v1::Outcome::Pending as i32 {
            // Not known yet: the coordinator keeps asking; GetOutcome tells later.
            return Err(ClientError::OutcomeUnknown { txid: response.txid, reason: response.reason });
        }
        Ok(TxnResult {
            txid: response.txid,
            outcome: Outcome::from_wire(response.outcome)?,
            code: Reason::from_wire(response.reason_code),
            reason: response.reason,
            participants: response.participants,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantInfo {
    pub name: String,
    pub address: String,
    pub state: String,
    /// "member" or "service".
    pub role: String,
    /// Share of the keyspace under the current ring (0 when not in it).
    pub share: f64,
    pub in_ring: bool,
    /// Since the coordinator last heard from it (`None`: not since it started).
    pub heard_ago: Option<Duration>,
}

/// A ring change (see `decree ring`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingChange {
    Add { name: String, weight: u32 },
    Remove { name: String },
    Weight { name: String, weight: u32 },
}

/// A committed branch whose phase two stopped on a refusal retrying cannot
/// mend; `decree retry` resumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckBranch {
    pub txid: String,
    pub participant: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub txid: String,
    pub participant: String,
    pub age_ms: u64,
    pub locked_keys: Vec<String>,
}

const RPC_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn channel(url: &str) -> Result<Channel, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::Url { url: url.into(), why: e.to_string() })?;
    if url.starts_with("https://") && decree_tls::installed().is_none() {
        return Err(ClientError::Url {
            url: url.into(),
            why: "an https URL needs this process's TLS material (--tls-cert, --tls-key, --tls-ca)".into(),
        });
    }
    // Keep-alive pings find a dead connection under a long-lived stream
    // (TransactStream) before a transaction waits on it. Mutual TLS when the
    // process has its material installed (decree_tls::install).
    Ok(decree_tls::channel(
        endpoint
            .connect_timeout(Duration::from_secs(2))
            .timeout(RPC_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true),
    ))
}

/// Encodes KV operations as a KV participant's branch payload.
pub fn kv_payload(ops: Vec<KvOp>) -> Vec<u8> {
    v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration: None }.encode_to_vec()
}

/// What a client routes by: the ring's routing and each participant's channel.
#[derive(Default)]
struct View {
    routing: Routing,
    participants: BTreeMap<String, (String, Channel)>,
}

/// A client of one coordinator and its participants. Clones share one view
/// of the ring: a redirect seen by one refreshes it for all.
#[derive(Clone)]
pub struct Client {
    /// The coordinator, or the leader of its group.
    coordinators: Coordinators,
    coordinator: CoordinatorClient<Coordinators>,
    /// One-shot transactions, multiplexed over one stream.
    transactions: std::sync::Arc<multiplex::Multiplexer>,
    registry: RegistryClient<Coordinators>,
    view: std::sync::Arc<std::sync::RwLock<std::sync::Arc<View>>>,
}

/// How often a request sent to a stale owner, or to a key that is moving, is
/// sent again (after refreshing the ring) before the error is returned.
const REROUTES: u32 = 60;

/// The pause before the `attempt`th re-route: 2 ms doubling to 100 ms (about 5 s in all).
fn reroute_pause(attempt: u32) -> Duration {
    Duration::from_millis((2u64 << attempt.min(6)).min(100))
}

/// How long a request waits for a coordinator group to have a leader again
/// (an election takes about a second), and a client for the next leader to
/// tell the outcome of a transaction its predecessor was deciding.
const FAILOVER_WAIT: Duration = Duration::from_secs(15);

/// The most keys one `Kv.Get` carries: a participant takes at most 10,000,
/// so [`Client::get`] of more sends several to one owner.
const GET_KEYS: usize = 10_000;

/// The pause before the `attempt`th try at the group's leader: 20 ms doubling
/// to 100 ms, so a client finds a new leader within about 100 ms of its
/// election (a try is one small RPC: cheap beside a failover's wait).
fn failover_pause(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(3)).min(100))
}

/// True for the answers that mean "not here, or not now: route again".
fn reroute(code: Reason) -> bool {
    matches!(code, Reason::WrongOwner | Reason::Migrating)
}

impl Client {
    /// Connects to the coordinator at `url` and reads the participant list.
    /// `url` may list a coordinator group's replicas, separated by commas:
    /// the client follows the group's leader (see [`leader`]).
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        let coordinators = Coordinators::new(url)?;
        let coordinator = CoordinatorClient::new(coordinators.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let group = coordinators.len() > 1;
        let client = Client {
            transactions: std::sync::Arc::new(multiplex::Multiplexer::new(
                coordinator.clone(),
                RPC_TIMEOUT,
                group,
            )),
            coordinator,
            registry: RegistryClient::new(coordinators.clone()),
            coordinators,
            view: Default::default(),
        };
        client.refresh().await.map_err(|err| match err {
            ClientError::Status(status) if status.code() == tonic::Code::Unavailable => {
                ClientError::Connect { url: url.into(), why: status.message().to_owned() }
            }
            other => other,
        })?;
        Ok(client)
    }

    /// The coordinators this client follows, and the one it asks now.
    pub fn coordinators(&self) -> &Coordinators {
        &self.coordinators
    }

    /// Sends one request to the coordinator (the group's leader), again
    /// while a replica refuses it for not leading (nothing was done) and,
    /// for a `read` to a group, while a replica cannot be reached, for up
    /// to [`FAILOVER_WAIT`].
    async fn ask<C, T, F, Fut>(&self, client: &C, read: bool, call: F) -> Result<T, tonic::Status>
    where
        C: Clone,
        F: Fn(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let group = self.coordinators.len() > 1;
        let lost = |status: &tonic::Status| read && group && status.code() == tonic::Code::Unavailable;
        self.ask_again_while(client, lost, call).await
    }

    /// Sends one request to the coordinator (the group's leader), again
    /// while a replica refuses it for not leading and while `again` says
    /// so, for up to [`FAILOVER_WAIT`].
    async fn ask_again_while<C, T, F, Fut>(
        &self,
        client: &C,
        again: impl Fn(&tonic::Status) -> bool,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        C: Clone,
        F: Fn(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut attempt = 0;
        loop {
            match call(client.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if (leader::is_not_leader(&status) || again(&status))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(failover_pause(attempt)).await;
                    attempt += 1;
                }
                Err(status) => return Err(status),
            }
        }
    }

    fn view(&self) -> std::sync::Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the participant list and the ring again.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let listed = self.participants().await?;
        let known = self.view();
        let mut participants = BTreeMap::new();
        for p in &listed {
            let channel = match known.participants.get(&p.name) {
                Some((address, channel)) if *address == p.address => channel.clone(),
                _ => channel(&p.address)?,
            };
            participants.insert(p.name.clone(), (p.address.clone(), channel));
        }
        let routing = match self
            .ask(&self.registry, true, |mut c| async move { c.get_ring(v1::GetRingRequest {}).await })
            .await
        {
            Ok(ring) => ring.routing.as_ref().map(Routing::from_wire).unwrap_or_default(),
            // A coordinator from before the ring had epochs: every participant, the old points.
            Err(status) if status.code() == tonic::Code::Unimplemented => Routing {
                epoch: 0,
                current: Ring::weighted(listed.iter().map(|p| (p.name.clone(), 1)), ring::LEGACY_VNODES),
                migration: None,
            },
            Err(status) => return Err(status.into()),
        };
        *self.view.write().unwrap_or_else(|p| p.into_inner()) =
            std::sync::Arc::new(View { routing, participants });
        Ok(())
    }

    /// The routing this client holds (refreshed on every redirect).
    pub fn routing(&self) -> Routing {
        self.view().routing.clone()
    }

    /// The ring keys are routed by once the migration in progress (if any) ends.
    pub fn ring(&self) -> Ring {
        self.view().routing.settled().clone()
    }

    /// The participant that owns `key`, as this client knows the ring.
    pub fn route(&self, key: &str) -> Result<String, ClientError> {
        self.view().routing.route(key).map(str::to_owned).ok_or(ClientError::NoParticipants)
    }

    /// A key that `participant` owns under this client's ring: the first of
    /// `<prefix>0`, `<prefix>1`, ... that routes to it (`None` if it holds
    /// no part of the ring). For addressing a member by name with keys it owns.
    pub fn key_at(&self, participant: &str, prefix: &str) -> Option<String> {
        let view = self.view();
        if !view.routing.settled().contains(participant) && !view.routing.current.contains(participant) {
            return None;
        }
        (0..1_000_000u32).map(|n| format!("{prefix}{n}")).find(|k| view.routing.route(k) == Some(participant))
    }

    /// The channel to `participant`.
    fn channel_to(&self, participant: &str) -> Result<Channel, ClientError> {
        let view = self.view();
        let (_, channel) = view
            .participants
            .get(participant)
            .ok_or_else(|| ClientError::UnknownParticipant(participant.into()))?;
        Ok(channel.clone())
    }

    /// Refreshes the ring after a redirect and waits before the `attempt`th
    /// try; false once the tries are spent.
    async fn rerouted(&self, attempt: u32) -> bool {
        if attempt >= REROUTES {
            return false;
        }
        tokio::time::sleep(reroute_pause(attempt)).await;
        // A failed refresh keeps the old view: the next try tells again.
        let _ = self.refresh().await;
        true
    }

    /// Runs `ops` as one transaction: each op goes to the participant that owns
    /// its key; ops on one participant keep their order. A transaction that
    /// reached a stale owner, or a key that was moving, aborted without effect:
    /// it runs again (a new txid) on the refreshed ring.
    pub async fn transact(&self, ops: Vec<KvOp>) -> Result<TxnResult, ClientError> {
        for op in &ops {
            KvOp::check_key(op.key())?;
        }
        let mut attempt = 0;
        loop {
            let mut branches: BTreeMap<String, Vec<KvOp>> = BTreeMap::new();
            for op in &ops {
                branches.entry(self.route(op.key())?).or_default().push(op.clone());
            }
            let branches = branches
                .into_iter()
                .map(|(participant, ops)| v1::Branch { participant, payload: kv_payload(ops) })
                .collect();
            let result = self.transact_branches(branches).await?;
            let moved = result.outcome == Outcome::Aborted && reroute(result.code);
            if !(moved && self.rerouted(attempt).await) {
                return Ok(result);
            }
            attempt += 1;
        }
    }

    /// Runs a transaction over explicit branches (any participant's payloads).
    ///
    /// Against a coordinator group, a transaction refused by a replica that
    /// does not lead (it did not start) is sent again, to the leader; one
    /// whose coordinator stopped leading, or was lost, while deciding it is
    /// resolved by asking the next leader (`GetOutcome`) until it knows.
    pub async fn transact_branches(&self, branches: Vec<v1::Branch>) -> Result<TxnResult, ClientError> {
        let group = self.coordinators.len() > 1;
        let count = branches.len();
        let mut request =
            v1::TransactRequest { branches, timeout_ms: 0, pending_outcome: true, announce_txid: false };
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut attempt = 0;
        let response = loop {
            // Only a group sends a request again (to its next leader), so only
            // a group keeps a copy: elsewhere the payloads are sent, not cloned.
            let sending = if group { request.clone() } else { std::mem::take(&mut request) };
            match self.transactions.transact(sending).await {
                Ok(response) => break response,
                Err(status) if group && not_started(&status) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(failover_pause(attempt)).await;
                    attempt += 1;
                }
                Err(status) => match decided_error(status) {
                    ClientError::OutcomeUnknown { txid, reason } if group => {
                        return self.resolve(txid, reason, count).await
                    }
                    other => return Err(other),
                },
            }
        };
        let lost_leader = response.outcome == v1::Outcome::Pending as i32
            && Reason::from_wire(response.reason_code) == Reason::NotLeader;
        if lost_leader {
            return self.resolve(response.txid, response.reason, count).await;
        }
        TxnResult::from_wire(response)
    }

    /// The outcome of `txid`, whose coordinator was lost while deciding it,
    /// from the group's leader: asked until it is known (a one-phase
    /// branch's outcome is asked of its participant by the leader first).
    async fn resolve(&self, txid: String, reason: String, branches: usize) -> Result<TxnResult, ClientError> {
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        let mut attempt = 0;
        loop {
            let outcome = match self.status(&txid).await {
                Ok(outcome) => outcome,
                Err(_) if tokio::time::Instant::now() < deadline => Outcome::Pending,
                Err(err) => return Err(err),
            };
            match outcome {
                Outcome::Committed | Outcome::Aborted | Outcome::Forgotten => {
                    tracing::debug!(%txid, outcome = outcome.as_str(), branches, "outcome learned after a failover");
                    return Ok(TxnResult {
                        txid,
                        outcome,
                        code: Reason::Unspecified,
                        reason: format!("told by the group's leader after a failover ({reason})"),
                        participants: Vec::new(),
                    });
                }
                Outcome::Pending if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(failover_pause(attempt)).await;
                    attempt += 1;
                }
                Outcome::Pending => return Err(ClientError::OutcomeUnknown { txid, reason }),
            }
        }
    }

    /// Committed values of `keys`, each read from its owner. A key whose
    /// owner changed, or that is moving, is read again on the refreshed ring.
    pub async fn get(&self, keys: &[String]) -> Result<BTreeMap<String, Option<Vec<u8>>>, ClientError> {
        for key in keys {
            KvOp::check_key(key)?;
        }
        let mut out = BTreeMap::new();
        let mut left: Vec<String> = keys.to_vec();
        let mut attempt = 0;
        loop {
            let epoch = self.view().routing.epoch.max(1);
            let mut by_owner: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for key in left.drain(..) {
                by_owner.entry(self.route(&key)?).or_default().push(key);
            }
            let mut redirect = None;
            let requests = by_owner.into_iter().flat_map(|(owner, keys)| {
                keys.chunks(GET_KEYS).map(|c| (owner.clone(), c.to_vec())).collect::<Vec<_>>()
            });
            for (owner, keys) in requests {
                let channel = self.channel_to(&owner)?;
                let request = v1::GetRequest { keys: keys.clone(), ring_epoch: epoch };
                match KvClient::new(channel).get(request).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        out.extend(response.values.into_iter().map(|kv| (kv.key, kv.value)));
                        if let Some(r) = response.redirect {
                            left.extend(r.keys);
                            redirect = Some((Reason::from_wire(r.reason_code), r.reason));
                        }
                    }
                    Err(status) if reroute(Reason::of_status(&status)) => {
                        left.extend(keys);
                        redirect = Some((Reason::of_status(&status), status.message().to_owned()));
                    }
                    Err(status) => return Err(status.into()),
                }
            }
            let Some((code, reason)) = redirect else { return Ok(out) };
            if !self.rerouted(attempt).await {
                let status = code.on_status(tonic::Status::unavailable(reason));
                return Err(ClientError::Status(status));
            }
            attempt += 1;
        }
    }

    /// Committed values of `keys` at one named participant, bypassing routing
    /// (a key it does not own is an error).
    pub async fn get_at(
        &self,
        participant: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let channel = self.channel_to(participant)?;
        let response = KvClient::new(channel).get(v1::GetRequest { keys, ring_epoch: 0 }).await?.into_inner();
        Ok(response.values.into_iter().map(|kv| kv.value).collect())
    }

    /// The ring as the coordinator holds it: routing, shares, migration.
    pub async fn ring_status(&self) -> Result<v1::GetRingResponse, ClientError> {
        Ok(self
            .ask(&self.registry, true, |mut c| async move { c.get_ring(v1::GetRingRequest {}).await })
            .await?)
    }

    /// Asks the coordinator for a ring change; answered once it is durable
    /// and its migration has started.
    pub async fn change_ring(&self, change: RingChange) -> Result<Routing, ClientError> {
        let (op, name, weight) = match change {
            RingChange::Add { name, weight } => (v1::change_ring_request::Op::Add, name, weight),
            RingChange::Remove { name } => (v1::change_ring_request::Op::Remove, name, 0),
            RingChange::Weight { name, weight } => (v1::change_ring_request::Op::Weight, name, weight),
        };
        let request = v1::ChangeRingRequest { op: op as i32, name, weight };
        let response = self
            .ask(&self.registry, false, |mut c| {
                let request = request.clone();
                async move { c.change_ring(request).await }
            })
            .await?;
        let routing = response.routing.as_ref().map(Routing::from_wire).unwrap_or_default();
        let _ = self.refresh().await;
        Ok(routing)
    }

    /// Operator: moves participant `name` to `address` (its machine replaced
    /// while the old process may still run), recorded and logged with
    /// `operator` and `reason`. Answers the address it had.
    pub async fn move_participant(
        &self,
        name: &str,
        address: &str,
        operator: &str,
        reason: &str,
    ) -> Result<String, ClientError> {
        let request = v1::MoveParticipantRequest {
            name: name.into(),
            address: address.into(),
            operator: operator.into(),
            reason: reason.into(),
        };
        let response = self
            .ask(&self.registry, true, |mut c| {
                let request = request.clone();
                async move { c.move_participant(request).await }
            })
            .await?;
        let _ = self.refresh().await;
        Ok(response.previous)
    }

    /// Redelivers phase two of `txid` now: the participants asked again, and
    /// the coordinator's outcome.
    pub async fn retry(&self, txid: &str) -> Result<(Vec<String>, Outcome), ClientError> {
        txid.parse::<TxId>()?;
        let response = self
            .ask(&self.coordinator, true, |mut c| async move {
                c.retry(v1::RetryRequest { txid: txid.into() }).await
            })
            .await?;
        Ok((response.participants, Outcome::from_wire(response.outcome)?))
    }

    /// Committed branches whose redelivery stopped, waiting for an operator.
    pub async fn stuck(&self) -> Result<Vec<StuckBranch>, ClientError> {
        let response = self
            .ask(&self.coordinator, true, |mut c| async move { c.list_stuck(v1::ListStuckRequest {}).await })
            .await?;
        Ok(response
            .branches
            .into_iter()
            .map(|b| StuckBranch { txid: b.txid, participant: b.participant, reason: b.reason })
            .collect())
    }

    /// Transactions in the coordinator's memory and its most recent
    /// decisions (at most `limit`), newest first; of `txid` only, when given.
    pub async fn transactions(
        &self,
        txid: Option<&str>,
        limit: u32,
    ) -> Result<v1::ListTransactionsResponse, ClientError> {
        if let Some(txid) = txid {
            txid.parse::<TxId>()?;
        }
        let request = v1::ListTransactionsRequest { txid: txid.unwrap_or_default().into(), limit };
        Ok(self
            .ask(&self.coordinator, true, |mut c| {
                let request = request.clone();
                async move { c.list_transactions(request).await }
            })
            .await?)
    }

    /// Decisions per second and their latency percentiles over the last
    /// `seconds` (at most 300), and the totals since the coordinator started.
    pub async fn stats(&self, seconds: u32) -> Result<v1::GetStatsResponse, ClientError> {
        Ok(self
            .ask(&self.coordinator, true, |mut c| async move {
                c.get_stats(v1::GetStatsRequest { seconds }).await
            })
            .await?)
    }

    /// The coordinator group's view, from the replica this client asks
    /// (FAILED_PRECONDITION from a single coordinator: it is not a group).
    pub async fn group(&self) -> Result<v1::GroupStatus, ClientError> {
        let mut group = v1::group_client::GroupClient::new(self.coordinators.clone());
        Ok(group.get_group(v1::GetGroupRequest {}).await?.into_inner())
    }

    /// The address `participant` enrolled with, as this client last read the list.
    pub fn participant_address(&self, participant: &str) -> Option<String> {
        self.view().participants.get(participant).map(|(address, _)| address.clone())
    }

    /// The coordinator's answer for `txid`.
    pub async fn status(&self, txid: &str) -> Result<Outcome, ClientError> {
        txid.parse::<TxId>()?;
        let response = self
            .ask(&self.coordinator, true, |mut c| async move {
                c.get_outcome(v1::GetOutcomeRequest { txid: txid.into() }).await
            })
            .await?;
        Outcome::from_wire(response.outcome)
    }

    pub async fn participants(&self) -> Result<Vec<ParticipantInfo>, ClientError> {
        let response = self
            .ask(&self.registry, true, |mut c| async move {
                c.list_participants(v1::ListParticipantsRequest {}).await
            })
            .await?;
        Ok(response
            .participants
            .into_iter()
            .map(|p| ParticipantInfo {
                role: match v1::Role::try_from(p.role) {
                    Ok(v1::Role::Service) => "service".to_owned(),
                    _ => "member".to_owned(),
                },
                share: p.share,
                in_ring: p.in_ring,
                heard_ago: (p.heard_ms_ago > 0).then(|| Duration::from_millis(p.heard_ms_ago)),
                name: p.name,
                address: p.address,
                state: p.state,
            })
            .collect())
    }

    /// `(name, channel)` of every enrolled participant.
    fn participant_channels(&self) -> Vec<(String, Channel)> {
        self.view().participants.iter().map(|(name, (_, channel))| (name.clone(), channel.clone())).collect()
    }

    /// Every prepared, undecided branch at every participant that answers.
    /// Participants that do not answer are returned in the second list.
    pub async fn in_doubt(&self) -> Result<(Vec<InDoubt>, Vec<String>), ClientError> {
        let channels = self.participant_channels();
        Ok(in_doubt_at(channels).await)
    }

    /// The heuristic decisions recorded at every participant that answers.
    pub async fn heuristics(&self) -> (Vec<v1::ListHeuristicsResponse>, Vec<String>) {
        let channels = self.participant_channels();
        heuristics_at(channels).await
    }

    /// The lock table of every participant that answers (holders, their
    /// states, waiters, counters); those that do not answer in the second list.
    pub async fn locks(&self) -> (Vec<v1::ListLocksResponse>, Vec<String>) {
        let channels = self.participant_channels();
        locks_at(channels).await
    }
}

/// Asks participants directly for their branches in doubt (works while the
/// coordinator is away). Returns the branches and the URLs that did not answer.
pub async fn in_doubt_at_urls(urls: &[String]) -> Result<(Vec<InDoubt>, Vec<String>), ClientError> {
    let channels = url_channels(urls)?;
    Ok(in_doubt_at(channels).await)
}

/// Asks every participant of `channels` (`(label, channel)` pairs) with `ask`,
/// each within 2 s. Returns the answers and the labels of those that did not answer.
async fn ask_all<T, F, Fut>(channels: Vec<(String, Channel)>, ask: F) -> (Vec<T>, Vec<String>)
where
    F: Fn(ParticipantClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let asks = channels.into_iter().map(|(label, channel)| {
        let answer = tokio::time::timeout(Duration::from_secs(2), ask(ParticipantClient::new(channel)));
        async move { (label, answer.await) }
    });
    let mut answers = Vec::new();
    let mut unreachable = Vec::new();
    for (label, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(Ok(response)) => answers.push(response.into_inner()),
            _ => unreachable.push(label),
        }
    }
    (answers, unreachable)
}

async fn in_doubt_at(channels: Vec<(String, Channel)>) -> (Vec<InDoubt>, Vec<String>) {
    let (answers, unreachable) =
        ask_all(channels, |mut c| async move { c.list_in_doubt(v1::ListInDoubtRequest {}).await }).await;
    let mut branches: Vec<InDoubt> = answers
        .into_iter()
        .flat_map(|response| {
            let participant = response.participant;
            response.branches.into_iter().map(move |b| InDoubt {
                txid: b.txid,
                participant: participant.clone(),
                age_ms: b.age_ms,
                locked_keys: b.locked_keys,
            })
        })
        .collect();
    branches.sort_by(|a, b| (&a.participant, &a.txid).cmp(&(&b.participant, &b.txid)));
    (branches, unreachable)
}

/// `(url, channel)` for each URL: participants asked directly, the URL naming
/// any that does not answer.
fn url_channels(urls: &[String]) -> Result<Vec<(String, Channel)>, ClientError> {
    urls.iter().map(|url| Ok((url.clone(), channel(url)?))).collect()
}

/// Asks the participant at `url` to decide its branch of `txid` by hand (an
/// operator's heuristic decision, recorded with `reason` and `operator`).
pub async fn resolve_at(
    url: &str,
    txid: &str,
    commit: bool,
    reason: &str,
    operator: &str,
) -> Result<(), ClientError> {
    txid.parse::<TxId>()?;
    let request =
        v1::ResolveRequest { txid: txid.into(), commit, reason: reason.into(), operator: operator.into() };
    ParticipantClient::new(channel(url)?).resolve(request).await?;
    Ok(())
}

/// The heuristic decisions recorded at participants asked directly.
pub async fn heuristics_at_urls(
    urls: &[String],
) -> Result<(Vec<v1::ListHeuristicsResponse>, Vec<String>), ClientError> {
    let channels = url_channels(urls)?;
    Ok(heuristics_at(channels).await)
}

async fn heuristics_at(channels: Vec<(String, Channel)>) -> (Vec<v1::ListHeuristicsResponse>, Vec<String>) {
    let (mut lists, unreachable) =
        ask_all(channels, |mut c| async move { c.list_heuristics(v1::ListHeuristicsRequest {}).await }).await;
    lists.sort_by(|a, b| a.participant.cmp(&b.participant));
    (lists, unreachable)
}

/// The lock tables of participants asked directly (works while the coordinator is away).
pub async fn locks_at_urls(
    urls: &[String],
) -> Result<(Vec<v1::ListLocksResponse>, Vec<String>), ClientError> {
    let channels = url_channels(urls)?;
    Ok(locks_at(channels).await)
}

async fn locks_at(channels: Vec<(String, Channel)>) -> (Vec<v1::ListLocksResponse>, Vec<String>) {
    let (mut tables, unreachable) =
        ask_all(channels, |mut c| async move { c.list_locks(v1::ListLocksRequest {}).await }).await;
    tables.sort_by(|a, b| a.participant.cmp(&b.participant));
    (tables, unreachable)
}
