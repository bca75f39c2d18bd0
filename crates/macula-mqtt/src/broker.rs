//! The MQTT session core: every decision of the bridge, for every client
//! of one node, with time as an argument and no I/O (as the pub/sub core).
//!
//! The runtime feeds it what clients send (`connect`, `publish` then
//! `published`, `plan_subscribe` then `subscribe`, `unsubscribe`,
//! `puback`, `pubrel`, `ping`, `disconnect`, `closed`, `close`), what the
//! mesh delivers (`deliver`), and time (`poll_timeout`/`handle_timeout` per
//! connection, `expire` for sessions). It takes out packets per connection
//! (`poll_transmit`) and the events that need the runtime
//! (`poll_event`: wills to publish, sessions whose mesh subscriptions to
//! drop, connections to wake or close).
//!
//! Sessions: a clean session (3.1.1 `clean_session`, 5.0 session expiry 0)
//! ends with its connection; a persistent one keeps its subscriptions, its
//! queued messages and its unacknowledged QoS 1 messages (resent with DUP
//! on reconnect, in order, then the queue) until it expires
//! (`Limits::session_expiry_max` at most) or a clean connect replaces it.
//! Sessions live in this process's memory: they survive a client's
//! reconnect to the same node. For a node restart the runtime saves the
//! persistent ones (`saved_sessions`, `changes` says when) and gives them
//! back to the next process (`restore`).
//!
//! Flow control towards a client: at most `min(max_inflight, the client's
//! receive maximum)` QoS 1 messages wait for PUBACK; behind them at most
//! `queue_len` messages wait. A QoS 0 message finding the queue full is
//! dropped and counted; a QoS 1 message is not taken (`Delivery::Full`):
//! the runtime stops reading that mesh subscription until there is room,
//! so the mesh's own slow-subscriber policy applies (the publisher is held
//! back up to its bound, then the oldest events are dropped and counted as
//! lagged).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use macula_pubsub::{Pattern, Topic};
use macula_wire::Millis;

use crate::topic::{filter_to_mesh, mesh_to_mqtt, mqtt_to_mesh};

/// One connection, numbered by the runtime.
pub type ConnId = u64;
/// One session incarnation (a new number each time a session is created).
pub type SessionId = u64;

/// The MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 3.1 or 3.1.1.
    V3,
    V5,
}

/// Limits of the bridge on one node; each has a metric when hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connected clients at once; more are refused (CONNACK 3 / 0x89).
    pub max_clients: usize,
    /// Sessions kept (connected and not); a new one past it replaces the
    /// disconnected session expiring first, or is refused when all are
    /// connected.
    pub max_sessions: usize,
    /// Largest packet accepted from a client (its remaining length), and
    /// announced in a 5.0 CONNACK; larger closes the client (0x95).
    pub max_packet_size: u32,
    /// QoS 1 messages sent to a client and not yet acknowledged; also the
    /// receive maximum announced to 5.0 clients (their QoS 2 publishes
    /// waiting for PUBREL; over it: DISCONNECT 0x93).
    pub max_inflight: u16,
    /// Messages queued for one client behind its inflight window.
    pub queue_len: usize,
    /// Subscriptions (topic filters) of one session (over it: SUBACK
    /// 0x80 / 0x97).
    pub max_subscriptions: usize,
    /// Retained messages this node keeps (over it: not retained, counted).
    pub max_retained: usize,
    /// Payload bytes of the retained messages this node keeps.
    pub max_retained_bytes: usize,
    /// Longest a disconnected persistent session is kept (3.1.1 sessions
    /// get this; 5.0 ones the smaller of this and what they ask).
    pub session_expiry_max: Millis,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 10_000,
            max_sessions: 20_000,
            max_packet_size: 256 * 1024,
            max_inflight: 32,
            queue_len: 1000,
            max_subscriptions: 100,
            max_retained: 10_000,
            max_retained_bytes: 64 << 20,
            session_expiry_max: Millis::from_secs(3600),
        }
    }
}

/// A last will, as the client gave it (MQTT topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// What a CONNECT says, version-neutral.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    /// Seconds; 0: none.
    pub keep_alive: u16,
    /// 5.0's session expiry interval in seconds (`None` for 3.1.1).
    pub session_expiry: Option<u32>,
    /// 5.0's receive maximum.
    pub receive_max: Option<u16>,
    /// 5.0's maximum packet size the client accepts.
    pub max_packet_size: Option<u32>,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

/// An MQTT PUBLISH from a client, version-neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<u16>,
}

/// A message queued for a client (MQTT topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// Why a CONNECT is refused (CONNACK codes for both versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 3.1.1: 2, 5.0: 0x85.
    ClientIdRejected,
    /// 3.1.1: 4, 5.0: 0x86.
    BadCredentials,
    /// 3.1.1: 5, 5.0: 0x87.
    NotAuthorized,
    /// `max_clients` or `max_sessions` reached. 3.1.1: 3, 5.0: 0x89.
    ServerBusy,
    /// The API-key failure limit. 3.1.1: 3, 5.0: 0x9F.
    RateLimited,
}

impl Refusal {
    /// Its label in `macula_mqtt_refused_total{reason}`.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::ClientIdRejected => "client_id",
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::ServerBusy => "max_clients",
            Refusal::RateLimited => "rate_limited",
        }
    }
    pub const ALL: [Refusal; 5] = [
        Refusal::ClientIdRejected,
        Refusal::BadCredentials,
        Refusal::NotAuthorized,
        Refusal::ServerBusy,
        Refusal::RateLimited,
    ];
}

/// Why a connection ends (the 5.0 DISCONNECT reason the server sends;
/// 3.1.1 has none: the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client sent DISCONNECT (or the connection closed without one:
    /// `Gone`).
    Normal,
    Gone,
    KeepAlive,
    Malformed,
    PacketTooLarge,
    Protocol,
    TakenOver,
    ReceiveMaxExceeded,
    NotAuthorized,
    TopicInvalid,
    ShuttingDown,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Normal,
        Reason::Gone,
        Reason::KeepAlive,
        Reason::Malformed,
        Reason::PacketTooLarge,
        Reason::Protocol,
        Reason::TakenOver,
        Reason::ReceiveMaxExceeded,
        Reason::NotAuthorized,
        Reason::TopicInvalid,
        Reason::ShuttingDown,
    ];

    /// Its label in `macula_mqtt_disconnects_total{reason}`.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Normal => "normal",
            Reason::Gone => "connection_lost",
            Reason::KeepAlive => "keep_alive_timeout",
            Reason::Malformed => "malformed_packet",
            Reason::PacketTooLarge => "packet_too_large",
            Reason::Protocol => "protocol_error",
            Reason::TakenOver => "session_taken_over",
            Reason::ReceiveMaxExceeded => "receive_maximum_exceeded",
            Reason::NotAuthorized => "not_authorized",
            Reason::TopicInvalid => "topic_name_invalid",
            Reason::ShuttingDown => "server_shutting_down",
        }
    }

    /// The 5.0 reason code.
    pub fn code(self) -> u8 {
        match self {
            Reason::Normal | Reason::Gone => 0x00,
            Reason::KeepAlive => 0x8D,
            Reason::Malformed => 0x81,
            Reason::PacketTooLarge => 0x95,
            Reason::Protocol => 0x82,
            Reason::TakenOver => 0x8E,
            Reason::ReceiveMaxExceeded => 0x93,
            Reason::NotAuthorized => 0x87,
            Reason::TopicInvalid => 0x90,
            Reason::ShuttingDown => 0x8B,
        }
    }
}

/// A PUBACK / PUBREC reason (5.0; 3.1.1 has only success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    Success,
    /// 0x87.
    NotAuthorized,
    /// 0x90.
    TopicInvalid,
    /// 0x80: the mesh refused it (payload too large, ...).
    Unspecified,
}

/// A SUBACK entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubCode {
    Granted(u8),
    /// 5.0: 0x87.
    NotAuthorized,
    /// 5.0: 0x8F.
    FilterInvalid,
    /// 5.0: 0x97 (`max_subscriptions`).
    Quota,
    /// 5.0: 0x80.
    Failed,
}

/// A packet for a client, version-neutral (`codec.rs` encodes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    ConnAck {
        session_present: bool,
        assigned_client_id: Option<String>,
    },
    Publish {
        msg: Msg,
        packet_id: Option<u16>,
        dup: bool,
    },
    PubAck {
        id: u16,
        code: AckCode,
    },
    PubRec {
        id: u16,
        code: AckCode,
    },
    PubComp {
        id: u16,
        found: bool,
    },
    SubAck {
        id: u16,
        codes: Vec<SubCode>,
    },
    UnsubAck {
        id: u16,
        found: Vec<bool>,
    },
    PingResp,
    /// 5.0 sends it; 3.1.1 just closes. The connection ends after it.
    Disconnect(Reason),
}

/// What the runtime has to do besides writing packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Publish a will into the mesh (its retained copy is already kept).
    Will { topic: Topic, payload: Bytes },
    /// The session ended: drop its mesh subscriptions.
    SessionGone(SessionId),
    /// The connection has packets to write.
    Wake(ConnId),
    /// The connection must write what is queued and close (its session
    /// was taken over).
    Close(ConnId),
}

/// What `deliver` did with a message from the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued; the connection (if connected) was woken.
    Queued,
    /// QoS 0 and the queue is full: dropped, counted.
    Dropped,
    /// QoS 1 and the queue is full: not taken; try again when there is
    /// room (`room_generation` changes).
    Full,
    /// No such session (it ended): nothing to do.
    Gone,
}

/// A publish from a client to put into the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub topic: Topic,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub packet_id: Option<u16>,
}

/// The mesh's answer to a forwarded publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Published,
    NotAuthorized,
    Failed,
}

/// One filter of a SUBSCRIBE once planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub filter: String,
    /// The mesh pattern, or why the filter is refused.
    pub pattern: Result<Pattern, SubCode>,
    /// The QoS granted: the one asked, at most 1.
    pub qos: u8,
}

/// Counters of the bridge (exported as `macula_mqtt_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub connects: u64,
    pub refused: [u64; Refusal::ALL.len()],
    pub disconnects: [u64; Reason::ALL.len()],
    pub messages_in: u64,
    pub messages_out: u64,
    /// QoS 0 messages dropped for a full client queue.
    pub dropped_queue_full: u64,
    /// Messages larger than the client's maximum packet size.
    pub dropped_too_large: u64,
    /// Retained messages replayed on subscribe that found the queue full.
    pub dropped_retained: u64,
    /// Times a QoS 1 message found the client queue full (the mesh
    /// subscription waits).
    pub queue_full_waits: u64,
    /// Times a message waited because the inflight window was full.
    pub inflight_full: u64,
    pub redelivered: u64,
    pub wills: u64,
    pub retained_refused: u64,
    pub sessions_expired: u64,
    pub sessions_evicted: u64,
    pub subscriptions_refused: u64,
}

/// A persistent session as it is kept across a node restart
/// (`Broker::saved_sessions`, `Broker::restore`): MQTT topics and filters,
/// nothing of the process that saved it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SavedSession {
    pub client_id: String,
    /// Topic filters (MQTT) and their granted QoS.
    pub subs: Vec<(String, u8)>,
    /// Sent and not acknowledged: packet ID and message, in send order
    /// (sent again with DUP when the client comes back).
    pub inflight: Vec<(u16, SavedMsg)>,
    /// Waiting behind them.
    pub queue: Vec<SavedMsg>,
    pub next_pid: u16,
    /// The session's expiry interval, milliseconds.
    pub expiry_ms: u64,
    /// Time it had left when saved (milliseconds); a session connected then
    /// has its whole expiry.
    pub left_ms: u64,
}

/// A message of a [`SavedSession`] (MQTT topic).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SavedMsg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

impl From<&Msg> for SavedMsg {
    fn from(m: &Msg) -> SavedMsg {
        SavedMsg {
            topic: m.topic.clone(),
            payload: m.payload.to_vec(),
            qos: m.qos,
            retain: m.retain,
        }
    }
}

impl From<SavedMsg> for Msg {
    fn from(m: SavedMsg) -> Msg {
        Msg {
            topic: m.topic,
            payload: Bytes::from(m.payload),
            qos: m.qos.min(1),
            retain: m.retain,
        }
    }
}

/// A restored session's subscriptions, for the runtime to subscribe in the
/// mesh: (filter, mesh pattern, QoS).
pub type RestoredSubs = Vec<(String, Pattern, u8)>;

struct Session {
    id: SessionId,
    /// Boxed (no spare capacity), as the key of `by_client`.
    client_id: Box<str>,
    conn: Option<ConnId>,
    subs: Vec<(String, Pattern, u8)>,
    queue: VecDeque<Msg>,
    /// Sent, waiting for PUBACK, in send order.
    inflight: VecDeque<(u16, Msg)>,
    next_pid: u16,
    /// Inbound QoS 2 packet IDs published, waiting for PUBREL.
    qos2_in: Vec<u16>,
    /// Kept this long after its connection ends (0: ends with it).
    expiry: Millis,
    expires_at: Option<Millis>,
}

/// Kept small (72 bytes): an idle client holds one of these and its
/// session, and little else.
struct Conn {
    /// Session IDs start at 1 (`next_session`): `None` costs no space.
    session: Option<std::num::NonZeroU64>,
    version: Version,
    /// Milliseconds (1.5 times the keep-alive of at most 65,535 s fits).
    keep_alive_ms: u32,
    last_rx: Millis,
    out: VecDeque<Out>,
    window: u16,
    client_max_packet: u32,
    /// Boxed: most clients have none, and an idle connection then carries
    /// a pointer, not a whole will.
    will: Option<Box<Will>>,
    closing: bool,
}

impl Conn {
    fn sid(&self) -> Option<SessionId> {
        self.session.map(|s| s.get())
    }

    fn keep_alive(&self) -> Millis {
        Millis(u64::from(self.keep_alive_ms))
    }
}

/// The bridge's state on one node. See the module docs.
pub struct Broker {
    limits: Limits,
    /// Boxed values: a map's spare buckets (up to half of them just after
    /// it grew) then cost a pointer each, not a whole entry.
    conns: HashMap<ConnId, Box<Conn>>,
    sessions: HashMap<SessionId, Box<Session>>,
    by_client: HashMap<Box<str>, SessionId>,
    retained: std::collections::BTreeMap<String, (Topic, Msg)>,
    retained_bytes: usize,
    next_session: SessionId,
    events: VecDeque<Event>,
    stats: Stats,
    clients: usize,
    /// Changes whenever queue room may have appeared.
    room: u64,
    /// Changes whenever a persistent session changed (what is saved).
    changes: u64,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("clients", &self.clients)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Broker {
    pub fn new(limits: Limits) -> Broker {
        Broker {
            limits,
            conns: HashMap::new(),
            sessions: HashMap::new(),
            by_client: HashMap::new(),
            retained: Default::default(),
            retained_bytes: 0,
            next_session: 1,
            events: VecDeque::new(),
            stats: Stats::default(),
            clients: 0,
            room: 0,
            changes: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Sessions kept (connected or not).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Retained messages kept, and their payload bytes.
    pub fn retained(&self) -> (usize, usize) {
        (self.retained.len(), self.retained_bytes)
    }

    /// Messages queued or in flight for all sessions.
    pub fn queued(&self) -> usize {
        self.sessions
            .values()
            .map(|s| s.queue.len() + s.inflight.len())
            .sum()
    }

    /// Changes whenever room may have appeared in a client queue.
    pub fn room_generation(&self) -> u64 {
        self.room
    }

    /// Changes whenever what `saved_sessions` returns may have changed.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Every persistent session (connected or not), as a node restart
    /// keeps it: a connected one gets its whole expiry from now.
    pub fn saved_sessions(&self, now: Millis) -> Vec<SavedSession> {
        let mut v: Vec<SavedSession> = self
            .sessions
            .values()
            .filter(|s| s.expiry > Millis::ZERO)
            .map(|s| SavedSession {
                client_id: s.client_id.to_string(),
                subs: s.subs.iter().map(|(f, _, q)| (f.clone(), *q)).collect(),
                inflight: s.inflight.iter().map(|(p, m)| (*p, m.into())).collect(),
                queue: s.queue.iter().map(SavedMsg::from).collect(),
                next_pid: s.next_pid,
                expiry_ms: s.expiry.0,
                left_ms: match (s.conn, s.expires_at) {
                    (None, Some(t)) => t.0.saturating_sub(now.0),
                    _ => s.expiry.0,
                },
            })
            .collect();
        v.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        v
    }

    /// Takes back sessions a previous process saved, disconnected, each
    /// expiring after the time it had left. Each is checked against this
    /// node's limits: a client ID already in use, an expired one, or one
    /// past `max_sessions` is left out; filters that are invalid or past
    /// `max_subscriptions` are dropped, as are messages past `max_inflight`
    /// and `queue_len`. Returns each restored session with the
    /// subscriptions to make in the mesh.
    pub fn restore(
        &mut self,
        saved: Vec<SavedSession>,
        now: Millis,
    ) -> Vec<(SessionId, RestoredSubs)> {
        let mut out = Vec::new();
        for mut x in saved {
            let expiry = Millis(x.expiry_ms).min(self.limits.session_expiry_max);
            let left = Millis(x.left_ms).min(expiry);
            if x.client_id.is_empty()
                || expiry == Millis::ZERO
                || left == Millis::ZERO
                || self.by_client.contains_key(x.client_id.as_str())
                || self.sessions.len() >= self.limits.max_sessions
            {
                continue;
            }
            let mut subs: RestoredSubs = Vec::new();
            for (f, q) in x.subs {
                if subs.len() >= self.limits.max_subscriptions
                    || subs.iter().any(|(g, _, _)| *g == f)
                {
                    continue;
                }
                if let Ok(p) = filter_to_mesh(&f) {
                    subs.push((f, p, q.min(1)));
                }
            }
            x.inflight.truncate(usize::from(self.limits.max_inflight));
            x.queue.truncate(self.limits.queue_len);
            let mut inflight: VecDeque<(u16, Msg)> = VecDeque::new();
            for (pid, m) in x.inflight {
                if pid != 0 && m.qos > 0 && !inflight.iter().any(|(p, _)| *p == pid) {
                    inflight.push_back((pid, m.into()));
                }
            }
            let sid = self.next_session;
            self.next_session += 1;
            let client_id: Box<str> = x.client_id.into();
            self.by_client.insert(client_id.clone(), sid);
            self.sessions.insert(
                sid,
                Box::new(Session {
                    id: sid,
                    client_id,
                    conn: None,
                    subs: subs.clone(),
                    queue: x.queue.into_iter().map(Msg::from).collect(),
                    inflight,
                    next_pid: x.next_pid.max(1),
                    qos2_in: Vec::new(),
                    expiry,
                    expires_at: Some(now.saturating_add(left)),
                }),
            );
            self.changes += 1;
            out.push((sid, subs));
        }
        out
    }

    /// Counts a refusal the runtime decided (credentials, permissions).
    pub fn refused(&mut self, why: Refusal) {
        self.stats.refused[why as usize] += 1;
    }

    /// A CONNECT on `conn`, already authenticated by the runtime. Queues
    /// the CONNACK (and, for a resumed session, its unacknowledged
    /// messages, DUP set) or returns the refusal.
    pub fn connect(
        &mut self,
        conn: ConnId,
        version: Version,
        c: Connect,
        now: Millis,
    ) -> Result<SessionId, Refusal> {
        let mut client_id = c.client_id;
        let mut assigned = None;
        if client_id.is_empty() {
            if !c.clean_start && version == Version::V3 {
                self.refused(Refusal::ClientIdRejected);
                return Err(Refusal::ClientIdRejected);
            }
            client_id = format!("macula-{conn}");
            if version == Version::V5 {
                assigned = Some(client_id.clone());
            }
        }
        let existing = self.by_client.get(client_id.as_str()).copied();
        let taking_over = existing
            .and_then(|s| self.sessions.get(&s))
            .is_some_and(|s| s.conn.is_some());
        if !taking_over && self.clients >= self.limits.max_clients {
            self.refused(Refusal::ServerBusy);
            return Err(Refusal::ServerBusy);
        }
        if existing.is_none()
            && self.sessions.len() >= self.limits.max_sessions
            && !self.evict_one()
        {
            self.refused(Refusal::ServerBusy);
            return Err(Refusal::ServerBusy);
        }
        let expiry = match (version, c.session_expiry) {
            (Version::V3, _) if c.clean_start => Millis::ZERO,
            (Version::V3, _) => self.limits.session_expiry_max,
            (Version::V5, None) => Millis::ZERO,
            (Version::V5, Some(s)) => {
                Millis::from_secs(u64::from(s)).min(self.limits.session_expiry_max)
            }
        };
        // Take an existing session's connection away.
        if let Some(sid) = existing {
            let old = self.sessions.get_mut(&sid).and_then(|s| s.conn.take());
            if let Some(old) = old {
                self.detach(old, Reason::TakenOver, now);
            }
        }
        let mut present = false;
        let sid = match existing {
            Some(sid) if !c.clean_start && self.sessions.contains_key(&sid) => {
                present = true;
                sid
            }
            other => {
                if let Some(sid) = other {
                    self.end_session(sid);
                }
                let sid = self.next_session;
                self.next_session += 1;
                self.sessions.insert(
                    sid,
                    Box::new(Session {
                        id: sid,
                        client_id: client_id.as_str().into(),
                        conn: None,
                        subs: Vec::new(),
                        queue: VecDeque::new(),
                        inflight: VecDeque::new(),
                        next_pid: 1,
                        qos2_in: Vec::new(),
                        expiry,
                        expires_at: None,
                    }),
                );
                self.by_client.insert(client_id.into(), sid);
                sid
            }
        };
        let window = c
            .receive_max
            .unwrap_or(u16::MAX)
            .min(self.limits.max_inflight)
            .max(1);
        let mut out = VecDeque::new();
        out.push_back(Out::ConnAck {
            session_present: present,
            assigned_client_id: assigned,
        });
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.conn = Some(conn);
            s.expiry = expiry;
            s.expires_at = None;
            for (pid, msg) in &s.inflight {
                self.stats.redelivered += 1;
                out.push_back(Out::Publish {
                    msg: msg.clone(),
                    packet_id: Some(*pid),
                    dup: true,
                });
            }
        }
        self.conns.insert(
            conn,
            Box::new(Conn {
                session: std::num::NonZeroU64::new(sid),
                version,
                keep_alive_ms: u32::from(c.keep_alive) * 1500,
                last_rx: now,
                out,
                window,
                client_max_packet: c.max_packet_size.unwrap_or(u32::MAX),
                will: c.will.map(Box::new),
                closing: false,
            }),
        );
        self.clients += 1;
        self.stats.connects += 1;
        self.changes += 1;
        Ok(sid)
    }

    /// Drops the disconnected session that expires first; false if every
    /// session is connected.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .sessions
            .values()
            .filter(|s| s.conn.is_none())
            .min_by_key(|s| (s.expires_at, s.id))
            .map(|s| s.id);
        match victim {
            Some(sid) => {
                self.end_session(sid);
                self.stats.sessions_evicted += 1;
                true
            }
            None => false,
        }
    }

    fn end_session(&mut self, sid: SessionId) {
        if let Some(s) = self.sessions.remove(&sid) {
            if s.expiry > Millis::ZERO {
                self.changes += 1;
            }
            if self.by_client.get(&s.client_id) == Some(&sid) {
                self.by_client.remove(&s.client_id);
            }
            self.events.push_back(Event::SessionGone(sid));
        }
    }

    /// Ends `conn`'s hold on its session: the will (unless `reason` is a
    /// normal DISCONNECT), the session kept or ended, the closing packet
    /// queued. The connection entry stays until `closed`.
    fn detach(&mut self, conn: ConnId, reason: Reason, now: Millis) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        let will = match reason {
            Reason::Normal => None,
            _ => c.will.take(),
        };
        if reason != Reason::Gone && reason != Reason::Normal {
            c.out.push_back(Out::Disconnect(reason));
        }
        self.stats.disconnects[reason as usize] += 1;
        let sid = c.session.take().map(|s| s.get());
        self.clients = self.clients.saturating_sub(1);
        if !matches!(reason, Reason::Gone | Reason::Normal) {
            // Its task writes the DISCONNECT and closes (it may be idle:
            // taken over, or its keep-alive ran out).
            self.events.push_back(Event::Close(conn));
        }
        if let Some(will) = will {
            self.publish_will(*will);
        }
        if let Some(sid) = sid {
            let end = match self.sessions.get_mut(&sid) {
                Some(s) if s.conn == Some(conn) || s.conn.is_none() => {
                    s.conn = None;
                    if s.expiry == Millis::ZERO {
                        true
                    } else {
                        s.expires_at = Some(now.saturating_add(s.expiry));
                        self.changes += 1;
                        false
                    }
                }
                _ => false,
            };
            if end {
                self.end_session(sid);
            }
        }
    }

    fn publish_will(&mut self, will: Will) {
        // Checked at CONNECT (the runtime refuses a will it may not send).
        let Ok(topic) = mqtt_to_mesh(&will.topic) else {
            return;
        };
        self.stats.wills += 1;
        if will.retain {
            self.retain(
                &topic,
                Msg {
                    topic: will.topic.clone(),
                    payload: will.payload.clone(),
                    qos: will.qos.min(1),
                    retain: true,
                },
            );
        }
        self.events.push_back(Event::Will {
            topic,
            payload: will.payload,
        });
    }

    /// Keeps (or, for an empty payload, deletes) the retained message of
    /// `topic`.
    fn retain(&mut self, topic: &Topic, msg: Msg) {
        if let Some((_, old)) = self.retained.remove(topic.as_str()) {
            self.retained_bytes -= old.payload.len();
        }
        if msg.payload.is_empty() {
            return;
        }
        if self.retained.len() >= self.limits.max_retained
            || self.retained_bytes + msg.payload.len() > self.limits.max_retained_bytes
        {
            self.stats.retained_refused += 1;
            return;
        }
        self.retained_bytes += msg.payload.len();
        self.retained
            .insert(topic.as_str().to_string(), (topic.clone(), msg));
    }

    /// Any packet arrived on `conn` (keep-alive).
    pub fn received(&mut self, conn: ConnId, now: Millis) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_rx = now;
        }
    }

    /// The version `conn` speaks, once connected.
    pub fn version(&self, conn: ConnId) -> Option<Version> {
        self.conns.get(&conn).map(|c| c.version)
    }

    /// The largest packet `conn`'s client accepts (`u32::MAX`: it set
    /// none), once connected.
    pub fn client_max_packet(&self, conn: ConnId) -> Option<u32> {
        self.conns.get(&conn).map(|c| c.client_max_packet)
    }

    /// Whether `conn` is closing (write what is queued, then close).
    pub fn is_closing(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_none_or(|c| c.closing)
    }

    /// The session `conn` is attached to.
    pub fn session_of(&self, conn: ConnId) -> Option<SessionId> {
        self.conns.get(&conn).and_then(|c| c.sid())
    }

    /// The runtime (or the client's input) ends `conn` for `reason`: 5.0
    /// clients get a DISCONNECT with it.
    pub fn close(&mut self, conn: ConnId, reason: Reason, now: Millis) {
        self.detach(conn, reason, now);
    }

    /// Ends every connection for `reason` (the node shuts down).
    pub fn close_all(&mut self, reason: Reason, now: Millis) {
        let all: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in all {
            self.detach(conn, reason, now);
        }
    }

    /// The client sent DISCONNECT (`with_will`: 5.0 reason 0x04).
    pub fn disconnect(&mut self, conn: ConnId, with_will: bool, now: Millis) {
        if !with_will {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.will = None;
            }
        }
        self.detach(conn, Reason::Normal, now);
        if with_will {
            // detach(Normal) publishes no will: send it here.
            if let Some(w) = self.conns.get_mut(&conn).and_then(|c| c.will.take()) {
                self.publish_will(*w);
            }
        }
    }

    /// The connection is gone (after `close`/`disconnect`, or lost).
    pub fn closed(&mut self, conn: ConnId, now: Millis) {
        self.detach(conn, Reason::Gone, now);
        self.conns.remove(&conn);
    }

    /// When `conn`'s keep-alive runs out (1.5 times the interval after the
    /// last packet), if it has one.
    pub fn poll_timeout(&self, conn: ConnId) -> Option<Millis> {
        let c = self.conns.get(&conn)?;
        (c.keep_alive_ms > 0 && !c.closing).then(|| c.last_rx.saturating_add(c.keep_alive()))
    }

    pub fn handle_timeout(&mut self, conn: ConnId, now: Millis) {
        if self.poll_timeout(conn).is_some_and(|t| now >= t) {
            self.detach(conn, Reason::KeepAlive, now);
        }
    }

    /// Closes every connection whose keep-alive ran out (one sweep for
    /// all clients: no timer per connection).
    pub fn handle_timeouts(&mut self, now: Millis) {
        let late: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.closing && c.keep_alive_ms > 0 && now >= c.last_rx.saturating_add(c.keep_alive())
            })
            .map(|(id, _)| *id)
            .collect();
        for conn in late {
            self.detach(conn, Reason::KeepAlive, now);
        }
    }

    /// Ends disconnected sessions whose expiry passed.
    pub fn expire(&mut self, now: Millis) {
        let gone: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.conn.is_none() && s.expires_at.is_some_and(|t| now >= t))
            .map(|s| s.id)
            .collect();
        for sid in gone {
            self.stats.sessions_expired += 1;
            self.end_session(sid);
        }
    }

    /// A PUBLISH from `conn`: what to put into the mesh, if anything (then
    /// `published` with the outcome). Refusals are queued (5.0 PUBACK
    /// reason, or a DISCONNECT).
    pub fn publish(&mut self, conn: ConnId, p: Publish, now: Millis) -> Option<Forward> {
        let c = self.conns.get_mut(&conn)?;
        if c.closing {
            return None;
        }
        let version = c.version;
        let sid = c.sid()?;
        let s = self.sessions.get_mut(&sid)?;
        self.stats.messages_in += 1;
        if p.qos == 2 {
            let Some(id) = p.packet_id else {
                self.detach(conn, Reason::Protocol, now);
                return None;
            };
            if s.qos2_in.contains(&id) {
                // A resend of one already published: answer again.
                c.out.push_back(Out::PubRec {
                    id,
                    code: AckCode::Success,
                });
                return None;
            }
            if s.qos2_in.len() >= usize::from(self.limits.max_inflight) {
                self.detach(conn, Reason::ReceiveMaxExceeded, now);
                return None;
            }
        }
        if p.qos > 0 && p.packet_id.is_none() {
            self.detach(conn, Reason::Protocol, now);
            return None;
        }
        match mqtt_to_mesh(&p.topic) {
            Ok(topic) => Some(Forward {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                packet_id: p.packet_id,
            }),
            Err(_) => {
                match (version, p.qos, p.packet_id) {
                    (Version::V5, 1, Some(id)) => c.out.push_back(Out::PubAck {
                        id,
                        code: AckCode::TopicInvalid,
                    }),
                    (Version::V5, 2, Some(id)) => c.out.push_back(Out::PubRec {
                        id,
                        code: AckCode::TopicInvalid,
                    }),
                    _ => self.detach(conn, Reason::TopicInvalid, now),
                }
                None
            }
        }
    }

    /// What became of a forwarded publish: retained copy kept (if it was
    /// published), acknowledgement queued.
    pub fn published(&mut self, conn: ConnId, f: &Forward, outcome: Outcome, now: Millis) {
        if outcome == Outcome::Published && f.retain {
            let msg = Msg {
                topic: mesh_to_mqtt(f.topic.as_str()),
                payload: f.payload.clone(),
                qos: f.qos.min(1),
                retain: true,
            };
            self.retain(&f.topic, msg);
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let code = match outcome {
            Outcome::Published => AckCode::Success,
            Outcome::NotAuthorized => AckCode::NotAuthorized,
            Outcome::Failed => AckCode::Unspecified,
        };
        let v3_refused = c.version == Version::V3 && code != AckCode::Success;
        match (f.qos, f.packet_id) {
            // 3.1.1 cannot say no: the connection is closed instead
            // (QoS 0 refusals are only counted).
            (1 | 2, Some(_)) if v3_refused => {
                let r = match outcome {
                    Outcome::NotAuthorized => Reason::NotAuthorized,
                    _ => Reason::Protocol,
                };
                self.detach(conn, r, now);
            }
            (1, Some(id)) => c.out.push_back(Out::PubAck { id, code }),
            (2, Some(id)) => {
                if code == AckCode::Success {
                    if let Some(s) = c.sid().and_then(|s| self.sessions.get_mut(&s)) {
                        s.qos2_in.push(id);
                    }
                }
                c.out.push_back(Out::PubRec { id, code });
            }
            _ => {}
        }
    }

    /// PUBREL for an inbound QoS 2 message: PUBCOMP.
    pub fn pubrel(&mut self, conn: ConnId, id: u16) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let found = match c.sid().and_then(|s| self.sessions.get_mut(&s)) {
            Some(s) => match s.qos2_in.iter().position(|&x| x == id) {
                Some(i) => {
                    s.qos2_in.swap_remove(i);
                    true
                }
                None => false,
            },
            None => false,
        };
        c.out.push_back(Out::PubComp { id, found });
    }

    /// PUBACK from the client: the message leaves the inflight window.
    pub fn puback(&mut self, conn: ConnId, id: u16) {
        let Some(sid) = self.session_of(conn) else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(&sid) {
            if let Some(i) = s.inflight.iter().position(|(p, _)| *p == id) {
                s.inflight.remove(i);
                self.room += 1;
                if s.expiry > Millis::ZERO {
                    self.changes += 1;
                }
            }
        }
    }

    /// PINGREQ: PINGRESP.
    pub fn ping(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.out.push_back(Out::PingResp);
        }
    }

    /// The first half of a SUBSCRIBE: each filter's mesh pattern and
    /// granted QoS, or why it is refused (invalid, over the session's
    /// subscription limit). The runtime then checks permissions and
    /// subscribes in the mesh, and calls `subscribe` with the results.
    pub fn plan_subscribe(&mut self, conn: ConnId, filters: &[(String, u8)]) -> Vec<Planned> {
        let mut have: Vec<String> = self
            .session_of(conn)
            .and_then(|s| self.sessions.get(&s))
            .map(|s| s.subs.iter().map(|(f, _, _)| f.clone()).collect())
            .unwrap_or_default();
        let mut planned = Vec::with_capacity(filters.len());
        for (filter, qos) in filters {
            let pattern = match filter_to_mesh(filter) {
                Err(_) => Err(SubCode::FilterInvalid),
                Ok(_) if !have.contains(filter) && have.len() >= self.limits.max_subscriptions => {
                    Err(SubCode::Quota)
                }
                Ok(p) => {
                    if !have.contains(filter) {
                        have.push(filter.clone());
                    }
                    Ok(p)
                }
            };
            if pattern.is_err() {
                self.stats.subscriptions_refused += 1;
            }
            planned.push(Planned {
                filter: filter.clone(),
                pattern,
                qos: (*qos).min(1),
            });
        }
        planned
    }

    /// The second half of a SUBSCRIBE: records the subscriptions that were
    /// made in the mesh, queues the SUBACK, then the retained messages that
    /// match the new ones.
    pub fn subscribe(&mut self, conn: ConnId, packet_id: u16, planned: Vec<Planned>) {
        let Some(sid) = self.session_of(conn) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut codes = Vec::with_capacity(planned.len());
        let mut replay = Vec::new();
        for p in planned {
            match p.pattern {
                Ok(pattern) => {
                    codes.push(SubCode::Granted(p.qos));
                    s.subs.retain(|(f, _, _)| *f != p.filter);
                    replay.push((pattern.clone(), p.qos));
                    s.subs.push((p.filter, pattern, p.qos));
                    self.changes += 1;
                }
                Err(code) => {
                    if code != SubCode::FilterInvalid && code != SubCode::Quota {
                        self.stats.subscriptions_refused += 1;
                    }
                    codes.push(code)
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.out.push_back(Out::SubAck {
                id: packet_id,
                codes,
            });
        }
        for (pattern, qos) in replay {
            let msgs: Vec<Msg> = self
                .retained
                .values()
                .filter(|(t, _)| pattern.matches(t))
                .map(|(_, m)| Msg {
                    qos: m.qos.min(qos),
                    ..m.clone()
                })
                .collect();
            for m in msgs {
                if self.enqueue(sid, m) != Delivery::Queued {
                    self.stats.dropped_retained += 1;
                }
            }
        }
    }

    /// UNSUBSCRIBE: the filters that were subscribed (their mesh
    /// subscriptions to drop); UNSUBACK queued.
    pub fn unsubscribe(&mut self, conn: ConnId, packet_id: u16, filters: &[String]) -> Vec<String> {
        let mut removed = Vec::new();
        let mut found = Vec::with_capacity(filters.len());
        if let Some(s) = self
            .session_of(conn)
            .and_then(|sid| self.sessions.get_mut(&sid))
        {
            for f in filters {
                let before = s.subs.len();
                s.subs.retain(|(x, _, _)| x != f);
                self.changes += 1;
                let hit = s.subs.len() < before;
                found.push(hit);
                if hit {
                    removed.push(f.clone());
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.out.push_back(Out::UnsubAck {
                id: packet_id,
                found,
            });
        }
        removed
    }

    /// A message from the mesh for session `sid`'s subscription at `qos`.
    pub fn deliver(
        &mut self,
        sid: SessionId,
        mesh_topic: &str,
        payload: Bytes,
        qos: u8,
    ) -> Delivery {
        let msg = Msg {
            topic: mesh_to_mqtt(mesh_topic),
            payload,
            qos: qos.min(1),
            retain: false,
        };
        self.enqueue(sid, msg)
    }

    fn enqueue(&mut self, sid: SessionId, msg: Msg) -> Delivery {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Delivery::Gone;
        };
        if s.queue.len() >= self.limits.queue_len {
            if msg.qos == 0 {
                self.stats.dropped_queue_full += 1;
                return Delivery::Dropped;
            }
            self.stats.queue_full_waits += 1;
            return Delivery::Full;
        }
        s.queue.push_back(msg);
        if s.expiry > Millis::ZERO {
            self.changes += 1;
        }
        if let Some(conn) = s.conn {
            if s.queue.len() == 1 {
                self.events.push_back(Event::Wake(conn));
            }
        }
        Delivery::Queued
    }

    /// The next packet to write to `conn`.
    pub fn poll_transmit(&mut self, conn: ConnId) -> Option<Out> {
        let c = self.conns.get_mut(&conn)?;
        if let Some(o) = c.out.pop_front() {
            return Some(o);
        }
        if c.out.capacity() > 0 {
            // An idle client keeps no packet buffer.
            c.out = VecDeque::new();
        }
        if c.closing {
            return None;
        }
        let s = self.sessions.get_mut(&c.sid()?)?;
        loop {
            let front = s.queue.front()?;
            if front.qos > 0 && s.inflight.len() >= usize::from(c.window) {
                self.stats.inflight_full += 1;
                return None;
            }
            let msg = s.queue.pop_front()?;
            self.room += 1;
            if s.expiry > Millis::ZERO {
                self.changes += 1;
            }
            // 5.0 packet overhead at most: header, length, topic length,
            // packet ID, properties length.
            let size = msg.topic.len() + msg.payload.len() + 12;
            if size > c.client_max_packet as usize {
                self.stats.dropped_too_large += 1;
                continue;
            }
            self.stats.messages_out += 1;
            if msg.qos == 0 {
                return Some(Out::Publish {
                    msg,
                    packet_id: None,
                    dup: false,
                });
            }
            let mut pid = s.next_pid;
            while s.inflight.iter().any(|(p, _)| *p == pid) {
                pid = pid.checked_add(1).unwrap_or(1);
            }
            s.next_pid = pid.checked_add(1).unwrap_or(1);
            s.inflight.push_back((pid, msg.clone()));
            return Some(Out::Publish {
                msg,
                packet_id: Some(pid),
                dup: false,
            });
        }
    }

    /// The next event for the runtime.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}
