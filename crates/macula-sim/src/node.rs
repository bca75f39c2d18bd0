//! One simulated node: what survives a crash (identity key, epoch), and the
//! process state that does not (the cores, the pool, dials in progress).
//!
//! A node is a set of *services*, each a real core behind the [`Service`]
//! shape the runtime's services have: frames in (with an immediate answer on
//! the same connection), peer-up and peer-down events, one timer, frames out.
//! The engine feeds every service of a node and drains all of them after
//! each input; it knows no protocol beyond the [`Frame`] enum that routes a
//! frame to its service.
//!
//! **Adding a core** (the pub/sub and RPC cores, when they land): one
//! adapter implementing [`Service`] in a module of its own, one [`Frame`]
//! variant, one field in `Process`, one arm in `Process::deliver`,
//! `Process::drain` and `Process::poll_timeout`, and its checks in
//! [`crate::check`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use macula_dht::{
    Config, Contact, CorrelationId, Dht, Ed25519Auth, Event, RecordAuth, Request, Response,
};
use macula_pool::{PoolTable, Pooled};
use macula_wire::time::Millis;
use macula_wire::NodeId;

/// Why a node lost its connection to a peer (what the runtime's connection
/// driver learns from quinn).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// This node's pool evicted or replaced the connection.
    Evicted,
    /// The peer closed it (its pool evicted it, or it lost a duplicate
    /// tie-break).
    Closed,
    /// Nothing got through for the transport idle timeout: the peer died, or
    /// a partition cut it off.
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
    fn poll_transmit(&mut self) -> Option<(Contact, Self::Msg)>;
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// For the DHT core.
    Dht(DhtMsg),
}

/// The DHT core (`macula_dht::Dht`) as a [`Service`], exactly as the
/// runtime's DHT task drives it: requests answered at once, peers that time
/// out or say goodbye dropped with `peer_left`, events kept for the
/// application (the engine).
pub struct DhtService {
    dht: Dht,
}

impl DhtService {
    fn new(dht: Dht) -> DhtService {
        DhtService { dht }
    }

    /// The core, read-only.
    pub fn core(&self) -> &Dht {
        &self.dht
    }

    /// The core, for commands (`put`, `get`, ...); drain the node after.
    pub fn core_mut(&mut self) -> &mut Dht {
        &mut self.dht
    }

    /// The next event of the core.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.dht.poll_event()
    }
}

impl Service for DhtService {
    type Msg = DhtMsg;

    fn handle_frame(&mut self, from: &Contact, msg: DhtMsg, now: Millis) -> Option<DhtMsg> {
        match msg {
            DhtMsg::Request(cid, request) => self
                .dht
                .handle_request(from, request, now)
                .ok()
                .map(|r| DhtMsg::Response(cid, r)),
            DhtMsg::Response(cid, response) => {
                self.dht.handle_response(&from.id, cid, response, now);
                None
            }
        }
    }

    fn handle_peer_up(&mut self, _peer: &Contact, _now: Millis) {
        // The runtime tells the DHT nothing on connect: contacts are learned
        // from requests and answers, which prove the peer serves the DHT.
    }

    fn handle_peer_down(&mut self, peer: &NodeId, reason: DownReason, now: Millis) {
        // Same rule as the runtime's connection driver: only a goodbye or a
        // transport timeout means the peer left the mesh; an eviction or a
        // reset says nothing about the peer.
        if matches!(reason, DownReason::Shutdown | DownReason::TimedOut) {
            self.dht.peer_left(peer, now);
        }
    }

    fn handle_timeout(&mut self, now: Millis) {
        self.dht.handle_timeout(now);
    }

    fn poll_transmit(&mut self) -> Option<(Contact, DhtMsg)> {
        self.dht
            .poll_transmit()
            .map(|o| (o.to, DhtMsg::Request(o.correlation_id, o.request)))
    }

    fn poll_timeout(&self) -> Option<Millis> {
        self.dht.poll_timeout()
    }
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

/// How a node signs and checks records.
pub(crate) enum Identity {
    /// The real thing: an Ed25519 key (its 32-byte secret), from which the
    /// node ID derives. Survives crashes, like the runtime's `node.key`.
    Key([u8; 32]),
    /// A caller-supplied authenticator (protocol tests, injected faults),
    /// shared by every incarnation of the node.
    Custom(SharedAuth),
}

impl Identity {
    pub(crate) fn auth(&self) -> Box<dyn RecordAuth + Send> {
        match self {
            Identity::Key(secret) => Box::new(Ed25519Auth::new(SigningKey::from_bytes(secret))),
            Identity::Custom(shared) => Box::new(shared.clone()),
        }
    }
}

/// A caller's [`RecordAuth`], kept across restarts (the core takes a box).
#[derive(Clone)]
pub(crate) struct SharedAuth(pub(crate) Arc<Mutex<Box<dyn RecordAuth + Send>>>);

impl RecordAuth for SharedAuth {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.0.lock().map(|a| a.sign(msg)).unwrap_or_default()
    }
    fn verify(&self, publisher: &NodeId, msg: &[u8], signature: &[u8]) -> bool {
        self.0
            .lock()
            .is_ok_and(|a| a.verify(publisher, msg, signature))
    }
}

/// A dial in progress and the frames waiting for it.
pub(crate) struct Dialing {
    pub(crate) conn: usize,
    pub(crate) queued: Vec<Frame>,
}

/// What a crash loses: the running process.
pub(crate) struct Process {
    pub(crate) dht: DhtService,
    pub(crate) pool: PoolTable<SimConn>,
    pub(crate) dialing: HashMap<usize, Dialing>,
    /// The time the node's timer is armed for (stale timer events are
    /// ignored).
    pub(crate) armed: Option<Millis>,
    /// `records_stored` when the store was last audited.
    pub(crate) audited_stores: u64,
    /// Bootstrap peers (indices) the node keeps connected, and whether the
    /// DHT was seeded with each since its connection last came up.
    pub(crate) bootstrap: Vec<(usize, bool)>,
}

impl Process {
    pub(crate) fn new(
        config: Config,
        own: Contact,
        auth: Box<dyn RecordAuth + Send>,
        seed: u64,
        max_connections: usize,
    ) -> Process {
        let id = own.id;
        Process {
            dht: DhtService::new(Dht::new(config, own, auth, seed)),
            pool: PoolTable::new(id, max_connections, 0),
            dialing: HashMap::new(),
            armed: None,
            audited_stores: 0,
            bootstrap: Vec::new(),
        }
    }

    /// Hands `frame` to its service; returns the immediate answer.
    pub(crate) fn deliver(&mut self, from: &Contact, frame: Frame, now: Millis) -> Option<Frame> {
        match frame {
            Frame::Dht(m) => self.dht.handle_frame(from, m, now).map(Frame::Dht),
        }
    }

    pub(crate) fn peer_up(&mut self, peer: &Contact, now: Millis) {
        self.dht.handle_peer_up(peer, now);
    }

    pub(crate) fn peer_down(&mut self, peer: &NodeId, reason: DownReason, now: Millis) {
        self.dht.handle_peer_down(peer, reason, now);
    }

    pub(crate) fn timeout(&mut self, now: Millis) {
        self.dht.handle_timeout(now);
    }

    /// The next frame any service wants sent.
    pub(crate) fn drain(&mut self) -> Option<(Contact, Frame)> {
        self.dht.poll_transmit().map(|(c, m)| (c, Frame::Dht(m)))
    }

    /// The earliest timer of any service.
    pub(crate) fn poll_timeout(&self) -> Option<Millis> {
        self.dht.poll_timeout()
    }
}

/// One node: what persists, and the process if it runs.
pub(crate) struct SimNode {
    pub(crate) contact: Contact,
    pub(crate) identity: Identity,
    pub(crate) config: Config,
    /// Persisted across restarts and raised at every start (a publisher's
    /// epoch, which the runtime keeps in its data directory).
    pub(crate) epoch: u64,
    /// Which process this is (0 = never started); frames and timers of an
    /// earlier process are dropped.
    pub(crate) incarnation: u32,
    pub(crate) process: Process,
    pub(crate) alive: bool,
}
