//! The gRPC handlers: decode, validate into domain types, call the runtime, encode.

use std::sync::Arc;
use std::time::Instant;

use decree_proto::v1::kv_server::Kv;
use decree_proto::v1::participant_server::Participant;
use decree_proto::{v1, InvalidInput, KvOp, TxId};
use tonic::{Request, Response, Status};

use crate::engine::{Ack, Vote};
use crate::kv::KvStore;
use crate::postgres::Postgres;
use crate::resource::Resource;
use crate::runtime::{Handle, ShuttingDown};

/// Most keys one Get may read.
const MAX_GET_KEYS: usize = 10_000;

#[derive(Clone)]
pub struct ParticipantService {
    handle: Handle,
    resource: Arc<dyn Resource>,
    name: String,
}

impl ParticipantService {
    pub(crate) fn new(handle: Handle, resource: Arc<dyn Resource>, name: String) -> Self {
        ParticipantService { handle, resource, name }
    }
}

impl From<ShuttingDown> for Status {
    fn from(err: ShuttingDown) -> Self {
        Status::unavailable(err.to_string())
    }
}

fn ack(ack: Ack) -> Result<(), Status> {
    match ack {
        Ack::Done => Ok(()),
        Ack::Refused { reason } => Err(Status::failed_precondition(reason)),
    }
}

fn txid(text: &str) -> Result<TxId, Status> {
    Ok(text.parse::<TxId>()?)
}

#[tonic::async_trait]
impl Participant for ParticipantService {
    async fn prepare(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        let request = request.into_inner();
        let txid = txid(&request.txid)?;
        let vote = match self.resource.keys(&request.payload) {
            Err(reason) => Vote::No { reason },
            Ok(keys) => {
                self.handle
                    .prepare(txid, keys, request.payload, request.one_phase, request.coordinator_incarnation)
                    .await?
            }
        };
        let (vote, reason) = match vote {
            Vote::Yes => (v1::Vote::Yes, String::new()),
            Vote::No { reason } => (v1::Vote::No, reason),
            Vote::ReadOnly => (v1::Vote::ReadOnly, String::new()),
            Vote::Committed => (v1::Vote::Committed, String::new()),
        };
        Ok(Response::new(v1::PrepareResponse { vote: vote as i32, reason }))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let txid = txid(&request.into_inner().txid)?;
        ack(self.handle.commit(txid).await?)?;
        Ok(Response::new(v1::CommitResponse {}))
    }

    async fn abort(&self, request: Request<v1::AbortRequest>) -> Result<Response<v1::AbortResponse>, Status> {
        let txid = txid(&request.into_inner().txid)?;
        ack(self.handle.abort(txid).await?)?;
        Ok(Response::new(v1::AbortResponse {}))
    }

    async fn list_in_doubt(
        &self,
        _request: Request<v1::ListInDoubtRequest>,
    ) -> Result<Response<v1::ListInDoubtResponse>, Status> {
        let now = Instant::now();
        let branches = self
            .handle
            .in_doubt()
            .await?
            .into_iter()
            .map(|b| v1::InDoubtBranch {
                txid: b.txid.to_string(),
                age_ms: now.duration_since(b.since).as_millis() as u64,
                locked_keys: b.keys,
            })
            .collect();
        Ok(Response::new(v1::ListInDoubtResponse { branches, participant: self.name.clone() }))
    }
}

/// Where the Kv service reads committed values.
#[derive(Clone)]
pub(crate) enum Reads {
    Rocks(KvStore),
    Postgres(Postgres),
}

impl Reads {
    async fn get(&self, keys: Vec<String>) -> Result<Vec<v1::KeyValue>, Status> {
        match self {
            Reads::Rocks(store) => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || {
                    keys.into_iter()
                        .map(|key| store.get(&key).map(|value| v1::KeyValue { key, value }))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))
            }
            Reads::Postgres(pg) => pg.get(&keys).await.map_err(Status::unavailable),
        }
    }
}

#[derive(Clone)]
pub struct KvService {
    reads: Reads,
    handle: Handle,
}

impl KvService {
    pub(crate) fn new(reads: Reads, handle: Handle) -> Self {
        KvService { reads, handle }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        let keys = request.into_inner().keys;
        if keys.len() > MAX_GET_KEYS {
            let why = format!("at most {MAX_GET_KEYS} keys per Get");
            return Err(InvalidInput::Field { field: "keys", why }.into());
        }
        for key in &keys {
            KvOp::check_key(key)?;
        }
        // A locked key is being changed by a branch: wait for its decision to be applied.
        self.handle.until_unlocked(keys.clone()).await?;
        let values = self.reads.get(keys).await?;
        Ok(Response::new(v1::GetResponse { values }))
    }

    async fn execute(
        &self,
        _request: Request<v1::ExecuteRequest>,
    ) -> Result<Response<v1::ExecuteResponse>, Status> {
        Err(Status::unimplemented(
            "interactive work at the KV participant is not supported yet; use Coordinator.Transact",
        ))
    }
}
