//! The ring held by the coordinator: its members and weights, its epoch, the
//! changes operators ask for, and the migration that moves keys after each
//! change, batch by batch, each batch one two-phase-commit transaction over
//! the members (see docs/elasticity.md).
//!
//! A change is checked against what is safe (one migration at a time, every
//! member up, never the last member removed) and made durable (synced) with a
//! new epoch before it is answered. The migration then runs in the
//! background: resumable from the recorded cursor after any crash, because a
//! batch run again moves nothing twice (the keys behind a committed batch
//! are no longer at their old owner, and the participants' cursors only move
//! forward).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use decree_proto::ring::{Cursor, Move, Ring, Routing, LEGACY_VNODES, VNODES};
use decree_proto::v1::kv_client::KvClient;
use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{v1, ParticipantName, TxId};
use decree_runtime::backoff::{Backoff, Jitter};
use decree_runtime::crash;
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use crate::engine::Decided;
use crate::migration::{self as decide, members, plan};
pub use crate::migration::{Change, Refused};
use crate::runtime::Handle;
use crate::store::RingRecord;

/// Ring epoch, as a gauge.
pub const RING_EPOCH: &str = "decree_ring_epoch";
/// 1 while keys move.
pub const MIGRATING: &str = "decree_migration_in_progress";
/// Keys and bytes moved, and batches committed, since start.
pub const MOVED_KEYS: &str = "decree_migration_keys_moved_total";
pub const MOVED_BYTES: &str = "decree_migration_bytes_moved_total";
pub const BATCHES: &str = "decree_migration_batches_total";
/// Batches that failed (and were tried again).
pub const BATCH_FAILURES: &str = "decree_migration_batch_failures_total";
/// Keys still to move (an estimate).
pub const REMAINING: &str = "decree_migration_keys_remaining";

/// How long one step of a batch may take at a participant.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The ring and its migration, shared by the handlers and the migration task.
pub struct Membership {
    record: Mutex<RingRecord>,
    /// The routing of `record`, for the hot path (clients' GetRing,
    /// ListParticipants); shared, so a look costs no copy of the rings.
    routing: std::sync::RwLock<Arc<Routing>>,
    handle: Handle,
    wake: Notify,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Membership {
    /// The ring found at start, or (first start of this version) the ring
    /// clients routed by before: every stored member, with the old points.
    pub async fn start(
        handle: Handle,
        recovered: Option<RingRecord>,
        members_before: Vec<ParticipantName>,
    ) -> Result<Arc<Membership>, crate::CoordinatorError> {
        let record = match recovered {
            Some(record) => record,
            None => {
                let (epoch, ring) = if members_before.is_empty() {
                    (0, Ring::weighted(Vec::new(), VNODES))
                } else {
                    let names = members_before.iter().map(|n| (n.to_string(), 1));
                    (1, Ring::weighted(names, LEGACY_VNODES))
                };
                let routing = Routing { epoch, current: ring, migration: None };
                let record = RingRecord { routing: Some(routing.to_wire()), ..RingRecord::default() };
                handle.store.save_ring(&record).await?;
                record
            }
        };
        let record = Self::settle_batch(&handle, record).await?;
        let routing = record.routing.as_ref().map(Routing::from_wire).unwrap_or_default();
        metrics::gauge!(RING_EPOCH).set(routing.epoch as f64);
        let membership = Arc::new(Membership {
            record: Mutex::new(record),
            routing: std::sync::RwLock::new(Arc::new(routing)),
            handle,
            wake: Notify::new(),
        });
        crate::tasks::spawn(membership.clone().drive());
        Ok(membership)
    }

    /// A batch that committed before a crash, its cursor not recorded: its
    /// members already route by the routing it led to, so the ring does too
    /// before anything is served (a ring behind its members would send
    /// clients to owners that no longer hold the keys).
    async fn settle_batch(
        handle: &Handle,
        mut record: RingRecord,
    ) -> Result<RingRecord, crate::CoordinatorError> {
        let Ok(txid) = record.batch.parse::<TxId>() else { return Ok(record) };
        // Not committed: aborted (presumed), and the migration task ends it at the participants.
        let committed = handle.store.recorded(txid)? == crate::store::Recorded::Committed;
        if decide::settle_at_start(&mut record, committed) {
            handle.store.save_ring(&record).await?;
            info!(%txid, "a migration batch committed before the restart: its cursor is recorded now");
        }
        Ok(record)
    }

    /// Where every key lives now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True if `name` is in the ring (current or target).
    pub fn in_ring(&self, name: &str) -> bool {
        let routing = self.routing();
        routing.current.contains(name) || routing.settled().contains(name)
    }

    /// The ring for GetRing: routing, shares, migration, queue.
    pub async fn describe(&self) -> v1::GetRingResponse {
        let record = self.record.lock().await.clone();
        let routing = self.routing();
        let current: BTreeMap<String, f64> = routing.current.shares().into_iter().collect();
        let target: BTreeMap<String, f64> = routing.settled().shares().into_iter().collect();
        let mut names: Vec<&String> = current.keys().chain(target.keys()).collect();
        names.sort();
        names.dedup();
        let members = names
            .into_iter()
            .map(|name| v1::RingShare {
                name: name.clone(),
                weight: routing.settled().weight(name).or(routing.current.weight(name)).unwrap_or(0),
                share: current.get(name).copied().unwrap_or(0.0),
                target_share: target.get(name).copied().unwrap_or(0.0),
            })
            .collect();
        v1::GetRingResponse {
            routing: Some(routing.to_wire()),
            members,
            migration: record.migration,
            queued: record.queued,
            last: record.last,
        }
    }

    /// Checks `change` and, if it is safe, records the new epoch (synced) and
    /// starts its migration. Nothing changes when it is refused.
    pub async fn change(&self, change: Change) -> Result<Routing, Refused> {
        let mut record = self.record.lock().await;
        let routing = self.routing();
        let next = plan(&routing, &change, |name| self.handle.registry.status(name))?;
        let mut updated = record.clone();
        updated.routing = Some(next.to_wire());
        updated.migration = Some(v1::Migration {
            change: change.to_string(),
            started_unix_ms: now_ms(),
            ..v1::Migration::default()
        });
        if let Change::Add { name, .. } = &change {
            updated.queued.retain(|queued| queued != name.as_str());
        }
        self.handle
            .store
            .save_ring(&updated)
            .await
            .map_err(|e| Refused::Unsafe(format!("the ring change could not be recorded: {e}")))?;
        *record = updated;
        self.set_routing(next.clone());
        info!(%change, epoch = next.epoch, "ring change recorded; migration starts");
        self.wake.notify_one();
        Ok(next)
    }

    /// A member that enrolled with `join`: added now, or once the migration
    /// in progress ends. Nothing if it is in the ring already.
    pub async fn join(&self, name: ParticipantName) {
        if self.in_ring(name.as_str()) {
            return;
        }
        if self.routing().migration.is_none() {
            match self.change(Change::Add { name: name.clone(), weight: 1 }).await {
                Ok(_) => return,
                Err(err) => info!(participant = %name, reason = %err, "join queued"),
            }
        }
        let mut record = self.record.lock().await;
        if !record.queued.iter().any(|q| q == name.as_str()) {
            let mut updated = record.clone();
            updated.queued.push(name.to_string());
            if let Err(err) = self.handle.store.save_ring(&updated).await {
                warn!(participant = %name, error = %err, "the join could not be queued");
                return;
            }
            *record = updated;
        }
        self.wake.notify_one();
    }

    fn set_routing(&self, routing: Routing) {
        metrics::gauge!(RING_EPOCH).set(routing.epoch as f64);
        metrics::gauge!(MIGRATING).set(if routing.migration.is_some() { 1.0 } else { 0.0 });
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
    }

    /// The migration task: runs batches while keys must move, then starts
    /// queued joins; waits when there is nothing to do.
    async fn drive(self: Arc<Self>) {
        let backoff =
            Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(3), jitter: Jitter::Half };
        let mut failures = 0;
        loop {
            if self.routing().migration.is_none() {
                let queued = self.record.lock().await.queued.first().cloned();
                let joined = match queued.and_then(|name| name.parse::<ParticipantName>().ok()) {
                    Some(name) => self.change(Change::Add { name, weight: 1 }).await.is_ok(),
                    None => false,
                };
                if !joined {
                    // Woken by a change, a join, or now and then to retry a queued join.
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                }
                continue;
            }
            match self.batch().await {
                Ok(()) => failures = 0,
                Err(why) => {
                    metrics::counter!(BATCH_FAILURES).increment(1);
                    warn!(error = %why, "migration batch failed; trying again");
                    {
                        let mut record = self.record.lock().await;
                        if let Some(migration) = record.migration.as_mut() {
                            migration.last_error = why;
                        }
                    }
                    let delay = backoff.delay(failures, &mut rand::rng());
                    failures += 1;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Aborts a batch a previous process began and did not decide: it can
    /// never commit (presumed abort), and its fence holds keys until it ends.
    async fn end_leftover(&self, record: &RingRecord, routing: &Routing) -> Result<(), String> {
        let Ok(txid) = record.batch.parse::<TxId>() else { return Ok(()) };
        if txid.incarnation == self.handle.incarnation {
            let _ = self.handle.abort(txid).await;
            return self.save(|r| r.batch.clear()).await;
        }
        match self.handle.store.recorded(txid) {
            Ok(crate::store::Recorded::Absent) => {}
            // Decided: recovery redelivers its Commits; running the batch again moves nothing twice.
            Ok(_) => return self.save(|r| r.batch.clear()).await,
            Err(err) => return Err(err.to_string()),
        }
        for name in members(routing) {
            let channel = self.channel(&name)?;
            let request = v1::AbortRequest { txid: txid.to_string(), typed_ack: true };
            let answer = tokio::time::timeout(STEP_TIMEOUT, ParticipantClient::new(channel).abort(request))
                .await
                .map_err(|_| format!("{name} did not answer the abort of batch {txid}"))?
                .map(|r| {
                    let r = r.into_inner();
                    crate::wire::acked(r.ack, r.reason_code, r.reason)
                })
                .map_err(crate::wire::Unanswered::Refused);
            crate::wire::abort_ended(answer)
                .map_err(|why| format!("{name} did not end batch {txid}'s branch: {why}"))?;
        }
        info!(%txid, "aborted a migration batch left by an earlier start");
        self.save(|r| r.batch.clear()).await
    }

    fn channel(&self, name: &str) -> Result<tonic::transport::Channel, String> {
        let name: ParticipantName = name.parse().map_err(|e: decree_proto::InvalidInput| e.to_string())?;
        self.handle.registry.channel(&name).ok_or_else(|| format!("{name} is not enrolled"))
    }

    fn kv(&self, name: &str) -> Result<KvClient<tonic::transport::Channel>, String> {
        let limit = self.handle.config.max_message_bytes * 2;
        Ok(KvClient::new(self.channel(name)?)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit))
    }

    /// One batch: plan its range, then lock and read what leaves at the old
    /// owners, write it at the new ones, and commit all of it as one transaction.
    async fn batch(&self) -> Result<(), String> {
        let record = self.record.lock().await.clone();
        let routing = self.routing();
        let Some(Move { target, cursor }) = routing.migration.clone() else { return Ok(()) };
        self.end_leftover(&record, &routing).await?;
        let lo = match &cursor {
            Cursor::Key(lo) => lo.clone(),
            Cursor::End => return self.finish().await,
        };
        let limit = self.handle.config.migration_batch_keys;
        if record.migration.as_ref().is_some_and(|m| m.batches == 0 && m.remaining_keys == 0) {
            let total = self.count(&routing, &lo).await?;
            self.progress(|m| m.remaining_keys = total).await;
        }
        // The batch ends where the first old owner's next `limit` leaving keys end.
        let scans = routing.current.names().iter().map(|name| {
            let request =
                v1::ScanMovingRequest { routing: Some(routing.to_wire()), after: lo.clone(), limit };
            async move {
                let mut kv = self.kv(name)?;
                let answer = tokio::time::timeout(STEP_TIMEOUT, kv.scan_moving(request))
                    .await
                    .map_err(|_| format!("{name} did not answer the batch's scan"))?
                    .map_err(|s| step_error(name, &s))?;
                Ok::<_, String>(answer.into_inner().end)
            }
        });
        let hi = decide::batch_end(all(futures::future::join_all(scans).await)?);
        let step = decide::batch_routing(&routing, &target, hi.clone());
        let txid =
            self.handle.begin(self.handle.config.idle_timeout()).await.map_err(|e| format!("begin: {e}"))?;
        self.save(|r| {
            r.batch = txid.to_string();
            r.batch_routing = Some(step.to_wire());
        })
        .await?;
        match self.run(txid, &step, &lo, &target).await {
            Ok((keys, bytes)) => {
                crash::point(crash::MIGRATION_BATCH_AFTER_DECISION);
                metrics::counter!(MOVED_KEYS).increment(keys);
                metrics::counter!(MOVED_BYTES).increment(bytes);
                metrics::counter!(BATCHES).increment(1);
                // Not synced: lost in a crash, start rebuilds it from the decision and `batch_routing`.
                self.save_unsynced(|r| decide::batch_committed(r, &step, keys, bytes)).await?;
                metrics::gauge!(REMAINING)
                    .set(self.record.lock().await.migration.as_ref().map_or(0, |m| m.remaining_keys) as f64);
                self.set_routing(step);
                if hi == Cursor::End {
                    self.finish().await?;
                }
                Ok(())
            }
            Err(why) => {
                let _ = self.handle.abort(txid).await;
                self.save(|r| {
                    r.batch.clear();
                    r.batch_routing = None;
                })
                .await?;
                Err(why)
            }
        }
    }

    /// The steps of batch `txid` and its commit: the keys and bytes it moved.
    async fn run(&self, txid: TxId, step: &Routing, lo: &str, target: &Ring) -> Result<(u64, u64), String> {
        let wire = step.to_wire();
        let request =
            |direction, entries| decide::step_request(txid, decide::step(direction, &wire, lo, entries));
        // Every old owner locks and reads what leaves it, at once...
        let outs = step
            .current
            .names()
            .iter()
            .map(|name| self.step(name, "OUT", request(v1::migration_step::Direction::Out, Vec::new())));
        // Every step runs to its end (none is dropped halfway), then the first failure counts.
        let leaving = all(futures::future::join_all(outs).await)?.into_iter().flatten();
        let (mut arriving, keys, bytes) = decide::arrivals(leaving, target)?;
        crash::point(crash::MIGRATION_BATCH_AFTER_OUT);
        // ...then every new owner takes what arrives (a member with nothing to take still records the step).
        let ins = target.names().iter().map(|name| {
            let entries = arriving.remove(name).unwrap_or_default();
            self.step(name, "IN", request(v1::migration_step::Direction::In, entries))
        });
        let ins: Vec<_> = ins.collect();
        all(futures::future::join_all(ins).await)?;
        let span = tracing::info_span!("migration_batch", %txid);
        match self.handle.commit(txid, self.handle.config.prepare_timeout(), span).await {
            Ok(Decided::Committed) => Ok((keys, bytes)),
            Ok(Decided::Aborted { reason, .. }) => Err(format!("batch {txid} aborted: {reason}")),
            Ok(Decided::Unknown { reason, .. }) => Err(format!("batch {txid} outcome unknown: {reason}")),
            Err(err) => Err(format!("batch {txid}: {err}")),
        }
    }

    /// One step of a batch at participant `name`: the values it answered.
    async fn step(
        &self,
        name: &str,
        what: &str,
        request: v1::ExecuteRequest,
    ) -> Result<Vec<v1::KeyValue>, String> {
        let mut kv = self.kv(name)?;
        let answer = tokio::time::timeout(STEP_TIMEOUT, kv.execute(request))
            .await
            .map_err(|_| format!("{name} did not answer the batch's {what} step"))?
            .map_err(|s| step_error(name, &s))?;
        Ok(answer.into_inner().values)
    }

    /// Keys that must move in the migration, from `lo` on.
    async fn count(&self, routing: &Routing, lo: &str) -> Result<u64, String> {
        let mut total = 0;
        for name in routing.current.names() {
            let request = v1::ScanMovingRequest {
                routing: Some(routing.to_wire()),
                after: lo.to_owned(),
                limit: u32::MAX,
            };
            total += self
                .kv(name)?
                .scan_moving(request)
                .await
                .map_err(|s| step_error(name, &s))?
                .into_inner()
                .keys;
        }
        Ok(total)
    }

    /// Every key has moved: the target is the ring.
    async fn finish(&self) -> Result<(), String> {
        let mut ended = None;
        self.save(|r| ended = decide::finished(r, now_ms())).await?;
        let Some((settled, done)) = ended else { return Ok(()) };
        self.set_routing(settled.clone());
        metrics::gauge!(REMAINING).set(0.0);
        if let Some(m) = done {
            info!(
                change = %m.change,
                epoch = settled.epoch,
                moved_keys = m.moved_keys,
                moved_bytes = m.moved_bytes,
                batches = m.batches,
                seconds = (now_ms().saturating_sub(m.started_unix_ms)) as f64 / 1000.0,
                "migration done"
            );
        }
        Ok(())
    }

    async fn progress(&self, update: impl FnOnce(&mut v1::Migration)) {
        let mut record = self.record.lock().await;
        if let Some(m) = record.migration.as_mut() {
            update(m);
        }
    }

    /// Changes the record and makes it durable.
    async fn save(&self, update: impl FnOnce(&mut RingRecord)) -> Result<(), String> {
        self.update(update, true).await
    }

    /// Changes the record and writes it without a sync.
    async fn save_unsynced(&self, update: impl FnOnce(&mut RingRecord)) -> Result<(), String> {
        self.update(update, false).await
    }

    async fn update(&self, update: impl FnOnce(&mut RingRecord), synced: bool) -> Result<(), String> {
        let mut record = self.record.lock().await;
        let mut updated = record.clone();
        update(&mut updated);
        let store = &self.handle.store;
        let written =
            if synced { store.save_ring(&updated).await } else { store.save_ring_unsynced(&updated).await };
        written.map_err(|e| format!("recording the ring: {e}"))?;
        *record = updated;
        Ok(())
    }
}

/// The answers of steps that all ran to their end, or the first failure.
fn all<T>(answers: Vec<Result<T, String>>) -> Result<Vec<T>, String> {
    answers.into_iter().collect()
}

fn step_error(name: &str, status: &tonic::Status) -> String {
    format!("{name}: {}", status.message())
}
