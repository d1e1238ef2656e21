//! The replicated data of one replica: the write batches of committed log
//! entries applied to a [`Storage`], and snapshots of it.
//!
//! Each apply writes the entries' batches and the last applied log id (with
//! the membership) in **one** batch, unsynced: the Raft log is the durable
//! copy, and a state machine that lost its tail in a machine crash has lost
//! its applied id with it, so openraft applies those entries again. The
//! apply is written at once on its own thread
//! ([`Storage::write_buffered_now`]), not queued behind the log's appends:
//! its keys are never the log's, and a leader may apply an entry a majority
//! of followers holds before its own append of it is synced, so a machine
//! crash can leave the applied id past the log's last entry; openraft mends
//! that on start by purging the log up to the applied id (those entries are
//! committed, held by the majority). A
//! snapshot (the data and that record) is written synced, since the log
//! entries it replaces are purged after it.

use std::io::Cursor;

use decree_runtime::{Storage, Write};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::{Member, NodeId, TypeConfig};

/// The state machine's own record: what it applied last.
const APPLIED: &[u8] = b"\xfdraft/applied";
/// The current snapshot.
const SNAPSHOT: &[u8] = b"\xferaft/snapshot";
/// Every key of the replicated data (and [`APPLIED`]) is below this one.
const DATA_END: &[u8] = b"\xfe";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    log_id: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    /// Every key and value of the data, [`APPLIED`] excluded.
    data: Vec<(Vec<u8>, Vec<u8>)>,
}

fn io(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

/// The state machine over `S`. Clones share the store.
#[derive(Clone)]
pub struct StateMachine<S> {
    store: S,
}

impl<S: Storage> StateMachine<S> {
    pub fn new(store: S) -> StateMachine<S> {
        StateMachine { store }
    }

    fn applied(&self) -> Result<Applied, StorageError<NodeId>> {
        match self.store.get(APPLIED).map_err(io)? {
            Some(bytes) => crate::codec::decode(&bytes).map_err(io),
            None => Ok(Applied::default()),
        }
    }

    fn snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError<NodeId>> {
        match self.store.get(SNAPSHOT).map_err(io)? {
            Some(bytes) => crate::codec::decode(&bytes).map(Some).map_err(io),
            None => Ok(None),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    crate::codec::encode(value)
}

impl<S: Storage> RaftSnapshotBuilder<TypeConfig> for StateMachine<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let applied = self.applied()?;
        let data: Vec<(Vec<u8>, Vec<u8>)> = self
            .store
            .scan_range(b"", DATA_END)
            .map_err(io)?
            .into_iter()
            .filter(|(k, _)| k != APPLIED)
            .collect();
        let snapshot_id = match applied.log_id {
            Some(id) => format!("{}-{}", id.leader_id, id.index),
            None => "empty".to_owned(),
        };
        let meta =
            SnapshotMeta { last_log_id: applied.log_id, last_membership: applied.membership, snapshot_id };
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let bytes = encode(&stored);
        self.store
            .write(vec![Write::put(SNAPSHOT, bytes.clone())], true)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl<S: Storage> RaftStateMachine<TypeConfig> for StateMachine<S> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>> {
        let applied = self.applied()?;
        Ok((applied.log_id, applied.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied()?;
        decree_runtime::crash::point(decree_runtime::crash::RAFT_AFTER_COMMIT_BEFORE_APPLY);
        let mut writes = Vec::new();
        let mut answers = Vec::new();
        for entry in entries {
            applied.log_id = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => writes.extend(batch.writes.into_iter().map(Write::from)),
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            answers.push(());
        }
        if answers.is_empty() {
            return Ok(answers);
        }
        writes.push(Write::put(APPLIED, encode(&applied)));
        // Now, on this task's thread: the apply's keys are never the log's.
        self.store.write_buffered_now(writes).await.map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let stored: StoredSnapshot = crate::codec::decode(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let applied = Applied { log_id: meta.last_log_id, membership: meta.last_membership.clone() };
        let mut writes = vec![Write::delete_range(b"".to_vec(), DATA_END.to_vec())];
        writes.extend(stored.data.into_iter().map(|(key, value)| Write::Put { key, value }));
        writes.push(Write::put(APPLIED, encode(&applied)));
        writes.push(Write::put(SNAPSHOT, bytes));
        self.store
            .write(writes, true)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.snapshot()?.map(|stored| {
            let meta = stored.meta.clone();
            Snapshot { meta, snapshot: Box::new(Cursor::new(encode(&stored))) }
        }))
    }
}
