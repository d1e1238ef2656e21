//! The border between the engine's answers and the `decree.v1` messages:
//! every vote, ack and learned outcome crosses the wire through here, in the
//! gRPC handlers and in the simulator alike.

use decree_proto::v1;
use tonic::Status;

use crate::engine::{Ack, Outcome, Vote};

/// The PrepareResponse that carries `vote`.
pub fn prepare_response(vote: Vote) -> v1::PrepareResponse {
    let (vote, reason) = match vote {
        Vote::Yes => (v1::Vote::Yes, String::new()),
        Vote::No { reason } => (v1::Vote::No, reason),
        Vote::ReadOnly => (v1::Vote::ReadOnly, String::new()),
        Vote::Committed => (v1::Vote::Committed, String::new()),
    };
    v1::PrepareResponse { vote: vote as i32, reason }
}

/// The answer to a Commit or an Abort that carries `ack`.
pub fn ack_status(ack: Ack) -> Result<(), Status> {
    match ack {
        Ack::Done => Ok(()),
        Ack::Refused { reason } => Err(Status::failed_precondition(reason)),
        // Not FAILED_PRECONDITION: a coordinator asking a one-phase outcome with
        // Abort reads that as "committed". OUT_OF_RANGE: below what is remembered.
        Ack::Forgotten { reason } => Err(Status::out_of_range(reason)),
    }
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
