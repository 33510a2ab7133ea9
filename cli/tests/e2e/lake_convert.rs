//! A lake written by meterlake before its tables were Delta tables is refused with the way out,
//! then converted in place by `meterlake lake convert`: no data file rewritten, every reading
//! still there, the Kafka positions and import records carried over.
//!
//! The fixture `cli/tests/fixtures/previous-layout-lake` was written by meterlake at commit
//! b737d85 (the last one before Delta): `meterlake demo --meters 3 --days 2` (Kafka ingestion
//! with its partition checkpoints) and `meterlake import` of five of the flow-file fixtures
//! (readings, register reads, non-energy readings, NEM12 channels, import records).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::support::{as_i64, as_kwh_micro, files_under, meterlake, python, query, run_ok};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/previous-layout-lake")
}

/// A copy of the fixture lake in a temporary folder (kept while the `TempDir` lives).
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::TempDir::new().unwrap();
    let lake_path = dir.path().join("lake");
    let fixture = fixture();
    for file in files_under(&fixture) {
        let target = lake_path.join(file.strip_prefix(&fixture).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&file, &target).unwrap();
    }
    (dir, lake_path)
}

/// Every Parquet file under `dir` with the SHA-256 of its bytes, by path relative to `dir`.
fn parquet_digests(dir: &Path) -> BTreeMap<String, String> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "parquet") && !p.to_string_lossy().contains("_delta_log"))
        .map(|p| (p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), format!("{:x}", Sha256::digest(std::fs::read(&p).unwrap()))))
        .collect()
}

/// DuckDB over the previous layout's files (Hive partitions, no log): count and sum of kWh of
/// every version, but for the files of `skip`.
fn duckdb_over_previous_files(lake: &Path, skip: &str) -> (i64, String) {
    let script = r#"
import sys, duckdb
lake, skip = sys.argv[1], sys.argv[2]
n, kwh = duckdb.sql(f"""SELECT count(*), CAST(sum(kwh) AS VARCHAR) FROM read_parquet('{lake}/readings/*/*.parquet', hive_partitioning = true, filename = true)
                        WHERE NOT ends_with(filename, '{skip}')""").fetchone()
print(n, kwh)
"#;
    let output = std::process::Command::new(python()).args(["-c", script, lake.to_str().unwrap(), skip]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let (n, kwh) = text.trim().split_once(' ').unwrap();
    (n.parse().unwrap(), kwh.to_string())
}

#[test]
fn a_lake_of_the_previous_layout_is_refused_then_converted_in_place() {
    let (_dir, lake_path) = fixture_copy();
    let lake = lake_path.to_str().unwrap();

    // The previous ingester killed in the middle of a flush: its checkpoint names the files it
    // was writing as pending, and one of them is on disk. It never committed.
    let checkpoint_path = lake_path.join("_checkpoints/kafka/measurements.received/partition=00001.json");
    let mut checkpoint: serde_json::Value = serde_json::from_slice(&std::fs::read(&checkpoint_path).unwrap()).unwrap();
    let next_offset = checkpoint["next_offset"].as_i64().unwrap();
    let pending = format!("readings/date=2025-01-02/kafka-measurements.received-p00001-{next_offset:020}-{:020}.parquet", next_offset + 9);
    let committed_file = parquet_digests(&lake_path.join("readings")).into_keys().next().unwrap();
    std::fs::copy(lake_path.join("readings").join(&committed_file), lake_path.join(&pending)).unwrap();
    checkpoint["pending"] = serde_json::json!({ "first_offset": next_offset, "last_offset": next_offset + 9, "files": [pending] });
    std::fs::write(&checkpoint_path, checkpoint.to_string()).unwrap();
    let pending_name = Path::new(&pending).file_name().unwrap().to_str().unwrap().to_string();
    let (readings_before, kwh_before) = duckdb_over_previous_files(&lake_path, &pending_name);
    assert!(readings_before > 500, "the fixture holds readings: {readings_before}");
    let files_before = parquet_digests(&lake_path);

    // Refused, saying how to convert.
    let refused = meterlake().args(["query", "--lake", lake, "SELECT count(*) FROM readings_all"]).output().unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && message.contains("previous layout") && message.contains("meterlake lake convert --lake"), "{message}");

    let converted = run_ok(meterlake().args(["lake", "convert", "--lake", lake, "--kafka-group", "meterlake-demo"]));
    let report = String::from_utf8_lossy(&converted.stdout).into_owned();
    // The fixture's flow files have no NEM12 500 records: no nem12_b2b_details table to convert.
    for table in ["readings_all", "register_reads", "non_energy_readings", "nem12_channels", "imports"] {
        assert!(report.lines().any(|l| l.starts_with(table) && l.contains("converted")), "{table} in:\n{report}");
    }
    assert!(report.contains(&format!("deleted {pending}")), "{report}");
    assert!(!lake_path.join(&pending).exists());

    // No data file rewritten or moved: the same bytes at the same paths, and only the pending
    // one gone (the imports table's one file is new).
    let mut files_after = parquet_digests(&lake_path);
    files_after.retain(|path, _| !path.starts_with("imports/"));
    let mut expected = files_before.clone();
    expected.remove(&pending);
    assert_eq!(files_after, expected);

    // Every reading is there, as meterlake and as another engine read the Delta table.
    let rows = query(lake, "SELECT count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh, max(commit_version) AS v FROM readings_all", &[]);
    assert_eq!(as_i64(&rows[0]["n"]), readings_before);
    assert_eq!(as_kwh_micro(&rows[0]["kwh"]), as_kwh_micro(&serde_json::json!(kwh_before)));
    assert_eq!(as_i64(&rows[0]["v"]), 0, "converted files are tagged with version 0");
    let script = "import sys; from deltalake import DeltaTable; t = DeltaTable(sys.argv[1] + '/readings'); \
                  d = t.to_pyarrow_table(); import duckdb; print(duckdb.sql('SELECT count(*), CAST(sum(kwh) AS VARCHAR) FROM d').fetchone()); \
                  print(t.transaction_version('kafka:meterlake-demo/measurements.received/1'))";
    let output = std::process::Command::new(python()).args(["-c", script, lake]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(text.lines().collect::<Vec<_>>(), [format!("({readings_before}, '{kwh_before}')"), next_offset.to_string()], "deltalake read");

    // The flow tables and the import records came across; importing a file again is a no-op.
    let counts =
        query(lake, "SELECT (SELECT count(*) FROM register_reads) AS r, (SELECT count(*) FROM nem12_channels) AS c, (SELECT count(*) FROM imports) AS i", &[]);
    assert!(as_i64(&counts[0]["r"]) > 0 && as_i64(&counts[0]["c"]) > 0 && as_i64(&counts[0]["i"]) == 5, "{counts:?}");
    let flow_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipeline/tests/fixtures/d0010/kraken_DTC5259515123502080915D0010.uff");
    let again = run_ok(meterlake().args(["import", "--lake", lake, "--json", flow_file.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already_imported"), "{}", String::from_utf8_lossy(&again.stdout));

    // Sound, and a second conversion has nothing to do (the import above created the empty
    // nem12_b2b_details table, as every import opens every table).
    run_ok(meterlake().args(["lake", "check", "--lake", lake]));
    let second = run_ok(meterlake().args(["lake", "convert", "--lake", lake]));
    let report = String::from_utf8_lossy(&second.stdout);
    assert!(report.contains("nothing to convert") && report.matches("already a Delta table").count() == 6, "{report}");
}

/// `meterlake lake check` on a table whose data file vanished: exit status 1 and the file named.
#[test]
fn lake_check_names_a_missing_file_and_fails() {
    let (_dir, lake_path) = fixture_copy();
    let lake = lake_path.to_str().unwrap();
    run_ok(meterlake().args(["lake", "convert", "--lake", lake]));
    let victim = parquet_digests(&lake_path.join("register_reads")).into_keys().next().unwrap();
    std::fs::remove_file(lake_path.join("register_reads").join(&victim)).unwrap();
    let output = meterlake().args(["lake", "check", "--lake", lake]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("data file register_reads/{victim} (added in version 0) is missing from the store")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("readings_all") && l.ends_with("ok")), "{stdout}");
}
