//! What a stream's store writes: a leaf shared by the store (`store.rs`),
//! its journal (`journal.rs`) and a replicated stream's log entries
//! (`replica.rs`).

/// One write of a group. A replicated stream's writes travel in its Raft
/// log as MessagePack (`replica.rs`, PROTOCOL.md 5.12), so the enum is
/// serializable; `Index` and `Applied` are the member's own and never
/// travel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Write {
    /// Store a record under a sequence.
    Put(u64, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Delete records.
    Delete(Vec<u64>),
    /// Set the last sequence and timestamp.
    Last(u64, u64),
    /// Set the configuration (JSON).
    Config(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Set (`Some`) or delete a consumer's record.
    Consumer(String, #[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Set (`Some`) or delete the index snapshot.
    Index(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// Set the Raft log index a replicated stream's store has applied
    /// (written with the entry's changes: a replay skips them).
    Applied(u64),
    /// Delete every message and consumer (a replica installing another
    /// member's state).
    Clear,
}
