//! Feeds arbitrary text to the `traceparent` header parser (PUBLISH and CALL
//! headers, docs/PROTOCOL.md). Nothing may panic; whatever parses formats
//! back to a value that parses to the same trace context.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = macula_wire::trace::TraceParent::parse(s) {
        let again = macula_wire::trace::TraceParent::parse(&t.to_string());
        assert_eq!(again, Ok(t));
    }
});
