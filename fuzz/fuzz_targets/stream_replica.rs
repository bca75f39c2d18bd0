//! A replicated stream's bytes from other members
//! (`macula_runtime::stream::replica`, PROTOCOL.md 5.12): a log entry's
//! store writes, a snapshot's applier state and a `_node.streams.replica`
//! request from any bytes never panic, and a decoded value re-encodes to
//! something that decodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macula_runtime::stream::replica::{decode_request, decode_state, decode_writes};

fuzz_target!(|data: &[u8]| {
    if let Ok(w) = decode_writes(data) {
        let again = rmp_serde::to_vec(&w).expect("decoded writes re-encode");
        assert_eq!(decode_writes(&again).expect("re-encoded writes decode"), w);
    }
    if let Ok(s) = decode_state(data) {
        let again = rmp_serde::to_vec_named(&s).expect("a decoded state re-encodes");
        assert_eq!(decode_state(&again).expect("a re-encoded state decodes"), s);
    }
    if let Ok(r) = decode_request(data) {
        let again = rmp_serde::to_vec_named(&r).expect("a decoded request re-encodes");
        decode_request(&again).expect("a re-encoded request decodes");
    }
});
