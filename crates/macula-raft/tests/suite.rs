//! openraft's own storage conformance suite against the redb store.

use macula_raft::openraft::testing::{StoreBuilder, Suite};
use macula_raft::openraft::{AnyError, StorageIOError};
use macula_raft::{open, LogStore, StateMachineStore, StorageError, TypeConfig};
use tempfile::TempDir;

/// Opens a fresh store in a new temporary directory (kept alive by the guard).
struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let (log, sm) = open(&dir.path().join("raft").join("group.redb"))
            .map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RedbBuilder) {
        panic!("storage suite failed: {e}");
    }
}
