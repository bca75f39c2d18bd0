//! Feeds arbitrary bytes to the PUBLISH_DROPPED body decoder (loss reports
//! on pub/sub data streams). Whatever decodes must re-encode to the same
//! bytes; nothing may panic or allocate beyond the body's size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_wire::pubsub::fuzz_publish_dropped(data);
});
