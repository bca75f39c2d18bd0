//! Distributed tracing: where a node starts spans and how their context
//! crosses the mesh.
//!
//! Trace context travels as W3C `traceparent`/`tracestate` headers of
//! PUBLISH (batch entries) and CALL (`macula_wire::trace`): the pub/sub and
//! RPC cores carry them as data, so a node forwards an incoming context
//! whether or not it traces. Spans are `tracing` spans (target
//! [`TARGET`]) that the `tracing-opentelemetry` layer turns into
//! OpenTelemetry spans, except on the pub/sub hot path (publish, deliver,
//! gateway forwarding): those are `Direct` spans, made here as the SDK's
//! `SpanData` and handed to the span processor (`set_sink`) without a
//! `tracing` span or tracer in between, for a traced message costs its
//! spans' work at every sampled publish. Spans are only
//! created once [`enable`] has been called (cargo feature `otlp`) and the
//! sampling decision says so:
//!
//! - an operation this node starts (publish, call) is a child of the
//!   application's current span when that span is sampled (a publish finds
//!   it in the current OpenTelemetry context, where the
//!   `tracing-opentelemetry` layer puts an entered span's: one thread-local
//!   read, no `tracing` lookup per publish); with no current
//!   span, a new trace is started for the configured ratio of operations;
//!   an application that put its own sampled `traceparent` in the headers
//!   gets a child of that;
//! - a span for a message or call from another node (delivery, handler,
//!   gateway forwarding, relay hop) is a child of the remote parent it
//!   carries, and only exists when that parent was sampled (parent-based).
//!
//! Off (the default, and always without the feature), every hook is one
//! relaxed atomic load ([`on`]): no span, no allocation per message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

pub use macula_wire::trace::{Ratio, TraceParent, TRACEPARENT, TRACESTATE};

/// Target of every span this crate creates (filter on it to export only
/// the mesh's spans).
pub const TARGET: &str = "macula::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);
static RATIO: AtomicU64 = AtomicU64::new(0);

/// Whether spans are created (`enable` was called; feature `otlp`).
#[inline]
pub fn on() -> bool {
    cfg!(feature = "otlp") && ENABLED.load(Relaxed)
}

/// The ratio of new traces (operations without a sampled parent).
pub fn ratio() -> Ratio {
    Ratio::from_bits(RATIO.load(Relaxed))
}

/// Starts creating spans, sampling `ratio` (0.0..=1.0) of the operations
/// that start a trace. The process must have a `tracing` subscriber with
/// a `tracing-opentelemetry` layer whose tracer samples as [`Sampler`]
/// does (or `ParentBased(AlwaysOn)`: the ratio is applied here) and that
/// activates each entered span's context (its default; a publish finds
/// the application's current span in the OpenTelemetry context only), and
/// give that provider's span processor to [`set_sink`] (the pub/sub spans
/// are made directly, without a tracer).
#[cfg(feature = "otlp")]
pub fn enable(ratio: f64) {
    RATIO.store(Ratio::new(ratio).bits(), Relaxed);
    ENABLED.store(true, Relaxed);
}

/// Stops creating spans (headers are still carried).
pub fn disable() {
    ENABLED.store(false, Relaxed);
}

/// Why a sampled span never reached the collector (the exporter's own
/// queue and export: `macula_trace_spans_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanLoss {
    /// The exporter's queue was full (spans made faster than exported).
    QueueFull,
    /// The export request failed (collector down, refused, timed out).
    ExportFailed,
    /// Ended after the exporter had shut down.
    ShutDown,
}

impl SpanLoss {
    pub const ALL: [SpanLoss; 3] = [
        SpanLoss::QueueFull,
        SpanLoss::ExportFailed,
        SpanLoss::ShutDown,
    ];

    /// Its label in `macula_trace_spans_dropped_total{reason}`.
    pub fn name(self) -> &'static str {
        match self {
            SpanLoss::QueueFull => "queue_full",
            SpanLoss::ExportFailed => "export_failed",
            SpanLoss::ShutDown => "shut_down",
        }
    }
}

/// Spans exported and lost, for the whole process (there is one exporter
/// per process; it reports here).
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static LOST: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// The exporter sent `n` spans to the collector.
pub fn count_exported(n: u64) {
    EXPORTED.fetch_add(n, Relaxed);
}

/// The exporter lost `n` spans for `why`.
pub fn count_lost(why: SpanLoss, n: u64) {
    LOST[why as usize].fetch_add(n, Relaxed);
}

/// Spans exported by this process so far.
pub fn spans_exported() -> u64 {
    EXPORTED.load(Relaxed)
}

/// Spans this process lost for `why` so far.
pub fn spans_lost(why: SpanLoss) -> u64 {
    LOST[why as usize].load(Relaxed)
}

/// Registers `macula_trace_spans_exported_total` and
/// `macula_trace_spans_dropped_total{reason}` (0 while nothing exports).
pub fn register(r: &mut prometheus_client::registry::Registry) {
    r.register_collector(Box::new(SpanCollector));
}

#[derive(Debug)]
struct SpanCollector;

impl prometheus_client::collector::Collector for SpanCollector {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::MetricType;
        let c = ConstCounter::new(spans_exported());
        c.encode(e.encode_descriptor(
            "macula_trace_spans_exported",
            "Sampled spans this process exported to the OTLP collector (--otlp)",
            None,
            MetricType::Counter,
        )?)?;
        let mut f = e.encode_descriptor(
            "macula_trace_spans_dropped",
            "Sampled spans this process never exported, by reason (queue_full: more spans than the exporter's queue of 65,536 holds; export_failed: the collector refused or could not be reached; shut_down: ended after the exporter stopped)",
            None,
            MetricType::Counter,
        )?;
        for why in SpanLoss::ALL {
            ConstCounter::new(spans_lost(why))
                .encode(f.encode_family(&[("reason", why.name())])?)?;
        }
        Ok(())
    }
}

/// The trace ID among `headers`, as 32 hex characters (`macula trace`).
pub fn trace_id(headers: &[(String, String)]) -> Option<String> {
    find(headers).map(|t| t.trace_id_hex())
}

/// The `traceparent` among `headers`, if any parses.
pub fn find(headers: &[(String, String)]) -> Option<TraceParent> {
    if headers.is_empty() {
        return None;
    }
    macula_wire::trace::find(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// The current span where a future is made, to run it in later (a relay
/// session opened for a traced publish or call): the `tracing` span and,
/// with the feature, the OpenTelemetry context of a [`Direct`] span.
#[derive(Debug)]
pub struct Current {
    span: tracing::Span,
    #[cfg(feature = "otlp")]
    cx: Option<opentelemetry::Context>,
}

impl Current {
    /// The current span(s), when tracing is on (else none: nothing to
    /// carry).
    pub fn get() -> Current {
        if !on() {
            return Current {
                span: tracing::Span::none(),
                #[cfg(feature = "otlp")]
                cx: None,
            };
        }
        Current {
            span: tracing::Span::current(),
            #[cfg(feature = "otlp")]
            cx: {
                use opentelemetry::trace::TraceContextExt;
                let cx = opentelemetry::Context::current();
                cx.span().span_context().is_sampled().then_some(cx)
            },
        }
    }

    /// Runs `fut` in these spans.
    pub async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        let fut = tracing::Instrument::instrument(fut, self.span);
        #[cfg(feature = "otlp")]
        if let Some(cx) = self.cx {
            return opentelemetry::context::FutureExt::with_context(fut, cx).await;
        }
        fut.await
    }
}

#[cfg(feature = "otlp")]
pub use imp::*;

#[cfg(feature = "otlp")]
mod imp {
    use super::*;
    pub use opentelemetry::trace::SpanKind;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::Context;
    pub use opentelemetry::{KeyValue, Value};
    pub use opentelemetry_sdk::trace::SpanData;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// 64 random bits for a sampling decision: a per-thread xorshift
    /// seeded once from the OS (no lock, no allocation).
    fn random() -> u64 {
        use std::cell::Cell;
        thread_local! {
            static STATE: Cell<u64> = Cell::new({
                let mut b = [0u8; 8];
                let _ = getrandom::getrandom(&mut b);
                u64::from_le_bytes(b) | 1
            });
        }
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    }

    /// The OpenTelemetry context of a `traceparent` from another node.
    pub fn remote_context(tp: &TraceParent, tracestate: Option<&str>) -> Context {
        Context::new().with_remote_span_context(remote_span_context(tp, tracestate))
    }

    /// `span`'s own context as a `traceparent` (`None`: not exported).
    pub fn traceparent_of(span: &Span) -> Option<TraceParent> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_sampled()).then(|| TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        })
    }

    fn tracestate(headers: &[(String, String)]) -> Option<&str> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACESTATE))
            .map(|(_, v)| v.as_str())
    }

    /// Puts `tp` in `headers`, replacing a `traceparent` already there.
    pub fn put(headers: &mut Vec<(String, String)>, tp: &TraceParent) {
        let v = tp.encode();
        match headers
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
        {
            Some(h) => h.1 = v,
            None => headers.push((TRACEPARENT.to_string(), v)),
        }
    }

    /// A span for an operation this node starts (publish, call), made by
    /// `make` if the sampling decision says so (see the module doc), with
    /// its context written into `headers` for the nodes on the way.
    /// `None` (and `headers` untouched): not traced.
    pub fn start(headers: &mut Vec<(String, String)>, make: impl FnOnce() -> Span) -> Option<Span> {
        if !on() {
            return None;
        }
        let span = if let Some(tp) = find(headers) {
            // The application's own context: a child of it, if sampled.
            if !tp.sampled() {
                return None;
            }
            let span = make();
            let _ = span.set_parent(remote_context(&tp, tracestate(headers)));
            span
        } else {
            let current = Span::current();
            let parent = if current.is_none() {
                None
            } else {
                let sc = current.context().span().span_context().clone();
                sc.is_valid().then(|| sc.is_sampled())
            };
            if !macula_wire::trace::decide(parent, ratio(), random()) {
                return None;
            }
            make()
        };
        let tp = traceparent_of(&span)?;
        put(headers, &tp);
        Some(span)
    }

    /// A span for work on behalf of another node (delivery, handler,
    /// gateway forwarding, relay hop), made by `make` as a child of the
    /// sampled remote parent `tp`. `None`: not traced.
    pub fn remote(
        tp: Option<TraceParent>,
        tracestate: Option<&str>,
        make: impl FnOnce() -> Span,
    ) -> Option<Span> {
        let tp = tp.filter(|t| on() && t.sampled())?;
        let span = make();
        span.set_parent(remote_context(&tp, tracestate)).ok()?;
        Some(span)
    }

    /// [`remote`] with the parent taken from `headers`.
    pub fn remote_in(headers: &[(String, String)], make: impl FnOnce() -> Span) -> Option<Span> {
        if !on() {
            return None;
        }
        remote(find(headers), tracestate(headers), make)
    }

    /// A span made by `make` as a child of the current span, only when the
    /// current span is sampled (DHT lookups, relay connects: they belong to
    /// a traced publish or call, never start a trace of their own). The
    /// current span is the `tracing` one, or else a [`Direct`] span's
    /// context a future runs in ([`Direct::in_context`]).
    pub fn child(make: impl FnOnce() -> Span) -> Option<Span> {
        if !on() {
            return None;
        }
        let current = Span::current();
        if !current.is_none() && current.context().span().span_context().is_sampled() {
            return Some(make());
        }
        let cx = Context::current();
        if !cx.span().span_context().is_sampled() {
            return None;
        }
        let span = make();
        span.set_parent(cx).ok()?;
        Some(span)
    }

    /// Where ended [`Direct`] spans go: the exporter's span processor
    /// (`set_sink`).
    type Sink = std::sync::Arc<dyn Fn(SpanData) + Send + Sync>;

    static SINK: std::sync::RwLock<Option<Sink>> = std::sync::RwLock::new(None);

    /// Hands every ended [`Direct`] span to `sink` (the span processor of
    /// the provider whose tracer the `tracing-opentelemetry` layer uses:
    /// its `on_end`). Until a sink is set, no `Direct` span is made.
    pub fn set_sink(sink: impl Fn(SpanData) + Send + Sync + 'static) {
        if let Ok(mut s) = SINK.write() {
            *s = Some(std::sync::Arc::new(sink));
        }
    }

    fn sink() -> Option<Sink> {
        SINK.read().ok()?.clone()
    }

    /// The instrumentation scope of the [`Direct`] spans.
    fn scope() -> &'static opentelemetry::InstrumentationScope {
        static SCOPE: std::sync::OnceLock<opentelemetry::InstrumentationScope> =
            std::sync::OnceLock::new();
        SCOPE.get_or_init(|| opentelemetry::InstrumentationScope::builder("macula").build())
    }

    /// A span of the pub/sub hot path (publish, deliver, gateway
    /// forwarding), made here as the exporter's `SpanData` and handed to
    /// the sink (`set_sink`) when dropped: no `tracing` span, no SDK span
    /// (no tracer, sampler call, builder, `Context` or processor chain per
    /// span; the sampling decision is [`sampled_here`]'s or the remote
    /// parent's), attributes built once as `KeyValue`s (node IDs shared,
    /// see [`node_value`]). IDs come from a per-thread generator seeded
    /// from the OS.
    pub struct Direct {
        data: Option<SpanData>,
        sink: Sink,
    }

    impl std::fmt::Debug for Direct {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_tuple("Direct")
                .field(&self.data.as_ref().map(|d| &d.span_context))
                .finish()
        }
    }

    impl Drop for Direct {
        fn drop(&mut self) {
            if let Some(mut d) = self.data.take() {
                d.end_time = std::time::SystemTime::now();
                (self.sink)(d);
            }
        }
    }

    impl Direct {
        fn context(&self) -> SpanContext {
            self.data
                .as_ref()
                .map(|d| d.span_context.clone())
                .unwrap_or_else(SpanContext::empty_context)
        }

        /// Its own context as a `traceparent` (for the next hop).
        pub fn traceparent(&self) -> TraceParent {
            let sc = self
                .data
                .as_ref()
                .map(|d| &d.span_context)
                .unwrap_or(&SpanContext::NONE);
            TraceParent {
                trace_id: sc.trace_id().to_bytes(),
                parent_id: sc.span_id().to_bytes(),
                flags: sc.trace_flags().to_u8(),
            }
        }

        /// Runs `fut` with this span as the current OpenTelemetry context
        /// (so [`child`] spans, e.g. a DHT lookup, are its children); the
        /// span ends when `fut` is done.
        pub fn in_context<F: std::future::Future>(
            self,
            fut: F,
        ) -> impl std::future::Future<Output = F::Output> {
            use opentelemetry::context::FutureExt;
            let cx = Context::new().with_remote_span_context(self.context());
            async move {
                let out = fut.with_context(cx).await;
                drop(self);
                out
            }
        }
    }

    /// A new span ID (never zero).
    fn span_id() -> SpanId {
        SpanId::from_bytes(random().to_be_bytes())
    }

    /// A [`Direct`] span `name`, child of `parent` (`None`: a new trace),
    /// if a sink is set.
    fn build(
        parent: Option<&SpanContext>,
        name: &'static str,
        kind: SpanKind,
        attrs: Vec<KeyValue>,
    ) -> Option<Direct> {
        let sink = sink()?;
        let (trace_id, parent_id, remote, state) = match parent {
            Some(p) => (
                p.trace_id(),
                p.span_id(),
                p.is_remote(),
                p.trace_state().clone(),
            ),
            None => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&random().to_be_bytes());
                id[8..].copy_from_slice(&random().to_be_bytes());
                (
                    TraceId::from_bytes(id),
                    SpanId::INVALID,
                    false,
                    TraceState::default(),
                )
            }
        };
        let now = std::time::SystemTime::now();
        let data = SpanData {
            span_context: SpanContext::new(trace_id, span_id(), TraceFlags::SAMPLED, false, state),
            parent_span_id: parent_id,
            parent_span_is_remote: remote,
            span_kind: kind,
            name: std::borrow::Cow::Borrowed(name),
            start_time: now,
            end_time: now,
            attributes: attrs,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: scope().clone(),
        };
        Some(Direct {
            data: Some(data),
            sink,
        })
    }

    /// A remote parent's context from a `traceparent` and `tracestate`.
    fn remote_span_context(tp: &TraceParent, tracestate: Option<&str>) -> SpanContext {
        let state = tracestate
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(tp.trace_id),
            SpanId::from_bytes(tp.parent_id),
            TraceFlags::new(tp.flags),
            true,
            state,
        )
    }

    /// Whether this operation, which would start a new trace, starts one:
    /// the ratio's decision, made by counting down the operations it
    /// passes over (`Ratio::skip`, drawn per thread once per sampled
    /// operation and again when the ratio changes). The same decisions as
    /// a random draw per operation, for one decrement.
    #[inline]
    fn new_trace() -> bool {
        use std::cell::Cell;
        thread_local! {
            /// The ratio counted for, and the operations left to pass over.
            static LEFT: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
        }
        let bits = RATIO.load(Relaxed);
        let ratio = Ratio::from_bits(bits);
        LEFT.with(|c| {
            // First use here, or a new ratio: this operation counts too.
            let left = match c.get() {
                Some((b, left)) if b == bits => left,
                _ => ratio.skip(random()),
            };
            if left > 0 {
                c.set(Some((bits, left - 1)));
                false
            } else {
                c.set(Some((bits, ratio.skip(random()))));
                true
            }
        })
    }

    /// Whether an operation starting here (a publish) is traced: the
    /// sampling decision alone, inline on every publish, before anything
    /// is built. The application's own `traceparent` in `headers`
    /// decides if there is one; else the current OpenTelemetry context's
    /// span (one thread-local read): a `Direct` span's
    /// (`Direct::in_context`), the application's own, or a `tracing`
    /// span's, which the `tracing-opentelemetry` layer makes current while
    /// it is entered (its context activation, on by default), so no
    /// `tracing` lookup per publish; with none, the ratio ([`new_trace`]:
    /// a countdown, no random draw per publish). A yes is followed by
    /// [`start_sampled`], which reads the same parent again.
    #[inline]
    pub fn sampled_here(headers: &[(String, String)]) -> bool {
        if !on() {
            return false;
        }
        if !headers.is_empty() {
            if let Some(tp) = find(headers) {
                return tp.sampled();
            }
        }
        let parent = Context::map_current(|cx| {
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid().then(|| sc.is_sampled())
        });
        match parent {
            Some(sampled) => sampled,
            None => new_trace(),
        }
    }

    /// The [`Direct`] span `name` of an operation [`sampled_here`] said
    /// yes to, a child of the parent it found there (the `traceparent` in
    /// `headers`, or the current context's span; none: a new trace), its
    /// context put in `headers`.
    #[inline(never)]
    pub fn start_sampled(
        headers: &mut Vec<(String, String)>,
        name: &'static str,
        kind: SpanKind,
        attrs: Vec<KeyValue>,
    ) -> Option<Direct> {
        let parent = match find(headers) {
            Some(tp) => Some(remote_span_context(&tp, tracestate(headers))),
            None => Context::map_current(|cx| {
                let span = cx.span();
                let sc = span.span_context();
                sc.is_valid().then(|| sc.clone())
            }),
        };
        let span = build(parent.as_ref(), name, kind, attrs)?;
        put(headers, &span.traceparent());
        Some(span)
    }

    /// [`remote`] for a [`Direct`] span.
    pub fn remote_direct(
        tp: Option<TraceParent>,
        tracestate: Option<&str>,
        name: &'static str,
        kind: SpanKind,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Direct> {
        let tp = tp.filter(|t| on() && t.sampled())?;
        build(
            Some(&remote_span_context(&tp, tracestate)),
            name,
            kind,
            attrs(),
        )
    }

    /// [`remote_direct`] with the parent taken from `headers`.
    pub fn remote_in_direct(
        headers: &[(String, String)],
        name: &'static str,
        kind: SpanKind,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Direct> {
        if !on() {
            return None;
        }
        remote_direct(find(headers), tracestate(headers), name, kind, attrs)
    }

    /// The `macula.publish` span of a publish [`sampled_here`] said yes
    /// to, its context put in `headers`.
    pub fn publish_span_sampled(
        headers: &mut Vec<(String, String)>,
        topic: &str,
        node: &macula_wire::NodeId,
    ) -> Option<Direct> {
        start_sampled(
            headers,
            "macula.publish",
            SpanKind::Producer,
            vec![
                KeyValue::new("macula.topic", text_value(topic)),
                KeyValue::new("macula.node", node_value(node)),
            ],
        )
    }

    /// The span of a publish this node starts (`macula.publish`), its
    /// context put in `headers`: [`sampled_here`], then
    /// [`publish_span_sampled`].
    pub fn publish_span(
        headers: &mut Vec<(String, String)>,
        topic: &str,
        node: &macula_wire::NodeId,
    ) -> Option<Direct> {
        if !sampled_here(headers) {
            return None;
        }
        publish_span_sampled(headers, topic, node)
    }

    /// The span of a traced event's delivery to a subscription
    /// (`macula.deliver`, a child of the context in its `headers`).
    pub fn deliver_span(
        headers: &[(String, String)],
        topic: &str,
        pattern: &str,
        publisher: &macula_wire::NodeId,
        seq: u64,
        node: Option<&macula_wire::NodeId>,
    ) -> Option<Direct> {
        remote_in_direct(headers, "macula.deliver", SpanKind::Consumer, || {
            let mut a = Vec::with_capacity(5);
            a.push(KeyValue::new("macula.topic", text_value(topic)));
            a.push(KeyValue::new("macula.pattern", text_value(pattern)));
            a.push(KeyValue::new("macula.publisher", node_value(publisher)));
            a.push(KeyValue::new("macula.seq", seq as i64));
            if let Some(n) = node {
                a.push(KeyValue::new("macula.node", node_value(n)));
            }
            a
        })
    }

    /// A gateway's span for a traced message it forwards
    /// (`macula.gateway.forward`, a child of `tp`): from a client into the
    /// mesh, or from the mesh to its clients.
    pub fn forward_span(
        tp: Option<TraceParent>,
        tracestate: Option<&str>,
        from_client: bool,
        topic: &str,
        publisher: &macula_wire::NodeId,
        seq: u64,
        node: &macula_wire::NodeId,
    ) -> Option<Direct> {
        remote_direct(
            tp,
            tracestate,
            "macula.gateway.forward",
            SpanKind::Consumer,
            || {
                let direction = if from_client {
                    "from_client"
                } else {
                    "to_clients"
                };
                vec![
                    KeyValue::new("macula.direction", direction),
                    KeyValue::new("macula.topic", text_value(topic)),
                    KeyValue::new("macula.publisher", node_value(publisher)),
                    KeyValue::new("macula.seq", seq as i64),
                    KeyValue::new("macula.node", node_value(node)),
                ]
            },
        )
    }

    /// A node ID as an attribute value, formatted once: the last few are
    /// kept per thread and shared (`Arc<str>`), so a traced message's
    /// spans do not each format and allocate the text of every node they
    /// name.
    pub fn node_value(id: &macula_wire::NodeId) -> Value {
        use std::cell::RefCell;
        const KEPT: usize = 8;
        thread_local! {
            static IDS: RefCell<Vec<([u8; 32], Value)>> = const { RefCell::new(Vec::new()) };
        }
        IDS.with(|ids| {
            let mut ids = ids.borrow_mut();
            if let Some(i) = ids.iter().position(|(k, _)| k == id.as_bytes()) {
                return ids[i].1.clone();
            }
            let v = Value::from(std::sync::Arc::<str>::from(id.to_string()));
            if ids.len() >= KEPT {
                ids.remove(0);
            }
            ids.push((*id.as_bytes(), v.clone()));
            v
        })
    }

    /// A topic or pattern as an attribute value: the last few are kept
    /// per thread and shared (`Arc<str>`), so a traced message's spans do
    /// not each allocate and copy its topic (long ones are not kept).
    pub fn text_value(text: &str) -> Value {
        use std::cell::RefCell;
        const KEPT: usize = 16;
        const LONGEST: usize = 256;
        thread_local! {
            static TEXTS: RefCell<Vec<Value>> = const { RefCell::new(Vec::new()) };
        }
        if text.len() > LONGEST {
            return Value::from(text.to_string());
        }
        TEXTS.with(|texts| {
            let mut texts = texts.borrow_mut();
            if let Some(v) = texts
                .iter()
                .find(|v| matches!(v, Value::String(s) if s.as_str() == text))
            {
                return v.clone();
            }
            let v = Value::from(std::sync::Arc::<str>::from(text));
            if texts.len() >= KEPT {
                texts.remove(0);
            }
            texts.push(v.clone());
            v
        })
    }

    /// The sampler a tracer provider should use with this module:
    /// parent-based; a root span of this crate (target [`TARGET`]'s spans
    /// are named `macula.*`) was already sampled by [`start`]; any other
    /// root (the application's own spans) by the ratio on its trace ID.
    #[derive(Debug, Clone)]
    pub struct Sampler;

    impl opentelemetry_sdk::trace::ShouldSample for Sampler {
        fn should_sample(
            &self,
            parent: Option<&Context>,
            trace_id: TraceId,
            name: &str,
            _kind: &opentelemetry::trace::SpanKind,
            _attributes: &[opentelemetry::KeyValue],
            _links: &[opentelemetry::trace::Link],
        ) -> opentelemetry_sdk::trace::SamplingResult {
            use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult};
            let parent_sc = parent
                .filter(|cx| cx.has_active_span())
                .map(|cx| cx.span().span_context().clone())
                .filter(|sc| sc.is_valid());
            let sampled = match &parent_sc {
                Some(sc) => sc.is_sampled(),
                None if name.starts_with("macula.") => true,
                None => ratio().admits_trace(&trace_id.to_bytes()),
            };
            SamplingResult {
                decision: if sampled {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                },
                attributes: Vec::new(),
                trace_state: parent_sc
                    .map(|sc| sc.trace_state().clone())
                    .unwrap_or_default(),
            }
        }
    }
}

/// Without the `otlp` feature: no spans, ever (headers are still carried).
#[cfg(not(feature = "otlp"))]
pub use off::*;

#[cfg(not(feature = "otlp"))]
mod off {
    use super::*;
    use tracing::Span;

    pub fn start(_: &mut Vec<(String, String)>, _: impl FnOnce() -> Span) -> Option<Span> {
        None
    }
    pub fn remote(
        _: Option<TraceParent>,
        _: Option<&str>,
        _: impl FnOnce() -> Span,
    ) -> Option<Span> {
        None
    }
    pub fn remote_in(_: &[(String, String)], _: impl FnOnce() -> Span) -> Option<Span> {
        None
    }
    pub fn child(_: impl FnOnce() -> Span) -> Option<Span> {
        None
    }
    pub fn traceparent_of(_: &Span) -> Option<TraceParent> {
        None
    }
    pub fn put(_: &mut Vec<(String, String)>, _: &TraceParent) {}

    /// Never traced without the feature.
    #[inline]
    pub fn sampled_here(_: &[(String, String)]) -> bool {
        false
    }

    /// No span is ever made without the feature.
    #[derive(Debug)]
    pub enum Direct {}

    impl Direct {
        pub fn traceparent(&self) -> TraceParent {
            match *self {}
        }
        pub fn in_context<F: std::future::Future>(self, _: F) -> F {
            match self {}
        }
    }

    pub fn publish_span(
        _: &mut Vec<(String, String)>,
        _: &str,
        _: &macula_wire::NodeId,
    ) -> Option<Direct> {
        None
    }
    pub fn publish_span_sampled(
        _: &mut Vec<(String, String)>,
        _: &str,
        _: &macula_wire::NodeId,
    ) -> Option<Direct> {
        None
    }
    pub fn deliver_span(
        _: &[(String, String)],
        _: &str,
        _: &str,
        _: &macula_wire::NodeId,
        _: u64,
        _: Option<&macula_wire::NodeId>,
    ) -> Option<Direct> {
        None
    }
    pub fn forward_span(
        _: Option<TraceParent>,
        _: Option<&str>,
        _: bool,
        _: &str,
        _: &macula_wire::NodeId,
        _: u64,
        _: &macula_wire::NodeId,
    ) -> Option<Direct> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exporter's counts are the metrics' samples.
    #[test]
    fn spans_dropped_are_exported_as_metrics() {
        count_lost(SpanLoss::QueueFull, 3);
        count_lost(SpanLoss::ExportFailed, 2);
        count_exported(7);
        let mut r = prometheus_client::registry::Registry::default();
        register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert_eq!(text.matches("# TYPE macula_trace_").count(), 2, "{text}");
        for why in SpanLoss::ALL {
            assert!(
                text.contains(&format!(
                    "macula_trace_spans_dropped_total{{reason=\"{}\"}} {}",
                    why.name(),
                    spans_lost(why)
                )),
                "{text}"
            );
        }
        assert!(spans_lost(SpanLoss::QueueFull) >= 3 && spans_exported() >= 7);
    }

    #[test]
    fn off_by_default_and_trace_ids_are_read_from_headers() {
        assert!(!on());
        let h = vec![
            ("x".to_string(), "y".to_string()),
            (
                "traceparent".to_string(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
            ),
        ];
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(&[]), None);
    }

    /// The SDK sampler agrees with `start` and `remote`: a parent decides;
    /// a root span of this crate was sampled before it was made; any other
    /// root gets the ratio (0 until `enable`: no test here enables).
    #[cfg(feature = "otlp")]
    #[test]
    fn the_sampler_is_parent_based_and_trusts_our_own_roots() {
        use opentelemetry::trace::{SpanKind, TraceId};
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
        let decide = |parent: Option<&opentelemetry::Context>, name: &str| {
            Sampler
                .should_sample(
                    parent,
                    TraceId::from_bytes([7; 16]),
                    name,
                    &SpanKind::Internal,
                    &[],
                    &[],
                )
                .decision
        };
        let tp = |flags| TraceParent {
            trace_id: [1; 16],
            parent_id: [2; 8],
            flags,
        };
        let sampled = remote_context(&tp(1), None);
        let unsampled = remote_context(&tp(0), Some("k=v"));
        assert_eq!(
            decide(Some(&sampled), "app"),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(Some(&unsampled), "macula.deliver"),
            SamplingDecision::Drop
        );
        assert_eq!(
            decide(None, "macula.publish"),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(ratio(), Ratio::NEVER);
        assert_eq!(decide(None, "app.request"), SamplingDecision::Drop);
        // An empty context is no parent.
        let empty = opentelemetry::Context::new();
        assert_eq!(
            decide(Some(&empty), "macula.call"),
            SamplingDecision::RecordAndSample
        );
    }

    /// Attribute texts are shared while kept, and always the text asked
    /// for (kept, evicted, or too long to keep).
    #[cfg(feature = "otlp")]
    #[test]
    fn attribute_texts_are_the_texts_asked_for() {
        let shared = |a: &Value, b: &Value| match (a, b) {
            (Value::String(x), Value::String(y)) => std::ptr::eq(x.as_str(), y.as_str()),
            _ => false,
        };
        let a = text_value("orders.new");
        assert!(shared(&a, &text_value("orders.new")));
        assert!(!shared(&a, &text_value("orders.old")));
        for i in 0..40 {
            let t = format!("topic.{i}");
            assert_eq!(text_value(&t).as_str(), t.as_str());
        }
        assert_eq!(text_value("orders.new").as_str(), "orders.new");
        let long = "x".repeat(300);
        assert_eq!(text_value(&long).as_str(), long.as_str());
        assert_eq!(text_value("").as_str(), "");
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn trace_context_is_put_in_place_of_the_old() {
        let mut h = vec![("a".to_string(), "b".to_string())];
        let t = TraceParent {
            trace_id: [1; 16],
            parent_id: [2; 8],
            flags: 1,
        };
        put(&mut h, &t);
        put(&mut h, &t.with_parent([3; 8]));
        assert_eq!(h.len(), 2);
        assert_eq!(find(&h), Some(t.with_parent([3; 8])));
        // Off (the default): nothing is made, headers stay as they are.
        let mut called = false;
        assert!(start(&mut h, || {
            called = true;
            tracing::Span::none()
        })
        .is_none());
        assert!(remote_in(&h, tracing::Span::none).is_none());
        assert!(!called && h.len() == 2);
    }
}
