//! Feeds arbitrary bytes to the revocation list decoder and verifier
//! (`macula_auth`): decode, verify against a fixed realm, re-encode.
//! Nothing may panic or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_auth::revocation::fuzz_revocations(data);
});
