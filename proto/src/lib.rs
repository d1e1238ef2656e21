//! The decree wire protocol (`decree.v1`) and its domain types.
//!
//! [`v1`] is generated from `proto/decree/v1/*.proto`, the contract that
//! participants in any language implement. The rest of this crate converts
//! untrusted wire values into validated domain types ([`TxId`],
//! [`ParticipantName`], [`KvOp`]) once, at the border: code past a gRPC handler
//! never sees a malformed id. This crate does no I/O.

mod kv;
mod reason;
pub mod ring;
mod txid;

pub use kv::{KvOp, KEY_MAX_BYTES};
pub use reason::{unanswered, Reason};
pub use txid::{ParticipantName, TxId, TXID_LEASE_LIFE};

/// Generated code for the `decree.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("decree.v1");
}

/// Why a wire value was refused. Handlers map it to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("malformed txid {text:?}: expected <coordinator hex8>-<incarnation>-<sequence>")]
    TxId { text: String },
    #[error("invalid participant name {text:?}: 1-64 characters of [A-Za-z0-9_.-]")]
    ParticipantName { text: String },
    #[error("invalid key {key:?}: {why}")]
    Key { key: String, why: &'static str },
    #[error("invalid operation on key {key:?}: {why}")]
    Op { key: String, why: &'static str },
    #[error("{field}: {why}")]
    Field { field: &'static str, why: String },
}

impl From<InvalidInput> for tonic::Status {
    fn from(err: InvalidInput) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// gRPC metadata key that carries the txid on an `UNKNOWN` answer to
/// `Transact` or `Commit` (the outcome could not be learned yet).
pub const TXID_METADATA: &str = "decree-txid";

/// The metadata key of a refusal's [`Reason`] code (decimal `decree.v1.Reason`),
/// on the statuses that answer refused interactive work and refused admission
/// (disk full, overload, shutdown).
pub const REASON_METADATA: &str = "decree-reason";

/// The metadata key on an `ALREADY_EXISTS` refusal of Enroll: milliseconds
/// until the name's live holder's claim lapses if it is not heard from again.
pub const HELD_METADATA: &str = "decree-held-ms";

/// The metadata key of a coordinator group's leader URL, on the
/// `REASON_NOT_LEADER` refusal a follower answers with (absent when the
/// follower knows no leader).
pub const LEADER_METADATA: &str = "decree-leader";

/// The encoded `FileDescriptorSet` of decree.v1, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/decree_descriptor.bin"));

/// Default limit on one gRPC message, and so on one transaction's payload.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
