//! The remote stream procedure's bodies (`macula_runtime::stream::remote`,
//! PROTOCOL.md 5.12): a request or an answer from any bytes never panics,
//! and a decoded request re-encodes to something that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macula_runtime::stream::remote::{decode_answer, decode_op};

fuzz_target!(|data: &[u8]| {
    if let Ok(op) = decode_op(data) {
        let again = rmp_serde::to_vec_named(&op).expect("a decoded request re-encodes");
        decode_op(&again).expect("a re-encoded request decodes");
    }
    let _ = decode_answer(data);
});
