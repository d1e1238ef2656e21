//! openraft's own conformance suite for storage, run against the log store
//! and state machine. Over memory: `MemLog` and the RocksDB `Log` keep the
//! same promises (`decree_runtime::storage`'s conformance suite runs every
//! case against both), and the suite opens a store per case, faster than
//! RocksDB closes one.

use decree_replica::log_store::LogStore;
use decree_replica::state_machine::StateMachine;
use decree_replica::{NodeId, TypeConfig};
use decree_runtime::MemLog;
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct Memory;

impl StoreBuilder<TypeConfig, LogStore<MemLog>, StateMachine<MemLog>, ()> for Memory {
    async fn build(&self) -> Result<((), LogStore<MemLog>, StateMachine<MemLog>), StorageError<NodeId>> {
        let store = MemLog::new();
        Ok(((), LogStore::open(store.clone()).expect("an empty log opens"), StateMachine::new(store)))
    }
}

#[test]
fn the_log_and_state_machine_pass_openraft_s_storage_suite() {
    Suite::test_all(Memory).unwrap();
}
