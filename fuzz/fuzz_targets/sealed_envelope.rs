//! Feeds arbitrary bytes to the end-to-end sealed-envelope decoder and
//! opener, and to the key set decoder and verifier (`macula_auth::keys`):
//! an envelope that decodes re-encodes to the same bytes; nothing may
//! panic or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_auth::keys::fuzz_envelope(data);
});
