//! Node status messages (types `0xb0..=0xb7`, observability): what a node
//! tells a connected peer about itself, for the peer's dashboard.
//!
//! A node asks with STATUS_REQUEST (a nonce); the peer answers
//! STATUS_REPORT with the same nonce and either a bounded [`NodeStatus`]
//! (identity, addresses, uptime, its links with direct/relayed, its
//! lightweight clients, running totals of messages, publishes, calls and
//! DHT lookups) or the reason it refused. Totals rather than rates: the
//! asker computes rates from two reports, so both sides need no clock
//! agreement. One hop only: a node learns its peers' links, never asks a
//! peer to ask further.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_ADDR_LEN, MAX_AGENT_LEN, MAX_LISTEN_ADDRS, MAX_REASON_LEN};
use crate::node_id::NodeId;

/// Links listed in one [`NodeStatus`]; a sender with more lists the first
/// ones and counts the rest in `links_omitted`.
pub const MAX_STATUS_LINKS: usize = 1024;
/// Longest `reachability` word.
pub const MAX_REACHABILITY_LEN: usize = 16;

/// "Tell me about yourself."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Echoed in the report.
    pub nonce: u64,
}

/// The answer to STATUS_REQUEST `nonce`: a status, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub nonce: u64,
    /// Absent when refused.
    #[serde(
        default,
        deserialize_with = "crate::nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub status: Option<Box<NodeStatus>>,
    /// Why the request was refused (e.g. the asker's grant does not allow
    /// `admin admin.dashboard`); empty when `status` is present.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub refused: String,
}

/// A node's summary of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Must be the node ID the sender proved in TLS.
    pub node_id: NodeId,
    /// Addresses it listens on (`host:port`).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub addrs: Vec<String>,
    /// Its software (as in HELLO).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub agent: String,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Joined the mesh (or the first node), as its `/ready`.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub ready: bool,
    /// `unknown`, `public` or `private`.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub reachability: String,
    /// Its connections to other full nodes.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub links: Vec<StatusLink>,
    /// Connections to full nodes not listed (over the sender's limit).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub links_omitted: u32,
    /// Lightweight clients attached to it (it is their gateway).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub clients: u32,
    /// Running totals (rates come from two reports).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub totals: StatusTotals,
}

/// One connection of the reporting node to another full node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusLink {
    pub node_id: NodeId,
    /// The relay the connection runs through; absent when direct.
    #[serde(
        default,
        deserialize_with = "crate::nil_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub relayed_via: Option<NodeId>,
    /// Smoothed round-trip time, microseconds.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub rtt_us: u64,
    /// The reporting node dialled it.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub outbound: bool,
}

/// Running totals and sizes since the node started. Every field is
/// optional on the wire (0 when absent), so later versions can add some.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTotals {
    /// Frames received from peers.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub messages_in: u64,
    /// Frames sent to peers.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub messages_out: u64,
    /// Messages published on this node.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub published: u64,
    /// Messages delivered to local subscribers.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub delivered: u64,
    /// Pub/sub messages received from peers and clients (accepted).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub pubsub_in: u64,
    /// Pub/sub messages queued to peers and clients (forwarded included).
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub pubsub_out: u64,
    /// Calls made from this node.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub rpc_calls: u64,
    /// Calls served by this node's handlers.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub rpc_served: u64,
    /// DHT records held.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub dht_records: u64,
    /// Contacts in the DHT routing table.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub dht_contacts: u64,
    /// DHT lookups finished.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub dht_lookups: u64,
    /// Sum of the request rounds (hops) of those lookups.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub dht_lookup_hops: u64,
    /// Local subscriptions.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub subscriptions: u64,
    /// Procedures this node serves.
    #[serde(default, deserialize_with = "crate::nil_default")]
    pub services: u64,
}

/// STATUS_REQUEST and STATUS_REPORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusMessage {
    Request(StatusRequest),
    Report(StatusReport),
}

impl StatusMessage {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            StatusMessage::Request(_) => Ok(()),
            StatusMessage::Report(r) => r.validate(),
        }
    }
}

impl StatusReport {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.refused.len() > MAX_REASON_LEN {
            return Err(format!(
                "refused is {} bytes, limit {MAX_REASON_LEN}",
                self.refused.len()
            ));
        }
        match &self.status {
            Some(_) if !self.refused.is_empty() => {
                Err("a report has a status or a refusal, not both".into())
            }
            Some(s) => s.validate(),
            None if self.refused.is_empty() => Err("a report without a status says why".into()),
            None => Ok(()),
        }
    }
}

impl NodeStatus {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.addrs.len() > MAX_LISTEN_ADDRS {
            return Err(format!(
                "{} addresses, limit {MAX_LISTEN_ADDRS}",
                self.addrs.len()
            ));
        }
        if self.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN) {
            return Err(format!("an address is over {MAX_ADDR_LEN} bytes"));
        }
        if self.agent.len() > MAX_AGENT_LEN {
            return Err(format!(
                "agent is {} bytes, limit {MAX_AGENT_LEN}",
                self.agent.len()
            ));
        }
        if self.reachability.len() > MAX_REACHABILITY_LEN {
            return Err(format!(
                "reachability is {} bytes, limit {MAX_REACHABILITY_LEN}",
                self.reachability.len()
            ));
        }
        if self.links.len() > MAX_STATUS_LINKS {
            return Err(format!(
                "{} links, limit {MAX_STATUS_LINKS}",
                self.links.len()
            ));
        }
        Ok(())
    }
}
