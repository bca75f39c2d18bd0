//! Feeds arbitrary bytes to the decoder of relay record values read from the
//! DHT (`relay:<realm>:<node id>`). Whatever decodes must re-encode to the
//! same value; nothing may panic. Relay messages themselves are covered by
//! `frame_decoder`, which decodes every message type.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_wire::relay::fuzz_relay_record(data);
});
