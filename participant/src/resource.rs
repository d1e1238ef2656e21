//! What a service plugs into the participant: the [`Resource`] trait.

use decree_runtime::Write;

use crate::engine::Validated;

/// A service's part in decree transactions. The participant library owns the
/// protocol (locks, the durable prepared record, idempotent phase two,
/// tombstones, recovery); the resource only says what a branch means.
pub trait Resource: Send + Sync + 'static {
    /// The keys a branch locks, from its payload, without I/O. An error votes
    /// NO with that reason and locks nothing.
    fn keys(&self, payload: &[u8]) -> Result<Vec<String>, String>;

    /// With the branch's keys locked: checks the payload against the committed
    /// state and computes the redo that commit will apply. Runs on a blocking
    /// thread; may read storage.
    fn validate(&self, payload: &[u8]) -> Validated;

    /// The writes that apply `redo`. They are written in the same synced batch
    /// as the commit record, so a branch is applied exactly once.
    fn apply(&self, redo: &[u8]) -> Result<Vec<Write>, String>;
}
