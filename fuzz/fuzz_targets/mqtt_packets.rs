//! Feeds arbitrary bytes to the MQTT bridge as a client's byte stream
//! (`macula_mqtt::codec::fuzz_stream`): version negotiation, every packet
//! decoder of rmqtt-codec behind the size limit, the translation to the
//! core's packets, topic mapping, and encoding back. Nothing may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_mqtt::codec::fuzz_stream(data);
});
