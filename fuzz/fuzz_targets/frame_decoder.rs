//! Feeds arbitrary bytes to the frame decoder and every message decoder.
//! Whatever decodes must re-encode; nothing may panic or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_wire::message::fuzz_decode(data);
});
