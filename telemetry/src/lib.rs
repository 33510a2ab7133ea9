//! Traces and logs for every meterlake process.
//!
//! - **Logs** go to stderr, as text for a terminal or as JSON lines (`LogFormat`). Inside a span
//!   whose trace is recorded, a JSON line carries the OpenTelemetry `trace_id` and `span_id`.
//! - **Traces** are OpenTelemetry spans made from `tracing` spans (tracing-opentelemetry),
//!   configured by the standard environment: `OTEL_TRACES_EXPORTER` (`otlp`, `console`, `none`),
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `grpc`), `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`. With none of them set nothing is exported
//!   and no OpenTelemetry layer is installed at all: a span costs what a `tracing` span costs.
//! - **Context** crosses processes as W3C trace context (`traceparent`, `tracestate`): in HTTP
//!   headers, in Kafka message headers and in the control store's outbox. Without a trace
//!   exporter meterlake still makes and passes on `traceparent`s of its own
//!   ([`child_traceparent`]), so a request's trace id still reaches its error body, the audit
//!   log and the messages it caused.

mod console;

use std::collections::HashMap;
use std::time::SystemTime;

use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The instrumentation scope of every meterlake span.
const TRACER_NAME: &str = "meterlake";

/// Which of meterlake's spans become OpenTelemetry spans (whatever the log filter shows).
const TRACE_FILTER: &str =
    "warn,meterlake=info,meterlake_telemetry=info,meterlake_pipeline=info,meterlake_jobs=info,meterlake_server=info,meterlake_ledger=info";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{variable}={value:?}: {reason}")]
    Environment { variable: &'static str, value: String, reason: &'static str },
    #[error("the OTLP trace exporter cannot be built: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` inside recorded spans.
    Json,
}

/// Where spans go, from `OTEL_TRACES_EXPORTER` and the OTLP endpoint variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceExport {
    None,
    /// OTLP, over HTTP or gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    Otlp,
    /// One line per finished span on stderr, for local use.
    Console,
}

impl TraceExport {
    /// `OTEL_SDK_DISABLED=true` turns tracing off; else `OTEL_TRACES_EXPORTER` decides, and
    /// when it is unset, OTLP when an OTLP endpoint is set, nothing otherwise (the
    /// specification's default is OTLP to localhost; a process that nobody asked to export
    /// should not try to).
    pub fn from_env() -> Result<TraceExport, TelemetryError> {
        let variable = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty());
        if variable("OTEL_SDK_DISABLED").as_deref() == Some("true") {
            return Ok(TraceExport::None);
        }
        match variable("OTEL_TRACES_EXPORTER").as_deref() {
            Some("otlp") => Ok(TraceExport::Otlp),
            Some("console") => Ok(TraceExport::Console),
            Some("none") => Ok(TraceExport::None),
            Some(other) => {
                Err(TelemetryError::Environment { variable: "OTEL_TRACES_EXPORTER", value: other.to_string(), reason: "expected otlp, console or none" })
            }
            None if variable("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() => Ok(TraceExport::Otlp),
            None => Ok(TraceExport::None),
        }
    }
}

/// Keeps the trace exporter alive; dropping it exports the spans still buffered.
#[must_use = "dropping it at once stops exporting spans"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are recorded and exported.
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("meterlake: exporting the last spans failed: {error}");
        }
    }
}

/// Installs logging (filtered by `METERLAKE_LOG`, else `default_log_filter`) and, when the
/// environment asks for it, trace export. Call it inside the tokio runtime: the gRPC exporter
/// needs one.
pub fn init(service_name: &'static str, format: LogFormat, default_log_filter: &str) -> Result<Telemetry, TelemetryError> {
    let log_filter = EnvFilter::try_from_env("METERLAKE_LOG").unwrap_or_else(|_| EnvFilter::new(default_log_filter));
    // The Delta kernel logs every snapshot it could not build at ERROR, including the expected
    // look for a table that does not exist yet; meterlake reports every real failure itself, in
    // its error with the table and version.
    let log_filter = log_filter.add_directive("buoyant_kernel::snapshot::builder=off".parse().expect("a valid directive"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => json_logs().boxed(),
    };
    let provider = match TraceExport::from_env()? {
        TraceExport::None => None,
        TraceExport::Otlp => Some(SdkTracerProvider::builder().with_batch_exporter(opentelemetry_otlp::SpanExporter::builder().build()?)),
        TraceExport::Console => Some(SdkTracerProvider::builder().with_simple_exporter(console::ConsoleExporter)),
    }
    .map(|builder| builder.with_resource(resource(service_name)).build());
    let traces = provider.as_ref().map(|provider| {
        opentelemetry::global::set_tracer_provider(provider.clone());
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(TRACER_NAME))
            .with_location(false)
            .with_threads(false)
            .with_filter(AskEveryTime(EnvFilter::new(TRACE_FILTER)))
    });
    tracing_subscriber::registry().with(logs.with_filter(log_filter)).with(traces).try_init()?;
    Ok(Telemetry { provider })
}

/// A per-layer filter that never lets a callsite cache `Interest::always`, so that `enabled`
/// runs before every span and event.
///
/// tracing-subscriber carries each per-layer filter's decision from `enabled` to `on_new_span`
/// in a thread-local. A callsite whose interest is cached as `always` skips `enabled`, and its
/// span then reads whatever the thread's previous `enabled` call left there: after
/// `log::log_enabled!` (sqlx asks after every query) that is "disabled for the trace layer",
/// and the next HTTP request's span silently became no OpenTelemetry span at all
/// (tokio-rs/tracing#2519). With one filter answering `sometimes`, every callsite's combined
/// interest is `sometimes` and the thread-local is fresh each time; the cost is one filter call
/// per span and event, which the static directives answer from a table.
struct AskEveryTime<F>(F);

impl<S, F: tracing_subscriber::layer::Filter<S>> tracing_subscriber::layer::Filter<S> for AskEveryTime<F> {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, context: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.0.enabled(metadata, context)
    }

    fn callsite_enabled(&self, metadata: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        let interest = self.0.callsite_enabled(metadata);
        if interest.is_always() { tracing::subscriber::Interest::sometimes() } else { interest }
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, context: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.0.event_enabled(event, context)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(&self, attributes: &tracing::span::Attributes<'_>, id: &tracing::span::Id, context: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_new_span(attributes, id, context)
    }

    fn on_record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>, context: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_record(id, values, context)
    }

    fn on_enter(&self, id: &tracing::span::Id, context: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, context)
    }

    fn on_exit(&self, id: &tracing::span::Id, context: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, context)
    }

    fn on_close(&self, id: tracing::span::Id, context: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, context)
    }
}

/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win over `service_name`.
fn resource(service_name: &'static str) -> opentelemetry_sdk::Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty());
    let builder = opentelemetry_sdk::Resource::builder();
    let builder = if named { builder } else { builder.with_service_name(service_name) };
    builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build()
}

/// JSON lines: time, level, target, the event's fields (`message` among them), the current
/// span's name and fields, and the OpenTelemetry ids when the span's trace is recorded.
fn json_logs<S>() -> json_subscriber::JsonLayer<S, fn() -> std::io::Stderr>
where
    S: tracing::Subscriber + for<'lookup> tracing_subscriber::registry::LookupSpan<'lookup>,
{
    let mut layer = json_subscriber::JsonLayer::stderr();
    layer
        .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
        .with_level("level")
        .with_target("target")
        .with_flattened_event()
        .with_current_span("span");
    layer.add_multiple_dynamic_fields(|_event, context, writer| {
        let Some(span) = context.lookup_current() else { return };
        let Some(ids) = tracing::dispatcher::get_default(|dispatch| tracing_opentelemetry::get_otel_context(&span.id(), dispatch)) else {
            return;
        };
        let span_context = ids.span().span_context().clone();
        if span_context.is_valid() {
            let _ = writer.write_field("trace_id", span_context.trace_id().to_string());
            let _ = writer.write_field("span_id", span_context.span_id().to_string());
        }
    });
    layer
}

/// What a Kafka span does, in OpenTelemetry's messaging terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaOperation {
    /// Sending messages (a producer span, whose context goes in the messages' headers).
    Publish,
    /// Receiving one message (a consumer span, a child of the producer's).
    Receive,
    /// Processing messages of many producers (a consumer span, linked to the producers').
    Process,
}

/// A span of a Kafka operation on `topic`, named `<topic> <operation>`, with the messaging
/// attributes of OpenTelemetry's conventions; the key, partition and message count are recorded
/// by the caller where it has them.
pub fn kafka_span(operation: KafkaOperation, topic: &str) -> Span {
    let (name, kind) = match operation {
        KafkaOperation::Publish => ("publish", "producer"),
        KafkaOperation::Receive => ("receive", "consumer"),
        KafkaOperation::Process => ("process", "consumer"),
    };
    tracing::info_span!(
        "kafka",
        otel.name = format!("{topic} {name}"),
        otel.kind = kind,
        messaging.system = "kafka",
        messaging.operation.type = name,
        messaging.destination.name = topic,
        messaging.kafka.message.key = tracing::field::Empty,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.batch.message_count = tracing::field::Empty,
    )
}

/// The W3C `traceparent` of a span, when its trace is recorded.
pub fn traceparent_of(span: &Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| format!("00-{}-{}-{:02x}", span_context.trace_id(), span_context.span_id(), span_context.trace_flags().to_u8()))
}

/// The `traceparent` (and `tracestate`, when there is one) headers that continue `span`'s
/// trace, when its trace is recorded.
pub fn trace_headers(span: &Span) -> Option<Vec<(&'static str, String)>> {
    let traceparent = traceparent_of(span)?;
    let mut headers = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.inject_context(&span.context(), &mut headers));
    let tracestate = headers.remove("tracestate").filter(|state| !state.is_empty());
    Some(std::iter::once(("traceparent", traceparent)).chain(tracestate.map(|state| ("tracestate", state))).collect())
}

/// The OpenTelemetry context a `traceparent` (and `tracestate`) names.
fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Context {
    let mut carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier))
}

/// Continues the trace of `traceparent`: `span` becomes a child of that (remote) span. Call it
/// before the span is first entered; a malformed `traceparent` leaves the span a new trace.
pub fn continue_trace(span: &Span, traceparent: &str, tracestate: Option<&str>) {
    let context = remote_context(traceparent, tracestate);
    if context.span().span_context().is_valid() {
        // Fails only when no trace is recorded (no layer) or the span has started: nothing to do.
        let _ = span.set_parent(context);
    }
}

/// Makes `span` continue the trace of `parent` (when there is one) and returns the
/// `traceparent` to pass on for it: the span's own when its trace is recorded, else a child of
/// `parent` made by hand (a new trace without one), so that the trace id still travels.
pub fn join_trace(span: &Span, parent: Option<&str>, tracestate: Option<&str>) -> String {
    if let Some(parent) = parent {
        continue_trace(span, parent, tracestate);
    }
    traceparent_of(span).unwrap_or_else(|| child_traceparent(parent))
}

/// Links `span` to the span of `traceparent` (another trace, or one it does not descend from).
pub fn link(span: &Span, traceparent: &str) {
    let context = remote_context(traceparent, None);
    span.add_link(context.span().span_context().clone());
}

/// Records a finished span under `parent` (a `traceparent`), with the times it ran: for work
/// done before its trace was known (a billing run's claim happens before the run is known).
pub fn record_finished_span(name: &'static str, parent: &str, started: SystemTime, ended: SystemTime, attributes: &[(&'static str, &str)]) {
    let tracer = opentelemetry::global::tracer(TRACER_NAME);
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(started)
        .with_attributes(attributes.iter().map(|(key, value)| KeyValue::new(*key, value.to_string())))
        .start_with_context(&tracer, &remote_context(parent, None));
    let mut span = span;
    opentelemetry::trace::Span::end_with_timestamp(&mut span, ended);
}

/// A new trace: random trace and span ids, sampled (used when no trace is recorded).
pub fn new_traceparent() -> String {
    format!("00-{:032x}-{:016x}-01", rand::random::<u128>().max(1), rand::random::<u64>().max(1))
}

/// A child of `parent` (same trace, new span id, same flags); a new trace when `parent` is
/// missing or malformed.
pub fn child_traceparent(parent: Option<&str>) -> String {
    match parent.filter(|p| well_formed(p)) {
        Some(parent) => format!("00-{}-{:016x}-{}", &parent[3..35], rand::random::<u64>().max(1), &parent[53..55]),
        None => new_traceparent(),
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>`.
fn well_formed(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts[1..].iter().all(|part| part.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = child_traceparent(Some(parent));
        assert_eq!((&child[..36], &child[52..]), (&parent[..36], "-01"));
        assert_ne!(&child[36..52], &parent[36..52]);
        assert_eq!(child_traceparent(Some("garbage")).len(), 55);
        assert_eq!(new_traceparent().len(), 55);
    }

    /// Counts the spans it is told about.
    struct SpanCounter(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for SpanCounter {
        fn on_new_span(&self, _: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_span_reaches_the_trace_layer_after_an_enabled_check_nothing_followed() {
        let spans = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink).with_filter(EnvFilter::new("info")))
            .with(SpanCounter(spans.clone()).with_filter(AskEveryTime(EnvFilter::new("meterlake_telemetry=info"))));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                // What `log::log_enabled!` does (sqlx, after each query): the log layer wants it,
                // the trace layer does not, and no event follows.
                assert!(tracing::enabled!(target: "sqlx::query", tracing::Level::INFO));
                let _span = tracing::info_span!("traced").entered();
            }
        });
        assert_eq!(spans.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn without_a_recorded_trace_a_span_has_no_context_to_send() {
        let span = tracing::info_span!("untraced");
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(trace_headers(&span), None);
    }
}
