//! Why a vote is NO, an ack is refused or a transaction aborted, as the
//! engines say it; [`v1::Reason`] is its form on the wire.

use crate::v1;

/// A reason's code. The text beside it is for people; this is for code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not given (an older peer), or not known to this version.
    Unspecified,
    LockConflict,
    ValidationFailed,
    ParticipantUnreachable,
    Timeout,
    ClientAborted,
    ShuttingDown,
    AlreadyDecided,
    Stale,
    WorkLost,
    DiskFull,
    NotPrepared,
    InProgress,
    /// The key is not owned by that participant under its ring: refresh the ring, send again.
    WrongOwner,
    /// The key is moving between owners: ask again in a moment.
    Migrating,
    /// A replica of a coordinator group that does not lead it: nothing was done; ask the leader.
    NotLeader,
    /// A TransactStream named a txid it may not use: not started; send it again under another.
    TxidRefused,
    /// A read of a key a branch in doubt holds: its value may be stale here; read again later.
    InDoubt,
}

impl Reason {
    /// The label metrics and the CLI use: `lock_conflict`, `timeout`, ...
    pub fn label(self) -> &'static str {
        match self {
            Reason::Unspecified => "other",
            Reason::LockConflict => "lock_conflict",
            Reason::ValidationFailed => "validation_failed",
            Reason::ParticipantUnreachable => "unreachable",
            Reason::Timeout => "timeout",
            Reason::ClientAborted => "client",
            Reason::ShuttingDown => "shutting_down",
            Reason::AlreadyDecided => "already_decided",
            Reason::Stale => "stale",
            Reason::WorkLost => "work_lost",
            Reason::DiskFull => "disk_full",
            Reason::NotPrepared => "not_prepared",
            Reason::InProgress => "in_progress",
            Reason::WrongOwner => "wrong_owner",
            Reason::Migrating => "migrating",
            Reason::NotLeader => "not_leader",
            Reason::TxidRefused => "txid_refused",
            Reason::InDoubt => "in_doubt",
        }
    }
}

impl From<Reason> for v1::Reason {
    fn from(reason: Reason) -> Self {
        match reason {
            Reason::Unspecified => v1::Reason::Unspecified,
            Reason::LockConflict => v1::Reason::LockConflict,
            Reason::ValidationFailed => v1::Reason::ValidationFailed,
            Reason::ParticipantUnreachable => v1::Reason::ParticipantUnreachable,
            Reason::Timeout => v1::Reason::Timeout,
            Reason::ClientAborted => v1::Reason::ClientAborted,
            Reason::ShuttingDown => v1::Reason::ShuttingDown,
            Reason::AlreadyDecided => v1::Reason::AlreadyDecided,
            Reason::Stale => v1::Reason::Stale,
            Reason::WorkLost => v1::Reason::WorkLost,
            Reason::DiskFull => v1::Reason::DiskFull,
            Reason::NotPrepared => v1::Reason::NotPrepared,
            Reason::InProgress => v1::Reason::InProgress,
            Reason::WrongOwner => v1::Reason::WrongOwner,
            Reason::Migrating => v1::Reason::Migrating,
            Reason::NotLeader => v1::Reason::NotLeader,
            Reason::TxidRefused => v1::Reason::TxidRefused,
            Reason::InDoubt => v1::Reason::InDoubt,
        }
    }
}

impl From<v1::Reason> for Reason {
    fn from(reason: v1::Reason) -> Self {
        match reason {
            v1::Reason::Unspecified => Reason::Unspecified,
            v1::Reason::LockConflict => Reason::LockConflict,
            v1::Reason::ValidationFailed => Reason::ValidationFailed,
            v1::Reason::ParticipantUnreachable => Reason::ParticipantUnreachable,
            v1::Reason::Timeout => Reason::Timeout,
            v1::Reason::ClientAborted => Reason::ClientAborted,
            v1::Reason::ShuttingDown => Reason::ShuttingDown,
            v1::Reason::AlreadyDecided => Reason::AlreadyDecided,
            v1::Reason::Stale => Reason::Stale,
            v1::Reason::WorkLost => Reason::WorkLost,
            v1::Reason::DiskFull => Reason::DiskFull,
            v1::Reason::NotPrepared => Reason::NotPrepared,
            v1::Reason::InProgress => Reason::InProgress,
            v1::Reason::WrongOwner => Reason::WrongOwner,
            v1::Reason::Migrating => Reason::Migrating,
            v1::Reason::NotLeader => Reason::NotLeader,
            v1::Reason::TxidRefused => Reason::TxidRefused,
            v1::Reason::InDoubt => Reason::InDoubt,
        }
    }
}

impl Reason {
    /// `status` carrying this code in its [`crate::REASON_METADATA`]
    /// metadata: how a refusal that is a gRPC status says why, as data.
    pub fn on_status(self, mut status: tonic::Status) -> tonic::Status {
        if self == Reason::Unspecified {
            return status;
        }
        if let Ok(value) = self.to_wire().to_string().parse() {
            status.metadata_mut().insert(crate::REASON_METADATA, value);
        }
        status
    }

    /// The code a status carries in its metadata ([`Reason::Unspecified`] if none).
    pub fn of_status(status: &tonic::Status) -> Reason {
        status
            .metadata()
            .get(crate::REASON_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map_or(Reason::Unspecified, Reason::from_wire)
    }

    /// The code a wire field carries; a value this version does not know is [`Reason::Unspecified`].
    pub fn from_wire(code: i32) -> Reason {
        v1::Reason::try_from(code).map(Reason::from).unwrap_or(Reason::Unspecified)
    }

    pub fn to_wire(self) -> i32 {
        v1::Reason::from(self) as i32
    }
}

/// Whether a failed call got no answer: the peer could not be reached, the
/// call broke on the way (the process died with it, the connection reset),
/// or no answer came in time (tonic ends a call past its timeout as
/// `Cancelled`; grpc elsewhere, the Python SDK's or a proxy's, as
/// `DeadlineExceeded`). Only a call that may be repeated is sent again on
/// it; an answer, even a refusal, is final. The coordinator's phase two and
/// Abort resends, the clients' and the participants' repeated calls all ask
/// this.
pub fn unanswered(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_answer_in_time_is_no_answer_and_every_refusal_is_final() {
        use tonic::Code;
        let none = [Code::Unavailable, Code::Unknown, Code::Cancelled, Code::DeadlineExceeded];
        let answers = [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        for code in none {
            assert!(unanswered(&tonic::Status::new(code, "")), "{code:?} is no answer");
        }
        for code in answers {
            assert!(!unanswered(&tonic::Status::new(code, "")), "{code:?} is an answer");
        }
    }

    #[test]
    fn every_code_round_trips_and_unknown_ones_are_unspecified() {
        for code in 1..=14 {
            let reason = Reason::from_wire(code);
            assert_ne!(reason, Reason::Unspecified, "{code} has no domain reason");
            assert_eq!(reason.to_wire(), code);
        }
        assert_eq!(Reason::from_wire(0), Reason::Unspecified);
        assert_eq!(Reason::from_wire(999), Reason::Unspecified, "a code from a newer peer");
    }
}
