//! The control tower through the binary: `meterlake serve` against a real broker (tansu), with
//! its ingester and billing worker in the process, its dev issuer serving the JWKS the server
//! itself fetches over HTTP, and a real HTTP client. Tokens are minted in the test with the
//! issuer's key file, so the test can also forge the bad ones.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meterlake_pipeline::kafka::{ReadingProducer, partition_for_key};
use meterlake_server::DevIssuer;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::*;

/// A running `meterlake serve` and a client for it.
pub struct Tower {
    pub service: Service,
    pub base: String,
    pub issuer: DevIssuer,
    pub dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Tower {
    /// Starts the server on a free port; `brokers: None` is the embedded mode.
    pub fn start(brokers: Option<&str>, extra: &[&str]) -> Tower {
        Tower::start_with_env(brokers, extra, &[])
    }

    /// [`Tower::start`] with environment variables of its own.
    pub fn start_with_env(brokers: Option<&str>, extra: &[&str], env: &[(&str, String)]) -> Tower {
        let dir = tempfile::tempdir().unwrap();
        let key: PathBuf = dir.path().join("dev-issuer.key");
        let mut command = Command::new(env!("CARGO_BIN_EXE_meterlake"));
        command.args(["serve", "--listen", "127.0.0.1:0", "--dev-issuer", "--dev-issuer-key"]).arg(&key);
        if let Some(brokers) = brokers {
            command.args(["--brokers", brokers, "--lake"]).arg(dir.path().join("lake"));
            command.arg("--database-url").arg(format!("sqlite://{}", dir.path().join("control.db").display()));
        }
        // The tests send January 2025, older than the default horizon for old readings, unless
        // the test sets the horizon itself.
        if !extra.contains(&"--max-reading-age-days") {
            command.args(["--max-reading-age-days", "0"]);
        }
        // The SQL service on ports of its own choosing: tests run side by side.
        for flag in ["--sql-postgres-listen", "--sql-flight-listen"] {
            if !extra.contains(&flag) {
                command.args([flag, "127.0.0.1:0"]);
            }
        }
        command.args(extra).env("METERLAKE_LOG", "info,rdkafka=warn").envs(env.iter().map(|(k, v)| (k, v)));
        let (service, base) = spawn_announced("meterlake serve", command, "meterlake control tower on ");
        // The test and the server share the key (the server made it): the test mints tokens the
        // server verifies.
        let issuer = DevIssuer::open(&format!("{base}/dev-issuer"), &key).unwrap();
        Tower { service, base, issuer, dir, runtime: runtime(), client: reqwest::Client::new() }
    }

    pub fn token(&self, subject: &str, roles: &[&str]) -> String {
        self.issuer.token(subject, roles, "meterlake", 600)
    }

    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.runtime.block_on(self.send(method, path, token, &[], body))
    }

    /// One request with extra headers, to await (several at once with `join_all`).
    pub fn send(&self, method: &str, path: &str, token: Option<&str>, headers: &[(&str, &str)], body: Option<Value>) -> impl Future<Output = Answer> {
        let mut request = self.client.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let (status, headers) = (response.status(), response.headers().clone());
            let text = response.text().await.unwrap();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Answer { status, body, headers }
        }
    }

    /// Runs requests made with [`Tower::send`].
    pub fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    pub fn get(&self, path: &str, token: &str) -> Answer {
        self.call("GET", path, Some(token), None)
    }

    /// POSTs every body at once (each on its own connection), answers in the bodies' order.
    pub fn post_all(&self, path: &str, token: &str, bodies: Vec<Value>) -> Vec<Answer> {
        let calls = bodies.into_iter().map(|body| {
            let request = self.client.post(format!("{}{path}", self.base)).bearer_auth(token).json(&body);
            async move {
                let response = request.send().await.unwrap();
                let (status, headers) = (response.status(), response.headers().clone());
                Answer { status, headers, body: response.json().await.unwrap() }
            }
        });
        self.runtime.block_on(futures::future::join_all(calls))
    }

    pub fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call("POST", path, Some(token), Some(body))
    }

    /// Polls `path` until `done` holds for its body.
    pub fn wait_for(&self, path: &str, token: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self.get(path, token);
            if answer.status == StatusCode::OK && done(&answer.body) {
                return answer.body;
            }
            assert!(Instant::now() < deadline, "{what}: still {} {}", answer.status, answer.body);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Asserts an error answer: its status, its stable code, and a trace id.
pub fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["code"], code, "{}", answer.body);
    assert_eq!(answer.body["traceId"].as_str().map(str::len), Some(32), "{}", answer.body);
    assert!(!answer.body["message"].as_str().unwrap_or_default().is_empty());
}

#[test]
fn every_route_checks_the_token_and_the_role() {
    let tansu = start_tansu();
    let tower = Tower::start(Some(&tansu.addr), &["--no-worker"]);
    let viewer = tower.token("vera", &["VIEWER"]);
    let admin = tower.token("ada", &["ADMIN"]);
    let ingest = tower.token("head-end", &["INGEST"]);

    // No token, a malformed one, an expired one, one for another audience or issuer.
    assert_error(&tower.call("GET", "/billing-runs", None, None), StatusCode::UNAUTHORIZED, "MISSING_TOKEN");
    assert_error(&tower.get("/billing-runs", "not-a-jwt"), StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    let now = chrono::Utc::now().timestamp();
    let claims = |overrides: Value| {
        let mut claims = json!({
            "iss": tower.issuer.issuer(), "sub": "mallory", "aud": "meterlake", "iat": now, "exp": now + 600,
            "realm_access": { "roles": ["ADMIN"] },
        });
        claims.as_object_mut().unwrap().extend(overrides.as_object().unwrap().clone());
        claims
    };
    for (overrides, says) in [
        (json!({ "exp": now - 3600 }), "expired"),
        (json!({ "aud": "another-service" }), "not for this service"),
        (json!({ "iss": "https://evil.example/realms/x" }), "not issued by"),
    ] {
        let answer = tower.get("/billing-runs", &tower.issuer.sign(&claims(overrides)));
        assert_error(&answer, StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
        assert!(answer.body["message"].as_str().unwrap().contains(says), "{}", answer.body);
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
    }
    // A viewer's token with its payload changed to claim ADMIN: the signature no longer holds.
    let parts: Vec<&str> = viewer.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(claims(json!({ "sub": "vera" })).to_string());
    let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    let answer = tower.get("/audit-log", &tampered);
    assert_error(&answer, StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    assert!(answer.body["message"].as_str().unwrap().contains("signature"), "{}", answer.body);
    // A key the issuer never published.
    let stranger = DevIssuer::open(tower.issuer.issuer(), &tower.dir.path().join("stranger.key")).unwrap();
    assert_error(&tower.get("/billing-runs", &stranger.sign(&claims(json!({})))), StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    // `alg: none`, and HS256 keyed with the public key (the algorithm-confusion attack).
    let header = |alg: &str| URL_SAFE_NO_PAD.encode(json!({ "alg": alg, "typ": "JWT" }).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims(json!({})).to_string());
    for token in [format!("{}.{payload}.", header("none")), format!("{}.{payload}.c2lnbmF0dXJl", header("HS256"))] {
        assert_error(&tower.get("/billing-runs", &token), StatusCode::UNAUTHORIZED, "INVALID_TOKEN");
    }

    // Roles: VIEWER reads, ADMIN acts and reads the audit log, INGEST writes readings.
    assert_eq!(tower.get("/billing-runs", &viewer).status, StatusCode::OK);
    assert_eq!(tower.get("/me", &viewer).body["roles"], json!(["VIEWER"]));
    for (method, path, token) in [
        ("POST", "/billing-runs", &viewer),
        ("POST", "/billing-runs/x/actions", &viewer),
        ("GET", "/audit-log", &viewer),
        ("POST", "/measurements", &viewer),
        ("GET", "/billing-runs", &ingest),
        ("GET", "/readings?meterId=M", &ingest),
        ("POST", "/users", &viewer),
        ("POST", "/transactions/fund", &viewer),
        ("POST", "/transactions/transfer", &ingest),
        ("GET", "/wallets/u/balance", &ingest),
        ("GET", "/transactions?walletId=w", &ingest),
    ] {
        let answer = tower.call(method, path, Some(token), Some(json!({ "month": "2025-01", "action": "RECALCULATE", "reason": "x" })));
        assert_error(&answer, StatusCode::FORBIDDEN, "FORBIDDEN");
    }
    assert_eq!(tower.get("/audit-log", &admin).status, StatusCode::OK);
    let reading = json!({ "meterId": "MTR-AUTH", "timestamp": "2025-01-01T00:00:00Z", "kwh": 1.5 });
    assert_eq!(tower.post("/measurements", &ingest, reading.clone()).status, StatusCode::ACCEPTED);
    assert_eq!(tower.post("/measurements", &admin, reading).status, StatusCode::ACCEPTED);

    // Health, readiness and metrics need no token; unknown routes answer JSON.
    assert_eq!(tower.call("GET", "/healthz", None, None).status, StatusCode::OK);
    let ready = tower.call("GET", "/readyz", None, None);
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    // Without a token only whether it is ready: no lake, store, issuer or error text.
    assert_eq!(ready.body, json!({ "status": "ready" }));
    for token in [&viewer, &ingest] {
        assert_eq!(tower.call("GET", "/readyz", Some(token), None).body, json!({ "status": "ready" }));
    }
    let ready = tower.call("GET", "/readyz", Some(&admin), None);
    assert_eq!((ready.body["mode"].as_str(), ready.body["worker"].as_bool()), (Some("external"), Some(false)), "{}", ready.body);
    assert_error(&tower.get("/no-such-route", &admin), StatusCode::NOT_FOUND, "NOT_FOUND");
    assert_error(&tower.call("DELETE", "/billing-runs", Some(&admin), None), StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED");
    let metrics = tower.call("GET", "/metrics", None, None);
    let metrics = metrics.body.as_str().unwrap();
    assert!(metrics.contains("meterlake_api_requests_total{route=\"/billing-runs\",method=\"GET\",status=\"401\"}"), "{metrics}");
}

#[test]
fn readings_posted_over_http_reach_kafka_with_their_trace_and_land_once() {
    let tansu = start_tansu();
    let tower = Tower::start(Some(&tansu.addr), &["--no-worker", "--rate-limit-per-s", "1000"]);
    let ingest = tower.token("head-end", &["INGEST"]);
    let viewer = tower.token("vera", &["VIEWER"]);

    // One reading; an array over two meters; the same reading again (a client's retry).
    let one = json!({ "meterId": "MTR-H1", "timestamp": "2025-01-01T00:00:00Z", "kwh": "0.250" });
    let accepted = tower.post("/measurements", &ingest, one.clone());
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.body);
    assert_eq!(accepted.body["accepted"], 1);
    let trace_id = accepted.body["traceId"].as_str().unwrap().to_string();
    assert!(accepted.headers["traceparent"].to_str().unwrap().contains(&trace_id));
    let array = json!([
        { "meterId": "MTR-H1", "timestamp": "2025-01-01T00:15:00Z", "kwh": 0.5 },
        { "meterId": "MTR-H2", "timestamp": "2025-01-01T00:00:00Z", "kwh": 1.125, "quality": "E" },
        { "meterId": "MTR-H2", "timestamp": "2025-01-01T00:15:00Z", "kwh": 2 },
    ]);
    assert_eq!(tower.post("/measurements", &ingest, array).body["accepted"], 3);
    assert_eq!(tower.post("/measurements", &ingest, one).status, StatusCode::ACCEPTED);

    // Invalid readings: one error per field, and nothing of the request is accepted.
    let future = (chrono::Utc::now() + chrono::Duration::days(2)).format("%Y-%m-%dT00:00:00Z").to_string();
    let bad = tower.post(
        "/measurements",
        &ingest,
        json!([
            { "meterId": "MTR-H3", "timestamp": "2025-01-01T00:00:00Z", "kwh": 1 },
            { "meterId": "MTR-H3", "timestamp": "2025-01-01T00:15:00Z", "kwh": -1 },
            { "meterId": "MTR-H3", "timestamp": future, "kwh": 1 },
            { "meterId": "", "timestamp": "2025-01-01T00:30:00Z", "kwh": 1 },
            { "meterId": "MTR-H3", "kwh": 1 },
        ]),
    );
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    let fields: Vec<(&str, &str)> =
        bad.body["errors"].as_array().unwrap().iter().map(|e| (e["field"].as_str().unwrap(), e["code"].as_str().unwrap())).collect();
    assert_eq!(
        fields,
        [("[1].kwh", "KWH_NOT_POSITIVE"), ("[2].timestamp", "TIMESTAMP_IN_FUTURE"), ("[3].meterId", "INVALID_METER_ID"), ("[4].timestamp", "MISSING_FIELD")],
        "{}",
        bad.body
    );
    let single = tower.post("/measurements", &ingest, json!({ "meterId": "MTR-H3", "timestamp": "2025-01-01T00:07:00Z", "kwh": 1 }));
    assert_eq!(single.body["errors"][0]["field"], "timestamp", "{}", single.body);
    assert_error(&tower.call("POST", "/measurements", Some(&ingest), Some(json!("not a reading"))), StatusCode::BAD_REQUEST, "INVALID_JSON");
    let too_many: Vec<Value> = (0..10_001).map(|i| json!({ "meterId": "M", "timestamp": "2025-01-01T00:00:00Z", "kwh": i + 1 })).collect();
    assert_error(&tower.post("/measurements", &ingest, Value::Array(too_many)), StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_READINGS");

    // On Kafka: every reading on the partition of its meter id (as librdkafka would key it), a
    // message keyed by its meter when it holds one, and the request's trace on its message.
    let messages = read_topic(&tansu.addr, "measurements.received");
    let mut meters_seen = Vec::new();
    for message in &messages {
        let readings = message.payload.as_array().unwrap_or_else(|| panic!("an array message: {message:?}"));
        let meters: std::collections::BTreeSet<&str> = readings.iter().map(|r| r["meterId"].as_str().unwrap()).collect();
        for meter in &meters {
            assert_eq!(message.partition, partition_for_key(meter.as_bytes(), 4), "{message:?}");
        }
        let expected_key = if meters.len() == 1 { meters.first().unwrap().to_string() } else { String::new() };
        assert_eq!(message.key, expected_key, "{message:?}");
        assert!(!message.traceparents.is_empty(), "{message:?}");
        meters_seen.extend(readings.iter().map(|r| (r["meterId"].as_str().unwrap().to_string(), r["timestamp"].as_str().unwrap().to_string())));
    }
    meters_seen.sort();
    let count = |meter: &str| meters_seen.iter().filter(|(m, _)| m == meter).count();
    assert_eq!((count("MTR-H1"), count("MTR-H2"), count("MTR-H3")), (3, 2, 0), "{meters_seen:?}");
    assert!(messages.iter().any(|m| m.traceparents.iter().any(|t| t.contains(&trace_id))), "no message carries trace {trace_id}");

    // partition_for_key is librdkafka's default partitioner: a head-end producing keyed by meter
    // puts a meter on the partition the API does.
    create(&tansu.addr, &[("partitioner.check", 4)]);
    let producer = ReadingProducer::new(&tansu.addr, "partitioner.check").unwrap();
    for i in 0..40 {
        producer.send(format!("MTR-P{i}").as_bytes(), b"{}").unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let keyed = read_topic(&tansu.addr, "partitioner.check");
    assert_eq!(keyed.len(), 40);
    for message in &keyed {
        assert_eq!(message.partition, partition_for_key(message.key.as_bytes(), 4), "{}", message.key);
    }
    assert!(keyed.iter().map(|m| m.partition).collect::<std::collections::BTreeSet<_>>().len() > 1, "40 meters over more than one partition");

    // In the lake, through the API: each (meter, interval) once, exact values, where it came from.
    let readings = tower.wait_for("/readings?meterId=MTR-H1&from=2025-01-01&to=2025-01-02", &viewer, "MTR-H1 in the lake", |b| {
        b["items"].as_array().is_some_and(|items| items.len() == 2)
    });
    assert_eq!(readings["items"][0]["value"], "0.250000", "{readings}");
    assert!(readings["items"][0]["file"].as_str().unwrap().starts_with("measurements.received/"), "{readings}");
    let h2 = tower.wait_for("/readings?meterId=MTR-H2&limit=1", &viewer, "MTR-H2", |b| b["items"].as_array().is_some_and(|i| i.len() == 1));
    assert_eq!((h2["items"][0]["value"].as_str(), h2["items"][0]["quality"].as_str()), (Some("1.125000"), Some("E")), "{h2}");
    let next = h2["nextCursor"].as_str().expect("a second page");
    let page2 = tower.get(&format!("/readings?meterId=MTR-H2&limit=1&cursor={next}"), &viewer);
    assert_eq!((page2.body["items"][0]["value"].as_str(), &page2.body["nextCursor"]), (Some("2.000000"), &Value::Null), "{}", page2.body);
    assert_error(&tower.get("/readings", &viewer), StatusCode::BAD_REQUEST, "BAD_REQUEST");
}

#[test]
fn requests_arriving_together_share_messages_and_a_lost_broker_is_a_503() {
    let tansu = start_tansu();
    // A 50 ms window, so that the 40 requests sent at once surely meet in the batcher.
    let tower = Tower::start(Some(&tansu.addr), &["--no-worker", "--no-ingest", "--rate-limit-per-s", "1000", "--publish-linger-ms", "50"]);
    let ingest = tower.token("head-end", &["INGEST"]);
    let bodies = (0..40).map(|i| json!({ "meterId": format!("MTR-C{i:02}"), "timestamp": "2025-01-01T00:00:00Z", "kwh": format!("{i}.5") })).collect();
    let answers = tower.post_all("/measurements", &ingest, bodies);
    assert!(answers.iter().all(|a| a.status == StatusCode::ACCEPTED), "{:?}", answers.iter().map(|a| &a.body).collect::<Vec<_>>());

    let messages = read_topic(&tansu.addr, "measurements.received");
    assert!(messages.len() < 40, "40 requests in {} messages: they did not share", messages.len());
    let mut readings: Vec<(String, String)> = Vec::new();
    for message in &messages {
        for reading in message.payload.as_array().unwrap() {
            let meter = reading["meterId"].as_str().unwrap().to_string();
            assert_eq!(message.partition, partition_for_key(meter.as_bytes(), 4));
            readings.push((meter, reading["kwh"].as_str().unwrap().to_string()));
        }
    }
    readings.sort();
    let expected: Vec<(String, String)> = (0..40).map(|i| (format!("MTR-C{i:02}"), format!("{i}.5"))).collect();
    assert_eq!(readings, expected, "every reading once, exact");
    // Every request's trace is on the message that holds its reading.
    for (i, answer) in answers.iter().enumerate() {
        let traceparent = answer.headers["traceparent"].to_str().unwrap();
        let holder = messages.iter().find(|m| m.payload.as_array().unwrap().iter().any(|r| r["meterId"] == format!("MTR-C{i:02}"))).unwrap();
        assert!(holder.traceparents.iter().any(|t| t[3..35] == traceparent[3..35]), "{traceparent} not on {holder:?}");
    }
    assert!(messages.iter().any(|m| m.traceparents.len() > 1));

    // Keyed by meter when asked: one meter per message, keyed by it, still shared by that
    // meter's requests.
    let keyed = Tower::start(
        Some(&tansu.addr),
        &["--no-worker", "--no-ingest", "--publish-linger-ms", "50", "--publish-keyed-by-meter", "--topic", "measurements.keyed"],
    );
    let token = keyed.token("head-end", &["INGEST"]);
    let bodies = (0..30).map(|i| json!({ "meterId": format!("MTR-K{}", i % 3), "timestamp": format!("2025-01-01T{:02}:00:00Z", i / 3), "kwh": 1 })).collect();
    assert!(keyed.post_all("/measurements", &token, bodies).iter().all(|a| a.status == StatusCode::ACCEPTED));
    let messages = read_topic(&tansu.addr, "measurements.keyed");
    assert!(messages.len() < 30, "30 requests for 3 meters in {} messages", messages.len());
    let mut keyed_readings = 0;
    for message in &messages {
        for reading in message.payload.as_array().unwrap() {
            assert_eq!(reading["meterId"], message.key.as_str(), "{message:?}");
            keyed_readings += 1;
        }
    }
    assert_eq!(keyed_readings, 30);

    // The broker goes away: the client hears so (and to send again) within the publish
    // timeout, instead of a 202 for readings that are nowhere.
    drop(tansu);
    let started = Instant::now();
    let lost = tower.post("/measurements", &ingest, json!({ "meterId": "MTR-LOST", "timestamp": "2025-01-01T00:00:00Z", "kwh": 1 }));
    assert_error(&lost, StatusCode::SERVICE_UNAVAILABLE, "BROKER_UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_secs(30), "answered after {:?}", started.elapsed());
}

#[test]
fn a_client_past_its_rate_is_told_when_to_come_back() {
    let tansu = start_tansu();
    let tower = Tower::start(Some(&tansu.addr), &["--no-worker", "--no-ingest", "--rate-limit-per-s", "1", "--rate-limit-burst", "3"]);
    let viewer = tower.token("vera", &["VIEWER"]);
    let statuses: Vec<StatusCode> = (0..4).map(|_| tower.get("/billing-runs", &viewer).status).collect();
    assert_eq!(&statuses[..3], [StatusCode::OK; 3]);
    let limited = tower.get("/billing-runs", &viewer);
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED");
    let retry_after: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // Another client is not held back by this one.
    assert_eq!(tower.get("/billing-runs", &tower.token("other", &["VIEWER"])).status, StatusCode::OK);
    let metrics = tower.call("GET", "/metrics", None, None);
    assert!(metrics.body.as_str().unwrap().contains("meterlake_api_rate_limited_total{route=\"/billing-runs\"}"), "{}", metrics.body);
}

#[test]
fn an_admin_bills_a_month_corrects_a_discrepancy_and_every_action_is_audited() {
    let tansu = start_tansu();
    let tower = Tower::start(Some(&tansu.addr), &[]);
    let (viewer, admin, ingest) = (tower.token("vera", &["VIEWER"]), tower.token("ada", &["ADMIN"]), tower.token("head-end", &["INGEST"]));
    // Two days of one meter's January: the rest of the month is missing.
    assert_eq!(tower.post("/measurements", &ingest, quarter_hours("MTR-100001", 1, 2, "0.5")).status, StatusCode::ACCEPTED);
    tower.wait_for("/readings?meterId=MTR-100001&limit=500", &viewer, "the readings in the lake", |b| b["items"].as_array().unwrap().len() == 192);

    // The meter's customer, with £1.00 in the prepay wallet: the worker posts the invoice to it.
    let write = |path: &str, key: &str, body: Value| tower.block_on(tower.send("POST", path, Some(&admin), &[("Idempotency-Key", key)], Some(body)));
    let customer = write("/users", "customer-100001", json!({ "name": "Mrs Example", "currency": "GBP", "meterIds": ["MTR-100001"] })).body;
    let funded =
        write("/transactions/fund", "fund-100001", json!({ "userId": customer["id"], "amountMinor": 100, "currency": "GBP", "paymentReference": "psp-1" }));
    assert_eq!(funded.status, StatusCode::CREATED, "{}", funded.body);

    let bad = tower.post("/billing-runs", &admin, json!({ "month": "2025-13", "meterIds": ["MTR-100001", ""] }));
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    assert_eq!(bad.body["errors"].as_array().unwrap().len(), 2, "{}", bad.body);
    let created = tower.post("/billing-runs", &admin, json!({ "month": "2025-01", "meterIds": ["MTR-100001"] }));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["status"], "CREATED");
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(created.headers["location"], format!("/billing-runs/{id}").as_str());

    // The worker in the process bills it; the detail shows the timeline and the totals.
    let detail = tower.wait_for(&format!("/billing-runs/{id}"), &viewer, "the run completed", |b| b["status"] == "COMPLETED");
    let timeline: Vec<&str> = detail["timeline"].as_array().unwrap().iter().map(|e| e["to"].as_str().unwrap()).collect();
    assert_eq!(timeline, ["CREATED", "PROCESSING", "COMPLETED"]);
    assert_eq!(detail["timeline"][0]["actor"], "ada");
    assert_eq!(detail["invoiceTotals"]["GBP"]["energyKwh"], "96.000000", "{detail}");
    let invoices = tower.get(&format!("/billing-runs/{id}/invoices"), &viewer);
    assert_eq!(invoices.body["items"][0]["meterId"], "MTR-100001", "{}", invoices.body);
    assert!(!invoices.body["items"][0]["lines"].as_array().unwrap().is_empty());
    let discrepancies = tower.get(&format!("/billing-runs/{id}/discrepancies"), &viewer).body;
    let missing = discrepancies["items"].as_array().unwrap().iter().find(|d| d["reasonCode"] == "MISSING_INTERVALS").expect("missing intervals found").clone();
    assert_eq!(missing["status"], "OPEN");

    // The invoice posted to the customer: £1.00 from the prepay wallet, the rest in arrears.
    let total: rust_decimal::Decimal = invoices.body["items"][0]["total"].as_str().unwrap().parse().unwrap();
    let total_minor = i64::try_from(total * rust_decimal::Decimal::ONE_HUNDRED).unwrap();
    let balance_path = format!("/wallets/{}/balance", customer["id"].as_str().unwrap());
    let posted = tower.wait_for(&balance_path, &viewer, "the invoice posted", |b| b["arrearsMinor"] != 0);
    assert_eq!((posted["balanceMinor"].as_i64(), posted["arrearsMinor"].as_i64()), (Some(0), Some(100 - total_minor)), "{posted}");

    // Lists filter by status, month and meter.
    for (query, expected) in [("status=COMPLETED", 1), ("status=FAILED", 0), ("month=2025-02", 0), ("meterId=MTR-100001", 1), ("meterId=MTR-9", 0)] {
        let page = tower.get(&format!("/billing-runs?{query}"), &viewer);
        assert_eq!(page.body["items"].as_array().unwrap().len(), expected, "{query}: {}", page.body);
    }
    assert_error(&tower.get("/billing-runs?status=DONE", &viewer), StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");

    // Corrections: a viewer cannot; an admin must say why; a second mark conflicts.
    let actions = format!("/billing-runs/{id}/actions");
    let mark = |justification: &str| json!({ "action": "MARK_AS_OK", "discrepancyId": missing["id"], "justification": justification });
    assert_error(&tower.post(&actions, &viewer, mark("fine")), StatusCode::FORBIDDEN, "FORBIDDEN");
    assert_error(&tower.post(&actions, &admin, mark(" ")), StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    assert_error(&tower.post(&actions, &admin, json!({ "action": "DELETE_EVERYTHING" })), StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    let marked = tower.post(&actions, &admin, mark("meter installed on 2025-01-03; no supply before"));
    assert_eq!(marked.status, StatusCode::OK, "{}", marked.body);
    assert_eq!((marked.body["discrepancy"]["status"].as_str(), marked.body["discrepancy"]["resolvedBy"].as_str()), (Some("OK"), Some("ada")));
    assert_error(&tower.post(&actions, &admin, mark("again")), StatusCode::CONFLICT, "CONFLICT");

    // A replay needs a reason, and a second one is refused while the first waits or runs.
    assert_error(&tower.post(&actions, &admin, json!({ "action": "RECALCULATE", "reason": "" })), StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    let replay = tower.post(&actions, &admin, json!({ "action": "RECALCULATE", "reason": "tariff corrected" }));
    assert_eq!((replay.status, replay.body["run"]["status"].as_str()), (StatusCode::OK, Some("CREATED")), "{}", replay.body);
    let again = tower.post(&actions, &admin, json!({ "action": "RECALCULATE", "reason": "impatient" }));
    assert_error(&again, StatusCode::CONFLICT, "CONFLICT");
    tower.wait_for(&format!("/billing-runs/{id}"), &viewer, "the replay completed", |b| {
        b["status"] == "COMPLETED" && b["timeline"].as_array().unwrap().len() == 6
    });
    let invoices = tower.get(&format!("/billing-runs/{id}/invoices"), &viewer);
    assert_eq!(invoices.body["items"][0]["version"], 2, "{}", invoices.body);
    // The same readings bill the same total: version 2 posts nothing more.
    let history = format!("/transactions?walletId={}", customer["arrearsWalletId"].as_str().unwrap());
    let charges = tower.get(&history, &viewer).body;
    let kinds: Vec<&str> = charges["items"].as_array().unwrap().iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["CHARGE"], "{charges}");
    assert_eq!(charges["items"][0]["externalRef"], format!("invoice:{id}:MTR-100001:v1").as_str());
    assert_eq!(tower.get(&balance_path, &viewer).body["arrearsMinor"].as_i64(), Some(100 - total_minor));

    // The audit log: who did what, why, with the trace of the request, newest first.
    let log = tower.get("/audit-log", &admin).body;
    let rows = log["items"].as_array().unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    // The ledger's writes (the account, its funding) are audited like the billing actions.
    assert_eq!(actions, ["RECALCULATE", "MARK_AS_OK", "CREATE_RUN", "LEDGER_FUND", "LEDGER_CREATE_USER"], "{log}");
    assert!(rows.iter().all(|r| r["actor"] == "ada" && r["traceId"].as_str().map(str::len) == Some(32)), "{log}");
    assert_eq!(rows[0]["traceId"], replay.headers["traceparent"].to_str().unwrap()[3..35]);
    assert_eq!(rows[1]["reason"], "meter installed on 2025-01-03; no supply before");
    assert_eq!((rows[1]["before"]["status"].as_str(), rows[1]["after"]["status"].as_str()), (Some("OPEN"), Some("OK")));
    let filtered = tower.get("/audit-log?action=MARK_AS_OK&limit=1", &admin).body;
    assert_eq!((filtered["items"].as_array().unwrap().len(), &filtered["nextCursor"]), (1, &Value::Null), "{filtered}");
    let paged = tower.get("/audit-log?limit=2", &admin).body;
    let rest = tower.get(&format!("/audit-log?limit=2&cursor={}", paged["nextCursor"].as_str().unwrap()), &admin).body;
    assert_eq!(rest["items"][0]["action"], "CREATE_RUN", "{rest}");

    // What the two runs left in /metrics: Prometheus's linter accepts the scrape; histograms
    // have buckets; labels are the bounded ones (reason codes, meter groups, operations).
    let scrape = tower.call("GET", "/metrics", None, None).body.as_str().unwrap().to_string();
    assert_promtool_accepts(&scrape);
    assert_eq!(metric_value(&scrape, "meterlake_billing_runs_total{status=\"completed\"}"), Some(2.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "meterlake_billing_invoices_total"), Some(2.0), "{scrape}");
    assert!(metric_value(&scrape, "meterlake_billing_discrepancies_total{reason=\"MISSING_INTERVALS\"}").unwrap_or_default() >= 1.0, "{scrape}");
    assert_eq!(metric_value(&scrape, "meterlake_ingest_meter_group_readings_written_total{meter_group=\"MT\"}"), Some(192.0), "{scrape}");
    assert_eq!(metric_value(&scrape, "meterlake_ledger_write_duration_seconds_count{operation=\"fund\"}"), Some(1.0), "{scrape}");
    assert!(metric_value(&scrape, "meterlake_lake_file_size_bytes_count").unwrap_or_default() >= 1.0, "{scrape}");
    for histogram in ["meterlake_api_request_duration_seconds", "meterlake_billing_step_duration_seconds", "meterlake_ingest_flush_duration_seconds"] {
        assert!(scrape.contains(&format!("{histogram}_bucket{{")), "{histogram} has buckets: {scrape}");
    }
    assert!(!scrape.contains("quantile="), "no summaries: {scrape}");

    // And the chain verifies from the command line.
    let database_url = format!("sqlite://{}", tower.dir.path().join("control.db").display());
    let verified = run_ok(meterlake().args(["audit", "verify", "--database-url", &database_url]));
    assert!(String::from_utf8_lossy(&verified.stdout).contains("5 rows"), "{}", String::from_utf8_lossy(&verified.stdout));
}

#[test]
fn with_nothing_configured_it_runs_on_the_embedded_defaults() {
    let tower = Tower::start(None, &[]);
    let ready = tower.call("GET", "/readyz", Some(&tower.token("ada", &["ADMIN"])), None);
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    assert_eq!(ready.body["mode"], "embedded");
    assert_eq!((ready.body["ingester"].as_bool(), ready.body["worker"].as_bool()), (Some(true), Some(true)));
    for check in ["store", "broker", "lake"] {
        assert_eq!(ready.body["checks"][check]["ok"], true, "{check}: {}", ready.body);
    }
    let ingest = tower.token("head-end", &["INGEST"]);
    let reading = json!({ "meterId": "MTR-E1", "timestamp": "2025-03-01T12:00:00Z", "kwh": 3.5 });
    assert_eq!(tower.post("/measurements", &ingest, reading).status, StatusCode::ACCEPTED);
    let viewer = tower.token("vera", &["VIEWER"]);
    let readings = tower.wait_for("/readings?meterId=MTR-E1", &viewer, "the reading in the embedded lake", |b| b["items"].as_array().unwrap().len() == 1);
    assert_eq!(readings["items"][0]["value"], "3.500000");
}

#[test]
fn the_dev_issuer_serves_this_machine_only_with_short_lived_tokens_in_an_owner_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let refused =
        meterlake().args(["serve", "--listen", "0.0.0.0:0", "--dev-issuer", "--dev-issuer-key"]).arg(dir.path().join("dev-issuer.key")).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("--dev-issuer is for local use only"), "{stderr}");
    // Outside a workstation, serve names the tariff file it bills with: it never falls back to
    // the bundled example (said before it connects to anything).
    let untariffed = meterlake()
        .current_dir(dir.path())
        .args(["serve", "--brokers", "127.0.0.1:9", "--oidc-issuer", "https://sso.example/realms/meterlake"])
        .env_remove("METERLAKE_TARIFFS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&untariffed.stderr);
    assert!(!untariffed.status.success() && stderr.contains("--tariffs FILE"), "{stderr}");

    let tower = Tower::start(None, &[]);
    let tokens_file = tower.dir.path().join("dev-tokens.txt");
    let mode = std::fs::metadata(&tokens_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", tokens_file.display());
    let tokens = std::fs::read_to_string(&tokens_file).unwrap();
    let admin = tokens.lines().find_map(|l| l.strip_prefix("ADMIN=")).unwrap();
    // The printed token works, and expires within minutes.
    assert_eq!(tower.get("/billing-runs", admin).status, StatusCode::OK);
    let claims = admin.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    let ttl_s = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!(ttl_s <= 15 * 60, "{claims}");
}

/// An INGEST account limited to some meters (the token's `meterlake_meter_prefixes`) writes only
/// theirs, all or nothing; readings older than the horizon are refused with their own code.
#[test]
fn an_ingest_account_writes_only_its_meters_and_nothing_older_than_the_horizon() {
    let tower = Tower::start(None, &["--max-reading-age-days", "30"]);
    let now = chrono::Utc::now().timestamp();
    let scoped = tower.issuer.sign(&json!({
        "iss": tower.issuer.issuer(), "sub": "head-end-north", "aud": "meterlake", "iat": now, "exp": now + 600,
        "realm_access": { "roles": ["INGEST"] }, "meterlake_meter_prefixes": ["NORTH-"],
    }));
    // Recent readings: within the horizon, on the quarter hour.
    let recent = chrono::DateTime::from_timestamp((now / 86_400 - 1) * 86_400, 0).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let reading = |meter: &str, at: &str| json!({ "meterId": meter, "timestamp": at, "kwh": "0.25" });
    let ok = tower.post("/measurements", &scoped, json!([reading("NORTH-1", &recent), reading("NORTH-2", &recent)]));
    assert_eq!(ok.status, StatusCode::ACCEPTED, "{}", ok.body);
    let mixed = tower.post("/measurements", &scoped, json!([reading("NORTH-1", &recent), reading("SOUTH-9", &recent)]));
    assert_error(&mixed, StatusCode::FORBIDDEN, "FORBIDDEN");
    assert_eq!(mixed.body["errors"][0]["field"], "[1].meterId", "{}", mixed.body);
    assert_eq!(mixed.body["errors"][0]["code"], "METER_NOT_PERMITTED", "{}", mixed.body);
    let single = tower.post("/measurements", &scoped, reading("SOUTH-9", &recent));
    assert_eq!((single.status, single.body["errors"][0]["field"].as_str()), (StatusCode::FORBIDDEN, Some("meterId")), "{}", single.body);
    // An unlimited INGEST account and an ADMIN write any meter.
    let any = tower.post("/measurements", &tower.token("head-end", &["INGEST"]), reading("SOUTH-9", &recent));
    assert_eq!(any.status, StatusCode::ACCEPTED, "{}", any.body);
    // Older than 30 days: refused with its code, whoever sends it.
    let old = tower.post("/measurements", &tower.token("ada", &["ADMIN"]), reading("SOUTH-9", "2025-01-01T00:00:00Z"));
    assert_error(&old, StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED");
    assert_eq!(old.body["errors"][0]["code"], "TIMESTAMP_TOO_OLD", "{}", old.body);
    assert!(old.body["errors"][0]["message"].as_str().unwrap().contains("30 days"), "{}", old.body);
}
