//! Feeds arbitrary bytes to the PUBLISH_BATCH body decoder (the pub/sub data
//! stream's hot path), sealed batches (formats 2 and 3) included. Whatever decodes
//! must re-encode and decode to the same batch, and its seals must verify
//! or be refused; nothing may panic or allocate beyond the body's size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_pubsub::proof::fuzz_sealed_batch(data);
});
