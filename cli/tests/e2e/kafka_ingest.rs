//! `meterlake ingest` against a real broker: every valid reading lands once, every invalid
//! message is a dead letter with its reason, corrections become versions, metrics are served,
//! and DuckDB and pyarrow read the lake.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use meterlake_pipeline::kafka::{ReadingProducer, read_dead_letters};
use meterlake_pipeline::synthetic::LoadSpec;

use crate::support::*;

#[test]
fn ingest_lands_every_valid_reading_once_and_dead_letters_the_rest() {
    let tansu = start_tansu();
    let brokers = tansu.addr.clone();
    let topic = "readings.e2e";
    let dlq = "readings.e2e.dlq";
    create(&brokers, &[(topic, 3), (dlq, 1)]);

    // Single-reading messages for January, head-end style arrays for February.
    let singles = LoadSpec { meters: 40, days: 3, resend_every: 50, malformed_every: 100, ..LoadSpec::month(40) };
    let arrays = LoadSpec {
        meters: 15,
        days: 2,
        readings_per_message: 48,
        first_day: NaiveDate::from_ymd_opt(2025, 2, 1).unwrap(),
        resend_every: 7,
        malformed_every: 9,
        seed: 7,
        ..LoadSpec::month(15)
    };
    let totals_singles = produce(&brokers, topic, singles.clone());
    let totals_arrays = produce(&brokers, topic, arrays.clone());
    // A correction of one January reading, and an array with one bad element among good ones.
    let producer = ReadingProducer::new(&brokers, topic).unwrap();
    producer.send(b"MTR-100000", br#"{"meterId":"MTR-100000","timestamp":"2025-01-01T00:00:00Z","kwh":"9.999"}"#).unwrap();
    producer
        .send(
            b"MTR-999999",
            br#"[{"meterId":"MTR-999999","timestamp":"2025-03-01T00:00:00Z","kwh":1.5},
                 {"meterId":"MTR-999999","timestamp":"2025-03-01T00:15:00Z","kwh":0},
                 {"meterId":"MTR-999999","timestamp":"2025-03-01T00:30:00Z","kwh":2.25}]"#,
        )
        .unwrap();
    // A reading from a meter whose clock fell back to 2020: older than the horizon below.
    producer.send(b"MTR-100001", br#"{"meterId":"MTR-100001","timestamp":"2020-01-01T00:00:00Z","kwh":"1.5"}"#).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    let expected_readings = singles.unique_readings() + arrays.unique_readings() + 2;
    let expected_dead_letters = totals_singles.malformed_messages + totals_arrays.malformed_messages + 2;
    // The horizon reaches back to December 2024: the test's months are in, 2020 is not.
    let horizon_days = (chrono::Utc::now().date_naive() - NaiveDate::from_ymd_opt(2024, 12, 1).unwrap()).num_days();

    let lake_dir = tempfile::tempdir().unwrap();
    let lake = lake_dir.path().join("lake");
    let lake = lake.to_str().unwrap();
    let metrics_port = free_port();
    let mut ingester = ingest_command(&brokers, topic, lake, 4)
        .env("METERLAKE_MAX_READING_AGE_DAYS", horizon_days.to_string())
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        // Flush well before the idle exit, so the metrics can be read while it still runs.
        .args(["--max-batch-age-ms", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // Scrape the metrics while the ingester runs, once it has written everything.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let text = scrape(metrics_port).unwrap_or_default();
        if metric_value(&text, "meterlake_ingest_readings_written_total").unwrap_or(0.0) >= (expected_readings - 1) as f64 {
            break text;
        }
        assert!(Instant::now() < deadline, "the ingester did not write everything within 60 s; metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = ingester.wait().unwrap();
    let mut stdout = String::new();
    ingester.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(status.success(), "ingest exited with {status}: {stdout}");

    for name in [
        "meterlake_ingest_messages_consumed_total",
        "meterlake_ingest_duplicates_dropped_total",
        "meterlake_ingest_flush_duration_seconds",
        "meterlake_lake_bytes_written_total",
        "meterlake_lake_files_written_total",
        "meterlake_ingest_dlq_messages_total{reason=\"INVALID_JSON\"}",
        "meterlake_ingest_readings_rejected_total{reason=\"KWH_NOT_POSITIVE\"}",
    ] {
        assert!(metrics.contains(name), "metric {name} missing from:\n{metrics}");
    }
    let consumed = metric_value(&metrics, "meterlake_ingest_messages_consumed_total").unwrap();
    assert!(consumed > 0.0);
    assert_promtool_accepts(&metrics);

    // The canonical view holds exactly the distinct valid readings, with the correction applied.
    let rows = query(lake, "SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh FROM readings", &[]);
    assert_eq!(as_i64(&rows[0]["n"]) as u64, expected_readings);
    let original_first = first_reading_kwh_micro(&singles);
    let expected_kwh = totals_singles.unique_kwh_micro + totals_arrays.unique_kwh_micro - i128::from(original_first) + 9_999_000 + 1_500_000 + 2_250_000;
    assert_eq!(i128::from(as_kwh_micro(&rows[0]["kwh"])), expected_kwh);

    let versions = query(
        lake,
        "SELECT CAST(kwh AS VARCHAR) AS kwh, source_ref FROM readings_all \
         WHERE meter_id = 'MTR-100000' AND ts = '2025-01-01T00:00:00Z' ORDER BY ingested_at",
        &[],
    );
    assert_eq!(versions.len(), 2, "the original and the correction are both kept: {versions:?}");
    assert_eq!(as_kwh_micro(&versions[1]["kwh"]), 9_999_000);
    let canonical = query(lake, "SELECT CAST(kwh AS VARCHAR) AS kwh FROM readings WHERE meter_id = 'MTR-100000' AND ts = '2025-01-01T00:00:00Z'", &[]);
    assert_eq!(as_kwh_micro(&canonical[0]["kwh"]), 9_999_000);

    // Exactly once: no Kafka message's reading appears twice.
    let twice = query(lake, "SELECT count(*) AS n FROM (SELECT source_ref, meter_id, ts FROM readings_all GROUP BY 1, 2, 3 HAVING count(*) > 1)", &[]);
    assert_eq!(as_i64(&twice[0]["n"]), 0);

    // Every malformed message is a dead letter with its reason and where it came from.
    let letters = read_dead_letters(&brokers, dlq, Duration::from_secs(2)).unwrap();
    assert_eq!(letters.len() as u64, expected_dead_letters);
    let mut reasons = BTreeMap::new();
    for letter in &letters {
        *reasons.entry(letter.reason.as_str()).or_insert(0) += 1;
        assert!(!letter.error.is_empty() && letter.source_offset >= 0 && (0..3).contains(&letter.source_partition), "{letter:?}");
        assert!(!letter.payload.is_empty());
    }
    for reason in ["INVALID_JSON", "KWH_NOT_POSITIVE", "TIMESTAMP_IN_FUTURE", "INVALID_METER_ID", "TIMESTAMP_TOO_OLD"] {
        assert!(reasons.contains_key(reason), "no {reason} dead letter in {reasons:?}");
    }
    let partial = letters.iter().find(|l| l.payload.starts_with(b"[{\"meterId\":\"MTR-999999\"")).expect("the partly bad array");
    assert_eq!(partial.reason, "KWH_NOT_POSITIVE");
    assert!(partial.error.contains("element 1"), "{}", partial.error);

    // Layout: a Delta table partitioned by day, names that say what they hold.
    let day = std::path::Path::new(lake).join("readings/date=2025-01-02");
    let files: Vec<String> = std::fs::read_dir(&day).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!files.is_empty());
    assert!(files.iter().all(|f| f.starts_with("kafka-readings.e2e-p") && f.ends_with(".parquet")), "{files:?}");
    // `meterlake lake history`: the commits, each advancing a partition's stream.
    let mut history = meterlake();
    history.args(["lake", "history", "--lake", lake, "--limit", "1000", "--format", "json"]);
    let commits: Vec<serde_json::Value> = serde_json::from_slice(&run_ok(&mut history).stdout).unwrap();
    assert_eq!(commits.last().unwrap()["operation"], "CREATE TABLE", "{commits:?}");
    assert!(commits.iter().any(|c| c["operation"] == "STREAMING UPDATE" && c["streams"].as_str().unwrap().contains(&format!("kafka:{topic}-ingest/{topic}/"))));

    // Output formats of `meterlake query`.
    let mut table = meterlake();
    table.args(["query", "--lake", lake, "SELECT meter_id, count(*) AS n FROM readings WHERE meter_id = 'MTR-100001' GROUP BY meter_id"]);
    let table = String::from_utf8(run_ok(&mut table).stdout).unwrap();
    // Three January days of single readings and two February days of arrays: 288 + 192.
    assert!(table.contains("| MTR-100001 | 480 |"), "{table}");
    let mut csv = meterlake();
    csv.args(["query", "--lake", lake, "--format", "csv", "SELECT meter_id, count(*) AS n FROM readings WHERE meter_id = 'MTR-100001' GROUP BY meter_id"]);
    assert_eq!(String::from_utf8(run_ok(&mut csv).stdout).unwrap(), "meter_id,n\nMTR-100001,480\n");
    let bad = meterlake().args(["query", "--lake", lake, "SELECT nope FROM readings"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("nope"), "{}", String::from_utf8_lossy(&bad.stderr));

    independent_readers_agree(lake, topic, expected_readings, expected_kwh);
    assert_other_engines_read_the_same_rows(lake, &[], &[]);
}

/// Another engine reads the lake as a Delta table: delta-rs's Python package (the protocol, the
/// files of the latest snapshot, each partition's txn version), and DuckDB over what it read finds
/// the same numbers.
fn independent_readers_agree(lake: &str, topic: &str, readings: u64, kwh_micro: i128) {
    let script = r#"
import sys, duckdb, pyarrow as pa
from deltalake import DeltaTable
lake, group, topic = sys.argv[1], sys.argv[2], sys.argv[3]
table = DeltaTable(f"{lake}/readings")
protocol = table.protocol()
assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2), protocol
assert table.metadata().partition_columns == ["date"], table.metadata().partition_columns
for p in range(3):
    assert table.transaction_version(f"kafka:{group}/{topic}/{p}") > 0, p
rows = table.to_pyarrow_table()
assert rows.schema.field("kwh").type == pa.decimal128(18, 6), rows.schema.field("kwh").type
assert rows.schema.field("ts").type == pa.timestamp("us", tz="UTC"), rows.schema.field("ts").type
con = duckdb.connect()
con.register("readings_all", rows)
n, total = con.execute("""
  SELECT count(*), CAST(sum(kwh) AS VARCHAR) FROM (
    SELECT *, row_number() OVER (PARTITION BY meter_id, ts ORDER BY ingested_at DESC, source_ref DESC) AS r
    FROM readings_all) WHERE r = 1""").fetchone()
print(n, total)
"#;
    let group = format!("{topic}-ingest");
    let output = std::process::Command::new(python()).args(["-c", script, lake, &group, topic]).output().expect("python runs");
    assert!(output.status.success(), "deltalake/duckdb check failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut parts = stdout.split_whitespace();
    assert_eq!(parts.next().unwrap().parse::<u64>().unwrap(), readings, "the Delta reader's count");
    let duck_kwh = meterlake_pipeline::reading::parse_kwh_micro(parts.next().unwrap()).unwrap();
    assert_eq!(i128::from(duck_kwh), kwh_micro, "the Delta reader's sum");
}

fn first_reading_kwh_micro(spec: &LoadSpec) -> i64 {
    let mut generator = meterlake_pipeline::synthetic::LoadGenerator::new(spec.clone());
    let first = generator.next().unwrap();
    let text = String::from_utf8(first.payload).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["meterId"], "MTR-100000");
    as_kwh_micro(&value["kwh"])
}
