//! Message types of protocol version 1 and their MessagePack bodies.
//!
//! Each message is one frame: the header's type byte says which message the
//! body holds, the body is one MessagePack *map* keyed by field name. Maps
//! rather than positional arrays because they are self-describing for
//! third-party clients and let later versions add optional fields without
//! breaking older receivers (unknown keys are ignored). This module validates
//! every limit after decoding, so a decoded message is always within bounds.
//! It must not know about streams, connections or time.

use serde::{Deserialize, Serialize};

use crate::client::ClientMessage;
use crate::dht::*;
use crate::frame::{FrameHeader, FRAME_HEADER_LEN};
use crate::limits::*;
use crate::nat::{DialBack, DialBackResult, HolePunch, HolePunchSync};
use crate::node_id::NodeId;
use crate::pubsub::{Publish, PublishBatch, PublishBatchView, PublishDropped};
use crate::raft::*;
use crate::relay::*;
use crate::rpc::*;
use crate::status::{StatusMessage, StatusReport, StatusRequest};

/// Nesting depth allowed in a body. Our deepest message is 3 levels; a small
/// limit keeps skipping of unknown nested fields cheap and stack-safe.
const MAX_BODY_DEPTH: usize = 16;

/// Message type codes (the header's type byte). Ranges are reserved per
/// subsystem so that implementations can route on the high bits:
/// `0x01..=0x0f` connection control, `0x10..=0x2f` DHT, `0x30..=0x4f` pub/sub,
/// `0x50..=0x6f` RPC, `0x70..=0x7f` relay and NAT traversal, `0x80..=0x8f`
/// client attachment, `0x90..` Raft, `0xa0..` the realm, `0xb0..=0xb7` node
/// status (observability). `0x00` is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Hello = 0x01,
    Ping = 0x02,
    Pong = 0x03,
    Disconnect = 0x04,
    Error = 0x05,
    DhtPing = 0x10,
    DhtFindNode = 0x11,
    DhtFindValue = 0x12,
    DhtStore = 0x13,
    DhtPong = 0x18,
    DhtNodes = 0x19,
    DhtValue = 0x1a,
    DhtStored = 0x1b,
    DhtStoreRejected = 0x1c,
    Publish = 0x30,
    PublishBatch = 0x31,
    PublishDropped = 0x32,
    RpcCall = 0x50,
    RpcReply = 0x51,
    RpcError = 0x52,
    RpcCancel = 0x53,
    DialBack = 0x70,
    DialBackResult = 0x71,
    HolePunch = 0x77,
    HolePunchSync = 0x78,
    ClientSubscribe = 0x80,
    ClientUnsubscribe = 0x81,
    ClientAdvertise = 0x82,
    ClientUnadvertise = 0x83,
    ClientAck = 0x84,
    RelayReserve = 0x72,
    RelayReserved = 0x73,
    RelayConnect = 0x74,
    RelayIncoming = 0x75,
    RelayStatus = 0x76,
    RaftRequest = 0x90,
    RaftResponse = 0x91,
    Revocations = 0xa0,
    RealmKeys = 0xa1,
    StatusRequest = 0xb0,
    StatusReport = 0xb1,
}

impl MessageType {
    /// Every type this version defines.
    pub const ALL: [MessageType; 41] = [
        MessageType::Hello,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Disconnect,
        MessageType::Error,
        MessageType::DhtPing,
        MessageType::DhtFindNode,
        MessageType::DhtFindValue,
        MessageType::DhtStore,
        MessageType::DhtPong,
        MessageType::DhtNodes,
        MessageType::DhtValue,
        MessageType::DhtStored,
        MessageType::DhtStoreRejected,
        MessageType::Publish,
        MessageType::PublishBatch,
        MessageType::PublishDropped,
        MessageType::RpcCall,
        MessageType::RpcReply,
        MessageType::RpcError,
        MessageType::RpcCancel,
        MessageType::DialBack,
        MessageType::DialBackResult,
        MessageType::HolePunch,
        MessageType::HolePunchSync,
        MessageType::ClientSubscribe,
        MessageType::ClientUnsubscribe,
        MessageType::ClientAdvertise,
        MessageType::ClientUnadvertise,
        MessageType::ClientAck,
        MessageType::RelayReserve,
        MessageType::RelayReserved,
        MessageType::RelayConnect,
        MessageType::RelayIncoming,
        MessageType::RelayStatus,
        MessageType::RaftRequest,
        MessageType::RaftResponse,
        MessageType::Revocations,
        MessageType::RealmKeys,
        MessageType::StatusRequest,
        MessageType::StatusReport,
    ];

    /// Maps a type byte to a known type.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u8 == b)
    }

    /// Lower-case name used in logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "hello",
            MessageType::Ping => "ping",
            MessageType::Pong => "pong",
            MessageType::Disconnect => "disconnect",
            MessageType::Error => "error",
            MessageType::DhtPing => "dht_ping",
            MessageType::DhtFindNode => "dht_find_node",
            MessageType::DhtFindValue => "dht_find_value",
            MessageType::DhtStore => "dht_store",
            MessageType::DhtPong => "dht_pong",
            MessageType::DhtNodes => "dht_nodes",
            MessageType::DhtValue => "dht_value",
            MessageType::DhtStored => "dht_stored",
            MessageType::DhtStoreRejected => "dht_store_rejected",
            MessageType::Publish => "publish",
            MessageType::PublishBatch => "publish_batch",
            MessageType::PublishDropped => "publish_dropped",
            MessageType::RpcCall => "rpc_call",
            MessageType::RpcReply => "rpc_reply",
            MessageType::RpcError => "rpc_error",
            MessageType::RpcCancel => "rpc_cancel",
            MessageType::DialBack => "dial_back",
            MessageType::DialBackResult => "dial_back_result",
            MessageType::HolePunch => "hole_punch",
            MessageType::HolePunchSync => "hole_punch_sync",
            MessageType::ClientSubscribe => "client_subscribe",
            MessageType::ClientUnsubscribe => "client_unsubscribe",
            MessageType::ClientAdvertise => "client_advertise",
            MessageType::ClientUnadvertise => "client_unadvertise",
            MessageType::ClientAck => "client_ack",
            MessageType::RelayReserve => "relay_reserve",
            MessageType::RelayReserved => "relay_reserved",
            MessageType::RelayConnect => "relay_connect",
            MessageType::RelayIncoming => "relay_incoming",
            MessageType::RelayStatus => "relay_status",
            MessageType::RaftRequest => "raft_request",
            MessageType::RaftResponse => "raft_response",
            MessageType::Revocations => "revocations",
            MessageType::RealmKeys => "realm_keys",
            MessageType::StatusRequest => "status_request",
            MessageType::StatusReport => "status_report",
        }
    }
}

/// First message on a connection, sent by both sides on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the sender speaks.
    pub version: u8,
    /// The sender's node ID; must equal the ID it proved in the TLS handshake.
    pub node_id: NodeId,
    /// Realm the sender belongs to; both sides must agree.
    pub realm: String,
    /// Optional features the sender supports (e.g. `"dht"`, `"relay"`).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub capabilities: Vec<String>,
    /// Addresses (`host:port`) the sender accepts connections on.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub listen_addrs: Vec<String>,
    /// Largest frame body the sender accepts; peers must not send more.
    pub max_frame_size: u32,
    /// Free-form implementation name and version, for diagnostics.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub agent: String,
    /// The sender's grant from the realm authority (a `macula_auth::Grant`,
    /// MessagePack), when it has one: a node whose realm has an authority
    /// admits only peers whose grant is for the node ID they proved.
    /// Absent (not nil) when none.
    #[serde(
        default,
        deserialize_with = "crate::nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub grant: Option<serde_bytes::ByteBuf>,
    /// A lightweight client's API key (the key's bytes, at most
    /// `MAX_API_KEY_LEN`), presented instead of a grant to a gateway that
    /// keeps API keys: the gateway admits the client with the grant the
    /// key is bound to. Absent (not nil) when none.
    #[serde(
        default,
        deserialize_with = "crate::nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_key: Option<serde_bytes::ByteBuf>,
    /// The address (`ip:port`) the sender sees the receiver at: the source
    /// address of the receiver's packets on this connection, after any NAT
    /// on the way. The receiver learns its reflexive (public) addresses
    /// from several peers this way, without STUN servers. Absent when the
    /// sender cannot tell (a relayed connection). At most `MAX_ADDR_LEN`.
    #[serde(
        default,
        deserialize_with = "crate::nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub observed_addr: Option<String>,
}

/// Liveness and round-trip probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Matches the `Pong` to this `Ping`.
    pub nonce: u64,
    /// Sender's clock in microseconds (any epoch); echoed back unchanged.
    pub sent_at_us: u64,
    /// The sender wants this connection kept open: the receiver counts the
    /// ping as activity and does not close the connection as idle.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub keep: bool,
}

/// Answer to `Ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
    /// The ping's `sent_at_us`, unchanged, so the pinger computes RTT locally.
    pub echo_sent_at_us: u64,
    /// Responder's wall clock (Unix epoch, milliseconds), for clock-skew hints.
    pub responder_unix_ms: u64,
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum DisconnectReason {
    /// Orderly shutdown of the sender.
    Shutdown,
    /// No traffic for the idle timeout.
    Idle,
    /// Both nodes dialled each other; this one loses the tie-break.
    Duplicate,
    /// Evicted from the connection pool to make room.
    Evicted,
    /// The peer broke the protocol.
    ProtocolError,
    /// The nodes are in different realms.
    RealmMismatch,
    /// No common protocol version.
    UnsupportedVersion,
    /// The sender is at its connection limit.
    ConnectionLimit,
    /// The peer's HELLO named a different node than its certificate.
    IdentityMismatch,
    /// A reachability dial-back: the dialer only wanted the TLS handshake.
    DialBack,
    /// The sender heard nothing from the peer for its failure detector's
    /// bound and declared it down (a crash, or a network that drops
    /// everything; the close usually reaches no one).
    Unresponsive,
    /// The realm has an authority and the peer's grant is missing or not
    /// valid (the message says why).
    Unauthorized,
    /// Too many failed API-key attempts from the peer's address (or in the
    /// realm) lately; the message says when to retry.
    RateLimited,
    /// A code this version does not know.
    Other(u16),
}

impl From<u16> for DisconnectReason {
    fn from(v: u16) -> Self {
        use DisconnectReason::*;
        match v {
            0 => Shutdown,
            1 => Idle,
            2 => Duplicate,
            3 => Evicted,
            4 => ProtocolError,
            5 => RealmMismatch,
            6 => UnsupportedVersion,
            7 => ConnectionLimit,
            8 => IdentityMismatch,
            9 => DialBack,
            10 => Unresponsive,
            11 => Unauthorized,
            12 => RateLimited,
            other => Other(other),
        }
    }
}

impl From<DisconnectReason> for u16 {
    fn from(r: DisconnectReason) -> u16 {
        use DisconnectReason::*;
        match r {
            Shutdown => 0,
            Idle => 1,
            Duplicate => 2,
            Evicted => 3,
            ProtocolError => 4,
            RealmMismatch => 5,
            UnsupportedVersion => 6,
            ConnectionLimit => 7,
            IdentityMismatch => 8,
            DialBack => 9,
            Unresponsive => 10,
            Unauthorized => 11,
            RateLimited => 12,
            Other(v) => v,
        }
    }
}

/// Sent before closing a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnect {
    pub reason: DisconnectReason,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub message: String,
}

/// Error codes carried by `ERROR` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// The frame's type byte is not known to the receiver; connection stays up.
    UnknownMessageType,
    /// The body could not be decoded or broke a limit.
    Malformed,
    /// The frame exceeded the receiver's maximum frame size.
    FrameTooLarge,
    /// The frame or HELLO used a protocol version the receiver does not speak.
    UnsupportedVersion,
    /// The peer's realm differs from ours.
    RealmMismatch,
    /// A message other than HELLO arrived before the handshake completed.
    HandshakeRequired,
    /// A known message arrived where it makes no sense (e.g. a second HELLO).
    UnexpectedMessage,
    /// HELLO's node ID differs from the identity proved in TLS.
    IdentityMismatch,
    /// The realm has an authority and HELLO carried no valid grant for the
    /// sender.
    Unauthorized,
    /// Too many failed API-key attempts from the sender's address (or in
    /// the realm) lately: refused without looking at the key.
    RateLimited,
    /// A code this version does not know.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        use ErrorCode::*;
        match v {
            1 => UnknownMessageType,
            2 => Malformed,
            3 => FrameTooLarge,
            4 => UnsupportedVersion,
            5 => RealmMismatch,
            6 => HandshakeRequired,
            7 => UnexpectedMessage,
            8 => IdentityMismatch,
            9 => Unauthorized,
            10 => RateLimited,
            other => Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        use ErrorCode::*;
        match c {
            UnknownMessageType => 1,
            Malformed => 2,
            FrameTooLarge => 3,
            UnsupportedVersion => 4,
            RealmMismatch => 5,
            HandshakeRequired => 6,
            UnexpectedMessage => 7,
            IdentityMismatch => 8,
            Unauthorized => 9,
            RateLimited => 10,
            Other(v) => v,
        }
    }
}

impl ErrorCode {
    /// Label for metrics and logs.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            UnknownMessageType => "unknown_message_type",
            Malformed => "malformed",
            FrameTooLarge => "frame_too_large",
            UnsupportedVersion => "unsupported_version",
            RealmMismatch => "realm_mismatch",
            HandshakeRequired => "handshake_required",
            UnexpectedMessage => "unexpected_message",
            IdentityMismatch => "identity_mismatch",
            Unauthorized => "unauthorized",
            RateLimited => "rate_limited",
            Other(_) => "other",
        }
    }
}

/// Reports a problem with something the peer sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// Human-readable explanation.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub message: String,
    /// Type byte of the offending frame, 0 if none.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub msg_type: u8,
}

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Ping(Ping),
    Pong(Pong),
    Disconnect(Disconnect),
    Error(ErrorFrame),
    Dht(DhtMessage),
    Publish(Publish),
    PublishBatch(PublishBatch),
    PublishDropped(PublishDropped),
    Rpc(RpcMessage),
    DialBack(DialBack),
    DialBackResult(DialBackResult),
    HolePunch(HolePunch),
    HolePunchSync(HolePunchSync),
    Client(ClientMessage),
    Relay(RelayMessage),
    Raft(RaftMessage),
    Revocations(Revocations),
    RealmKeys(RealmKeys),
    Status(StatusMessage),
}

/// A realm's signed revocation list (issue 18), spread through the mesh:
/// a node that adopts a newer list passes it on to its other peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// `macula_auth::RevocationList` bytes, at most `MAX_REVOCATIONS_LEN`.
    #[serde(with = "serde_bytes")]
    pub list: Vec<u8>,
}

/// A realm's signed key set for end-to-end payload encryption (issue 19),
/// spread like [`Revocations`]: a node that adopts a newer set passes it
/// on to its other peers, and a gateway to its clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealmKeys {
    /// `macula_auth::keys::KeySet` bytes, at most `MAX_REVOCATIONS_LEN`.
    #[serde(with = "serde_bytes")]
    pub set: Vec<u8>,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{msg_type:?} body of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge {
        msg_type: MessageType,
        len: usize,
        max: u32,
    },
    #[error("{msg_type:?} breaks a protocol limit: {reason}")]
    Invalid {
        msg_type: MessageType,
        reason: String,
    },
    #[error("serialisation failed: {0}")]
    Serialize(String),
}

/// Why a frame body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The type byte is not defined by this version. Not fatal: answer with
    /// an `ERROR(UnknownMessageType)` and keep the connection.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// The body is not a valid message of its type. Fatal for the stream.
    #[error("malformed {msg_type:?} body: {reason}")]
    Malformed {
        msg_type: MessageType,
        reason: String,
    },
}

fn check_len(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} is {} bytes, limit {max}", s.len()));
    }
    Ok(())
}

fn check_list(what: &str, items: &[String], max_n: usize, max_len: usize) -> Result<(), String> {
    if items.len() > max_n {
        return Err(format!("{} {what}s, limit {max_n}", items.len()));
    }
    items.iter().try_for_each(|s| check_len(what, s, max_len))
}

impl Message {
    /// The message's type code.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::Ping(_) => MessageType::Ping,
            Message::Pong(_) => MessageType::Pong,
            Message::Disconnect(_) => MessageType::Disconnect,
            Message::Error(_) => MessageType::Error,
            Message::Publish(_) => MessageType::Publish,
            Message::PublishBatch(_) => MessageType::PublishBatch,
            Message::PublishDropped(_) => MessageType::PublishDropped,
            Message::DialBack(_) => MessageType::DialBack,
            Message::DialBackResult(_) => MessageType::DialBackResult,
            Message::HolePunch(_) => MessageType::HolePunch,
            Message::HolePunchSync(_) => MessageType::HolePunchSync,
            Message::Client(c) => match c {
                ClientMessage::Subscribe(_) => MessageType::ClientSubscribe,
                ClientMessage::Unsubscribe(_) => MessageType::ClientUnsubscribe,
                ClientMessage::Advertise(_) => MessageType::ClientAdvertise,
                ClientMessage::Unadvertise(_) => MessageType::ClientUnadvertise,
                ClientMessage::Ack(_) => MessageType::ClientAck,
            },
            Message::Relay(r) => match r {
                RelayMessage::Reserve(_) => MessageType::RelayReserve,
                RelayMessage::Reserved(_) => MessageType::RelayReserved,
                RelayMessage::Connect(_) => MessageType::RelayConnect,
                RelayMessage::Incoming(_) => MessageType::RelayIncoming,
                RelayMessage::Status(_) => MessageType::RelayStatus,
            },
            Message::Revocations(_) => MessageType::Revocations,
            Message::RealmKeys(_) => MessageType::RealmKeys,
            Message::Status(StatusMessage::Request(_)) => MessageType::StatusRequest,
            Message::Status(StatusMessage::Report(_)) => MessageType::StatusReport,
            Message::Raft(r) => match r {
                RaftMessage::Request(_) => MessageType::RaftRequest,
                RaftMessage::Response(_) => MessageType::RaftResponse,
            },
            Message::Rpc(r) => match r {
                RpcMessage::Call(_) => MessageType::RpcCall,
                RpcMessage::Reply(_) => MessageType::RpcReply,
                RpcMessage::Error(_) => MessageType::RpcError,
                RpcMessage::Cancel(_) => MessageType::RpcCancel,
            },
            Message::Dht(d) => match d {
                DhtMessage::Ping(_) => MessageType::DhtPing,
                DhtMessage::FindNode(_) => MessageType::DhtFindNode,
                DhtMessage::FindValue(_) => MessageType::DhtFindValue,
                DhtMessage::Store(_) => MessageType::DhtStore,
                DhtMessage::Pong(_) => MessageType::DhtPong,
                DhtMessage::Nodes(_) => MessageType::DhtNodes,
                DhtMessage::Value(_) => MessageType::DhtValue,
                DhtMessage::Stored(_) => MessageType::DhtStored,
                DhtMessage::StoreRejected(_) => MessageType::DhtStoreRejected,
            },
        }
    }

    /// Checks every protocol limit. Run after decoding and before encoding.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Message::Hello(h) => {
                check_len("realm", &h.realm, MAX_REALM_LEN)?;
                check_list(
                    "capability",
                    &h.capabilities,
                    MAX_CAPABILITIES,
                    MAX_CAPABILITY_LEN,
                )?;
                check_list(
                    "listen address",
                    &h.listen_addrs,
                    MAX_LISTEN_ADDRS,
                    MAX_ADDR_LEN,
                )?;
                check_len("agent", &h.agent, MAX_AGENT_LEN)?;
                if let Some(a) = &h.observed_addr {
                    check_len("observed address", a, MAX_ADDR_LEN)?;
                }
                if let Some(k) = &h.api_key {
                    if k.len() > MAX_API_KEY_LEN {
                        return Err(format!(
                            "api_key of {} bytes, over the limit of {MAX_API_KEY_LEN}",
                            k.len()
                        ));
                    }
                }
                if let Some(g) = &h.grant {
                    if g.len() > MAX_GRANT_LEN {
                        return Err(format!(
                            "grant of {} bytes, over the limit of {MAX_GRANT_LEN}",
                            g.len()
                        ));
                    }
                }
                if h.max_frame_size < MIN_MAX_FRAME_SIZE {
                    return Err(format!(
                        "max_frame_size {} is below the minimum {MIN_MAX_FRAME_SIZE}",
                        h.max_frame_size
                    ));
                }
                Ok(())
            }
            Message::Disconnect(d) => check_len("message", &d.message, MAX_REASON_LEN),
            Message::Error(e) => check_len("message", &e.message, MAX_REASON_LEN),
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Dht(d) => d.validate(),
            Message::Publish(p) => p.validate(),
            Message::PublishBatch(b) => b.validate(),
            Message::PublishDropped(d) => d.validate(),
            Message::Rpc(r) => r.validate(),
            Message::DialBack(d) => d.validate(),
            Message::DialBackResult(d) => d.validate(),
            Message::HolePunch(h) => h.validate(),
            Message::HolePunchSync(_) => Ok(()),
            Message::Client(c) => c.validate(),
            Message::Relay(r) => r.validate(),
            Message::Raft(r) => r.validate(),
            Message::Revocations(r) => match r.list.len() {
                0 => Err("empty revocation list".into()),
                n if n > MAX_REVOCATIONS_LEN => Err(format!(
                    "revocation list of {n} bytes, over the limit of {MAX_REVOCATIONS_LEN}"
                )),
                _ => Ok(()),
            },
            Message::RealmKeys(r) => match r.set.len() {
                0 => Err("empty key set".into()),
                n if n > MAX_REVOCATIONS_LEN => Err(format!(
                    "key set of {n} bytes, over the limit of {MAX_REVOCATIONS_LEN}"
                )),
                _ => Ok(()),
            },
            Message::Status(s) => s.validate(),
        }
    }

    /// Appends one whole frame (header and body) to `out`.
    ///
    /// Fails, leaving `out` as it was, if the message breaks a limit or its
    /// body would exceed `max_len` (the peer's announced maximum) — we never
    /// send a frame the receiver is bound to reject.
    pub fn encode_frame(&self, out: &mut Vec<u8>, max_len: u32) -> Result<(), EncodeError> {
        let msg_type = self.msg_type();
        self.validate()
            .map_err(|reason| EncodeError::Invalid { msg_type, reason })?;
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
        let res = match self {
            Message::Hello(m) => rmp_serde::encode::write_named(out, m),
            Message::Ping(m) => rmp_serde::encode::write_named(out, m),
            Message::Pong(m) => rmp_serde::encode::write_named(out, m),
            Message::Disconnect(m) => rmp_serde::encode::write_named(out, m),
            Message::Error(m) => rmp_serde::encode::write_named(out, m),
            Message::Publish(m) => rmp_serde::encode::write_named(out, m),
            // A compact binary body (already validated above).
            Message::PublishBatch(b) => b
                .write_body(out)
                .map(|_| ())
                .map_err(rmp_serde::encode::Error::Syntax),
            Message::PublishDropped(d) => {
                d.write_body(out).map_err(rmp_serde::encode::Error::Syntax)
            }
            Message::DialBack(m) => rmp_serde::encode::write_named(out, m),
            Message::DialBackResult(m) => rmp_serde::encode::write_named(out, m),
            Message::HolePunch(m) => rmp_serde::encode::write_named(out, m),
            Message::HolePunchSync(m) => rmp_serde::encode::write_named(out, m),
            Message::Client(c) => match c {
                ClientMessage::Subscribe(m) => rmp_serde::encode::write_named(out, m),
                ClientMessage::Unsubscribe(m) => rmp_serde::encode::write_named(out, m),
                ClientMessage::Advertise(m) => rmp_serde::encode::write_named(out, m),
                ClientMessage::Unadvertise(m) => rmp_serde::encode::write_named(out, m),
                ClientMessage::Ack(m) => rmp_serde::encode::write_named(out, m),
            },
            Message::Relay(r) => match r {
                RelayMessage::Reserve(m) => rmp_serde::encode::write_named(out, m),
                RelayMessage::Reserved(m) => rmp_serde::encode::write_named(out, m),
                RelayMessage::Connect(m) => rmp_serde::encode::write_named(out, m),
                RelayMessage::Incoming(m) => rmp_serde::encode::write_named(out, m),
                RelayMessage::Status(m) => rmp_serde::encode::write_named(out, m),
            },
            Message::Raft(r) => match r {
                RaftMessage::Request(m) => rmp_serde::encode::write_named(out, m),
                RaftMessage::Response(m) => rmp_serde::encode::write_named(out, m),
            },
            Message::Revocations(m) => rmp_serde::encode::write_named(out, m),
            Message::RealmKeys(m) => rmp_serde::encode::write_named(out, m),
            Message::Status(StatusMessage::Request(m)) => rmp_serde::encode::write_named(out, m),
            Message::Status(StatusMessage::Report(m)) => rmp_serde::encode::write_named(out, m),
            Message::Rpc(r) => match r {
                RpcMessage::Call(m) => rmp_serde::encode::write_named(out, m),
                RpcMessage::Reply(m) => rmp_serde::encode::write_named(out, m),
                RpcMessage::Error(m) => rmp_serde::encode::write_named(out, m),
                RpcMessage::Cancel(m) => rmp_serde::encode::write_named(out, m),
            },
            Message::Dht(d) => match d {
                DhtMessage::Ping(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::FindNode(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::FindValue(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::Store(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::Pong(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::Nodes(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::Value(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::Stored(m) => rmp_serde::encode::write_named(out, m),
                DhtMessage::StoreRejected(m) => rmp_serde::encode::write_named(out, m),
            },
        };
        if let Err(e) = res {
            out.truncate(start);
            return Err(EncodeError::Serialize(e.to_string()));
        }
        let len = out.len() - start - FRAME_HEADER_LEN;
        let fits = u32::try_from(len).ok().filter(|l| *l <= max_len);
        let Some(len32) = fits else {
            out.truncate(start);
            return Err(EncodeError::TooLarge {
                msg_type,
                len,
                max: max_len,
            });
        };
        let header = FrameHeader::new(msg_type as u8, len32).encode();
        out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header);
        Ok(())
    }

    /// Decodes a frame body of type `msg_type`.
    ///
    /// The body must hold exactly one MessagePack value; trailing bytes,
    /// missing required fields, wrong types and broken limits are `Malformed`.
    pub fn decode(msg_type: u8, body: &[u8]) -> Result<Message, DecodeError> {
        let t = MessageType::from_u8(msg_type).ok_or(DecodeError::UnknownType(msg_type))?;
        let msg = match t {
            MessageType::Hello => decode_body(t, body).map(Message::Hello),
            MessageType::Ping => decode_body(t, body).map(Message::Ping),
            MessageType::Pong => decode_body(t, body).map(Message::Pong),
            MessageType::Disconnect => decode_body(t, body).map(Message::Disconnect),
            MessageType::Error => decode_body(t, body).map(Message::Error),
            MessageType::Publish => decode_body(t, body).map(Message::Publish),
            MessageType::PublishBatch => PublishBatchView::decode(body)
                .map(|v| Message::PublishBatch(v.to_owned_batch()))
                .map_err(|reason| DecodeError::Malformed {
                    msg_type: t,
                    reason,
                }),
            MessageType::PublishDropped => PublishDropped::decode(body)
                .map(Message::PublishDropped)
                .map_err(|reason| DecodeError::Malformed {
                    msg_type: t,
                    reason,
                }),
            MessageType::DialBack => decode_body(t, body).map(Message::DialBack),
            MessageType::DialBackResult => decode_body(t, body).map(Message::DialBackResult),
            MessageType::HolePunch => decode_body(t, body).map(Message::HolePunch),
            MessageType::HolePunchSync => decode_body(t, body).map(Message::HolePunchSync),
            MessageType::ClientSubscribe => {
                decode_body(t, body).map(|m| Message::Client(ClientMessage::Subscribe(m)))
            }
            MessageType::ClientUnsubscribe => {
                decode_body(t, body).map(|m| Message::Client(ClientMessage::Unsubscribe(m)))
            }
            MessageType::ClientAdvertise => {
                decode_body(t, body).map(|m| Message::Client(ClientMessage::Advertise(m)))
            }
            MessageType::ClientUnadvertise => {
                decode_body(t, body).map(|m| Message::Client(ClientMessage::Unadvertise(m)))
            }
            MessageType::ClientAck => {
                decode_body(t, body).map(|m| Message::Client(ClientMessage::Ack(m)))
            }
            MessageType::RelayReserve => {
                decode_body(t, body).map(|m| Message::Relay(RelayMessage::Reserve(m)))
            }
            MessageType::RelayReserved => {
                decode_body(t, body).map(|m| Message::Relay(RelayMessage::Reserved(m)))
            }
            MessageType::RelayConnect => {
                decode_body(t, body).map(|m| Message::Relay(RelayMessage::Connect(m)))
            }
            MessageType::RelayIncoming => {
                decode_body(t, body).map(|m| Message::Relay(RelayMessage::Incoming(m)))
            }
            MessageType::RelayStatus => {
                decode_body(t, body).map(|m| Message::Relay(RelayMessage::Status(m)))
            }
            MessageType::Revocations => decode_body(t, body).map(Message::Revocations),
            MessageType::RealmKeys => decode_body(t, body).map(Message::RealmKeys),
            MessageType::StatusRequest => decode_body::<StatusRequest>(t, body)
                .map(|m| Message::Status(StatusMessage::Request(m))),
            MessageType::StatusReport => decode_body::<StatusReport>(t, body)
                .map(|m| Message::Status(StatusMessage::Report(m))),
            MessageType::RaftRequest => {
                decode_body(t, body).map(|m| Message::Raft(RaftMessage::Request(m)))
            }
            MessageType::RaftResponse => {
                decode_body(t, body).map(|m| Message::Raft(RaftMessage::Response(m)))
            }
            MessageType::RpcCall => decode_body(t, body).map(|m| Message::Rpc(RpcMessage::Call(m))),
            MessageType::RpcReply => {
                decode_body(t, body).map(|m| Message::Rpc(RpcMessage::Reply(m)))
            }
            MessageType::RpcError => {
                decode_body(t, body).map(|m| Message::Rpc(RpcMessage::Error(m)))
            }
            MessageType::RpcCancel => {
                decode_body(t, body).map(|m| Message::Rpc(RpcMessage::Cancel(m)))
            }
            MessageType::DhtPing => decode_body(t, body).map(|m| Message::Dht(DhtMessage::Ping(m))),
            MessageType::DhtFindNode => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::FindNode(m)))
            }
            MessageType::DhtFindValue => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::FindValue(m)))
            }
            MessageType::DhtStore => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::Store(m)))
            }
            MessageType::DhtPong => decode_body(t, body).map(|m| Message::Dht(DhtMessage::Pong(m))),
            MessageType::DhtNodes => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::Nodes(m)))
            }
            MessageType::DhtValue => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::Value(m)))
            }
            MessageType::DhtStored => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::Stored(m)))
            }
            MessageType::DhtStoreRejected => {
                decode_body(t, body).map(|m| Message::Dht(DhtMessage::StoreRejected(m)))
            }
        }?;
        msg.validate().map_err(|reason| DecodeError::Malformed {
            msg_type: t,
            reason,
        })?;
        Ok(msg)
    }
}

/// Decodes one MessagePack value of type `T` that must span all of `body`.
///
/// Reads through `std::io::Read` on the slice: rmp-serde's reader then copies
/// at most the bytes actually present, so a declared length larger than the
/// body fails instead of allocating.
fn decode_body<T: serde::de::DeserializeOwned>(
    msg_type: MessageType,
    body: &[u8],
) -> Result<T, DecodeError> {
    let malformed = |reason: String| DecodeError::Malformed { msg_type, reason };
    let mut rest = body;
    let value = {
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        de.set_max_depth(MAX_BODY_DEPTH);
        T::deserialize(&mut de).map_err(|e| malformed(e.to_string()))?
    };
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} trailing bytes after the body",
            rest.len()
        )));
    }
    Ok(value)
}

/// Fuzz entry point: decodes every frame in `data` and every body as a
/// message. Shared by `fuzz/fuzz_targets/frame_decoder.rs` and the property
/// tests so both exercise exactly the same path.
pub fn fuzz_decode(data: &[u8]) {
    let decoder = crate::frame::FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
    let mut rest = data;
    while let Ok(Some((frame, used))) = decoder.decode(rest) {
        assert!(used >= FRAME_HEADER_LEN && used <= rest.len());
        assert_eq!(frame.body.len(), frame.header.len as usize);
        if let Ok(msg) = Message::decode(frame.header.msg_type, frame.body) {
            // Whatever decodes must re-encode (assert on both sides of the boundary).
            let mut out = Vec::new();
            assert!(msg.encode_frame(&mut out, u32::MAX).is_ok());
        }
        rest = &rest[used..];
    }
}

/// Fuzz entry point (`fuzz/fuzz_targets/status_report.rs`): decodes `data`
/// as both status messages (`status.rs`); whatever decodes must re-encode within the
/// limits it was checked against.
pub fn fuzz_status(data: &[u8]) {
    for t in [MessageType::StatusRequest, MessageType::StatusReport] {
        if let Ok(msg) = Message::decode(t as u8, data) {
            let mut out = Vec::new();
            assert!(msg.encode_frame(&mut out, u32::MAX).is_ok());
        }
    }
}

#[cfg(test)]
mod fuzz_tests {
    use super::*;
    use crate::frame::FrameHeader;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzz_decode(&data);
        }

        #[test]
        fn decoder_never_panics_on_v1_headers(t in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut data = FrameHeader::new(t, body.len() as u32).encode().to_vec();
            data.extend_from_slice(&body);
            fuzz_decode(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use proptest::prelude::*;

    fn round_trip(msg: &Message) -> Message {
        let mut buf = Vec::new();
        msg.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let (frame, used) = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE)
            .decode(&buf)
            .unwrap()
            .unwrap();
        assert_eq!(used, buf.len());
        Message::decode(frame.header.msg_type, frame.body).unwrap()
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            node_id: NodeId::from_bytes([3; 32]),
            realm: "io.example.shop".into(),
            capabilities: vec!["dht".into()],
            listen_addrs: vec!["127.0.0.1:4433".into()],
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            agent: "macula/0.1.0".into(),
            grant: None,
            api_key: None,
            observed_addr: Some("198.18.0.101:4433".into()),
        }
    }

    #[test]
    fn unknown_type_is_not_malformed() {
        assert_eq!(
            Message::decode(0x7e, &[]),
            Err(DecodeError::UnknownType(0x7e))
        );
        assert_eq!(Message::decode(0, &[]), Err(DecodeError::UnknownType(0)));
    }

    #[test]
    fn malformed_bodies() {
        let cases: &[&[u8]] = &[
            &[],
            &[0xc1],                         // never-used marker
            &[0x80],                         // empty map: missing fields
            &[0xdd, 0xff, 0xff, 0xff, 0xff], // array32 declaring 4G elements
            &[0xc6, 0xff, 0xff, 0xff, 0xff], // bin32 declaring 4 GiB
        ];
        for body in cases {
            for t in MessageType::ALL {
                assert!(
                    matches!(
                        Message::decode(t as u8, body),
                        Err(DecodeError::Malformed { .. })
                    ),
                    "{t:?} {body:?}"
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut buf = Vec::new();
        Message::Ping(Ping {
            nonce: 1,
            sent_at_us: 2,
            keep: false,
        })
        .encode_frame(&mut buf, 1024)
        .unwrap();
        buf.push(0);
        let err = Message::decode(MessageType::Ping as u8, &buf[FRAME_HEADER_LEN..]).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct PingV2 {
            nonce: u64,
            sent_at_us: u64,
            future_field: Vec<String>,
        }
        let body = rmp_serde::to_vec_named(&PingV2 {
            nonce: 5,
            sent_at_us: 6,
            future_field: vec!["x".into()],
        })
        .unwrap();
        assert_eq!(
            Message::decode(MessageType::Ping as u8, &body),
            Ok(Message::Ping(Ping {
                nonce: 5,
                sent_at_us: 6,
                keep: false,
            }))
        );
    }

    /// PROTOCOL.md 4.1: nil in an optional field is the same as absent, and
    /// senders omit absent fields instead of sending nil.
    #[test]
    fn nil_means_absent_both_ways() {
        #[derive(Serialize)]
        struct Nils<'a> {
            nonce: u64,
            sent_at_us: u64,
            keep: Option<bool>,
            id: u64,
            procedure: &'a str,
            weight: Option<u32>,
            metadata: Option<u8>,
            error: Option<String>,
            status: crate::raft::RaftStatus,
            body: Option<u8>,
            reason: Option<u8>,
        }
        let body = rmp_serde::to_vec_named(&Nils {
            nonce: 5,
            sent_at_us: 6,
            keep: None,
            id: 7,
            procedure: "svc.add",
            weight: None,
            metadata: None,
            error: None,
            status: crate::raft::RaftStatus::Ok,
            body: None,
            reason: None,
        })
        .unwrap();
        assert_eq!(
            Message::decode(MessageType::Ping as u8, &body),
            Ok(Message::Ping(Ping {
                nonce: 5,
                sent_at_us: 6,
                keep: false,
            }))
        );
        assert_eq!(
            Message::decode(MessageType::ClientAdvertise as u8, &body),
            Ok(Message::Client(ClientMessage::Advertise(
                crate::client::ClientAdvertise {
                    id: 7,
                    procedure: "svc.add".into(),
                    weight: 1,
                    metadata: Vec::new(),
                }
            )))
        );
        assert_eq!(
            Message::decode(MessageType::ClientAck as u8, &body),
            Ok(Message::Client(ClientMessage::Ack(
                crate::client::ClientAck { id: 7, error: None }
            )))
        );
        assert_eq!(
            Message::decode(MessageType::RaftResponse as u8, &body),
            Ok(Message::Raft(crate::raft::RaftMessage::Response(
                crate::raft::RaftResponse {
                    status: crate::raft::RaftStatus::Ok,
                    body: Vec::new(),
                    reason: String::new(),
                }
            )))
        );
        // An absent `error` is not sent, nil or otherwise.
        let ack = Message::Client(ClientMessage::Ack(crate::client::ClientAck {
            id: 7,
            error: None,
        }));
        let mut buf = Vec::new();
        ack.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            rmp_serde::from_slice(&buf[FRAME_HEADER_LEN..]).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["id"]);
    }

    #[test]
    fn hello_api_key_is_optional_and_bounded() {
        // Without a key the field is absent, as before it existed.
        let h = hello();
        let body = rmp_serde::to_vec_named(&h).unwrap();
        let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            rmp_serde::from_slice(&body).unwrap();
        assert!(!keys.contains_key("api_key"));
        let mut with_key = h.clone();
        with_key.api_key = Some(serde_bytes::ByteBuf::from(vec![7u8; 32]));
        let body = rmp_serde::to_vec_named(&with_key).unwrap();
        assert_eq!(
            Message::decode(MessageType::Hello as u8, &body),
            Ok(Message::Hello(with_key.clone()))
        );
        with_key.api_key = Some(serde_bytes::ByteBuf::from(vec![7u8; MAX_API_KEY_LEN + 1]));
        let body = rmp_serde::to_vec_named(&with_key).unwrap();
        assert!(matches!(
            Message::decode(MessageType::Hello as u8, &body),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn hello_observed_addr_is_optional_and_bounded() {
        // A HELLO from before the field decodes with none, and one without
        // an observation leaves the key out.
        let mut h = hello();
        h.observed_addr = None;
        let body = rmp_serde::to_vec_named(&h).unwrap();
        let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            rmp_serde::from_slice(&body).unwrap();
        assert!(!keys.contains_key("observed_addr"));
        assert_eq!(
            Message::decode(MessageType::Hello as u8, &body),
            Ok(Message::Hello(h.clone()))
        );
        h.observed_addr = Some("198.18.0.101:4433".into());
        assert_eq!(
            round_trip(&Message::Hello(h.clone())),
            Message::Hello(h.clone())
        );
        h.observed_addr = Some("9".repeat(MAX_ADDR_LEN + 1));
        let body = rmp_serde::to_vec_named(&h).unwrap();
        assert!(matches!(
            Message::decode(MessageType::Hello as u8, &body),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn rate_limited_codes() {
        assert_eq!(u16::from(DisconnectReason::RateLimited), 12);
        assert_eq!(DisconnectReason::from(12), DisconnectReason::RateLimited);
        assert_eq!(u16::from(ErrorCode::RateLimited), 10);
        assert_eq!(ErrorCode::from(10), ErrorCode::RateLimited);
        assert_eq!(ErrorCode::RateLimited.name(), "rate_limited");
    }

    #[test]
    fn limits_enforced_both_ways() {
        let mut h = hello();
        h.realm = "r".repeat(MAX_REALM_LEN + 1);
        let msg = Message::Hello(h.clone());
        let mut buf = vec![9];
        assert!(matches!(
            msg.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE),
            Err(EncodeError::Invalid { .. })
        ));
        assert_eq!(buf, vec![9], "failed encode leaves the buffer untouched");
        // A peer that ignores the limit is caught on decode.
        let body = rmp_serde::to_vec_named(&h).unwrap();
        assert!(matches!(
            Message::decode(MessageType::Hello as u8, &body),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn frame_limit_enforced_on_encode() {
        let msg = Message::Error(ErrorFrame {
            code: ErrorCode::Malformed,
            message: "x".repeat(1000),
            msg_type: 0,
        });
        let mut buf = Vec::new();
        assert!(matches!(
            msg.encode_frame(&mut buf, 100),
            Err(EncodeError::TooLarge { .. })
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn codes_round_trip_including_unknown() {
        for v in 0..20u16 {
            assert_eq!(u16::from(DisconnectReason::from(v)), v);
            assert_eq!(u16::from(ErrorCode::from(v)), v);
        }
    }

    fn arb_string(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..8).prop_map(move |cs| {
            let mut s: String = cs.into_iter().collect();
            while s.len() > max {
                s.pop();
            }
            s
        })
    }

    fn arb_contact() -> impl Strategy<Value = WireContact> {
        (any::<[u8; 32]>(), arb_string(MAX_ADDR_LEN)).prop_map(|(id, addr)| WireContact {
            id: NodeId::from_bytes(id),
            addr,
        })
    }

    fn arb_record() -> impl Strategy<Value = WireRecord> {
        (
            any::<[u8; 32]>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..96),
        )
            .prop_map(|(k, p, seq, ttl_ms, value, signature)| WireRecord {
                key: NodeId::from_bytes(k),
                publisher: NodeId::from_bytes(p),
                seq,
                ttl_ms,
                value,
                signature,
            })
    }

    fn arb_dht() -> impl Strategy<Value = DhtMessage> {
        let contacts = || proptest::collection::vec(arb_contact(), 0..4);
        prop_oneof![
            any::<u64>().prop_map(|id| DhtMessage::Ping(DhtPing { id })),
            (any::<u64>(), any::<[u8; 32]>()).prop_map(|(id, t)| DhtMessage::FindNode(
                DhtFindNode {
                    id,
                    target: NodeId::from_bytes(t)
                }
            )),
            (any::<u64>(), any::<[u8; 32]>()).prop_map(|(id, k)| DhtMessage::FindValue(
                DhtFindValue {
                    id,
                    key: NodeId::from_bytes(k)
                }
            )),
            (any::<u64>(), arb_record(), any::<u64>()).prop_map(|(id, record, ttl_ms)| {
                DhtMessage::Store(DhtStore { id, record, ttl_ms })
            }),
            any::<u64>().prop_map(|id| DhtMessage::Pong(DhtPong { id })),
            (any::<u64>(), contacts())
                .prop_map(|(id, closer)| DhtMessage::Nodes(DhtNodes { id, closer })),
            (
                any::<u64>(),
                proptest::collection::vec(arb_record(), 0..3),
                contacts()
            )
                .prop_map(|(id, records, closer)| DhtMessage::Value(DhtValue {
                    id,
                    records,
                    closer
                })),
            any::<u64>().prop_map(|id| DhtMessage::Stored(DhtStored { id })),
            (any::<u64>(), any::<u16>(), any::<u64>(), any::<u64>()).prop_map(
                |(id, c, value, limit)| {
                    DhtMessage::StoreRejected(DhtStoreRejected {
                        id,
                        code: c.into(),
                        value,
                        limit,
                    })
                }
            ),
        ]
    }

    fn arb_publish() -> impl Strategy<Value = Message> {
        (
            arb_string(64),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((arb_string(16), arb_string(16)), 0..3),
            proptest::option::of(arb_string(32)),
        )
            .prop_map(|(topic, payload, p, epoch, seq, headers, message_id)| {
                Message::Publish(crate::pubsub::Publish {
                    topic,
                    payload,
                    publisher: NodeId::from_bytes(p),
                    epoch,
                    seq,
                    headers,
                    message_id,
                })
            })
    }

    fn arb_rpc() -> impl Strategy<Value = Message> {
        let headers = || proptest::collection::vec((arb_string(16), arb_string(16)), 0..3);
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (
                any::<u64>(),
                arb_string(64),
                bytes(),
                any::<u32>(),
                headers()
            )
                .prop_map(|(id, procedure, payload, timeout_ms, headers)| {
                    Message::Rpc(RpcMessage::Call(Call {
                        id,
                        procedure,
                        payload,
                        timeout_ms,
                        headers,
                        origin: (id % 2 == 0).then(|| crate::rpc::CallOrigin {
                            key: vec![id as u8; 32],
                            sig: vec![7; 64],
                        }),
                    }))
                }),
            (any::<u64>(), bytes(), headers()).prop_map(|(id, payload, headers)| {
                Message::Rpc(RpcMessage::Reply(Reply {
                    id,
                    payload,
                    headers,
                }))
            }),
            (any::<u64>(), any::<u16>(), any::<i64>(), arb_string(64)).prop_map(
                |(id, kind, code, message)| {
                    Message::Rpc(RpcMessage::Error(CallError {
                        id,
                        kind: kind.into(),
                        code,
                        message,
                    }))
                }
            ),
            any::<u64>().prop_map(|id| Message::Rpc(RpcMessage::Cancel(Cancel { id }))),
        ]
    }

    fn arb_client() -> impl Strategy<Value = Message> {
        use crate::client::*;
        prop_oneof![
            (any::<u64>(), arb_string(64)).prop_map(|(id, pattern)| Message::Client(
                ClientMessage::Subscribe(ClientSubscribe { id, pattern })
            )),
            (any::<u64>(), arb_string(64)).prop_map(|(id, pattern)| Message::Client(
                ClientMessage::Unsubscribe(ClientUnsubscribe { id, pattern })
            )),
            (
                any::<u64>(),
                arb_string(64),
                any::<u32>(),
                proptest::collection::vec((arb_string(16), arb_string(16)), 0..3)
            )
                .prop_map(|(id, procedure, weight, metadata)| Message::Client(
                    ClientMessage::Advertise(ClientAdvertise {
                        id,
                        procedure,
                        weight,
                        metadata
                    })
                )),
            (any::<u64>(), arb_string(64)).prop_map(|(id, procedure)| Message::Client(
                ClientMessage::Unadvertise(ClientUnadvertise { id, procedure })
            )),
            (any::<u64>(), proptest::option::of(arb_string(64))).prop_map(|(id, error)| {
                Message::Client(ClientMessage::Ack(ClientAck { id, error }))
            }),
        ]
    }

    fn arb_relay() -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<u64>().prop_map(|ttl_ms| RelayMessage::Reserve(RelayReserve { ttl_ms })),
            (
                any::<u16>(),
                any::<u64>(),
                arb_string(MAX_RELAY_MESSAGE_LEN)
            )
                .prop_map(|(c, ttl_ms, message)| RelayMessage::Reserved(
                    RelayReserved {
                        code: c.into(),
                        ttl_ms,
                        message,
                    }
                )),
            (any::<[u8; 32]>(), proptest::option::of("[0-9a-f-]{0,60}")).prop_map(|(t, tp)| {
                RelayMessage::Connect(RelayConnect {
                    target: NodeId::from_bytes(t),
                    traceparent: tp,
                })
            }),
            any::<[u8; 32]>().prop_map(|t| RelayMessage::Incoming(RelayIncoming {
                source: NodeId::from_bytes(t)
            })),
            (any::<u16>(), arb_string(MAX_RELAY_MESSAGE_LEN)).prop_map(|(c, message)| {
                RelayMessage::Status(RelayStatus {
                    code: c.into(),
                    message,
                })
            }),
        ]
        .prop_map(Message::Relay)
    }

    fn arb_raft() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                "[a-z0-9._-]{1,128}",
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(group, kind, body)| RaftMessage::Request(RaftRequest {
                    group,
                    kind: kind.into(),
                    body
                })),
            (
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..64),
                arb_string(MAX_RAFT_REASON_LEN)
            )
                .prop_map(|(status, body, reason)| RaftMessage::Response(
                    RaftResponse {
                        status: status.into(),
                        body,
                        reason
                    }
                )),
        ]
        .prop_map(Message::Raft)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..256)
                .prop_map(|list| Message::Revocations(Revocations { list })),
            proptest::collection::vec(any::<u8>(), 1..256)
                .prop_map(|set| Message::RealmKeys(RealmKeys { set })),
            arb_publish(),
            arb_raft(),
            arb_client(),
            arb_relay(),
            arb_rpc(),
            (
                any::<u64>(),
                proptest::collection::vec(arb_string(MAX_ADDR_LEN), 0..4)
            )
                .prop_map(|(nonce, addrs)| Message::DialBack(DialBack { nonce, addrs })),
            (
                any::<u64>(),
                proptest::option::of(arb_string(MAX_ADDR_LEN)),
                arb_string(64)
            )
                .prop_map(|(nonce, reached, error)| {
                    Message::DialBackResult(DialBackResult {
                        nonce,
                        reached,
                        error,
                    })
                }),
            (
                any::<u64>(),
                proptest::collection::vec(
                    arb_string(MAX_ADDR_LEN),
                    0..=crate::nat::MAX_PUNCH_ADDRS
                ),
                arb_string(crate::nat::MAX_MAPPING_LEN),
                arb_string(crate::nat::MAX_MAPPING_LEN),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(nonce, addrs, mapping, filtering, reply, predicted)| {
                    Message::HolePunch(HolePunch {
                        nonce,
                        addrs,
                        mapping,
                        filtering,
                        reply,
                        predicted,
                    })
                }),
            any::<u64>().prop_map(|nonce| Message::HolePunchSync(HolePunchSync { nonce })),
            arb_dht().prop_map(Message::Dht),
            (
                any::<[u8; 32]>(),
                arb_string(MAX_REALM_LEN),
                proptest::collection::vec(arb_string(MAX_CAPABILITY_LEN), 0..4),
                proptest::collection::vec(arb_string(MAX_ADDR_LEN), 0..4),
                MIN_MAX_FRAME_SIZE..=u32::MAX,
                arb_string(MAX_AGENT_LEN),
                any::<u8>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=MAX_API_KEY_LEN,)),
                proptest::option::of(arb_string(MAX_ADDR_LEN)),
            )
                .prop_map(
                    |(
                        id,
                        realm,
                        capabilities,
                        listen_addrs,
                        max_frame_size,
                        agent,
                        version,
                        grant,
                        api_key,
                        observed_addr,
                    )| {
                        Message::Hello(Hello {
                            version,
                            node_id: NodeId::from_bytes(id),
                            realm,
                            capabilities,
                            listen_addrs,
                            max_frame_size,
                            agent,
                            grant: grant.map(serde_bytes::ByteBuf::from),
                            api_key: api_key.map(serde_bytes::ByteBuf::from),
                            observed_addr,
                        })
                    }
                ),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(nonce, sent_at_us, keep)| {
                Message::Ping(Ping {
                    nonce,
                    sent_at_us,
                    keep,
                })
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(nonce, e, r)| {
                Message::Pong(Pong {
                    nonce,
                    echo_sent_at_us: e,
                    responder_unix_ms: r,
                })
            }),
            (any::<u16>(), arb_string(MAX_REASON_LEN)).prop_map(|(r, message)| {
                Message::Disconnect(Disconnect {
                    reason: r.into(),
                    message,
                })
            }),
            (any::<u16>(), arb_string(MAX_REASON_LEN), any::<u8>()).prop_map(
                |(c, message, msg_type)| {
                    Message::Error(ErrorFrame {
                        code: c.into(),
                        message,
                        msg_type,
                    })
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in arb_message()) {
            prop_assert_eq!(round_trip(&msg), msg);
        }

        #[test]
        fn concatenated_frames_split_exactly(msgs in proptest::collection::vec(arb_message(), 0..6)) {
            let mut buf = Vec::new();
            for m in &msgs {
                m.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
            }
            let dec = FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE);
            let mut rest = &buf[..];
            let mut got = Vec::new();
            while let Some((f, n)) = dec.decode(rest).unwrap() {
                got.push(Message::decode(f.header.msg_type, f.body).unwrap());
                rest = &rest[n..];
            }
            prop_assert!(rest.is_empty());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn truncated_frames_ask_for_more(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            msg.encode_frame(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
            let cut = cut.index(buf.len());
            prop_assert_eq!(FrameDecoder::new(DEFAULT_MAX_FRAME_SIZE).decode(&buf[..cut]), Ok(None));
        }

        #[test]
        fn any_body_decodes_or_errors(t in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(t, &body);
        }
    }
}
