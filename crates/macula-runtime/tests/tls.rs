//! Mutual TLS over real QUIC connections on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use macula_runtime::identity::Identity;
use macula_runtime::tls::{self, TlsConfigs, TlsMode, TlsOptions};
use macula_wire::NodeId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

const STEP: Duration = Duration::from_secs(10);

fn server_endpoint(cfg: &TlsConfigs) -> Endpoint {
    let crypto = QuicServerConfig::try_from(cfg.server.clone()).expect("quic server config");
    let sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).expect("bind server")
}

fn client_endpoint(client: Arc<rustls::ClientConfig>) -> Endpoint {
    let crypto = QuicClientConfig::try_from(client).expect("quic client config");
    let mut ep = Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("bind client");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

/// The result of one dial: what the client saw and what the server saw.
struct Outcome {
    client: Result<(quinn::Connection, NodeId), String>,
    server: Result<(quinn::Connection, NodeId), String>,
}

fn peer_id(conn: &quinn::Connection) -> Result<NodeId, String> {
    let identity = conn.peer_identity().ok_or("no peer identity")?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "peer identity is not a certificate chain".to_string())?;
    tls::peer_node_id(&certs).map_err(|e| e.to_string())
}

/// A client failure that may only show up after the handshake "completed"
/// on the client side (TLS 1.3: the server checks the client certificate
/// after the client has sent its Finished).
async fn settle(
    res: Result<quinn::Connection, ConnectionError>,
) -> Result<quinn::Connection, String> {
    let conn = res.map_err(|e| e.to_string())?;
    // Prove the connection is really up: one round trip on a stream.
    let roundtrip = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"ping").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(64).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(STEP, roundtrip).await {
        Ok(Ok(reply)) if reply == b"pong" => Ok(conn),
        Ok(Ok(_)) => Err("wrong reply".to_string()),
        Ok(Err(e)) => Err(format!("{e}; close reason: {:?}", conn.close_reason())),
        Err(_) => Err("round trip timed out".to_string()),
    }
}

/// Dials `server_cfg`'s endpoint from `client` with `server_name` and lets the
/// server answer one ping.
async fn dial(
    server_cfg: &TlsConfigs,
    client: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Outcome {
    let server = server_endpoint(server_cfg);
    let addr: SocketAddr = server.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let id = peer_id(&conn)?;
        // Answer one ping so the client can prove the connection works.
        if let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let _ = recv.read_to_end(64).await;
            let _ = send.write_all(b"pong").await;
            let _ = send.finish();
            let _ = tokio::time::timeout(STEP, conn.closed()).await;
        }
        Ok::<_, String>((conn, id))
    });

    let client_ep = client_endpoint(client);
    let client = async {
        let connecting = client_ep
            .connect(addr, server_name)
            .map_err(|e| e.to_string())?;
        let conn = settle(connecting.await).await?;
        let id = peer_id(&conn)?;
        Ok::<_, String>((conn, id))
    };
    let client = tokio::time::timeout(STEP, client)
        .await
        .unwrap_or_else(|_| Err("client timed out".to_string()));
    if let Ok((conn, _)) = &client {
        conn.close(0u32.into(), b"done");
    }
    let server = match tokio::time::timeout(STEP, server_task).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(format!("server task failed: {join}")),
        Err(_) => Err("server timed out".to_string()),
    };
    client_ep.close(0u32.into(), b"done");
    Outcome { client, server }
}

fn build(id: &Identity, mode: TlsMode, pinned: Vec<NodeId>) -> TlsConfigs {
    tls::build(id, &TlsOptions { mode, pinned }).expect("build tls")
}

fn self_certifying(id: &Identity) -> TlsConfigs {
    build(id, TlsMode::SelfCertifying, vec![])
}

#[tokio::test]
async fn mutual_auth_each_side_sees_the_other() {
    let a = Identity::generate();
    let b = Identity::generate();
    let (ca, cb) = (self_certifying(&a), self_certifying(&b));

    // Dialing with the right expected node ID works.
    let out = dial(&cb, ca.client.clone(), &tls::server_name(Some(b.node_id()))).await;
    let (_, server_seen_by_client) = out.client.expect("client side");
    let (_, client_seen_by_server) = out.server.expect("server side");
    assert_eq!(server_seen_by_client, b.node_id());
    assert_eq!(client_seen_by_server, a.node_id());

    // With no expectation ("any.macula") the peer is still authenticated.
    let out = dial(&cb, ca.client.clone(), &tls::server_name(None)).await;
    assert_eq!(out.client.expect("client side").1, b.node_id());
    assert_eq!(out.server.expect("server side").1, a.node_id());
}

#[tokio::test]
async fn alpn_is_negotiated() {
    let a = Identity::generate();
    let b = Identity::generate();
    let out = dial(
        &self_certifying(&b),
        self_certifying(&a).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    let (conn, _) = out.client.expect("client side");
    let data = conn
        .handshake_data()
        .expect("handshake data")
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .expect("rustls handshake data");
    assert_eq!(data.protocol.as_deref(), Some(tls::ALPN));
    // The server sees the expected node ID the client dialed, via SNI.
    let (conn, _) = out.server.expect("server side");
    let data = conn
        .handshake_data()
        .expect("handshake data")
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .expect("rustls handshake data");
    assert_eq!(data.protocol.as_deref(), Some(tls::ALPN));
    assert_eq!(
        data.server_name.as_deref(),
        Some(&*tls::server_name(Some(b.node_id())))
    );
}

#[tokio::test]
async fn wrong_expected_node_id_is_an_identity_error() {
    let a = Identity::generate();
    let b = Identity::generate();
    let impostor_target = Identity::generate().node_id();
    let out = dial(
        &self_certifying(&b),
        self_certifying(&a).client,
        &tls::server_name(Some(impostor_target)),
    )
    .await;
    let err = out.client.expect_err("dial must fail");
    assert!(err.contains("identity mismatch"), "{err}");
    assert!(err.contains(&impostor_target.to_string()), "{err}");
    assert!(err.contains(&b.node_id().to_string()), "{err}");
    let server = out
        .server
        .expect_err("server must not see an established connection");
    // PROTOCOL.md 2.3: the dialer closes with CRYPTO_ERROR 0x0128 (TLS
    // alert 40, handshake_failure), the reason naming both IDs.
    assert!(
        server.contains("cryptographic handshake failed: error 40"),
        "{server}"
    );
    assert!(server.contains(&impostor_target.to_string()), "{server}");
}

#[tokio::test]
async fn server_name_without_node_id_is_rejected() {
    let a = Identity::generate();
    let b = Identity::generate();
    let out = dial(
        &self_certifying(&b),
        self_certifying(&a).client,
        "localhost",
    )
    .await;
    let err = out.client.expect_err("dial must fail");
    assert!(err.contains("does not name a macula node"), "{err}");
}

/// Accepts any server certificate: a test-only stand-in for a client that has
/// no certificate of its own.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// PROTOCOL.md 2.3: only the dialer checks the server name; the accepting
/// node serves its one certificate whatever name (or none) it is sent.
#[tokio::test]
async fn the_accepting_node_ignores_the_server_name() {
    let a = Identity::generate();
    let b = Identity::generate();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // An IP address is sent as no SNI at all.
    for name in ["example.com", "127.0.0.1"] {
        // A third-party dialer with a's certificate that checks nothing.
        let mut client = (*self_certifying(&a).client).clone();
        client
            .dangerous()
            .set_certificate_verifier(Arc::new(AcceptAnything(provider.clone())));
        let out = dial(&self_certifying(&b), Arc::new(client), name).await;
        assert_eq!(out.server.expect("server side").1, a.node_id(), "{name}");
        assert_eq!(out.client.expect("client side").1, b.node_id(), "{name}");
    }
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let b = Identity::generate();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    client.alpn_protocols = vec![tls::ALPN.to_vec()];
    let out = dial(
        &self_certifying(&b),
        Arc::new(client),
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    let server_err = out.server.expect_err("server must reject");
    assert!(
        server_err.to_lowercase().contains("certificate"),
        "{server_err}"
    );
    assert!(out.client.is_err(), "client connection must not be usable");
}

#[tokio::test]
async fn pinning_rejects_unpinned_peers() {
    let a = Identity::generate();
    let b = Identity::generate();
    let someone_else = Identity::generate().node_id();

    // Server pins someone else: the client is refused by the server.
    let out = dial(
        &build(&b, TlsMode::SelfCertifying, vec![someone_else]),
        self_certifying(&a).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    let server_err = out.server.expect_err("server must reject");
    assert!(server_err.contains("not in the pinned"), "{server_err}");
    assert!(
        server_err.contains(&a.node_id().to_string()),
        "{server_err}"
    );
    // The same alert as for an identity error (PROTOCOL.md 2.3): 0x28 = 40.
    // TLS 1.3 lets the client finish first, so it learns on first use.
    let client_err = out.client.expect_err("client must be refused");
    assert!(client_err.contains("crypto(28)"), "{client_err}");

    // Client pins someone else: the client refuses the server.
    let out = dial(
        &self_certifying(&b),
        build(&a, TlsMode::SelfCertifying, vec![someone_else]).client,
        &tls::server_name(None),
    )
    .await;
    let client_err = out.client.expect_err("client must reject");
    assert!(client_err.contains("not in the pinned"), "{client_err}");
    assert!(out.server.is_err());

    // Both pin each other: accepted.
    let out = dial(
        &build(&b, TlsMode::SelfCertifying, vec![someone_else, a.node_id()]),
        build(&a, TlsMode::SelfCertifying, vec![b.node_id()]).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    assert_eq!(out.client.expect("client side").1, b.node_id());
    assert_eq!(out.server.expect("server side").1, a.node_id());
}

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        // A P-256 CA: chain verification is not limited to Ed25519, only the
        // node keys are.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Issues a certificate for a node's key with serverAuth and clientAuth.
    fn issue_cert(&self, id: &Identity) -> rcgen::Certificate {
        let der = id.pkcs8_der();
        let node_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der.as_slice()),
            &rcgen::PKCS_ED25519,
        )
        .unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec![tls::server_name(Some(id.node_id()))]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.signed_by(&node_key, &self.cert, &self.key).unwrap()
    }

    fn issue(&self, id: &Identity) -> CertificateDer<'static> {
        self.issue_cert(id).der().clone()
    }

    fn mode_for(&self, id: &Identity) -> TlsMode {
        TlsMode::Ca {
            roots: vec![self.cert.der().clone()],
            chain: vec![self.issue(id)],
        }
    }
}

#[tokio::test]
async fn ca_mode_nodes_connect() {
    let ca = Ca::new("macula test CA");
    let a = Identity::generate();
    let b = Identity::generate();

    // Node B loads its CA settings from PEM files, as the daemon does.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let cert_file = dir.path().join("node.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    std::fs::write(&cert_file, ca.issue_cert(&b).pem()).unwrap();
    let b_mode = TlsOptions::ca_from_files(&ca_file, &cert_file).unwrap();

    let out = dial(
        &build(&b, b_mode, vec![]),
        build(&a, ca.mode_for(&a), vec![]).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    assert_eq!(out.client.expect("client side").1, b.node_id());
    assert_eq!(out.server.expect("server side").1, a.node_id());
}

#[tokio::test]
async fn ca_mode_rejects_self_signed_peers() {
    let ca = Ca::new("macula test CA");
    let a = Identity::generate();
    let b = Identity::generate();

    // A self-signed client dialing a CA-mode server is refused by the server.
    let out = dial(
        &build(&b, ca.mode_for(&b), vec![]),
        self_certifying(&a).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    let server_err = out.server.expect_err("server must reject");
    assert!(
        server_err.contains("not issued by a trusted CA"),
        "{server_err}"
    );
    assert!(out.client.is_err());

    // A CA-mode client refuses a self-signed server, even with the right ID.
    let out = dial(
        &self_certifying(&b),
        build(&a, ca.mode_for(&a), vec![]).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    let client_err = out.client.expect_err("client must reject");
    assert!(
        client_err.contains("not issued by a trusted CA"),
        "{client_err}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn ca_mode_rejects_peers_of_another_ca() {
    let ca = Ca::new("macula test CA");
    let rogue = Ca::new("rogue CA");
    let a = Identity::generate();
    let b = Identity::generate();
    let out = dial(
        &build(&b, ca.mode_for(&b), vec![]),
        build(&a, rogue.mode_for(&a), vec![]).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    // The rogue-CA client already refuses B's certificate (issued by the other CA).
    let client_err = out.client.expect_err("client must reject");
    assert!(
        client_err.contains("not issued by a trusted CA"),
        "{client_err}"
    );
    assert!(out.server.is_err());

    // A client of the rogue CA that trusts both CAs (so it accepts B) is still
    // refused by B, which trusts only its own CA.
    let both = TlsMode::Ca {
        roots: vec![ca.cert.der().clone(), rogue.cert.der().clone()],
        chain: vec![rogue.issue(&a)],
    };
    let out = dial(
        &build(&b, ca.mode_for(&b), vec![]),
        build(&a, both, vec![]).client,
        &tls::server_name(Some(b.node_id())),
    )
    .await;
    let server_err = out.server.expect_err("server must reject");
    assert!(
        server_err.contains("not issued by a trusted CA"),
        "{server_err}"
    );
    assert!(out.client.is_err());
}

#[tokio::test]
async fn ca_mode_certificate_must_carry_the_node_key() {
    let ca = Ca::new("macula test CA");
    let a = Identity::generate();
    let b = Identity::generate();
    let err = tls::build(
        &a,
        &TlsOptions {
            mode: ca.mode_for(&b),
            pinned: vec![],
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, tls::TlsError::CertificateKeyMismatch { .. }),
        "{msg}"
    );
    assert!(msg.contains(&a.node_id().to_string()), "{msg}");
    assert!(msg.contains(&b.node_id().to_string()), "{msg}");
}
