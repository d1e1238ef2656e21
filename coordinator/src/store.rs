//! The coordinator's durable state: its identity and incarnation, COMMIT
//! decisions, end records and the participant registry, in one RocksDB log.
//!
//! # Correctness
//!
//! - [`DecisionLog::open`] bumps the incarnation with a **synced** write before
//!   it returns, so no two starts hand out the same txids.
//! - [`DecisionLog::log_decision`] returns only after the decision record is
//!   **synced**: once it returns, the transaction is committed, whatever crashes.
//! - [`DecisionLog::log_end`], [`DecisionLog::log_one_phase_commit`] and
//!   [`DecisionLog::save_participant`] are **not synced**: they survive a
//!   process crash but may be lost with the machine. Losing an end record only
//!   causes a redundant redrive (Commit is idempotent); losing a registry entry
//!   only delays redelivery until the participant enrolls again.
//! - Absence of a decision record means ABORTED (presumed abort). A record
//!   that fails its checksum is an error, never "absent": the coordinator
//!   refuses to start rather than abort a committed transaction.
//! - Decision records are kept after their end record so that `GetOutcome`
//!   keeps answering COMMITTED; the oldest ended ones beyond
//!   [`RETAINED_ENDED`] are pruned at start.

use std::collections::BTreeSet;
use std::path::Path;

use decree_proto::{ParticipantName, TxId};
use decree_runtime::{record, Log, LogError, RecordError, Write};

/// Ended decisions kept for `GetOutcome`; older ones are pruned at start.
pub const RETAINED_ENDED: usize = 100_000;

const META_KEY: &[u8] = b"meta";
const DECISION: &[u8] = b"d/";
const END: &[u8] = b"e/";
const REGISTRY: &[u8] = b"r/";

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
    #[prost(bool, tag = "2")]
    one_phase: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EndRecord {}

#[derive(Clone, PartialEq, prost::Message)]
struct ParticipantRecord {
    #[prost(string, tag = "1")]
    address: String,
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
    /// Participants enrolled before, with their last address.
    pub participants: Vec<(ParticipantName, String)>,
}

#[derive(Clone)]
pub struct DecisionLog {
    log: Log,
}

fn txid_key(prefix: &[u8], txid: TxId) -> Vec<u8> {
    [prefix, &txid.to_key_bytes()].concat()
}

fn corrupt(key: &[u8], source: RecordError) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), source }
}

impl DecisionLog {
    /// Opens the log, bumps the incarnation durably and reads what must be recovered.
    pub async fn open(dir: &Path) -> Result<(DecisionLog, Recovered), StoreError> {
        let log = Log::open(dir)?;
        let meta = match log.get(META_KEY)? {
            Some(bytes) => record::decode::<MetaRecord>(&bytes).map_err(|e| corrupt(META_KEY, e))?,
            None => MetaRecord { coordinator_id: rand::random(), incarnation: 0 },
        };
        let meta = MetaRecord { incarnation: meta.incarnation + 1, ..meta };
        log.write(vec![Write::put(META_KEY, record::encode(&meta))], true).await?;

        let ended: BTreeSet<TxId> = log
            .scan_prefix(END)?
            .into_iter()
            .map(|(key, _)| {
                TxId::from_key_bytes(&key[END.len()..])
                    .ok_or_else(|| corrupt(&key, RecordError::Truncated { len: key.len() }))
            })
            .collect::<Result<_, _>>()?;
        let mut unfinished = Vec::new();
        for (key, value) in log.scan_prefix(DECISION)? {
            let txid = TxId::from_key_bytes(&key[DECISION.len()..])
                .ok_or_else(|| corrupt(&key, RecordError::Truncated { len: key.len() }))?;
            let decision = record::decode::<DecisionRecord>(&value).map_err(|e| corrupt(&key, e))?;
            if ended.contains(&txid) {
                continue;
            }
            let participants = decision
                .participants
                .iter()
                .map(|name| name.parse())
                .collect::<Result<Vec<ParticipantName>, _>>()
                .map_err(|_| corrupt(&key, RecordError::Decode("bad participant name".into())))?;
            unfinished.push((txid, participants));
        }
        let mut participants = Vec::new();
        for (key, value) in log.scan_prefix(REGISTRY)? {
            let name = std::str::from_utf8(&key[REGISTRY.len()..]).ok().and_then(|n| n.parse().ok());
            let name =
                name.ok_or_else(|| corrupt(&key, RecordError::Decode("bad participant name".into())))?;
            let entry = record::decode::<ParticipantRecord>(&value).map_err(|e| corrupt(&key, e))?;
            participants.push((name, entry.address));
        }
        let store = DecisionLog { log };
        store.prune_ended(&ended).await?;
        let recovered = Recovered {
            coordinator_id: meta.coordinator_id,
            incarnation: meta.incarnation,
            unfinished,
            participants,
        };
        Ok((store, recovered))
    }

    async fn prune_ended(&self, ended: &BTreeSet<TxId>) -> Result<(), StoreError> {
        let excess = ended.len().saturating_sub(RETAINED_ENDED);
        if excess == 0 {
            return Ok(());
        }
        let writes = ended
            .iter()
            .take(excess)
            .flat_map(|txid| [Write::delete(txid_key(DECISION, *txid)), Write::delete(txid_key(END, *txid))])
            .collect();
        self.log.write(writes, false).await?;
        Ok(())
    }

    /// Makes the COMMIT decision durable (synced).
    pub async fn log_decision(&self, txid: TxId, participants: &[ParticipantName]) -> Result<(), StoreError> {
        let decision = DecisionRecord {
            participants: participants.iter().map(|p| p.to_string()).collect(),
            one_phase: false,
        };
        self.log.write(vec![Write::put(txid_key(DECISION, txid), record::encode(&decision))], true).await?;
        Ok(())
    }

    /// Notes a one-phase commit for `GetOutcome` (not synced).
    pub async fn log_one_phase_commit(
        &self,
        txid: TxId,
        participant: &ParticipantName,
    ) -> Result<(), StoreError> {
        let decision = DecisionRecord { participants: vec![participant.to_string()], one_phase: true };
        let writes = vec![
            Write::put(txid_key(DECISION, txid), record::encode(&decision)),
            Write::put(txid_key(END, txid), record::encode(&EndRecord {})),
        ];
        self.log.write(writes, false).await?;
        Ok(())
    }

    /// Every participant acked: phase two is over (not synced).
    pub async fn log_end(&self, txid: TxId) -> Result<(), StoreError> {
        self.log.write(vec![Write::put(txid_key(END, txid), record::encode(&EndRecord {}))], false).await?;
        Ok(())
    }

    /// True if a COMMIT decision for `txid` is on disk.
    pub fn is_committed(&self, txid: TxId) -> Result<bool, StoreError> {
        let key = txid_key(DECISION, txid);
        match self.log.get(&key)? {
            None => Ok(false),
            Some(bytes) => {
                record::decode::<DecisionRecord>(&bytes).map(|_| true).map_err(|e| corrupt(&key, e))
            }
        }
    }

    /// Remembers a participant's address (not synced).
    pub async fn save_participant(&self, name: &ParticipantName, address: &str) -> Result<(), StoreError> {
        let key = [REGISTRY, name.as_str().as_bytes()].concat();
        let value = record::encode(&ParticipantRecord { address: address.to_owned() });
        self.log.write(vec![Write::put(key, value)], false).await?;
        Ok(())
    }

    pub fn fsyncs(&self) -> u64 {
        self.log.stats().fsyncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> ParticipantName {
        name.parse().unwrap()
    }

    async fn reopen(dir: &Path) -> (DecisionLog, Recovered) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match DecisionLog::open(dir).await {
                Ok(opened) => return opened,
                Err(err) if std::time::Instant::now() > deadline => panic!("reopen: {err}"),
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }

    #[tokio::test]
    async fn incarnation_grows_and_unfinished_decisions_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (first_id, t1, t2);
        {
            let (store, recovered) = DecisionLog::open(dir.path()).await.unwrap();
            assert_eq!(recovered.incarnation, 1);
            assert!(recovered.unfinished.is_empty());
            first_id = recovered.coordinator_id;
            t1 = TxId::new(first_id, 1, 1);
            t2 = TxId::new(first_id, 1, 2);
            store.log_decision(t1, &[p("a"), p("b")]).await.unwrap();
            store.log_decision(t2, &[p("b")]).await.unwrap();
            store.log_end(t2).await.unwrap();
            store.save_participant(&p("a"), "http://127.0.0.1:1").await.unwrap();
        }
        let (store, recovered) = reopen(dir.path()).await;
        assert_eq!(recovered.coordinator_id, first_id);
        assert_eq!(recovered.incarnation, 2);
        assert_eq!(recovered.unfinished, vec![(t1, vec![p("a"), p("b")])]);
        assert_eq!(recovered.participants, vec![(p("a"), "http://127.0.0.1:1".to_string())]);
        assert!(store.is_committed(t1).unwrap());
        assert!(store.is_committed(t2).unwrap(), "ended decisions still answer COMMITTED");
        assert!(!store.is_committed(TxId::new(first_id, 1, 3)).unwrap(), "no record means aborted");
    }

    #[tokio::test]
    async fn a_corrupt_decision_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path()).unwrap();
            let key = txid_key(DECISION, TxId::new(1, 1, 1));
            let mut value =
                record::encode(&DecisionRecord { participants: vec!["a".into()], one_phase: false });
            let last = value.len() - 1;
            value[last] ^= 0xff;
            log.write(vec![Write::put(key, value)], true).await.unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match DecisionLog::open(dir.path()).await {
                Err(StoreError::Corrupt { .. }) => break,
                Err(StoreError::Log(_)) if std::time::Instant::now() < deadline => {
                    tokio::task::yield_now().await
                }
                Err(other) => panic!("unexpected error {other}"),
                Ok(_) => panic!("a corrupt decision was read as absent"),
            }
        }
    }
}
