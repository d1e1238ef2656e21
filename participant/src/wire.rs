//! The border between the engine's answers and the `decree.v1` messages:
//! every vote, ack and learned outcome crosses the wire through here, in the
//! gRPC handlers and in the simulator alike.
//!
//! Acks are typed (an OK answer carrying [`v1::Ack`] and a [`v1::Reason`])
//! when the coordinator asks for them (`typed_ack`); for a coordinator that
//! does not, a refusal is the gRPC status it has always read:
//! FAILED_PRECONDITION for REFUSED, OUT_OF_RANGE for FORGOTTEN.

use crate::config::Role;
use decree_proto::v1;
use tonic::Status;

use crate::engine::{Ack, Outcome, Vote};

/// The PrepareResponse that carries `vote`.
pub fn prepare_response(vote: Vote) -> v1::PrepareResponse {
    let (vote, code, reason) = match vote {
        Vote::Yes => (v1::Vote::Yes, decree_proto::Reason::Unspecified, String::new()),
        Vote::No { code, reason } => (v1::Vote::No, code, reason),
        Vote::ReadOnly => (v1::Vote::ReadOnly, decree_proto::Reason::Unspecified, String::new()),
        Vote::Committed => (v1::Vote::Committed, decree_proto::Reason::Unspecified, String::new()),
    };
    v1::PrepareResponse { vote: vote as i32, reason, reason_code: code.to_wire() }
}

/// An ack's parts as the typed answer carries them.
fn typed(ack: Ack) -> (v1::Ack, i32, String) {
    match ack {
        Ack::Done => (v1::Ack::Done, 0, String::new()),
        Ack::Refused { code, reason } => (v1::Ack::Refused, code.to_wire(), reason),
        Ack::Forgotten { reason } => (v1::Ack::Forgotten, decree_proto::Reason::Stale.to_wire(), reason),
    }
}

/// The status an untyped answer carries for `ack`.
fn legacy(ack: Ack) -> Result<(), Status> {
    match ack {
        Ack::Done => Ok(()),
        Ack::Refused { reason, .. } => Err(Status::failed_precondition(reason)),
        // Not FAILED_PRECONDITION: a coordinator asking a one-phase outcome with
        // Abort reads that as "committed". OUT_OF_RANGE: below what is remembered.
        Ack::Forgotten { reason } => Err(Status::out_of_range(reason)),
    }
}

/// The answer to a Commit.
pub fn commit_response(ack: Ack, typed_ack: bool) -> Result<v1::CommitResponse, Status> {
    if typed_ack {
        let (ack, reason_code, reason) = typed(ack);
        return Ok(v1::CommitResponse { ack: ack as i32, reason_code, reason });
    }
    legacy(ack).map(|()| v1::CommitResponse::default())
}

/// The answer to an Abort.
pub fn abort_response(ack: Ack, typed_ack: bool) -> Result<v1::AbortResponse, Status> {
    if typed_ack {
        let (ack, reason_code, reason) = typed(ack);
        return Ok(v1::AbortResponse { ack: ack as i32, reason_code, reason });
    }
    legacy(ack).map(|()| v1::AbortResponse::default())
}

/// One result of a CommitBatch: as its own Commit would answer.
pub fn commit_result(txid: String, answer: Result<Ack, Status>, typed_ack: bool) -> v1::CommitResult {
    match answer.and_then(|ack| commit_response(ack, typed_ack)) {
        Ok(response) => v1::CommitResult {
            txid,
            code: 0,
            message: response.reason,
            ack: response.ack,
            reason_code: response.reason_code,
        },
        Err(status) => v1::CommitResult {
            txid,
            code: status.code() as i32,
            message: status.message().to_owned(),
            ack: 0,
            reason_code: 0,
        },
    }
}

/// The answer to interactive work that may not run: ABORTED if the branch
/// is aborted here (the transaction is over), FAILED_PRECONDITION if only
/// this request is refused; the reason's code rides in the
/// [`decree_proto::REASON_METADATA`] metadata (a status has no other field).
pub fn work_refused(code: decree_proto::Reason, reason: String, aborted: bool) -> Status {
    code.on_status(if aborted { Status::aborted(reason) } else { Status::failed_precondition(reason) })
}

/// The question a branch in doubt asks its coordinator.
pub fn get_outcome_request(txid: decree_proto::TxId) -> v1::GetOutcomeRequest {
    v1::GetOutcomeRequest { txid: txid.to_string() }
}

/// Enrollment under `name`, reachable at `address`.
pub fn enroll_request(name: &str, address: &str, role: Role, join: bool) -> v1::EnrollRequest {
    let role = match role {
        Role::Member => v1::Role::Member,
        Role::Service => v1::Role::Service,
    };
    v1::EnrollRequest { name: name.to_owned(), address: address.to_owned(), role: role as i32, join }
}

pub fn heartbeat_request(name: &str, address: &str) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest { name: name.to_owned(), address: address.to_owned() }
}

/// What a branch in doubt takes from the coordinator's answer to GetOutcome:
/// `None` means ask again later.
///
/// A branch prepared here and not acked: had it committed, the coordinator
/// would keep its decision until this participant acked, so FORGOTTEN means
/// it never committed (docs/protocol.md#forgetting).
pub fn learned(outcome: v1::Outcome) -> Option<Outcome> {
    match outcome {
        v1::Outcome::Committed => Some(Outcome::Committed),
        v1::Outcome::Aborted | v1::Outcome::Forgotten => Some(Outcome::Aborted),
        v1::Outcome::Pending | v1::Outcome::Unspecified => None,
    }
}
