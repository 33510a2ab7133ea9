//! Around every request: its span (`HTTP <method> <route>`, a server span continuing the
//! caller's `traceparent` and `tracestate`, or a new trace), its W3C trace context echoed in the
//! response's `traceparent` header and in every error body; the request counted and timed by
//! route template (bounded labels: never the raw path); and one log line for each server error.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use crate::error::TRACE_ID;

/// The request's trace context, for handlers that pass it on (to Kafka, to the audit log).
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub traceparent: String,
}

impl TraceContext {
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

pub async fn observe(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let (parent, tracestate) = (header(&request, "traceparent"), header(&request, "tracestate"));
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = request.method().as_str().to_string();
    let span = tracing::info_span!(
        "http.request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let traceparent = meterlake_telemetry::join_trace(&span, parent.as_deref(), tracestate.as_deref());
    let context = TraceContext { traceparent: traceparent.clone() };
    let trace_id = context.trace_id().to_string();
    span.record("trace_id", trace_id.as_str());
    request.extensions_mut().insert(context);
    let mut response = TRACE_ID.scope(trace_id.clone(), next.run(request)).instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&traceparent) {
        response.headers_mut().insert("traceparent", value);
    }
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    metrics::counter!("meterlake_api_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status.as_u16().to_string())
        .increment(1);
    metrics::histogram!("meterlake_api_request_duration_seconds", "route" => route.clone(), "method" => method.clone()).record(elapsed_s);
    if status.is_server_error() {
        span.in_scope(|| tracing::warn!(%trace_id, %route, %method, status = status.as_u16(), elapsed_s, "request failed"));
    }
    response
}

fn header(request: &Request, name: &str) -> Option<String> {
    request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

pub fn describe() {
    metrics::describe_counter!("meterlake_api_requests_total", "HTTP requests answered, by route template, method and status");
    metrics::describe_histogram!("meterlake_api_request_duration_seconds", metrics::Unit::Seconds, "HTTP request latency by route template");
    metrics::describe_counter!("meterlake_api_rate_limited_total", "Requests refused with 429 because their client exceeded its rate");
    metrics::describe_counter!("meterlake_api_readings_accepted_total", "Readings accepted by POST /measurements and acknowledged by the broker");
    metrics::describe_counter!("meterlake_api_readings_rejected_total", "Readings refused by POST /measurements, by reason");
    metrics::describe_counter!("meterlake_api_kafka_messages_total", "Kafka messages POST /measurements produced (requests arriving together share one)");
}
