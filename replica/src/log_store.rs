//! The Raft log and vote of one replica, over a [`Storage`].
//!
//! # Correctness
//!
//! openraft counts on two things here (its documented pitfalls): that what
//! it is told is durable is durable, and that writes apply in order.
//! - [`LogStore::append`] writes the entries with a **synced** write and only
//!   then calls back that they are flushed: a replica never acknowledges an
//!   entry (towards the majority that makes it committed) it could lose.
//! - [`LogStore::save_vote`] returns only after a synced write: a replica
//!   that voted never votes again in the same term after a crash.
//! - Truncation and purge are synced too; every write goes through the one
//!   `Storage`, whose batches apply in call order.
//! - The committed log id is saved unsynced: it only shortens a restart
//!   (openraft finds the committed entries again from the group).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use decree_runtime::{LogError, Storage, Write};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};

use crate::{NodeId, TypeConfig};

const VOTE: &[u8] = b"\xferaft/vote";
const COMMITTED: &[u8] = b"\xferaft/committed";
const PURGED: &[u8] = b"\xferaft/purged";
const LOG: &[u8] = b"\xferaft/log/";
const IDENTITY: &[u8] = b"\xferaft/identity";
/// Just past every log entry's key.
const LOG_END: &[u8] = b"\xferaft/log0";

fn entry_key(index: u64) -> Vec<u8> {
    [LOG, &index.to_be_bytes()].concat()
}

fn corrupt(e: impl std::fmt::Display) -> LogError {
    LogError::Corrupt(format!("a raft log record: {e}"))
}

fn read_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError<NodeId>> {
    crate::codec::decode(bytes).map_err(read_error)
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    crate::codec::encode(value)
}

/// Whether `store` holds a replica's state: a vote, or log entries (present
/// or purged). A store without is a replica that never joined a group.
pub fn holds_replica(store: &impl Storage) -> Result<bool, LogError> {
    Ok(store.get(VOTE)?.is_some()
        || store.get(PURGED)?.is_some()
        || !store.scan_range(LOG, LOG_END)?.is_empty())
}

/// The identity of the replica `store` holds ([`crate::Member`]): drawn at
/// random the first time, and synced before it is returned, so that a
/// replica never answers with an identity it could lose. A wiped or
/// replaced store draws another.
pub async fn identity(store: &impl Storage) -> Result<u64, LogError> {
    if let Some(bytes) = store.get(IDENTITY)? {
        let bytes: [u8; 8] =
            bytes.as_slice().try_into().map_err(|_| corrupt("the identity is not 8 bytes"))?;
        return Ok(u64::from_be_bytes(bytes));
    }
    let identity = loop {
        let drawn: u64 = rand::random();
        if drawn != 0 {
            break drawn;
        }
    };
    store.write(vec![Write::put(IDENTITY.to_vec(), identity.to_be_bytes().to_vec())], true).await?;
    Ok(identity)
}

/// The log of one replica. Clones share the store and the cached last log id.
#[derive(Clone)]
pub struct LogStore<S> {
    store: S,
    /// The last entry's log id (`None`: the log holds no entry), kept here
    /// because a `Storage` scans forward only.
    last: Arc<Mutex<Option<LogId<NodeId>>>>,
}

impl<S: Storage> LogStore<S> {
    /// The log found in `store` (empty the first time).
    ///
    /// The entries are contiguous (appends extend them, truncation removes a
    /// suffix, purge a prefix), so the last one is found by point lookups,
    /// doubling then halving from the first: a long log opens as fast as a
    /// short one.
    pub fn open(store: S) -> Result<LogStore<S>, LogError> {
        let purged: Option<LogId<NodeId>> = match store.get(PURGED)? {
            Some(bytes) => Some(crate::codec::decode(&bytes).map_err(corrupt)?),
            None => None,
        };
        let exists = |index: u64| store.get(&entry_key(index)).map(|v| v.is_some());
        let mut at = purged.map_or(0, |p| p.index + 1);
        let last = if exists(at)? {
            let mut step = 1u64;
            while exists(at + step)? {
                at += step;
                step *= 2;
            }
            // The last entry is in [at, at + step).
            let (mut low, mut high) = (at, at + step);
            while high - low > 1 {
                let middle = low + (high - low) / 2;
                if exists(middle)? {
                    low = middle;
                } else {
                    high = middle;
                }
            }
            let bytes = store.get(&entry_key(low))?.expect("found above");
            Some(crate::codec::decode::<Entry<TypeConfig>>(&bytes).map_err(corrupt)?.log_id)
        } else {
            None
        };
        Ok(LogStore { store, last: Arc::new(Mutex::new(last)) })
    }

    fn last(&self) -> Option<LogId<NodeId>> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_last(&self, last: Option<LogId<NodeId>>) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = last;
    }

    fn read<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        self.store.get(key).map_err(read_error)?.map(|bytes| decode(&bytes)).transpose()
    }

    async fn synced(&self, writes: Vec<Write>) -> Result<(), StorageError<NodeId>> {
        self.store.write(writes, true).await.map_err(write_error)
    }
}

impl<S: Storage> RaftLogReader<TypeConfig> for LogStore<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let from = match range.start_bound() {
            Bound::Included(i) => entry_key(*i),
            Bound::Excluded(i) => entry_key(i.saturating_add(1)),
            Bound::Unbounded => LOG.to_vec(),
        };
        let to = match range.end_bound() {
            Bound::Included(i) if *i < u64::MAX => entry_key(i + 1),
            Bound::Excluded(i) => entry_key(*i),
            _ => LOG_END.to_vec(),
        };
        if from >= to {
            return Ok(Vec::new());
        }
        self.store
            .scan_range(&from, &to)
            .map_err(read_error)?
            .iter()
            .map(|(_, bytes)| decode(bytes))
            .collect()
    }
}

impl<S: Storage> RaftLogStorage<TypeConfig> for LogStore<S> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.read(PURGED)?;
        let last_log_id = self.last().or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.store
            .write(vec![Write::put(VOTE, encode(vote))], true)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.read(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        let write = match committed {
            Some(id) => Write::put(COMMITTED, encode(&id)),
            None => Write::delete(COMMITTED),
        };
        self.store.write(vec![write], false).await.map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.read(COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut last = None;
        let writes: Vec<Write> = entries
            .into_iter()
            .map(|entry| {
                last = Some(entry.log_id);
                Write::put(entry_key(entry.log_id.index), encode(&entry))
            })
            .collect();
        if writes.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        let written = self.store.write(writes, true).await;
        if written.is_ok() {
            self.set_last(last);
            decree_runtime::crash::point(decree_runtime::crash::RAFT_AFTER_APPEND);
        }
        // Durable (synced) before openraft hears it is: only then may this replica's
        // acknowledgement count towards a majority.
        callback
            .log_io_completed(written.as_ref().map(drop).map_err(|e| std::io::Error::other(e.to_string())));
        written.map_err(write_error)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.synced(vec![Write::delete_range(entry_key(log_id.index), LOG_END)]).await?;
        let before = match log_id.index.checked_sub(1) {
            Some(index) => self.try_get_log_entries(index..=index).await?.pop().map(|e| e.log_id),
            None => None,
        };
        self.set_last(before);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let writes = vec![
            Write::put(PURGED, encode(&log_id)),
            Write::delete_range(LOG.to_vec(), entry_key(log_id.index.saturating_add(1))),
        ];
        self.synced(writes).await?;
        if self.last().is_some_and(|last| last.index <= log_id.index) {
            self.set_last(None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::CommittedLeaderId;

    use super::*;

    fn id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    async fn put_entries(store: &decree_runtime::MemLog, indexes: std::ops::RangeInclusive<u64>) {
        let writes = indexes
            .map(|i| Write::put(entry_key(i), encode(&Entry::<TypeConfig>::new_blank(id(i)))))
            .collect();
        store.write(writes, true).await.unwrap();
    }

    #[tokio::test]
    async fn open_finds_the_last_entry_of_any_log_by_lookups() {
        let empty = decree_runtime::MemLog::new();
        assert_eq!(LogStore::open(empty).unwrap().last(), None);
        for last in [0u64, 1, 2, 7, 8, 1000, 1023, 1024] {
            let store = decree_runtime::MemLog::new();
            put_entries(&store, 0..=last).await;
            assert_eq!(LogStore::open(store).unwrap().last(), Some(id(last)), "entries 0..={last}");
        }
        // Purged up to 500: the entries start at 501.
        let store = decree_runtime::MemLog::new();
        put_entries(&store, 501..=777).await;
        store.write(vec![Write::put(PURGED, encode(&id(500)))], true).await.unwrap();
        assert_eq!(LogStore::open(store).unwrap().last(), Some(id(777)));
        // Purged up to the last: no entry left.
        let store = decree_runtime::MemLog::new();
        store.write(vec![Write::put(PURGED, encode(&id(9)))], true).await.unwrap();
        assert_eq!(LogStore::open(store).unwrap().last(), None);
    }
}
