//! Feeds arbitrary bytes, as a peer's TLS certificate, to the code that
//! extracts the node ID from it.
#![no_main]

use macula_runtime::tls::peer_node_id;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let cert = rustls::pki_types::CertificateDer::from(data);
    let _ = peer_node_id(&[cert]);
});
