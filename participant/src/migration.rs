//! A KV participant's part in the coordinator's migration batches (see
//! docs/elasticity.md): finding where a batch ends, and the OUT and IN steps
//! of a batch, run as interactive work under the batch's txid so that the
//! batch is one two-phase-commit transaction like any other.

use decree_proto::ring::Routing;
use decree_proto::{v1, KvOp, Reason, TxId};
use prost::Message;
use tonic::Status;

use crate::kv::KvStore;
use crate::membership::Refusal;
use crate::runtime::Handle;

/// What a read, interactive work or a batch step may not touch here, as the
/// status the client acts on (FAILED_PRECONDITION + WRONG_OWNER, UNAVAILABLE + MIGRATING).
pub(crate) fn refused(refusal: Refusal) -> Status {
    let status = match refusal.code {
        Reason::Migrating => Status::unavailable(refusal.reason),
        _ => Status::failed_precondition(refusal.reason),
    };
    refusal.code.on_status(status)
}

/// The routing of a step: a migration must be under way in it.
pub(crate) fn step_routing(step: &v1::MigrationStep) -> Result<Routing, Status> {
    let routing = step.routing.as_ref().map(Routing::from_wire);
    match routing {
        Some(routing) if routing.migration.is_some() => Ok(routing),
        _ => Err(Status::invalid_argument("migration: the step's routing has no target ring")),
    }
}

/// Where the next batch of keys leaving this participant ends: after `limit`
/// of them from `after` on, or at the end of the keyspace.
pub(crate) async fn scan(
    store: &KvStore,
    request: v1::ScanMovingRequest,
) -> Result<v1::ScanMovingResponse, Status> {
    let routing = request.routing.as_ref().map(Routing::from_wire);
    let Some(routing) = routing.filter(|r| r.migration.is_some()) else {
        return Err(Status::invalid_argument("routing: no target ring to move keys to"));
    };
    let (store, limit) = (store.clone(), u64::from(request.limit.max(1)));
    tokio::task::spawn_blocking(move || {
        let own = store.ownership();
        let mut answer = v1::ScanMovingResponse::default();
        for (key, size) in store.keys_from(&request.after).map_err(|e| Status::internal(e.to_string()))? {
            if !own.leaves_in(&routing, &key) {
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
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
}

/// The work a step leaves in the branch: `ops`, and the step itself (once per branch).
fn done(ops: Vec<KvOp>, step: &v1::MigrationStep, so_far: &[u8]) -> Vec<u8> {
    let recorded = crate::kv::batch(so_far).map(|(_, m)| m.is_some()).unwrap_or(false);
    let migration = (!recorded).then(|| v1::MigrationStep { entries: Vec::new(), ..step.clone() });
    v1::KvBatch { ops: ops.into_iter().map(Into::into).collect(), migration }.encode_to_vec()
}

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
    let routing = step_routing(&step)?;
    let own = store.ownership().clone();
    if routing.epoch < own.epoch() {
        let why = format!(
            "migration step of ring epoch {} is older than this member's {}",
            routing.epoch,
            own.epoch()
        );
        return Err(decree_proto::Reason::Stale.on_status(Status::failed_precondition(why)));
    }
    let out = match v1::migration_step::Direction::try_from(step.direction) {
        Ok(v1::migration_step::Direction::Out) => true,
        Ok(v1::migration_step::Direction::In) => false,
        _ => return Err(Status::invalid_argument("migration: direction must be OUT or IN")),
    };
    let keys = if out {
        // From now on nobody else touches what leaves in this range, present or not...
        if let Err(refusal) = own.fence(txid, &step.lo, &routing) {
            // The coordinator runs one batch at a time: an older batch of its own
            // is over, and if it never prepared here it cannot commit.
            let holder = own.fence_holder().filter(|h| h.coordinator == txid.coordinator && *h < txid);
            match holder {
                Some(holder) if handle.supersede(holder).await? => {
                    own.release(holder);
                    own.fence(txid, &step.lo, &routing).map_err(refused)?;
                }
                _ => return Err(refused(refusal)),
            }
        }
        decree_runtime::crash::point(decree_runtime::crash::MIGRATION_OUT_AFTER_FENCE);
        // ...and what is there, or locked by a branch that may still write it, is taken.
        let (table, _) = handle.locks().await?;
        let lo = step.lo.clone();
        let hi = match routing.migration.as_ref().map(|m| &m.cursor) {
            Some(decree_proto::ring::Cursor::Key(hi)) => Some(hi.clone()),
            _ => None,
        };
        let (scanned, routing_for_scan, own_for_scan) = (store.clone(), routing.clone(), own.clone());
        let present = tokio::task::spawn_blocking(move || scanned.keys_between(&lo, hi.as_deref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut keys: Vec<String> = present
            .into_iter()
            .map(|(key, _)| key)
            .chain(table.into_iter().map(|entry| entry.key))
            .filter(|key| own_for_scan.leaves(&routing_for_scan, &step.lo, key))
            .collect();
        keys.sort();
        keys.dedup();
        keys
    } else {
        for entry in &step.entries {
            KvOp::check_key(&entry.key)?;
        }
        step.entries.iter().map(|e| e.key.clone()).collect()
    };
    let granted = match handle.work(txid, keys.clone()).await? {
        Ok(granted) => granted,
        Err(refusal) => {
            own.release(txid);
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
        let ops = step
            .entries
            .iter()
            .filter_map(|e| Some(KvOp::Put { key: e.key.clone(), value: e.value.clone()? }))
            .collect();
        handle.work_done(txid, Some(done(ops, &step, &granted.so_far)));
        return Ok(v1::ExecuteResponse { values: Vec::new() });
    }
    // The keys are locked by the batch: their values cannot change under it.
    let read = store.clone();
    let values = tokio::task::spawn_blocking(move || {
        keys.into_iter()
            .filter_map(|key| match read.get(&key) {
                Ok(Some(value)) => Some(Ok(v1::KeyValue { key, value: Some(value) })),
                Ok(None) => None,
                Err(err) => Some(Err(err)),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?;
    let values = match values {
        Ok(values) => values,
        Err(err) => {
            handle.work_done(txid, None);
            return Err(Status::internal(err.to_string()));
        }
    };
    let ops = values.iter().map(|kv| KvOp::Delete { key: kv.key.clone() }).collect();
    handle.work_done(txid, Some(done(ops, &step, &granted.so_far)));
    Ok(v1::ExecuteResponse { values })
}
