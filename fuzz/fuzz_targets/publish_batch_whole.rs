//! Feeds arbitrary bytes to the PUBLISH_BATCH body decoder as format 3
//! (seals with a kind byte; kind 2 carries a hash and is checked over its
//! messages hashed whole when it has them all): the first byte is forced
//! to 3 so that every input reaches the seal kinds. Whatever decodes must
//! re-encode and decode to the same batch, and its seals must verify or be
//! refused; nothing may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut body = data.to_vec();
    if let Some(first) = body.first_mut() {
        *first = macula_wire::pubsub::BATCH_FORMAT_SEALED_WHOLE;
    }
    macula_pubsub::proof::fuzz_sealed_batch(&body);
});
