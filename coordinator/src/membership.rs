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

use decree_proto::ring::{Cursor, Move, Ring, Routing, LEGACY_VNODES, MAX_WEIGHT, VNODES};
use decree_proto::v1::kv_client::KvClient;
use decree_proto::v1::participant_client::ParticipantClient;
use decree_proto::{v1, ParticipantName, TxId};
use decree_runtime::backoff::{Backoff, Jitter};
use decree_runtime::crash;
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use crate::engine::Decided;
use crate::registry::Role;
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

/// A ring change an operator (or a joining member) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add { name: ParticipantName, weight: u32 },
    Remove { name: ParticipantName },
    Weight { name: ParticipantName, weight: u32 },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Add { name, weight: 1 } => write!(f, "add {name}"),
            Change::Add { name, weight } => write!(f, "add {name} (weight {weight})"),
            Change::Remove { name } => write!(f, "remove {name}"),
            Change::Weight { name, weight } => write!(f, "weight {name} {weight}"),
        }
    }
}

/// Why a change was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Unsafe(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<Refused> for tonic::Status {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Unsafe(why) => tonic::Status::failed_precondition(why),
            Refused::Invalid(why) => tonic::Status::invalid_argument(why),
        }
    }
}

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
        tokio::spawn(membership.clone().drive());
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
        if handle.store.recorded(txid)? != crate::store::Recorded::Committed {
            return Ok(record); // aborted (presumed): the migration task ends it at the participants
        }
        if let Some(routing) = record.batch_routing.take() {
            record.routing = Some(routing);
            if let Some(m) = record.migration.as_mut() {
                m.batches += 1;
            }
        }
        record.batch.clear();
        handle.store.save_ring(&record).await?;
        info!(%txid, "a migration batch committed before the restart: its cursor is recorded now");
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
            tokio::time::timeout(STEP_TIMEOUT, ParticipantClient::new(channel).abort(request))
                .await
                .map_err(|_| format!("{name} did not answer the abort of batch {txid}"))?
                .map_err(|s| format!("{name} refused the abort of batch {txid}: {}", s.message()))?;
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
        let end = all(futures::future::join_all(scans).await)?.into_iter().flatten().min();
        let hi = end.map_or(Cursor::End, Cursor::Key);
        let step = Routing {
            epoch: routing.epoch,
            current: routing.current.clone(),
            migration: Some(Move { target: target.clone(), cursor: hi.clone() }),
        };
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
                let routing = Routing {
                    epoch: routing.epoch,
                    current: routing.current.clone(),
                    migration: Some(Move { target, cursor: hi.clone() }),
                };
                // Not synced: lost in a crash, start rebuilds it from the decision and `batch_routing`.
                self.save_unsynced(|r| {
                    r.batch.clear();
                    r.batch_routing = None;
                    r.routing = Some(routing.to_wire());
                    if let Some(m) = r.migration.as_mut() {
                        m.moved_keys += keys;
                        m.moved_bytes += bytes;
                        m.batches += 1;
                        m.remaining_keys = m.remaining_keys.saturating_sub(keys);
                        m.last_error.clear();
                    }
                })
                .await?;
                metrics::gauge!(REMAINING)
                    .set(self.record.lock().await.migration.as_ref().map_or(0, |m| m.remaining_keys) as f64);
                self.set_routing(routing);
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
        let (mut keys, mut bytes) = (0, 0);
        // Every old owner locks and reads what leaves it, at once...
        let outs = step.current.names().iter().map(|name| {
            let request = execute(txid, v1::migration_step::Direction::Out, &wire, lo, Vec::new());
            self.step(name, "OUT", request)
        });
        let mut arriving: BTreeMap<String, Vec<v1::KeyValue>> = BTreeMap::new();
        // Every step runs to its end (none is dropped halfway), then the first failure counts.
        for kv in all(futures::future::join_all(outs).await)?.into_iter().flatten() {
            let owner = target.route(&kv.key).ok_or("the target ring is empty")?.to_owned();
            keys += 1;
            bytes += kv.value.as_ref().map_or(0, Vec::len) as u64;
            arriving.entry(owner).or_default().push(kv);
        }
        crash::point(crash::MIGRATION_BATCH_AFTER_OUT);
        // ...then every new owner takes what arrives (a member with nothing to take still records the step).
        let ins = target.names().iter().map(|name| {
            let entries = arriving.remove(name).unwrap_or_default();
            let request = execute(txid, v1::migration_step::Direction::In, &wire, lo, entries);
            self.step(name, "IN", request)
        });
        let ins: Vec<_> = ins.collect();
        all(futures::future::join_all(ins).await)?;
        let span = tracing::info_span!("migration_batch", %txid);
        match self.handle.commit(txid, self.handle.config.prepare_timeout(), span).await {
            Ok(Decided::Committed) => Ok((keys, bytes)),
            Ok(Decided::Aborted { reason, .. }) => Err(format!("batch {txid} aborted: {reason}")),
            Ok(Decided::Unknown { reason }) => Err(format!("batch {txid} outcome unknown: {reason}")),
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
        let routing = self.routing();
        let Some(Move { target, .. }) = &routing.migration else { return Ok(()) };
        let settled = Routing { epoch: routing.epoch, current: target.clone(), migration: None };
        let mut done = None;
        self.save(|r| {
            r.routing = Some(settled.to_wire());
            done = r.migration.take().map(|m| v1::Migration { finished_unix_ms: now_ms(), ..m });
            r.last = done.clone();
        })
        .await?;
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

fn execute(
    txid: TxId,
    direction: v1::migration_step::Direction,
    routing: &v1::Routing,
    lo: &str,
    entries: Vec<v1::KeyValue>,
) -> v1::ExecuteRequest {
    let step = v1::MigrationStep {
        direction: direction as i32,
        routing: Some(routing.clone()),
        lo: lo.to_owned(),
        entries,
    };
    v1::ExecuteRequest { txid: txid.to_string(), ops: Vec::new(), get: Vec::new(), migration: Some(step) }
}

/// The answers of steps that all ran to their end, or the first failure.
fn all<T>(answers: Vec<Result<T, String>>) -> Result<Vec<T>, String> {
    answers.into_iter().collect()
}

fn step_error(name: &str, status: &tonic::Status) -> String {
    format!("{name}: {}", status.message())
}

/// Every member of either ring, in name order.
fn members(routing: &Routing) -> Vec<String> {
    let mut names: Vec<String> =
        routing.current.names().iter().chain(routing.settled().names()).cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// The routing after `change`, or why it is not safe. `status` tells each
/// participant's role and liveness (`None`: not enrolled).
pub fn plan(
    routing: &Routing,
    change: &Change,
    status: impl Fn(&ParticipantName) -> Option<(Role, bool)>,
) -> Result<Routing, Refused> {
    if let Some(Move { target, .. }) = &routing.migration {
        return Err(Refused::Unsafe(format!(
            "a migration is in progress (to {}): wait until `decree ring` shows it done",
            target.names().join(", ")
        )));
    }
    let ring = &routing.current;
    let weight_ok = |weight: u32| {
        if (1..=MAX_WEIGHT).contains(&weight) {
            Ok(weight)
        } else {
            Err(Refused::Invalid(format!("weight {weight}: must be between 1 and {MAX_WEIGHT}")))
        }
    };
    let must_be_up = |name: &ParticipantName| match status(name) {
        None => Err(Refused::Unsafe(format!("{name} is not enrolled with this coordinator"))),
        Some((Role::Service, _)) => {
            Err(Refused::Unsafe(format!("{name} is a service: it takes branches by name, never ring keys")))
        }
        Some((Role::Member, false)) => {
            Err(Refused::Unsafe(format!("{name} is down: keys can only move between members that are up")))
        }
        Some((Role::Member, true)) => Ok(()),
    };
    let mut members: Vec<(String, u32)> = ring.members().map(|(n, w)| (n.to_owned(), w)).collect();
    match change {
        Change::Add { name, weight } => {
            let weight = weight_ok((*weight).max(1))?;
            if ring.contains(name.as_str()) {
                return Err(Refused::Unsafe(format!("{name} is in the ring already")));
            }
            must_be_up(name)?;
            members.push((name.to_string(), weight));
        }
        Change::Remove { name } => {
            if !ring.contains(name.as_str()) {
                return Err(Refused::Unsafe(format!("{name} is not in the ring")));
            }
            if ring.names().len() == 1 {
                return Err(Refused::Unsafe(format!(
                    "{name} is the last member: its keys would have nowhere to go"
                )));
            }
            members.retain(|(n, _)| n != name.as_str());
        }
        Change::Weight { name, weight } => {
            let weight = weight_ok(*weight)?;
            match ring.weight(name.as_str()) {
                None => return Err(Refused::Unsafe(format!("{name} is not in the ring"))),
                Some(w) if w == weight => {
                    return Err(Refused::Unsafe(format!("{name} has weight {weight} already")))
                }
                Some(_) => {}
            }
            for (n, w) in members.iter_mut() {
                if n == name.as_str() {
                    *w = weight;
                }
            }
        }
    }
    // Every member of the ring now takes part in every batch.
    for member in ring.names() {
        let name: ParticipantName =
            member.parse().map_err(|e: decree_proto::InvalidInput| Refused::Invalid(e.to_string()))?;
        must_be_up(&name)?;
    }
    let vnodes = if ring.is_empty() { VNODES } else { ring.vnodes() };
    let target = Ring::weighted(members, vnodes);
    Ok(Routing {
        epoch: routing.epoch + 1,
        current: ring.clone(),
        migration: Some(Move { target, cursor: Cursor::Key(String::new()) }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> ParticipantName {
        n.parse().unwrap()
    }

    fn settled(names: &[&str]) -> Routing {
        Routing { epoch: 3, current: Ring::new(names.iter().copied()), migration: None }
    }

    fn up(n: &ParticipantName) -> Option<(Role, bool)> {
        match n.as_str() {
            "svc" => Some((Role::Service, true)),
            "gone" => Some((Role::Member, false)),
            "stranger" => None,
            _ => Some((Role::Member, true)),
        }
    }

    #[test]
    fn an_add_bumps_the_epoch_and_targets_the_larger_ring() {
        let next = plan(&settled(&["p1", "p2"]), &Change::Add { name: name("p3"), weight: 2 }, up).unwrap();
        assert_eq!(next.epoch, 4);
        let m = next.migration.unwrap();
        assert_eq!(m.target.names(), ["p1", "p2", "p3"]);
        assert_eq!(m.target.weight("p3"), Some(2));
        assert_eq!(m.cursor, Cursor::Key(String::new()));
    }

    #[test]
    fn unsafe_changes_are_refused_with_the_reason() {
        let ring = settled(&["p1", "p2"]);
        let refused = |change: Change, routing: &Routing| plan(routing, &change, up).unwrap_err().to_string();
        assert!(refused(Change::Remove { name: name("p9") }, &ring).contains("not in the ring"));
        assert!(refused(Change::Remove { name: name("p1") }, &settled(&["p1"])).contains("last member"));
        assert!(refused(Change::Add { name: name("svc"), weight: 1 }, &ring).contains("is a service"));
        assert!(refused(Change::Add { name: name("gone"), weight: 1 }, &ring).contains("is down"));
        assert!(refused(Change::Add { name: name("stranger"), weight: 1 }, &ring).contains("not enrolled"));
        assert!(refused(Change::Add { name: name("p1"), weight: 1 }, &ring).contains("already"));
        assert!(refused(Change::Weight { name: name("p1"), weight: 1 }, &ring).contains("already"));
        assert!(refused(Change::Weight { name: name("p1"), weight: 65 }, &ring).contains("between 1 and 64"));
        assert!(
            refused(Change::Add { name: name("p3"), weight: 1 }, &settled(&["p1", "gone"])).contains("down")
        );
        let moving = plan(&ring, &Change::Add { name: name("p3"), weight: 1 }, up).unwrap();
        assert!(refused(Change::Remove { name: name("p2") }, &moving).contains("in progress"));
    }

    #[test]
    fn a_legacy_ring_keeps_its_points_so_only_the_new_members_keys_move() {
        let legacy = Routing {
            epoch: 1,
            current: Ring::weighted([("p1".into(), 1), ("p2".into(), 1)], LEGACY_VNODES),
            migration: None,
        };
        let next = plan(&legacy, &Change::Add { name: name("p3"), weight: 1 }, up).unwrap();
        assert_eq!(next.migration.unwrap().target.vnodes(), LEGACY_VNODES);
        let fresh = plan(&settled(&[]), &Change::Add { name: name("p1"), weight: 1 }, up).unwrap();
        assert_eq!(fresh.migration.unwrap().target.vnodes(), VNODES);
    }
}
