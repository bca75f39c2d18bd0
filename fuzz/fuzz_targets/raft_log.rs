//! Feeds arbitrary bytes to the Raft log's replay (`macula_raft::wal`), as
//! the contents of a segment file: records, checksums, entries. Nothing may
//! panic or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_raft::wal::fuzz_scan(data);
});
