//! Feeds arbitrary bytes to the PUBLISH_BATCH body decoder (the pub/sub data
//! stream's hot path). Whatever decodes must re-encode and decode to the same
//! batch; nothing may panic or allocate beyond the body's size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_wire::pubsub::fuzz_publish_batch(data);
});
