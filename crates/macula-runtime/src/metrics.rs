//! Counters and gauges of the connection layer, as prometheus-client
//! metrics (relaxed atomics: counting is one `fetch_add`).
//!
//! One `Metrics` per node (several nodes in one process stay separate);
//! [`Metrics::register`] declares each metric once (its exported name, help
//! text and, by its type, kind) in the node's registry, which the admin HTTP
//! server renders. This module only counts and describes, and must not do
//! I/O. Every drop, refusal and limit hit increments something here.
//!
//! Also the helpers the other subsystems' counters use: [`register`] and
//! [`LabelledCounters`].

use std::sync::atomic::AtomicU64;

use macula_wire::{ErrorCode, MessageType};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

/// Kinds of protocol error, used as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolErrorKind {
    /// Frame header invalid: bad version, flags or reserved byte.
    BadHeader,
    /// Frame larger than our maximum.
    FrameTooLarge,
    /// Body failed to decode or broke a limit.
    Malformed,
    /// Unknown message type (answered, connection kept).
    UnknownType,
    /// Message out of place (e.g. non-HELLO first).
    Unexpected,
    /// Stream ended in the middle of a frame.
    Truncated,
}

impl ProtocolErrorKind {
    pub const ALL: [ProtocolErrorKind; 6] = [
        ProtocolErrorKind::BadHeader,
        ProtocolErrorKind::FrameTooLarge,
        ProtocolErrorKind::Malformed,
        ProtocolErrorKind::UnknownType,
        ProtocolErrorKind::Unexpected,
        ProtocolErrorKind::Truncated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProtocolErrorKind::BadHeader => "bad_header",
            ProtocolErrorKind::FrameTooLarge => "frame_too_large",
            ProtocolErrorKind::Malformed => "malformed",
            ProtocolErrorKind::UnknownType => "unknown_type",
            ProtocolErrorKind::Unexpected => "unexpected",
            ProtocolErrorKind::Truncated => "truncated",
        }
    }

    /// The ERROR frame code that reports this kind to the peer.
    pub fn error_code(self) -> ErrorCode {
        match self {
            ProtocolErrorKind::BadHeader => ErrorCode::Malformed,
            ProtocolErrorKind::FrameTooLarge => ErrorCode::FrameTooLarge,
            ProtocolErrorKind::Malformed => ErrorCode::Malformed,
            ProtocolErrorKind::UnknownType => ErrorCode::UnknownMessageType,
            ProtocolErrorKind::Unexpected => ErrorCode::UnexpectedMessage,
            ProtocolErrorKind::Truncated => ErrorCode::Malformed,
        }
    }
}

/// Why a handshake failed, used as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    Tls,
    Timeout,
    RealmMismatch,
    UnsupportedVersion,
    IdentityMismatch,
    Protocol,
    /// The peer was at its connection limit and refused us.
    ConnectionLimit,
    /// The realm has an authority and a grant was missing or not valid
    /// (ours, refused by the peer, or the peer's, refused by us).
    Unauthorized,
    /// Too many failed API-key attempts (from the peer's address, or in
    /// the realm): refused by us, or by the gateway.
    RateLimited,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::Tls,
        HandshakeFailure::Timeout,
        HandshakeFailure::RealmMismatch,
        HandshakeFailure::UnsupportedVersion,
        HandshakeFailure::IdentityMismatch,
        HandshakeFailure::Protocol,
        HandshakeFailure::ConnectionLimit,
        HandshakeFailure::Unauthorized,
        HandshakeFailure::RateLimited,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::RealmMismatch => "realm_mismatch",
            HandshakeFailure::UnsupportedVersion => "unsupported_version",
            HandshakeFailure::IdentityMismatch => "identity_mismatch",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::ConnectionLimit => "connection_limit",
            HandshakeFailure::Unauthorized => "unauthorized",
            HandshakeFailure::RateLimited => "rate_limited",
        }
    }
}

/// A gauge of a count (connections, sessions): never negative.
pub type CountGauge = Gauge<u64, AtomicU64>;

/// Registers `metric` as `name`, with `help` as exported: prometheus-client
/// appends the final period itself. A counter's samples are exported with
/// `_total` appended to `name`.
pub fn register(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    registry.register(name, help.strip_suffix('.').unwrap_or(help), metric);
}

/// A counter family with one label whose values are all known up front
/// (every value is exported, zeros included, in the order given). Counting
/// is one atomic add on the value's own `Counter`, not a map lookup.
#[derive(Debug, Clone)]
pub struct LabelledCounters<const N: usize> {
    labels: [[(&'static str, &'static str); 1]; N],
    counters: [Counter; N],
}

impl<const N: usize> LabelledCounters<N> {
    /// One counter per value of `label`.
    pub fn new(label: &'static str, values: [&'static str; N]) -> Self {
        LabelledCounters {
            labels: values.map(|v| [(label, v)]),
            counters: std::array::from_fn(|_| Counter::default()),
        }
    }

    /// The counter of the `i`th value given to [`LabelledCounters::new`].
    pub fn at(&self, i: usize) -> &Counter {
        &self.counters[i]
    }

    /// Registers the family as `name`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        register(registry, name, help, self.clone());
    }
}

/// Encoded as one counter family, its series in the order the values were
/// given (a `Family` would order them by hash, differently in every
/// process, and `macula metrics` prints them in exposition order).
impl<const N: usize> prometheus_client::encoding::EncodeMetric for LabelledCounters<N> {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for (labels, counter) in self.labels.iter().zip(&self.counters) {
            counter.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// `macula_messages_total{type, direction}`: the per-type received and
/// sent counters exported once more as one family (direction `in`, `out`),
/// so no message is counted twice on the hot path.
#[derive(Debug, Clone)]
struct MessagesByDirection {
    received: LabelledCounters<MESSAGE_SLOTS>,
    sent: LabelledCounters<MESSAGE_SLOTS>,
}

impl prometheus_client::encoding::EncodeMetric for MessagesByDirection {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for (direction, counters) in [("in", &self.received), ("out", &self.sent)] {
            for (labels, counter) in counters.labels.iter().zip(&counters.counters) {
                let [(name, value)] = labels;
                let labels = [(*name, *value), ("direction", direction)];
                counter.encode(encoder.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// The node's connection-layer metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Connections established (handshake complete), outbound.
    pub connections_outbound_total: Counter,
    /// Connections established (handshake complete), inbound.
    pub connections_inbound_total: Counter,
    /// Connections currently in the pool.
    pub connections_current: CountGauge,
    /// Connections closed for any reason.
    pub connections_closed_total: Counter,
    /// Incoming connections refused at the connection limit.
    pub connections_refused_total: Counter,
    /// `connect` answered from the pool.
    pub pool_hits_total: Counter,
    /// `connect` that had to dial.
    pub pool_misses_total: Counter,
    /// Connections closed to make room (LRU).
    pub pool_evictions_total: Counter,
    /// Connections closed after the idle timeout.
    pub pool_idle_closed_total: Counter,
    /// Duplicate connections closed by the simultaneous-dial tie-break.
    pub pool_duplicates_closed_total: Counter,
    /// Reconnect attempts to bootstrap peers.
    pub reconnect_attempts_total: Counter,
    /// Frames received and sent, all types.
    pub frames_received_total: Counter,
    pub frames_sent_total: Counter,
    /// Pings answered and pongs received.
    pub pings_received_total: Counter,
    pub pongs_received_total: Counter,
    /// Pongs that matched no outstanding ping (late or forged).
    pub pongs_unmatched_total: Counter,
    /// Failure detector: probes sent to silent full nodes.
    pub peer_probes_total: Counter,
    /// Failure detector: nodes declared down (a connection silent for the
    /// bound, a transport timeout, a failed health ping, a failed dial).
    pub peers_declared_down_total: Counter,
    /// Nodes suspected down that were heard from again.
    pub peers_restored_total: Counter,
    /// Nodes currently suspected down.
    pub peers_suspected: CountGauge,
    /// By direction: outbound, inbound (the two counters above).
    connections: LabelledCounters<2>,
    /// By kind, indexed by `ProtocolErrorKind as usize`.
    protocol_errors: LabelledCounters<6>,
    /// By reason, indexed by `HandshakeFailure as usize`.
    handshake_failures: LabelledCounters<9>,
    /// Failed API-key attempts by reason, indexed by `ApiKeyFailure as usize`.
    api_key_failures: LabelledCounters<4>,
    /// API-key attempts refused by the failure limiter.
    pub api_key_rate_limited_total: Counter,
    /// Clients admitted by an API key.
    pub api_key_admitted_total: Counter,
    /// API keys this node accepts.
    pub api_keys_loaded: CountGauge,
    /// Source addresses the API-key failure limiter tracks now.
    pub api_key_tracked_addresses: CountGauge,
    /// Addresses the API-key failure limiter forgot to stay within its
    /// bound (their failures forgotten too).
    pub api_key_limiter_evictions_total: Counter,
    /// Messages by type, indexed by position in `MessageType::ALL`; the last
    /// slot counts type bytes this version does not know.
    messages_received: LabelledCounters<MESSAGE_SLOTS>,
    messages_sent: LabelledCounters<MESSAGE_SLOTS>,
    /// Families added from outside the runtime ([`Metrics::extend`]).
    extensions: Extensions,
}

/// Adds metric families to a registry: see [`Metrics::extend`].
pub type MetricsExtension = std::sync::Arc<dyn Fn(&mut Registry) + Send + Sync>;

#[derive(Default)]
struct Extensions(parking_lot::Mutex<Vec<MetricsExtension>>);

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Extensions({})", self.0.lock().len())
    }
}

/// Slots for per-type message counters: every known type plus "unknown".
const MESSAGE_SLOTS: usize = MessageType::ALL.len() + 1;

/// The `type` label of each message slot.
fn message_labels() -> [&'static str; MESSAGE_SLOTS] {
    std::array::from_fn(|i| MessageType::ALL.get(i).map_or("unknown", |t| t.name()))
}

fn message_slot(msg_type: u8) -> usize {
    MessageType::ALL
        .iter()
        .position(|t| *t as u8 == msg_type)
        .unwrap_or(MESSAGE_SLOTS - 1)
}

impl Default for Metrics {
    fn default() -> Self {
        let connections = LabelledCounters::new("direction", ["outbound", "inbound"]);
        Metrics {
            connections_outbound_total: connections.at(0).clone(),
            connections_inbound_total: connections.at(1).clone(),
            connections,
            connections_current: CountGauge::default(),
            connections_closed_total: Counter::default(),
            connections_refused_total: Counter::default(),
            pool_hits_total: Counter::default(),
            pool_misses_total: Counter::default(),
            pool_evictions_total: Counter::default(),
            pool_idle_closed_total: Counter::default(),
            pool_duplicates_closed_total: Counter::default(),
            reconnect_attempts_total: Counter::default(),
            frames_received_total: Counter::default(),
            frames_sent_total: Counter::default(),
            pings_received_total: Counter::default(),
            pongs_received_total: Counter::default(),
            pongs_unmatched_total: Counter::default(),
            peer_probes_total: Counter::default(),
            peers_declared_down_total: Counter::default(),
            peers_restored_total: Counter::default(),
            peers_suspected: CountGauge::default(),
            protocol_errors: LabelledCounters::new(
                "kind",
                ProtocolErrorKind::ALL.map(|k| k.name()),
            ),
            handshake_failures: LabelledCounters::new(
                "reason",
                HandshakeFailure::ALL.map(|h| h.name()),
            ),
            api_key_failures: LabelledCounters::new(
                "reason",
                crate::apikey::ApiKeyFailure::ALL.map(|f| f.name()),
            ),
            api_key_rate_limited_total: Counter::default(),
            api_key_admitted_total: Counter::default(),
            api_keys_loaded: CountGauge::default(),
            api_key_tracked_addresses: CountGauge::default(),
            api_key_limiter_evictions_total: Counter::default(),
            messages_received: LabelledCounters::new("type", message_labels()),
            messages_sent: LabelledCounters::new("type", message_labels()),
            extensions: Extensions::default(),
        }
    }
}

impl Metrics {
    /// Counts one message received from a peer, by its type byte.
    pub fn message_received(&self, msg_type: u8) {
        self.messages_received.at(message_slot(msg_type)).inc();
    }

    /// Counts one message sent to a peer, by its type byte.
    pub fn message_sent(&self, msg_type: u8) {
        self.messages_sent.at(message_slot(msg_type)).inc();
    }

    /// Messages received of one type (`None`: unknown types).
    pub fn messages_received(&self, t: Option<MessageType>) -> u64 {
        let slot = t.map_or(MESSAGE_SLOTS - 1, |t| message_slot(t as u8));
        self.messages_received.at(slot).get()
    }

    pub fn protocol_error(&self, kind: ProtocolErrorKind) {
        self.protocol_errors.at(kind as usize).inc();
    }

    pub fn protocol_errors(&self, kind: ProtocolErrorKind) -> u64 {
        self.protocol_errors.at(kind as usize).get()
    }

    pub fn protocol_errors_total(&self) -> u64 {
        ProtocolErrorKind::ALL
            .iter()
            .map(|k| self.protocol_errors(*k))
            .sum()
    }

    pub fn handshake_failure(&self, why: HandshakeFailure) {
        self.handshake_failures.at(why as usize).inc();
    }

    pub fn handshake_failures(&self, why: HandshakeFailure) -> u64 {
        self.handshake_failures.at(why as usize).get()
    }

    pub fn api_key_failure(&self, why: crate::apikey::ApiKeyFailure) {
        self.api_key_failures.at(why as usize).inc();
    }

    pub fn api_key_failures(&self, why: crate::apikey::ApiKeyFailure) -> u64 {
        self.api_key_failures.at(why as usize).get()
    }

    /// Adds families of code outside the runtime (an embedding
    /// application; `macula-wasm`'s `macula_wasm_*`) to every registry
    /// built for this node from now on: `f` runs in [`Metrics::register`].
    /// An admin server started before this call does not show them.
    pub fn extend(&self, f: MetricsExtension) {
        self.extensions.0.lock().push(f);
    }

    /// Registers every metric in the node's registry (the names are a
    /// compatibility promise to dashboards).
    pub fn register(&self, r: &mut Registry) {
        let extensions: Vec<MetricsExtension> = self.extensions.0.lock().clone();
        for f in extensions {
            f(r);
        }
        self.connections.register(
            r,
            "macula_connections",
            "Connections established (TLS and HELLO complete), by direction.",
        );
        register(
            r,
            "macula_connections_current",
            "Connections currently in the pool.",
            self.connections_current.clone(),
        );
        register(
            r,
            "macula_connections_closed",
            "Connections closed for any reason.",
            self.connections_closed_total.clone(),
        );
        register(
            r,
            "macula_connections_refused",
            "Incoming connections refused at the connection or pending-handshake limit.",
            self.connections_refused_total.clone(),
        );
        register(
            r,
            "macula_pool_hits",
            "connect() calls answered from the connection pool.",
            self.pool_hits_total.clone(),
        );
        register(
            r,
            "macula_pool_misses",
            "connect() calls that had to dial.",
            self.pool_misses_total.clone(),
        );
        register(
            r,
            "macula_pool_evictions",
            "Connections closed to make room in a full pool (least recently used).",
            self.pool_evictions_total.clone(),
        );
        register(
            r,
            "macula_pool_idle_closed",
            "Connections closed after the idle timeout.",
            self.pool_idle_closed_total.clone(),
        );
        register(
            r,
            "macula_pool_duplicates_closed",
            "Duplicate connections closed by the simultaneous-dial tie-break.",
            self.pool_duplicates_closed_total.clone(),
        );
        register(
            r,
            "macula_reconnect_attempts",
            "Reconnect attempts to bootstrap peers.",
            self.reconnect_attempts_total.clone(),
        );
        register(
            r,
            "macula_frames_received",
            "Frames received from peers, all message types.",
            self.frames_received_total.clone(),
        );
        register(
            r,
            "macula_frames_sent",
            "Frames sent to peers, all message types.",
            self.frames_sent_total.clone(),
        );
        register(
            r,
            "macula_pings_received",
            "PING frames received and answered.",
            self.pings_received_total.clone(),
        );
        register(
            r,
            "macula_pongs_received",
            "PONG frames received.",
            self.pongs_received_total.clone(),
        );
        register(
            r,
            "macula_pongs_unmatched",
            "PONG frames that matched no outstanding PING (late or forged).",
            self.pongs_unmatched_total.clone(),
        );
        register(
            r,
            "macula_peer_probes",
            "Failure detector: probes (PING) sent to full nodes silent for peer_probe_after.",
            self.peer_probes_total.clone(),
        );
        register(
            r,
            "macula_peers_declared_down",
            "Nodes declared down: silent for the failure detector's bound, a transport timeout, a failed health ping or dial.",
            self.peers_declared_down_total.clone(),
        );
        register(
            r,
            "macula_peers_restored",
            "Nodes suspected down that connected again.",
            self.peers_restored_total.clone(),
        );
        register(
            r,
            "macula_peers_suspected",
            "Nodes currently suspected down (services avoid waiting on them).",
            self.peers_suspected.clone(),
        );
        self.protocol_errors.register(
            r,
            "macula_protocol_errors",
            "Protocol errors from peers, by kind.",
        );
        register(
            r,
            "macula_messages",
            "Messages received from (in) and sent to (out) peers, by type.",
            MessagesByDirection {
                received: self.messages_received.clone(),
                sent: self.messages_sent.clone(),
            },
        );
        self.messages_sent.register(
            r,
            "macula_messages_sent",
            "Messages sent to peers, by type (also macula_messages_total with direction=\"out\").",
        );
        self.handshake_failures.register(
            r,
            "macula_handshake_failures",
            "Failed handshakes (TLS or HELLO), by reason.",
        );
        self.api_key_failures.register(
            r,
            "macula_api_key_failures",
            "Failed API-key attempts of clients, by reason.",
        );
        register(
            r,
            "macula_api_key_rate_limited",
            "API-key attempts refused at once: too many failures from the address or in the realm.",
            self.api_key_rate_limited_total.clone(),
        );
        register(
            r,
            "macula_api_key_admitted",
            "Clients admitted by an API key.",
            self.api_key_admitted_total.clone(),
        );
        register(
            r,
            "macula_api_keys",
            "API keys this node accepts (the --api-keys file).",
            self.api_keys_loaded.clone(),
        );
        register(
            r,
            "macula_api_key_tracked_addresses",
            "Source addresses the API-key failure limiter tracks (at most --api-key-max-tracked).",
            self.api_key_tracked_addresses.clone(),
        );
        register(
            r,
            "macula_api_key_limiter_evictions",
            "Addresses the API-key failure limiter forgot, full (--api-key-max-tracked), with their failures.",
            self.api_key_limiter_evictions_total.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_registered_with_the_node_families() {
        let m = Metrics::default();
        let added = Counter::<u64>::default();
        added.inc();
        let c = added.clone();
        m.extend(std::sync::Arc::new(move |r: &mut Registry| {
            r.register("macula_extra", "Added from outside.", c.clone())
        }));
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(text.contains("macula_extra_total 1"), "{text}");
        assert!(text.contains("macula_connections_current"), "{text}");
    }

    #[test]
    fn labels_index_their_own_counter() {
        let m = Metrics::default();
        for (i, k) in ProtocolErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i);
            m.protocol_error(k);
        }
        for (i, h) in HandshakeFailure::ALL.into_iter().enumerate() {
            assert_eq!(h as usize, i);
        }
        m.handshake_failure(HandshakeFailure::Timeout);
        assert_eq!(m.protocol_errors_total(), 6);
        assert_eq!(m.handshake_failures(HandshakeFailure::Timeout), 1);
        m.message_received(MessageType::Ping as u8);
        m.message_received(0x7e);
        assert_eq!(m.messages_received(Some(MessageType::Ping)), 1);
        assert_eq!(m.messages_received(None), 1);
        m.connections_inbound_total.inc();
        assert_eq!(m.connections.at(1).get(), 1);
    }

    fn render(m: &Metrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn every_metric_is_registered_with_help_type_and_every_label() {
        let m = Metrics::default();
        m.pool_hits_total.inc_by(3);
        m.connections_current.set(2);
        m.protocol_error(ProtocolErrorKind::Malformed);
        m.message_sent(0x7e);
        let text = render(&m);
        assert_eq!(text.matches("# HELP ").count(), 29);
        assert_eq!(text.matches("# TYPE ").count(), 29);
        assert_eq!(text.matches(" gauge\n").count(), 4);
        // One HELP line per family, not per labelled row; every label value
        // exported.
        assert_eq!(text.matches("# HELP macula_protocol_errors ").count(), 1);
        assert_eq!(text.matches("macula_protocol_errors_total{").count(), 6);
        assert_eq!(text.matches("macula_handshake_failures_total{").count(), 9);
        assert_eq!(text.matches("macula_api_key_failures_total{").count(), 4);
        assert_eq!(text.matches("macula_connections_total{").count(), 2);
        assert_eq!(
            text.matches("macula_messages_total{").count(),
            2 * MESSAGE_SLOTS
        );
        assert!(text.contains(
            "# HELP macula_pool_hits connect() calls answered from the connection pool.\n"
        ));
        assert!(text.contains("# TYPE macula_pool_hits counter\n"));
        assert!(text.contains("macula_pool_hits_total 3\n"));
        assert!(text.contains("# TYPE macula_connections_current gauge\n"));
        assert!(text.contains("macula_connections_current 2\n"));
        assert!(text.contains("macula_protocol_errors_total{kind=\"malformed\"} 1\n"));
        assert!(text.contains("macula_messages_sent_total{type=\"unknown\"} 1\n"));
        assert!(text.contains("macula_messages_total{type=\"ping\",direction=\"in\"} 0\n"));
        assert!(text.contains("macula_messages_total{type=\"unknown\",direction=\"out\"} 1\n"));
        assert!(text.contains("macula_messages_total{type=\"unknown\",direction=\"in\"} 0\n"));
        assert!(!text.contains(".."), "one final period per help text");
    }
}
