//! The `decree.v1.Replica` gRPC service: openraft's messages between the
//! replicas of a group, each serialized (MessagePack, [`crate::codec`]) in a
//! `RaftMessage`, and its answers likewise.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use decree_proto::v1::replica_client::ReplicaClient;
use decree_proto::v1::replica_server::{Replica as ReplicaRpc, ReplicaServer};
use decree_proto::v1::RaftMessage;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::{NodeId, Raft, TypeConfig};

/// Names a file whose existence cuts this replica off from the others: a
/// test's network partition that leaves clients and participants reaching
/// it. While the file exists, every Raft message this replica would send
/// fails as unreachable and every one it receives is refused, both ways
/// lost as in a partition; removed, messages flow again. Checked every
/// [`PARTITION_POLL`]; unset, a message costs one relaxed load.
pub const PARTITION_FILE_ENV: &str = "DECREE_PARTITION_FILE";
const PARTITION_POLL: Duration = Duration::from_millis(10);

/// Whether [`PARTITION_FILE_ENV`]'s file exists now.
fn partitioned() -> bool {
    static CUT: OnceLock<Option<&'static AtomicBool>> = OnceLock::new();
    let cut = CUT.get_or_init(|| {
        let path = PathBuf::from(std::env::var_os(PARTITION_FILE_ENV)?);
        let cut: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(path.exists())));
        std::thread::Builder::new()
            .name("partition-watch".into())
            .spawn(move || loop {
                let now = path.exists();
                if cut.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(partitioned = now, file = %path.display(), "this replica's Raft messages are {}", if now { "cut off" } else { "flowing again" });
                }
                std::thread::sleep(PARTITION_POLL);
            })
            .ok()?;
        Some(cut)
    });
    cut.is_some_and(|cut| cut.load(Ordering::Relaxed))
}

fn partition_error() -> std::io::Error {
    std::io::Error::other(format!("partitioned from the other replicas ({PARTITION_FILE_ENV})"))
}

/// Connects to the other replicas by the addresses in the membership.
#[derive(Debug, Default, Clone)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        let client = Endpoint::from_shared(format!("http://{}", node.addr))
            .map(|endpoint| {
                let endpoint = endpoint.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true);
                ReplicaClient::new(decree_tls::channel(endpoint))
            })
            .ok();
        Connection { target, client, appends: None, streams: true }
    }
}

/// The connection to one other replica.
pub struct Connection {
    target: NodeId,
    /// `None`: its address does not parse (every call is unreachable).
    client: Option<ReplicaClient<Channel>>,
    /// The open `AppendEntriesStream`, if any.
    appends: Option<Appends>,
    /// Whether the other replica serves `AppendEntriesStream` (false once it
    /// answered UNIMPLEMENTED: every append is then a call of its own).
    streams: bool,
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

impl Connection {
    /// Sends `request` as `call` and reads the remote replica's result.
    async fn call<Req, Resp, E>(
        &mut self,
        call: Call,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if partitioned() {
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
                Call::Vote => client.clone().vote(message).await.map(Response::into_inner),
                Call::Snapshot => client.clone().install_snapshot(message).await.map(Response::into_inner),
            }
        };
        let answer = match tokio::time::timeout(option.hard_ttl(), sent).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)))
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            crate::codec::decode(&answer.body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
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
            return client.append_entries(message).await.map(Response::into_inner);
        }
        if self.appends.as_ref().is_some_and(|appends| appends.owed) {
            self.appends = None;
        }
        let appends = match &mut self.appends {
            Some(appends) => appends,
            None => {
                let (requests, queue) = tokio::sync::mpsc::channel(1);
                let stream = tokio_stream::wrappers::ReceiverStream::new(queue);
                match client.append_entries_stream(stream).await {
                    Ok(answers) => {
                        self.appends.insert(Appends { requests, answers: answers.into_inner(), owed: false })
                    }
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        self.streams = false;
                        return client.append_entries(message).await.map(Response::into_inner);
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
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Call::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Call::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Call::Vote, &rpc, &option).await
    }
}

/// The server side: hands each message to this replica's Raft node.
pub struct Service {
    raft: Raft,
}

/// A message from another replica, decoded; refused while partitioned.
fn receive<T: DeserializeOwned>(message: RaftMessage) -> Result<T, Status> {
    if partitioned() {
        return Err(Status::unavailable(partition_error().to_string()));
    }
    crate::codec::decode(&message.body).map_err(|e| Status::invalid_argument(format!("raft message: {e}")))
}

#[tonic::async_trait]
impl ReplicaRpc for Service {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = receive(request.into_inner())?;
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
        let answers = request.into_inner().then(move |message| {
            let raft = raft.clone();
            async move {
                let rpc: AppendEntriesRequest<TypeConfig> = receive(message?)?;
                Ok(encode(&raft.append_entries(rpc).await))
            }
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = receive(request.into_inner())?;
        Ok(Response::new(encode(&self.raft.vote(rpc).await)))
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = receive(request.into_inner())?;
        Ok(Response::new(encode(&self.raft.install_snapshot(rpc).await)))
    }
}

/// The `decree.v1.Replica` service of one replica.
pub type Server = ReplicaServer<Service>;

/// The service the other replicas reach `raft` by, to serve beside others.
pub fn service(raft: Raft) -> Server {
    ReplicaServer::new(Service { raft }).max_decoding_message_size(64 << 20)
}

/// Serves the other replicas on `listener` until the task is aborted.
pub fn serve(raft: Raft, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let incoming = decree_runtime::serve::incoming(listener);
    let server = tonic::transport::Server::builder()
        .layer(decree_tls::policy::Authorize)
        .add_service(service(raft))
        .serve_with_incoming(incoming);
    tokio::spawn(async move {
        if let Err(err) = server.await {
            tracing::warn!(error = %err, "the replica server stopped");
        }
    })
}
