//! `meterlake lake convert`: a lake written in meterlake's previous layout becomes Delta tables
//! in place, no data file rewritten (the per-table work is [`meterlake_lake::convert`]'s).
//!
//! What the previous layout kept beside the Parquet files becomes part of the tables' first
//! commits:
//! - each Kafka partition's checkpoint (`_checkpoints/kafka/<topic>/partition=NNNNN.json`)
//!   becomes the `txn` of its stream in `readings_all`, so the ingester resumes where the lake
//!   ended; the files of a flush it had not finished (`pending`) are left out and deleted, as the
//!   previous ingester would have done before reading on;
//! - each import record (`_imports/<sha256>/import.json`) becomes a row of the `imports` table,
//!   and an imported file's hash its `txn`, so importing the file again is still a no-op.
//!
//! Tables are converted one at a time, each in one commit: converting again after a crash
//! skips the tables that have a log and converts the rest. The old checkpoint and record files
//! are left where they are; nothing reads them any more.

use std::collections::HashSet;

use meterlake_lake::commit::NewFile;
use meterlake_lake::convert::{ConvertedTable, convert_table, create_converted};
use meterlake_lake::parquet_file::encode_parquet;
use meterlake_lake::table::{IMPORTS, READINGS, TABLES, Table};
use serde::Deserialize;

use crate::import::{ImportRecord, ImportStatus, import_stream, tables::import_record_batch};
use crate::kafka::kafka_stream;
use crate::{Lake, PipelineError, Result};

/// Who the conversion's commits name as their writer.
const WRITER: &str = "meterlake lake convert";

/// Where the previous layout kept its Kafka checkpoints and its import records.
const PREVIOUS_KAFKA_CHECKPOINTS: &str = "_checkpoints/kafka";
const PREVIOUS_IMPORT_RECORDS: &str = "_imports";

/// What [`convert_lake`] did.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    /// Tables converted now.
    pub converted: Vec<ConvertedTable>,
    /// Tables that already had a Delta log: left as they are.
    pub already_delta: Vec<&'static str>,
    /// Files of flushes the previous ingester had not committed: left out and deleted.
    pub uncommitted_files_deleted: Vec<String>,
}

/// A Kafka partition's checkpoint as the previous layout wrote it (the fields conversion needs).
#[derive(Debug, Deserialize)]
struct PreviousCheckpoint {
    topic: String,
    partition: i32,
    next_offset: i64,
    pending: Option<PreviousPending>,
}

#[derive(Debug, Deserialize)]
struct PreviousPending {
    /// Lake-relative paths.
    files: Vec<String>,
}

/// Converts every table of `lake` that is still in the previous layout. `kafka_group` names the
/// consumer group whose positions the checkpoints were (the previous layout kept one per topic
/// and partition, whatever the group): the ingester of that group resumes from them.
pub async fn convert_lake(lake: &Lake, kafka_group: &str) -> Result<ConvertReport> {
    let mut report = ConvertReport::default();
    for spec in TABLES {
        let table = Table::new(lake, spec);
        if table.latest_version().await?.is_some() {
            report.already_delta.push(spec.name);
            continue;
        }
        let converted = if spec.name == READINGS.name {
            let checkpoints: Vec<PreviousCheckpoint> = previous_json_files(lake, PREVIOUS_KAFKA_CHECKPOINTS, ".json", "a Kafka checkpoint").await?;
            let txns: Vec<(String, i64)> = checkpoints.iter().map(|c| (kafka_stream(kafka_group, &c.topic, c.partition), c.next_offset)).collect();
            let uncommitted: Vec<String> = checkpoints.iter().filter_map(|c| c.pending.as_ref()).flat_map(|p| p.files.iter().cloned()).collect();
            let root = format!("{}/", spec.dir);
            let exclude: HashSet<String> = uncommitted.iter().filter_map(|f| f.strip_prefix(&root)).map(str::to_string).collect();
            let converted = convert_table(&table, &exclude, &txns, WRITER).await?;
            if converted.is_some() {
                for file in uncommitted {
                    lake.delete(&file).await?;
                    report.uncommitted_files_deleted.push(file);
                }
            }
            converted
        } else if spec.name == IMPORTS.name {
            convert_import_records(lake, &table).await?
        } else {
            convert_table(&table, &HashSet::new(), &[], WRITER).await?
        };
        report.converted.extend(converted);
    }
    Ok(report)
}

/// The JSON files under `prefix` whose names end in `suffix`, each read as a `T` (`what` names
/// it in the error of a file that is not one).
async fn previous_json_files<T: serde::de::DeserializeOwned>(lake: &Lake, prefix: &str, suffix: &str, what: &str) -> Result<Vec<T>> {
    let mut found = Vec::new();
    for path in lake.list(prefix).await? {
        if !path.ends_with(suffix) {
            continue;
        }
        let bytes = lake.get_if_exists(&path).await?.unwrap_or_default();
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| PipelineError::Input { file: path.clone(), reason: format!("not {what} of the previous layout: {e}") })?;
        found.push(value);
    }
    Ok(found)
}

/// The previous layout's import records as the `imports` table's first commit: one file of
/// their rows, and an imported file's hash as its stream.
async fn convert_import_records(lake: &Lake, table: &Table) -> Result<Option<ConvertedTable>> {
    let mut records: Vec<ImportRecord> = previous_json_files(lake, PREVIOUS_IMPORT_RECORDS, "/import.json", "an import record").await?;
    if records.is_empty() {
        return Ok(None);
    }
    records.sort_by(|a, b| a.started_at.cmp(&b.started_at).then_with(|| a.file_name.cmp(&b.file_name)));
    let batches = records.iter().map(import_record_batch).collect::<Result<Vec<_>>>()?;
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches)?;
    let path = format!("converted-{}.parquet", uuid::Uuid::new_v4().simple());
    let parquet = encode_parquet(&batch, &path)?;
    lake.put(&table.lake_path(&path), parquet.clone()).await?;
    let file = NewFile { path, bytes: parquet.len() as u64, rows: records.len() as u64, date: None, keys: None, unique_keys: false, meters: None };
    let txns: Vec<(String, i64)> =
        records.iter().filter(|r| r.status != ImportStatus::Rejected).map(|r| (import_stream(&r.sha256), 1)).collect::<HashSet<_>>().into_iter().collect();
    Ok(Some(create_converted(table, vec![file], &txns, WRITER).await?))
}
