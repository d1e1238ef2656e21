//! The border between the `decree.v1` answers of participants and the
//! engine's events: every vote, ack and outcome crosses it through here, in
//! the runtime and in the simulator alike.

use decree_proto::{v1, ParticipantName, Reason, TxId};

use crate::engine::{Event, Known, OnePhaseFound, VoteResult};
use crate::store::Recorded;

/// The Prepare of one branch (the engine's `SendPrepare`), from this incarnation.
pub fn prepare_request(
    txid: TxId,
    payload: Vec<u8>,
    one_phase: bool,
    interactive: bool,
    incarnation: u64,
) -> v1::PrepareRequest {
    v1::PrepareRequest {
        txid: txid.to_string(),
        payload,
        one_phase,
        coordinator_incarnation: incarnation,
        interactive,
        trace_context: Default::default(),
    }
}

/// A Commit, asking for a typed ack.
pub fn commit_request(txid: TxId) -> v1::CommitRequest {
    v1::CommitRequest { txid: txid.to_string(), typed_ack: true }
}

/// Commits coalesced for one participant, each with its trace context, asking for typed acks.
pub fn commit_batch_request(
    commits: impl IntoIterator<Item = (TxId, std::collections::HashMap<String, String>)>,
) -> v1::CommitBatchRequest {
    let commits = commits
        .into_iter()
        .map(|(txid, trace_context)| v1::BatchedCommit { txid: txid.to_string(), trace_context })
        .collect();
    v1::CommitBatchRequest { commits, typed_ack: true }
}

/// An Abort (to tell a branch, or to learn a one-phase outcome), asking for a typed ack.
pub fn abort_request(txid: TxId) -> v1::AbortRequest {
    v1::AbortRequest { txid: txid.to_string(), typed_ack: true }
}

/// Why a participant RPC brought no answer.
#[derive(Debug, Clone)]
pub enum Unanswered {
    NotEnrolled,
    Deadline,
    Refused(tonic::Status),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unanswered::NotEnrolled => f.write_str("not enrolled"),
            Unanswered::Deadline => f.write_str("no answer before the deadline"),
            Unanswered::Refused(status) => f.write_str(status.message()),
        }
    }
}

/// Whether a refusal with `code` may go away by itself (the participant is
/// busy, restarting, or was cut off) rather than say the request itself is
/// wrong, so that asking again is worth it.
pub fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    match code {
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Cancelled | Internal | Unknown
        | Ok => true,
        InvalidArgument | FailedPrecondition | NotFound | AlreadyExists | PermissionDenied
        | Unauthenticated | OutOfRange | Unimplemented | DataLoss => false,
    }
}

/// A participant's answer to Commit or Abort. Coordinators ask for typed
/// answers (`typed_ack`); a participant that predates them answers OK for
/// done and a gRPC status otherwise, read by [`commit_event`] and
/// [`one_phase_found`] as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acked {
    Done,
    Refused { code: Reason, reason: String },
    Forgotten { reason: String },
}

/// The ack an OK answer carries (`ack`, `reason_code` and `reason` of a
/// CommitResponse, AbortResponse or CommitResult).
pub fn acked(ack: i32, reason_code: i32, reason: String) -> Acked {
    match v1::Ack::try_from(ack) {
        // DONE, or the OK of a participant that predates `ack`.
        Ok(v1::Ack::Done | v1::Ack::Unspecified) => Acked::Done,
        Ok(v1::Ack::Refused) => Acked::Refused { code: Reason::from_wire(reason_code), reason },
        Ok(v1::Ack::Forgotten) => Acked::Forgotten { reason },
        // A newer participant's ack this version does not know: never taken for done.
        Err(_) => {
            Acked::Refused { code: Reason::Unspecified, reason: format!("unknown ack {ack}: {reason}") }
        }
    }
}

/// The vote a PrepareResponse carries.
pub fn vote_of(response: v1::PrepareResponse) -> VoteResult {
    match v1::Vote::try_from(response.vote) {
        Ok(v1::Vote::Yes) => VoteResult::Yes,
        Ok(v1::Vote::No) => {
            VoteResult::No { code: Reason::from_wire(response.reason_code), reason: response.reason }
        }
        Ok(v1::Vote::ReadOnly) => VoteResult::ReadOnly,
        Ok(v1::Vote::Committed) => VoteResult::Committed,
        Ok(v1::Vote::Unspecified) | Err(_) => {
            VoteResult::Failed { error: format!("invalid vote {}", response.vote) }
        }
    }
}

/// The vote of a Prepare RPC, answered or not.
pub fn voted(answer: Result<v1::PrepareResponse, Unanswered>) -> VoteResult {
    match answer {
        Ok(response) => vote_of(response),
        Err(unanswered) => VoteResult::Failed { error: unanswered.to_string() },
    }
}

/// What the answer to a Commit means for its branch: acked, refused for good
/// (redelivery stops until an operator retries), or to be redelivered.
pub fn commit_event(txid: TxId, participant: ParticipantName, answer: Result<Acked, Unanswered>) -> Event {
    match answer {
        Ok(Acked::Done) => Event::CommitAcked { txid, participant },
        Ok(Acked::Refused { code, reason }) => Event::CommitRefused {
            txid,
            participant,
            reason: format!("refused ({}): {reason}", code.label()),
        },
        Ok(Acked::Forgotten { reason }) => {
            Event::CommitRefused { txid, participant, reason: format!("forgotten: {reason}") }
        }
        Err(Unanswered::Refused(status)) if !retryable(status.code()) => {
            let reason = format!("{:?}: {}", status.code(), status.message());
            Event::CommitRefused { txid, participant, reason }
        }
        Err(_) => Event::CommitFailed { txid, participant },
    }
}

/// What asking a one-phase participant with Abort found: done means it did
/// not commit (and now cannot: it keeps an abort tombstone); refused as
/// already decided (FAILED_PRECONDITION from older participants) means it
/// committed (answered once durable). Anything else: ask again.
pub fn one_phase_found(answer: Result<Acked, Unanswered>) -> OnePhaseFound {
    match answer {
        Ok(Acked::Done) => OnePhaseFound::Aborted,
        Ok(Acked::Refused { code: Reason::AlreadyDecided, .. }) => OnePhaseFound::Committed,
        Ok(Acked::Forgotten { .. }) => OnePhaseFound::Forgotten,
        Ok(Acked::Refused { .. }) => OnePhaseFound::Unreachable,
        Err(Unanswered::Refused(status)) if status.code() == tonic::Code::FailedPrecondition => {
            OnePhaseFound::Committed
        }
        // An untyped participant's "forgotten" (below what it remembers).
        Err(Unanswered::Refused(status)) if status.code() == tonic::Code::OutOfRange => {
            OnePhaseFound::Forgotten
        }
        Err(_) => OnePhaseFound::Unreachable,
    }
}

/// GetOutcome's answer at a group's leader for a txid it holds nothing of,
/// from what each participant found when asked to abort it (a group records
/// no question before a one-shot one-phase Prepare, so the txid may name a
/// one-phase branch that committed): COMMITTED if one refused, its branch
/// committed; ABORTED only if every one acked, none committed and none ever
/// will (each now votes NO on a late Prepare); PENDING while one is
/// unreachable (it may have committed: ask again); FORGOTTEN if one no longer
/// remembers. No participants: ABORTED (no branch can have committed).
pub fn outcome_asked(found: impl IntoIterator<Item = OnePhaseFound>) -> v1::Outcome {
    let mut outcome = v1::Outcome::Aborted;
    for found in found {
        match found {
            OnePhaseFound::Committed => return v1::Outcome::Committed,
            OnePhaseFound::Unreachable => outcome = v1::Outcome::Pending,
            OnePhaseFound::Forgotten if outcome == v1::Outcome::Aborted => outcome = v1::Outcome::Forgotten,
            OnePhaseFound::Forgotten | OnePhaseFound::Aborted => {}
        }
    }
    outcome
}

/// Whether an Abort of a transaction that has no COMMIT decision (a
/// migration batch an earlier start left undecided) ended its branch at the
/// participant: done, or forgotten, in either version's words (the
/// participant decided the branch long ago and, no decision being made,
/// can only have aborted it). Anything else: ask again later.
pub fn abort_ended(answer: Result<Acked, Unanswered>) -> Result<(), String> {
    match answer {
        Ok(Acked::Done | Acked::Forgotten { .. }) => Ok(()),
        Err(Unanswered::Refused(status)) if status.code() == tonic::Code::OutOfRange => Ok(()),
        Ok(Acked::Refused { reason, .. }) => Err(reason),
        Err(unanswered) => Err(unanswered.to_string()),
    }
}

/// GetOutcome's answer: from memory if the transaction is in flight, else
/// from what the log says.
pub fn outcome_of(known: Option<Known>, recorded: impl FnOnce() -> Recorded) -> v1::Outcome {
    match known {
        Some(Known::Pending) => v1::Outcome::Pending,
        Some(Known::Committing) => v1::Outcome::Committed,
        None => match recorded() {
            Recorded::Committed => v1::Outcome::Committed,
            Recorded::InDoubt => v1::Outcome::Pending,
            Recorded::Forgotten => v1::Outcome::Forgotten,
            Recorded::Absent => v1::Outcome::Aborted,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_phase_question_reads_every_version_of_forgotten_as_forgotten_and_never_as_aborted() {
        let forgotten = Ok(Acked::Forgotten { reason: "below the horizon".into() });
        assert_eq!(one_phase_found(forgotten), OnePhaseFound::Forgotten);
        let untyped = Err(Unanswered::Refused(tonic::Status::out_of_range("below the horizon")));
        assert_eq!(one_phase_found(untyped), OnePhaseFound::Forgotten);
        let decided = Ok(Acked::Refused { code: Reason::AlreadyDecided, reason: "committed".into() });
        assert_eq!(one_phase_found(decided), OnePhaseFound::Committed);
        assert_eq!(one_phase_found(Ok(Acked::Done)), OnePhaseFound::Aborted);
        assert_eq!(one_phase_found(Err(Unanswered::Deadline)), OnePhaseFound::Unreachable);
    }

    #[test]
    fn a_txid_held_nothing_of_is_aborted_only_when_every_participant_says_so() {
        use OnePhaseFound::*;
        assert_eq!(outcome_asked([]), v1::Outcome::Aborted);
        assert_eq!(outcome_asked([Aborted, Aborted, Aborted]), v1::Outcome::Aborted);
        assert_eq!(outcome_asked([Aborted, Committed, Unreachable]), v1::Outcome::Committed);
        assert_eq!(outcome_asked([Unreachable, Aborted, Committed]), v1::Outcome::Committed);
        assert_eq!(outcome_asked([Aborted, Unreachable, Aborted]), v1::Outcome::Pending);
        assert_eq!(outcome_asked([Forgotten, Unreachable]), v1::Outcome::Pending);
        assert_eq!(outcome_asked([Unreachable, Forgotten]), v1::Outcome::Pending);
        assert_eq!(outcome_asked([Aborted, Forgotten]), v1::Outcome::Forgotten);
    }

    #[test]
    fn an_undecided_batch_is_ended_where_its_abort_is_done_or_forgotten_in_either_version() {
        assert_eq!(abort_ended(Ok(Acked::Done)), Ok(()));
        assert_eq!(abort_ended(Ok(Acked::Forgotten { reason: "below the horizon".into() })), Ok(()));
        let untyped = Err(Unanswered::Refused(tonic::Status::out_of_range("below the horizon")));
        assert_eq!(abort_ended(untyped), Ok(()));
        let refused = Ok(Acked::Refused { code: Reason::Unspecified, reason: "no".into() });
        assert_eq!(abort_ended(refused), Err("no".to_owned()));
        assert!(abort_ended(Err(Unanswered::Deadline)).is_err());
        let down = Err(Unanswered::Refused(tonic::Status::unavailable("connection refused")));
        assert!(abort_ended(down).is_err());
    }
}
