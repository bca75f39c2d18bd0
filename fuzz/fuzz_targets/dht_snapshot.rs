//! The DHT snapshot file's decoder (`macula_runtime::dht_snapshot`): never
//! panics on any bytes, framed with a valid checksum or not; what decodes
//! re-encodes and decodes to the same snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macula_runtime::dht_snapshot::{decode, encode, MAGIC};
use macula_wire::NodeId;

fuzz_target!(|data: &[u8]| {
    let own = NodeId::from_bytes([1; 32]);
    let _ = decode(data, &own, 0, 1000);
    let mut framed = MAGIC.to_vec();
    framed.extend_from_slice(data);
    framed.extend_from_slice(blake3::hash(data).as_bytes());
    if let Ok(loaded) = decode(&framed, &own, 0, 1000) {
        let again = encode(own, &loaded.snapshot, 0);
        let back = decode(&again, &own, 0, 1000).expect("re-encoded snapshot decodes");
        assert_eq!(back.snapshot, loaded.snapshot);
    }
});
