//! The gRPC handlers: decode, validate into domain types, call the runtime,
//! encode. Nothing else happens here.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use decree_proto::v1::coordinator_server::Coordinator;
use decree_proto::v1::registry_server::Registry;
use decree_proto::v1::{self, Outcome};
use decree_proto::{InvalidInput, ParticipantName, TxId};
use tonic::{Request, Response, Status};

use crate::engine::Decided;
use crate::lease::{self, StreamLeases};
use crate::membership::Change;
use crate::registry::Role;
use crate::runtime::Handle;
use crate::CoordinatorError;

/// Longest prepare deadline or idle timeout a client may ask for.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// A transaction's branches: each participant and its work.
type Branches = Vec<(ParticipantName, Vec<u8>)>;

/// Up to this many branches, a request's names are checked for a repeat by a scan.
const SCANNED_BRANCHES: usize = 8;

/// Whether `name` names one of the `earlier` branches. A transaction's few
/// names are scanned; past [`SCANNED_BRANCHES`], `seen` (filled only then,
/// and kept by the caller across calls) keeps a request naming many
/// participants from costing a scan per name.
fn named_before(earlier: &Branches, name: &ParticipantName, seen: &mut BTreeSet<ParticipantName>) -> bool {
    if earlier.len() < SCANNED_BRANCHES {
        return earlier.iter().any(|(e, _)| e == name);
    }
    if seen.is_empty() {
        seen.extend(earlier.iter().map(|(e, _)| e.clone()));
    }
    !seen.insert(name.clone())
}

#[derive(Clone)]
pub struct Service {
    handle: Handle,
    membership: std::sync::Arc<crate::membership::Membership>,
    /// Turns true at shutdown: open TransactStreams end, so the server can finish.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Service {
    pub(crate) fn new(
        handle: Handle,
        membership: std::sync::Arc<crate::membership::Membership>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Service { handle, membership, stopping }
    }

    /// One one-shot transaction: decided, or refused before it started.
    /// `txid`: issued (and announced) already.
    async fn run_transact(
        &self,
        request: v1::TransactRequest,
        span: tracing::Span,
        txid: Option<TxId>,
    ) -> Result<Response<v1::TransactResponse>, Status> {
        let timeout = self.timeout(request.timeout_ms, self.handle.config.prepare_timeout());
        let (branches, participants) = self.branches(request.branches)?;
        let (txid, decided) = self.handle.transact(branches, timeout, span, txid).await?;
        decided_response(txid, decided, participants, request.pending_outcome)
    }

    fn timeout(&self, ms: u32, default: Duration) -> Duration {
        if ms == 0 {
            default
        } else {
            Duration::from_millis(ms.into()).min(MAX_CLIENT_TIMEOUT)
        }
    }

    /// A request's branches, checked, and the names as the request spelled
    /// them (which the response echoes: moved, not copied).
    fn branches(&self, branches: Vec<v1::Branch>) -> Result<(Branches, Vec<String>), CoordinatorError> {
        if branches.is_empty() {
            return Err(field("branches", "a transaction needs at least one branch"));
        }
        let limit = self.handle.config.max_message_bytes;
        let size: usize = branches.iter().map(|b| b.payload.len()).sum();
        if size > limit {
            return Err(field(
                "branches",
                format!("payload of {size} bytes exceeds the limit of {limit} bytes"),
            ));
        }
        let mut out: Branches = Vec::with_capacity(branches.len());
        let mut spelled = Vec::with_capacity(branches.len());
        let mut seen = BTreeSet::new();
        for branch in branches {
            let Some(name) = self.handle.registry.named(&branch.participant) else {
                // Not enrolled: an invalid name says so, a valid one is unknown.
                let name: ParticipantName = branch.participant.parse()?;
                return Err(field("branches", format!("unknown participant {name:?}")));
            };
            if named_before(&out, &name, &mut seen) {
                return Err(field("branches", format!("participant {name:?} appears twice")));
            }
            out.push((name, branch.payload));
            spelled.push(branch.participant);
        }
        Ok((out, spelled))
    }
}

fn field(field: &'static str, why: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Invalid(InvalidInput::Field { field, why: why.into() })
}

fn txid(text: &str) -> Result<TxId, CoordinatorError> {
    Ok(text.parse::<TxId>()?)
}

/// The response for a decided transaction. An unknown outcome is never a
/// guess: outcome PENDING with the reason for a client that reads it
/// (`pending_outcome`), else the gRPC status UNKNOWN naming the txid.
fn decided_response(
    txid: TxId,
    decided: Decided,
    participants: Vec<String>,
    pending_outcome: bool,
) -> Result<Response<v1::TransactResponse>, Status> {
    let (outcome, code, reason) = match decided {
        Decided::Committed => (Outcome::Committed, decree_proto::Reason::Unspecified, String::new()),
        Decided::Aborted { code, reason } => (Outcome::Aborted, code, reason),
        Decided::Unknown { code, reason } if pending_outcome => (Outcome::Pending, code, reason),
        Decided::Unknown { reason, .. } => {
            let mut status =
                Status::unknown(format!("outcome of {txid} unknown: {reason}; ask GetOutcome later"));
            if let Ok(value) = txid.to_string().parse() {
                status.metadata_mut().insert(decree_proto::TXID_METADATA, value);
            }
            return Err(status);
        }
    };
    Ok(Response::new(v1::TransactResponse {
        txid: txid.to_string(),
        outcome: outcome as i32,
        reason,
        participants,
        reason_code: code.to_wire(),
    }))
}

/// The span of a transaction's decision and phase two (its `txid` is recorded
/// once assigned): a child of the client's trace when spans are exported.
fn transaction_span(metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    let span =
        tracing::info_span!(target: decree_runtime::trace::TXN, "transaction", txid = tracing::field::Empty);
    decree_runtime::trace::adopt(&span, metadata);
    span
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn transact(
        &self,
        request: Request<v1::TransactRequest>,
    ) -> Result<Response<v1::TransactResponse>, Status> {
        let span = transaction_span(request.metadata());
        self.run_transact(request.into_inner(), span, None).await
    }

    type TransactStreamStream = decree_runtime::serve::Answers<v1::TransactStreamAnswer>;

    async fn transact_stream(
        &self,
        request: Request<tonic::Streaming<v1::TransactStreamRequest>>,
    ) -> Result<Response<Self::TransactStreamStream>, Status> {
        // Shared by the stream's messages: one count to raise per message,
        // not each of the service's handles.
        let service = Arc::new(self.clone());
        let leases = Arc::new(Mutex::new(StreamLeases::default()));
        // Each as its own Transact would be; what is not read when the coordinator stops was not started.
        let answers = decree_runtime::serve::serve_stream(
            "transact",
            request.into_inner(),
            self.stopping.clone(),
            self.handle.config.process.max_concurrent_streams as usize,
            move |message: v1::TransactStreamRequest, early: decree_runtime::serve::Early<_>| {
                let span = tracing::info_span!(target: decree_runtime::trace::TXN, "transaction", txid = tracing::field::Empty);
                decree_runtime::trace::adopt_context(&span, &message.trace_context);
                let id = message.id;
                // Leases are granted and taken here, as the stream is read, so in order.
                let named = match (&message.request, message.lease_txids) {
                    (None, count) if count > 0 => Named::Lease(service.lease(&leases, count)),
                    _ if message.txid.is_empty() => Named::Issued,
                    _ => match service.take_leased(&leases, &message.txid) {
                        Ok(txid) => Named::Leased(txid),
                        Err(err) => Named::Refused(err.into()),
                    },
                };
                let service = Arc::clone(&service);
                async move {
                    let request = message.request.unwrap_or_default();
                    let txid = match named {
                        Named::Lease(lease) => {
                            return v1::TransactStreamAnswer { id, lease: Some(lease), ..Default::default() }
                        }
                        Named::Refused(status) => return stream_answer(id, Err(status)),
                        Named::Leased(txid) => Some(txid),
                        // Its txid, told before anything of it happens: a client
                        // that loses this coordinator can ask the next one.
                        Named::Issued if request.announce_txid => {
                            let txid = service.handle.issue_txid();
                            early.send(v1::TransactStreamAnswer {
                                id,
                                txid: txid.to_string(),
                                started: true,
                                ..Default::default()
                            });
                            Some(txid)
                        }
                        Named::Issued => None,
                    };
                    stream_answer(id, service.run_transact(request, span, txid).await)
                }
            },
        );
        Ok(Response::new(answers))
    }

    async fn begin(&self, request: Request<v1::BeginRequest>) -> Result<Response<v1::BeginResponse>, Status> {
        let timeout = self.timeout(request.into_inner().timeout_ms, self.handle.config.idle_timeout());
        let txid = self.handle.begin(timeout).await?;
        Ok(Response::new(v1::BeginResponse { txid: txid.to_string() }))
    }

    async fn enlist(
        &self,
        request: Request<v1::EnlistRequest>,
    ) -> Result<Response<v1::EnlistResponse>, Status> {
        let request = request.into_inner();
        let txid = txid(&request.txid)?;
        let participant: ParticipantName = request.participant.parse().map_err(CoordinatorError::from)?;
        if !self.handle.registry.contains(&participant) {
            return Err(field("participant", format!("unknown participant {participant:?}")).into());
        }
        self.handle.enlist(txid, participant, request.run).await?;
        Ok(Response::new(v1::EnlistResponse {}))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitTransactionRequest>,
    ) -> Result<Response<v1::TransactResponse>, Status> {
        let span = transaction_span(request.metadata());
        let request = request.into_inner();
        let txid = txid(&request.txid)?;
        let decided = self.handle.commit(txid, self.handle.config.prepare_timeout(), span).await?;
        decided_response(txid, decided, Vec::new(), request.pending_outcome)
    }

    async fn abort(
        &self,
        request: Request<v1::AbortTransactionRequest>,
    ) -> Result<Response<v1::AbortTransactionResponse>, Status> {
        let txid = txid(&request.into_inner().txid)?;
        self.handle.abort(txid).await?;
        Ok(Response::new(v1::AbortTransactionResponse {}))
    }

    async fn retry(&self, request: Request<v1::RetryRequest>) -> Result<Response<v1::RetryResponse>, Status> {
        let txid = txid(&request.into_inner().txid)?;
        let participants = self.handle.retry(txid).await?.into_iter().map(|p| p.to_string()).collect();
        let outcome = self.handle.outcome(txid).await?;
        Ok(Response::new(v1::RetryResponse { participants, outcome: outcome as i32 }))
    }

    async fn list_stuck(
        &self,
        _request: Request<v1::ListStuckRequest>,
    ) -> Result<Response<v1::ListStuckResponse>, Status> {
        let branches = self
            .handle
            .stuck()
            .await?
            .into_iter()
            .map(|s| v1::StuckBranch {
                txid: s.txid.to_string(),
                participant: s.participant.to_string(),
                reason: s.reason,
            })
            .collect();
        Ok(Response::new(v1::ListStuckResponse { branches }))
    }

    async fn list_transactions(
        &self,
        request: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        let request = request.into_inner();
        let only = if request.txid.is_empty() { None } else { Some(txid(&request.txid)?) };
        let limit = match request.limit {
            0 => 100,
            n => (n as usize).min(crate::stats::RECENT),
        };
        let (in_flight, recent) = self.handle.transactions(only, limit).await?;
        let in_flight = in_flight
            .into_iter()
            .map(|t| v1::TransactionInfo {
                txid: t.txid.to_string(),
                state: t.state.into(),
                participants: t.participants.iter().map(ToString::to_string).collect(),
                waiting: t.waiting.iter().map(ToString::to_string).collect(),
                ..Default::default()
            })
            .collect();
        let recent = recent
            .into_iter()
            .map(|d| v1::TransactionInfo {
                txid: d.txid.to_string(),
                state: match d.ended {
                    crate::stats::Ended::Committed => "committed",
                    crate::stats::Ended::Aborted => "aborted",
                    crate::stats::Ended::Unknown => "unknown",
                }
                .into(),
                participants: d.participants,
                waiting: Vec::new(),
                reason: d.reason,
                reason_code: d.code.to_wire(),
                started_unix_ms: d.started_unix_ms,
                decided_unix_ms: d.decided_unix_ms,
                latency_us: d.latency_us,
            })
            .collect();
        Ok(Response::new(v1::ListTransactionsResponse { in_flight, recent }))
    }

    async fn get_stats(
        &self,
        request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let seconds = match request.into_inner().seconds {
            0 => 60,
            n => u64::from(n),
        };
        let (seconds, totals, in_flight) = self.handle.stats(seconds).await?;
        let seconds = seconds
            .into_iter()
            .map(|s| v1::StatsSecond {
                unix_s: s.unix_s,
                committed: s.committed,
                aborted: s.aborted,
                unknown: s.unknown,
                p50_ms: s.p50_ms,
                p99_ms: s.p99_ms,
                max_ms: s.max_ms,
            })
            .collect();
        Ok(Response::new(v1::GetStatsResponse {
            seconds,
            committed: totals.committed,
            aborted: totals.aborted,
            unknown: totals.unknown,
            in_flight: in_flight as u64,
        }))
    }

    async fn get_outcome(
        &self,
        request: Request<v1::GetOutcomeRequest>,
    ) -> Result<Response<v1::GetOutcomeResponse>, Status> {
        let txid = txid(&request.into_inner().txid)?;
        let outcome = self.handle.outcome(txid).await?;
        Ok(Response::new(v1::GetOutcomeResponse { outcome: outcome as i32 }))
    }
}

#[tonic::async_trait]
impl Registry for Service {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        if let Some(caller) = decree_tls::policy::caller(&request) {
            caller.may_be(&request.get_ref().name)?;
        }
        let request = request.into_inner();
        let name: ParticipantName = request.name.parse().map_err(CoordinatorError::from)?;
        let role = Role::from_wire(request.role);
        if role == Role::Service && self.membership.in_ring(name.as_str()) {
            return Err(Status::failed_precondition(format!(
                "{name} is in the ring: it holds keys, so it cannot enroll as a service (decree ring remove {name} first)"
            )));
        }
        let refused = |err: crate::registry::EnrollError| {
            if let crate::registry::EnrollError::Taken { holder, .. } = &err {
                metrics::counter!(crate::registry::ENROLLMENTS_REFUSED).increment(1);
                tracing::warn!(participant = %name, %holder, address = %request.address, "enrollment refused: a live participant holds the name");
            }
            Status::from(err)
        };
        // Recorded before it is reachable: see `Registry::may_enroll`.
        self.handle.registry.may_enroll(&name, &request.address).map_err(refused)?;
        self.handle
            .store
            .save_participant(&name, &request.address, role.to_wire())
            .await
            .map_err(CoordinatorError::from)?;
        self.handle.registry.enroll(name.clone(), &request.address, role, true).map_err(refused)?;
        tracing::info!(participant = %name, address = %request.address, ?role, join = request.join, "participant enrolled");
        self.handle.enrolled(name.clone());
        if request.join && role == Role::Member {
            let membership = self.membership.clone();
            crate::tasks::spawn(async move { membership.join(name).await });
        }
        Ok(Response::new(v1::EnrollResponse {
            coordinator_incarnation: self.handle.incarnation,
            coordinator_id: format!("{:08x}", self.handle.coordinator_id),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        if let Some(caller) = decree_tls::policy::caller(&request) {
            caller.may_be(&request.get_ref().name)?;
        }
        let request = request.into_inner();
        let name: ParticipantName = request.name.parse().map_err(CoordinatorError::from)?;
        let known = self.handle.registry.heartbeat(&name, &request.address);
        Ok(Response::new(v1::HeartbeatResponse { known, coordinator_incarnation: self.handle.incarnation }))
    }

    async fn move_participant(
        &self,
        request: Request<v1::MoveParticipantRequest>,
    ) -> Result<Response<v1::MoveParticipantResponse>, Status> {
        let caller = decree_tls::policy::caller(&request).cloned();
        let request = request.into_inner();
        let name: ParticipantName = request.name.parse().map_err(CoordinatorError::from)?;
        let operator = decree_tls::policy::operator_of(caller.as_ref(), request.operator.trim());
        let (operator, reason) = (audit("operator", &operator)?, audit("reason", &request.reason)?);
        let role = match self.handle.registry.status(&name) {
            Some((role, _)) => role,
            None => return Err(crate::registry::EnrollError::Unknown(name).into()),
        };
        // Durable first: a move that is answered survives a restart.
        crate::registry::endpoint(&request.address).map_err(CoordinatorError::from)?;
        self.handle
            .store
            .save_participant(&name, &request.address, role.to_wire())
            .await
            .map_err(CoordinatorError::from)?;
        let previous = self.handle.registry.relocate(&name, &request.address)?;
        tracing::warn!(participant = %name, %previous, address = %request.address, %operator, %reason, "participant moved by an operator");
        Ok(Response::new(v1::MoveParticipantResponse { previous }))
    }

    async fn list_participants(
        &self,
        _request: Request<v1::ListParticipantsRequest>,
    ) -> Result<Response<v1::ListParticipantsResponse>, Status> {
        let routing = self.membership.routing();
        let shares: std::collections::BTreeMap<String, f64> = routing.current.shares().into_iter().collect();
        let participants = self
            .handle
            .registry
            .list()
            .into_iter()
            .map(|m| v1::ParticipantInfo {
                share: shares.get(m.name.as_str()).copied().unwrap_or(0.0),
                in_ring: self.membership.in_ring(m.name.as_str()),
                name: m.name.to_string(),
                address: m.address,
                state: if m.up { "up" } else { "down" }.to_owned(),
                role: m.role.to_wire(),
                heard_ms_ago: m
                    .heard_ago
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)),
            })
            .collect();
        Ok(Response::new(v1::ListParticipantsResponse { participants }))
    }

    async fn get_ring(
        &self,
        _request: Request<v1::GetRingRequest>,
    ) -> Result<Response<v1::GetRingResponse>, Status> {
        Ok(Response::new(self.membership.describe().await))
    }

    async fn change_ring(
        &self,
        request: Request<v1::ChangeRingRequest>,
    ) -> Result<Response<v1::ChangeRingResponse>, Status> {
        let request = request.into_inner();
        let name: ParticipantName = request.name.parse().map_err(CoordinatorError::from)?;
        let change = match v1::change_ring_request::Op::try_from(request.op) {
            Ok(v1::change_ring_request::Op::Add) => Change::Add { name, weight: request.weight.max(1) },
            Ok(v1::change_ring_request::Op::Remove) => Change::Remove { name },
            Ok(v1::change_ring_request::Op::Weight) => Change::Weight { name, weight: request.weight },
            _ => return Err(field("op", "expected OP_ADD, OP_REMOVE or OP_WEIGHT").into()),
        };
        let routing = self.membership.change(change).await?;
        Ok(Response::new(v1::ChangeRingResponse { routing: Some(routing.to_wire()) }))
    }
}

/// Under which txid a streamed transaction runs, decided as it is read.
enum Named {
    /// Not a transaction: a lease of txids, granted.
    Lease(v1::TxidLease),
    /// One this coordinator issues (and announces, if asked).
    Issued,
    /// One leased on this stream, taken.
    Leased(TxId),
    /// One it may not use: not started.
    Refused(Status),
}

impl Service {
    /// Grants `count` txids (at most [`lease::MOST`]) to this stream.
    fn lease(&self, leases: &Mutex<StreamLeases>, count: u32) -> v1::TxidLease {
        let count = count.min(lease::MOST);
        let first = self.handle.lease_txids(count);
        leases.lock().unwrap_or_else(|p| p.into_inner()).grant(first.sequence, count, Instant::now());
        v1::TxidLease { first: first.to_string(), count, valid_ms: lease::LIFE.as_millis() as u32 }
    }

    /// The leased txid `text` names, taken for a transaction, or why not.
    fn take_leased(&self, leases: &Mutex<StreamLeases>, text: &str) -> Result<TxId, CoordinatorError> {
        let txid: TxId = text.parse()?;
        if !self.handle.issues(txid) {
            return Err(CoordinatorError::TxidRefused {
                txid,
                why: "not leased by this coordinator's current incarnation".into(),
            });
        }
        let taken = leases.lock().unwrap_or_else(|p| p.into_inner()).take(txid.sequence, Instant::now());
        taken.map(|()| txid).map_err(|why| CoordinatorError::TxidRefused { txid, why })
    }
}

/// A streamed transaction's answer, as its own Transact would have ended.
fn stream_answer(
    id: u64,
    result: Result<Response<v1::TransactResponse>, Status>,
) -> v1::TransactStreamAnswer {
    match result {
        Ok(response) => {
            v1::TransactStreamAnswer { id, response: Some(response.into_inner()), ..Default::default() }
        }
        Err(status) => v1::TransactStreamAnswer {
            id,
            response: None,
            code: status.code() as i32,
            message: status.message().to_owned(),
            txid: status
                .metadata()
                .get(decree_proto::TXID_METADATA)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            reason_code: decree_proto::Reason::of_status(&status).to_wire(),
            started: false,
            lease: None,
        },
    }
}

/// An audited move's `operator` or `reason`: given, and short enough to log.
fn audit<'a>(field: &'static str, value: &'a str) -> Result<&'a str, CoordinatorError> {
    match value.trim() {
        "" => {
            Err(InvalidInput::Field { field, why: "a move of a participant needs one (it is logged)".into() }
                .into())
        }
        v if v.len() > 1024 => {
            Err(InvalidInput::Field { field, why: "longer than 1024 bytes".into() }.into())
        }
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first repeat is found whether it comes among the first few names
    /// (the scan) or far past them (the set), and distinct names pass.
    #[test]
    fn a_repeated_name_is_found_by_the_scan_and_past_it() {
        let name = |i: usize| -> ParticipantName { format!("p{i}").parse().unwrap() };
        let first_repeat = |names: &[usize]| -> Option<usize> {
            let (mut earlier, mut seen): (Branches, _) = (Vec::new(), BTreeSet::new());
            for (at, i) in names.iter().enumerate() {
                if named_before(&earlier, &name(*i), &mut seen) {
                    return Some(at);
                }
                earlier.push((name(*i), Vec::new()));
            }
            None
        };
        assert_eq!(first_repeat(&[1, 2, 3]), None);
        assert_eq!(first_repeat(&[1, 2, 1]), Some(2));
        let many: Vec<usize> = (0..40).collect();
        assert_eq!(first_repeat(&many), None);
        for repeated in [0, 3, 7, 8, 20, 38] {
            let mut names = many.clone();
            names.push(repeated);
            assert_eq!(first_repeat(&names), Some(40), "p{repeated} again after 40 names");
            let mut early = many[..SCANNED_BRANCHES + 2].to_vec();
            early.push(early[repeated % early.len()]);
            assert_eq!(first_repeat(&early), Some(SCANNED_BRANCHES + 2));
        }
    }
}
