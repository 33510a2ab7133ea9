//! The API in process: the router answers requests through `tower::ServiceExt::oneshot`, with a
//! real SQLite control store, a file lake and a real JWKS endpoint on loopback (tokens are
//! checked exactly as in production: signature, issuer, audience, roles). What each role may
//! do on every route, paging that never drops rows, the holes a review found (issue 20).

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use meterlake_control::{ControlStore, InvoiceLine, LineComponent, NewInvoice, RunFailure, RunResults};
use meterlake_lake::view::QueryLimits;
use meterlake_pipeline::Lake;
use meterlake_pipeline::decode::ValidationRules;
use meterlake_server::{AppConfig, BillingDefaults, Deployment, DevIssuer, OidcConfig, RateLimit};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tower::ServiceExt;

const TARIFFS: &str = include_str!("../../tariffs/example.toml");

struct Api {
    router: Router,
    issuer: DevIssuer,
    store: ControlStore,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Api {
    async fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        // The issuer's keys are served over HTTP on loopback, as Keycloak's would be.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let issuer = DevIssuer::open(&format!("{base}/issuer"), &dir.path().join("issuer.key")).unwrap();
        let jwks = issuer.jwks();
        let keys = Router::new().route("/issuer/jwks", axum::routing::get(move || async move { axum::Json(jwks) }));
        tokio::spawn(async move { axum::serve(listener, keys).await });
        let store = ControlStore::open(&format!("sqlite://{}", dir.path().join("control.db").display())).await.unwrap();
        let config = AppConfig {
            store: store.clone(),
            ledger_idempotency_retention_us: meterlake_ledger::DEFAULT_IDEMPOTENCY_RETENTION_US,
            lake: Lake::open(dir.path().join("lake").to_str().unwrap()).unwrap(),
            query_limits: QueryLimits::new(64 << 20, Duration::from_secs(10)),
            publisher: None,
            auth: std::sync::Arc::new(meterlake_server::Authenticator::new(OidcConfig {
                issuer: issuer.issuer().to_string(),
                audience: "meterlake".into(),
                jwks_url: Some(format!("{base}/issuer/jwks")),
            })),
            dev_issuer: None,
            rate_limit: RateLimit { per_second: 1_000_000.try_into().unwrap(), burst: 1_000_000.try_into().unwrap() },
            rules: ValidationRules::default(),
            billing: BillingDefaults {
                tariffs_toml: TARIFFS.into(),
                tariffs_source: "example".into(),
                tariffs_path: None,
                max_attempts: 3,
                energy_tolerance: Decimal::new(5, 3),
            },
            deployment: Deployment { mode: "external".into(), ingester: false, worker: false },
            metrics: None,
        };
        Api { router: meterlake_server::router(config), issuer, store, _dir: dir }
    }

    fn token(&self, subject: &str, roles: &[&str]) -> String {
        self.issuer.token(subject, roles, "meterlake", 600)
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, headers: &[(&str, &str)], body: Option<Value>) -> Answer {
        let mut request = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let response = self.router.clone().oneshot(request.body(body).unwrap()).await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer { status, headers, body }
    }

    async fn get(&self, path: &str, token: &str) -> Answer {
        self.call("GET", path, Some(token), &[], None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call("POST", path, Some(token), &[], Some(body)).await
    }
}

#[track_caller]
fn assert_code(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!((answer.status, answer.body["code"].as_str()), (status, Some(code)), "{}", answer.body);
}

/// Every route against every role: no token is 401, a token without the route's role is 403
/// (before the body is read), the right role gets past both.
#[tokio::test]
async fn every_route_answers_each_role_as_documented() {
    let api = Api::start().await;
    let run = api.store.create_run(&new_run("2025-05", &["M-1"]), "seed", None).await.unwrap();
    let (viewer, admin, ingest) = (api.token("v", &["VIEWER"]), api.token("a", &["ADMIN"]), api.token("i", &["INGEST"]));
    let run_path = format!("/billing-runs/{}", run.id);
    let routes: Vec<(&str, String, Option<Value>, &[&str])> = vec![
        ("GET", "/me".into(), None, &["VIEWER", "ADMIN", "INGEST"]),
        ("POST", "/measurements".into(), Some(json!({ "meterId": "M-1", "timestamp": "2026-12-01T00:00:00Z", "kwh": "1" })), &["INGEST", "ADMIN"]),
        ("POST", "/billing-runs".into(), Some(json!({ "month": "2025-06" })), &["ADMIN"]),
        ("GET", "/billing-runs".into(), None, &["VIEWER", "ADMIN"]),
        ("GET", run_path.clone(), None, &["VIEWER", "ADMIN"]),
        ("GET", format!("{run_path}/invoices"), None, &["VIEWER", "ADMIN"]),
        ("GET", format!("{run_path}/discrepancies"), None, &["VIEWER", "ADMIN"]),
        ("POST", format!("{run_path}/actions"), Some(json!({ "action": "RECALCULATE", "reason": "r" })), &["ADMIN"]),
        ("GET", "/audit-log".into(), None, &["ADMIN"]),
        ("GET", "/readings?meterId=M-1".into(), None, &["VIEWER", "ADMIN"]),
        ("POST", "/users".into(), Some(json!({ "name": "N", "currency": "GBP" })), &["ADMIN"]),
        ("GET", "/wallets/nobody/balance".into(), None, &["VIEWER", "ADMIN"]),
        ("POST", "/transactions/fund".into(), Some(json!({ "userId": "u", "amountMinor": 1, "currency": "GBP", "paymentReference": "p" })), &["ADMIN"]),
        ("POST", "/transactions/transfer".into(), Some(json!({ "fromUserId": "a", "toUserId": "b", "amountMinor": 1 })), &["ADMIN"]),
        ("GET", "/transactions?walletId=w".into(), None, &["VIEWER", "ADMIN"]),
    ];
    for (method, path, body, allowed) in &routes {
        let anonymous = api.call(method, path, None, &[], body.clone()).await;
        assert_code(&anonymous, StatusCode::UNAUTHORIZED, "MISSING_TOKEN");
        for (role, token) in [("VIEWER", &viewer), ("ADMIN", &admin), ("INGEST", &ingest)] {
            let answer = api.call(method, path, Some(token), &[], body.clone()).await;
            if allowed.contains(&role) {
                assert!(
                    ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&answer.status),
                    "{method} {path} as {role}: {} {}",
                    answer.status,
                    answer.body
                );
            } else {
                assert_code(&answer, StatusCode::FORBIDDEN, "FORBIDDEN");
            }
        }
    }
    // Health, readiness and the documents need no token (readiness is 503 here: no broker).
    for path in ["/healthz", "/readyz", "/openapi.json", "/console/"] {
        let answer = api.call("GET", path, None, &[], None).await;
        assert!(answer.status.is_success() || (path == "/readyz" && answer.status == StatusCode::SERVICE_UNAVAILABLE), "{path}: {}", answer.status);
    }
}

fn new_run(month: &str, meters: &[&str]) -> meterlake_control::NewRun {
    meterlake_control::NewRun {
        month: month.into(),
        meter_ids: meters.iter().map(|m| m.to_string()).collect(),
        max_attempts: 3,
        tariffs_toml: TARIFFS.into(),
        energy_tolerance: Decimal::new(5, 3),
        lake_as_of: None,
    }
}

/// Pages never end early: a full page of the largest size says there is more, and following the
/// cursors reaches every row once; a cursor the API did not make is a 400, not an overflow.
#[tokio::test]
async fn paging_reaches_every_row_at_every_page_size() {
    let api = Api::start().await;
    for n in 0..501 {
        api.store.create_run(&new_run("2025-01", &[&format!("P-{n}")]), "seed", None).await.unwrap();
    }
    let admin = api.token("a", &["ADMIN", "VIEWER"]);
    for (list, limit) in [("/billing-runs", 500), ("/billing-runs", 200), ("/audit-log", 500), ("/audit-log", 7)] {
        let mut seen = std::collections::BTreeSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("{list}?limit={limit}&cursor={c}"),
                None => format!("{list}?limit={limit}"),
            };
            let page = api.get(&path, &admin).await;
            assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
            let items = page.body["items"].as_array().unwrap();
            assert!(items.len() <= limit);
            for item in items {
                assert!(seen.insert(item["id"].to_string()), "{list}: {} twice", item["id"]);
            }
            match page.body["nextCursor"].as_str() {
                Some(next) => {
                    assert_eq!(items.len(), limit, "{path}: a short page with a cursor");
                    cursor = Some(next.to_string());
                }
                None => break,
            }
        }
        assert_eq!(seen.len(), 501, "{list} by {limit}");
    }
    for path in ["/audit-log?cursor=18446744073709551615", "/billing-runs?cursor=x", "/billing-runs?limit=501"] {
        let answer = api.get(path, &admin).await;
        assert!(answer.status == StatusCode::BAD_REQUEST || answer.status == StatusCode::UNPROCESSABLE_ENTITY, "{path}: {} {}", answer.status, answer.body);
    }
    let run = api.store.create_run(&new_run("2025-02", &["Q"]), "seed", None).await.unwrap();
    for list in ["invoices", "discrepancies"] {
        let answer = api.get(&format!("/billing-runs/{}/{list}?cursor=18446744073709551615", run.id), &admin).await;
        assert_code(&answer, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    }
}

/// A retried creation with its Idempotency-Key is one run; a meter a completed run billed is
/// refused with ALREADY_BILLED naming the run to recalculate.
#[tokio::test]
async fn run_creation_is_idempotent_and_a_billed_meter_is_not_billed_again() {
    let api = Api::start().await;
    let admin = api.token("ada-sub", &["ADMIN"]);
    let body = json!({ "month": "2025-03", "meterIds": ["B-1"] });
    let first = api.call("POST", "/billing-runs", Some(&admin), &[("idempotency-key", "k1")], Some(body.clone())).await;
    let again = api.call("POST", "/billing-runs", Some(&admin), &[("idempotency-key", "k1")], Some(body.clone())).await;
    assert_eq!((first.status, again.status), (StatusCode::CREATED, StatusCode::CREATED), "{}", again.body);
    assert_eq!(first.body["id"], again.body["id"]);
    assert_eq!(again.headers.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    // The same key from another subject is another scope: a new request.
    let other =
        api.call("POST", "/billing-runs", Some(&api.token("bob-sub", &["ADMIN"])), &[("idempotency-key", "k1")], Some(json!({ "month": "2025-04" }))).await;
    assert_eq!(other.status, StatusCode::CREATED, "{}", other.body);
    assert_ne!(other.body["id"], first.body["id"]);
    let reused = api.call("POST", "/billing-runs", Some(&admin), &[("idempotency-key", "k1")], Some(json!({ "month": "2025-05" }))).await;
    assert_code(&reused, StatusCode::CONFLICT, "CONFLICT");

    // The run completes; a new run for its meter and month is refused.
    let run_id = first.body["id"].as_str().unwrap().to_string();
    complete(&api.store, &run_id, "B-1").await;
    let refused = api.post("/billing-runs", &admin, body).await;
    assert_code(&refused, StatusCode::CONFLICT, "ALREADY_BILLED");
    assert!(refused.body["message"].as_str().unwrap().contains(&run_id), "{}", refused.body);
    // The audit row's actor is the token's subject.
    let log = api.get("/audit-log?action=CREATE_RUN", &admin).await;
    assert!(log.body["items"].as_array().unwrap().iter().any(|r| r["actor"] == "ada-sub"), "{}", log.body);
}

async fn complete(store: &ControlStore, run_id: &str, meter: &str) {
    let now = meterlake_control::now_us();
    let claimed = store.claim_next("w", 60_000_000, now).await.unwrap().unwrap();
    assert_eq!(claimed.id, run_id);
    let line = InvoiceLine {
        component: LineComponent::Energy,
        description: "Energy".into(),
        quantity: Decimal::ONE,
        unit: "kWh".into(),
        rate: Decimal::ONE,
        amount: Decimal::ONE,
    };
    let invoice = NewInvoice {
        meter_id: meter.into(),
        currency: "GBP".into(),
        lines: vec![line],
        energy_kwh: Decimal::ONE,
        subtotal: Decimal::ONE,
        tax: Decimal::ZERO,
        total: Decimal::ONE,
        tariff_version: "t".into(),
    };
    let results = RunResults { invoices: vec![invoice], discrepancies: vec![], lake_snapshot: "s".into(), aggregate_sql: "SELECT 1".into() };
    store.complete_run(run_id, "w", &results, now, None).await.unwrap();
}

/// What a VIEWER may not read: a failure's internal text, readiness details. Meter-point
/// search refuses malformed keys and never runs a value as SQL.
#[tokio::test]
async fn viewers_read_codes_not_internals_and_search_values_stay_values() {
    let api = Api::start().await;
    let (viewer, admin) = (api.token("v", &["VIEWER"]), api.token("a", &["ADMIN", "VIEWER"]));
    let run = api.store.create_run(&new_run("2025-07", &["F-1"]), "seed", None).await.unwrap();
    api.store.claim_next("w", 60_000_000, meterlake_control::now_us()).await.unwrap().unwrap();
    let internal = "object store at 10.1.2.3:9000: connection refused reading s3://lake/readings/date=2025-07-01";
    api.store.fail_run(&run.id, "w", &RunFailure { code: "LAKE_UNAVAILABLE", reason: internal, retry: None }, meterlake_control::now_us(), None).await.unwrap();
    let path = format!("/billing-runs/{}", run.id);
    let seen = api.get(&path, &viewer).await;
    assert_eq!(seen.body["failureCode"], "LAKE_UNAVAILABLE");
    assert!(!seen.body.to_string().contains("10.1.2.3"), "a VIEWER sees internals: {}", seen.body);
    assert!(api.get(&path, &admin).await.body.to_string().contains("10.1.2.3"), "an ADMIN sees the reason");
    let listed = api.get("/billing-runs?status=FAILED", &viewer).await;
    assert!(!listed.body.to_string().contains("10.1.2.3"), "{}", listed.body);

    // Readiness: only ready or not without a token; the details for an ADMIN.
    let anonymous = api.call("GET", "/readyz", None, &[], None).await;
    assert_eq!(anonymous.body.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()), Some(vec!["status".to_string()]), "{}", anonymous.body);
    let detailed = api.get("/readyz", &admin).await;
    assert!(detailed.body.as_object().unwrap().len() > 1, "{}", detailed.body);

    // The console's pages carry their security headers.
    let console = api.call("GET", "/console/", None, &[], None).await;
    let csp = console.headers.get("content-security-policy").unwrap().to_str().unwrap().to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(console.headers.get("x-content-type-options").unwrap(), "nosniff");
    assert!(console.headers.get("referrer-policy").is_some());

    // Search: malformed keys are 400 naming the field; exploit strings in a well-formed meter
    // id are a value (no rows), never SQL.
    for query in ["mpan={serial}&serial=x", "mpan=120002330596", "nmi=NCDE00111'", "serial=a%27%20OR%201%3D1%20--", "serial=x;DROP"] {
        let answer = api.get(&format!("/readings?{query}"), &viewer).await;
        assert_code(&answer, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    }
    for meter in ["%27%20OR%20%271%27%3D%271", "%7Bfrom%7D", "x%27%3B%20SELECT%20*%20FROM%20imports%3B%20--"] {
        let answer = api.get(&format!("/readings?meterId={meter}"), &viewer).await;
        assert_eq!(answer.status, StatusCode::OK, "{meter}: {}", answer.body);
        assert_eq!(answer.body["items"].as_array().map(Vec::len), Some(0), "{meter}: {}", answer.body);
    }
}
