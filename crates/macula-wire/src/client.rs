//! Client attachment messages (types `0x80..=0x8f`).
//!
//! A lightweight client listens on nothing and keeps one connection to a
//! node of the mesh, its gateway. It asks the gateway to subscribe and to
//! advertise procedures on its behalf; the gateway answers each request with
//! CLIENT_ACK. Events matching a client's patterns travel back on the
//! gateway's pub/sub data stream to the client, calls to its procedures as
//! ordinary RPC CALL frames. See `docs/PROTOCOL.md` §5.6.

use serde::{Deserialize, Serialize};

/// The HELLO capability of a lightweight client: peers keep it out of
/// their DHT routing tables and never ask it to relay or dial back.
pub const CLIENT_CAPABILITY: &str = "client";

/// Pattern and procedure length on the wire (the cores have tighter limits).
pub const MAX_CLIENT_NAME_LEN: usize = 512;
/// Metadata pairs on one CLIENT_ADVERTISE.
pub const MAX_CLIENT_METADATA: usize = 16;
/// Metadata key and value lengths.
pub const MAX_CLIENT_METADATA_LEN: usize = 256;
/// Error text in CLIENT_ACK.
pub const MAX_CLIENT_ERROR_LEN: usize = 512;

/// "Subscribe to `pattern` for me and forward what matches."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSubscribe {
    /// Matches the CLIENT_ACK.
    pub id: u64,
    pub pattern: String,
}

/// "Stop forwarding `pattern`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientUnsubscribe {
    pub id: u64,
    pub pattern: String,
}

/// "Advertise `procedure` in the mesh and send its calls to me."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientAdvertise {
    pub id: u64,
    pub procedure: String,
    /// Relative share under weighted balancing (at least 1).
    #[serde(default = "one", deserialize_with = "nil_one")]
    pub weight: u32,
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub metadata: Vec<(String, String)>,
}

fn one() -> u32 {
    1
}

/// `weight`: nil is absent, 1 (PROTOCOL.md 4.1).
fn nil_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(<Option<u32> as Deserialize>::deserialize(d)?.unwrap_or_else(one))
}

/// "Stop advertising `procedure` for me."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientUnadvertise {
    pub id: u64,
    pub procedure: String,
}

/// The gateway's answer to request `id`: done, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientAck {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every client attachment message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe(ClientSubscribe),
    Unsubscribe(ClientUnsubscribe),
    Advertise(ClientAdvertise),
    Unadvertise(ClientUnadvertise),
    Ack(ClientAck),
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_CLIENT_NAME_LEN {
        return Err(format!("{what} of {} bytes", s.len()));
    }
    Ok(())
}

impl ClientMessage {
    /// The request ID this message carries (or answers).
    pub fn id(&self) -> u64 {
        match self {
            ClientMessage::Subscribe(m) => m.id,
            ClientMessage::Unsubscribe(m) => m.id,
            ClientMessage::Advertise(m) => m.id,
            ClientMessage::Unadvertise(m) => m.id,
            ClientMessage::Ack(m) => m.id,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            ClientMessage::Subscribe(m) => check_name("pattern", &m.pattern),
            ClientMessage::Unsubscribe(m) => check_name("pattern", &m.pattern),
            ClientMessage::Advertise(m) => {
                check_name("procedure", &m.procedure)?;
                if m.metadata.len() > MAX_CLIENT_METADATA {
                    return Err(format!(
                        "{} metadata pairs, limit {MAX_CLIENT_METADATA}",
                        m.metadata.len()
                    ));
                }
                if m.metadata.iter().any(|(k, v)| {
                    k.len() > MAX_CLIENT_METADATA_LEN || v.len() > MAX_CLIENT_METADATA_LEN
                }) {
                    return Err("metadata entry too long".into());
                }
                Ok(())
            }
            ClientMessage::Unadvertise(m) => check_name("procedure", &m.procedure),
            ClientMessage::Ack(m) => {
                if m.error
                    .as_ref()
                    .is_some_and(|e| e.len() > MAX_CLIENT_ERROR_LEN)
                {
                    return Err("error text too long".into());
                }
                Ok(())
            }
        }
    }
}
