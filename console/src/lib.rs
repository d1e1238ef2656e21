//! decree's operator console: one web page, its assets embedded in the
//! binary (no JavaScript library, no build step), and JSON endpoints that
//! call the same client APIs the CLI does (`decree participants`, `decree
//! in-doubt`, `decree locks`, `decree stuck`, `decree heuristics`, `decree
//! retry`, `decree resolve`), plus the coordinator's `ListTransactions` and
//! `GetStats`. Served by `decree console` and by the coordinator's
//! `--console-listen`. It speaks to the cluster as the identity it runs under
//! (under mutual TLS, its certificate): what that identity's roles refuse, the
//! page shows refused (an observer's console sees, an operator's acts).
//!
//! Handlers are thin: parse, call the client with a deadline, encode.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use decree_client::{v1, Client, ClientError, Outcome};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/console.js");
const STYLE: &str = include_str!("../assets/console.css");

/// How long a page's call to the cluster may take before it is answered "unreachable".
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// How often the participant list (and so where the in-doubt, lock and
/// heuristics pages ask) is read again.
const REFRESH: Duration = Duration::from_secs(2);

struct Console {
    url: String,
    /// Connected on first use, and again after the coordinator was unreachable.
    client: Mutex<Option<Client>>,
}

type Shared = Arc<Console>;

/// An error as the page shows it: the HTTP status, the gRPC status code of
/// the call that failed (when one did), and a message to read.
struct Failure(StatusCode, Option<tonic::Code>, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let code = self.1.map(|c| format!("{c:?}"));
        (self.0, Json(json!({ "error": self.2, "code": code }))).into_response()
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        let message = err.to_string();
        let code = match &err {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        };
        let status = match (&err, code) {
            (_, Some(tonic::Code::PermissionDenied)) => StatusCode::FORBIDDEN,
            (_, Some(tonic::Code::InvalidArgument)) | (ClientError::Invalid(_), _) => StatusCode::BAD_REQUEST,
            (_, Some(tonic::Code::FailedPrecondition)) => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Failure(status, code, message)
    }
}

type Answer = Result<Json<Value>, Failure>;

impl Console {
    async fn client(&self) -> Result<Client, Failure> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = within(Client::connect(&self.url)).await?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// `call` with [`CALL_TIMEOUT`].
async fn within<T>(call: impl std::future::Future<Output = Result<T, ClientError>>) -> Result<T, Failure> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Failure(
            StatusCode::GATEWAY_TIMEOUT,
            None,
            "no answer in time (unreachable, or held up)".into(),
        )),
    }
}

/// The console's routes, over the coordinator at `url`.
pub fn router(url: &str) -> Router {
    let console = Arc::new(Console { url: url.to_owned(), client: Mutex::new(None) });
    let refresher = Arc::downgrade(&console);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH).await;
            let Some(console) = refresher.upgrade() else { return };
            let client = console.client.lock().await.clone();
            if let Some(client) = client {
                let _ = tokio::time::timeout(CALL_TIMEOUT, client.refresh()).await;
            }
        }
    });
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX) }))
        .route("/console.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], SCRIPT) }))
        .route("/console.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE) }))
        .route("/api/cluster", get(cluster))
        .route("/api/stats", get(stats))
        .route("/api/transactions", get(transactions))
        .route("/api/in-doubt", get(in_doubt))
        .route("/api/locks", get(locks))
        .route("/api/stuck", get(stuck))
        .route("/api/retry", post(retry))
        .route("/api/resolve", post(resolve))
        .with_state(console)
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    coordinator_url: &str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(coordinator_url)).with_graceful_shutdown(shutdown).await
}

fn outcome_name(outcome: i32) -> &'static str {
    match v1::Outcome::try_from(outcome) {
        Ok(v1::Outcome::Committed) => "committed",
        Ok(v1::Outcome::Aborted) => "aborted",
        Ok(v1::Outcome::Pending) => "pending",
        Ok(v1::Outcome::Forgotten) => "forgotten",
        _ => "unknown",
    }
}

fn reason_name(code: i32) -> String {
    v1::Reason::try_from(code).map_or_else(|_| "REASON_UNSPECIFIED".into(), |r| r.as_str_name().to_owned())
}

/// The coordinator (and its group), the participants and the ring.
async fn cluster(State(console): State<Shared>) -> Answer {
    let client = console.client().await?;
    let participants = within(client.participants()).await?;
    let ring = within(client.ring_status()).await?;
    // A single coordinator is not a group: no view.
    let group = within(client.group()).await.ok();
    let members: Vec<Value> = ring
        .members
        .iter()
        .map(|m| json!({ "name": m.name, "weight": m.weight, "share": m.share, "target_share": m.target_share }))
        .collect();
    Ok(Json(json!({
        "coordinator": console.url,
        "group": group.map(|g| json!({
            "replica_id": g.replica_id, "role": g.role, "term": g.term, "leader_id": g.leader_id,
            "leader_url": g.leader_url, "last_log_index": g.last_log_index, "applied_index": g.applied_index,
            "members": g.members.iter().map(|m| json!({
                "id": m.id, "address": m.address, "voter": m.voter,
                "matched_index": m.replication_known.then_some(m.matched_index),
                "lag": m.replication_known.then_some(m.lag),
            })).collect::<Vec<_>>(),
        })),
        "participants": participants.iter().map(|p| json!({
            "name": p.name, "address": p.address, "state": p.state, "role": p.role, "share": p.share,
            "in_ring": p.in_ring, "heard_ms_ago": p.heard_ago.map(|d| d.as_millis() as u64),
        })).collect::<Vec<_>>(),
        "ring": {
            "epoch": ring.routing.as_ref().map_or(0, |r| r.epoch),
            "members": members,
            "migration": ring.migration.as_ref().map(|m| json!({
                "change": m.change, "moved_keys": m.moved_keys, "remaining_keys": m.remaining_keys,
                "last_error": m.last_error,
            })),
            "queued": ring.queued,
        },
    })))
}

#[derive(serde::Deserialize)]
struct StatsQuery {
    seconds: Option<u32>,
}

/// Decisions per second and decision latency over the last minutes.
async fn stats(State(console): State<Shared>, Query(query): Query<StatsQuery>) -> Answer {
    let client = console.client().await?;
    let stats = within(client.stats(query.seconds.unwrap_or(300))).await?;
    Ok(Json(json!({
        "committed": stats.committed, "aborted": stats.aborted, "unknown": stats.unknown,
        "in_flight": stats.in_flight,
        "seconds": stats.seconds.iter().map(|s| json!({
            "t": s.unix_s, "committed": s.committed, "aborted": s.aborted, "unknown": s.unknown,
            "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms,
        })).collect::<Vec<_>>(),
    })))
}

#[derive(serde::Deserialize)]
struct TxnQuery {
    txid: Option<String>,
}

fn txn_json(t: &v1::TransactionInfo) -> Value {
    json!({
        "txid": t.txid, "state": t.state, "participants": t.participants, "waiting": t.waiting,
        "reason": t.reason, "reason_code": reason_name(t.reason_code),
        "started_unix_ms": t.started_unix_ms, "decided_unix_ms": t.decided_unix_ms, "latency_us": t.latency_us,
    })
}

/// Transactions in flight and recent decisions; with `txid`, that one, and
/// the coordinator's outcome for it (from its log when no longer recent).
async fn transactions(State(console): State<Shared>, Query(query): Query<TxnQuery>) -> Answer {
    let client = console.client().await?;
    let txid = query.txid.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let listed = within(client.transactions(txid, 200)).await?;
    let outcome = match txid {
        Some(txid) => Some(within(client.status(txid)).await?.as_str()),
        None => None,
    };
    Ok(Json(json!({
        "in_flight": listed.in_flight.iter().map(txn_json).collect::<Vec<_>>(),
        "recent": listed.recent.iter().map(txn_json).collect::<Vec<_>>(),
        "outcome": outcome,
    })))
}

/// Branches prepared and undecided at every participant that answers.
async fn in_doubt(State(console): State<Shared>) -> Answer {
    let client = console.client().await?;
    let (branches, unreachable) = within(client.in_doubt()).await?;
    Ok(Json(json!({
        "branches": branches.iter().map(|b| json!({
            "participant": b.participant, "txid": b.txid, "age_ms": b.age_ms,
            "locked_keys": b.locked_keys,
        })).collect::<Vec<_>>(),
        "unreachable": unreachable,
    })))
}

/// The lock table of every participant that answers.
async fn locks(State(console): State<Shared>) -> Answer {
    let client = console.client().await?;
    let (tables, unreachable) = within(async { Ok(client.locks().await) }).await?;
    Ok(Json(json!({
        "participants": tables.iter().map(|t| json!({
            "participant": t.participant, "waits": t.waits, "wait_timeouts": t.wait_timeouts,
            "conflicts": t.conflicts,
            "locks": t.locks.iter().map(|l| json!({
                "key": l.key, "holder": l.holder, "state": l.state, "waiters": l.waiters,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "unreachable": unreachable,
    })))
}

/// Stuck branches (the coordinator's) and heuristic decisions (the participants').
async fn stuck(State(console): State<Shared>) -> Answer {
    let client = console.client().await?;
    let stuck = within(client.stuck()).await?;
    let (heuristics, unreachable) = within(async { Ok(client.heuristics().await) }).await?;
    Ok(Json(json!({
        "stuck": stuck.iter().map(|s| json!({
            "txid": s.txid, "participant": s.participant, "reason": s.reason,
        })).collect::<Vec<_>>(),
        "heuristics": heuristics.iter().flat_map(|list| list.heuristics.iter().map(|h| json!({
            "participant": list.participant, "txid": h.txid, "commit": h.commit, "reason": h.reason,
            "operator": h.operator, "decided_at_unix_ms": h.decided_at_unix_ms,
            "coordinator_outcome": (h.coordinator_outcome != 0).then(|| outcome_name(h.coordinator_outcome)),
            "contradicted": h.contradicted,
        }))).collect::<Vec<_>>(),
        "unreachable": unreachable,
    })))
}

#[derive(serde::Deserialize)]
struct RetryBody {
    txid: String,
}

/// `decree retry`: redelivers phase two of a transaction now.
async fn retry(State(console): State<Shared>, Json(body): Json<RetryBody>) -> Answer {
    let client = console.client().await?;
    let (participants, outcome) = within(client.retry(body.txid.trim())).await?;
    Ok(Json(json!({ "txid": body.txid.trim(), "participants": participants, "outcome": outcome.as_str() })))
}

#[derive(serde::Deserialize)]
struct ResolveBody {
    participant: String,
    txid: String,
    commit: bool,
    reason: String,
    /// The txid typed again by the operator.
    confirm: String,
    operator: Option<String>,
}

/// `decree resolve`: a heuristic decision at one participant, with a reason
/// and the txid typed again; refused, as the CLI refuses it, while the
/// coordinator can answer for the transaction.
async fn resolve(State(console): State<Shared>, Json(body): Json<ResolveBody>) -> Answer {
    let txid = body.txid.trim();
    if body.confirm.trim() != txid {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            None,
            "the confirmation does not match the txid".into(),
        ));
    }
    if body.reason.trim().is_empty() {
        return Err(Failure(StatusCode::BAD_REQUEST, None, "a heuristic decision needs a reason".into()));
    }
    let client = console.client().await?;
    // The same rule as `decree resolve`: only when the coordinator cannot say.
    if let Ok(Ok(outcome)) = tokio::time::timeout(CALL_TIMEOUT, client.status(txid)).await {
        let why = match outcome {
            Outcome::Pending => "is still deciding it".to_owned(),
            known => format!("knows its outcome: {}; the participants learn it themselves", known.as_str()),
        };
        return Err(Failure(
            StatusCode::CONFLICT,
            None,
            format!("refused: the coordinator {why}; a heuristic decision is only for when it is gone"),
        ));
    }
    let url = client.participant_address(&body.participant).ok_or_else(|| {
        Failure(StatusCode::BAD_REQUEST, None, format!("{} is not an enrolled participant", body.participant))
    })?;
    let operator = body.operator.filter(|o| !o.trim().is_empty()).unwrap_or_else(|| "console".into());
    within(decree_client::resolve_at(&url, txid, body.commit, body.reason.trim(), &operator)).await?;
    Ok(Json(json!({
        "participant": body.participant, "txid": txid,
        "decision": if body.commit { "committed" } else { "aborted" }, "operator": operator,
    })))
}
