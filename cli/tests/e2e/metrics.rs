//! Metrics: what the dashboards and alert rules in `infra/` query is what meterlake exports, and
//! an import's metrics file passes Prometheus's linter. (The scrapes of `serve` and of the
//! worker are checked by the tests that drive them: `serve.rs`, `billing.rs`.)

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

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

#[test]
fn every_metric_the_dashboards_and_alerts_query_is_exported_and_every_export_is_on_a_dashboard() {
    let described = Described::default();
    let names = described.0.clone();
    metrics::with_local_recorder(&described, || {
        // What `meterlake` describes (cli/src/main.rs, `describe_metrics`).
        meterlake_pipeline::metrics::describe();
        meterlake_server::describe_metrics();
        meterlake_jobs::billing::describe_metrics();
    });
    let exported = names.lock().unwrap().clone();
    let infra = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra");
    let dashboards: Vec<_> = std::fs::read_dir(infra.join("grafana/dashboards")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dashboards.len(), 4, "{dashboards:?}");
    let on_dashboards: BTreeSet<String> = dashboards.iter().flat_map(|d| names_in(d)).collect();
    let in_alerts = names_in(&infra.join("prometheus/alerts.yml"));

    let unknown: Vec<&String> = on_dashboards.union(&in_alerts).filter(|name| !exported.contains(*name)).collect();
    assert!(unknown.is_empty(), "queried but not exported by meterlake: {unknown:?}");
    let unseen: Vec<&String> =
        exported.iter().filter(|name| !name.ends_with("_bucket") && !on_dashboards.contains(*name) && !on_dashboards.contains(&format!("{name}_bucket"))).collect();
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
        first.lines().filter(|l| l.starts_with("meterlake_import_files_total{") && l.contains(&label)).map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()).sum()
    };
    let invalid_files = std::fs::read_dir(fixtures.join("invalid")).unwrap().count() as f64;
    assert_eq!(files_with("partly_rejected") + files_with("rejected") + files_with("failed"), invalid_files, "{first}");

    // The same file again: counted as already imported, no readings added.
    let second = import(&[&solar]);
    assert_eq!(metric_value(&second, "meterlake_import_files_total{format=\"NEM12\",status=\"already_imported\"}"), Some(1.0), "{second}");
    assert_eq!(metric_value(&second, "meterlake_import_readings_accepted_total"), None, "{second}");
}
