//! The stream store's record decoder (`macula_runtime::stream::record`):
//! never panics on any bytes, and what decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use macula_runtime::stream::record;

fuzz_target!(|data: &[u8]| {
    let _ = record::decode_head(data);
    if let Ok(m) = record::decode(data) {
        let again = record::encode(
            m.ts,
            m.expires,
            &m.subject,
            m.msg_id.as_deref(),
            &m.headers,
            &m.payload,
        )
        .expect("a decoded record re-encodes");
        // An expiry of 0 and an empty message ID decode as absent, and
        // re-encode as the same bytes.
        assert_eq!(again, data);
    }
});
