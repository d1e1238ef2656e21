//! Named crash points (see DESIGN.md, "Crash points").
//!
//! A process arms points from `DECREE_CRASH_AT=name[,name...]` or `--crash-at`.
//! Reaching an armed point aborts the process at once with SIGABRT: no
//! destructors, no flush, exactly like a crash. Unarmed, a point costs one
//! relaxed atomic load.
//!
//! This is the one process-wide state in decree, on purpose: a crash point must
//! be reachable from any depth without threading a handle through every call.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Every crash point, by name.
pub const ALL: &[&str] = &[
    COORDINATOR_PREPARE_PARTIAL_FANOUT,
    COORDINATOR_DECISION_BEFORE_LOG,
    COORDINATOR_DECISION_AFTER_LOG,
    COORDINATOR_COMMIT_PARTIAL_FANOUT,
    COORDINATOR_COMMIT_BEFORE_END,
    COORDINATOR_REPLY_BEFORE_CLIENT,
    COORDINATOR_RECOVERY_MID_REDRIVE,
    PARTICIPANT_PREPARE_BEFORE_LOG,
    PARTICIPANT_PREPARE_AFTER_LOG,
    PARTICIPANT_COMMIT_BEFORE_APPLY,
    PARTICIPANT_COMMIT_AFTER_APPLY,
    PARTICIPANT_ABORT_BEFORE_APPLY,
    PARTICIPANT_RECOVERY_BEFORE_RESOLVE,
    MIGRATION_BATCH_AFTER_OUT,
    MIGRATION_BATCH_AFTER_DECISION,
    MIGRATION_OUT_AFTER_FENCE,
];

/// The points of the two-phase-commit protocol itself, the first 13 of [`ALL`];
/// the rest are the migration's. The simulator and the real-process tests
/// reach all of them.
pub const PROTOCOL: &[&str] = ALL.split_at(13).0;

/// Prepare sent to the first participant only.
pub const COORDINATOR_PREPARE_PARTIAL_FANOUT: &str = "coordinator.prepare.partial_fanout";
/// All votes YES, decision not yet written.
pub const COORDINATOR_DECISION_BEFORE_LOG: &str = "coordinator.decision.before_log";
/// Decision durable, no Commit sent.
pub const COORDINATOR_DECISION_AFTER_LOG: &str = "coordinator.decision.after_log";
/// Commit sent to the first participant only.
pub const COORDINATOR_COMMIT_PARTIAL_FANOUT: &str = "coordinator.commit.partial_fanout";
/// All acks received, end record not written.
pub const COORDINATOR_COMMIT_BEFORE_END: &str = "coordinator.commit.before_end";
/// Outcome known, client not yet answered.
pub const COORDINATOR_REPLY_BEFORE_CLIENT: &str = "coordinator.reply.before_client";
/// Recovery re-sent Commit to one participant.
pub const COORDINATOR_RECOVERY_MID_REDRIVE: &str = "coordinator.recovery.mid_redrive";
/// Locks taken, prepared record not written.
pub const PARTICIPANT_PREPARE_BEFORE_LOG: &str = "participant.prepare.before_log";
/// Prepared record durable, vote not sent.
pub const PARTICIPANT_PREPARE_AFTER_LOG: &str = "participant.prepare.after_log";
/// Commit received, nothing applied.
pub const PARTICIPANT_COMMIT_BEFORE_APPLY: &str = "participant.commit.before_apply";
/// Commit applied durably, ack not sent.
pub const PARTICIPANT_COMMIT_AFTER_APPLY: &str = "participant.commit.after_apply";
/// Abort received, nothing applied.
pub const PARTICIPANT_ABORT_BEFORE_APPLY: &str = "participant.abort.before_apply";
/// Prepared records loaded, outcome not yet asked.
pub const PARTICIPANT_RECOVERY_BEFORE_RESOLVE: &str = "participant.recovery.before_resolve";

/// Coordinator: a migration batch's keys are locked and read at their old
/// owners, nothing written at the new ones.
pub const MIGRATION_BATCH_AFTER_OUT: &str = "migration.batch.after_out";
/// Coordinator: a migration batch is decided (committed), its cursor not recorded.
pub const MIGRATION_BATCH_AFTER_DECISION: &str = "migration.batch.after_decision";
/// Participant: a migration batch's fence is up here, its keys not locked yet.
pub const MIGRATION_OUT_AFTER_FENCE: &str = "migration.out.after_fence";

/// The points of a coordinator group's replicated log, beside [`ALL`] (the
/// simulator has no group; the real-process group tests reach them).
pub const GROUP: &[&str] = &[RAFT_AFTER_APPEND, RAFT_AFTER_COMMIT_BEFORE_APPLY];

/// Replica: entries are synced in its log, the consensus library not told yet
/// (so this replica's copy has not counted towards a majority).
pub const RAFT_AFTER_APPEND: &str = "coordinator.raft.after_append";
/// Replica: entries are committed (a majority holds them), not applied to
/// its state yet.
pub const RAFT_AFTER_COMMIT_BEFORE_APPLY: &str = "coordinator.raft.after_commit_before_apply";

/// The environment variable that arms crash points.
pub const ENV: &str = "DECREE_CRASH_AT";

static ANY_ARMED: AtomicBool = AtomicBool::new(false);
static ARMED: OnceLock<BTreeSet<&'static str>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum CrashPointError {
    #[error("unknown crash point {0:?}; known points: {known}", known = known().collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error("crash points were already armed in this process")]
    AlreadyArmed,
}

/// Every point a process can arm.
fn known() -> impl Iterator<Item = &'static str> {
    ALL.iter().chain(GROUP).copied()
}

/// Parses a comma-separated list of crash point names.
pub fn parse(list: &str) -> Result<BTreeSet<&'static str>, CrashPointError> {
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            known().find(|known| *known == name).ok_or_else(|| CrashPointError::Unknown(name.to_owned()))
        })
        .collect()
}

/// Arms the points named in `flag` (if given) and in `DECREE_CRASH_AT`. Call
/// once, at process start. Unknown names are an error.
pub fn arm(flag: Option<&str>) -> Result<(), CrashPointError> {
    let mut points = parse(flag.unwrap_or(""))?;
    if let Ok(env) = std::env::var(ENV) {
        points.extend(parse(&env)?);
    }
    if points.is_empty() {
        return Ok(());
    }
    tracing::warn!(points = ?points, "crash points armed");
    ARMED.set(points).map_err(|_| CrashPointError::AlreadyArmed)?;
    ANY_ARMED.store(true, Ordering::Release);
    Ok(())
}

/// True if `name` is armed in this process.
pub fn is_armed(name: &str) -> bool {
    ANY_ARMED.load(Ordering::Relaxed) && ARMED.get().is_some_and(|armed| armed.contains(name))
}

/// Aborts the process if `name` is armed.
#[inline]
pub fn point(name: &'static str) {
    if ANY_ARMED.load(Ordering::Relaxed) {
        fire(name);
    }
}

#[cold]
fn fire(name: &'static str) {
    if is_armed(name) {
        // stderr is unbuffered: this line is written before the abort.
        eprintln!("decree: crash point {name} reached, aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_design_name_parses_and_unknown_names_are_refused() {
        assert_eq!(ALL.len(), 16);
        assert_eq!(parse(&ALL.join(",")).unwrap().len(), 16);
        assert_eq!(parse(&GROUP.join(",")).unwrap().len(), 2, "a group's points are armed like the others");
        assert!(PROTOCOL.iter().all(|p| !p.starts_with("migration.")), "{PROTOCOL:?}");
        assert!(ALL[PROTOCOL.len()..].iter().all(|p| p.starts_with("migration.")));
        assert!(parse("coordinator.decision.after_log, participant.prepare.before_log").is_ok());
        assert!(matches!(parse("coordinator.nope"), Err(CrashPointError::Unknown(_))));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn unarmed_points_do_nothing() {
        point(COORDINATOR_DECISION_AFTER_LOG);
        assert!(!is_armed(COORDINATOR_DECISION_AFTER_LOG));
    }
}
