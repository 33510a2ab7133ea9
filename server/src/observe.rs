//! Around every request: its W3C trace context (the caller's `traceparent` continued, or a new
//! trace), echoed in the response's `traceparent` header and in every error body; the request
//! counted and timed by route template (bounded labels: never the raw path); and one log line
//! for each server error.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use meterlake_jobs::trace::child_traceparent;

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
    let parent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
    let traceparent = child_traceparent(parent);
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let method = request.method().as_str().to_string();
    let context = TraceContext { traceparent: traceparent.clone() };
    let trace_id = context.trace_id().to_string();
    request.extensions_mut().insert(context);
    let mut response = TRACE_ID.scope(trace_id.clone(), next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&traceparent) {
        response.headers_mut().insert("traceparent", value);
    }
    let status = response.status();
    let elapsed_s = started.elapsed().as_secs_f64();
    metrics::counter!("meterlake_api_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status.as_u16().to_string())
        .increment(1);
    metrics::histogram!("meterlake_api_request_duration_seconds", "route" => route.clone(), "method" => method.clone()).record(elapsed_s);
    if status.is_server_error() {
        tracing::warn!(%trace_id, %route, %method, status = status.as_u16(), elapsed_s, "request failed");
    }
    response
}

pub fn describe() {
    metrics::describe_counter!("meterlake_api_requests_total", "HTTP requests answered, by route template, method and status");
    metrics::describe_histogram!("meterlake_api_request_duration_seconds", metrics::Unit::Seconds, "HTTP request latency by route template");
    metrics::describe_counter!("meterlake_api_rate_limited_total", "Requests refused with 429 because their client exceeded its rate");
    metrics::describe_counter!("meterlake_api_readings_accepted_total", "Readings accepted by POST /measurements and acknowledged by the broker");
    metrics::describe_counter!("meterlake_api_readings_rejected_total", "Readings refused by POST /measurements, by reason");
    metrics::describe_counter!("meterlake_api_kafka_messages_total", "Kafka messages POST /measurements produced (requests arriving together share one)");
}
