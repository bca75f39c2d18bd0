//! Reachability messages (types `0x70..=0x7f`, relay and NAT traversal).
//!
//! A node asks a connected peer to dial it back (as libp2p's AutoNAT does):
//! DIAL_BACK names the addresses the node believes it listens on; the peer
//! dials them **from a different UDP socket** (so an existing NAT mapping
//! for the connection they share cannot let the dial through) at the IP it
//! observes the node at, proves the node's identity in the TLS handshake,
//! closes, and answers DIAL_BACK_RESULT.
//!
//! Two nodes connected through a relay try a direct connection by hole
//! punching (as libp2p's DCUtR does): the dialer of the relayed connection
//! sends HOLE_PUNCH with its candidate addresses, the other answers
//! HOLE_PUNCH (`reply`) with its own, the dialer measures the round trip,
//! sends HOLE_PUNCH_SYNC and dials half a round trip later, the other dials
//! on receiving the sync: both NATs see an outgoing packet before the
//! other's arrives.

use serde::{Deserialize, Serialize};

/// Addresses in one DIAL_BACK.
pub const MAX_DIAL_BACK_ADDRS: usize = 4;
/// Error text in DIAL_BACK_RESULT.
pub const MAX_DIAL_BACK_ERROR_LEN: usize = 256;

/// Candidate addresses in one HOLE_PUNCH.
pub const MAX_PUNCH_ADDRS: usize = 8;
/// Length of HOLE_PUNCH's `mapping`.
pub const MAX_MAPPING_LEN: usize = 32;

/// "Let us try a direct connection: here is where I can be reached."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunch {
    /// Names the attempt; the reply and the sync carry it back.
    pub nonce: u64,
    /// The sender's candidates (`ip:port`): the reflexive addresses peers
    /// observed, then its listen addresses.
    pub addrs: Vec<String>,
    /// The sender's NAT mapping as it classified it (`unknown`, `none`,
    /// `endpoint_independent`, `address_dependent`,
    /// `address_and_port_dependent`), so both sides skip a pair that
    /// cannot punch.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub mapping: String,
    /// The sender's NAT filtering as it knows it (`unknown`, `none`,
    /// `endpoint_or_address_dependent`, `address_and_port_dependent`).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub filtering: String,
    /// False from the initiator, true in the answer.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub reply: bool,
    /// The sender's mapping is per destination but its ports are handed
    /// out in order: its first candidates are its predicted next mappings,
    /// and it counts as endpoint-independent for the punchability check.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub predicted: bool,
}

/// "Dial now": the initiator dials half a round trip after sending it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunchSync {
    pub nonce: u64,
}

impl HolePunch {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.addrs.len() > MAX_PUNCH_ADDRS {
            return Err(format!(
                "{} addresses, limit {MAX_PUNCH_ADDRS}",
                self.addrs.len()
            ));
        }
        if self
            .addrs
            .iter()
            .any(|a| a.len() > crate::limits::MAX_ADDR_LEN)
        {
            return Err("address too long".into());
        }
        if self.mapping.len() > MAX_MAPPING_LEN || self.filtering.len() > MAX_MAPPING_LEN {
            return Err("mapping or filtering name too long".into());
        }
        Ok(())
    }
}

/// "Dial me back at one of these addresses."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialBack {
    pub nonce: u64,
    /// `host:port` the requester listens on. The dialer keeps the ports but
    /// dials the IP it observes the requester at.
    pub addrs: Vec<String>,
}

/// The answer to DIAL_BACK `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialBackResult {
    pub nonce: u64,
    /// The address a dial-back reached, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<String>,
    /// Why none did (or why the request was refused), for logs.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub error: String,
}

impl DialBack {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.addrs.len() > MAX_DIAL_BACK_ADDRS {
            return Err(format!(
                "{} addresses, limit {MAX_DIAL_BACK_ADDRS}",
                self.addrs.len()
            ));
        }
        if self
            .addrs
            .iter()
            .any(|a| a.len() > crate::limits::MAX_ADDR_LEN)
        {
            return Err("address too long".into());
        }
        Ok(())
    }
}

impl DialBackResult {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self
            .reached
            .as_ref()
            .is_some_and(|a| a.len() > crate::limits::MAX_ADDR_LEN)
        {
            return Err("address too long".into());
        }
        if self.error.len() > MAX_DIAL_BACK_ERROR_LEN {
            return Err(format!("error text of {} bytes", self.error.len()));
        }
        Ok(())
    }
}
