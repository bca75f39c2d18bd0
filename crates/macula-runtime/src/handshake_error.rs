//! Why a handshake failed: what `peer.rs` and the admission checks
//! (`apikey_gate.rs`) return, with what the peer is told and the metric
//! reason. A leaf: it imports only the metrics' reason names.

use macula_wire::{DisconnectReason, ErrorCode, NodeId, PROTOCOL_VERSION};

use crate::metrics::HandshakeFailure;

/// Why the HELLO exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("realm mismatch: we are in {ours:?}, the peer is in {theirs:?}")]
    RealmMismatch { ours: String, theirs: String },
    #[error("unsupported protocol version {theirs} (we speak {PROTOCOL_VERSION})")]
    UnsupportedVersion { theirs: u8 },
    #[error("peer's HELLO names node {claimed} but its certificate proves {proved}")]
    IdentityMismatch { claimed: NodeId, proved: NodeId },
    /// The realm has an authority and the peer's grant is missing or not
    /// valid; `kind` names why (`missing`, `expired`, `wrong_subject`...).
    #[error("no valid grant for this realm ({kind}): {message}")]
    Unauthorized { kind: &'static str, message: String },
    /// Too many failed API-key attempts from the peer's address (or in the
    /// realm) lately: refused before its key was looked at (`apikey.rs`).
    #[error("API-key attempt refused: {message}")]
    RateLimited { message: String },
    /// The peer sent another message (type byte `msg_type`) before HELLO.
    #[error("peer sent message type {msg_type:#04x} before HELLO")]
    HandshakeRequired { msg_type: u8 },
    #[error("peer refused the connection ({code:?}): {message}")]
    Rejected { code: ErrorCode, message: String },
    /// The peer answered our HELLO with DISCONNECT (at its connection
    /// limit, for one).
    #[error("peer turned the connection away ({reason:?}): {message}")]
    TurnedAway {
        reason: DisconnectReason,
        message: String,
    },
    /// We turned the peer away after its HELLO (see `Admission`).
    #[error("turned the peer away ({reason:?}): {message}")]
    Refused {
        reason: DisconnectReason,
        message: String,
    },
    #[error("protocol error during handshake: {0}")]
    Protocol(String),
    #[error("connection lost during handshake: {0}")]
    Connection(String),
    #[error("peer did not complete the handshake in time")]
    Timeout,
}

impl HandshakeError {
    /// The metric label for this failure.
    pub fn failure(&self) -> HandshakeFailure {
        match self {
            HandshakeError::RealmMismatch { .. } => HandshakeFailure::RealmMismatch,
            HandshakeError::UnsupportedVersion { .. } => HandshakeFailure::UnsupportedVersion,
            HandshakeError::IdentityMismatch { .. } => HandshakeFailure::IdentityMismatch,
            HandshakeError::Unauthorized { .. } => HandshakeFailure::Unauthorized,
            HandshakeError::RateLimited { .. } => HandshakeFailure::RateLimited,
            HandshakeError::Rejected { code, .. } => match code {
                ErrorCode::Unauthorized => HandshakeFailure::Unauthorized,
                ErrorCode::RateLimited => HandshakeFailure::RateLimited,
                ErrorCode::RealmMismatch => HandshakeFailure::RealmMismatch,
                ErrorCode::UnsupportedVersion => HandshakeFailure::UnsupportedVersion,
                ErrorCode::IdentityMismatch => HandshakeFailure::IdentityMismatch,
                _ => HandshakeFailure::Protocol,
            },
            HandshakeError::TurnedAway {
                reason: DisconnectReason::ConnectionLimit,
                ..
            } => HandshakeFailure::ConnectionLimit,
            HandshakeError::Protocol(_)
            | HandshakeError::HandshakeRequired { .. }
            | HandshakeError::TurnedAway { .. }
            | HandshakeError::Refused { .. }
            | HandshakeError::Connection(_) => HandshakeFailure::Protocol,
            HandshakeError::Timeout => HandshakeFailure::Timeout,
        }
    }

    /// The explanation as the peer should read it: our `Display` speaks
    /// from this node's side ("we are in ..."), which read by the peer would
    /// swap the two sides.
    pub(crate) fn to_peer(&self) -> String {
        match self {
            HandshakeError::RealmMismatch { ours, theirs } => {
                format!("realm mismatch: you are in {theirs:?}, this node is in {ours:?}")
            }
            HandshakeError::UnsupportedVersion { theirs } => format!(
                "unsupported protocol version {theirs}: this node speaks {PROTOCOL_VERSION}"
            ),
            HandshakeError::IdentityMismatch { claimed, proved } => {
                format!("your HELLO names node {claimed} but your certificate proves {proved}")
            }
            HandshakeError::Unauthorized { kind, message } => {
                format!("this realm needs a valid grant for your node ID ({kind}): {message}")
            }
            other => other.to_string(),
        }
    }

    /// What to tell the peer before closing, if anything.
    pub(crate) fn reply(&self) -> Option<(ErrorCode, DisconnectReason)> {
        match self {
            HandshakeError::RealmMismatch { .. } => {
                Some((ErrorCode::RealmMismatch, DisconnectReason::RealmMismatch))
            }
            HandshakeError::UnsupportedVersion { .. } => Some((
                ErrorCode::UnsupportedVersion,
                DisconnectReason::UnsupportedVersion,
            )),
            HandshakeError::IdentityMismatch { .. } => Some((
                ErrorCode::IdentityMismatch,
                DisconnectReason::IdentityMismatch,
            )),
            HandshakeError::Unauthorized { .. } => {
                Some((ErrorCode::Unauthorized, DisconnectReason::Unauthorized))
            }
            HandshakeError::RateLimited { .. } => {
                Some((ErrorCode::RateLimited, DisconnectReason::RateLimited))
            }
            HandshakeError::Protocol(_) => {
                Some((ErrorCode::Malformed, DisconnectReason::ProtocolError))
            }
            HandshakeError::HandshakeRequired { .. } => Some((
                ErrorCode::HandshakeRequired,
                DisconnectReason::ProtocolError,
            )),
            HandshakeError::Rejected { .. }
            | HandshakeError::TurnedAway { .. }
            | HandshakeError::Refused { .. }
            | HandshakeError::Connection(_)
            | HandshakeError::Timeout => None,
        }
    }
}
