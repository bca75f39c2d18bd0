//! Mutual TLS 1.3 for QUIC: who is on the other end of a connection.
//!
//! Every node presents a certificate for its Ed25519 node key, and every node
//! requires one from its peer. The peer's [`NodeId`] is derived from the public
//! key in the peer's end-entity certificate, and the TLS 1.3 `CertificateVerify`
//! signature proves the peer holds the matching secret key. Nothing else about
//! a self-signed certificate (names, dates, issuer) is trusted.
//!
//! Modes:
//! - [`TlsMode::SelfCertifying`] (default): any peer that proves an Ed25519 key
//!   is accepted as the node that key derives to.
//! - [`TlsMode::Ca`]: additionally, the peer's certificate must chain to one of
//!   the configured roots (webpki, `serverAuth`/`clientAuth` EKU, names ignored).
//!
//! In both modes an optional pin list restricts the peers accepted, and a dialer
//! can demand a specific node ID by encoding it in the TLS server name (SNI)
//! with [`server_name`]: `"<node-id>.id.macula"`, or `"any.macula"` for "any
//! authenticated node". The client verifier parses that name and rejects a peer
//! that proves a different ID with [`TlsError::IdentityMismatch`].
//!
//! Session resumption and 0-RTT are disabled so that every connection runs the
//! full certificate verification below; connection pooling amortises the cost.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use macula_wire::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::Identity;

/// ALPN protocol identifier for macula's wire protocol v1.
pub const ALPN: &[u8] = b"macula/1";

/// Suffix of a server name that carries an expected node ID.
const ID_NAME_SUFFIX: &str = ".id.macula";
/// Server name meaning "any node that authenticates".
const ANY_NAME: &str = "any.macula";

/// DER prefix of an RFC 8410 Ed25519 SubjectPublicKeyInfo:
/// SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) }.
/// The 32-byte key follows. RFC 8410 forbids parameters, so the encoding is
/// unique and an exact comparison is a complete parse.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// How peers' certificates are trusted.
#[derive(Clone, Debug, Default)]
pub enum TlsMode {
    /// The certificate is only a carrier for the peer's Ed25519 key; the
    /// handshake signature proves possession of it, and the node ID is derived
    /// from it.
    #[default]
    SelfCertifying,
    /// As self-certifying, and the peer's certificate must also chain to one of
    /// `roots`. `chain` is this node's own certificate chain, end-entity first;
    /// `chain[0]` must certify this node's Ed25519 key.
    Ca {
        roots: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
    },
}

/// TLS settings for a node.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Trust mode. Default: self-certifying.
    pub mode: TlsMode,
    /// If non-empty, only these node IDs are accepted as peers (both directions).
    pub pinned: Vec<NodeId>,
}

impl TlsOptions {
    /// Reads CA mode settings from PEM files: `ca_cert_file` holds one or more
    /// root certificates, `cert_file` this node's certificate chain (end-entity
    /// first), issued for this node's Ed25519 key (`node.key`).
    pub fn ca_from_files(ca_cert_file: &Path, cert_file: &Path) -> Result<TlsMode, TlsError> {
        let roots = read_pem_certs(ca_cert_file)?;
        let chain = read_pem_certs(cert_file)?;
        Ok(TlsMode::Ca { roots, chain })
    }
}

/// The rustls configurations for both directions of a node's QUIC endpoint.
#[derive(Clone, Debug)]
pub struct TlsConfigs {
    /// Accepting side: requires and verifies a client certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// Dialing side: presents this node's certificate and verifies the server's
    /// against the expected node ID carried in the server name.
    pub client: Arc<rustls::ClientConfig>,
}

/// Why TLS configuration or peer verification failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer proved a different node ID from the one that was dialed.
    #[error(
        "peer identity mismatch: dialed node {expected} but the peer proved it is node {actual}"
    )]
    IdentityMismatch { expected: NodeId, actual: NodeId },
    /// The peer is not in the configured pin list.
    #[error("peer node {actual} is not in the pinned node list")]
    NotPinned { actual: NodeId },
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("malformed certificate: {reason}")]
    BadCertificate { reason: String },
    /// The certificate's key is not an Ed25519 key.
    #[error("certificate key is not Ed25519 (macula node identities are Ed25519 keys)")]
    NotEd25519,
    /// CA mode: the peer's certificate does not chain to a configured root.
    #[error("certificate is not issued by a trusted CA: {reason}")]
    UntrustedChain { reason: String },
    /// The handshake signature is not an Ed25519 TLS 1.3 signature.
    #[error("unsupported handshake signature: {reason}")]
    UnsupportedSignature { reason: String },
    /// The server name does not carry a macula node ID.
    #[error(
        "server name {name:?} does not name a macula node \
         (expected \"<node-id>{ID_NAME_SUFFIX}\" or \"{ANY_NAME}\")"
    )]
    BadServerName { name: String },
    /// A certificate file could not be read or holds no certificate.
    #[error("certificate file {}: {reason}", path.display())]
    CertFile { path: PathBuf, reason: String },
    /// CA mode: this node's own certificate is unusable.
    #[error("invalid CA-mode configuration: {reason}")]
    Config { reason: String },
    /// CA mode: `chain[0]` certifies another key than this node's.
    #[error(
        "this node's certificate is for the key of node {cert_node}, but this node's key \
         (node.key) is node {own_node}; issue the certificate for this node's public key"
    )]
    CertificateKeyMismatch { cert_node: NodeId, own_node: NodeId },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate certificate: {0}")]
    CertGeneration(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// Finds the [`TlsError`] inside a rustls error raised by macula's
    /// verifiers (they wrap it in `rustls::Error::Other`).
    pub fn from_rustls(err: &rustls::Error) -> Option<&TlsError> {
        match err {
            rustls::Error::Other(other) => other.0.downcast_ref::<TlsError>(),
            _ => None,
        }
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::Other(rustls::OtherError(Arc::new(self)))
    }
}

/// The TLS server name to dial with. `Some(id)` makes the handshake fail
/// unless the peer proves exactly that node ID; `None` accepts any node that
/// authenticates (and passes the pin list / CA checks).
pub fn server_name(expected: Option<NodeId>) -> String {
    match expected {
        Some(id) => format!("{id}{ID_NAME_SUFFIX}"),
        None => ANY_NAME.to_string(),
    }
}

/// Parses a server name made by [`server_name`] back into the expected node ID.
/// Any other name is an error: a dial must say what it expects.
pub fn expected_node_id(server_name: &str) -> Result<Option<NodeId>, TlsError> {
    let bad = || TlsError::BadServerName {
        name: server_name.to_string(),
    };
    if server_name.eq_ignore_ascii_case(ANY_NAME) {
        return Ok(None);
    }
    let lower = server_name.to_ascii_lowercase();
    let label = lower.strip_suffix(ID_NAME_SUFFIX).ok_or_else(bad)?;
    NodeId::from_str(label).map(Some).map_err(|_| bad())
}

/// The node ID proven by a peer's end-entity certificate (`certs[0]`), e.g.
/// from `quinn::Connection::peer_identity()`.
///
/// This only derives the ID from the certificate's key; it is meaningful for
/// certificates that came out of a completed handshake with [`build`]'s
/// configurations, whose verifiers checked the proof of possession.
pub fn peer_node_id(certs: &[CertificateDer<'_>]) -> Result<NodeId, TlsError> {
    let end_entity = certs.first().ok_or(TlsError::NoCertificate)?;
    Ok(NodeId::from_public_key(&ed25519_key_of(end_entity)?))
}

/// Builds the server and client configurations for a node.
pub fn build(identity: &Identity, opts: &TlsOptions) -> Result<TlsConfigs, TlsError> {
    // Explicit provider: never depends on a process-wide default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;

    let (chain, anchors) = match &opts.mode {
        TlsMode::SelfCertifying => (vec![self_signed_certificate(identity)?], None),
        TlsMode::Ca { roots, chain } => {
            let anchors = trust_anchors(roots)?;
            check_own_chain(identity, chain, &anchors, &algs)?;
            (chain.clone(), Some(anchors))
        }
    };

    let verifier = Arc::new(PeerVerifier {
        algs,
        anchors,
        pinned: opts.pinned.clone(),
    });

    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.pkcs8_der().to_vec()));

    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone() as Arc<dyn ClientCertVerifier>)
        .with_single_cert(chain.clone(), key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier as Arc<dyn ServerCertVerifier>)
        .with_client_auth_cert(chain, key())?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.enable_early_data = false;
    client.resumption = rustls::client::Resumption::disabled();

    tracing::debug!(
        node_id = %identity.node_id(),
        ca_mode = matches!(opts.mode, TlsMode::Ca { .. }),
        pinned = opts.pinned.len(),
        "built TLS configuration"
    );
    Ok(TlsConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// The MQTT listener's TLS configuration (TLS 1.3, no client
/// certificates): the node's own self-signed certificate, or the PEM
/// certificate chain and private key in `files`.
pub fn mqtt_server(
    identity: &Identity,
    files: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (chain, key) = match files {
        None => (
            vec![self_signed_certificate(identity)?],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.pkcs8_der().to_vec())),
        ),
        Some((cert, key)) => {
            let bad = |path: &std::path::Path, reason: String| TlsError::CertFile {
                path: path.to_path_buf(),
                reason,
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad(cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(bad(cert, "no certificate in the file".into()));
            }
            let k = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
            (chain, k)
        }
    };
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server.alpn_protocols = vec![b"mqtt".to_vec()];
    server.max_early_data_size = 0;
    Ok(Arc::new(server))
}

/// A self-signed certificate for the node key, valid (as far as dates go) for
/// as long as anyone will care: in self-certifying mode only the key matters.
fn self_signed_certificate(identity: &Identity) -> Result<CertificateDer<'static>, TlsError> {
    let der = identity.pkcs8_der();
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_slice()),
        &rcgen::PKCS_ED25519,
    )?;
    let node_id = identity.node_id();
    let mut params = rcgen::CertificateParams::new(vec![server_name(Some(node_id))])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node_id.to_string());
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.self_signed(&key_pair)?;
    Ok(cert.der().clone())
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::CertFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "no `-----BEGIN CERTIFICATE-----` section found".to_string()
        ));
    }
    Ok(certs)
}

fn trust_anchors(roots: &[CertificateDer<'static>]) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::Config {
            reason: "CA mode needs at least one CA certificate".to_string(),
        });
    }
    roots
        .iter()
        .enumerate()
        .map(|(i, der)| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::Config {
                    reason: format!("CA certificate #{} is not usable as a root: {e}", i + 1),
                })
        })
        .collect()
}

/// CA mode: this node's chain must certify this node's key and chain to the
/// roots for both directions (otherwise no peer would accept it).
fn check_own_chain(
    identity: &Identity,
    chain: &[CertificateDer<'static>],
    anchors: &[TrustAnchor<'static>],
    algs: &WebPkiSupportedAlgorithms,
) -> Result<(), TlsError> {
    let end_entity = chain.first().ok_or_else(|| TlsError::Config {
        reason: "this node's certificate chain is empty".to_string(),
    })?;
    let key = ed25519_key_of(end_entity).map_err(|e| TlsError::Config {
        reason: format!("this node's certificate: {e}"),
    })?;
    if key != identity.public_key() {
        return Err(TlsError::CertificateKeyMismatch {
            cert_node: NodeId::from_public_key(&key),
            own_node: identity.node_id(),
        });
    }
    let now = UnixTime::now();
    for (usage, what) in [
        (webpki::KeyUsage::server_auth(), "serverAuth"),
        (webpki::KeyUsage::client_auth(), "clientAuth"),
    ] {
        verify_chain(end_entity, &chain[1..], anchors, algs, now, usage).map_err(|e| {
            TlsError::Config {
                reason: format!("this node's certificate does not verify for {what}: {e}"),
            }
        })?;
    }
    Ok(())
}

fn verify_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[TrustAnchor<'static>],
    algs: &WebPkiSupportedAlgorithms,
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), TlsError> {
    let cert =
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| TlsError::BadCertificate {
            reason: e.to_string(),
        })?;
    cert.verify_for_usage(algs.all, anchors, intermediates, now, usage, None, None)
        .map(|_| ())
        .map_err(|e| TlsError::UntrustedChain {
            reason: e.to_string(),
        })
}

/// The raw Ed25519 public key certified by `cert`. Parses untrusted bytes:
/// webpki does the (non-panicking) X.509 parse, then the SPKI must be exactly
/// an RFC 8410 Ed25519 key.
fn ed25519_key_of(cert: &CertificateDer<'_>) -> Result<[u8; 32], TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| TlsError::BadCertificate {
        reason: e.to_string(),
    })?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    let key = spki
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .ok_or(TlsError::NotEd25519)?;
    <[u8; 32]>::try_from(key).map_err(|_| TlsError::NotEd25519)
}

/// The one verifier used for both directions.
///
/// What a peer proves: in TLS 1.3 the peer signs the handshake transcript with
/// the key in its end-entity certificate (`CertificateVerify`), and rustls
/// always calls [`verify_tls13_signature`](ServerCertVerifier::verify_tls13_signature)
/// on that same certificate after `verify_*_cert` accepted it; the handshake
/// fails if either fails. So a peer that completes the handshake holds the
/// secret key of the public key we derived its node ID from. That proof of
/// possession is what identifies a node; the certificate's self-signature would
/// add nothing (anyone can self-sign a certificate for a key they hold, and a
/// self-signature made by someone else is impossible without the key anyway),
/// so in self-certifying mode we deliberately ignore the certificate's
/// signature, names and dates, and in CA mode the CA's signature is checked by
/// webpki.
#[derive(Debug)]
struct PeerVerifier {
    algs: WebPkiSupportedAlgorithms,
    /// `Some` in CA mode.
    anchors: Option<Vec<TrustAnchor<'static>>>,
    pinned: Vec<NodeId>,
}

impl PeerVerifier {
    /// Checks the peer's end-entity certificate and returns the node ID it
    /// carries. The proof of possession is checked by `verify_signature`.
    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        expected: Option<NodeId>,
    ) -> Result<NodeId, TlsError> {
        let actual = NodeId::from_public_key(&ed25519_key_of(end_entity)?);
        if let Some(anchors) = &self.anchors {
            verify_chain(end_entity, intermediates, anchors, &self.algs, now, usage)?;
        }
        if let Some(expected) = expected {
            if expected != actual {
                return Err(TlsError::IdentityMismatch { expected, actual });
            }
        }
        if !self.pinned.is_empty() && !self.pinned.contains(&actual) {
            return Err(TlsError::NotPinned { actual });
        }
        Ok(actual)
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(TlsError::UnsupportedSignature {
                reason: format!("{:?}; only ED25519 is accepted", dss.scheme),
            }
            .into_rustls());
        }
        // Cheap re-check that the signing key is the Ed25519 key we derived
        // the node ID from (rustls passes the same end-entity certificate).
        ed25519_key_of(cert).map_err(TlsError::into_rustls)?;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn tls12_rejected() -> rustls::Error {
        TlsError::UnsupportedSignature {
            reason: "TLS 1.2 signatures are not accepted; macula requires TLS 1.3".to_string(),
        }
        .into_rustls()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = match server_name {
            ServerName::DnsName(name) => name.as_ref().to_string(),
            other => {
                return Err(TlsError::BadServerName {
                    name: format!("{other:?}"),
                }
                .into_rustls())
            }
        };
        let result = expected_node_id(&name).and_then(|expected| {
            self.verify_peer(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
                expected,
            )
        });
        match result {
            Ok(node_id) => {
                tracing::debug!(peer = %node_id, server_name = %name, "server certificate accepted");
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => {
                tracing::debug!(error = %e, server_name = %name, "server certificate rejected");
                Err(e.into_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(Self::tls12_rejected())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.verify_peer(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
        ) {
            Ok(node_id) => {
                tracing::debug!(peer = %node_id, "client certificate accepted");
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => {
                tracing::debug!(error = %e, "client certificate rejected");
                Err(e.into_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(Self::tls12_rejected())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn server_name_round_trips() {
        let id = Identity::generate().node_id();
        let name = server_name(Some(id));
        assert_eq!(name, format!("{id}.id.macula"));
        assert!(ServerName::try_from(name.clone()).is_ok());
        assert_eq!(expected_node_id(&name).unwrap(), Some(id));
        assert_eq!(expected_node_id(&name.to_uppercase()).unwrap(), Some(id));
        assert_eq!(server_name(None), "any.macula");
        assert_eq!(expected_node_id("any.macula").unwrap(), None);
        for bad in [
            "localhost",
            "example.com",
            ".id.macula",
            "abc.id.macula",
            "x.any.macula",
            "",
        ] {
            assert!(
                matches!(expected_node_id(bad), Err(TlsError::BadServerName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn self_signed_cert_carries_node_key() {
        let id = Identity::generate();
        let cert = self_signed_certificate(&id).unwrap();
        assert_eq!(ed25519_key_of(&cert).unwrap(), id.public_key());
        assert_eq!(peer_node_id(&[cert]).unwrap(), id.node_id());
        assert!(matches!(peer_node_id(&[]), Err(TlsError::NoCertificate)));
    }

    #[test]
    fn non_ed25519_cert_is_rejected() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["p256.macula".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert!(matches!(
            peer_node_id(&[cert.der().clone()]),
            Err(TlsError::NotEd25519)
        ));
    }

    #[test]
    fn build_self_certifying_is_tls13_with_alpn() {
        let id = Identity::generate();
        let cfg = build(&id, &TlsOptions::default()).unwrap();
        assert_eq!(cfg.server.alpn_protocols, vec![ALPN.to_vec()]);
        assert_eq!(cfg.client.alpn_protocols, vec![ALPN.to_vec()]);
    }

    #[test]
    fn ca_mode_rejects_chain_for_another_key() {
        let id = Identity::generate();
        let other = Identity::generate();
        let other_cert = self_signed_certificate(&other).unwrap();
        let mode = TlsMode::Ca {
            roots: vec![other_cert.clone()],
            chain: vec![other_cert],
        };
        let err = build(
            &id,
            &TlsOptions {
                mode,
                pinned: vec![],
            },
        )
        .unwrap_err();
        match &err {
            TlsError::CertificateKeyMismatch {
                cert_node,
                own_node,
            } => {
                assert_eq!(*cert_node, other.node_id());
                assert_eq!(*own_node, id.node_id());
            }
            other => panic!("unexpected error: {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&other.node_id().to_string()), "{msg}");
        assert!(msg.contains(&id.node_id().to_string()), "{msg}");
    }

    #[test]
    fn ca_mode_rejects_empty_roots_and_chain() {
        let id = Identity::generate();
        let cert = self_signed_certificate(&id).unwrap();
        let no_roots = TlsOptions {
            mode: TlsMode::Ca {
                roots: vec![],
                chain: vec![cert.clone()],
            },
            pinned: vec![],
        };
        assert!(matches!(
            build(&id, &no_roots),
            Err(TlsError::Config { .. })
        ));
        let no_chain = TlsOptions {
            mode: TlsMode::Ca {
                roots: vec![cert],
                chain: vec![],
            },
            pinned: vec![],
        };
        assert!(matches!(
            build(&id, &no_chain),
            Err(TlsError::Config { .. })
        ));
    }

    #[test]
    fn ca_from_files_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.pem");
        let empty = tmp.path().join("empty.pem");
        std::fs::write(&empty, b"").unwrap();
        for (ca, cert) in [(&missing, &empty), (&empty, &missing)] {
            let err = TlsOptions::ca_from_files(ca, cert).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, TlsError::CertFile { .. }), "{msg}");
            assert!(
                msg.contains(&ca.display().to_string())
                    || msg.contains(&cert.display().to_string()),
                "{msg}"
            );
        }
    }

    #[test]
    fn verifier_rejects_mismatch_and_unpinned() {
        let me = Identity::generate();
        let peer = Identity::generate();
        let stranger = Identity::generate();
        let cert = self_signed_certificate(&peer).unwrap();
        let v = PeerVerifier {
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            anchors: None,
            pinned: vec![],
        };
        let now = UnixTime::now();
        let sn = |id: Option<NodeId>| ServerName::try_from(server_name(id)).unwrap();
        assert!(v
            .verify_server_cert(&cert, &[], &sn(Some(peer.node_id())), &[], now)
            .is_ok());
        assert!(v
            .verify_server_cert(&cert, &[], &sn(None), &[], now)
            .is_ok());
        let err = v
            .verify_server_cert(&cert, &[], &sn(Some(stranger.node_id())), &[], now)
            .unwrap_err();
        assert!(matches!(
            TlsError::from_rustls(&err),
            Some(TlsError::IdentityMismatch { expected, actual })
                if *expected == stranger.node_id() && *actual == peer.node_id()
        ));
        let ip = ServerName::try_from("127.0.0.1").unwrap();
        assert!(v.verify_server_cert(&cert, &[], &ip, &[], now).is_err());
        let dns = ServerName::try_from("localhost").unwrap();
        assert!(v.verify_server_cert(&cert, &[], &dns, &[], now).is_err());

        let pinned = PeerVerifier {
            pinned: vec![me.node_id()],
            ..v
        };
        let err = pinned.verify_client_cert(&cert, &[], now).unwrap_err();
        assert!(matches!(
            TlsError::from_rustls(&err),
            Some(TlsError::NotPinned { actual }) if *actual == peer.node_id()
        ));
        let err = pinned
            .verify_server_cert(&cert, &[], &sn(None), &[], now)
            .unwrap_err();
        assert!(matches!(
            TlsError::from_rustls(&err),
            Some(TlsError::NotPinned { .. })
        ));
    }

    #[test]
    fn tls12_signatures_are_rejected() {
        let v = PeerVerifier {
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            anchors: None,
            pinned: vec![],
        };
        assert_eq!(
            ServerCertVerifier::supported_verify_schemes(&v),
            vec![SignatureScheme::ED25519]
        );
        assert!(ClientCertVerifier::client_auth_mandatory(&v));
        // A DigitallySignedStruct cannot be built outside rustls, so the TLS 1.2
        // path is checked through the error it returns for any input.
        assert!(matches!(
            TlsError::from_rustls(&PeerVerifier::tls12_rejected()),
            Some(TlsError::UnsupportedSignature { .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let cert = CertificateDer::from(bytes);
            let _ = peer_node_id(std::slice::from_ref(&cert));
        }

        #[test]
        fn mutated_certificates_never_panic(
            seed in any::<[u8; 32]>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let id = Identity::from_secret_bytes(&seed);
            let mut der = self_signed_certificate(&id).unwrap().to_vec();
            for (pos, byte) in edits {
                let len = der.len();
                der[pos % len] = byte;
            }
            let len = der.len();
            der.truncate(cut % (len + 1));
            let cert = CertificateDer::from(der);
            if let Ok(node) = peer_node_id(std::slice::from_ref(&cert)) {
                // Whatever parses must be derived from the key actually in it.
                let key = ed25519_key_of(&cert).unwrap();
                prop_assert_eq!(node, NodeId::from_public_key(&key));
            }
        }
    }
}
