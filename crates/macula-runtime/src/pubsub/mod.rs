//! Pub/sub on one node: the tokio driver of `macula_pubsub::PubSubCore`.
//!
//! Every decision (who is interested, where a message goes, sequence
//! numbers, queue limits, batch sizes, when a peer is cut off or set aside
//! as unreachable, what an inbound batch delivers) is the core's. This
//! driver holds the core behind one mutex (as quinn holds its protocol
//! connection), feeds it the clock (`Clock`), the network and the DHT, and
//! does what it asks (`Action`s): start or wake a peer's sender
//! (`sender.rs`), look interest up or put a record (`node.rs`). Deliveries
//! are pushed into subscription queues after the mutex is released, and a
//! subscriber is woken outside any lock.
//!
//! Roles are separate types around the same core: the full node's DHT link
//! (`node.rs`, which is also the gateway of attached clients: `gateway.rs`),
//! and the lightweight client's link to its gateway (`client.rs`).
//!
//! Flow control from publishers: a publish whose `Overflow` is `Block` (the
//! default) and that finds an interested node's queue full waits on `room`,
//! outside the core's lock, for that node's sender to take the queue (or for
//! the node to be cut off after the stall timeout), then tries again; the
//! other policies are the core's.
//!
//! Flow control towards applications: each subscription queue is bounded
//! (`Limits::queue_capacity`, default 65,536, and `queue_bytes`). A
//! subscriber that falls behind loses its *oldest* events, never blocks the
//! publisher or other subscribers, and is told: the stream yields
//! `SubscriptionItem::Lagged(n)` before the next event. Every drop is counted.
//!
//! This module must not block on a subscriber, hold the core's lock across
//! an await, or decide anything the core can.

mod client;
mod gateway;
mod node;
mod sender;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use macula_pubsub::{
    Action, BatchReceiver, BoundedQueue, Config, Deliveries, Interest, Limits, Millis, Pattern,
    PubSubCore, Role as CoreRole,
};
use macula_wire::{DisconnectReason, ErrorCode, Message, MessageType, NodeId};
use tokio::sync::Notify;

use crate::authz::{Authz, Denied};
use crate::clock::Clock;
use crate::framed::FrameReader;
use crate::metrics::ProtocolErrorKind;
use crate::peer::Peer;
use crate::service::{Answer, PeerDown, Serves, Service, ServiceFuture};
use macula_auth::Action as Perm;

pub use crate::config::PEER_STALL_TIMEOUT;
pub(crate) use client::Upstream;
pub use macula_pubsub::{
    Event, Overflow, Proof, PubSubError, PublishOptions, SubscriptionItem, TopicName,
};
pub(crate) use node::MeshLink;

/// Counters (the core's), registered in the node's metrics registry.
pub type PubSubCounters = macula_pubsub::Counters;

/// The delivery bound: how long a publisher reuses what it learned about
/// interest in a topic (see `macula_pubsub::interest::INTEREST_CACHE_TTL`).
pub const INTEREST_CACHE_TTL: Duration = macula_pubsub::interest::INTEREST_CACHE_TTL.to_duration();
/// First byte of a unidirectional stream that carries pub/sub data
/// (PUBLISH_BATCH frames from the opener). See docs/PROTOCOL.md §3.
pub const STREAM_KIND_PUBSUB: u8 = 0x01;

/// What one queued event weighs besides its payload, for the byte limit of
/// subscription queues (`Limits::queue_bytes`).
const EVENT_OVERHEAD: usize = std::mem::size_of::<Event>();

/// One in this many events a subscription takes has its queue wait
/// observed in `macula_pubsub_delivery_wait_seconds` (the first always):
/// a clock read and a histogram update per event would cost the hot path
/// more than the estimate gains.
pub const DELIVERY_WAIT_SAMPLE: u32 = 8;

/// A queued event and when it was queued (arrived at the node, or was
/// published locally): one clock read per publish or received batch.
type Queued = (Event, Instant);

/// The core as this driver instantiates it: subscriptions deliver into
/// `SubQueue`s, senders are woken through a `Notify`.
type Core = PubSubCore<Arc<SubQueue>, Arc<Notify>>;

/// One attempt of a full node's publish.
enum Try {
    Done(Result<macula_pubsub::Published, PubSubError>),
    /// `Overflow::Block` and an interested node's queue is full.
    Blocked,
    /// No fresh route cached: look interest up first.
    NoRoute,
}

/// How pub/sub reaches other nodes: implemented by the node runtime (the
/// pool, then the DHT for an address) and by a client (its gateway).
pub(crate) trait Mesh: Send + Sync {
    /// A connection to `id`, dialing (after finding it in the DHT) if needed.
    fn reach(&self, id: NodeId) -> BoxFuture<'static, Option<Peer>>;
}

/// One subscription's queue: filled by the driver (outside the core's
/// lock), drained by its `Subscription`.
pub(crate) struct SubQueue {
    queue: Mutex<BoundedQueue<Queued>>,
    waker: AtomicWaker,
    closed: AtomicBool,
    /// A data stream's reader waits for room here (see `push_waiting`);
    /// the subscription notifies after taking an event while this is set.
    room: Notify,
    waiting: AtomicBool,
    /// Took nothing for the subscriber bound: readers no longer wait for
    /// it (its full queue drops its oldest, told as `Lagged`) until it has
    /// caught up to half its queue.
    lossy: AtomicBool,
    /// The node's `macula_pubsub_delivery_wait_seconds` histogram.
    wait: macula_pubsub::counters::DeliveryWait,
    /// Events carrying this header (name, value) are not queued here: a
    /// stream's capture does not take the stream's own republished events
    /// (which would otherwise fill its queue and be told as `Lagged`).
    skip: Option<(String, String)>,
}

impl SubQueue {
    fn lock(&self) -> MutexGuard<'_, BoundedQueue<Queued>> {
        self.queue.lock()
    }

    /// Whether `e` is queued here (see `skip`).
    fn wants(&self, e: &Event) -> bool {
        match &self.skip {
            None => true,
            Some((k, v)) => !e.headers.iter().any(|(hk, hv)| hk == k && hv == v),
        }
    }

    /// Leaves out of `events` those not queued here.
    fn keep_wanted(&self, events: &mut Vec<Event>) {
        if self.skip.is_some() {
            events.retain(|e| self.wants(e));
        }
    }
}

/// The role-specific half of the driver (see the module docs).
pub(crate) enum Role {
    Local,
    /// A full node: interest lives in the DHT.
    Node(crate::dht::DhtHandle),
    /// A client: interest is registered by its gateway.
    Client(Box<dyn Upstream>),
}

pub(crate) struct Inner {
    core: Mutex<Core>,
    counters: Arc<PubSubCounters>,
    max_payload: usize,
    limits: Limits,
    clock: Clock,
    role: Role,
    /// Reaches peers for the senders (`None`: local only).
    mesh: Option<Box<dyn Mesh>>,
    /// Notified whenever an interest lookup or put finishes.
    interest: Notify,
    /// Notified whenever a peer queue may have room again (a sender took
    /// it, or it was retired): publishes waiting under `Overflow::Block`.
    room: Notify,
    /// The longest a write may accept nothing before its peer is cut off:
    /// the longest one publish waits for room before it looks again.
    stall_timeout: Duration,
    /// The realm's permissions (a full node of a realm with an authority).
    authz: Option<Arc<Authz>>,
    /// What this node's (or client's) own application may do: the node's
    /// `authz`, or a client's view of its own grant.
    own: Option<Arc<Authz>>,
    /// This node (or client): the `macula.node` attribute of its spans.
    node_id: NodeId,
    /// End-to-end keys (a realm with an authority): publishes seal,
    /// subscriptions open. Set once, right after construction.
    e2e: std::sync::OnceLock<Arc<crate::e2e::E2e>>,
}

impl Inner {
    fn now(&self) -> Millis {
        self.clock.now()
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock()
    }
}

/// A node's pub/sub. Cheap to clone.
#[derive(Clone)]
pub struct PubSub(Arc<Inner>);

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("subscriptions", &self.0.counters.subscriptions.get())
            .finish()
    }
}

/// The core's configuration for node `node_id` publishing under `epoch`
/// (the node's epoch: it grows across restarts, see `clock.rs`); the
/// constructor sets the role.
pub(crate) fn config(
    node_id: NodeId,
    epoch: u64,
    max_frame_size: u32,
    limits: Limits,
    realm: &str,
    stall_timeout: Duration,
) -> Config {
    let mut c = Config::new(node_id, epoch, realm, CoreRole::Local, max_frame_size);
    c.limits = limits;
    c.require_proof = limits.proofs;
    c.out.stall_timeout = Millis::from_duration(stall_timeout);
    c.interest.record_max = macula_dht::config::MAX_VALUE_LEN;
    c
}

impl PubSub {
    /// Pub/sub for node `node_id` that delivers in this process only;
    /// payloads up to `max_frame_size` minus `FRAME_HEADROOM`.
    pub fn new(node_id: NodeId, max_frame_size: u32, limits: Limits) -> PubSub {
        let epoch = crate::clock::wall_ms();
        let config = config(
            node_id,
            epoch,
            max_frame_size,
            limits,
            "",
            PEER_STALL_TIMEOUT,
        );
        Self::build(config, Clock::new(), Role::Local, None, (None, None))
    }

    /// A full node's pub/sub (and the gateway of its attached clients).
    pub(crate) fn node(config: Config, clock: Clock, link: MeshLink) -> PubSub {
        let config = Config {
            role: CoreRole::Node,
            realm: link.realm,
            ..config
        };
        Self::build(
            config,
            clock,
            Role::Node(link.dht),
            Some(link.mesh),
            (link.authz.clone(), link.authz),
        )
    }

    /// A lightweight client's pub/sub: through `gateway`, its only peer.
    /// `own`: the client's view of its own grant (checks its own requests).
    pub(crate) fn client(
        config: Config,
        up: Box<dyn Upstream>,
        gateway: Box<dyn Mesh>,
        own: Option<Arc<Authz>>,
    ) -> PubSub {
        let config = Config {
            role: CoreRole::Client,
            ..config
        };
        Self::build(
            config,
            Clock::new(),
            Role::Client(up),
            Some(gateway),
            (None, own),
        )
    }

    fn build(
        config: Config,
        clock: Clock,
        role: Role,
        mesh: Option<Box<dyn Mesh>>,
        (authz, own): (Option<Arc<Authz>>, Option<Arc<Authz>>),
    ) -> PubSub {
        let limits = config.limits;
        let stall_timeout = config.out.stall_timeout.to_duration();
        let node_id = config.node_id;
        let core = Core::new(config);
        PubSub(Arc::new(Inner {
            counters: core.counters().clone(),
            max_payload: core.max_payload(),
            core: Mutex::new(core),
            limits,
            clock,
            role,
            mesh,
            interest: Notify::new(),
            room: Notify::new(),
            stall_timeout,
            authz,
            own,
            node_id,
            e2e: std::sync::OnceLock::new(),
        }))
    }

    /// Seals payloads on the realm's encrypted topics with `e2e`'s keys.
    pub(crate) fn set_e2e(&self, e2e: Arc<crate::e2e::E2e>) {
        let _ = self.0.e2e.set(e2e);
    }

    /// The end-to-end keys, in a realm with an authority.
    pub(crate) fn e2e(&self) -> Option<&Arc<crate::e2e::E2e>> {
        self.0.e2e.get()
    }

    /// A local subscription whose events are not opened: payloads on
    /// encrypted topics come sealed, as carried (a stream capturing them
    /// stores them so; its readers open them). Events carrying header
    /// `skip` (name, value) are never queued to it: not delivered, not
    /// counted, never the cause of a `Lagged`.
    pub(crate) fn subscribe_carried(
        &self,
        pattern: &str,
        skip: Option<(String, String)>,
    ) -> Result<Subscription, PubSubError> {
        self.subscribe_inner(pattern, false, skip).map(|(s, _)| s)
    }

    /// `payload` as it leaves this edge: sealed on an encrypted topic.
    pub(crate) fn seal(&self, topic: &str, payload: Bytes) -> Result<Bytes, PubSubError> {
        match self.0.e2e.get() {
            None => Ok(payload),
            Some(e) => e.seal(topic, payload).map_err(|e| PubSubError::Sealing {
                topic: topic.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// The realm's permissions, in a realm with an authority.
    pub(crate) fn authz(&self) -> Option<&Arc<Authz>> {
        self.0.authz.as_ref()
    }

    /// Whether this node's own application may do `action` on `name`.
    fn allowed_here(&self, action: Perm, name: &str) -> Result<(), PubSubError> {
        match &self.0.own {
            None => Ok(()),
            Some(a) => a.local(action, name).map_err(unauthorized),
        }
    }

    pub fn counters(&self) -> &Arc<PubSubCounters> {
        &self.0.counters
    }

    /// Checks payload and options before any lookup is started for them.
    fn check(&self, payload: &Bytes, opts: &PublishOptions) -> Result<(), PubSubError> {
        self.0.core().check(payload, opts)
    }

    /// Largest payload `publish` accepts.
    pub fn max_payload(&self) -> usize {
        self.0.max_payload
    }

    /// Releases the core and does what it asked for (a publish on the hot
    /// path usually finds nothing to do).
    fn after(&self, mut core: MutexGuard<'_, Core>) {
        let Some(first) = core.poll_action() else {
            return;
        };
        // Usually one (a sender's wake): no allocation for it.
        let rest: Vec<_> = match core.has_actions() {
            true => std::iter::from_fn(|| core.poll_action()).collect(),
            false => Vec::new(),
        };
        drop(core);
        self.act(first);
        for a in rest {
            self.act(a);
        }
    }

    fn act(&self, action: Action<Arc<Notify>>) {
        let rt = tokio::runtime::Handle::try_current();
        match action {
            Action::Wake(w) => w.notify_one(),
            Action::Start { peer, node, sender } => match (&rt, &self.0.mesh) {
                (Ok(rt), Some(_)) => {
                    rt.spawn(sender::run(Arc::downgrade(&self.0), peer, node, sender));
                }
                _ => {
                    // No runtime or no way to reach anyone: what was queued
                    // is dropped, and counted.
                    tracing::debug!(peer = %node, "pub/sub cannot send here; queue dropped");
                    self.0.core().handle_unreachable(peer, self.0.now());
                    self.room_freed();
                }
            },
            Action::LookupInterest { name, key } => self.lookup_interest(name, key),
            Action::PutInterest(put) => self.put_interest(put),
        }
    }

    /// Pushes a publish's local deliveries into their queues and wakes them.
    fn push(&self, out: Deliveries<Arc<SubQueue>>) {
        let c = &self.0.counters;
        let at = Instant::now();
        for (q, event) in out {
            if !q.wants(&event) {
                continue;
            }
            let size = event.payload.len() + EVENT_OVERHEAD;
            let dropped = q.lock().push_sized((event, at), size);
            c.dropped_slow_total.inc_by(dropped);
            c.delivered_local_total.inc();
            q.waker.wake();
        }
    }

    fn new_queue(&self, skip: Option<(String, String)>) -> Arc<SubQueue> {
        Arc::new(SubQueue {
            queue: Mutex::new(BoundedQueue::with_limits(&self.0.limits)),
            waker: AtomicWaker::new(),
            closed: AtomicBool::new(false),
            room: Notify::new(),
            waiting: AtomicBool::new(false),
            lossy: AtomicBool::new(false),
            wait: self.0.counters.delivery_wait.clone(),
            skip,
        })
    }

    /// Subscribes to `pattern` (`*` one segment, `**` any number). Events
    /// published after this returns are delivered; dropping the subscription
    /// unsubscribes. The mesh learns of it in the background (use
    /// `subscribe_mesh` to wait until it has).
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        self.subscribe_inner(pattern, true, None).map(|(s, _)| s)
    }

    fn subscribe_inner(
        &self,
        pattern: &str,
        open: bool,
        skip: Option<(String, String)>,
    ) -> Result<(Subscription, Interest), PubSubError> {
        self.allowed_here(Perm::Subscribe, pattern)?;
        let queue = self.new_queue(skip);
        let mut core = self.0.core();
        let s = core.subscribe(pattern, queue.clone())?;
        self.after(core);
        let sub = Subscription {
            id: s.id,
            pattern: s.pattern,
            queue,
            owner: Arc::downgrade(&self.0),
            taken: 0,
            e2e: if open {
                self.0.e2e.get().cloned()
            } else {
                None
            },
        };
        Ok((sub, s.interest))
    }

    /// Subscribes and, in a mesh, returns once the mesh knows (the interest
    /// record is in the DHT, or the gateway acknowledged it), so publishers
    /// can find this node.
    pub async fn subscribe_mesh(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        self.subscribe_mesh_as(pattern, true).await
    }

    /// A **tap**: a mesh subscription whose events are not opened, so
    /// payloads on end-to-end encrypted topics come as the mesh carries
    /// them (the sealed envelope, `macula_auth::keys`): what a gateway or
    /// a forwarding node sees. A diagnostic (and what the tests assert the
    /// bytes of); applications subscribe.
    pub async fn tap_mesh(&self, pattern: &str) -> Result<Subscription, PubSubError> {
        self.subscribe_mesh_as(pattern, false).await
    }

    async fn subscribe_mesh_as(
        &self,
        pattern: &str,
        open: bool,
    ) -> Result<Subscription, PubSubError> {
        let (sub, interest) = self.subscribe_inner(pattern, open, None)?;
        match self.announce(interest).await {
            Ok(()) => Ok(sub),
            // Dropping the subscription takes the pattern back out.
            Err(reason) => Err(PubSubError::Interest {
                pattern: pattern.to_string(),
                reason,
            }),
        }
    }

    /// Waits until the mesh has taken in a subscription change.
    async fn announce(&self, interest: Interest) -> Result<(), String> {
        match (interest, &self.0.role) {
            (Interest::None, _) => Ok(()),
            (Interest::Record { name, changes }, _) => self.record_stored(&name, changes).await,
            (Interest::Upstream { pattern, on }, Role::Client(up)) => {
                up.interest(pattern, on).await
            }
            (Interest::Upstream { .. }, _) => Ok(()),
        }
    }

    /// Runs `f` on the core (one lock), does what it asked for, then pushes
    /// the local deliveries it made (outside the lock).
    fn run<T>(&self, f: impl FnOnce(&mut Core, Millis, &mut Deliveries<Arc<SubQueue>>) -> T) -> T {
        let mut out = Vec::new();
        let now = self.0.now();
        let mut core = self.0.core();
        let r = f(&mut core, now, &mut out);
        self.after(core);
        self.push(out);
        r
    }

    /// Publishes `payload` on `topic` (no wildcards) to the matching
    /// subscriptions **of this node only** (and its attached clients).
    /// Returns the sequence number.
    pub fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        mut opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        self.allowed_here(Perm::Publish, topic)?;
        let payload = self.seal(topic, payload)?;
        let _span = self.publish_span(topic, &mut opts);
        self.run(|core, now, out| core.publish_local(topic, payload, opts, now, out))
            .map(|p| p.seq)
    }

    /// Publishes to every matching subscription in the mesh: local ones in
    /// process, and one copy per other interested node (found through the
    /// DHT, cached for `INTEREST_CACHE_TTL`; a client sends it to its
    /// gateway). Returns the sequence number.
    pub async fn publish_mesh(
        &self,
        topic: &str,
        payload: Bytes,
        mut opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        self.allowed_here(Perm::Publish, topic)?;
        let payload = self.seal(topic, payload)?;
        // The decision inline (no span built, nothing returned by value
        // for an untraced publish); the span only for a sampled one.
        if crate::trace::sampled_here(&opts.headers) {
            if let Some(span) =
                crate::trace::publish_span_sampled(&mut opts.headers, topic, &self.0.node_id)
            {
                // Its context is current while the publish runs: a DHT
                // lookup for the route is its child. Boxed: the context
                // wrappers would otherwise move the whole publish future
                // (kilobytes) at each layer of nesting.
                return span
                    .in_context(Box::pin(self.publish_mesh_inner(topic, payload, opts)))
                    .await;
            }
        }
        self.publish_mesh_inner(topic, payload, opts).await
    }

    /// [`PubSub::publish_mesh`] with the payload as given, never sealed
    /// end to end: what a node carrying another's message does. A
    /// diagnostic (the tests publish in the clear on an encrypted topic
    /// with it, and see it refused); applications do not need it.
    #[doc(hidden)]
    pub async fn publish_carried(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        self.allowed_here(Perm::Publish, topic)?;
        self.publish_mesh_inner(topic, payload, opts).await
    }

    /// The span of a publish (`None` unless tracing is on and sampled), its
    /// context put in the message's headers.
    fn publish_span(&self, topic: &str, opts: &mut PublishOptions) -> Option<crate::trace::Direct> {
        if !crate::trace::on() {
            return None;
        }
        crate::trace::publish_span(&mut opts.headers, topic, &self.0.node_id)
    }

    async fn publish_mesh_inner(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PublishOptions,
    ) -> Result<u64, PubSubError> {
        let block = opts.overflow == Overflow::Block;
        let len = payload.len();
        let mut msg = Some((payload, opts));
        let mut waited = false;
        let published = match &self.0.role {
            Role::Local => {
                let (payload, opts) = msg.unwrap_or_default();
                return self
                    .run(|core, now, out| core.publish_local(topic, payload, opts, now, out))
                    .map(|p| p.seq);
            }
            Role::Client(up) => loop {
                let room = self.0.room.notified();
                tokio::pin!(room);
                room.as_mut().enable();
                let gateway = up.gateway();
                let tried = self.run(|core, now, out| {
                    core.set_gateway(gateway);
                    if block && core.blocked_upstream(len).is_some() {
                        return None;
                    }
                    let (payload, opts) = msg.take()?;
                    Some(core.publish_upstream(topic, payload, opts, now, out))
                });
                match tried {
                    Some(p) => break p,
                    None => self.wait_room(room, &mut waited).await,
                }
            },
            Role::Node(_) => {
                // The hot path: a fresh cached route with room, one lock;
                // the message is only taken (not moved back and forth) when
                // it is published.
                let mut route = None;
                loop {
                    let room = self.0.room.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    let tried = self.run(|core, now, out| {
                        let r = match &route {
                            Some(r) => Arc::clone(r),
                            None => match core.cached_route(topic, now) {
                                Some(r) => r,
                                None => return Try::NoRoute,
                            },
                        };
                        if block && core.blocked(&r, len).is_some() {
                            return Try::Blocked;
                        }
                        // Taken once: a publish ends the loop.
                        let (payload, opts) = msg.take().unwrap_or_default();
                        Try::Done(core.publish_routed(&r, payload, opts, now, out))
                    });
                    match tried {
                        Try::Done(p) => break p,
                        Try::Blocked => self.wait_room(room, &mut waited).await,
                        Try::NoRoute => {
                            // No fresh route, so the message was not taken.
                            if let Some((payload, opts)) = &msg {
                                self.check(payload, opts)?;
                            }
                            route = Some(self.route(topic).await?);
                        }
                    }
                }
            }
        };
        published.map(|p| p.seq)
    }

    /// A publish under `Overflow::Block` found a queue full: waits until a
    /// sender takes a queue (or one is retired), at most the stall timeout
    /// (after which the full node has been cut off, or made progress).
    /// Counted once per publish.
    async fn wait_room(
        &self,
        room: Pin<&mut tokio::sync::futures::Notified<'_>>,
        waited: &mut bool,
    ) {
        if !*waited {
            *waited = true;
            self.0.counters.publish_blocked_total.inc();
        }
        let _ = tokio::time::timeout(self.0.stall_timeout, room).await;
    }

    /// Waits until a subscription that matches `topic` exists somewhere in
    /// the mesh (this node's own included), at most `timeout`; returns how
    /// many nodes have one (this node counts once), `0` if none appeared in
    /// time. Lets a first publish wait for its audience instead of going to
    /// nobody. A full node looks interest up again each time its answer
    /// "nobody" expires (`INTEREST_CACHE_TTL`, 1 s); a local-only node counts
    /// its own subscriptions; a lightweight client cannot see the mesh's
    /// interest (`NeedsFullNode`).
    pub async fn wait_for_subscribers(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<usize, PubSubError> {
        if matches!(self.0.role, Role::Client(_)) {
            return Err(PubSubError::NeedsFullNode {
                what: "wait_for_subscribers",
            });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let local = self.run(|core, _, _| core.local_matches(topic))?;
            let remote = match &self.0.role {
                Role::Node(_) => self.route(topic).await?.nodes().count(),
                _ => 0,
            };
            let n = remote + usize::from(local > 0);
            let now = tokio::time::Instant::now();
            if n > 0 || now >= deadline {
                return Ok(n);
            }
            tokio::time::sleep_until(deadline.min(now + INTEREST_CACHE_TTL)).await;
        }
    }

    /// A queue may have room again: publishes waiting for it look again.
    pub(crate) fn room_freed(&self) {
        self.0.room.notify_waiters();
    }

    /// Waits (at most `limit`) until everything published so far has been
    /// handed to QUIC: every message queued to other nodes written to its
    /// data stream, or given up on (dropped, counted and reported). Handed
    /// to QUIC is not yet received: see [`Self::flush_acked`].
    pub async fn flush(&self, limit: Duration) -> Result<(), PubSubError> {
        let deadline = tokio::time::Instant::now() + limit;
        if self.wait_core(deadline, |core| core.inflight() == 0).await {
            return Ok(());
        }
        Err(PubSubError::FlushTimeout {
            pending: self.0.core().inflight(),
            what: "messages",
            waited: limit,
        })
    }

    /// [`Self::flush`], then every sender finishes its data stream and
    /// waits until the receiving node has acknowledged all of it (QUIC
    /// acknowledgements: the bytes reached the node; a connection closed
    /// before then would have discarded them). The next publish opens new
    /// streams. Graceful shutdown calls this.
    pub async fn flush_acked(&self, limit: Duration) -> Result<(), PubSubError> {
        let deadline = tokio::time::Instant::now() + limit;
        self.flush(limit).await?;
        self.run(|core, _, _| core.begin_finish());
        if self
            .wait_core(deadline, |core| core.n_finishing() == 0)
            .await
        {
            return Ok(());
        }
        tracing::debug!("pub/sub data streams not all acknowledged in time");
        Err(PubSubError::FlushTimeout {
            pending: self.0.core().n_finishing() as u64,
            what: "data streams",
            waited: limit,
        })
    }

    /// Polls (every 2 ms, until `deadline`) until `done` holds of the core.
    async fn wait_core(&self, deadline: tokio::time::Instant, done: fn(&Core) -> bool) -> bool {
        while !done(&self.0.core()) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Patterns currently subscribed (attached clients' included), with how
    /// many subscriptions each.
    pub fn subscriptions(&self) -> Vec<(String, usize)> {
        self.0.core().subscriptions()
    }

    /// Pushes `events` into `q` as room appears, so a subscriber slower
    /// than its publishers slows them down (end-to-end flow control: this
    /// stream is not read meanwhile, QUIC holds the sender) instead of
    /// losing events. Bounded: a subscription that takes nothing for half
    /// the stall timeout is marked lossy and waited for no more (its full
    /// queue drops its oldest events, told as `Lagged`, and it is counted in
    /// `subscriber_overruns_total`) until it has caught up to half its
    /// queue; so one stalled subscriber holds the others on this node back
    /// at most that long, and never long enough for the sender to cut the
    /// stream off. Returns the events dropped.
    async fn push_waiting(&self, q: &SubQueue, mut events: Vec<Event>, at: Instant) -> u64 {
        let bound = self.0.stall_timeout / 2;
        let mut deadline = tokio::time::Instant::now() + bound;
        let mut dropped = 0;
        while !events.is_empty() {
            let room = q.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            q.waiting.store(true, Relaxed);
            let (n, d) = push_fitting(q, &mut events, at);
            dropped += d;
            if n > 0 {
                q.waker.wake();
                deadline = tokio::time::Instant::now() + bound;
            }
            if events.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                q.lossy.store(true, Relaxed);
                self.0.counters.subscriber_overruns_total.inc();
                tracing::warn!(waited = ?bound, "a subscription took nothing for the subscriber bound; its oldest events are dropped (Lagged) until it catches up");
            }
        }
        dropped
    }

    /// Tells each subscription the events it missed upstream (from loss
    /// reports, see `BatchReceiver::deliver_lagged`): they reach it as
    /// `Lagged` after the events already queued.
    fn tell_lagged(&self, rx: &mut BatchReceiver<Arc<SubQueue>>) {
        let told = rx.deliver_lagged(|q, n| {
            q.lock().note_gap(n);
            q.waker.wake();
        });
        self.0.counters.loss_told_total.inc_by(told);
    }

    /// Reads one pub/sub data stream from `peer` until it ends. Bad input
    /// stops this stream only; the connection stays up.
    async fn read_data_stream(self, peer: Peer, mut reader: FrameReader) {
        let m = peer.metrics().clone();
        let stop_code = u32::from(u16::from(DisconnectReason::ProtocolError));
        let from_client = peer.is_client();
        let from = peer.node_id();
        let mut rx = BatchReceiver::new(from_client);
        loop {
            let frame = match reader.read().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(crate::framed::ReadError::Stream(quinn::ReadError::Reset(code)))
                    if code == quinn::VarInt::from_u32(u32::from(sender::STREAM_RESET_STALLED)) =>
                {
                    // Cut off for stalling: what the sender wrote past what
                    // was read here is lost; its next report says how much.
                    let now = self.0.now();
                    let mut core = self.0.core();
                    core.handle_stream_reset(from, &mut rx, now);
                    self.after(core);
                    self.tell_lagged(&mut rx);
                    tracing::debug!(peer = %from, read = rx.messages(), "pub/sub data stream cut off by its sender");
                    break;
                }
                Err(e) => {
                    if let Some(kind) = e.protocol_kind() {
                        m.protocol_error(kind);
                        self.0.counters.data_streams_rejected_total.inc();
                        reader.stop(stop_code);
                        tracing::debug!(peer = %from, error = %e, "closed a pub/sub data stream after a protocol error");
                    }
                    break;
                }
            };
            m.frames_received_total.inc();
            m.message_received(frame.msg_type);
            peer.touch();
            if let Some(n) = self
                .refused_batch(&peer, frame.msg_type, &frame.body)
                .or_else(|| self.clear_batch(&peer, frame.msg_type, &frame.body))
            {
                rx.count_refused(n);
                continue;
            }
            // A PUBLISH_BATCH is decoded once, here: the seals' check
            // ahead, the core and (a gateway) the forwarding read this view.
            let batch = (frame.msg_type == MessageType::PublishBatch as u8)
                .then(|| macula_wire::PublishBatchView::decode_shared(&frame.body));
            let view = batch.as_ref().and_then(|b| b.as_ref().ok());
            // Tracing: this gateway's forwarding spans for the traced
            // messages of a client's batch, and for those of another
            // node's batch that go on to its clients (their copies carry
            // them on as parent); nothing when tracing is off.
            let forwarding = match view {
                Some(view) if crate::trace::on() && (from_client || self.0.core().has_feeds()) => {
                    self.forward_spans(view, &mut rx, from_client)
                }
                _ => Vec::new(),
            };
            // A forwarded batch's seals are verified before the core is
            // locked (the signature check is most of a sealed batch's
            // cost); the core takes the outcome.
            if let Some(view) = view {
                rx.prove_ahead(from, view, &frame.body);
            }
            let res = {
                let now = self.0.now();
                let mut core = self.0.core();
                let res = match &batch {
                    Some(b) => core.handle_batch_view(
                        from,
                        &frame.body,
                        b.as_ref().map_err(String::as_str),
                        &mut rx,
                        now,
                    ),
                    None => core.handle_batch(from, frame.msg_type, &frame.body, &mut rx, now),
                };
                self.after(core);
                res
            };
            if let Err(reason) = res {
                m.protocol_error(ProtocolErrorKind::Malformed);
                reader.stop(stop_code);
                tracing::debug!(peer = %from, reason = %reason, "closed a pub/sub data stream after bad input");
                break;
            }
            if let Some(why) = rx.unproved.take() {
                // Counted in macula_pubsub_unproved_dropped; never delivered.
                tracing::debug!(peer = %from, kind = why.kind(), error = %why, "dropped a pub/sub batch whose publisher is not proved");
            }
            // A loss report's gaps go in before the events after them.
            self.tell_lagged(&mut rx);
            // Backpressure: a full subscription holds this stream (and so,
            // through QUIC flow control, the sender) until it has room.
            let c = &self.0.counters;
            let (mut delivered, mut dropped) = (0u64, 0u64);
            let mut rest: Vec<(Arc<SubQueue>, Vec<Event>)> = Vec::new();
            // The batch arrived now: its events' queue wait starts here.
            let at = Instant::now();
            rx.deliver(|q, events| {
                q.keep_wanted(events);
                delivered += events.len() as u64;
                let (_, d) = push_fitting(q, events, at);
                dropped += d;
                if !events.is_empty() {
                    rest.push((q.clone(), std::mem::take(events)));
                }
                q.waker.wake();
            });
            for (q, events) in rest {
                dropped += self.push_waiting(&q, events, at).await;
            }
            c.delivered_local_total.inc_by(delivered);
            c.dropped_slow_total.inc_by(dropped);
            if let (true, Some(view)) = (from_client, view) {
                // A gateway passes its client's messages on into the mesh.
                self.forward_from_client(from, view, &frame.body, &rx.retrace, &rx.seals)
                    .await;
            }
            if !forwarding.is_empty() {
                rx.retrace.clear();
                drop(forwarding);
            }
        }
    }
}

impl PubSub {
    /// A gateway's span per traced message it forwards (a child of the
    /// publisher's span, or of the node that sent it): every traced message
    /// of a client's batch `view` (into the mesh), or, for another node's
    /// batch, those a client of this node subscribes to. Each is noted in
    /// `rx.retrace` so the copies forwarded name it as their parent.
    fn forward_spans(
        &self,
        view: &macula_wire::PublishBatchView<'_>,
        rx: &mut BatchReceiver<Arc<SubQueue>>,
        from_client: bool,
    ) -> Vec<crate::trace::Direct> {
        rx.retrace.clear();
        let mut spans = Vec::new();
        for (i, e) in view.entries.iter().enumerate() {
            if e.headers.is_empty() {
                continue;
            }
            let tp = macula_wire::trace::find(e.headers.iter().copied());
            let state = e
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(crate::trace::TRACESTATE))
                .map(|(_, v)| *v);
            let topic = view.topics.get(e.topic_index).copied().unwrap_or("");
            if !tp.as_ref().is_some_and(|t| t.sampled())
                || (!from_client && !self.0.core().feeds_topic(topic))
            {
                continue;
            }
            let Some(span) = crate::trace::forward_span(
                tp,
                state,
                from_client,
                topic,
                &view.publisher,
                e.seq,
                &self.0.node_id,
            ) else {
                continue;
            };
            rx.retrace.push((i, span.traceparent().to_string()));
            spans.push(span);
        }
        spans
    }

    /// In a realm with an authority: whether `peer` may hand over every
    /// topic of this PUBLISH_BATCH (a client publishes for itself; a node
    /// for itself, or carries others' with `relay`). A batch with any
    /// topic refused is refused whole: an honest sender never writes one
    /// (it checked where the messages entered the mesh), so this is a
    /// misbehaving or misconfigured node. Returns how many messages it
    /// carried, counted and logged; `None`: go on.
    fn refused_batch(&self, peer: &Peer, msg_type: u8, body: &Bytes) -> Option<u64> {
        let authz = self.0.authz.as_ref()?;
        if msg_type != MessageType::PublishBatch as u8 {
            return None;
        }
        // A body that does not decode is the core's to refuse. Only the
        // head is read here: the topic table and the message count.
        let head = macula_wire::BatchHead::decode(body).ok()?;
        let from = peer.node_id();
        let refused = head
            .topics
            .iter()
            .find_map(|t| peer.authorized(authz, Perm::Publish, t).err())?;
        let n = head.messages;
        self.0.counters.unauthorized_dropped_total.inc_by(n);
        tracing::warn!(peer = %from, messages = n, error = %refused, "refused a pub/sub batch: its sender may not publish it");
        Some(n)
    }
}

impl PubSub {
    /// End-to-end (issue 19): whether a PUBLISH_BATCH its publisher hands
    /// over itself (a client to its gateway, a node for itself) carries a
    /// message in the clear on a topic the realm encrypts. Such a batch is
    /// refused whole, like one refused by the permissions: the publisher
    /// holds the key set (a client is attached only once it does) and
    /// seals, so this is a misbehaving or outdated one. Returns how many
    /// messages it carried (counted in
    /// `macula_e2e_payloads{outcome="plaintext_refused"}` and logged);
    /// `None`: go on. A batch a node carries for others is left to their
    /// subscribers, which do not deliver what does not open.
    fn clear_batch(&self, peer: &Peer, msg_type: u8, body: &Bytes) -> Option<u64> {
        let keys = self.0.e2e.get().filter(|k| k.is_active())?;
        if msg_type != MessageType::PublishBatch as u8 {
            return None;
        }
        let head = macula_wire::BatchHead::decode(body).ok()?;
        if head.publisher != peer.node_id() || !head.topics.iter().any(|t| keys.encrypts(t)) {
            return None;
        }
        let view = macula_wire::PublishBatchView::decode_shared(body).ok()?;
        let encrypted: Vec<bool> = view.topics.iter().map(|t| keys.encrypts(t)).collect();
        let clear = view.entries.iter().find(|e| {
            encrypted.get(e.topic_index).copied().unwrap_or(false)
                && macula_auth::keys::Envelope::decode(e.payload).is_err()
        })?;
        let topic = view.topics.get(clear.topic_index).copied().unwrap_or("");
        let n = head.messages;
        keys.counters().e2e.at(5).inc_by(n);
        tracing::warn!(peer = %peer.node_id(), messages = n, topic, "refused a pub/sub batch: a message in the clear on a topic the realm encrypts end to end");
        Some(n)
    }

    /// End-to-end: the refusal of a PUBLISH in the clear on an encrypted
    /// topic (`None`: go on).
    fn clear_publish(&self, p: &macula_wire::Publish) -> Option<Answer> {
        let keys = self.0.e2e.get().filter(|k| k.is_active())?;
        if !keys.encrypts(&p.topic) || macula_auth::keys::Envelope::decode(&p.payload).is_ok() {
            return None;
        }
        keys.counters().e2e.at(5).inc();
        Some(Answer::Refuse {
            code: ErrorCode::Unauthorized,
            reason: format!(
                "topic {:?} is encrypted end to end by the realm's policy: a message in the clear is refused",
                p.topic
            ),
        })
    }
}

fn unauthorized(d: Denied) -> PubSubError {
    PubSubError::Unauthorized {
        kind: d.kind,
        message: d.to_string(),
    }
}

/// Pushes (and removes) the first of `events` that fit `q` without
/// dropping any (all of them if `q` is lossy or closed); returns how many
/// were pushed and how many older ones that dropped.
fn push_fitting(q: &SubQueue, events: &mut Vec<Event>, at: Instant) -> (usize, u64) {
    let mut g = q.lock();
    if q.lossy.load(Relaxed) && g.len() <= g.capacity() / 2 {
        // Caught up: waited for again.
        q.lossy.store(false, Relaxed);
    }
    let n = if q.lossy.load(Relaxed) || q.closed.load(Relaxed) {
        events.len()
    } else {
        let (mut n, mut bytes) = (0, 0);
        for ev in events.iter() {
            let size = ev.payload.len() + EVENT_OVERHEAD;
            if !g.room_for(n + 1, bytes + size) {
                break;
            }
            n += 1;
            bytes += size;
        }
        n
    };
    let mut dropped = 0;
    for ev in events.drain(..n) {
        let size = ev.payload.len() + EVENT_OVERHEAD;
        dropped += g.push_sized((ev, at), size);
    }
    (n, dropped)
}

/// Pub/sub as a service: PUBLISH on the control stream, the pub/sub data
/// streams (kind `STREAM_KIND_PUBSUB`) carrying PUBLISH_BATCH frames, and
/// peers coming and going (frame limits; stale interest).
impl Service for PubSub {
    fn name(&self) -> &'static str {
        "pubsub"
    }

    fn serves(&self) -> Serves {
        Serves {
            messages: &[MessageType::Publish, MessageType::PublishBatch],
            uni_kinds: &[STREAM_KIND_PUBSUB],
            ..Serves::default()
        }
    }

    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        match msg {
            Message::Publish(p) => {
                if let Some(a) = &self.0.authz {
                    if let Err(d) = peer.authorized(a, Perm::Publish, &p.topic) {
                        self.0.counters.unauthorized_dropped_total.inc();
                        return Answer::Refuse {
                            code: ErrorCode::Unauthorized,
                            reason: d.to_string(),
                        };
                    }
                }
                if let Some(refused) = self.clear_publish(&p) {
                    return refused;
                }
                match self.run(|core, now, out| core.handle_publish(peer.node_id(), p, now, out)) {
                    Ok(()) => Answer::Done,
                    Err(reason) => Answer::Refuse {
                        code: ErrorCode::Malformed,
                        reason,
                    },
                }
            }
            // Batches travel on pub/sub data streams only.
            other => Answer::Refuse {
                code: ErrorCode::UnexpectedMessage,
                reason: format!(
                    "{} belongs on a pub/sub data stream",
                    other.msg_type().name()
                ),
            },
        }
    }

    fn on_uni_stream(&self, peer: Peer, _kind: u8, reader: FrameReader) -> ServiceFuture {
        Box::pin(self.clone().read_data_stream(peer, reader))
    }

    fn peer_up(&self, peer: &Peer) {
        self.0
            .core()
            .handle_peer_up(&peer.node_id(), peer.hello().max_frame_size);
    }

    /// Where stale interest starts: a node that left or timed out is set
    /// aside by the core (nothing more is queued to it) until it returns.
    fn peer_down(&self, peer: &Peer, why: PeerDown) {
        let why = match why {
            PeerDown::Left | PeerDown::Silent => macula_pubsub::PeerDown::Left,
            PeerDown::Closed | PeerDown::Superseded => macula_pubsub::PeerDown::Closed,
        };
        let now = self.0.now();
        let mut core = self.0.core();
        core.handle_peer_down(&peer.node_id(), why, now);
        self.after(core);
        self.room_freed();
        if why == macula_pubsub::PeerDown::Left {
            tracing::debug!(peer = %peer.node_id(), "pub/sub: peer left; its interest is set aside until it returns");
        }
    }
}

/// A live subscription: a `Stream` of `SubscriptionItem`s. Dropping it
/// unsubscribes.
pub struct Subscription {
    id: macula_pubsub::SubId,
    pattern: Pattern,
    queue: Arc<SubQueue>,
    owner: Weak<Inner>,
    /// Events taken, for sampling their queue wait (`DELIVERY_WAIT_SAMPLE`).
    taken: u32,
    /// Opens payloads on end-to-end encrypted topics (`None`: a tap, or
    /// no realm keys).
    e2e: Option<Arc<crate::e2e::E2e>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("pattern", &self.pattern.as_str())
            .finish()
    }
}

impl Subscription {
    /// The delivery span of a traced event (a child of its publisher's,
    /// or of the gateway that forwarded it): recorded as the application
    /// takes it.
    fn delivered(&self, e: &Event) {
        let node = self.owner.upgrade().map(|i| i.node_id);
        let _span = crate::trace::deliver_span(
            &e.headers,
            e.topic.as_str(),
            self.pattern.as_str(),
            &e.publisher,
            e.seq,
            node.as_ref(),
        );
    }

    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    /// Events waiting in this subscription's queue.
    pub fn pending(&self) -> usize {
        self.queue.lock().len()
    }

    /// Waits for the next item, as `StreamExt::next` does without the
    /// import: an event, or `Lagged(n)` when `n` events were dropped from
    /// this subscription's full queue since the last item (told before the
    /// next event); `None` once the subscription has ended (the node shut
    /// down).
    pub async fn recv(&mut self) -> Option<SubscriptionItem> {
        futures::StreamExt::next(self).await
    }
}

impl futures::Stream for Subscription {
    type Item = SubscriptionItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Register first, then look: a push between the two wakes us.
        this.queue.waker.register(cx.waker());
        let mut q = this.queue.lock();
        let lagged = q.take_lagged();
        if lagged > 0 {
            return Poll::Ready(Some(SubscriptionItem::Lagged(lagged)));
        }
        while let Some((mut e, at)) = q.pop() {
            drop(q);
            // Opened outside the queue's lock (the publisher pushes there).
            if let Some(keys) = &this.e2e {
                match keys.open_event(e.topic.as_str(), &e.headers, e.payload) {
                    Some(p) => e.payload = p,
                    // Not delivered: counted by `open`.
                    None => {
                        q = this.queue.lock();
                        continue;
                    }
                }
            }
            if this.taken.is_multiple_of(DELIVERY_WAIT_SAMPLE) {
                this.queue.wait.0.observe(at.elapsed().as_secs_f64());
            }
            this.taken = this.taken.wrapping_add(1);
            if this.queue.waiting.swap(false, Relaxed) {
                this.queue.room.notify_waiters();
            }
            if crate::trace::on() && !e.headers.is_empty() {
                this.delivered(&e);
            }
            return Poll::Ready(Some(SubscriptionItem::Event(e)));
        }
        if this.queue.closed.load(Relaxed) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.closed.store(true, Relaxed);
        let Some(inner) = self.owner.upgrade() else {
            return;
        };
        let ps = PubSub(inner);
        let mut core = ps.0.core();
        let interest = core.unsubscribe(self.id);
        ps.after(core);
        // A full node's record update was emitted as an action; a client
        // tells its gateway (once the last holder of the pattern is gone).
        if let (Some(i @ Interest::Upstream { .. }), Ok(rt)) =
            (interest, tokio::runtime::Handle::try_current())
        {
            rt.spawn(async move {
                if let Err(e) = ps.announce(i).await {
                    tracing::debug!(error = %e, "gateway did not confirm the unsubscribe");
                }
            });
        }
    }
}
