//! A KV participant's part in the coordinator's migration batches (see
//! docs/elasticity.md): finding where a batch ends, and the OUT and IN steps
//! of a batch, run as interactive work under the batch's txid so that the
//! batch is one two-phase-commit transaction like any other.

use decree_proto::ring::{Cursor, Routing};
use decree_proto::{v1, KvOp, Reason, TxId};
use decree_runtime::{LogError, Storage};
use prost::Message;
use tonic::Status;

use crate::kv::KvStore;
use crate::membership::{Ownership, Refusal};
use crate::runtime::Handle;

/// What a read, interactive work or a batch step may not touch here, as the
/// status the client acts on (FAILED_PRECONDITION + WRONG_OWNER, UNAVAILABLE + MIGRATING).
pub fn refused(refusal: Refusal) -> Status {
    let status = match refusal.code {
        Reason::Migrating => Status::unavailable(refusal.reason),
        _ => Status::failed_precondition(refusal.reason),
    };
    refusal.code.on_status(status)
}

/// A routing from the wire within bounds (a hostile one would make the ring
/// allocate without limit): INVALID_ARGUMENT, and nothing done.
fn checked(routing: &Option<v1::Routing>) -> Result<(), Status> {
    match routing.as_ref().map(Routing::check_wire) {
        Some(Err(why)) => Err(Status::invalid_argument(format!("routing: {why}"))),
        _ => Ok(()),
    }
}

/// The routing of a step: a migration must be under way in it.
pub fn step_routing(step: &v1::MigrationStep) -> Result<Routing, Status> {
    checked(&step.routing)?;
    let routing = step.routing.as_ref().map(Routing::from_wire);
    match routing {
        Some(routing) if routing.migration.is_some() => Ok(routing),
        _ => Err(Status::invalid_argument("migration: the step's routing has no target ring")),
    }
}

/// The routing a ScanMoving asks about: a migration must be under way in it.
pub fn scan_routing(request: &v1::ScanMovingRequest) -> Result<Routing, Status> {
    checked(&request.routing)?;
    let routing = request.routing.as_ref().map(Routing::from_wire);
    routing
        .filter(|r| r.migration.is_some())
        .ok_or_else(|| Status::invalid_argument("routing: no target ring to move keys to"))
}

/// Where the next batch of keys leaving this participant ends: after `limit`
/// of them from `after` on, or at the end of the keyspace.
pub fn scan_moving<S: Storage>(
    store: &KvStore<S>,
    routing: &Routing,
    after: &str,
    limit: u32,
) -> Result<v1::ScanMovingResponse, LogError> {
    let (own, limit) = (store.ownership(), u64::from(limit.max(1)));
    let mut answer = v1::ScanMovingResponse::default();
    for (key, size) in store.keys_from(after)? {
        if !own.leaves_in(routing, &key) {
            continue;
        }
        answer.keys += 1;
        answer.bytes += size as u64;
        if answer.keys == limit {
            // The smallest key after this one: the batch ends just past it.
            answer.end = Some(format!("{key}\0"));
            break;
        }
    }
    Ok(answer)
}

pub(crate) async fn scan(
    store: &KvStore,
    request: v1::ScanMovingRequest,
) -> Result<v1::ScanMovingResponse, Status> {
    let routing = scan_routing(&request)?;
    let store = store.clone();
    tokio::task::spawn_blocking(move || scan_moving(&store, &routing, &request.after, request.limit))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))
}

/// A step checked against this member's ring state: its routing, and true
/// for OUT. A step of an older epoch than the member's is refused (STALE).
pub fn check_step(own: &Ownership, step: &v1::MigrationStep) -> Result<(Routing, bool), Status> {
    let routing = step_routing(step)?;
    if routing.epoch < own.epoch() {
        let why = format!(
            "migration step of ring epoch {} is older than this member's {}",
            routing.epoch,
            own.epoch()
        );
        return Err(Reason::Stale.on_status(Status::failed_precondition(why)));
    }
    match v1::migration_step::Direction::try_from(step.direction) {
        Ok(v1::migration_step::Direction::Out) => Ok((routing, true)),
        Ok(v1::migration_step::Direction::In) => Ok((routing, false)),
        _ => Err(Status::invalid_argument("migration: direction must be OUT or IN")),
    }
}

/// The batch holding the fence that batch `txid` may take over: an older one
/// of the same coordinator, which runs one batch at a time (so that batch is
/// over, and if it never prepared here it cannot commit).
pub fn superseded(own: &Ownership, txid: TxId) -> Option<TxId> {
    own.fence_holder().filter(|h| h.coordinator == txid.coordinator && *h < txid)
}

/// Where an OUT step's range `[lo, hi)` ends (`None`: the end of the keyspace).
pub fn range_end(routing: &Routing) -> Option<String> {
    match routing.migration.as_ref().map(|m| &m.cursor) {
        Some(Cursor::Key(hi)) => Some(hi.clone()),
        _ => None,
    }
}

/// The keys an OUT step takes: those of its range that are here (`present`)
/// or locked by a branch that may still write them (`locked`) and that leave
/// this member, sorted.
pub fn out_keys(
    own: &Ownership,
    routing: &Routing,
    lo: &str,
    present: impl IntoIterator<Item = String>,
    locked: impl IntoIterator<Item = String>,
) -> Vec<String> {
    let mut keys: Vec<String> =
        present.into_iter().chain(locked).filter(|key| own.leaves(routing, lo, key)).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The keys an IN step writes, checked.
pub fn in_keys(step: &v1::MigrationStep) -> Result<Vec<String>, Status> {
    for entry in &step.entries {
        KvOp::check_key(&entry.key)?;
    }
    Ok(step.entries.iter().map(|e| e.key.clone()).collect())
}

/// The work an IN step leaves in the branch: the arriving values.
pub fn in_done(step: &v1::MigrationStep, so_far: &[u8]) -> Vec<u8> {
    let ops = step
        .entries
        .iter()
        .filter_map(|e| Some(KvOp::Put { key: e.key.clone(), value: e.value.clone()? }))
        .collect();
    done(ops, step, so_far)
}

/// What an OUT step answers: the values of `keys` that exist (locked by the
/// batch, so they cannot change under it).
pub fn read_out<S: Storage>(store: &KvStore<S>, keys: Vec<String>) -> Result<Vec<v1::KeyValue>, LogError> {
    keys.into_iter()
        .filter_map(|key| match store.get(&key) {
            Ok(Some(value)) => Some(Ok(v1::KeyValue { key, value: Some(value) })),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        })
        .collect()
}

/// The work an OUT step leaves in the branch: the deletes of what leaves.
pub fn out_done(values: &[v1::KeyValue], step: &v1::MigrationStep, so_far: &[u8]) -> Vec<u8> {
    let ops = values.iter().map(|kv| KvOp::Delete { key: kv.key.clone() }).collect();
    done(ops, step, so_far)
}

/// The work a step leaves in the branch: `ops`, and the step itself (once per branch).
fn done(ops: Vec<KvOp>, step: &v1::MigrationStep, so_far: &[u8]) -> Vec<u8> {
    let recorded = crate::kv::batch(so_far).map(|(_, m)| m.is_some()).unwrap_or(false);
    let migration = (!recorded).then(|| v1::MigrationStep { entries: Vec::new(), ..step.clone() });
    v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration }.encode_to_vec()
}

/// Whether the fence goes when a step's work is refused: `put_up` says this
/// step put it up (rather than finding it held by another request of the
/// batch). It stays while the batch's branch lives on here: another request
/// of the batch is under way (IN_PROGRESS, e.g. the first copy of a step sent
/// twice, still waiting for its locks), or the batch is committing, whose
/// commit lifts it. Lifted by a copy's refusal, it let a transaction write a
/// key of the range that the batch's read had already missed, and the key
/// stayed at its old owner (simulator seed 20,431,557: I10). It goes when the
/// branch is gone (aborted), or when this step put it up for nothing.
pub fn fence_goes(put_up: bool, code: Reason, aborted: bool) -> bool {
    aborted || (put_up && code != Reason::InProgress)
}

/// How long a step waits for the fence of an earlier batch prepared here
/// (whose decision is on its way) to go, before it is refused. Below the
/// coordinator's wait for a step.
const FENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs one step of the batch `txid` here; `enlist` joins the batch's
/// transaction at the coordinator on the first work.
pub(crate) async fn step<F, Fut>(
    store: &KvStore,
    handle: &Handle,
    txid: TxId,
    step: v1::MigrationStep,
    enlist: F,
) -> Result<v1::ExecuteResponse, Status>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>>,
{
    let own = store.ownership().clone();
    let (routing, out) = check_step(&own, &step)?;
    // From now on nobody else touches what moves from or to here in this
    // range, present or not: at an old owner nothing is written behind the
    // batch's reads, at a new one nothing is served before the batch's
    // commit lands (a member joining has no ring state yet that would say so).
    let deadline = tokio::time::Instant::now() + FENCE_WAIT;
    let put_up = loop {
        let lifted = own.fence_lifted();
        let refusal = match own.fence(txid, &step.lo, &routing) {
            Ok(put_up) => break put_up,
            Err(refusal) => refusal,
        };
        match superseded(&own, txid) {
            // An earlier batch of this coordinator that never prepared here: it can never commit.
            Some(holder) if handle.supersede(holder).await? => own.release(holder),
            // One prepared here: its decision is on its way (the batch before
            // this one, its commit landing as this batch starts). Wait for it.
            Some(_) if tokio::time::Instant::now() < deadline => {
                let _ = tokio::time::timeout_at(deadline, lifted).await;
            }
            _ => return Err(refused(refusal)),
        }
    };
    let keys = if out {
        decree_runtime::crash::point(decree_runtime::crash::MIGRATION_OUT_AFTER_FENCE);
        // What is there, or locked by a branch that may still write it, is taken.
        let (table, _) = handle.locks().await?;
        let (scanned, lo, hi) = (store.clone(), step.lo.clone(), range_end(&routing));
        let present = tokio::task::spawn_blocking(move || scanned.keys_between(&lo, hi.as_deref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let present = present.into_iter().map(|(key, _)| key);
        out_keys(&own, &routing, &step.lo, present, table.into_iter().map(|entry| entry.key))
    } else {
        match in_keys(&step) {
            Ok(keys) => keys,
            Err(status) => {
                if put_up {
                    own.release(txid);
                }
                return Err(status);
            }
        }
    };
    let granted = match handle.work(txid, keys.clone()).await? {
        Ok(granted) => granted,
        Err(refusal) => {
            if fence_goes(put_up, refusal.code, refusal.aborted) {
                own.release(txid);
            }
            return Err(crate::wire::work_refused(refusal.code, refusal.reason, refusal.aborted));
        }
    };
    if granted.first {
        if let Err(status) = enlist().await {
            handle.work_done(txid, None);
            let _ = handle.abort(txid).await;
            return Err(status);
        }
    }
    if !out {
        handle.work_done(txid, Some(in_done(&step, &granted.so_far)));
        return Ok(v1::ExecuteResponse { values: Vec::new() });
    }
    let read = store.clone();
    let values = tokio::task::spawn_blocking(move || read_out(&read, keys))
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let values = match values {
        Ok(values) => values,
        Err(err) => {
            handle.work_done(txid, None);
            return Err(Status::internal(err.to_string()));
        }
    };
    handle.work_done(txid, Some(out_done(&values, &step, &granted.so_far)));
    Ok(v1::ExecuteResponse { values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_step_lifts_the_fence_only_when_its_batch_is_gone_here_or_it_put_it_up_for_nothing() {
        // A copy of a step whose first copy still waits for its locks: the fence stays.
        assert!(!fence_goes(false, Reason::InProgress, false));
        // The first copy refused while the copy waits: it stays too.
        assert!(!fence_goes(true, Reason::InProgress, false));
        // The batch is committing here (its commit lifts it), found by a step it did not put up.
        assert!(!fence_goes(false, Reason::AlreadyDecided, false));
        // The branch aborted: it goes, whoever put it up.
        assert!(fence_goes(false, Reason::AlreadyDecided, true));
        assert!(fence_goes(true, Reason::LockConflict, true));
        // Put up by a late copy of a batch already decided here: it goes.
        assert!(fence_goes(true, Reason::AlreadyDecided, false));
    }

    /// A ScanMoving or a step whose ring asks for billions of points is
    /// refused before any ring is built.
    #[test]
    fn a_hostile_ring_is_refused_before_it_is_built() {
        let huge = v1::RingDescriptor {
            members: vec![v1::RingMember { name: "p1".into(), weight: 64 }],
            vnodes: u32::MAX,
        };
        let small = decree_proto::ring::Ring::new(["p1"]).to_wire();
        let routing = v1::Routing { current: Some(small), target: Some(huge), ..Default::default() };
        let scan = v1::ScanMovingRequest { routing: Some(routing.clone()), after: String::new(), limit: 1 };
        let refused = scan_routing(&scan).expect_err("a hostile scan");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        let step = v1::MigrationStep { routing: Some(routing), ..Default::default() };
        assert_eq!(step_routing(&step).expect_err("a hostile step").code(), tonic::Code::InvalidArgument);
    }
}
