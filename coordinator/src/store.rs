//! The coordinator's durable state: its identity and incarnation, COMMIT
//! decisions whose phase two is unfinished, a bounded window of ended ones,
//! the horizon below which outcomes are forgotten, and the participant
//! registry, in one RocksDB log.
//!
//! # Layout
//!
//! | key | record | written |
//! |---|---|---|
//! | `meta` | coordinator id, incarnation | synced, at every start |
//! | `d/<txid>` | COMMIT decision with its participants, phase two unfinished | synced, before any Commit |
//! | `c/<txid>` | committed and ended (every participant acked), or one-phase committed | not synced |
//! | `u/<txid>` | a one-phase outcome not known yet, its client told "unknown", with its participant | synced, before that answer |
//! | `c/<txid>` (forgotten) | a one-phase outcome its participant forgot before it was learned: answers FORGOTTEN | synced soon, replacing `u/<txid>` |
//! | `horizon` | the txid below which ended outcomes are forgotten | not synced, with the range delete it guards |
//! | `r/<name>` | a participant's last address | not synced |
//! | `a/<txid>` | an interactive transaction begun, not yet committed or aborted, with its idle deadline | synced, before Begin answers |
//! | `a/<txid>/<name>` | a participant enlisted in it, with the run it enlisted from | synced, before Enlist answers |
//!
//! Start reads `meta`, `horizon`, `d/`, `u/`, `a/` and `r/`: what is undecided, never the
//! history. `c/` is only read by [`DecisionLog::recorded`], one key at a time.
//!
//! # Correctness
//!
//! - [`DecisionLog::open`] bumps the incarnation with a **synced** write before
//!   it returns, so no two starts hand out the same txids.
//! - [`DecisionLog::log_decision`] returns only after the decision record is
//!   **synced**: once it returns, the transaction is committed, whatever crashes.
//! - [`DecisionLog::log_end`] moves the decision from `d/` to `c/` in one
//!   atomic, **unsynced** batch: it survives a process crash but may be lost
//!   with the machine, and losing it only causes a redundant redrive (Commit
//!   is idempotent). [`DecisionLog::log_one_phase_commit`] and
//!   [`DecisionLog::save_participant`] are unsynced too: losing the first only
//!   makes `GetOutcome` of that one-phase transaction answer ABORTED after a
//!   machine crash (its client was told COMMITTED by then and never asks);
//!   losing the second only delays redelivery until the participant enrolls
//!   again.
//! - A `d/` record is removed only by [`DecisionLog::log_end`], after every
//!   participant acked: pruning never touches it, however old.
//! - [`DecisionLog::log_one_phase_in_doubt`] returns only after its `u/`
//!   record is **synced**. It is written before a client that knows the txid
//!   can ask about a one-phase transaction whose outcome this process may
//!   lose: before the answer "unknown", and before the Prepare of an
//!   interactive transaction (whose client has had the txid since Begin).
//!   After a restart `GetOutcome` then answers PENDING and the participant is
//!   asked again, never ABORTED for a branch that may have committed. The
//!   record goes only once the outcome is known
//!   ([`DecisionLog::log_one_phase_commit`] with `in_doubt`, or
//!   [`DecisionLog::log_one_phase_aborted`]), synced soon: if a crash comes
//!   first, the question comes back and the participant, which remembers the
//!   branch (its tombstone), answers it again. Pruning never touches it.
//! - Absence of any record means ABORTED (presumed abort) for a txid at or
//!   above the horizon, and FORGOTTEN below it: [`DecisionLog::forget_before`]
//!   deletes `c/` records below a new horizon in the same atomic batch that
//!   makes the horizon durable, and raises the in-memory horizon *before*
//!   writing, so no reader ever sees a record gone while the horizon says it
//!   should be there. A committed transaction is therefore never answered
//!   ABORTED: it is COMMITTED (a record exists) or FORGOTTEN. In a group
//!   (whose one-shot clients know their txids before the answer, and where
//!   no question precedes a one-shot one-phase Prepare) absence is not taken
//!   for ABORTED: the leader asks every participant first (`Handle::outcome`).
//! - [`DecisionLog::log_begin`] and [`DecisionLog::log_enlist`] return only
//!   after their `a/` record is **synced** (in a group: held by a majority),
//!   and Begin and Enlist answer only then: a restarted coordinator, or a
//!   group's next leader, knows every interactive transaction a client or a
//!   participant was told is active, with each participant enlisted and its
//!   run, so the client's Commit prepares every branch that holds its work
//!   (a participant that lost it votes NO). The records go once the
//!   transaction leaves the active state ([`DecisionLog::forget_active`],
//!   synced soon): a start that still finds them skips those with a decision
//!   (`d/`, `c/`, `u/`), and any other is active again: its client had been
//!   told nothing (the Commit that was preparing decided nothing durable), so
//!   committing it on a new Commit, or aborting it at its idle deadline, is
//!   what the client may be told.
//! - A record that fails its checksum is an error, never "absent": the
//!   coordinator refuses to start rather than abort a committed transaction.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use decree_proto::{v1, ParticipantName, TxId};
use decree_runtime::record::TxIdRecord;
use decree_runtime::{record, Durability, Log, LogError, RecordError, Storage, Write};

const META_KEY: &[u8] = b"meta";
const HORIZON_KEY: &[u8] = b"horizon";
const DECISION: &[u8] = b"d/";
const COMMITTED: &[u8] = b"c/";
const REGISTRY: &[u8] = b"r/";
const ONE_PHASE_IN_DOUBT: &[u8] = b"u/";
const RING_KEY: &[u8] = b"g/ring";
const ACTIVE: &[u8] = b"a/";
/// End records of the layout before the `c/` window (migrated at open).
const OLD_END: &[u8] = b"e/";

#[derive(Clone, PartialEq, prost::Message)]
struct MetaRecord {
    #[prost(uint32, tag = "1")]
    coordinator_id: u32,
    #[prost(uint64, tag = "2")]
    incarnation: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DecisionRecord {
    #[prost(string, repeated, tag = "1")]
    participants: Vec<String>,
    /// Only in records of the layout before the `c/` window.
    #[prost(bool, tag = "2")]
    one_phase: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CommittedRecord {
    #[prost(bool, tag = "1")]
    one_phase: bool,
    /// Not committed for certain: a one-phase outcome its participant forgot
    /// before it was learned (answers FORGOTTEN).
    #[prost(bool, tag = "2")]
    forgotten: bool,
}

/// `a/<txid>`: an interactive transaction begun.
#[derive(Clone, PartialEq, prost::Message)]
struct ActiveRecord {
    /// When its idle timeout aborts it (unix ms).
    #[prost(uint64, tag = "1")]
    deadline_ms: u64,
}

/// `a/<txid>/<name>`: a participant enlisted.
#[derive(Clone, PartialEq, prost::Message)]
struct EnlistedRecord {
    /// The participant process's run (0: not said).
    #[prost(uint64, tag = "1")]
    run: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct InDoubtRecord {
    #[prost(string, tag = "1")]
    participant: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ParticipantRecord {
    #[prost(string, tag = "1")]
    address: String,
    /// decree.v1.Role (0, from before roles: a member).
    #[prost(int32, tag = "2")]
    role: i32,
}

/// The ring as the coordinator keeps it (`g/ring`): its routing, and the
/// migration in progress.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RingRecord {
    #[prost(message, optional, tag = "1")]
    pub routing: Option<v1::Routing>,
    #[prost(message, optional, tag = "2")]
    pub migration: Option<v1::Migration>,
    /// The batch under way (begun, maybe not decided): aborted at start unless decided.
    #[prost(string, tag = "3")]
    pub batch: String,
    /// Members waiting to join once the migration ends.
    #[prost(string, repeated, tag = "4")]
    pub queued: Vec<String>,
    /// The migration that ended last.
    #[prost(message, optional, tag = "5")]
    pub last: Option<v1::Migration>,
    /// The routing `batch` leads to if it commits: taken at start when its
    /// decision is in the log, so the ring never routes behind its members.
    #[prost(message, optional, tag = "6")]
    pub batch_routing: Option<v1::Routing>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("corrupt record at {key}: {source}")]
    Corrupt { key: String, source: RecordError },
}

/// What the log held at start.
#[derive(Debug)]
pub struct Recovered {
    pub coordinator_id: u32,
    /// This start's incarnation, already durable.
    pub incarnation: u64,
    /// COMMIT decisions with no end record: phase two must be redriven.
    pub unfinished: Vec<(TxId, Vec<ParticipantName>)>,
    /// One-phase transactions whose outcome is not known yet: ask their participant.
    pub one_phase_in_doubt: Vec<(TxId, ParticipantName)>,
    /// Interactive transactions begun and not yet committed or aborted.
    pub active: Vec<Active>,
    /// Participants enrolled before, with their last address and role (decree.v1.Role).
    pub participants: Vec<(ParticipantName, String, i32)>,
    /// The ring, if one was ever recorded.
    pub ring: Option<RingRecord>,
    /// Ended outcomes below this txid are forgotten (`None`: nothing pruned yet).
    pub horizon: Option<TxId>,
    /// Records read to start: a measure of start's work that does not depend
    /// on the machine (it grows with what is undecided, not with history).
    pub records_read: u64,
}

/// An interactive transaction the log holds as begun ([`DecisionLog::log_begin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub txid: TxId,
    /// When its idle timeout aborts it (unix ms).
    pub deadline_ms: u64,
    /// Each participant enlisted, with the run it enlisted from.
    pub enlisted: std::collections::BTreeMap<ParticipantName, u64>,
}

/// What the log says of a txid that is not in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A COMMIT decision exists (unfinished, or ended within the window).
    Committed,
    /// A one-phase outcome not known yet: the participant is being asked.
    InDoubt,
    /// No record, and the txid is below the horizon: it may have committed
    /// long ago; the record that would tell was pruned.
    Forgotten,
    /// No record at or above the horizon: aborted (presumed abort).
    Absent,
}

/// Whether `log` holds a coordinator's decision log (its identity record).
pub fn holds_decisions(log: &impl Storage) -> Result<bool, StoreError> {
    Ok(log.get(META_KEY)?.is_some())
}

/// What a coordinator process writes its decision log to: its own RocksDB
/// log, or (a group's replica) that log replicated through the group.
/// The batch of [`DecisionLog::log_decision`]: the COMMIT decision with its participants.
fn decision(txid: TxId, participants: &[ParticipantName]) -> Vec<Write> {
    let decision = DecisionRecord {
        participants: participants.iter().map(|p| p.to_string()).collect(),
        one_phase: false,
    };
    vec![Write::put(txid_key(DECISION, txid), record::encode(&decision))]
}

/// The batch of [`DecisionLog::log_end`]: the decision moves to the ended outcomes, atomically.
fn end(txid: TxId) -> Vec<Write> {
    vec![
        Write::single_delete(txid_key(DECISION, txid)),
        Write::put(
            txid_key(COMMITTED, txid),
            record::encode(&CommittedRecord { one_phase: false, forgotten: false }),
        ),
    ]
}

pub type Backing = decree_replica::Store<Log>;

/// The decision log, over any [`Storage`]: RocksDB in the server (its own, or
/// replicated by its group), memory in the simulator and the conformance cases.
#[derive(Clone)]
pub struct DecisionLog<S = Backing> {
    log: S,
    coordinator_id: u32,
    /// Outcomes below it are forgotten; raised before the records go.
    horizon: Arc<Mutex<Option<TxId>>>,
    /// `c/` records written by this process: what the count bound counts.
    ended: Arc<AtomicU64>,
}

/// The key of `txid`'s unfinished COMMIT decision (for checkers that read the disk).
pub fn decision_key(txid: TxId) -> Vec<u8> {
    txid_key(DECISION, txid)
}

/// The key of `txid`'s ended outcome in the window (for checkers that read the disk).
pub fn committed_key(txid: TxId) -> Vec<u8> {
    txid_key(COMMITTED, txid)
}

fn txid_key(prefix: &[u8], txid: TxId) -> Vec<u8> {
    [prefix, &txid.to_key_bytes()].concat()
}

/// `a/<txid>/<name>`: below `a/<txid>`'s range end ([`active_end`]).
fn enlisted_key(txid: TxId, participant: &ParticipantName) -> Vec<u8> {
    [&txid_key(ACTIVE, txid)[..], b"/", participant.as_str().as_bytes()].concat()
}

/// Just past every `a/` key of `txid` (`/` + 1).
fn active_end(txid: TxId) -> Vec<u8> {
    [&txid_key(ACTIVE, txid)[..], b"0"].concat()
}

/// The first key of `prefix` for coordinator `id` (below every txid it issues).
fn coordinator_start(prefix: &[u8], id: u32) -> Vec<u8> {
    [prefix, &id.to_be_bytes()[..], &[0u8; 16][..]].concat()
}

fn corrupt(key: &[u8], source: RecordError) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), source }
}

fn txid_of(prefix: &[u8], key: &[u8]) -> Result<TxId, StoreError> {
    TxId::from_key_bytes(&key[prefix.len()..])
        .ok_or_else(|| corrupt(key, RecordError::Truncated { len: key.len() }))
}

impl DecisionLog<Backing> {
    /// Opens the RocksDB log in `dir`: see [`DecisionLog::open_on`].
    pub async fn open(dir: &Path) -> Result<(DecisionLog, Recovered), StoreError> {
        DecisionLog::open_on(decree_replica::Store::Local(Log::open(dir)?)).await
    }
}

impl<S: Storage> DecisionLog<S> {
    /// Opens the log, bumps the incarnation durably and reads what must be
    /// recovered: the unfinished decisions and the registry, never the window
    /// of ended ones.
    pub async fn open_on(log: S) -> Result<(DecisionLog<S>, Recovered), StoreError> {
        Self::open_with_id(log, rand::random).await
    }

    /// [`DecisionLog::open_on`], with the id a new log takes from `new_id`
    /// (a log that has one keeps it): the simulator's ids come from its seed.
    pub async fn open_with_id(
        log: S,
        new_id: impl FnOnce() -> u32,
    ) -> Result<(DecisionLog<S>, Recovered), StoreError> {
        let read_before = log.stats().records_read.load(Ordering::Relaxed);
        let meta = match log.get(META_KEY)? {
            Some(bytes) => record::decode::<MetaRecord>(&bytes).map_err(|e| corrupt(META_KEY, e))?,
            None => MetaRecord { coordinator_id: new_id(), incarnation: 0 },
        };
        let meta = MetaRecord { incarnation: meta.incarnation + 1, ..meta };
        log.write(vec![Write::put(META_KEY, record::encode(&meta))], true).await?;
        let horizon = match log.get(HORIZON_KEY)? {
            None => None,
            Some(bytes) => {
                Some(record::decode::<TxIdRecord>(&bytes).map_err(|e| corrupt(HORIZON_KEY, e))?.into())
            }
        };
        migrate_old_ends(&log).await?;

        let mut unfinished = Vec::new();
        for (key, value) in log.scan_prefix(DECISION)? {
            let txid = txid_of(DECISION, &key)?;
            let decision = record::decode::<DecisionRecord>(&value).map_err(|e| corrupt(&key, e))?;
            let participants = decision
                .participants
                .iter()
                .map(|name| name.parse())
                .collect::<Result<Vec<ParticipantName>, _>>()
                .map_err(|_| corrupt(&key, RecordError::Decode("bad participant name".into())))?;
            unfinished.push((txid, participants));
        }
        let mut one_phase_in_doubt = Vec::new();
        for (key, value) in log.scan_prefix(ONE_PHASE_IN_DOUBT)? {
            let txid = txid_of(ONE_PHASE_IN_DOUBT, &key)?;
            let record = record::decode::<InDoubtRecord>(&value).map_err(|e| corrupt(&key, e))?;
            let participant = record
                .participant
                .parse()
                .map_err(|_| corrupt(&key, RecordError::Decode("bad participant name".into())))?;
            one_phase_in_doubt.push((txid, participant));
        }
        let (active, stale) = read_active(&log, &unfinished, &one_phase_in_doubt)?;
        if !stale.is_empty() {
            // Records that outlived their transaction's active state: gone
            // now, so that they are not read at every start (not synced: if
            // lost, the next start finds them stale again).
            log.write(stale.into_iter().map(Write::delete).collect(), false).await?;
        }
        let mut participants = Vec::new();
        for (key, value) in log.scan_prefix(REGISTRY)? {
            let name = std::str::from_utf8(&key[REGISTRY.len()..]).ok().and_then(|n| n.parse().ok());
            let name =
                name.ok_or_else(|| corrupt(&key, RecordError::Decode("bad participant name".into())))?;
            let entry = record::decode::<ParticipantRecord>(&value).map_err(|e| corrupt(&key, e))?;
            participants.push((name, entry.address, entry.role));
        }
        let ring = match log.get(RING_KEY)? {
            None => None,
            Some(bytes) => Some(record::decode::<RingRecord>(&bytes).map_err(|e| corrupt(RING_KEY, e))?),
        };
        let records_read = log.stats().records_read.load(Ordering::Relaxed) - read_before;
        let store = DecisionLog {
            log,
            coordinator_id: meta.coordinator_id,
            horizon: Arc::new(Mutex::new(horizon)),
            ended: Arc::new(AtomicU64::new(0)),
        };
        let recovered = Recovered {
            coordinator_id: meta.coordinator_id,
            incarnation: meta.incarnation,
            unfinished,
            one_phase_in_doubt,
            active,
            participants,
            ring,
            horizon,
            records_read,
        };
        Ok((store, recovered))
    }

    /// Makes the COMMIT decision durable (synced).
    pub async fn log_decision(&self, txid: TxId, participants: &[ParticipantName]) -> Result<(), StoreError> {
        self.log.write(decision(txid, participants), true).await?;
        Ok(())
    }

    /// [`Self::log_decision`], calling `then` once the record is synced (or
    /// the write failed) instead of returning a future
    /// ([`Storage::write_then`]).
    pub fn log_decision_then(
        &self,
        txid: TxId,
        participants: &[ParticipantName],
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.log.write_then(decision(txid, participants), Durability::Synced, move |written| {
            then(written.map_err(StoreError::from))
        });
    }

    /// Records the interactive transaction `txid` begun, aborted at
    /// `deadline_ms` if not committed (synced).
    pub async fn log_begin(&self, txid: TxId, deadline_ms: u64) -> Result<(), StoreError> {
        let value = record::encode(&ActiveRecord { deadline_ms });
        self.log.write(vec![Write::put(txid_key(ACTIVE, txid), value)], true).await?;
        Ok(())
    }

    /// Records `participant`, in process run `run`, enlisted in `txid` (synced).
    pub async fn log_enlist(
        &self,
        txid: TxId,
        participant: &ParticipantName,
        run: u64,
    ) -> Result<(), StoreError> {
        let value = record::encode(&EnlistedRecord { run });
        self.log.write(vec![Write::put(enlisted_key(txid, participant), value)], true).await?;
        Ok(())
    }

    /// `txid` is no longer active (its Commit began, or it aborted): its
    /// `a/` records go, in one range delete, synced soon.
    pub async fn forget_active(&self, txid: TxId) -> Result<(), StoreError> {
        let writes = vec![Write::delete_range(txid_key(ACTIVE, txid), active_end(txid))];
        self.log.write_with(writes, Durability::SyncedSoon).await?;
        Ok(())
    }

    /// Notes a one-phase commit for `GetOutcome` (not synced), and, if it was
    /// `in_doubt`, drops that record in the same batch, synced soon (sharing
    /// an fsync; nothing waits for it): until then a restart asks the
    /// participant again, which must still remember the branch.
    pub async fn log_one_phase_commit(
        &self,
        txid: TxId,
        _participant: &ParticipantName,
        in_doubt: bool,
    ) -> Result<(), StoreError> {
        let value = record::encode(&CommittedRecord { one_phase: true, forgotten: false });
        let mut writes = vec![Write::put(txid_key(COMMITTED, txid), value)];
        if in_doubt {
            writes.push(Write::single_delete(txid_key(ONE_PHASE_IN_DOUBT, txid)));
        }
        let durability = if in_doubt { Durability::SyncedSoon } else { Durability::Buffered };
        self.log.write_with(writes, durability).await?;
        self.ended.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records that a one-phase outcome is not known yet (synced): see the
    /// module's Correctness section.
    pub async fn log_one_phase_in_doubt(
        &self,
        txid: TxId,
        participant: &ParticipantName,
    ) -> Result<(), StoreError> {
        let value = record::encode(&InDoubtRecord { participant: participant.to_string() });
        self.log.write(vec![Write::put(txid_key(ONE_PHASE_IN_DOUBT, txid), value)], true).await?;
        Ok(())
    }

    /// The one-phase branch in doubt did not commit: drop its record, synced
    /// soon (as [`DecisionLog::log_one_phase_commit`]).
    /// The participant of the one-phase question `txid` forgot its outcome:
    /// the question leaves `u/` for a window record that answers FORGOTTEN,
    /// pruned with the window like any ended outcome (soon synced: if a crash
    /// comes first, the question comes back and hears "forgotten" again).
    pub async fn log_one_phase_forgotten(&self, txid: TxId) -> Result<(), StoreError> {
        let value = record::encode(&CommittedRecord { one_phase: true, forgotten: true });
        let writes = vec![
            Write::put(txid_key(COMMITTED, txid), value),
            Write::single_delete(txid_key(ONE_PHASE_IN_DOUBT, txid)),
        ];
        self.log.write_with(writes, Durability::SyncedSoon).await?;
        self.ended.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub async fn log_one_phase_aborted(&self, txid: TxId) -> Result<(), StoreError> {
        let writes = vec![Write::single_delete(txid_key(ONE_PHASE_IN_DOUBT, txid))];
        self.log.write_with(writes, Durability::SyncedSoon).await?;
        Ok(())
    }

    /// Every participant acked: phase two is over. The decision leaves `d/`
    /// (a single delete: it was put once) and joins the window (not synced).
    pub async fn log_end(&self, txid: TxId) -> Result<(), StoreError> {
        self.log.write(end(txid), false).await?;
        self.ended.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`Self::log_end`] for each of `txids` in one write, calling `then`
    /// once it is written (or failed) instead of returning a future
    /// ([`Storage::write_then`]).
    pub fn log_ends_then(&self, txids: &[TxId], then: impl FnOnce(Result<(), StoreError>) + Send + 'static) {
        let (ended, count) = (self.ended.clone(), txids.len() as u64);
        let writes = txids.iter().flat_map(|txid| end(*txid)).collect();
        self.log.write_then(writes, Durability::Buffered, move |written| {
            if written.is_ok() {
                ended.fetch_add(count, Ordering::Relaxed);
            }
            then(written.map_err(StoreError::from))
        });
    }

    /// What the log says of `txid`. `d/` is read before `c/`: [`Self::log_end`]
    /// moves a record from the first to the second atomically, so reading in
    /// this order cannot miss it. The horizon is read last: it is raised
    /// before records below it are deleted.
    pub fn recorded(&self, txid: TxId) -> Result<Recorded, StoreError> {
        let in_doubt = txid_key(ONE_PHASE_IN_DOUBT, txid);
        if let Some(bytes) = self.log.get(&in_doubt)? {
            record::decode::<InDoubtRecord>(&bytes).map_err(|e| corrupt(&in_doubt, e))?;
            return Ok(Recorded::InDoubt);
        }
        for prefix in [DECISION, COMMITTED] {
            let key = txid_key(prefix, txid);
            if let Some(bytes) = self.log.get(&key)? {
                if prefix == DECISION {
                    record::decode::<DecisionRecord>(&bytes).map_err(|e| corrupt(&key, e))?;
                    return Ok(Recorded::Committed);
                }
                let ended = record::decode::<CommittedRecord>(&bytes).map_err(|e| corrupt(&key, e))?;
                return Ok(if ended.forgotten { Recorded::Forgotten } else { Recorded::Committed });
            }
        }
        let below = self.horizon().is_some_and(|horizon| txid < horizon);
        Ok(if below { Recorded::Forgotten } else { Recorded::Absent })
    }

    /// True if a COMMIT decision for `txid` is on disk.
    pub fn is_committed(&self, txid: TxId) -> Result<bool, StoreError> {
        Ok(self.recorded(txid)? == Recorded::Committed)
    }

    /// Ended outcomes below this txid are forgotten.
    pub fn horizon(&self) -> Option<TxId> {
        *self.horizon.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ended or one-phase commits recorded by this process.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// Forgets the ended outcomes of every txid below `horizon`: their `c/`
    /// records go in one range delete, in the batch that makes the horizon
    /// durable (not synced: if the batch is lost, so is the deletion). The
    /// in-memory horizon is raised first. A horizon at or below the current
    /// one changes nothing. Unfinished decisions (`d/`) are never touched.
    pub async fn forget_before(&self, horizon: TxId) -> Result<bool, StoreError> {
        assert_eq!(horizon.coordinator, self.coordinator_id, "a horizon is in this coordinator's txids");
        {
            let mut current = self.horizon.lock().unwrap_or_else(|e| e.into_inner());
            if current.is_some_and(|c| c >= horizon) {
                return Ok(false);
            }
            *current = Some(horizon);
        }
        let record = TxIdRecord::from(horizon);
        let writes = vec![
            Write::delete_range(
                coordinator_start(COMMITTED, self.coordinator_id),
                txid_key(COMMITTED, horizon),
            ),
            Write::put(HORIZON_KEY, record::encode(&record)),
        ];
        self.log.write(writes, false).await?;
        Ok(true)
    }

    /// Compacts the forgotten part of the window, so that its space is
    /// reclaimed now rather than when compaction next reaches it. Blocks.
    pub fn compact_forgotten(&self) {
        if let Some(horizon) = self.horizon() {
            self.log
                .compact(&coordinator_start(COMMITTED, self.coordinator_id), &txid_key(COMMITTED, horizon));
        }
    }

    /// Remembers a participant's address and role (not synced).
    pub async fn save_participant(
        &self,
        name: &ParticipantName,
        address: &str,
        role: i32,
    ) -> Result<(), StoreError> {
        let key = [REGISTRY, name.as_str().as_bytes()].concat();
        let value = record::encode(&ParticipantRecord { address: address.to_owned(), role });
        self.log.write(vec![Write::put(key, value)], false).await?;
        Ok(())
    }

    /// Makes the ring's state durable (synced): a ring change, a batch begun.
    pub async fn save_ring(&self, ring: &RingRecord) -> Result<(), StoreError> {
        self.log.write(vec![Write::put(RING_KEY, record::encode(ring))], true).await?;
        Ok(())
    }

    /// Writes the ring's state without a sync: for what start rebuilds if it
    /// is lost (a committed batch's cursor, from its decision and `batch_routing`).
    pub async fn save_ring_unsynced(&self, ring: &RingRecord) -> Result<(), StoreError> {
        self.log.write(vec![Write::put(RING_KEY, record::encode(ring))], false).await?;
        Ok(())
    }

    pub fn fsyncs(&self) -> u64 {
        self.log.stats().fsyncs.load(Ordering::Relaxed)
    }
}

/// The interactive transactions `log` holds as begun: each `a/<txid>`
/// record with the `a/<txid>/<name>` records after it; and the keys of
/// stale records. Those whose records outlived a decision (`unfinished`,
/// `in_doubt`, an ended outcome) are not active, nor enlistments whose begin
/// record went (an Enlist written after the transaction left the active state).
fn read_active(
    log: &impl Storage,
    unfinished: &[(TxId, Vec<ParticipantName>)],
    in_doubt: &[(TxId, ParticipantName)],
) -> Result<(Vec<Active>, Vec<Vec<u8>>), StoreError> {
    let decided = |txid: TxId| -> Result<bool, StoreError> {
        Ok(unfinished.iter().any(|(t, _)| *t == txid)
            || in_doubt.iter().any(|(t, _)| *t == txid)
            || log.get(&txid_key(COMMITTED, txid))?.is_some())
    };
    let mut active: Vec<Active> = Vec::new();
    let mut stale = Vec::new();
    for (key, value) in log.scan_prefix(ACTIVE)? {
        let rest = &key[ACTIVE.len()..];
        let txid = rest.get(..20).and_then(TxId::from_key_bytes);
        let txid = txid.ok_or_else(|| corrupt(&key, RecordError::Truncated { len: key.len() }))?;
        match rest.get(20..) {
            Some([]) => {
                let record = record::decode::<ActiveRecord>(&value).map_err(|e| corrupt(&key, e))?;
                if decided(txid)? {
                    stale.push(key);
                } else {
                    active.push(Active {
                        txid,
                        deadline_ms: record.deadline_ms,
                        enlisted: Default::default(),
                    });
                }
            }
            Some([b'/', name @ ..]) => {
                let record = record::decode::<EnlistedRecord>(&value).map_err(|e| corrupt(&key, e))?;
                let name = std::str::from_utf8(name).ok().and_then(|n| n.parse::<ParticipantName>().ok());
                let name =
                    name.ok_or_else(|| corrupt(&key, RecordError::Decode("bad participant name".into())))?;
                // Its begin record sorts just before it.
                match active.last_mut().filter(|a| a.txid == txid) {
                    Some(last) => drop(last.enlisted.insert(name, record.run)),
                    None => stale.push(key),
                }
            }
            _ => return Err(corrupt(&key, RecordError::Decode("not an a/ key".into()))),
        }
    }
    Ok((active, stale))
}

/// Moves the ended decisions of the layout before the `c/` window (a `d/`
/// record kept beside an `e/` record) into the window, once. Bounded by what
/// that layout kept (it pruned at every start).
async fn migrate_old_ends(log: &impl Storage) -> Result<(), StoreError> {
    let ends = log.scan_prefix(OLD_END)?;
    if ends.is_empty() {
        return Ok(());
    }
    let mut writes = Vec::with_capacity(ends.len() * 3);
    for (key, _) in &ends {
        let txid = txid_of(OLD_END, key)?;
        let decision_key = txid_key(DECISION, txid);
        let one_phase = match log.get(&decision_key)? {
            Some(bytes) => {
                record::decode::<DecisionRecord>(&bytes).map_err(|e| corrupt(&decision_key, e))?.one_phase
            }
            None => false,
        };
        writes.push(Write::delete(decision_key));
        writes.push(Write::delete(key.clone()));
        writes.push(Write::put(
            txid_key(COMMITTED, txid),
            record::encode(&CommittedRecord { one_phase, forgotten: false }),
        ));
    }
    tracing::info!(records = ends.len(), "moved ended decisions of the earlier layout into the window");
    log.write(writes, true).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> ParticipantName {
        name.parse().unwrap()
    }

    use decree_runtime::storage::testing;

    async fn reopen<S: Storage>(open: &impl Fn() -> S) -> (DecisionLog<S>, Recovered) {
        DecisionLog::open_on(open()).await.unwrap()
    }

    /// Each case runs against RocksDB and against memory (reopened after a process crash).
    macro_rules! both {
        ($($case:ident),* $(,)?) => {
            mod rocksdb { $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$case(&decree_runtime::storage::testing::rocks(dir.path())).await
                }
            )* }
            mod memory { $(
                #[tokio::test]
                async fn $case() { super::$case(&decree_runtime::storage::testing::memory()).await }
            )* }
        };
    }

    both!(
        incarnation_grows_and_unfinished_decisions_come_back,
        below_the_horizon_no_record_is_forgotten_never_aborted,
        the_earlier_layout_is_moved_into_the_window_at_open,
        a_corrupt_decision_refuses_to_start,
        decisions_survive_a_restart_and_ended_ones_still_answer,
        the_ring_record_survives_a_restart,
        a_one_phase_outcome_its_participant_forgot_answers_forgotten_after_a_restart,
        interactive_transactions_come_back_active_with_their_enlisted_until_they_leave_it,
    );

    async fn interactive_transactions_come_back_active_with_their_enlisted_until_they_leave_it<S: Storage>(
        open: &impl Fn() -> S,
    ) {
        let (t1, t2, t3, t4);
        {
            let (store, recovered) = reopen(open).await;
            assert!(recovered.active.is_empty());
            let id = recovered.coordinator_id;
            (t1, t2, t3, t4) =
                (TxId::new(id, 1, 1), TxId::new(id, 1, 2), TxId::new(id, 1, 3), TxId::new(id, 1, 4));
            store.log_begin(t1, 1_000).await.unwrap();
            store.log_enlist(t1, &p("a"), 7).await.unwrap();
            store.log_enlist(t1, &p("b"), 3).await.unwrap();
            store.log_begin(t2, 2_000).await.unwrap();
            store.log_enlist(t2, &p("a"), 0).await.unwrap();
            store.log_begin(t3, 3_000).await.unwrap();
            store.log_enlist(t3, &p("a"), 1).await.unwrap();
            // t2 aborted; t3's Commit decided before its records went; an
            // Enlist of t4 written after it left the active state.
            store.forget_active(t2).await.unwrap();
            store.log_decision(t3, &[p("a")]).await.unwrap();
            store.log_enlist(t4, &p("b"), 5).await.unwrap();
        }
        let expected = vec![Active {
            txid: t1,
            deadline_ms: 1_000,
            enlisted: [(p("a"), 7), (p("b"), 3)].into_iter().collect(),
        }];
        {
            let (store, recovered) = reopen(open).await;
            assert_eq!(
                recovered.active, expected,
                "only t1 is active: t2 aborted, t3 decided, t4 never begun"
            );
            assert_eq!(recovered.unfinished, vec![(t3, vec![p("a")])]);
            let keys = store.log.scan_prefix(ACTIVE).unwrap().len();
            assert_eq!(keys, 3, "t1's three records; the stale ones went at start");
            store.forget_active(t1).await.unwrap();
        }
        let (_, recovered) = reopen(open).await;
        assert!(recovered.active.is_empty(), "{:?}", recovered.active);
    }

    async fn a_one_phase_outcome_its_participant_forgot_answers_forgotten_after_a_restart<S: Storage>(
        open: &impl Fn() -> S,
    ) {
        let txid;
        {
            let (store, recovered) = reopen(open).await;
            txid = TxId::new(recovered.coordinator_id, recovered.incarnation, 1);
            store.log_one_phase_in_doubt(txid, &p("a")).await.unwrap();
            assert_eq!(store.recorded(txid).unwrap(), Recorded::InDoubt);
            store.log_one_phase_forgotten(txid).await.unwrap();
            assert_eq!(
                store.recorded(txid).unwrap(),
                Recorded::Forgotten,
                "never ABORTED: it may have committed"
            );
        }
        let (store, recovered) = reopen(open).await;
        assert!(recovered.one_phase_in_doubt.is_empty(), "the question is not asked again");
        assert_eq!(store.recorded(txid).unwrap(), Recorded::Forgotten);
    }

    async fn the_ring_record_survives_a_restart<S: Storage>(open: &impl Fn() -> S) {
        let routing = decree_proto::ring::Routing {
            epoch: 4,
            current: decree_proto::ring::Ring::new(["p1", "p2"]),
            migration: None,
        };
        let record = RingRecord {
            routing: Some(routing.to_wire()),
            migration: Some(v1::Migration { change: "add p3".into(), moved_keys: 7, ..Default::default() }),
            batch: "00000001-1-9".into(),
            queued: vec!["p4".into()],
            last: None,
            batch_routing: None,
        };
        {
            let (store, _) = reopen(open).await;
            store.save_ring(&record).await.unwrap();
        }
        let (_, recovered) = reopen(open).await;
        assert_eq!(recovered.ring, Some(record));
    }

    async fn incarnation_grows_and_unfinished_decisions_come_back<S: Storage>(open: &impl Fn() -> S) {
        let (first_id, t1, t2, t3);
        {
            let (store, recovered) = reopen(open).await;
            assert_eq!(recovered.incarnation, 1);
            assert!(recovered.unfinished.is_empty());
            first_id = recovered.coordinator_id;
            t1 = TxId::new(first_id, 1, 1);
            t2 = TxId::new(first_id, 1, 2);
            t3 = TxId::new(first_id, 1, 3);
            store.log_decision(t1, &[p("a"), p("b")]).await.unwrap();
            store.log_decision(t2, &[p("b")]).await.unwrap();
            store.log_end(t2).await.unwrap();
            store.log_one_phase_commit(t3, &p("a"), false).await.unwrap();
            store.save_participant(&p("a"), "http://127.0.0.1:1", 2).await.unwrap();
            assert_eq!(store.ended(), 2);
        }
        let (store, recovered) = reopen(open).await;
        assert_eq!(recovered.coordinator_id, first_id);
        assert_eq!(recovered.incarnation, 2);
        assert_eq!(recovered.unfinished, vec![(t1, vec![p("a"), p("b")])]);
        assert_eq!(recovered.participants, vec![(p("a"), "http://127.0.0.1:1".to_string(), 2)]);
        assert_eq!(recovered.ring, None, "no ring recorded yet");
        assert_eq!(recovered.horizon, None);
        // meta, the one unfinished decision, the one registry entry: nothing of the ended ones.
        assert_eq!(recovered.records_read, 3);
        assert!(store.is_committed(t1).unwrap());
        assert!(store.is_committed(t2).unwrap(), "ended decisions still answer COMMITTED");
        assert!(store.is_committed(t3).unwrap(), "one-phase commits answer COMMITTED");
        assert_eq!(
            store.recorded(TxId::new(first_id, 1, 4)).unwrap(),
            Recorded::Absent,
            "no record means aborted"
        );
    }

    async fn below_the_horizon_no_record_is_forgotten_never_aborted<S: Storage>(open: &impl Fn() -> S) {
        let (id, unfinished);
        {
            let (store, recovered) = reopen(open).await;
            id = recovered.coordinator_id;
            let t = |s| TxId::new(id, 1, s);
            // 1..=10 commit and end; 11 stays unfinished; 12 aborts (no record); 13..=15 end.
            for s in (1..=10).chain(13..=15) {
                store.log_decision(t(s), &[p("a")]).await.unwrap();
                store.log_end(t(s)).await.unwrap();
            }
            unfinished = t(11);
            store.log_decision(unfinished, &[p("a"), p("b")]).await.unwrap();
            assert!(store.forget_before(t(13)).await.unwrap());
            assert!(!store.forget_before(t(5)).await.unwrap(), "a horizon never moves back");
            assert_eq!(store.horizon(), Some(t(13)));
            for s in 1..=10 {
                assert_eq!(store.recorded(t(s)).unwrap(), Recorded::Forgotten, "{s}");
            }
            assert_eq!(store.recorded(t(12)).unwrap(), Recorded::Forgotten, "an abort below the horizon");
            assert_eq!(store.recorded(unfinished).unwrap(), Recorded::Committed, "unfinished is kept");
            for s in 13..=15 {
                assert_eq!(store.recorded(t(s)).unwrap(), Recorded::Committed, "{s}");
            }
            assert_eq!(store.recorded(t(16)).unwrap(), Recorded::Absent);
        }
        let (store, recovered) = reopen(open).await;
        assert_eq!(recovered.horizon, Some(TxId::new(id, 1, 13)), "the horizon is durable");
        assert_eq!(recovered.unfinished, vec![(unfinished, vec![p("a"), p("b")])]);
        assert_eq!(store.recorded(TxId::new(id, 1, 3)).unwrap(), Recorded::Forgotten);
        assert_eq!(store.recorded(TxId::new(id, 1, 14)).unwrap(), Recorded::Committed);
        // A new incarnation's txids are above the horizon: no record there is an abort.
        assert_eq!(store.recorded(TxId::new(id, 2, 1)).unwrap(), Recorded::Absent);
    }

    async fn the_earlier_layout_is_moved_into_the_window_at_open<S: Storage>(open: &impl Fn() -> S) {
        let t = |s| TxId::new(9, 1, s);
        {
            let log = open();
            let meta = MetaRecord { coordinator_id: 9, incarnation: 1 };
            let decision =
                |one_phase| record::encode(&DecisionRecord { participants: vec!["a".into()], one_phase });
            let writes = vec![
                Write::put(META_KEY, record::encode(&meta)),
                // Ended, ended one-phase, unfinished.
                Write::put(txid_key(DECISION, t(1)), decision(false)),
                Write::put(txid_key(OLD_END, t(1)), Vec::new()),
                Write::put(txid_key(DECISION, t(2)), decision(true)),
                Write::put(txid_key(OLD_END, t(2)), Vec::new()),
                Write::put(txid_key(DECISION, t(3)), decision(false)),
            ];
            log.write(writes, true).await.unwrap();
        }
        let (store, recovered) = reopen(open).await;
        assert_eq!(recovered.unfinished, vec![(t(3), vec![p("a")])]);
        for s in 1..=3 {
            assert!(store.is_committed(t(s)).unwrap(), "{s}");
        }
        assert!(store.log.scan_prefix(OLD_END).unwrap().is_empty());
        drop(store);
        let (_, recovered) = reopen(open).await;
        assert_eq!(recovered.unfinished, vec![(t(3), vec![p("a")])], "migrated once, for good");
    }

    /// A long history through the store itself, pruned as the server prunes:
    /// the next start reads what is undecided and never the history, and the
    /// window on disk stays within its bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_million_transactions_start_reads_only_what_is_undecided() {
        const TRANSACTIONS: u64 = 1_000_000;
        const RETAIN: u64 = 20_000;
        const WRITERS: u64 = 250;
        let dir = tempfile::tempdir().unwrap();
        let (id, undecided);
        {
            let (store, recovered) = DecisionLog::open(dir.path()).await.unwrap();
            id = recovered.coordinator_id;
            let per_writer = TRANSACTIONS / WRITERS;
            // Rounds: every writer commits and ends a batch, then the store is pruned
            // to the newest RETAIN, as the pruner would.
            let rounds = 20;
            for round in 0..rounds {
                let tasks: Vec<_> = (0..WRITERS)
                    .map(|w| {
                        let store = store.clone();
                        #[allow(clippy::disallowed_methods)] // a test, of no term
                        tokio::spawn(async move {
                            let n = per_writer / rounds;
                            for i in 0..n {
                                let s = 1 + round * WRITERS * n + w * n + i;
                                let t = TxId::new(id, 1, s);
                                store.log_decision(t, &[p("a"), p("b")]).await.unwrap();
                                store.log_end(t).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                let issued = (round + 1) * (TRANSACTIONS / rounds);
                store.forget_before(TxId::new(id, 1, issued + 1 - RETAIN)).await.unwrap();
            }
            assert_eq!(store.ended(), TRANSACTIONS);
            // Some left undecided at the crash.
            undecided = (1..=7).map(|i| TxId::new(id, 1, TRANSACTIONS + i)).collect::<Vec<_>>();
            for t in &undecided {
                store.log_decision(*t, &[p("a")]).await.unwrap();
            }
            store.compact_forgotten();
            let window = store.log.scan_prefix(COMMITTED).unwrap().len() as u64;
            assert!(window <= RETAIN, "the window on disk holds {window} outcomes, bound {RETAIN}");
        }
        let (store, recovered) = reopen(&testing::rocks(dir.path())).await;
        assert_eq!(recovered.unfinished.len(), undecided.len());
        // meta, horizon, the undecided decisions: nothing of the million ended ones.
        assert_eq!(recovered.records_read, 2 + undecided.len() as u64);
        // The slowest test ends last: its process exits next, which must not be
        // while RocksDB is closing (it aborts).
        let closed = store.log.closed();
        drop(store);
        closed.await;
    }

    async fn a_corrupt_decision_refuses_to_start<S: Storage>(open: &impl Fn() -> S) {
        {
            let log = open();
            let key = txid_key(DECISION, TxId::new(1, 1, 1));
            let mut value =
                record::encode(&DecisionRecord { participants: vec!["a".into()], one_phase: false });
            let last = value.len() - 1;
            value[last] ^= 0xff;
            log.write(vec![Write::put(key, value)], true).await.unwrap();
        }
        match DecisionLog::open_on(open()).await {
            Err(StoreError::Corrupt { .. }) => {}
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a corrupt decision was read as absent"),
        }
    }

    async fn decisions_survive_a_restart_and_ended_ones_still_answer<S: Storage>(open: &impl Fn() -> S) {
        let (store, recovered) = reopen(open).await;
        let t = |s| TxId::new(recovered.coordinator_id, recovered.incarnation, s);
        store.log_decision(t(1), &[p("a")]).await.unwrap();
        store.log_decision(t(2), &[p("a")]).await.unwrap();
        store.log_end(t(1)).await.unwrap();
        drop(store);
        let (store, recovered) = reopen(open).await;
        assert!(recovered.unfinished.iter().any(|(txid, _)| *txid == t(2)), "a synced decision survives");
        assert!(store.is_committed(t(1)).unwrap(), "ended or not, t1 answers COMMITTED");
    }

    /// Several transactions' end records in one write: each leaves the
    /// unfinished, each still answers COMMITTED, and the count of ended ones
    /// grows by all of them; a machine crash before a sync redrives them all.
    #[test]
    fn ends_written_together_end_each_transaction() {
        use decree_runtime::storage::now_or_never;
        // Four decisions, then the ends of three in one write.
        let three_ended = || {
            let disk = decree_runtime::MemLog::new();
            let (store, recovered) = now_or_never(DecisionLog::open_on(disk.clone())).unwrap();
            let t = move |s| TxId::new(recovered.coordinator_id, recovered.incarnation, s);
            for s in 1..=4 {
                now_or_never(store.log_decision(t(s), &[p("a"), p("b")])).unwrap();
            }
            let (tx, rx) = std::sync::mpsc::channel();
            store.log_ends_then(&[t(1), t(2), t(4)], move |written| tx.send(written.is_ok()).unwrap());
            assert!(rx.recv().unwrap());
            assert_eq!(disk.unsynced_batches(), 1, "one buffered write for the three");
            assert_eq!(store.ended.load(Ordering::Relaxed), 3);
            (disk, t)
        };
        let (disk, t) = three_ended();
        let (store, recovered) = now_or_never(DecisionLog::open_on(disk.crash_process())).unwrap();
        assert_eq!(recovered.unfinished, vec![(t(3), vec![p("a"), p("b")])], "only t3 is still to finish");
        for s in 1..=4 {
            assert!(store.is_committed(t(s)).unwrap(), "t{s} answers COMMITTED");
        }
        let (disk, _) = three_ended();
        let (_, recovered) = now_or_never(DecisionLog::open_on(disk.crash_machine(0))).unwrap();
        assert_eq!(recovered.unfinished.len(), 4, "unsynced ends lost: all four redriven");
    }

    #[test]
    fn a_machine_crash_loses_an_unsynced_end_but_never_the_decision() {
        let disk = decree_runtime::MemLog::new();
        let (store, recovered) =
            decree_runtime::storage::now_or_never(DecisionLog::open_on(disk.clone())).unwrap();
        let t = |s| TxId::new(recovered.coordinator_id, recovered.incarnation, s);
        decree_runtime::storage::now_or_never(store.log_decision(t(1), &[p("a"), p("b")])).unwrap();
        decree_runtime::storage::now_or_never(store.log_end(t(1))).unwrap();
        assert_eq!(disk.unsynced_batches(), 1, "the end is buffered");
        let (store, recovered) =
            decree_runtime::storage::now_or_never(DecisionLog::open_on(disk.crash_machine(0))).unwrap();
        assert_eq!(
            recovered.unfinished,
            vec![(t(1), vec![p("a"), p("b")])],
            "redriven: Commit is idempotent"
        );
        assert!(store.is_committed(t(1)).unwrap());
    }
}
