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
//! Services that need the DHT (pub/sub interest, RPC advertisements and
//! provider lookups) ask for it with `DhtReq`s, which `Process::pump`
//! runs on the node's own DHT core and answers with `DhtDone`; they ask
//! the engine for connections (dials, closes) the same way, and report
//! what the application sees as [`AppEvent`]s, which the engine checks.
//!
//! **Adding a core**: one adapter implementing [`Service`] in a module of
//! its own, one [`Frame`] variant and its message type (in `service.rs`), one field in `Process`, one arm in
//! `Process::deliver`, `Process::drain` and `Process::poll_timeout`, and its
//! checks in [`crate::check`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use std::collections::VecDeque;

use macula_dht::{
    Config, Contact, Dht, Ed25519Auth, Event, LookupId, LookupOutcome, PutId, RecordAuth,
};
use macula_pool::PoolTable;
use macula_wire::time::Millis;
use macula_wire::NodeId;

use crate::pubsub::PubSubService;
use crate::rpc::RpcService;
pub use crate::service::{sim_addr, AppEvent, DhtMsg, DownReason, Frame, Service, SimConn};
pub(crate) use crate::service::{DhtDone, DhtReq};

/// Which service asked for a DHT operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    PubSub,
    Rpc,
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
        // reset says nothing about the peer. A silent one is probed again
        // later (the partition may heal).
        match reason {
            DownReason::Shutdown => self.dht.peer_left(peer, now),
            DownReason::TimedOut => self.dht.peer_unreachable(peer, now),
            _ => {}
        }
    }

    fn handle_timeout(&mut self, now: Millis) {
        self.dht.handle_timeout(now);
    }

    fn poll_transmit(&mut self) -> Option<(NodeId, DhtMsg)> {
        self.dht
            .poll_transmit()
            .map(|o| (o.to.id, DhtMsg::Request(o.correlation_id, o.request)))
    }

    fn poll_timeout(&self) -> Option<Millis> {
        self.dht.poll_timeout()
    }
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
    /// The authenticator of a new process of this node. A real key signs
    /// and verifies through `memo` (shared by every node of one run).
    pub(crate) fn auth(&self, memo: &CryptoMemo) -> Box<dyn RecordAuth + Send> {
        match self {
            Identity::Key(secret) => Box::new(MemoAuth {
                inner: Ed25519Auth::new(SigningKey::from_bytes(secret)),
                id: *secret,
                memo: memo.clone(),
            }),
            Identity::Custom(shared) => Box::new(shared.clone()),
        }
    }
}

/// Signatures and verifications remembered per entry kind before the memory
/// is cleared (each entry is a 32-byte digest and at most a signature).
const MAX_MEMO_ENTRIES: usize = 1 << 20;

/// What one run's nodes already signed and verified. Ed25519 signing is
/// deterministic and verification a pure function of (publisher, message,
/// signature), so remembering their results changes no outcome: each
/// distinct signature is still made, and each distinct one checked, by the
/// real code once. Without it a 10,000-node run spends most of its time
/// verifying the same records again on every replica.
#[derive(Clone, Default)]
pub(crate) struct CryptoMemo(Arc<Mutex<MemoTables>>);

#[derive(Default)]
struct MemoTables {
    signed: HashMap<[u8; 32], Vec<u8>>,
    verified: HashMap<[u8; 32], bool>,
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        // Length-prefixed, so no two different tuples hash the same bytes.
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

fn bounded_insert<V>(map: &mut HashMap<[u8; 32], V>, k: [u8; 32], v: V) {
    if map.len() >= MAX_MEMO_ENTRIES {
        map.clear();
    }
    map.insert(k, v);
}

/// A node's real Ed25519 authenticator behind the run's [`CryptoMemo`].
struct MemoAuth {
    inner: Ed25519Auth,
    /// The key's secret, naming the signer in the memo.
    id: [u8; 32],
    memo: CryptoMemo,
}

impl RecordAuth for MemoAuth {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let k = digest(&[&self.id, msg]);
        let Ok(mut t) = self.memo.0.lock() else {
            return self.inner.sign(msg);
        };
        if let Some(sig) = t.signed.get(&k) {
            return sig.clone();
        }
        let sig = self.inner.sign(msg);
        bounded_insert(&mut t.signed, k, sig.clone());
        sig
    }

    fn verify(&self, publisher: &NodeId, msg: &[u8], signature: &[u8]) -> bool {
        let k = digest(&[publisher.as_bytes(), msg, signature]);
        let Ok(mut t) = self.memo.0.lock() else {
            return self.inner.verify(publisher, msg, signature);
        };
        if let Some(&ok) = t.verified.get(&k) {
            return ok;
        }
        let ok = self.inner.verify(publisher, msg, signature);
        bounded_insert(&mut t.verified, k, ok);
        ok
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
    pub(crate) pubsub: PubSubService,
    pub(crate) rpc: RpcService,
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
    /// DHT operations run for a service: whose, and its tag.
    lookups: HashMap<LookupId, (Owner, u64)>,
    puts: HashMap<PutId, (Owner, u64)>,
    /// DHT events no service claimed (for the engine).
    dht_events: VecDeque<Event>,
    /// Lookups a service was handed, for the engine's record checks.
    pub(crate) handed: Vec<LookupOutcome>,
}

/// Bounds the rounds of [`Process::pump`]: services feeding each other
/// through the DHT settle in a few; more is a livelock.
const MAX_PUMP_ROUNDS: usize = 1_000;

impl Process {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        own: Contact,
        auth: Box<dyn RecordAuth + Send>,
        seed: u64,
        max_connections: usize,
        epoch: u64,
        realm: &str,
    ) -> Process {
        let id = own.id;
        Process {
            dht: DhtService::new(Dht::new(config, own, auth, seed)),
            pubsub: PubSubService::new(id, epoch, realm),
            rpc: RpcService::new(id, realm, seed.rotate_left(17)),
            pool: PoolTable::new(id, max_connections, 0),
            dialing: HashMap::new(),
            armed: None,
            audited_stores: 0,
            bootstrap: Vec::new(),
            lookups: HashMap::new(),
            puts: HashMap::new(),
            dht_events: VecDeque::new(),
            handed: Vec::new(),
        }
    }

    /// Hands `frame` to its service; returns the immediate answer.
    pub(crate) fn deliver(&mut self, from: &Contact, frame: Frame, now: Millis) -> Option<Frame> {
        match frame {
            Frame::Dht(m) => self.dht.handle_frame(from, m, now).map(Frame::Dht),
            Frame::PubSub(m) => self.pubsub.handle_frame(from, m, now).map(Frame::PubSub),
            Frame::Rpc(m) => self.rpc.handle_frame(from, m, now).map(Frame::Rpc),
        }
    }

    pub(crate) fn peer_up(&mut self, peer: &Contact, now: Millis) {
        self.dht.handle_peer_up(peer, now);
        self.pubsub.handle_peer_up(peer, now);
        self.rpc.handle_peer_up(peer, now);
    }

    pub(crate) fn peer_down(&mut self, peer: &NodeId, reason: DownReason, now: Millis) {
        self.dht.handle_peer_down(peer, reason, now);
        self.pubsub.handle_peer_down(peer, reason, now);
        self.rpc.handle_peer_down(peer, reason, now);
    }

    /// A dial to `peer` failed; services waiting to reach it learn it
    /// (unless a connection came up the other way).
    pub(crate) fn dial_failed(&mut self, peer: &NodeId, now: Millis) {
        if self.pool.peek(peer).is_some() {
            return;
        }
        self.pubsub.handle_dial_failed(peer, now);
        self.rpc.handle_dial_failed(peer, now);
    }

    pub(crate) fn timeout(&mut self, now: Millis) {
        self.dht.handle_timeout(now);
        self.pubsub.handle_timeout(now);
        self.rpc.handle_timeout(now);
    }

    /// Moves work between the services until it settles: what pub/sub and
    /// RPC ask of the DHT is started, and what the DHT finished for them is
    /// handed back.
    pub(crate) fn pump(&mut self, now: Millis) {
        for _ in 0..MAX_PUMP_ROUNDS {
            self.pubsub.pump(now, &self.pool);
            self.rpc.pump(now, &self.pool);
            let mut moved = false;
            while let Some(r) = self.pubsub.poll_dht() {
                moved = true;
                self.dht_request(Owner::PubSub, r, now);
            }
            while let Some(r) = self.rpc.poll_dht() {
                moved = true;
                self.dht_request(Owner::Rpc, r, now);
            }
            while let Some(key) = self.pubsub.poll_unpublish() {
                self.dht.core_mut().unpublish(&key);
            }
            while let Some(ev) = self.dht.poll_event() {
                match ev {
                    Event::LookupFinished { id, outcome } => match self.lookups.remove(&id) {
                        Some((owner, tag)) => {
                            moved = true;
                            let records = outcome.records.clone();
                            self.handed.push(outcome);
                            let done = DhtDone::Got {
                                tag,
                                result: Ok(records),
                            };
                            self.dht_done(owner, done, now);
                        }
                        None => self
                            .dht_events
                            .push_back(Event::LookupFinished { id, outcome }),
                    },
                    Event::PutFinished { id, key, result } => match self.puts.remove(&id) {
                        Some((owner, tag)) => {
                            moved = true;
                            let result = result.map(|_| ()).map_err(|e| e.to_string());
                            self.dht_done(owner, DhtDone::Put { tag, result }, now);
                        }
                        None => self
                            .dht_events
                            .push_back(Event::PutFinished { id, key, result }),
                    },
                    other => self.dht_events.push_back(other),
                }
            }
            if !moved {
                return;
            }
        }
        tracing::warn!("services did not settle in {MAX_PUMP_ROUNDS} rounds");
    }

    fn dht_request(&mut self, owner: Owner, req: DhtReq, now: Millis) {
        match req {
            DhtReq::Get { key, tag } => match self.dht.core_mut().get(key, now) {
                Ok(id) => {
                    self.lookups.insert(id, (owner, tag));
                }
                Err(e) => {
                    let result = Err(e.to_string());
                    self.dht_done(owner, DhtDone::Got { tag, result }, now);
                }
            },
            DhtReq::Put {
                key,
                value,
                ttl,
                tag,
            } => match self.dht.core_mut().put(key, value, ttl, now) {
                Ok(id) => {
                    self.puts.insert(id, (owner, tag));
                }
                Err(e) => {
                    let result = Err(e.to_string());
                    self.dht_done(owner, DhtDone::Put { tag, result }, now);
                }
            },
        }
    }

    fn dht_done(&mut self, owner: Owner, done: DhtDone, now: Millis) {
        match owner {
            Owner::PubSub => self.pubsub.handle_dht(done, now),
            Owner::Rpc => self.rpc.handle_dht(done, now),
        }
    }

    /// A DHT event no service claimed.
    pub(crate) fn poll_dht_event(&mut self) -> Option<Event> {
        self.dht_events.pop_front()
    }

    /// The next frame any service wants sent.
    pub(crate) fn drain(&mut self) -> Option<(NodeId, Frame)> {
        if let Some((to, m)) = self.dht.poll_transmit() {
            return Some((to, Frame::Dht(m)));
        }
        if let Some((to, m)) = self.pubsub.poll_transmit() {
            return Some((to, Frame::PubSub(m)));
        }
        self.rpc.poll_transmit().map(|(to, m)| (to, Frame::Rpc(m)))
    }

    /// A peer a service wants a connection to.
    pub(crate) fn poll_dial(&mut self) -> Option<NodeId> {
        self.pubsub.poll_dial().or_else(|| self.rpc.poll_dial())
    }

    /// A peer whose connection a service wants closed.
    pub(crate) fn poll_close(&mut self) -> Option<NodeId> {
        self.rpc.poll_close()
    }

    /// The next thing the application saw.
    pub(crate) fn poll_app(&mut self) -> Option<AppEvent> {
        self.pubsub.poll_app().or_else(|| self.rpc.poll_app())
    }

    /// The earliest timer of any service.
    pub(crate) fn poll_timeout(&self) -> Option<Millis> {
        [
            self.dht.poll_timeout(),
            self.pubsub.poll_timeout(),
            self.rpc.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
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
