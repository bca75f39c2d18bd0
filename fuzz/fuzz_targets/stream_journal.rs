//! Feeds arbitrary bytes to a stream store's journal replay
//! (`macula_runtime::stream::journal`), as the contents of the file:
//! records, checksums, epochs, store writes. Nothing may panic or
//! over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_runtime::stream::journal::fuzz_replay(data);
});
