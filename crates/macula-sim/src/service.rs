//! What a simulated node's services and the engine share: the [`Service`]
//! shape, the frames and DHT requests that travel between them, what the
//! application sees ([`AppEvent`]) and the connections a pool holds. It
//! imports no service, so the node (`node.rs`) and the service adapters
//! (`pubsub.rs`, `rpc.rs`) both depend on it and not on each other.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use bytes::Bytes;
use macula_dht::{Contact, CorrelationId, Record, Request, Response};
use macula_pool::Pooled;
use macula_rpc::CallFailure;
use macula_wire::time::Millis;
use macula_wire::{NodeId, RpcMessage};

/// Why a node lost its connection to a peer (what the runtime's connection
/// driver learns from quinn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// This node's pool evicted or replaced the connection.
    Evicted,
    /// The peer closed it (its pool evicted it, or it lost a duplicate
    /// tie-break).
    Closed,
    /// Nothing got through for the failure detector's bound: the peer died,
    /// or a partition cut it off.
    TimedOut,
    /// The peer said goodbye: it is leaving the mesh.
    Shutdown,
    /// The peer restarted and answered a packet of the old connection with a
    /// stateless reset.
    Reset,
}

/// A real core as the simulator drives it: the shape of the runtime's
/// service plug-ins. Inputs are `handle_*`, outputs are drained with
/// [`Service::poll_transmit`] until `None` after every input, and one timer
/// is re-armed from [`Service::poll_timeout`].
pub trait Service {
    /// The service's own messages (what its frames carry).
    type Msg;
    /// A frame from `from`; an immediate answer goes back on the connection
    /// the frame came on (as the runtime answers on the arriving stream).
    fn handle_frame(&mut self, from: &Contact, msg: Self::Msg, now: Millis) -> Option<Self::Msg>;
    /// A connection to `peer` came up.
    fn handle_peer_up(&mut self, peer: &Contact, now: Millis);
    /// The last connection to `peer` went away, for `reason`.
    fn handle_peer_down(&mut self, peer: &NodeId, reason: DownReason, now: Millis);
    /// The timer from [`Service::poll_timeout`] fired (harmless early).
    fn handle_timeout(&mut self, now: Millis);
    /// The next frame to send, and to whom.
    fn poll_transmit(&mut self) -> Option<(NodeId, Self::Msg)>;
    /// When [`Service::handle_timeout`] next needs to run.
    fn poll_timeout(&self) -> Option<Millis>;
}

/// DHT frames: requests and responses under a correlation ID (the runtime
/// maps them to `DHT_*` wire messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DhtMsg {
    /// A request to answer.
    Request(CorrelationId, Request),
    /// The answer to our request.
    Response(CorrelationId, Response),
}

/// What travels between simulated nodes: one variant per service.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// For the DHT core.
    Dht(DhtMsg),
    /// For the pub/sub core (a data stream's PUBLISH_BATCH).
    PubSub(PubSubMsg),
    /// For the RPC core (control-stream messages, probes).
    Rpc(RpcMsg),
}

impl Frame {
    /// Whether the network may deliver this frame twice. RPC messages
    /// travel on the QUIC control stream, whose data QUIC delivers at most
    /// once while the connection lives (a connection lost mid-call loses
    /// frames, which the network models with loss); DHT requests and
    /// answers, and pub/sub batches, must survive duplicates (the DHT
    /// ignores a repeated answer, pub/sub deduplicates by `(epoch, seq)`).
    pub fn may_duplicate(&self) -> bool {
        !matches!(self, Frame::Rpc(_))
    }
}

/// A DHT operation a service asks of its node's DHT core; the result comes
/// back as a [`DhtDone`] with the same tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DhtReq {
    /// Get the records under `key` (a fresh lookup, as `get_fresh`).
    Get { key: NodeId, tag: u64 },
    /// Put (and keep republishing) `value` under `key`.
    Put {
        key: NodeId,
        value: Vec<u8>,
        ttl: Millis,
        tag: u64,
    },
}

/// The outcome of a [`DhtReq`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DhtDone {
    /// The records found, or why the lookup could not start.
    Got {
        tag: u64,
        result: Result<Vec<Record>, String>,
    },
    /// Whether the put reached its quorum.
    Put {
        tag: u64,
        result: Result<(), String>,
    },
}

/// What a node's application sees of pub/sub and RPC: the engine checks
/// every one against the oracles of [`crate::check`] as it happens.
#[derive(Clone, Debug, PartialEq)]
pub enum AppEvent {
    /// A publish went out as `(epoch, seq)`.
    Published {
        /// Its topic.
        topic: String,
        /// The publisher's epoch.
        epoch: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// An event reached subscription `sub`.
    Delivered {
        /// The application's subscription.
        sub: u64,
        /// Who published it.
        publisher: NodeId,
        /// Publisher epoch.
        epoch: u64,
        /// Sequence number.
        seq: u64,
        /// Its topic.
        topic: String,
    },
    /// A CALL of the application's call `app` went to `provider`.
    CallSent {
        /// The application's call.
        app: u64,
        /// Where it went.
        provider: NodeId,
    },
    /// This node ran its handler for `caller`'s call `app`.
    Ran {
        /// The calling node.
        caller: NodeId,
        /// The call (from its payload).
        app: u64,
    },
    /// The application's call `app` ended.
    CallDone {
        /// The call.
        app: u64,
        /// Who answered with which call's payload, or why it failed.
        result: CallResult,
    },
}

/// A simulated connection, as each end's pool holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConn {
    /// The node at the other end.
    pub peer: NodeId,
    /// Its index in the simulation.
    pub peer_index: usize,
    /// The other end's incarnation when the connection was made: frames on
    /// it reach only that process.
    pub peer_incarnation: u32,
    /// Unique in the whole run; both ends use the same number.
    pub conn: usize,
    /// This end dialed.
    pub outbound: bool,
    /// The peer is one of this node's bootstrap peers, whose connection the
    /// node keeps (never evicted), as the runtime's supervisor does.
    pub kept: bool,
}

impl Pooled for SimConn {
    fn node_id(&self) -> NodeId {
        self.peer
    }
    fn outbound(&self) -> bool {
        self.outbound
    }
    fn conn_id(&self) -> usize {
        self.conn
    }
    fn kept(&self) -> bool {
        self.kept
    }
    fn client(&self) -> bool {
        false
    }
    fn addr(&self) -> SocketAddr {
        sim_addr(self.peer_index)
    }
}

/// Node `i`'s made-up socket address (198.18.0.0/15, the benchmarking range,
/// then further ports past 131,072 nodes).
pub fn sim_addr(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::from(0xC612_0000 | (i as u32 & 0x1_FFFF));
    SocketAddr::V4(SocketAddrV4::new(ip, 4433 + (i >> 17) as u16))
}
/// Pub/sub frames: the body of one frame a data stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PubSubMsg {
    /// One PUBLISH_BATCH body.
    Batch(Bytes),
    /// One PUBLISH_DROPPED body (a loss report).
    Dropped(Bytes),
}

/// RPC frames: the control-stream messages, plus the transport's PING and
/// PONG that a probe uses.
#[derive(Clone, Debug, PartialEq)]
pub enum RpcMsg {
    /// CALL, REPLY, CALL_ERROR, CANCEL.
    Rpc(RpcMessage),
    /// A liveness probe (answered by the transport, not the core).
    Ping(u64),
    /// Its answer.
    Pong(u64),
}

/// What a finished call gives the application: who answered and the call
/// number their answer carried, or why it failed.
pub type CallResult = Result<(NodeId, u64), CallFailure<NodeId>>;
