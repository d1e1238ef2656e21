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

mod multiplex;
pub mod ring;
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

pub use ring::Ring;
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
    #[error("no participant is enrolled with the coordinator")]
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantInfo {
    pub name: String,
    pub address: String,
    pub state: String,
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

fn channel(url: &str) -> Result<Channel, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::Url { url: url.into(), why: e.to_string() })?;
    // Keep-alive pings find a dead connection under a long-lived stream
    // (TransactStream) before a transaction waits on it.
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(RPC_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Encodes KV operations as a KV participant's branch payload.
pub fn kv_payload(ops: Vec<KvOp>) -> Vec<u8> {
    v1::KvBatch { ops: ops.into_iter().map(Into::into).collect() }.encode_to_vec()
}

/// A client of one coordinator and its participants.
#[derive(Clone)]
pub struct Client {
    coordinator: CoordinatorClient<Channel>,
    /// One-shot transactions, multiplexed over one stream.
    transactions: std::sync::Arc<multiplex::Multiplexer>,
    registry: RegistryClient<Channel>,
    participants: BTreeMap<String, (String, Channel)>,
    ring: Ring,
}

impl Client {
    /// Connects to the coordinator at `url` and reads the participant list.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClientError::Url { url: url.into(), why: "expected http://HOST:PORT".into() });
        }
        let channel = channel(url)?;
        let coordinator = CoordinatorClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let mut client = Client {
            transactions: std::sync::Arc::new(multiplex::Multiplexer::new(coordinator.clone(), RPC_TIMEOUT)),
            coordinator,
            registry: RegistryClient::new(channel),
            participants: BTreeMap::new(),
            ring: Ring::default(),
        };
        client.refresh().await.map_err(|err| match err {
            ClientError::Status(status) if status.code() == tonic::Code::Unavailable => {
                ClientError::Connect { url: url.into(), why: status.message().to_owned() }
            }
            other => other,
        })?;
        Ok(client)
    }

    /// Reads the participant list again and rebuilds the ring.
    pub async fn refresh(&mut self) -> Result<(), ClientError> {
        let listed = self.participants().await?;
        let mut participants = BTreeMap::new();
        for p in listed {
            let channel = match self.participants.get(&p.name) {
                Some((address, channel)) if *address == p.address => channel.clone(),
                _ => channel(&p.address)?,
            };
            participants.insert(p.name, (p.address, channel));
        }
        self.ring = Ring::new(participants.keys().cloned());
        self.participants = participants;
        Ok(())
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The participant that owns `key`.
    pub fn route(&self, key: &str) -> Result<&str, ClientError> {
        self.ring.route(key).ok_or(ClientError::NoParticipants)
    }

    /// Runs `ops` as one transaction: each op goes to the participant that owns
    /// its key; ops on one participant keep their order.
    pub async fn transact(&self, ops: Vec<KvOp>) -> Result<TxnResult, ClientError> {
        let mut branches: BTreeMap<String, Vec<KvOp>> = BTreeMap::new();
        for op in ops {
            KvOp::check_key(op.key())?;
            let owner = self.route(op.key())?.to_owned();
            branches.entry(owner).or_default().push(op);
        }
        let branches = branches
            .into_iter()
            .map(|(participant, ops)| v1::Branch { participant, payload: kv_payload(ops) })
            .collect();
        self.transact_branches(branches).await
    }

    /// Runs a transaction over explicit branches (any participant's payloads).
    pub async fn transact_branches(&self, branches: Vec<v1::Branch>) -> Result<TxnResult, ClientError> {
        let request = v1::TransactRequest { branches, timeout_ms: 0, pending_outcome: true };
        let response = self.transactions.transact(request).await.map_err(decided_error)?;
        TxnResult::from_wire(response)
    }

    /// Committed values of `keys`, each read from its participant.
    pub async fn get(&self, keys: &[String]) -> Result<BTreeMap<String, Option<Vec<u8>>>, ClientError> {
        let mut by_owner: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for key in keys {
            KvOp::check_key(key)?;
            by_owner.entry(self.route(key)?).or_default().push(key.clone());
        }
        let mut out = BTreeMap::new();
        for (owner, keys) in by_owner {
            let (_, channel) =
                self.participants.get(owner).ok_or_else(|| ClientError::UnknownParticipant(owner.into()))?;
            let response = KvClient::new(channel.clone()).get(v1::GetRequest { keys }).await?.into_inner();
            out.extend(response.values.into_iter().map(|kv| (kv.key, kv.value)));
        }
        Ok(out)
    }

    /// Committed values of `keys` at one named participant, bypassing routing.
    pub async fn get_at(
        &self,
        participant: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let (_, channel) = self
            .participants
            .get(participant)
            .ok_or_else(|| ClientError::UnknownParticipant(participant.into()))?;
        let response = KvClient::new(channel.clone()).get(v1::GetRequest { keys }).await?.into_inner();
        Ok(response.values.into_iter().map(|kv| kv.value).collect())
    }

    /// Redelivers phase two of `txid` now: the participants asked again, and
    /// the coordinator's outcome.
    pub async fn retry(&self, txid: &str) -> Result<(Vec<String>, Outcome), ClientError> {
        txid.parse::<TxId>()?;
        let response =
            self.coordinator.clone().retry(v1::RetryRequest { txid: txid.into() }).await?.into_inner();
        Ok((response.participants, Outcome::from_wire(response.outcome)?))
    }

    /// Committed branches whose redelivery stopped, waiting for an operator.
    pub async fn stuck(&self) -> Result<Vec<StuckBranch>, ClientError> {
        let response = self.coordinator.clone().list_stuck(v1::ListStuckRequest {}).await?.into_inner();
        Ok(response
            .branches
            .into_iter()
            .map(|b| StuckBranch { txid: b.txid, participant: b.participant, reason: b.reason })
            .collect())
    }

    /// The coordinator's answer for `txid`.
    pub async fn status(&self, txid: &str) -> Result<Outcome, ClientError> {
        txid.parse::<TxId>()?;
        let response =
            self.coordinator.clone().get_outcome(v1::GetOutcomeRequest { txid: txid.into() }).await?;
        Outcome::from_wire(response.into_inner().outcome)
    }

    pub async fn participants(&self) -> Result<Vec<ParticipantInfo>, ClientError> {
        let response =
            self.registry.clone().list_participants(v1::ListParticipantsRequest {}).await?.into_inner();
        Ok(response
            .participants
            .into_iter()
            .map(|p| ParticipantInfo { name: p.name, address: p.address, state: p.state })
            .collect())
    }

    /// `(name, channel)` of every enrolled participant.
    fn participant_channels(&self) -> Vec<(String, Channel)> {
        self.participants.iter().map(|(name, (_, channel))| (name.clone(), channel.clone())).collect()
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
