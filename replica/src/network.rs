//! The `decree.v1.Replica` gRPC service: openraft's messages between the
//! replicas of a group, each serialized (MessagePack, [`crate::codec`]) in a
//! `RaftMessage`, and its answers likewise.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use decree_proto::v1::replica_client::ReplicaClient;
use decree_proto::v1::replica_server::{Replica as ReplicaRpc, ReplicaServer};
use decree_proto::v1::{IdentifyRequest, RaftMessage, ReplicaIdentity};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::{Member, NodeId, Raft, TypeConfig};

/// Names a file whose existence cuts this replica off from other replicas:
/// a test's network partition that leaves clients and participants reaching
/// it. Empty, the file cuts it off from every other replica both ways:
/// every Raft message it would send fails as unreachable and every one it
/// receives is refused, as in a partition. Otherwise the file lists the
/// links cut (whitespace or commas between them): `N` both ways with
/// replica `N`, `>N` only messages to it, `<N` only messages from it (a
/// one-way partition). Removed, messages flow again. Read every
/// [`PARTITION_POLL`]; unset, a message costs one relaxed load.
pub const PARTITION_FILE_ENV: &str = "DECREE_PARTITION_FILE";
const PARTITION_POLL: Duration = Duration::from_millis(10);

/// The links a partition file cuts: bit `n` of `to` (`from`) set, messages
/// to (from) replica `n` are lost; every bit set, every replica's (ids past
/// 63 share bit 63).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Links {
    to: u64,
    from: u64,
}

impl Links {
    /// The links `spec` (a partition file's contents) cuts.
    fn parse(spec: &str) -> Result<Links, String> {
        let mut links = Links::default();
        let tokens: Vec<&str> =
            spec.split(|c: char| c.is_whitespace() || c == ',').filter(|t| !t.is_empty()).collect();
        if tokens.is_empty() {
            return Ok(Links { to: u64::MAX, from: u64::MAX });
        }
        for token in tokens {
            let (to, from, id) = match token.as_bytes()[0] {
                b'>' => (true, false, &token[1..]),
                b'<' => (false, true, &token[1..]),
                _ => (true, true, token),
            };
            let id: NodeId =
                id.parse().map_err(|_| format!("{token:?}: not N, >N or <N (N a replica id)"))?;
            let bit = 1u64 << id.min(63);
            links.to |= if to { bit } else { 0 };
            links.from |= if from { bit } else { 0 };
        }
        Ok(links)
    }

    fn cuts(mask: u64, id: NodeId) -> bool {
        mask & (1u64 << id.min(63)) != 0
    }
}

/// The links [`PARTITION_FILE_ENV`]'s file cuts now.
fn partition() -> Links {
    static CUT: OnceLock<Option<&'static [AtomicU64; 2]>> = OnceLock::new();
    let read = |path: &PathBuf| {
        match std::fs::read_to_string(path) {
        Ok(spec) => Links::parse(&spec).unwrap_or_else(|why| {
            tracing::error!(file = %path.display(), "a partition file that does not parse cuts every link: {why}");
            Links { to: u64::MAX, from: u64::MAX }
        }),
        Err(_) => Links::default(),
    }
    };
    let cut = CUT.get_or_init(|| {
        let path = PathBuf::from(std::env::var_os(PARTITION_FILE_ENV)?);
        let first = read(&path);
        let cut: &'static [AtomicU64; 2] = Box::leak(Box::new([AtomicU64::new(first.to), AtomicU64::new(first.from)]));
        std::thread::Builder::new()
            .name("partition-watch".into())
            .spawn(move || {
                let mut last = first;
                loop {
                    let now = read(&path);
                    if now != last {
                        cut[0].store(now.to, Ordering::Relaxed);
                        cut[1].store(now.from, Ordering::Relaxed);
                        tracing::warn!(to = format!("{:#x}", now.to), from = format!("{:#x}", now.from), file = %path.display(), "this replica's cut links changed (bit n: replica n)");
                        last = now;
                    }
                    std::thread::sleep(PARTITION_POLL);
                }
            })
            .ok()?;
        Some(cut)
    });
    cut.map(|[to, from]| Links { to: to.load(Ordering::Relaxed), from: from.load(Ordering::Relaxed) })
        .unwrap_or_default()
}

/// Whether messages to replica `id` are lost now ([`PARTITION_FILE_ENV`]).
fn cut_to(id: NodeId) -> bool {
    Links::cuts(partition().to, id)
}

/// Whether messages from replica `id` (`None`: a sender that does not say) are lost now.
fn cut_from(id: Option<NodeId>) -> bool {
    let from = partition().from;
    match id {
        Some(id) => Links::cuts(from, id),
        None => from == u64::MAX,
    }
}

fn partition_error() -> std::io::Error {
    std::io::Error::other(format!("partitioned from the other replica ({PARTITION_FILE_ENV})"))
}

/// The metadata naming the replica a Raft message is for (its id).
pub const TO: &str = "decree-replica-to";
/// The metadata naming the replica a Raft message is from (its id).
pub const FROM: &str = "decree-replica-from";
/// The metadata naming the identity the group admitted that replica with
/// ([`Member::identity`], 16 hex digits).
pub const IDENTITY: &str = "decree-replica-identity";

/// How often a replica warns of the same refusal, at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A client of the replica at `address` (`host:port`).
fn client(address: &str) -> Option<ReplicaClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{address}")).ok()?;
    let endpoint = endpoint.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true);
    Some(ReplicaClient::new(decree_tls::channel(endpoint)))
}

/// Asks the replica at `address` who it is.
pub async fn identify(address: &str) -> Result<ReplicaIdentity, Status> {
    let mut client =
        client(address).ok_or_else(|| Status::invalid_argument(format!("{address}: not a host:port")))?;
    let asked = client.identify(IdentifyRequest {});
    match tokio::time::timeout(Duration::from_secs(2), asked).await {
        Ok(answer) => answer.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!("{address} did not answer within 2 s"))),
    }
}

/// Connects replica `id` to the others by the addresses in the membership.
#[derive(Debug, Default, Clone)]
pub struct Network {
    pub id: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Connection {
        Connection {
            from: self.id,
            target,
            identity: node.identity,
            client: client(&node.addr),
            appends: None,
            streams: true,
            warned: None,
        }
    }
}

/// The connection to one other replica.
pub struct Connection {
    from: NodeId,
    target: NodeId,
    /// The identity the group admitted it with (0: not checked).
    identity: u64,
    /// `None`: its address does not parse (every call is unreachable).
    client: Option<ReplicaClient<Channel>>,
    /// The open `AppendEntriesStream`, if any.
    appends: Option<Appends>,
    /// Whether the other replica serves `AppendEntriesStream` (false once it
    /// answered UNIMPLEMENTED: every append is then a call of its own).
    streams: bool,
    /// When this replica last warned that the other refuses its messages.
    warned: Option<Instant>,
}

/// One `AppendEntriesStream`: openraft replicates to a follower one request
/// at a time, so each request is answered by the stream's next answer.
///
/// Why a stream: every append (and every heartbeat and commit-index update)
/// as its own call costs each side a new HTTP/2 stream, its headers and
/// trailers, and a task; on the stream a request is one message each way.
struct Appends {
    requests: tokio::sync::mpsc::Sender<RaftMessage>,
    answers: tonic::Streaming<RaftMessage>,
    /// A request was sent whose answer has not been read: the call was given
    /// up (its future dropped on a timeout), and its answer would be taken
    /// for the next request's. Such a stream is closed, never reused.
    owed: bool,
}

/// Which of the other replica's calls.
#[derive(Clone, Copy)]
enum Call {
    Append,
    Vote,
    Snapshot,
}

fn encode<T: Serialize>(value: &T) -> RaftMessage {
    RaftMessage { body: crate::codec::encode(value) }
}

/// Whether a warning last given at `last` may be given again now (and notes that it is).
fn warn_now(last: &mut Option<Instant>) -> bool {
    let due = last.is_none_or(|at| at.elapsed() >= WARN_EVERY);
    if due {
        *last = Some(Instant::now());
    }
    due
}

impl Connection {
    /// Sends `request` as `call` and reads the remote replica's result.
    async fn call<Req, Resp, E>(
        &mut self,
        call: Call,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if cut_to(self.target) {
            return Err(RPCError::Unreachable(Unreachable::new(&partition_error())));
        }
        let Some(client) = self.client.clone() else {
            let why = std::io::Error::other(format!("replica {}: its address does not parse", self.target));
            return Err(RPCError::Unreachable(Unreachable::new(&why)));
        };
        let message = encode(request);
        let sent = async {
            match call {
                Call::Append => self.append(client, message).await,
                Call::Vote => client.clone().vote(self.request(message)).await.map(Response::into_inner),
                Call::Snapshot => {
                    client.clone().install_snapshot(self.request(message)).await.map(Response::into_inner)
                }
            }
        };
        let answer = match tokio::time::timeout(option.hard_ttl(), sent).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)))
            }
            // Not the replica the group admitted: as good as unreachable
            // (openraft backs off) until it is removed and added back.
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                if warn_now(&mut self.warned) {
                    tracing::warn!(
                        replica = self.target,
                        refusal = status.message(),
                        "a member refuses this replica's Raft messages"
                    );
                }
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            crate::codec::decode(&answer.body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// `message`, addressed: the replica it is for and the identity the group admitted it with.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        address(request.metadata_mut(), self.from, self.target, self.identity);
        request
    }

    /// One append on the open stream (opened first if there is none, or if
    /// the last was left owing an answer); a call of its own if the other
    /// replica has no stream. Any failure closes the stream.
    async fn append(
        &mut self,
        mut client: ReplicaClient<Channel>,
        message: RaftMessage,
    ) -> Result<RaftMessage, Status> {
        if !self.streams {
            return client.append_entries(self.request(message)).await.map(Response::into_inner);
        }
        if self.appends.as_ref().is_some_and(|appends| appends.owed) {
            self.appends = None;
        }
        let appends = match &mut self.appends {
            Some(appends) => appends,
            None => {
                let (requests, queue) = tokio::sync::mpsc::channel(1);
                let stream = tokio_stream::wrappers::ReceiverStream::new(queue);
                match client.append_entries_stream(self.request(stream)).await {
                    Ok(answers) => {
                        self.appends.insert(Appends { requests, answers: answers.into_inner(), owed: false })
                    }
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        self.streams = false;
                        return client.append_entries(self.request(message)).await.map(Response::into_inner);
                    }
                    Err(status) => return Err(status),
                }
            }
        };
        appends.owed = true;
        let answer = match appends.requests.send(message).await {
            Ok(()) => appends.answers.message().await,
            Err(_) => Err(Status::unavailable("the append stream is closed")),
        };
        match answer {
            Ok(Some(answer)) => {
                appends.owed = false;
                Ok(answer)
            }
            Ok(None) => {
                self.appends = None;
                Err(Status::unavailable(format!("replica {} ended the append stream", self.target)))
            }
            Err(status) => {
                self.appends = None;
                Err(status)
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Call::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Call::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Call::Vote, &rpc, &option).await
    }
}

/// Names, in `metadata`, the sender `from`, replica `to` and the identity it was admitted with.
fn address(metadata: &mut MetadataMap, from: NodeId, to: NodeId, identity: u64) {
    metadata.insert(FROM, from.into());
    metadata.insert(TO, to.into());
    if identity != 0 {
        if let Ok(value) = format!("{identity:016x}").parse() {
            metadata.insert(IDENTITY, value);
        }
    }
}

/// Why a Raft message addressed as `metadata` says is not for replica `id`
/// with `identity`, if it is not. Unaddressed (or with no identity) it is taken.
fn misaddressed(metadata: &MetadataMap, id: NodeId, identity: u64) -> Option<String> {
    let named = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok());
    if let Some(to) = named(TO) {
        if to.parse::<NodeId>().ok() != Some(id) {
            return Some(format!(
                "this is replica {id}, not replica {to}: the group's address for replica {to} reaches replica {id}"
            ));
        }
    }
    let expected = u64::from_str_radix(named(IDENTITY)?, 16).ok()?;
    (expected != identity).then(|| {
        format!(
            "replica {id}'s data directory (identity {identity:016x}) is not the one the group admitted \
             (identity {expected:016x}): it was wiped or replaced, so it lost the log and the vote the group \
             counts on. Remove this replica and add it back (decree coordinators remove {id}; decree \
             coordinators add {id} ADDRESS)"
        )
    })
}

/// The server side: hands each message to this replica's Raft node.
pub struct Service {
    raft: Raft,
    id: NodeId,
    identity: u64,
    /// When this replica last warned that it refused a message.
    warned: Mutex<Option<Instant>>,
}

/// A message from replica `from`, decoded; refused while partitioned from it.
fn receive<T: DeserializeOwned>(message: RaftMessage, from: Option<NodeId>) -> Result<T, Status> {
    if cut_from(from) {
        return Err(Status::unavailable(partition_error().to_string()));
    }
    crate::codec::decode(&message.body).map_err(|e| Status::invalid_argument(format!("raft message: {e}")))
}

impl Service {
    /// `request`'s message and the replica it is from (if it says) if it is
    /// for this replica; else FAILED_PRECONDITION, why.
    fn admit<T>(&self, request: Request<T>) -> Result<(T, Option<NodeId>), Status> {
        if let Some(why) = misaddressed(request.metadata(), self.id, self.identity) {
            if warn_now(&mut self.warned.lock().unwrap_or_else(|p| p.into_inner())) {
                tracing::error!(replica = self.id, "refusing the group's Raft messages: {why}");
            }
            return Err(Status::failed_precondition(why));
        }
        let from = request.metadata().get(FROM).and_then(|v| v.to_str().ok()?.parse().ok());
        Ok((request.into_inner(), from))
    }
}

#[tonic::async_trait]
impl ReplicaRpc for Service {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let (message, from) = self.admit(request)?;
        let rpc: AppendEntriesRequest<TypeConfig> = receive(message, from)?;
        Ok(Response::new(encode(&self.raft.append_entries(rpc).await)))
    }

    type AppendEntriesStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send + 'static>>;

    /// Each request answered in turn, as `append_entries` answers one; a
    /// request refused (partitioned, undecodable) ends the stream with its status.
    async fn append_entries_stream(
        &self,
        request: Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        use futures::StreamExt;
        let raft = self.raft.clone();
        let (messages, from) = self.admit(request)?;
        let answers = messages.then(move |message| {
            let raft = raft.clone();
            async move {
                let rpc: AppendEntriesRequest<TypeConfig> = receive(message?, from)?;
                Ok(encode(&raft.append_entries(rpc).await))
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let (message, from) = self.admit(request)?;
        let rpc: VoteRequest<NodeId> = receive(message, from)?;
        Ok(Response::new(encode(&self.raft.vote(rpc).await)))
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let (message, from) = self.admit(request)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = receive(message, from)?;
        Ok(Response::new(encode(&self.raft.install_snapshot(rpc).await)))
    }

    async fn identify(&self, _: Request<IdentifyRequest>) -> Result<Response<ReplicaIdentity>, Status> {
        let initialized =
            self.raft.is_initialized().await.map_err(|e| Status::unavailable(format!("raft: {e}")))?;
        Ok(Response::new(ReplicaIdentity { replica_id: self.id, identity: self.identity, initialized }))
    }
}

/// The `decree.v1.Replica` service of one replica.
pub type Server = ReplicaServer<Service>;

/// The service the other replicas reach `raft` (replica `id`, whose data
/// directory is `identity`) by, to serve beside others.
pub fn service(raft: Raft, id: NodeId, identity: u64) -> Server {
    let service = Service { raft, id, identity, warned: Mutex::new(None) };
    ReplicaServer::new(service).max_decoding_message_size(64 << 20)
}

/// Serves the other replicas on `listener` until the task is aborted.
pub fn serve(raft: Raft, id: NodeId, identity: u64, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let incoming = decree_runtime::serve::incoming(listener);
    let server = tonic::transport::Server::builder()
        .layer(decree_tls::policy::Authorize)
        .add_service(service(raft, id, identity))
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        if let Err(err) = server.await {
            tracing::warn!(error = %err, "the replica server stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::Links;

    #[test]
    fn a_partition_file_names_the_links_it_cuts() {
        let all = Links { to: u64::MAX, from: u64::MAX };
        assert_eq!(Links::parse(""), Ok(all));
        assert_eq!(Links::parse(" \n"), Ok(all));
        assert_eq!(Links::parse("2"), Ok(Links { to: 1 << 2, from: 1 << 2 }));
        assert_eq!(Links::parse(">2, <3\n"), Ok(Links { to: 1 << 2, from: 1 << 3 }));
        assert_eq!(Links::parse("1 >3"), Ok(Links { to: 1 << 1 | 1 << 3, from: 1 << 1 }));
        assert_eq!(Links::parse("900"), Ok(Links { to: 1 << 63, from: 1 << 63 }));
        assert!(Links::parse(">x").unwrap_err().contains("\">x\""));
        assert!(Links::parse("2 -1").is_err());
        assert!(Links::cuts(Links::parse(">2").unwrap().to, 2));
        assert!(!Links::cuts(Links::parse(">2").unwrap().from, 2));
    }
}
