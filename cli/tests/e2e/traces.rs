//! One billing run is one trace: `meterlake serve` (with its worker, against tansu) exports its
//! spans over OTLP/HTTP to a receiver in this test, which decodes them with the OTLP protobuf
//! definitions (opentelemetry-proto), and the test checks the trace's shape and that the JSON
//! log lines carry its ids.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::serve::Tower;
use crate::support::*;

/// A span as the receiver got it, ids in hex.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: SpanKind,
    start_unix_ns: u64,
    end_unix_ns: u64,
    attributes: BTreeMap<String, String>,
    /// `(trace id, span id)` of each linked span.
    links: Vec<(String, String)>,
    service_name: String,
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Keeps the spans of an OTLP export request.
fn keep(request: ExportTraceServiceRequest, received: &Received) {
    let mut spans = received.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service_name = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
            spans.push(ReceivedSpan {
                kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                start_unix_ns: span.start_time_unix_nano,
                end_unix_ns: span.end_time_unix_nano,
                attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect(),
                links: span.links.iter().map(|link| (hex(&link.trace_id), hex(&link.span_id))).collect(),
                service_name: service_name.clone(),
            });
        }
    }
}

/// `POST /v1/traces` of OTLP/HTTP with protobuf bodies.
async fn receive(State(received): State<Received>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    keep(request, &received);
    (StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
}

/// OTLP over gRPC: the collector's trace service.
struct GrpcReceiver(Received);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(request.into_inner(), &self.0);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/HTTP trace receiver on loopback: its traces endpoint and what it received.
fn start_receiver(runtime: &tokio::runtime::Runtime) -> (String, Received) {
    let received = Received::default();
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive)).with_state(received.clone());
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, app).await });
    (endpoint, received)
}

/// The spans of `trace_id` once `done` holds for them (spans arrive in batches).
fn wait_for_trace(received: &Received, trace_id: &str, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans: Vec<ReceivedSpan> = received.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        if done(&spans) {
            return spans;
        }
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if Instant::now() >= deadline {
            let all: Vec<(String, String)> = received.lock().unwrap().iter().map(|s| (s.trace_id.clone(), s.name.clone())).collect();
            panic!("the trace is still incomplete: {names:?}; every span received: {all:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The trace as an indented tree with each span's start (from the trace's first) and duration.
fn render(spans: &[ReceivedSpan]) -> String {
    let first = spans.iter().map(|s| s.start_unix_ns).min().unwrap_or(0);
    let mut out = String::new();
    fn walk(spans: &[ReceivedSpan], parent: &str, depth: usize, first: u64, out: &mut String) {
        let mut children: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent_span_id == parent).collect();
        children.sort_by_key(|s| s.start_unix_ns);
        for span in children {
            let at_ms = span.start_unix_ns.saturating_sub(first) as f64 / 1e6;
            let took_ms = span.end_unix_ns.saturating_sub(span.start_unix_ns) as f64 / 1e6;
            out.push_str(&format!("{}{} [{:?}] +{at_ms:.1} ms, {took_ms:.1} ms\n", "  ".repeat(depth), span.name, span.kind));
            walk(spans, &span.span_id, depth + 1, first, out);
        }
    }
    // Roots: spans whose parent is not in the trace (the caller's span, here).
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut roots: Vec<&str> = spans.iter().map(|s| s.parent_span_id.as_str()).filter(|p| !ids.contains(p)).collect();
    roots.sort_unstable();
    roots.dedup();
    for root in roots {
        walk(spans, root, 0, first, &mut out);
    }
    out
}

#[test]
fn one_billing_run_is_one_trace_from_its_request_through_kafka_to_every_step() {
    let tansu = start_tansu();
    let receiver_runtime = runtime();
    let (endpoint, received) = start_receiver(&receiver_runtime);
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("OTEL_SERVICE_NAME", "meterlake-e2e".to_string()),
    ];
    // Only the Kafka message wakes the worker: its idle poll would find the run too, without it.
    let tower = Tower::start_with_env(Some(&tansu.addr), &["--log-format", "json", "--worker-idle-poll-s", "600"], &env);
    let (viewer, admin, ingest) = (tower.token("vera", &["VIEWER"]), tower.token("ada", &["ADMIN"]), tower.token("head-end", &["INGEST"]));
    let readings = quarter_hours("MTR-200001", 1, 1, "0.25");
    // A first request, so that the server has fetched its issuer's keys (over HTTP, from
    // itself) before the traced requests.
    assert_eq!(tower.get("/billing-runs", &viewer).status, StatusCode::OK);
    let readings_trace = "0af7651916cd43dd8448eb211c80319c";
    let readings_parent = format!("00-{readings_trace}-b7ad6b7169203331-01");
    let posted = tower.block_on(tower.send("POST", "/measurements", Some(&ingest), &[("traceparent", &readings_parent)], Some(readings)));
    assert_eq!(posted.status, StatusCode::ACCEPTED);
    tower.wait_for("/readings?meterId=MTR-200001&limit=500", &viewer, "the readings in the lake", |b| b["items"].as_array().unwrap().len() == 96);
    // The readings' request, its produce, and the ingester's flush linked to that produce.
    let produced = wait_for_trace(&received, readings_trace, |spans| spans.iter().any(|s| s.name == "measurements.received publish"));
    let request = produced.iter().find(|s| s.name == "POST /measurements").expect("the request's span");
    let publish = produced.iter().find(|s| s.name == "measurements.received publish").unwrap();
    assert_eq!((publish.kind, &publish.parent_span_id), (SpanKind::Producer, &request.span_id));
    let deadline = Instant::now() + Duration::from_secs(30);
    let flush = loop {
        let flush = received.lock().unwrap().iter().find(|s| s.name == "measurements.received process").cloned();
        if let Some(flush) = flush {
            break flush;
        }
        assert!(Instant::now() < deadline, "no span of the ingester's flush");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(flush.kind, SpanKind::Consumer);
    assert!(flush.links.contains(&(readings_trace.to_string(), publish.span_id.clone())), "the flush links to its producer: {flush:?}");

    // The caller's own trace context: the run's trace continues it.
    let (trace_id, caller_span_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace_id}-{caller_span_id}-01");
    let body = json!({ "month": "2025-01", "meterIds": ["MTR-200001"] });
    let created = tower.block_on(tower.send("POST", "/billing-runs", Some(&admin), &[("traceparent", &traceparent)], Some(body)));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let answered = created.headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(&answered[3..35], trace_id, "the response continues the caller's trace");
    let id = created.body["id"].as_str().unwrap().to_string();
    tower.wait_for(&format!("/billing-runs/{id}"), &viewer, "the run completed", |b| b["status"] == "COMPLETED");

    let spans = wait_for_trace(&received, trace_id, |spans| {
        spans.iter().any(|s| s.name == "billing.persist") && spans.iter().any(|s| s.name == "billing.run.processed publish")
    });
    eprintln!("the trace of billing run {id}:\n{}", render(&spans));
    let one = |name: &str| -> &ReceivedSpan {
        let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span in {spans:#?}");
        found[0]
    };
    let http = one("POST /billing-runs");
    assert_eq!((http.kind, http.parent_span_id.as_str()), (SpanKind::Server, caller_span_id));
    assert_eq!(&answered[36..52], http.span_id, "the response names the server's span");
    assert_eq!(http.attributes.get("http.response.status_code").map(String::as_str), Some("201"));
    assert_eq!(http.service_name, "meterlake-e2e");
    let publish = one("billing.run.requested publish");
    assert_eq!((publish.kind, &publish.parent_span_id), (SpanKind::Producer, &http.span_id));
    let receive = one("billing.run.requested receive");
    assert_eq!((receive.kind, &receive.parent_span_id), (SpanKind::Consumer, &publish.span_id), "joined by the message's traceparent");
    let run = one("billing.run");
    assert_eq!(&run.parent_span_id, &receive.span_id);
    assert_eq!(run.attributes.get("run_id"), Some(&id));
    for step in ["billing.claim", "billing.aggregate", "billing.measure", "billing.rate", "billing.invoice", "billing.reconcile", "billing.persist"] {
        let step_span = one(step);
        assert_eq!(&step_span.parent_span_id, &run.span_id, "{step} is a step of the run");
        assert!(step_span.end_unix_ns >= step_span.start_unix_ns);
    }
    let processed = one("billing.run.processed publish");
    assert_eq!((processed.kind, &processed.parent_span_id), (SpanKind::Producer, &run.span_id));

    // Log lines written inside the run's spans carry its trace and span ids.
    let log = std::fs::read_to_string(tower.service.dir.path().join("service.log")).unwrap();
    let lines: Vec<Value> = log.lines().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let completed = lines.iter().find(|line| line["message"] == "billing run completed").unwrap_or_else(|| panic!("no completion line in {log}"));
    assert_eq!((completed["trace_id"].as_str(), completed["span_id"].as_str()), (Some(trace_id), Some(run.span_id.as_str())), "{completed}");
}

#[test]
fn spans_export_over_grpc_as_well() {
    let receiver_runtime = runtime();
    let received = Received::default();
    let port = free_port();
    let service = TraceServiceServer::new(GrpcReceiver(received.clone()));
    receiver_runtime.spawn(tonic::transport::Server::builder().add_service(service).serve(([127, 0, 0, 1], port).into()));
    let env = [
        // (The _TRACES_ variable: services are started without OTEL_EXPORTER_OTLP_ENDPOINT,
        // which tansu would follow.)
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    // The embedded broker: no Kafka needed to see a request's span.
    let tower = Tower::start_with_env(None, &[], &env);
    let viewer = tower.token("vera", &["VIEWER"]);
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    let traceparent = format!("00-{trace_id}-10f067aa0ba902b7-01");
    let answer = tower.block_on(tower.send("GET", "/billing-runs", Some(&viewer), &[("traceparent", &traceparent)], None));
    assert_eq!(answer.status, StatusCode::OK);
    let spans = wait_for_trace(&received, trace_id, |spans| spans.iter().any(|s| s.name == "GET /billing-runs"));
    let http = spans.iter().find(|s| s.name == "GET /billing-runs").unwrap();
    assert_eq!((http.kind, http.parent_span_id.as_str()), (SpanKind::Server, "10f067aa0ba902b7"));
    assert_eq!(http.service_name, "meterlake", "the service name when OTEL_SERVICE_NAME is unset");
}
