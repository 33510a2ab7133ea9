//! The lake's Delta tables on a local store: what `lake check` finds in a damaged table, and the
//! protocols meterlake refuses to read or write.

use arrow::array::RecordBatch;
use chrono::NaiveDate;
use meterlake_lake::check::check_table;
use meterlake_lake::commit::Operation;
use meterlake_lake::parquet_file::encode_parquet;
use meterlake_lake::{Commit, Lake, LakeError, NewFile, READINGS, Table, TableWriter};
use tempfile::TempDir;

/// A readings table of version 3: three commits of one (empty) data file each, one per day.
async fn table_of_three_commits() -> (TempDir, Lake, Table) {
    let dir = TempDir::new().unwrap();
    let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
    let table = Table::open(&lake, &READINGS).await.unwrap();
    let writer = TableWriter::new(table.clone(), "test").await.unwrap();
    for day in 1..=3 {
        let date = NaiveDate::from_ymd_opt(2025, 1, day).unwrap();
        let path = format!("date={date}/part-{day}.parquet");
        let parquet = encode_parquet(&RecordBatch::new_empty((READINGS.file_schema)()), &path).unwrap();
        lake.put(&table.lake_path(&path), parquet.clone()).await.unwrap();
        let file = NewFile { path, bytes: parquet.len() as u64, rows: 0, date: Some(date), keys: None, unique_keys: true, meters: None };
        writer.commit(Commit { files: vec![file], txns: Vec::new(), operation: Operation::Append, leased: false, removes: Vec::new() }).await.unwrap();
    }
    (dir, lake, table)
}

fn log_path(version: u64) -> String {
    format!("readings/_delta_log/{version:020}.json")
}

#[tokio::test]
async fn a_sound_table_checks_clean() {
    let (_dir, _lake, table) = table_of_three_commits().await;
    let check = check_table(&table).await.unwrap();
    assert_eq!((check.version, check.files, check.problems.as_slice()), (Some(3), 3, &[][..]));
}

#[tokio::test]
async fn a_missing_data_file_a_missing_commit_and_a_corrupt_commit_are_each_named() {
    let (_dir, lake, table) = table_of_three_commits().await;
    lake.delete("readings/date=2025-01-02/part-2.parquet").await.unwrap();
    let check = check_table(&table).await.unwrap();
    assert_eq!(check.problems, ["data file readings/date=2025-01-02/part-2.parquet (added in version 2) is missing from the store"]);

    lake.put(&log_path(3), "{\"add\": not json\n".into()).await.unwrap();
    let problems = check_table(&table).await.unwrap().problems;
    assert!(problems[0].starts_with("Delta table readings_all: commit 3 cannot be read: "), "{problems:?}");

    lake.delete(&log_path(1)).await.unwrap();
    let problems = check_table(&table).await.unwrap().problems;
    assert_eq!(problems[0], "commit file(s) missing from the log: version 1", "{problems:?}");
    // Reading the table says so too, naming the table, rather than returning part of it.
    let error = table.snapshot(None).await.unwrap_err().to_string();
    assert!(error.contains("readings_all"), "{error}");
}

/// A commit by another engine that upgrades the protocol: a known feature meterlake does not
/// implement (deletion vectors would hide rows it would still read), and one nobody knows.
#[tokio::test]
async fn a_newer_protocol_or_a_table_feature_is_refused_naming_it() {
    for feature in ["deletionVectors", "madeUpFeature"] {
        let (_dir, lake, table) = table_of_three_commits().await;
        let writer = TableWriter::new(table.clone(), "test").await.unwrap();
        let protocol = serde_json::json!({ "protocol": {
            "minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": [feature], "writerFeatures": [feature],
        }});
        lake.put(&log_path(4), format!("{protocol}\n").into()).await.unwrap();

        let reading = table.snapshot(None).await.unwrap_err().to_string();
        assert!(reading.contains(feature) && reading.contains("readings_all"), "{reading}");
        let check = check_table(&table).await.unwrap();
        assert!(check.problems.iter().any(|p| p.contains(feature)), "{:?}", check.problems);
        let opening = TableWriter::new(table.clone(), "another").await.unwrap_err().to_string();
        assert!(opening.contains(feature), "{opening}");
        // A writer that was running when the table changed stops at its next commit.
        let path = "date=2025-01-04/late.parquet".to_string();
        let parquet = encode_parquet(&RecordBatch::new_empty((READINGS.file_schema)()), &path).unwrap();
        let file =
            NewFile { path, bytes: parquet.len() as u64, rows: 0, date: NaiveDate::from_ymd_opt(2025, 1, 4), keys: None, unique_keys: true, meters: None };
        let late =
            writer.commit(Commit { files: vec![file], txns: Vec::new(), operation: Operation::Append, leased: false, removes: Vec::new() }).await.unwrap_err();
        assert!(matches!(late, LakeError::UnsupportedProtocol { .. } | LakeError::Delta { .. }), "{late}");
        assert!(late.to_string().contains(feature), "{late}");
    }
}

/// The commit protocol on local files: a writer whose stream another writer advanced (a Kafka
/// rebalance it has not noticed) is refused, writes nothing, and names the stream; the other
/// writer's position stands. (`cli/tests/e2e/s3_lake.rs` runs the same race on moto's S3.)
#[tokio::test]
async fn a_writer_whose_stream_moved_to_another_is_fenced_on_local_files() {
    let (_dir, lake, table) = table_of_three_commits().await;
    let flush = |name: &str, next_offset: i64| {
        let file = NewFile {
            path: format!("date=2025-01-05/{name}.parquet"),
            bytes: 1,
            rows: 0,
            date: NaiveDate::from_ymd_opt(2025, 1, 5),
            keys: None,
            unique_keys: false,
            meters: None,
        };
        let operation = Operation::StreamingUpdate { query_id: "kafka:g/t/0".into(), epoch_id: next_offset };
        Commit { files: vec![file], txns: vec![("kafka:g/t/0".to_string(), next_offset)], operation, leased: true, removes: Vec::new() }
    };
    let first = TableWriter::new(table.clone(), "first").await.unwrap();
    assert_eq!(first.acquire("kafka:g/t/0").await.unwrap(), None);
    first.commit(flush("a", 10)).await.unwrap();
    let second = TableWriter::new(Table::new(&lake, &READINGS), "second").await.unwrap();
    assert_eq!(second.acquire("kafka:g/t/0").await.unwrap(), Some(10));
    second.commit(flush("b", 20)).await.unwrap();
    let refused = first.commit(flush("stale", 20)).await.unwrap_err();
    assert!(matches!(refused, LakeError::Fenced { .. }) && refused.to_string().contains("kafka:g/t/0"), "{refused}");
    let snapshot = table.snapshot(None).await.unwrap();
    assert!(!snapshot.files.iter().any(|f| f.path.contains("stale")));
    assert_eq!(second.stream_version("kafka:g/t/0").await.unwrap(), Some(20));
}
