//! Feeds arbitrary bytes to the decoders of RAFT_REQUEST bodies (openraft's
//! append-entries, vote and install-snapshot requests, and the KV requests
//! members forward to the leader) and applies every KV request that decodes
//! to a fresh state machine. Nothing may panic.
#![no_main]

use macula_raft::kv::{Kv, Limits};
use macula_raft::openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use macula_raft::{MemberId, Request, TypeConfig};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = rmp_serde::from_slice::<AppendEntriesRequest<TypeConfig>>(data);
    let _ = rmp_serde::from_slice::<VoteRequest<MemberId>>(data);
    let _ = rmp_serde::from_slice::<InstallSnapshotRequest<TypeConfig>>(data);
    if let Ok(req) = rmp_serde::from_slice::<Request>(data) {
        let mut kv = Kv::new(Limits::default());
        let _ = kv.apply(req.clone());
        let _ = kv.apply(req);
    }
});
