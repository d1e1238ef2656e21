//! The gRPC handlers: decode, validate into domain types, call the runtime, encode.

use std::sync::Arc;
use std::time::Instant;

use decree_client::Coordinators;
use decree_proto::v1::coordinator_client::CoordinatorClient;
use decree_proto::v1::kv_server::Kv;
use decree_proto::v1::participant_server::Participant;
use decree_proto::{v1, InvalidInput, KvOp, TxId};
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::Vote;
use crate::kv::KvStore;
use crate::postgres::Postgres;
use crate::resource::Resource;
use crate::runtime::{Handle, ShuttingDown};
use crate::wire;

/// How long a Resolve waits for the coordinator's answer before taking it for gone.
const COORDINATOR_ASKED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// Most commits one CommitBatch may carry.
const MAX_COMMIT_BATCH: usize = 4096;

/// The refusal of a batch of more than [`MAX_COMMIT_BATCH`] commits.
fn too_many(request: &v1::CommitBatchRequest) -> Option<Status> {
    (request.commits.len() > MAX_COMMIT_BATCH).then(|| {
        let why = format!("at most {MAX_COMMIT_BATCH} commits per batch");
        InvalidInput::Field { field: "commits", why }.into()
    })
}

/// Most keys one Get may read.
const MAX_GET_KEYS: usize = 10_000;

/// How often a read tries again while the ownership of its keys changes under it.
const READ_ATTEMPTS: usize = 8;

#[derive(Clone)]
pub struct ParticipantService {
    handle: Handle,
    resource: Arc<dyn Resource>,
    name: String,
    /// Turns true at shutdown: open PrepareStreams end (the coordinator opens
    /// new ones, which are refused), so the server can finish.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Most Prepares of one PrepareStream handled at once.
    max_in_progress: usize,
    /// Asked before a heuristic decision: refused while it answers.
    coordinator: CoordinatorClient<Coordinators>,
    /// [`PREPARE_SECONDS`], looked up once.
    prepare_seconds: metrics::Histogram,
}

/// How long a Prepare took here, from its arrival to its vote (lock waits,
/// the prepared record's group commit and sync): this participant's share of
/// a transaction's latency.
pub const PREPARE_SECONDS: &str = "decree_prepare_seconds";

impl ParticipantService {
    /// Phase two for many branches (a CommitBatch, or one message of a
    /// CommitStream): each as its own Commit would be, all at once (the
    /// engine group-commits them), answered in request order.
    async fn commit_all(&self, request: v1::CommitBatchRequest) -> v1::CommitBatchResponse {
        let v1::CommitBatchRequest { commits, typed_ack } = request;
        let results = futures::future::join_all(commits.into_iter().map(|commit| {
            let span = tracing::info_span!(target: decree_runtime::trace::TXN, "commit", txid = %commit.txid, participant = %self.name);
            decree_runtime::trace::adopt_context(&span, &commit.trace_context);
            async move {
                let answer = match txid(&commit.txid) {
                    Ok(txid) => self.handle.commit(txid).await.map_err(Status::from),
                    Err(status) => Err(status),
                };
                wire::commit_result(commit.txid, answer, typed_ack)
            }
            .instrument(span)
        }))
        .await;
        v1::CommitBatchResponse { results }
    }

    /// Phase one for one branch: validate, lock, make the prepared record durable, vote.
    async fn vote(&self, request: v1::PrepareRequest) -> Result<v1::PrepareResponse, Status> {
        let started = std::time::Instant::now();
        let txid = txid(&request.txid)?;
        let vote = match self.resource.keys(&request.payload) {
            Err(reason) => Vote::No { code: decree_proto::Reason::ValidationFailed, reason },
            Ok(keys) => {
                self.handle
                    .prepare(
                        txid,
                        keys,
                        request.payload,
                        request.one_phase,
                        request.coordinator_incarnation,
                        request.interactive,
                    )
                    .await?
            }
        };
        self.prepare_seconds.record(started.elapsed().as_secs_f64());
        Ok(wire::prepare_response(vote))
    }

    pub(crate) fn new(
        handle: Handle,
        resource: Arc<dyn Resource>,
        name: String,
        stopping: tokio::sync::watch::Receiver<bool>,
        max_in_progress: usize,
        coordinator: CoordinatorClient<Coordinators>,
    ) -> Self {
        let prepare_seconds = metrics::histogram!(PREPARE_SECONDS);
        ParticipantService { handle, resource, name, stopping, max_in_progress, coordinator, prepare_seconds }
    }

    /// A heuristic decision is for a coordinator that is gone: refused while
    /// it answers for `txid` (it knows the outcome, or is still deciding it,
    /// and this participant learns it by asking). Allowed when it cannot be
    /// reached, or does not own the txid.
    async fn coordinator_answers(&self, txid: TxId) -> Result<(), Status> {
        let request = v1::GetOutcomeRequest { txid: txid.to_string() };
        let mut coordinator = self.coordinator.clone();
        match tokio::time::timeout(COORDINATOR_ASKED_FOR, coordinator.get_outcome(request)).await {
            Ok(Ok(answer)) => {
                let outcome =
                    v1::Outcome::try_from(answer.into_inner().outcome).unwrap_or(v1::Outcome::Unspecified);
                let why = match outcome {
                    v1::Outcome::Pending => "is still deciding it".to_owned(),
                    known => format!("answers {}; this participant learns it by asking", known.as_str_name()),
                };
                Err(Status::failed_precondition(format!(
                    "refused: the coordinator {why}; a heuristic decision is only for when it is gone"
                )))
            }
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => Ok(()), // not its txid
            Ok(Err(_)) | Err(_) => Ok(()),
        }
    }
}

impl From<ShuttingDown> for Status {
    fn from(err: ShuttingDown) -> Self {
        Status::unavailable(err.to_string())
    }
}

/// The span a request about one transaction runs in: named for the RPC, keyed
/// by txid, and a child of the caller's trace when spans are exported.
macro_rules! txn_span {
    ($name:literal, $service:expr, $request:expr) => {{
        let span = tracing::info_span!(target: decree_runtime::trace::TXN, $name, txid = %$request.get_ref().txid, participant = %$service.name);
        decree_runtime::trace::adopt(&span, $request.metadata());
        span
    }};
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
        let span = txn_span!("prepare", self, request);
        self.vote(request.into_inner()).instrument(span).await.map(Response::new)
    }

    type PrepareStreamStream = decree_runtime::serve::Answers<v1::PrepareAnswer>;

    async fn prepare_stream(
        &self,
        request: Request<tonic::Streaming<v1::PrepareRequest>>,
    ) -> Result<Response<Self::PrepareStreamStream>, Status> {
        // Shared by the stream's messages: one count to raise per message,
        // not a copy of the name and each of the service's handles.
        let service = Arc::new(self.clone());
        // Each as its own Prepare would be, concurrently: answers go out as they are ready.
        let answers = decree_runtime::serve::serve_stream(
            "prepare",
            request.into_inner(),
            self.stopping.clone(),
            self.max_in_progress,
            move |request: v1::PrepareRequest, _early| {
                let span = tracing::info_span!(target: decree_runtime::trace::TXN, "prepare", txid = %request.txid, participant = %service.name);
                decree_runtime::trace::adopt_context(&span, &request.trace_context);
                let service = Arc::clone(&service);
                async move {
                    let txid = request.txid.clone();
                    match service.vote(request).await {
                        Ok(response) => v1::PrepareAnswer {
                            txid,
                            response: Some(response),
                            code: 0,
                            message: String::new(),
                        },
                        Err(status) => v1::PrepareAnswer {
                            txid,
                            response: None,
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        },
                    }
                }
                .instrument(span)
            },
        );
        Ok(Response::new(answers))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let span = txn_span!("commit", self, request);
        async move {
            let request = request.into_inner();
            let txid = txid(&request.txid)?;
            wire::commit_response(self.handle.commit(txid).await?, request.typed_ack).map(Response::new)
        }
        .instrument(span)
        .await
    }

    async fn commit_batch(
        &self,
        request: Request<v1::CommitBatchRequest>,
    ) -> Result<Response<v1::CommitBatchResponse>, Status> {
        let request = request.into_inner();
        match too_many(&request) {
            None => Ok(Response::new(self.commit_all(request).await)),
            Some(status) => Err(status),
        }
    }

    type CommitStreamStream = decree_runtime::serve::Answers<v1::CommitBatchResponse>;

    async fn commit_stream(
        &self,
        request: Request<tonic::Streaming<v1::CommitBatchRequest>>,
    ) -> Result<Response<Self::CommitStreamStream>, Status> {
        let service = Arc::new(self.clone());
        // Each message as its own CommitBatch would be, concurrently: answered as each is durable.
        let answers = decree_runtime::serve::serve_stream(
            "commit",
            request.into_inner(),
            self.stopping.clone(),
            self.max_in_progress,
            move |request: v1::CommitBatchRequest, _early| {
                let service = Arc::clone(&service);
                async move {
                    match too_many(&request) {
                        None => service.commit_all(request).await,
                        // Refused as a whole: each commit answers the refusal, naming its txid.
                        Some(status) => v1::CommitBatchResponse {
                            results: (request.commits.into_iter())
                                .map(|commit| wire::commit_result(commit.txid, Err(status.clone()), false))
                                .collect(),
                        },
                    }
                }
            },
        );
        Ok(Response::new(answers))
    }

    async fn abort(&self, request: Request<v1::AbortRequest>) -> Result<Response<v1::AbortResponse>, Status> {
        let span = txn_span!("abort", self, request);
        async move {
            let request = request.into_inner();
            let txid = txid(&request.txid)?;
            wire::abort_response(self.handle.abort(txid).await?, request.typed_ack).map(Response::new)
        }
        .instrument(span)
        .await
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

    async fn resolve(
        &self,
        request: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        let caller = decree_tls::policy::caller(&request).cloned();
        let mut request = request.into_inner();
        request.operator = decree_tls::policy::operator_of(caller.as_ref(), &request.operator);
        let txid = txid(&request.txid)?;
        if request.reason.trim().is_empty() {
            return Err(InvalidInput::Field {
                field: "reason",
                why: "a heuristic decision needs a reason".into(),
            }
            .into());
        }
        self.coordinator_answers(txid).await?;
        match self.handle.heuristic(txid, request.commit, request.reason, request.operator).await? {
            Ok(()) => Ok(Response::new(v1::ResolveResponse {})),
            Err(reason) => Err(Status::failed_precondition(reason)),
        }
    }

    async fn list_heuristics(
        &self,
        _request: Request<v1::ListHeuristicsRequest>,
    ) -> Result<Response<v1::ListHeuristicsResponse>, Status> {
        let records = self.handle.heuristics().await?.map_err(Status::internal)?;
        let heuristics = records
            .into_iter()
            .map(|(txid, r)| v1::Heuristic {
                txid: txid.to_string(),
                commit: r.commit,
                reason: r.reason,
                operator: r.operator,
                decided_at_unix_ms: r.decided_at_unix_ms,
                coordinator_outcome: match r.coordinator {
                    1 => v1::Outcome::Committed,
                    2 => v1::Outcome::Aborted,
                    _ => v1::Outcome::Unspecified,
                } as i32,
                contradicted: r.contradicted,
            })
            .collect();
        Ok(Response::new(v1::ListHeuristicsResponse { participant: self.name.clone(), heuristics }))
    }

    async fn list_locks(
        &self,
        _request: Request<v1::ListLocksRequest>,
    ) -> Result<Response<v1::ListLocksResponse>, Status> {
        let (table, stats) = self.handle.locks().await?;
        let locks = table
            .into_iter()
            .map(|entry| v1::LockEntry {
                key: entry.key,
                holder: entry.holder.to_string(),
                state: entry.state.to_owned(),
                waiters: entry.waiters.iter().map(TxId::to_string).collect(),
            })
            .collect();
        Ok(Response::new(v1::ListLocksResponse {
            participant: self.name.clone(),
            locks,
            waits: stats.waits,
            wait_timeouts: stats.wait_timeouts,
            conflicts: stats.conflicts,
        }))
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
    coordinator: CoordinatorClient<Coordinators>,
    name: String,
    /// This run of the process, named in every Enlist: a branch begun by an
    /// earlier run (whose work a restart lost) cannot be joined again.
    run: u64,
}

impl KvService {
    pub(crate) fn new(
        reads: Reads,
        handle: Handle,
        coordinator: CoordinatorClient<Coordinators>,
        name: String,
    ) -> Self {
        KvService { reads, handle, coordinator, name, run: rand::random::<u64>() | 1 }
    }

    /// Enlists this participant in `txid` with the coordinator: again, for
    /// up to [`ENLIST_WAIT`], while a replica answers that it does not lead
    /// or none answers (a group's failover, a coordinator restarting or one
    /// that died with the call: an Enlist is idempotent, and the next leader
    /// or incarnation knows the transaction); refused, the work is too.
    async fn enlist(&self, txid: TxId) -> Result<(), Status> {
        let request =
            v1::EnlistRequest { txid: txid.to_string(), participant: self.name.clone(), run: self.run };
        let deadline = tokio::time::Instant::now() + ENLIST_WAIT;
        let mut pause = std::time::Duration::from_millis(20);
        loop {
            let mut coordinator = self.coordinator.clone();
            let why = match tokio::time::timeout(ENLIST_TIMEOUT, coordinator.enlist(request.clone())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(status))
                    if decree_client::leader::is_not_leader(&status)
                        || decree_client::unanswered(&status) =>
                {
                    status.message().to_owned()
                }
                Ok(Err(status)) => {
                    let why = status.message();
                    return Err(Status::aborted(format!("the coordinator refused to enlist: {why}")));
                }
                Err(_) => "the coordinator did not answer the enlistment".to_owned(),
            };
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(Status::aborted(format!("could not enlist with the coordinator: {why}")));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(200));
        }
    }
}

/// How long one enlistment call may take.
const ENLIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long enlisting may take in all, through a group's failover.
const ENLIST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Most ops and reads in one Execute.
const MAX_EXECUTE_OPS: usize = 10_000;

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        let v1::GetRequest { keys, ring_epoch } = request.into_inner();
        if keys.len() > MAX_GET_KEYS {
            let why = format!("at most {MAX_GET_KEYS} keys per Get");
            return Err(InvalidInput::Field { field: "keys", why }.into());
        }
        for key in &keys {
            KvOp::check_key(key)?;
        }
        // A locked key is being changed by a branch: wait for its decision to be applied.
        if let Err(reason) = self.handle.until_unlocked(keys.clone()).await? {
            return Err(decree_proto::Reason::InDoubt.on_status(Status::unavailable(reason)));
        }
        let Reads::Rocks(store) = &self.reads else {
            let values = self.reads.get(keys).await?;
            return Ok(Response::new(v1::GetResponse { values, redirect: None }));
        };
        let own = store.ownership();
        // Ownership changes only once a batch's commit is durable: a read that
        // finds it unchanged around reading the values read them as the owner.
        for _ in 0..READ_ATTEMPTS {
            let generation = own.generation();
            let (mine, refused): (Vec<String>, Vec<String>) =
                keys.iter().cloned().partition(|key| own.check(None, key).is_ok());
            let values = self.reads.get(mine).await?;
            if own.generation() != generation {
                continue;
            }
            let Some(first) = refused.first() else {
                return Ok(Response::new(v1::GetResponse { values, redirect: None }));
            };
            let refusal = own.check(None, first).err().unwrap_or(crate::membership::Refusal {
                code: decree_proto::Reason::Migrating,
                reason: format!("key {first:?} is moving"),
                epoch: own.epoch(),
            });
            if ring_epoch == 0 {
                // A client from before the ring would take a missing key for absent.
                return Err(crate::migration::refused(refusal));
            }
            let redirect = v1::Redirect {
                reason_code: refusal.code.to_wire(),
                reason: refusal.reason,
                ring_epoch: refusal.epoch,
                keys: refused,
            };
            return Ok(Response::new(v1::GetResponse { values, redirect: Some(redirect) }));
        }
        let reason = "the keys' ownership is changing: ask again".to_owned();
        Err(decree_proto::Reason::Migrating.on_status(Status::unavailable(reason)))
    }

    async fn scan_moving(
        &self,
        request: Request<v1::ScanMovingRequest>,
    ) -> Result<Response<v1::ScanMovingResponse>, Status> {
        let Reads::Rocks(store) = &self.reads else {
            return Err(Status::unimplemented("this participant holds no keys of the ring"));
        };
        crate::migration::scan(store, request.into_inner()).await.map(Response::new)
    }

    async fn execute(
        &self,
        request: Request<v1::ExecuteRequest>,
    ) -> Result<Response<v1::ExecuteResponse>, Status> {
        let span = txn_span!("execute", self, request);
        // Work that reached the engine finishes even if the caller goes away:
        // a handler dropped halfway would leave its branch busy and its keys locked.
        let service = self.clone();
        let work = async move { service.execute_now(request).await };
        tokio::spawn(work.instrument(span)).await.map_err(|e| Status::internal(e.to_string()))?
    }
}

impl KvService {
    async fn execute_now(
        &self,
        request: Request<v1::ExecuteRequest>,
    ) -> Result<Response<v1::ExecuteResponse>, Status> {
        let Reads::Rocks(store) = &self.reads else {
            return Err(Status::unimplemented(
                "this participant takes no interactive work; use Coordinator.Transact",
            ));
        };
        let mut request = request.into_inner();
        let txid = txid(&request.txid)?;
        if let Some(step) = request.migration.take() {
            return crate::migration::step(store, &self.handle, txid, step, || self.enlist(txid))
                .await
                .map(Response::new);
        }
        if request.ops.len() + request.get.len() > MAX_EXECUTE_OPS {
            let why = format!("at most {MAX_EXECUTE_OPS} ops and reads per Execute");
            return Err(InvalidInput::Field { field: "ops", why }.into());
        }
        let ops = request.ops.into_iter().map(KvOp::try_from).collect::<Result<Vec<_>, _>>()?;
        for key in &request.get {
            KvOp::check_key(key)?;
        }
        let mut keys = crate::kv::keys(&ops);
        keys.extend(request.get.iter().cloned());
        let granted = match self.handle.work(txid, keys).await? {
            Ok(granted) => granted,
            Err(refused) => return Err(wire::work_refused(refused.code, refused.reason, refused.aborted)),
        };
        if granted.first {
            if let Err(status) = self.enlist(txid).await {
                self.handle.work_done(txid, None);
                let _ = self.handle.abort(txid).await;
                return Err(status);
            }
        }
        // The keys are locked by this transaction: the committed values cannot change
        // under it, and neither can their owner unless it is here.
        let refusal = store
            .ownership()
            .check_all(Some(txid), ops.iter().map(KvOp::key).chain(request.get.iter().map(String::as_str)));
        if let Err(refusal) = refusal {
            self.handle.work_done(txid, None);
            return Err(crate::migration::refused(refusal));
        }
        let (store, get) = (store.clone(), request.get);
        let outcome = tokio::task::spawn_blocking(move || {
            let mut all = crate::kv::ops(&granted.so_far)?;
            all.extend(ops.iter().cloned());
            let overlay = store.evaluate(&all)?;
            let values = get
                .into_iter()
                .map(|key| {
                    let value = match overlay.value(&key) {
                        Some(value) => value.clone(),
                        None => store.get(&key).map_err(|e| e.to_string())?,
                    };
                    Ok(v1::KeyValue { key, value })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok::<_, String>((values, ops))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        match outcome {
            Ok((values, ops)) => {
                let ops = ops.into_iter().map(Into::into).collect();
                let done = v1::KvBatch { ops, migration: None }.encode_to_vec();
                self.handle.work_done(txid, Some(done));
                Ok(Response::new(v1::ExecuteResponse { values }))
            }
            Err(reason) => {
                self.handle.work_done(txid, None);
                Err(Status::failed_precondition(reason))
            }
        }
    }
}
