//! Feeds arbitrary bytes to the decoders of RPC record values read from the
//! DHT (advertisements and service indexes). Whatever decodes must
//! re-encode to something that decodes to the same value; nothing may panic.
#![no_main]

use macula_wire::{Advertisement, ServiceIndex};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(ad) = Advertisement::decode(data) {
        let again = ad.encode().expect("a decoded advertisement re-encodes");
        assert_eq!(Advertisement::decode(&again).expect("round trip"), ad);
    }
    if let Ok(ix) = ServiceIndex::decode(data) {
        let again = ix.encode().expect("a decoded index re-encodes");
        assert_eq!(ServiceIndex::decode(&again).expect("round trip"), ix);
    }
});
