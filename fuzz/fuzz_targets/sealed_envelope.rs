//! Feeds arbitrary bytes to the end-to-end sealed-envelope decoder and
//! openers (an event's payload, a call's arguments, a call's reply), and
//! to the key set decoder and verifier, topic and procedure patterns alike
//! (`macula_auth::keys`): an envelope that decodes re-encodes to the same
//! bytes; nothing may panic or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_auth::keys::fuzz_envelope(data);
});
