//! The MQTT bridge (issue 24): a TCP (or TLS) listener for MQTT 3.1.1 and
//! 5.0 clients, driving `macula_mqtt::Broker` (every session decision is
//! the core's) and connecting it to this node's pub/sub: a client's PUBLISH
//! is a mesh publish (`PubSub::publish_mesh`, so it reaches native and MQTT
//! subscribers on every node), and each of its subscriptions is a mesh
//! subscription (`PubSub::subscribe_mesh`) whose events a pump task hands
//! to the core. See docs/MQTT.md.
//!
//! One task per active connection: it reads packets (`rmqtt-codec`, size-limited
//! before the body is read), feeds the core under its mutex (never held
//! across an await), publishes and subscribes in the mesh, and writes what
//! the core queued. A PUBLISH is acknowledged after the mesh took it, and
//! the next packet is read only then: a client publishing faster than the
//! mesh accepts is slowed by TCP, not buffered. One pump task per
//! subscription of a session (while the session lives, connected or not).
//!
//! Idle connections park: a plain-TCP connection with nothing half-read,
//! unwritten or pending ends its task and leaves only its socket (taken
//! from tokio, `into_std`) and who it is in the bridge's table. This
//! happens at once after its CONNECT if the client sent nothing more, else
//! when the one-second sweep asks and the connection was idle for
//! [`IDLE_AFTER`]. One thread (`mqtt-idle`, an epoll set through `mio`)
//! waits on every parked socket; the socket becoming readable (a packet,
//! the client closing) or the core having something for the connection (a
//! delivery, a keep-alive or takeover close, shutdown: [`Inner::wake`])
//! starts its task again, with a codec rebuilt from the core's state (no
//! partial packet is ever parked). An idle connection then costs the
//! core's records and a few map entries (`tests/mqtt_memory.rs`). TLS
//! connections keep their task (the session state is in the stream).
//!
//! Persistent sessions across a node restart: with a data directory (and
//! no realm authority: a restored session has no credentials until its
//! client comes back), the persistent sessions (subscriptions, queued and
//! unacknowledged messages, time left) are written to
//! `<data dir>/mqtt-sessions.json` (whole, to a temporary file then
//! renamed) at most once a second while they change, and at shutdown;
//! the next start takes them back (`Broker::restore`) and subscribes them
//! in the mesh again before the listener accepts anyone. A file that does
//! not parse is left as it is (renamed `.broken`) and counted.
//!
//! Credentials: in a realm with an authority the CONNECT's password is an
//! API key of the node's `--api-keys` file (username free, logged), checked
//! like a QUIC client's (`ApiKeyGate::admit`: failure limits, the grant
//! verified against the revocation list held); each publish and subscribe
//! is then checked against the key's grant (`Authz::check`), as the gateway
//! does for its clients. Without an authority, a configured
//! `username:password` list, or anyone when none is configured.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use futures::{FutureExt, StreamExt};
use macula_auth::Action as Perm;
use macula_mqtt::{
    codec::decode_reason, Broker, Codec, ConnId, Event, In, Out, Outcome, Reason, Refusal,
    ServerInfo, SessionId, SubCode, Version,
};
use macula_wire::time::Millis;
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::apikey_gate::ApiKeyGate;
use crate::authz::{Authz, PeerGrant};
use crate::clock::Clock;
use crate::config::MqttConfig;
use crate::pubsub::{PubSub, PublishOptions, Subscription, SubscriptionItem};

/// How long a new connection may take to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often keep-alives and disconnected sessions are checked (one sweep
/// for every client: no timer per connection).
const EXPIRY_TICK: Duration = Duration::from_secs(1);
/// Largest write buffered before it is written out.
const WRITE_CHUNK: usize = 64 * 1024;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Counters the runtime keeps (the core's own are in its `Stats`).
#[derive(Debug, Default)]
struct Counters {
    /// Events a mesh subscription of an MQTT session lost (`Lagged`).
    lagged: Counter,
    /// Publishes the mesh refused (payload too large, ...).
    publish_failed: Counter,
    /// Requests refused by the realm's permissions.
    denied: Counter,
    /// Connections that ended before a CONNECT (timeout, garbage, I/O).
    no_connect: Counter,
    /// TLS handshakes that failed.
    tls_failed: Counter,
    /// Persistent sessions taken back at start.
    restored: Counter,
    /// Saves of the persistent sessions that failed (and unreadable files).
    save_failed: Counter,
}

/// The file persistent sessions are kept in, in the data directory.
pub const SESSIONS_FILE: &str = "mqtt-sessions.json";
/// How often persistent sessions are written while they change.
const SAVE_EVERY: Duration = Duration::from_secs(1);

struct Inner {
    core: Mutex<Broker>,
    pubsub: PubSub,
    clock: Clock,
    authz: Option<Arc<Authz>>,
    gate: Option<Arc<ApiKeyGate>>,
    /// BLAKE3 of `username:password`, for constant-time comparison.
    users: Vec<blake3::Hash>,
    info: ServerInfo,
    /// Connected clients: a running one's wake-up (no allocation of its
    /// own: the connection task's waker, kept here while it waits), or a
    /// parked one's socket.
    conns: Mutex<HashMap<ConnId, Slot>>,
    /// The idle poller parked connections wait in (none if the poller
    /// could not be started: connections then keep their tasks).
    idle: Option<Idle>,
    /// The runtime parked connections' tasks are started on again.
    rt: tokio::runtime::Handle,
    /// Connections parked now (`Slot::Parked` in `conns`).
    parked: AtomicU64,
    /// Each session's pumps, by filter.
    pumps: Mutex<HashMap<SessionId, HashMap<String, tokio::task::AbortHandle>>>,
    /// Notified when client queues may have room (pumps waiting on it).
    room: Notify,
    next_conn: AtomicU64,
    counters: Counters,
    local_addr: SocketAddr,
    /// `<data dir>/mqtt-sessions.json`, when sessions are kept across
    /// restarts.
    store: Option<std::path::PathBuf>,
    /// The core's `changes()` last written (one writer at a time).
    saved: tokio::sync::Mutex<Option<u64>>,
}

/// A connected client's wake-up: its task's waker while it waits, and a
/// wake-up it has not taken yet (as `Notify::notify_one` keeps a permit).
#[derive(Default)]
struct Wake {
    waker: Option<Waker>,
    pending: bool,
    /// The sweep asks the task to park if it has been idle a while.
    park: bool,
}

/// A connected client in the bridge's table.
enum Slot {
    /// Its task runs (or waits for its socket or a wake-up).
    Running(Wake),
    /// Idle: no task and no registration with tokio; its socket waits in
    /// the idle poller's set (see [`Inner::park`]).
    Parked(Parked),
}

/// What a parked connection keeps: its socket and who it is. The rest of
/// its state is the core's (version, session, keep-alive), and its
/// decoder held no partial packet when it parked.
struct Parked {
    io: std::net::TcpStream,
    who: Principal,
}

/// The idle poller: one thread waiting on the sockets of every parked
/// connection (an epoll set through `mio`, token = the connection's ID).
/// Readable (data, the client closing, an error) starts the connection's
/// task again; so does the core having something for it ([`Inner::wake`]).
struct Idle {
    registry: mio::Registry,
    /// Ends the poller's wait when the bridge is dropped.
    waker: mio::Waker,
}

/// The poller's own token (connection IDs start at 1 and count up).
const IDLE_WAKER: mio::Token = mio::Token(usize::MAX);
/// A connection with nothing read, written or queued for this long parks
/// at the next sweep (so within `IDLE_AFTER + EXPIRY_TICK` of going idle).
const IDLE_AFTER: Duration = Duration::from_millis(500);

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(idle) = &self.idle {
            let _ = idle.waker.wake();
        }
    }
}

fn token(conn: ConnId) -> mio::Token {
    mio::Token(conn as usize)
}

/// A stream type whose connections can be parked: a plain TCP socket can
/// (its whole state is the socket), a TLS one cannot (its session is in
/// the stream) and keeps its task.
trait Park: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    const PARKS: bool;
    /// The socket, no longer registered with tokio (`Err`: this kind of
    /// stream does not park; `Ok(Err)`: deregistering failed, the socket
    /// is closed).
    fn unregister(self) -> Result<std::io::Result<std::net::TcpStream>, Self>;
    /// A socket from [`Park::unregister`] registered with tokio again.
    fn register(io: std::net::TcpStream) -> std::io::Result<Self>;
}

impl Park for tokio::net::TcpStream {
    const PARKS: bool = true;
    fn unregister(self) -> Result<std::io::Result<std::net::TcpStream>, Self> {
        Ok(self.into_std())
    }
    fn register(io: std::net::TcpStream) -> std::io::Result<Self> {
        tokio::net::TcpStream::from_std(io)
    }
}

impl Park for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    const PARKS: bool = false;
    fn unregister(self) -> Result<std::io::Result<std::net::TcpStream>, Self> {
        Err(self)
    }
    fn register(_: std::net::TcpStream) -> std::io::Result<Self> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// A running MQTT listener. Cheap to clone.
#[derive(Clone)]
pub struct Bridge(Arc<Inner>);

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("listen", &self.0.local_addr)
            .finish()
    }
}

/// What the bridge uses of its node.
pub(crate) struct Parts {
    pub pubsub: PubSub,
    pub clock: Clock,
    /// The realm's permissions (a realm with an authority).
    pub authz: Option<Arc<Authz>>,
    /// The node's API keys, if it keeps any.
    pub gate: Option<Arc<ApiKeyGate>>,
    /// TLS on the listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The node's data directory (persistent sessions are kept there).
    pub dir: Option<std::path::PathBuf>,
}

/// Who a connection is, for the realm's permissions: `None` for anyone
/// (no realm authority, no user list), which then costs a connection a
/// pointer and no allocation.
struct Principal(Option<Box<Named>>);

struct Named {
    name: String,
    grant: Option<Arc<PeerGrant>>,
}

impl Principal {
    fn named(name: String, grant: Option<Arc<PeerGrant>>) -> Principal {
        Principal(Some(Box::new(Named { name, grant })))
    }

    /// For logs and permission errors.
    fn who(&self) -> &str {
        self.0.as_ref().map_or("anyone", |n| n.name.as_str())
    }

    fn grant(&self) -> Option<&PeerGrant> {
        self.0.as_ref().and_then(|n| n.grant.as_deref())
    }
}

impl Bridge {
    /// Binds the listener and starts accepting (until `shutdown`).
    pub(crate) async fn start(
        config: &MqttConfig,
        listen: SocketAddr,
        parts: Parts,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Bridge, MqttError> {
        let Parts {
            pubsub,
            clock,
            authz,
            gate,
            tls,
            dir,
        } = parts;
        let store = match (&authz, dir) {
            (None, Some(d)) => Some(d.join(SESSIONS_FILE)),
            _ => None,
        };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| MqttError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| MqttError::Bind {
            addr: listen,
            source,
        })?;
        let limits = config.limits;
        let (idle, poll) = match start_idle() {
            Ok((idle, poll)) => (Some(idle), Some(poll)),
            Err(e) => {
                tracing::warn!(error = %e, "MQTT idle poller not started: idle connections keep their tasks");
                (None, None)
            }
        };
        let mut bridge = Bridge(Arc::new(Inner {
            core: Mutex::new(Broker::new(limits)),
            pubsub,
            clock,
            authz,
            gate,
            users: config
                .users
                .iter()
                .map(|(u, p)| blake3::hash(format!("{u}:{p}").as_bytes()))
                .collect(),
            info: ServerInfo {
                receive_max: limits.max_inflight,
                max_packet_size: limits.max_packet_size,
            },
            conns: Mutex::new(HashMap::new()),
            idle,
            rt: tokio::runtime::Handle::current(),
            parked: AtomicU64::new(0),
            pumps: Mutex::new(HashMap::new()),
            room: Notify::new(),
            next_conn: AtomicU64::new(1),
            counters: Counters::default(),
            local_addr,
            store,
            saved: tokio::sync::Mutex::new(None),
        }));
        if let Some(poll) = poll {
            let weak = Arc::downgrade(&bridge.0);
            let started = std::thread::Builder::new()
                .name("mqtt-idle".into())
                .spawn(move || idle_poller(weak, poll));
            if let Err(e) = started {
                // Parked connections would never wake: park none.
                tracing::warn!(error = %e, "MQTT idle poller thread not started: idle connections keep their tasks");
                if let Some(b) = Arc::get_mut(&mut bridge.0) {
                    b.idle = None;
                }
            }
        }
        bridge.0.restore().await;
        tracing::info!(listen = %local_addr, tls = tls.is_some(), "MQTT listener started");
        tokio::spawn(accept_loop(
            Arc::downgrade(&bridge.0),
            listener,
            tls.map(tokio_rustls::TlsAcceptor::from),
            shutdown.clone(),
        ));
        tokio::spawn(expiry_loop(Arc::downgrade(&bridge.0), shutdown));
        Ok(bridge)
    }

    /// The listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    /// Ends every connection (5.0 clients get DISCONNECT 0x8B) and writes
    /// the persistent sessions (the node shuts down).
    pub(crate) async fn shutdown(&self) {
        self.0.close_all().await;
    }

    /// Registers `macula_mqtt_*` in the node's registry.
    pub fn register(&self, r: &mut Registry) {
        r.register_collector(Box::new(MqttCollector(self.clone())));
    }
}

async fn accept_loop(
    inner: Weak<Inner>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait a little, go on.
                tracing::debug!(error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let _ = stream.set_nodelay(true);
        match &tls {
            None => {
                tokio::spawn(serve(inner, stream, remote));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve(inner, s, remote).await,
                        Ok(Err(e)) => {
                            inner.counters.tls_failed.inc();
                            tracing::debug!(%remote, error = %e, "MQTT TLS handshake failed");
                        }
                        Err(_) => {
                            inner.counters.tls_failed.inc();
                            tracing::debug!(%remote, "MQTT TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
}

/// The idle poller's epoll set and its handle for the bridge.
fn start_idle() -> std::io::Result<(Idle, mio::Poll)> {
    let poll = mio::Poll::new()?;
    let registry = poll.registry().try_clone()?;
    let waker = mio::Waker::new(poll.registry(), IDLE_WAKER)?;
    Ok((Idle { registry, waker }, poll))
}

/// The idle poller's thread: waits on every parked connection's socket
/// and starts the task of one that became readable. Ends when the bridge
/// is dropped (woken by `Inner`'s drop, or at the latest a second later).
fn idle_poller(inner: Weak<Inner>, mut poll: mio::Poll) {
    let mut events = mio::Events::with_capacity(256);
    loop {
        let waited = poll.poll(&mut events, Some(EXPIRY_TICK));
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = waited {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "MQTT idle poller wait failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        for ev in events.iter() {
            if ev.token() != IDLE_WAKER {
                inner.unpark(ev.token().0 as ConnId);
            }
        }
    }
}

async fn expiry_loop(inner: Weak<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut last_save = std::time::Instant::now();
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(EXPIRY_TICK) => false,
            _ = shutdown.changed() => true,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if stop {
            inner.close_all().await;
            return;
        }
        let now = inner.clock.now();
        {
            let mut core = inner.core.lock();
            core.handle_timeouts(now);
            core.expire(now);
        }
        inner.after();
        inner.ask_to_park();
        if last_save.elapsed() >= SAVE_EVERY {
            last_save = std::time::Instant::now();
            inner.save().await;
        }
    }
}

impl Inner {
    /// Every connection writes its DISCONNECT (0x8B) and closes; the
    /// persistent sessions are written.
    async fn close_all(self: &Arc<Self>) {
        self.core
            .lock()
            .close_all(Reason::ShuttingDown, self.clock.now());
        self.after();
        self.save().await;
    }

    /// Writes the persistent sessions if they changed since the last
    /// write (whole file: a temporary one, synced, then renamed).
    async fn save(self: &Arc<Self>) {
        let Some(path) = self.store.clone() else {
            return;
        };
        let mut saved = self.saved.lock().await;
        let (changes, sessions) = {
            let core = self.core.lock();
            if *saved == Some(core.changes()) {
                return;
            }
            (core.changes(), core.saved_sessions(self.clock.now()))
        };
        let n = sessions.len();
        let wrote = tokio::task::spawn_blocking(move || write_sessions(&path, &sessions)).await;
        match wrote {
            Ok(Ok(())) => *saved = Some(changes),
            Ok(Err(e)) => {
                self.counters.save_failed.inc();
                tracing::warn!(error = %e, sessions = n, "MQTT sessions not saved");
            }
            Err(e) => {
                self.counters.save_failed.inc();
                tracing::warn!(error = %e, "MQTT sessions not saved");
            }
        }
    }

    /// Takes back the persistent sessions a previous process saved, and
    /// subscribes them in the mesh.
    async fn restore(self: &Arc<Self>) {
        let Some(path) = self.store.clone() else {
            return;
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.counters.save_failed.inc();
                tracing::warn!(file = %path.display(), error = %e, "MQTT sessions not read");
                return;
            }
        };
        let saved: Vec<macula_mqtt::SavedSession> = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                self.counters.save_failed.inc();
                let broken = path.with_extension("json.broken");
                tracing::warn!(file = %path.display(), moved_to = %broken.display(), error = %e, "MQTT sessions file does not parse; kept aside, not restored");
                let _ = std::fs::rename(&path, &broken);
                return;
            }
        };
        let offered = saved.len();
        let restored = self.core.lock().restore(saved, self.clock.now());
        self.counters.restored.inc_by(restored.len() as u64);
        tracing::info!(
            sessions = restored.len(),
            offered,
            "MQTT persistent sessions restored"
        );
        for (sid, subs) in restored {
            for (filter, pattern, qos) in subs {
                self.start_pump(sid, filter, &pattern, qos).await;
            }
        }
        *self.saved.lock().await = None;
    }

    /// Subscribes session `sid`'s `filter` in the mesh and starts its pump;
    /// false if the mesh refused.
    async fn start_pump(
        self: &Arc<Self>,
        sid: SessionId,
        filter: String,
        pattern: &macula_pubsub::Pattern,
        qos: u8,
    ) -> bool {
        match self.pubsub.subscribe_mesh(pattern.as_str()).await {
            Ok(sub) => {
                let task = tokio::spawn(pump(Arc::downgrade(self), sid, qos, sub));
                let old = self
                    .pumps
                    .lock()
                    .entry(sid)
                    .or_default()
                    .insert(filter, task.abort_handle());
                if let Some(old) = old {
                    old.abort();
                }
                true
            }
            Err(e) => {
                tracing::debug!(filter, error = %e, "MQTT subscription refused by the mesh");
                false
            }
        }
    }

    /// Does what the core asked for (outside its lock).
    fn after(self: &Arc<Self>) {
        loop {
            let Some(ev) = self.core.lock().poll_event() else {
                return;
            };
            match ev {
                Event::Wake(c) | Event::Close(c) => self.wake(c),
                Event::SessionGone(sid) => {
                    if let Some(pumps) = self.pumps.lock().remove(&sid) {
                        for (_, p) in pumps {
                            p.abort();
                        }
                    }
                }
                Event::Will { topic, payload } => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me
                            .pubsub
                            .publish_mesh(topic.as_str(), payload, PublishOptions::default())
                            .await
                        {
                            me.counters.publish_failed.inc();
                            tracing::debug!(topic = %topic, error = %e, "MQTT will not published");
                        }
                    });
                }
            }
        }
    }

    /// Wakes connection `c`'s task (or leaves it a wake-up to take); a
    /// parked connection gets its task back.
    fn wake(self: &Arc<Self>, c: ConnId) {
        let waker = {
            let mut conns = self.conns.lock();
            match conns.get_mut(&c) {
                Some(Slot::Running(w)) => {
                    w.pending = true;
                    w.waker.take()
                }
                Some(Slot::Parked(_)) => {
                    self.unpark_locked(&mut conns, c);
                    None
                }
                None => None,
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Starts parked connection `c`'s task again (its socket was readable
    /// or the core has something for it); nothing if it is not parked.
    fn unpark(self: &Arc<Self>, c: ConnId) {
        let mut conns = self.conns.lock();
        self.unpark_locked(&mut conns, c);
    }

    fn unpark_locked(self: &Arc<Self>, conns: &mut HashMap<ConnId, Slot>, c: ConnId) {
        let Some(slot) = conns.get_mut(&c) else {
            return;
        };
        if matches!(slot, Slot::Running(_)) {
            return;
        }
        let running = Slot::Running(Wake {
            pending: true,
            ..Wake::default()
        });
        let Slot::Parked(p) = std::mem::replace(slot, running) else {
            return;
        };
        self.parked.fetch_sub(1, Relaxed);
        if let Some(idle) = &self.idle {
            // Under the table's lock, as `park` registers: the socket is
            // in the set exactly while the connection is parked.
            use std::os::fd::AsRawFd;
            let fd = p.io.as_raw_fd();
            if let Err(e) = idle.registry.deregister(&mut mio::unix::SourceFd(&fd)) {
                tracing::debug!(conn = c, error = %e, "MQTT socket not taken from the idle poller");
            }
        }
        self.rt.spawn(resume(self.clone(), c, p));
    }

    /// Parks connection `conn`: its task ends, its socket waits in the
    /// idle poller. Not if a wake-up is pending (the connection is handed
    /// back to go on), or if the stream cannot park.
    fn park<S: Park>(self: &Arc<Self>, conn: ConnId, c: Conn<S>, who: Principal) -> Parking<S> {
        let Some(idle) = &self.idle else {
            return Parking::Back(c, who);
        };
        let pending = |conns: &HashMap<ConnId, Slot>| !matches!(conns.get(&conn), Some(Slot::Running(w)) if !w.pending);
        if pending(&self.conns.lock()) {
            return Parking::Back(c, who);
        }
        let Conn {
            io,
            codec,
            rbuf,
            wbuf,
            partial,
        } = c;
        let io = match io.unregister() {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                tracing::debug!(conn, error = %e, "MQTT socket not taken from tokio; connection lost");
                return Parking::Lost(who);
            }
            Err(io) => {
                return Parking::Back(
                    Conn {
                        io,
                        codec,
                        rbuf,
                        wbuf,
                        partial,
                    },
                    who,
                )
            }
        };
        let mut conns = self.conns.lock();
        if !pending(&conns) {
            use std::os::fd::AsRawFd;
            let fd = io.as_raw_fd();
            match idle.registry.register(
                &mut mio::unix::SourceFd(&fd),
                token(conn),
                mio::Interest::READABLE,
            ) {
                Ok(()) => {
                    conns.insert(conn, Slot::Parked(Parked { io, who }));
                    self.parked.fetch_add(1, Relaxed);
                    return Parking::Parked;
                }
                Err(e) => {
                    tracing::debug!(conn, error = %e, "MQTT connection not parked");
                }
            }
        }
        drop(conns);
        match S::register(io) {
            Ok(io) => Parking::Back(
                Conn {
                    io,
                    codec,
                    rbuf,
                    wbuf,
                    partial,
                },
                who,
            ),
            Err(e) => {
                tracing::debug!(conn, error = %e, "MQTT socket not given back to tokio; connection lost");
                Parking::Lost(who)
            }
        }
    }

    /// Asks every running connection's task to park if it has been idle
    /// for [`IDLE_AFTER`] (the sweep, once a second).
    fn ask_to_park(&self) {
        if self.idle.is_none() {
            return;
        }
        let wakers: Vec<Waker> = self
            .conns
            .lock()
            .values_mut()
            .filter_map(|s| match s {
                Slot::Running(w) => {
                    w.park = true;
                    w.waker.take()
                }
                Slot::Parked(_) => None,
            })
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Ready once connection `c` was woken ([`Inner::wake`]); `c` must be
    /// in `conns` (from its CONNECT until its task ends). True when the
    /// only wake-up was the sweep asking it to park.
    async fn woken(&self, c: ConnId) -> bool {
        std::future::poll_fn(|cx| {
            let mut conns = self.conns.lock();
            let Some(Slot::Running(w)) = conns.get_mut(&c) else {
                return Poll::Ready(false);
            };
            let park = std::mem::take(&mut w.park);
            if std::mem::take(&mut w.pending) {
                return Poll::Ready(false);
            }
            if park {
                return Poll::Ready(true);
            }
            if !w.waker.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                w.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    fn allowed(&self, who: &Principal, action: Perm, resource: &str) -> bool {
        let Some(authz) = &self.authz else {
            return true;
        };
        match authz.check(who.grant(), who.who(), action, resource) {
            Ok(()) => true,
            Err(d) => {
                self.counters.denied.inc();
                tracing::debug!(error = %d, "MQTT request refused by the realm's permissions");
                false
            }
        }
    }

    /// Checks a CONNECT's credentials (see the module docs).
    fn authenticate(
        &self,
        c: &macula_mqtt::Connect,
        remote: SocketAddr,
    ) -> Result<Principal, Refusal> {
        let user = c.username.clone().unwrap_or_default();
        if let Some(authz) = &self.authz {
            let Some(gate) = &self.gate else {
                return Err(Refusal::NotAuthorized);
            };
            let password = c.password.as_deref().unwrap_or_default();
            let text = std::str::from_utf8(password).unwrap_or_default();
            let key: Vec<u8> = match text.parse::<crate::apikey::ApiKey>() {
                Ok(k) => k.as_bytes().to_vec(),
                Err(_) => password.to_vec(),
            };
            return match gate.admit(authz, &key, remote, crate::peer::unix_ms(), true) {
                Ok(v) => {
                    let grant = PeerGrant::new(v);
                    Ok(Principal::named(
                        format!("mqtt client {} ({})", c.client_id, grant.subject()),
                        Some(Arc::new(grant)),
                    ))
                }
                Err(crate::handshake_error::HandshakeError::RateLimited { .. }) => {
                    Err(Refusal::RateLimited)
                }
                Err(e) => {
                    tracing::debug!(%remote, user, error = %e, "MQTT client refused");
                    Err(Refusal::BadCredentials)
                }
            };
        }
        if self.users.is_empty() {
            // Anyone: no name kept (nothing checks it; an idle connection
            // then holds no string for it).
            return Ok(Principal(None));
        }
        let mut given = user.clone().into_bytes();
        given.push(b':');
        given.extend_from_slice(c.password.as_deref().unwrap_or_default());
        let h = blake3::hash(&given);
        // blake3::Hash compares in constant time; every entry is compared.
        let ok = self.users.iter().fold(false, |ok, u| ok | (*u == h));
        if ok {
            Ok(Principal::named(format!("mqtt user {user}"), None))
        } else {
            tracing::debug!(%remote, user, "MQTT client refused: bad username or password");
            Err(Refusal::BadCredentials)
        }
    }
}

/// One connection's reading side and write buffer.
struct Conn<S> {
    io: S,
    codec: Codec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes were read that did not end with a whole packet: the decoder
    /// may hold part of one (the connection cannot park).
    partial: bool,
}

/// What came of [`Inner::park`].
enum Parking<S> {
    Parked,
    /// Not parked: the connection goes on.
    Back(Conn<S>, Principal),
    /// The socket was lost on the way (it is closed).
    Lost(Principal),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S, codec: Codec) -> Conn<S> {
        Conn {
            io,
            codec,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            partial: false,
        }
    }

    /// Nothing half-read, nothing unwritten: the connection may park.
    fn at_rest(&self) -> bool {
        !self.partial && self.rbuf.is_empty() && self.wbuf.is_empty()
    }

    /// The next packet; `Ok(None)` at the end of the stream.
    async fn read(&mut self) -> Result<Option<In>, Reason> {
        loop {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(p)) => {
                    self.partial = !self.rbuf.is_empty();
                    return Ok(Some(p));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "MQTT packet refused");
                    return Err(decode_reason(&e));
                }
            }
            match self.io.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => self.partial = true,
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }
}

/// One connection: its CONNECT (in a future of its own, boxed and freed
/// once connected), then its packets until it ends or parks.
async fn serve<S: Park>(inner: Arc<Inner>, io: S, remote: SocketAddr) {
    let Some((conn, c, principal)) = Box::pin(handshake(&inner, io, remote)).await else {
        return;
    };
    live(inner, conn, c, principal, true).await;
}

/// A parked connection's task, started again ([`Inner::unpark`]): its
/// socket back with tokio and a codec as it was between packets.
async fn resume(inner: Arc<Inner>, conn: ConnId, p: Parked) {
    let Parked { io, who } = p;
    let (version, max) = {
        let core = inner.core.lock();
        (core.version(conn), core.client_max_packet(conn))
    };
    let io = match (version, tokio::net::TcpStream::register(io)) {
        (Some(v), Ok(io)) => Some((v, io)),
        (_, Err(e)) => {
            tracing::debug!(conn, error = %e, "MQTT socket not given back to tokio; connection lost");
            None
        }
        (None, _) => None,
    };
    match io {
        Some((version, io)) => {
            let codec = Codec::connected(inner.info, version, max.unwrap_or(u32::MAX));
            live(inner, conn, Conn::new(io, codec), who, false).await;
        }
        None => ended(&inner, conn, &who),
    }
}

/// A connected client until it ends (or parks: its task ends, the
/// connection stays).
async fn live<S: Park>(
    inner: Arc<Inner>,
    conn: ConnId,
    mut c: Conn<S>,
    mut who: Principal,
    mut fresh: bool,
) {
    // Bounded: each pass ends with the connection, with a park, or with a
    // park undone by a wake-up that came meanwhile.
    loop {
        if !run(&inner, conn, &mut c, &who, std::mem::take(&mut fresh)).await {
            break;
        }
        match inner.park(conn, c, who) {
            Parking::Parked => return,
            Parking::Back(c2, who2) => {
                c = c2;
                who = who2;
            }
            Parking::Lost(who) => return ended(&inner, conn, &who),
        }
    }
    let _ = c.io.shutdown().await;
    ended(&inner, conn, &who);
}

/// Connection `conn` is gone: out of the table and the core.
fn ended(inner: &Arc<Inner>, conn: ConnId, who: &Principal) {
    inner.conns.lock().remove(&conn);
    inner.core.lock().closed(conn, inner.clock.now());
    inner.after();
    inner.room.notify_waiters();
    tracing::debug!(conn, who = who.who(), "MQTT client disconnected");
}

/// A new connection's CONNECT: checked, answered; the connection, once
/// accepted (a refusal is answered and closed here).
async fn handshake<S>(
    inner: &Arc<Inner>,
    io: S,
    remote: SocketAddr,
) -> Option<(ConnId, Conn<S>, Principal)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let conn = inner.next_conn.fetch_add(1, Relaxed);
    let mut c = Conn::new(io, Codec::new(inner.info));
    let first = tokio::time::timeout(CONNECT_TIMEOUT, c.read()).await;
    let connect = match first {
        Ok(Ok(Some(In::Connect(connect)))) => connect,
        _ => {
            inner.counters.no_connect.inc();
            tracing::debug!(%remote, "MQTT connection closed before a valid CONNECT");
            return None;
        }
    };
    let version = c.codec.version().unwrap_or(Version::V3);
    if let Some(max) = connect.max_packet_size {
        c.codec.set_client_max(max);
    }
    let refused = |inner: &Arc<Inner>, why: Refusal| {
        inner.core.lock().refused(why);
        why
    };
    let principal = inner
        .authenticate(&connect, remote)
        .map_err(|why| refused(inner, why));
    let principal = principal.and_then(|p| match &connect.will {
        Some(w) => match macula_mqtt::mqtt_to_mesh(&w.topic) {
            Ok(t) if inner.allowed(&p, Perm::Publish, t.as_str()) => Ok(p),
            Ok(_) => Err(refused(inner, Refusal::NotAuthorized)),
            Err(_) => Err(refused(inner, Refusal::NotAuthorized)),
        },
        None => Ok(p),
    });
    let accepted = principal.and_then(|p| {
        inner
            .conns
            .lock()
            .insert(conn, Slot::Running(Wake::default()));
        let r = inner
            .core
            .lock()
            .connect(conn, version, connect, inner.clock.now());
        r.map(|_| p)
    });
    let principal = match accepted {
        Ok(p) => p,
        Err(why) => {
            inner.conns.lock().remove(&conn);
            tracing::debug!(%remote, reason = why.name(), "MQTT CONNECT refused");
            if c.codec.encode_refusal(why, &mut c.wbuf).is_ok() {
                let _ = c.flush().await;
            }
            let _ = c.io.shutdown().await;
            return None;
        }
    };
    tracing::debug!(conn, %remote, who = principal.who(), ?version, "MQTT client connected");
    inner.after();
    Some((conn, c, principal))
}

/// Writes what the core queued for `conn`: whether it wrote anything, or
/// `None` when the connection is done (closing, or the write failed).
async fn write_out<S: AsyncRead + AsyncWrite + Unpin>(
    inner: &Arc<Inner>,
    conn: ConnId,
    c: &mut Conn<S>,
) -> Option<bool> {
    let mut wrote = false;
    loop {
        // Taken under the core's lock up to about WRITE_CHUNK bytes, then
        // encoded with no await in between: the only thing this future
        // holds while it waits is the write.
        let (outs, closing, more) = {
            let mut core = inner.core.lock();
            let mut outs = Vec::new();
            let mut bytes = 0;
            let mut more = false;
            while let Some(o) = core.poll_transmit(conn) {
                bytes += match &o {
                    Out::Publish { msg, .. } => msg.topic.len() + msg.payload.len() + 16,
                    _ => 16,
                };
                outs.push(o);
                if outs.len() >= 256 || bytes >= WRITE_CHUNK {
                    more = true;
                    break;
                }
            }
            (outs, core.is_closing(conn), more)
        };
        let mut freed = false;
        wrote |= !outs.is_empty();
        for o in outs {
            freed |= matches!(o, Out::Publish { .. });
            if let Err(e) = c.codec.encode(o, &mut c.wbuf) {
                tracing::debug!(error = %e, "MQTT packet not encoded; dropped");
            }
        }
        if freed {
            inner.room.notify_waiters();
        }
        if c.flush().await.is_err() {
            return None;
        }
        if !more {
            return (!closing).then_some(wrote);
        }
    }
}

/// Serves `conn` until it ends (false) or may park (true): at rest and
/// idle for [`IDLE_AFTER`] when the sweep asks, or, with `fresh` (just
/// connected), at once if the client sent nothing after its CONNECT (a
/// client that connects and waits then never holds a task for long).
async fn run<S: Park>(
    inner: &Arc<Inner>,
    conn: ConnId,
    c: &mut Conn<S>,
    who: &Principal,
    mut fresh: bool,
) -> bool {
    let mut active = inner.clock.now();
    loop {
        match write_out(inner, conn, c).await {
            None => return false,
            Some(true) => active = inner.clock.now(),
            Some(false) => {}
        }
        // The packet's handling is boxed and awaited after the select's
        // scope: the connection's future holds neither it nor a packet.
        let work = {
            let early = if std::mem::take(&mut fresh) && S::PARKS && c.at_rest() {
                match c.read().now_or_never() {
                    None => return true,
                    Some(p) => Some(p),
                }
            } else {
                None
            };
            let got = match early {
                Some(p) => Some(p),
                None => tokio::select! {
                    p = c.read() => Some(p),
                    park = inner.woken(conn) => {
                        let idle = inner.clock.now().saturating_sub(active);
                        if park && S::PARKS && c.at_rest() && idle >= Millis::from_duration(IDLE_AFTER) {
                            return true;
                        }
                        None
                    }
                },
            };
            match got {
                Some(Ok(Some(p))) => {
                    let now = inner.clock.now();
                    active = now;
                    inner.core.lock().received(conn, now);
                    // A publish or subscribe awaits the mesh (a DHT put).
                    Some(Box::pin(handle(inner, conn, who, p)))
                }
                Some(Ok(None)) => return false,
                Some(Err(reason)) => {
                    inner.core.lock().close(conn, reason, inner.clock.now());
                    None
                }
                None => None,
            }
        };
        if let Some(work) = work {
            work.await;
        }
        inner.after();
    }
}

async fn handle(inner: &Arc<Inner>, conn: ConnId, who: &Principal, p: In) {
    let now = inner.clock.now();
    match p {
        In::Connect(_) => inner.core.lock().close(conn, Reason::Protocol, now),
        In::Unexpected(what) => {
            tracing::debug!(what, "MQTT client sent an unexpected packet");
            inner.core.lock().close(conn, Reason::Protocol, now);
        }
        In::Publish(p) => {
            let fwd = inner.core.lock().publish(conn, p, now);
            let Some(f) = fwd else {
                return;
            };
            let outcome = if !inner.allowed(who, Perm::Publish, f.topic.as_str()) {
                Outcome::NotAuthorized
            } else {
                match inner
                    .pubsub
                    .publish_mesh(
                        f.topic.as_str(),
                        f.payload.clone(),
                        PublishOptions::default(),
                    )
                    .await
                {
                    Ok(_) => Outcome::Published,
                    Err(e) => {
                        inner.counters.publish_failed.inc();
                        tracing::debug!(topic = %f.topic, error = %e, "MQTT publish refused by the mesh");
                        Outcome::Failed
                    }
                }
            };
            inner
                .core
                .lock()
                .published(conn, &f, outcome, inner.clock.now());
        }
        In::PubAck(id) => {
            inner.core.lock().puback(conn, id);
            inner.room.notify_waiters();
        }
        // The bridge never sends QoS 2: nothing waits for these.
        In::PubRec(_) | In::PubComp(_) => {}
        In::PubRel(id) => inner.core.lock().pubrel(conn, id),
        In::PingReq => inner.core.lock().ping(conn),
        In::Disconnect { with_will } => inner.core.lock().disconnect(conn, with_will, now),
        In::Subscribe { id, filters } => subscribe(inner, conn, who, id, filters).await,
        In::Unsubscribe { id, filters } => {
            let (removed, sid) = {
                let mut core = inner.core.lock();
                (core.unsubscribe(conn, id, &filters), core.session_of(conn))
            };
            if let Some(pumps) = sid.and_then(|s| {
                inner.pumps.lock().get_mut(&s).map(|p| {
                    removed
                        .iter()
                        .filter_map(|f| p.remove(f))
                        .collect::<Vec<_>>()
                })
            }) {
                for p in pumps {
                    p.abort();
                }
            }
        }
    }
}

async fn subscribe(
    inner: &Arc<Inner>,
    conn: ConnId,
    who: &Principal,
    id: u16,
    filters: Vec<(String, u8)>,
) {
    let (mut planned, sid) = {
        let mut core = inner.core.lock();
        (core.plan_subscribe(conn, &filters), core.session_of(conn))
    };
    let Some(sid) = sid else {
        return;
    };
    for p in &mut planned {
        let Ok(pattern) = &p.pattern else {
            continue;
        };
        if !inner.allowed(who, Perm::Subscribe, pattern.as_str()) {
            p.pattern = Err(SubCode::NotAuthorized);
            continue;
        }
        let pattern = pattern.clone();
        if !inner
            .start_pump(sid, p.filter.clone(), &pattern, p.qos)
            .await
        {
            p.pattern = Err(SubCode::Failed);
        }
    }
    inner.core.lock().subscribe(conn, id, planned);
    // The session may have ended while the mesh took the subscriptions.
    let gone = inner.core.lock().session_of(conn).is_none_or(|s| s != sid);
    if gone {
        if let Some(pumps) = inner.pumps.lock().remove(&sid) {
            for (_, p) in pumps {
                p.abort();
            }
        }
    }
}

/// Hands a mesh subscription's events to session `sid` at `qos`; a full
/// client queue stops it (QoS 1) until there is room.
async fn pump(inner: Weak<Inner>, sid: SessionId, qos: u8, mut sub: Subscription) {
    while let Some(item) = sub.next().await {
        let ev = match item {
            SubscriptionItem::Event(ev) => ev,
            SubscriptionItem::Lagged(n) => {
                if let Some(i) = inner.upgrade() {
                    i.counters.lagged.inc_by(n);
                }
                continue;
            }
        };
        loop {
            let Some(i) = inner.upgrade() else {
                return;
            };
            let room = i.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let d = i
                .core
                .lock()
                .deliver(sid, ev.topic.as_str(), ev.payload.clone(), qos);
            i.after();
            match d {
                macula_mqtt::Delivery::Full => {
                    // Bounded: look again at least once a second.
                    let _ = tokio::time::timeout(Duration::from_secs(1), room).await;
                }
                macula_mqtt::Delivery::Gone => return,
                _ => break,
            }
        }
    }
}

struct MqttCollector(Bridge);

impl std::fmt::Debug for MqttCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttCollector").finish()
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for MqttCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0 .0;
        let (s, clients, sessions, (retained, retained_bytes), queued) = {
            let core = inner.core.lock();
            (
                core.stats().clone(),
                core.clients(),
                core.sessions(),
                core.retained(),
                core.queued(),
            )
        };
        let c = &inner.counters;
        gauge(
            &mut e,
            "macula_mqtt_clients",
            "MQTT clients connected now (limit: mqtt_max_clients)",
            clients as i64,
        )?;
        gauge(
            &mut e,
            "macula_mqtt_parked",
            "MQTT clients connected and idle: no task, their socket in the bridge's idle poller",
            inner.parked.load(Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "macula_mqtt_sessions",
            "MQTT sessions kept, connected or not (limit: mqtt_max_sessions)",
            sessions as i64,
        )?;
        gauge(
            &mut e,
            "macula_mqtt_retained",
            "Retained MQTT messages kept on this node (limit: mqtt_max_retained)",
            retained as i64,
        )?;
        gauge(
            &mut e,
            "macula_mqtt_retained_bytes",
            "Payload bytes of the retained MQTT messages kept",
            retained_bytes as i64,
        )?;
        gauge(&mut e, "macula_mqtt_queued", "Messages queued or in flight to MQTT clients (limits: mqtt_queue_len, mqtt_max_inflight)", queued as i64)?;
        counter(
            &mut e,
            "macula_mqtt_connects",
            "MQTT CONNECTs accepted",
            s.connects,
        )?;
        {
            let mut f = e.encode_descriptor(
                "macula_mqtt_refused",
                "MQTT CONNECTs refused, by CONNACK reason (max_clients: mqtt_max_clients or mqtt_max_sessions)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in Refusal::ALL {
                ConstCounter::new(s.refused[r as usize])
                    .encode(f.encode_family(&[("reason", r.name())])?)?;
            }
        }
        {
            let mut f = e.encode_descriptor(
                "macula_mqtt_disconnects",
                "MQTT connections ended, by reason (packet_too_large: mqtt_max_packet_size; receive_maximum_exceeded: mqtt_max_inflight)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in Reason::ALL {
                ConstCounter::new(s.disconnects[r as usize])
                    .encode(f.encode_family(&[("reason", r.name())])?)?;
            }
        }
        counter(
            &mut e,
            "macula_mqtt_messages_in",
            "PUBLISH packets received from MQTT clients",
            s.messages_in,
        )?;
        counter(
            &mut e,
            "macula_mqtt_messages_out",
            "PUBLISH packets sent to MQTT clients (redeliveries not included)",
            s.messages_out,
        )?;
        counter(
            &mut e,
            "macula_mqtt_redelivered",
            "Unacknowledged QoS 1 messages sent again (DUP) to a reconnected client",
            s.redelivered,
        )?;
        {
            let mut f = e.encode_descriptor(
                "macula_mqtt_dropped",
                "Messages for MQTT clients dropped, by reason (queue_full: a QoS 0 message found mqtt_queue_len messages waiting; too_large: over the client's maximum packet size; retained_queue_full: a retained message replayed on subscribe found the queue full; lagged: a session's mesh subscription lost events)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, v) in [
                ("queue_full", s.dropped_queue_full),
                ("too_large", s.dropped_too_large),
                ("retained_queue_full", s.dropped_retained),
                ("lagged", c.lagged.get()),
            ] {
                ConstCounter::new(v).encode(f.encode_family(&[("reason", reason)])?)?;
            }
        }
        counter(&mut e, "macula_mqtt_queue_full_waits", "Times a QoS 1 message found a client's queue full (mqtt_queue_len): its mesh subscription waited", s.queue_full_waits)?;
        counter(&mut e, "macula_mqtt_inflight_full", "Times sending to an MQTT client waited for its inflight window (mqtt_max_inflight or the client's receive maximum)", s.inflight_full)?;
        counter(&mut e, "macula_mqtt_wills", "Last wills published", s.wills)?;
        counter(
            &mut e,
            "macula_mqtt_retained_refused",
            "Retained messages not kept (mqtt_max_retained, mqtt_max_retained_bytes)",
            s.retained_refused,
        )?;
        counter(
            &mut e,
            "macula_mqtt_sessions_expired",
            "Disconnected persistent sessions that expired",
            s.sessions_expired,
        )?;
        counter(
            &mut e,
            "macula_mqtt_sessions_evicted",
            "Disconnected sessions dropped to make room (mqtt_max_sessions)",
            s.sessions_evicted,
        )?;
        counter(&mut e, "macula_mqtt_subscriptions_refused", "Topic filters refused in SUBACK (invalid, mqtt_max_subscriptions, permissions, the mesh)", s.subscriptions_refused)?;
        counter(
            &mut e,
            "macula_mqtt_publish_failed",
            "MQTT publishes (and wills) the mesh refused",
            c.publish_failed.get(),
        )?;
        counter(
            &mut e,
            "macula_mqtt_denied",
            "MQTT requests refused by the realm's permissions",
            c.denied.get(),
        )?;
        counter(
            &mut e,
            "macula_mqtt_no_connect",
            "MQTT connections closed before a valid CONNECT (timeout, garbage)",
            c.no_connect.get(),
        )?;
        counter(
            &mut e,
            "macula_mqtt_tls_failed",
            "MQTT TLS handshakes that failed",
            c.tls_failed.get(),
        )?;
        counter(
            &mut e,
            "macula_mqtt_sessions_restored",
            "Persistent MQTT sessions taken back from the data directory at start",
            c.restored.get(),
        )?;
        counter(
            &mut e,
            "macula_mqtt_session_saves_failed",
            "Writes of the persistent MQTT sessions file that failed, and files that could not be read back",
            c.save_failed.get(),
        )?;
        Ok(())
    }
}

/// Writes `sessions` to `path` whole: a temporary file beside it, synced,
/// then renamed over it.
fn write_sessions(
    path: &std::path::Path,
    sessions: &[macula_mqtt::SavedSession],
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    serde_json::to_writer(std::io::BufWriter::new(&mut f), sessions)?;
    f.flush()?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use macula_wire::NodeId;

    async fn bridge(config: MqttConfig) -> (Bridge, watch::Sender<bool>) {
        let ps = PubSub::new(
            NodeId::from_bytes([7; 32]),
            1 << 20,
            macula_pubsub::Limits::default(),
        );
        let (stop, shutdown) = watch::channel(false);
        let parts = Parts {
            pubsub: ps,
            clock: Clock::new(),
            authz: None,
            gate: None,
            tls: None,
            dir: None,
        };
        let b = Bridge::start(&config, "127.0.0.1:0".parse().unwrap(), parts, shutdown)
            .await
            .unwrap();
        (b, stop)
    }

    #[tokio::test]
    async fn every_metric_family_is_exported_once() {
        let (b, _stop) = bridge(MqttConfig::default()).await;
        let mut r = Registry::default();
        b.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert_eq!(text.matches("# TYPE macula_mqtt_").count(), 26, "{text}");
        assert_eq!(text.matches("# HELP macula_mqtt_").count(), 26);
        for reason in Reason::ALL {
            assert!(
                text.contains(&format!(
                    "macula_mqtt_disconnects_total{{reason=\"{}\"}} 0",
                    reason.name()
                )),
                "{text}"
            );
        }
        assert!(text.contains("macula_mqtt_refused_total{reason=\"max_clients\"} 0"));
        assert!(text.contains("macula_mqtt_clients 0"));
    }

    /// A CONNECT with credentials not on the list gets CONNACK 4 (3.1.1),
    /// counted; one on the list is accepted.
    #[tokio::test]
    async fn users_list_is_checked() {
        let config = MqttConfig {
            users: vec![("dev".into(), "s3cret".into())],
            ..MqttConfig::default()
        };
        let (b, _stop) = bridge(config).await;
        let connect = |user: &str, pass: &str| {
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60, 0, 1, b'c'];
            for f in [user, pass] {
                body.extend_from_slice(&(f.len() as u16).to_be_bytes());
                body.extend_from_slice(f.as_bytes());
            }
            let mut p = vec![0x10, body.len() as u8];
            p.extend(body);
            p
        };
        for (user, pass, code) in [("dev", "wrong", 4u8), ("dev", "s3cret", 0)] {
            let mut s = tokio::net::TcpStream::connect(b.local_addr())
                .await
                .unwrap();
            s.write_all(&connect(user, pass)).await.unwrap();
            let mut ack = [0u8; 4];
            s.read_exact(&mut ack).await.unwrap();
            assert_eq!(ack, [0x20, 2, 0, code], "{user}:{pass}");
        }
        let core = b.0.core.lock();
        assert_eq!(core.stats().refused[Refusal::BadCredentials as usize], 1);
        assert_eq!(core.stats().connects, 1);
    }

    /// Shutting down tells every 5.0 client (DISCONNECT 0x8B) and closes.
    #[tokio::test]
    async fn shutdown_disconnects_every_client() {
        let (b, stop) = bridge(MqttConfig::default()).await;
        let mut s = tokio::net::TcpStream::connect(b.local_addr())
            .await
            .unwrap();
        let connect = [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 0];
        s.write_all(&connect).await.unwrap();
        let mut ack = [0u8; 2];
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack[0], 0x20);
        let mut rest = vec![0u8; usize::from(ack[1])];
        s.read_exact(&mut rest).await.unwrap();
        stop.send(true).unwrap();
        let mut d = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut d))
            .await
            .expect("DISCONNECT in time")
            .unwrap();
        assert_eq!((d[0], d[2]), (0xe0, 0x8b), "{d:?}");
        let mut more = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut more))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert!(n <= 1, "closed after the DISCONNECT");
    }

    /// A 3.1.1 CONNECT for `id` with `keep_alive` seconds and, if given,
    /// a will (QoS 0) on `will`.
    fn connect_v3(id: &str, keep_alive: u16, will: Option<(&str, &[u8])>) -> Vec<u8> {
        let flags = if will.is_some() { 0x06 } else { 0x02 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
        body.extend_from_slice(&keep_alive.to_be_bytes());
        body.extend_from_slice(&(id.len() as u16).to_be_bytes());
        body.extend_from_slice(id.as_bytes());
        if let Some((topic, payload)) = will {
            body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            body.extend_from_slice(payload);
        }
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    async fn client(b: &Bridge, connect: &[u8]) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(b.local_addr())
            .await
            .unwrap();
        s.write_all(connect).await.unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0]);
        s
    }

    async fn subscribe(s: &mut tokio::net::TcpStream, topic: &str) {
        let mut p = vec![0x82, (topic.len() + 5) as u8, 0, 1];
        p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        p.extend_from_slice(topic.as_bytes());
        p.push(0);
        s.write_all(&p).await.unwrap();
        let mut ack = [0u8; 5];
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [0x90, 3, 0, 1, 0]);
    }

    /// How many connections are parked and how many run.
    fn slots(b: &Bridge) -> (usize, usize) {
        let conns = b.0.conns.lock();
        let parked = conns
            .values()
            .filter(|s| matches!(s, Slot::Parked(_)))
            .count();
        assert_eq!(b.0.parked.load(Relaxed) as usize, parked, "the gauge");
        (parked, conns.len() - parked)
    }

    /// Waits (bounded) until `n` connections are parked and none runs.
    async fn all_parked(b: &Bridge, n: usize) {
        for _ in 0..200 {
            if slots(b) == (n, 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("not parked: {:?} (parked, running)", slots(b));
    }

    async fn read_within(s: &mut tokio::net::TcpStream, buf: &mut [u8]) {
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(buf))
            .await
            .expect("in time")
            .unwrap();
    }

    /// An idle connection has no task (parked in the idle poller), and a
    /// parked one still gets what it is sent (a delivery: the core wakes
    /// it) and answers what it sends (a PINGREQ: its socket wakes it); it
    /// parks again afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_connection_gets_deliveries_and_answers() {
        let (b, _stop) = bridge(MqttConfig::default()).await;
        let mut sub = client(&b, &connect_v3("sub", 60, None)).await;
        subscribe(&mut sub, "a/b").await;
        let mut publ = client(&b, &connect_v3("pub", 60, None)).await;
        all_parked(&b, 2).await;
        publ.write_all(&[0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'])
            .await
            .unwrap();
        let mut got = [0u8; 9];
        read_within(&mut sub, &mut got).await;
        assert_eq!(got, [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
        all_parked(&b, 2).await;
        sub.write_all(&[0xc0, 0]).await.unwrap();
        let mut pong = [0u8; 2];
        read_within(&mut sub, &mut pong).await;
        assert_eq!(pong, [0xd0, 0]);
        all_parked(&b, 2).await;
        // A parked client that goes away is gone from the table.
        drop(publ);
        all_parked(&b, 1).await;
        assert_eq!(b.0.core.lock().clients(), 1);
    }

    /// A parked connection's keep-alive still runs out (the sweep): it is
    /// closed and its will published to a subscriber, itself parked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parked_connection_times_out_with_its_will() {
        let (b, _stop) = bridge(MqttConfig::default()).await;
        let mut watcher = client(&b, &connect_v3("watcher", 60, None)).await;
        subscribe(&mut watcher, "wills").await;
        let mut quiet = client(&b, &connect_v3("quiet", 1, Some(("wills", b"bye")))).await;
        all_parked(&b, 2).await;
        // Keep-alive 1 s: closed 1.5 s after the CONNECT, at a sweep.
        let mut rest = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), quiet.read(&mut rest))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "3.1.1: closed without a DISCONNECT");
        let mut will = [0u8; 12];
        read_within(&mut watcher, &mut will).await;
        assert_eq!(&will[..], b"\x30\x0a\x00\x05willsbye");
        assert_eq!(
            b.0.core.lock().stats().disconnects[Reason::KeepAlive as usize],
            1
        );
        all_parked(&b, 1).await;
    }
}
