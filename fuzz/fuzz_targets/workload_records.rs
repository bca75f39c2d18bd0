//! The workload service's bytes from other nodes and from the KV
//! (`macula_rollout`, PROTOCOL.md 5.15): a control request, an artifact
//! manifest (checked, its chunks' ranges and checks), and the records of
//! apps, releases and rollouts from any bytes never panic; a decoded
//! rollout takes every transition without panicking, whatever its batches
//! and progress say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macula_rollout::control::decode_control;
use macula_rollout::manifest::Manifest;
use macula_rollout::records::{AppSpec, Release, Rollout};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = decode_control(data) {
        let again = serde_json::to_vec(&c).expect("a decoded request re-encodes");
        assert_eq!(decode_control(&again).expect("re-encoded decodes"), c);
    }
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        if m.check(1 << 20).is_ok() {
            for i in 0..m.chunks.len().min(64) as u32 {
                let r = m.range(i).expect("a checked manifest has every chunk's range");
                assert!(r.end as u64 <= m.size);
                let _ = m.check_chunk(i, &data[..r.len().min(data.len())]);
            }
        }
    }
    let _ = serde_json::from_slice::<AppSpec>(data);
    let _ = serde_json::from_slice::<Release>(data);
    if let Ok(mut r) = serde_json::from_slice::<Rollout>(data) {
        let _ = r.current_batch();
        let _ = r.touched();
        r.batch_done(1);
        let _ = r.promote(2);
        let _ = r.abort(3);
        r.fail(4, "fuzz");
        r.rolled_back(5);
        r.event(6, "x");
    }
});
