//! Feeds arbitrary bytes to the STATUS_REQUEST / STATUS_REPORT decoders
//! (`macula_wire::status`): decode, validate, re-encode. Nothing may panic
//! or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_wire::message::fuzz_status(data);
});
