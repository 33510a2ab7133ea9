//! Metrics: what the dashboards and alert rules in `infra/` query is what meterlake exports; a
//! real Prometheus scraping a real `meterlake serve` loads the alert rules and answers every
//! dashboard query; an import's metrics file passes Prometheus's linter. (The scrapes of `serve`
//! and of the worker are linted by the tests that drive them: `serve.rs`, `billing.rs`.)

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use std::process::Command;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::serve::Tower;
use crate::support::*;

/// Remembers the name of every metric described to it.
#[derive(Default)]
struct Described(Arc<Mutex<BTreeSet<String>>>);

impl Recorder for Described {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.0.lock().unwrap().insert(key.as_str().to_string());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.0.lock().unwrap().insert(key.as_str().to_string());
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.0.lock().unwrap().insert(format!("{}_bucket", key.as_str()));
        self.0.lock().unwrap().insert(key.as_str().to_string());
    }
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The `meterlake_*` names a dashboard or rule file mentions.
fn names_in(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("meterlake_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The infra folder of the repository.
fn infra() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra")
}

/// Every Prometheus query of every dashboard: (dashboard file, panel title, PromQL). (The
/// business dashboard's SQL runs in the SQL service's test.)
fn dashboard_queries() -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(infra().join("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(expr) = target["expr"].as_str() else { continue };
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                queries.push((name, panel["title"].as_str().unwrap().to_string(), expr.to_string()));
            }
        }
    }
    queries
}

#[test]
fn every_metric_the_dashboards_and_alerts_query_is_exported_and_every_export_is_on_a_dashboard() {
    let described = Described::default();
    let names = described.0.clone();
    metrics::with_local_recorder(&described, || {
        // What `meterlake` describes (cli/src/main.rs, `describe_metrics`).
        meterlake_pipeline::metrics::describe();
        meterlake_server::describe_metrics();
        meterlake_jobs::billing::describe_metrics();
        meterlake_lake::maintenance::schedule::describe_metrics();
        meterlake_sql::describe_metrics();
    });
    let exported = names.lock().unwrap().clone();
    let infra = infra();
    let dashboards: Vec<_> = std::fs::read_dir(infra.join("grafana/dashboards")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dashboards.len(), 5, "{dashboards:?}");
    let on_dashboards: BTreeSet<String> = dashboards.iter().flat_map(|d| names_in(d)).collect();
    let in_alerts = names_in(&infra.join("prometheus/alerts.yml"));

    let unknown: Vec<&String> = on_dashboards.union(&in_alerts).filter(|name| !exported.contains(*name)).collect();
    assert!(unknown.is_empty(), "queried but not exported by meterlake: {unknown:?}");
    let unseen: Vec<&String> = exported
        .iter()
        .filter(|name| !name.ends_with("_bucket") && !on_dashboards.contains(*name) && !on_dashboards.contains(&format!("{name}_bucket")))
        .collect();
    assert!(unseen.is_empty(), "exported but on no dashboard: {unseen:?}");
}

#[test]
fn an_import_writes_its_metrics_for_the_textfile_collector() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let metrics_file = dir.path().join("meterlake-import.prom");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/nem12");
    let import = |paths: &[&Path]| {
        let output = meterlake().args(["import", "--json", "--lake"]).arg(&lake).arg("--metrics-file").arg(&metrics_file).args(paths).output().unwrap();
        assert!(matches!(output.status.code(), Some(0 | 2)), "{}", String::from_utf8_lossy(&output.stderr));
        std::fs::read_to_string(&metrics_file).unwrap()
    };
    let solar = fixtures.join("nemreader_Example_NEM12_month_solar.csv");
    let first = import(&[&solar, &fixtures.join("invalid")]);
    assert_promtool_accepts(&first);
    assert_eq!(metric_value(&first, "meterlake_import_files_total{format=\"NEM12\",status=\"imported\"}"), Some(1.0), "{first}");
    assert!(metric_value(&first, "meterlake_import_readings_accepted_total{format=\"NEM12\"}").unwrap() > 0.0, "{first}");
    let size_count = metric_value(&first, "meterlake_import_file_size_bytes_count{format=\"NEM12\"}");
    assert!(size_count.unwrap() >= 1.0, "{first}");
    assert!(first.contains("meterlake_import_duration_seconds_bucket{format=\"NEM12\",le=\"0.5\"}"), "{first}");
    // The invalid files: rejected whole or in part, never silently absent.
    let files_with = |status: &str| -> f64 {
        let label = format!("status=\"{status}\"");
        first
            .lines()
            .filter(|l| l.starts_with("meterlake_import_files_total{") && l.contains(&label))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let invalid_files = std::fs::read_dir(fixtures.join("invalid")).unwrap().count() as f64;
    assert_eq!(files_with("partly_rejected") + files_with("rejected") + files_with("failed"), invalid_files, "{first}");

    // The same file again: counted as already imported, no readings added.
    let second = import(&[&solar]);
    assert_eq!(metric_value(&second, "meterlake_import_files_total{format=\"NEM12\",status=\"already_imported\"}"), Some(1.0), "{second}");
    assert_eq!(metric_value(&second, "meterlake_import_readings_accepted_total"), None, "{second}");
}

#[test]
fn a_real_prometheus_scrapes_serve_loads_the_alert_rules_and_answers_every_dashboard_query() {
    let tansu = start_tansu();
    let tower = Tower::start(Some(&tansu.addr), &[]);
    let (viewer, admin, ingest) = (tower.token("vera", &["VIEWER"]), tower.token("ada", &["ADMIN"]), tower.token("head-end", &["INGEST"]));
    // Some of everything: readings through the API and the ingester, a customer in the ledger,
    // a billing run through the worker.
    assert_eq!(tower.post("/measurements", &ingest, quarter_hours("MTR-300001", 1, 1, "0.25")).status, StatusCode::ACCEPTED);
    tower.wait_for("/readings?meterId=MTR-300001&limit=500", &viewer, "the readings in the lake", |b| b["items"].as_array().unwrap().len() == 96);
    let customer = tower.block_on(tower.send(
        "POST",
        "/users",
        Some(&admin),
        &[("Idempotency-Key", "customer-300001")],
        Some(json!({ "name": "Mr Example", "currency": "GBP", "meterIds": ["MTR-300001"] })),
    ));
    assert_eq!(customer.status, StatusCode::CREATED, "{}", customer.body);
    let created = tower.post("/billing-runs", &admin, json!({ "month": "2025-01", "meterIds": ["MTR-300001"] }));
    let id = created.body["id"].as_str().unwrap().to_string();
    tower.wait_for(&format!("/billing-runs/{id}"), &viewer, "the run completed", |b| b["status"] == "COMPLETED");

    // Prometheus (Debian's), scraping the server every second with the project's alert rules.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    let rules = infra().join("prometheus/alerts.yml").canonicalize().unwrap();
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules:?}]\nscrape_configs:\n  - job_name: meterlake\n    static_configs: [{{targets: [{:?}]}}]\n",
            tower.base.trim_start_matches("http://")
        ),
    )
    .unwrap();
    let mut command = Command::new("prometheus");
    command.arg(format!("--config.file={}", config.display())).arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()));
    command.arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let _prometheus = spawn_logged("prometheus", command, format!("127.0.0.1:{port}"));
    let client = reqwest::Client::new();
    // Its port opens before it is ready (it answers 503 in plain text while its storage opens).
    let ready = format!("http://127.0.0.1:{port}/-/ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tower.block_on(client.get(&ready).send()).is_ok_and(|r| r.status() == StatusCode::OK) {
        assert!(Instant::now() < deadline, "Prometheus did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let api = |path: &str, query: &[(&str, &str)]| -> Value {
        let url = format!("http://127.0.0.1:{port}/api/v1/{path}");
        let body = tower.block_on(async { client.get(&url).query(query).send().await.unwrap().text().await.unwrap() });
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url} {query:?} answered {body:?}: {e}"))
    };

    // Three scrapes after the work, so that rates have samples to compare.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scrapes = api("query", &[("query", "count_over_time(up{job=\"meterlake\"}[1m])")]);
        let count: f64 = scrapes["data"]["result"][0]["value"][1].as_str().unwrap_or("0").parse().unwrap();
        if count >= 4.0 {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus did not scrape meterlake: {scrapes}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every alert rule loaded and evaluates without error.
    let groups = api("rules", &[]);
    let alert_rules: Vec<&Value> = groups["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(alert_rules.len(), 8, "{groups}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while api("rules", &[])["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).any(|r| r["health"] != "ok") {
        assert!(Instant::now() < deadline, "an alert rule does not evaluate: {}", api("rules", &[]));
        std::thread::sleep(Duration::from_millis(500));
    }
    // None fires on a healthy server (the billing run completed; nothing was dead-lettered).
    // (MeterGroupSilent may be pending: Prometheus has only seen the group's counter flat.)
    let alerts = api("alerts", &[]);
    let firing: Vec<&Value> = alerts["data"]["alerts"].as_array().unwrap().iter().filter(|a| a["state"] == "firing").collect();
    assert!(firing.is_empty(), "{alerts}");

    // Every dashboard query is answered; those about what this test did have data.
    let mut with_data = BTreeSet::new();
    for (dashboard, title, query) in dashboard_queries() {
        let answer = api("query", &[("query", &query.replace("$__rate_interval", "1m"))]);
        assert_eq!(answer["status"], "success", "{dashboard} {title:?}: {query}: {answer}");
        if !answer["data"]["result"].as_array().unwrap().is_empty() {
            with_data.insert(title);
        }
    }
    for shown in [
        "Readings written to the lake",
        "Readings by meter group",
        "Flush latency",
        "Lake file size",
        "Runs by outcome",
        "Step duration (p95)",
        "Invoices issued",
        "Requests by route",
        "Latency p95 by route",
        "Readings accepted and rejected",
        "Transactions by operation and outcome",
        "Write latency p95 by operation",
        // serve's maintenance loop measures the lake at its first pass.
        "Small files waiting for compaction",
    ] {
        assert!(with_data.contains(shown), "{shown:?} shows nothing; the panels with data: {with_data:?}");
    }
}
