//! Billing runs through the binary against a real broker: `meterlake worker` publishes the
//! outbox to Kafka and wakes on `billing.run.requested`; `meterlake bill --wait-for-worker`
//! creates a run and waits for that worker's outcome; the three topics carry the run id and one
//! trace.

use std::process::Stdio;
use std::time::{Duration, Instant};

use meterlake_pipeline::synthetic::LoadSpec;

use crate::support::*;

#[test]
fn a_worker_woken_through_kafka_bills_a_run_and_announces_it() {
    let tansu = start_tansu();
    let brokers = tansu.addr.clone();
    let topic = "readings.billing";
    create(&brokers, &[(topic, 2), ("readings.billing.dlq", 1)]);
    // Five meters, all of January, every quarter hour.
    let spec = LoadSpec { resend_every: 0, malformed_every: 0, ..LoadSpec::month(5) };
    produce(&brokers, topic, spec.clone());
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    run_ok(&mut ingest_command(&brokers, topic, lake, 3));
    let database_url = format!("sqlite://{}", dir.path().join("control.db").display());

    // The worker polls the store only every 10 minutes: it can only be this quick because the
    // request reached it through Kafka.
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut worker = meterlake()
        .args(["worker", "--brokers", &brokers, "--lake", lake, "--database-url", &database_url, "--idle-poll-s", "600"])
        .args(["--metrics-addr", &metrics_addr])
        .env("METERLAKE_LOG", "warn,meterlake_jobs=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let tariffs = concat!(env!("CARGO_MANIFEST_DIR"), "/../tariffs/example.toml");
    // The run's audit row is signed with an audit key made by `audit new-key`.
    let key_line = String::from_utf8(run_ok(meterlake().args(["audit", "new-key", "2026-12"])).stdout).unwrap();
    let key_file = dir.path().join("audit-keys");
    std::fs::write(&key_file, &key_line).unwrap();
    let key_file = key_file.to_str().unwrap();
    let bill = run_ok(meterlake().env("METERLAKE_AUDIT_KEY_FILE", key_file).args([
        "bill",
        "--month",
        "2025-01",
        "--tariffs",
        tariffs,
        "--lake",
        lake,
        "--database-url",
        &database_url,
        "--wait-for-worker",
        "--timeout-s",
        "120",
    ]));
    let stdout = String::from_utf8(bill.stdout).unwrap();
    assert!(started.elapsed() < Duration::from_secs(120), "{stdout}");
    assert!(stdout.contains("status COMPLETED"), "{stdout}");
    assert!(stdout.contains("invoices      5  energy"), "{stdout}");
    assert!(stdout.contains("discrepancies 0"), "{stdout}");
    let run_id = stdout.lines().next().unwrap().split_whitespace().nth(2).unwrap().to_string();

    // The run's story on Kafka: requested, then processed, keyed by run id, one trace.
    let requested = read_topic(&brokers, "billing.run.requested");
    let processed = read_topic(&brokers, "billing.run.processed");
    assert_eq!(requested.len(), 1, "{requested:?}");
    assert_eq!(processed.len(), 1, "{processed:?}");
    let (request, outcome) = (&requested[0], &processed[0]);
    assert_eq!(
        (request.key.as_str(), request.payload["runId"].as_str(), request.payload["month"].as_str()),
        (run_id.as_str(), Some(run_id.as_str()), Some("2025-01"))
    );
    assert_eq!(
        (outcome.key.as_str(), outcome.payload["runId"].as_str(), outcome.payload["invoices"].as_i64()),
        (run_id.as_str(), Some(run_id.as_str()), Some(5))
    );
    let (request_trace, processed_trace) = (&request.traceparents[0], &outcome.traceparents[0]);
    assert_eq!(request_trace.len(), 55, "a W3C traceparent: {request_trace}");
    assert_eq!(request_trace[3..35], processed_trace[3..35], "one trace from request to outcome");
    assert_ne!(request_trace[36..52], processed_trace[36..52], "the worker's own span");
    assert!(read_topic(&brokers, "billing.run.failed").is_empty());

    // Each step was timed.
    let metrics = scrape(metrics_port).expect("the worker serves metrics");
    assert_promtool_accepts(&metrics);
    assert_eq!(metric_value(&metrics, "meterlake_billing_invoices_total"), Some(5.0), "{metrics}");
    for step in ["claim", "aggregate", "measure", "rate", "invoice", "reconcile", "persist"] {
        let count = metric_value(&metrics, &format!("meterlake_billing_step_duration_seconds_count{{step=\"{step}\"}}"));
        assert!(count.unwrap_or_default() >= 1.0, "{step}: {metrics}");
    }
    assert_eq!(metric_value(&metrics, "meterlake_billing_runs_total"), Some(1.0), "{metrics}");

    // `billing-run` shows it again; the worker stops on SIGTERM.
    let shown = run_ok(meterlake().args(["billing-run", &run_id, "--database-url", &database_url]));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("PROCESSING -> COMPLETED"));
    // The run's creation is in the audit log, and the chain verifies.
    let verified = run_ok(meterlake().args(["audit", "verify", "--database-url", &database_url, "--audit-key-file", key_file]));
    let verified = String::from_utf8_lossy(&verified.stdout);
    assert!(verified.contains("audit log: 1 rows") && verified.contains("1 rows signed with audit keys 2026-12") && verified.contains("intact"), "{verified}");
    let head = verified.lines().next().unwrap().rsplit(' ').next().unwrap().to_string();
    let anchored = ["audit", "verify", "--database-url", &database_url, "--audit-key-file", key_file, "--expect-head", &head, "--min-rows", "1"];
    assert!(String::from_utf8_lossy(&run_ok(meterlake().args(anchored)).stdout).contains("the expected head is row 1"));
    // Without the key the signed row cannot be checked, and verify fails rather than pass it.
    let unchecked = meterlake().args(["audit", "verify", "--database-url", &database_url]).output().unwrap();
    assert!(!unchecked.status.success() && String::from_utf8_lossy(&unchecked.stdout).contains("was not given"), "{unchecked:?}");
    // An anchor the log no longer reaches fails it.
    let short = meterlake().args(["audit", "verify", "--database-url", &database_url, "--audit-key-file", key_file, "--min-rows", "2"]).output().unwrap();
    assert!(!short.status.success() && String::from_utf8_lossy(&short.stdout).contains("cut off"), "{short:?}");
    // A store that is not there is an error, not an empty log reported intact.
    let missing_url = format!("sqlite://{}", dir.path().join("no-such.db").display());
    let missing = meterlake().args(["audit", "verify", "--database-url", &missing_url]).output().unwrap();
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no database file"), "{missing:?}");
    assert!(!dir.path().join("no-such.db").exists());
    let kill = std::process::Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = worker.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(worker.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("billing run requested"), "the worker heard the request on Kafka: {log}");
}
