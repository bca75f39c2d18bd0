//! Raft group messages (types `0x90..=0x9f`).
//!
//! A Raft group's members talk over the mesh's own connections. Each request
//! opens a bidirectional stream whose first frame is RAFT_REQUEST; the
//! receiver answers with one RAFT_RESPONSE on the same stream and finishes
//! it. The request's `body` is opaque here: the MessagePack (named fields)
//! encoding of the openraft request named by `kind`, or of a forwarded
//! client request (see `docs/PROTOCOL.md` §5.8). Keeping it opaque keeps
//! this crate free of the Raft engine's types.

use serde::{Deserialize, Serialize};

/// Longest group name, in bytes.
pub const MAX_RAFT_GROUP_LEN: usize = 128;
/// Longest error text in RAFT_RESPONSE.
pub const MAX_RAFT_REASON_LEN: usize = 1024;

/// What a RAFT_REQUEST asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum RaftKind {
    /// openraft `AppendEntriesRequest` (heartbeats included).
    AppendEntries,
    /// openraft `VoteRequest`.
    Vote,
    /// openraft `InstallSnapshotRequest` (one chunk).
    InstallSnapshot,
    /// A client write forwarded to the leader.
    Write,
    /// A linearizable read forwarded to the leader.
    Read,
    /// A membership change forwarded to the leader.
    Membership,
    /// A lease keep-alive forwarded to the leader.
    KeepAlive,
    /// A kind this version does not know (answered with status `Unsupported`).
    Other(u8),
}

impl From<u8> for RaftKind {
    fn from(v: u8) -> Self {
        match v {
            1 => RaftKind::AppendEntries,
            2 => RaftKind::Vote,
            3 => RaftKind::InstallSnapshot,
            4 => RaftKind::Write,
            5 => RaftKind::Read,
            6 => RaftKind::Membership,
            7 => RaftKind::KeepAlive,
            other => RaftKind::Other(other),
        }
    }
}

impl From<RaftKind> for u8 {
    fn from(k: RaftKind) -> u8 {
        match k {
            RaftKind::AppendEntries => 1,
            RaftKind::Vote => 2,
            RaftKind::InstallSnapshot => 3,
            RaftKind::Write => 4,
            RaftKind::Read => 5,
            RaftKind::Membership => 6,
            RaftKind::KeepAlive => 7,
            RaftKind::Other(v) => v,
        }
    }
}

/// How a RAFT_REQUEST went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum RaftStatus {
    /// `body` holds the answer (which may itself be an openraft error).
    Ok,
    /// This node runs no group of that name.
    NoGroup,
    /// The body did not decode as the kind's request.
    Malformed,
    /// This node is not the group's leader (forwarded requests only);
    /// `body` is empty, `reason` may name the leader.
    NotLeader,
    /// The request failed here; `reason` says why.
    Failed,
    /// An unknown `kind`.
    Unsupported,
    /// A status this version does not know.
    Other(u8),
}

impl From<u8> for RaftStatus {
    fn from(v: u8) -> Self {
        match v {
            0 => RaftStatus::Ok,
            1 => RaftStatus::NoGroup,
            2 => RaftStatus::Malformed,
            3 => RaftStatus::NotLeader,
            4 => RaftStatus::Failed,
            5 => RaftStatus::Unsupported,
            other => RaftStatus::Other(other),
        }
    }
}

impl From<RaftStatus> for u8 {
    fn from(s: RaftStatus) -> u8 {
        match s {
            RaftStatus::Ok => 0,
            RaftStatus::NoGroup => 1,
            RaftStatus::Malformed => 2,
            RaftStatus::NotLeader => 3,
            RaftStatus::Failed => 4,
            RaftStatus::Unsupported => 5,
            RaftStatus::Other(v) => v,
        }
    }
}

/// Opens a stream: one request to the group `group` on the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftRequest {
    pub group: String,
    pub kind: RaftKind,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The answer on the request's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftResponse {
    pub status: RaftStatus,
    #[serde(
        default,
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "nil_bytes"
    )]
    pub body: Vec<u8>,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub reason: String,
}

/// Raft messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaftMessage {
    Request(RaftRequest),
    Response(RaftResponse),
}

impl RaftMessage {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            RaftMessage::Request(r) => {
                if r.group.is_empty() || r.group.len() > MAX_RAFT_GROUP_LEN {
                    return Err(format!(
                        "group name of {} bytes (1..={MAX_RAFT_GROUP_LEN})",
                        r.group.len()
                    ));
                }
                Ok(())
            }
            RaftMessage::Response(r) => {
                if r.reason.len() > MAX_RAFT_REASON_LEN {
                    return Err(format!("reason of {} bytes", r.reason.len()));
                }
                Ok(())
            }
        }
    }
}

/// `body`: nil is absent, empty (PROTOCOL.md 4.1).
fn nil_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    Ok(
        <Option<serde_bytes::ByteBuf> as Deserialize>::deserialize(d)?
            .map(serde_bytes::ByteBuf::into_vec)
            .unwrap_or_default(),
    )
}
