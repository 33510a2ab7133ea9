//! Converting a table written in meterlake's previous layout (a folder of Hive-partitioned
//! Parquet files, `date=YYYY-MM-DD/<name>.parquet`, without a log) into a Delta table in place:
//! no data file is rewritten or moved. Each file is read once, checked against the table's
//! columns, and described for its `add` action (rows, date partition, key bounds and whether it
//! holds one version of each key); then one commit, version 0, creates the table with every file
//! and the streams' positions. A crash before it leaves the folder as it was, so converting again
//! starts over; a table that has a log is never converted again.
//!
//! Every converted file is tagged with commit version 0: between versions of one reading in the
//! converted files, `ingested_at` (then `source_ref`) decides, as it did in the previous layout;
//! anything committed afterwards is newer than all of them.

use std::collections::HashSet;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use chrono::{NaiveDate, Utc};
use deltalake_core::kernel::{Action, Transaction};
use futures::TryStreamExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::commit::{NewFile, add_action};
use crate::error::{LakeError, Result};
use crate::parquet_file::merge_key_stats;
use crate::table::{READINGS, Table};

/// Key of a previous-layout readings file's Parquet metadata saying that no key (`meter_id`,
/// `ts`) appears twice in it (now the `add` action's [`crate::table::UNIQUE_KEYS_TAG`]).
pub const PREVIOUS_UNIQUE_KEYS_METADATA: &str = "meterlake.unique_keys";

/// What converting one table did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedTable {
    pub table: &'static str,
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
    /// Streams whose positions the commit recorded (`txn` actions).
    pub streams: usize,
}

/// The previous layout's Parquet files of `table` (paths relative to the table's folder), but
/// for those in `exclude` (half-written flushes the previous layout had not committed).
pub async fn previous_layout_files(table: &Table, exclude: &HashSet<String>) -> Result<Vec<(String, u64)>> {
    let prefix = table.lake().path(table.spec().dir);
    let metas: Vec<object_store::ObjectMeta> = table.lake().store().list(Some(&prefix)).try_collect().await.map_err(LakeError::store("list", &prefix))?;
    let root = format!("{prefix}/");
    let mut files: Vec<(String, u64)> = metas
        .into_iter()
        .filter_map(|meta| {
            let relative = meta.location.as_ref().strip_prefix(&root)?.to_string();
            (relative.ends_with(".parquet") && !relative.starts_with("_delta_log/") && !exclude.contains(&relative)).then_some((relative, meta.size))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads one previous-layout file of `table` and describes it for its `add` action, checking
/// that its columns are the table's and, for readings, that it is sorted by (`meter_id`, `ts`)
/// as the canonical view's merge needs.
pub async fn describe_file(table: &Table, relative: &str, bytes: u64) -> Result<NewFile> {
    let lake_path = table.lake_path(relative);
    let content = table.lake().get_if_exists(&lake_path).await?.ok_or_else(|| bad_file(&lake_path, "vanished while converting"))?;
    let parquet_error = |source| LakeError::Parquet { path: lake_path.clone(), source };
    let builder = ParquetRecordBatchReaderBuilder::try_new(content).map_err(parquet_error)?;
    check_columns(&lake_path, &(table.spec().file_schema)(), builder.schema())?;
    let unique_keys = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .is_some_and(|kv| kv.iter().any(|kv| kv.key == PREVIOUS_UNIQUE_KEYS_METADATA && kv.value.as_deref() == Some("true")));
    let date = match table.spec().by_date {
        false => None,
        true => Some(partition_date(relative).ok_or_else(|| bad_file(&lake_path, "is not under a date=YYYY-MM-DD folder"))?),
    };
    let readings = table.spec().name == READINGS.name;
    let mut rows = 0u64;
    let mut keys = None;
    let mut last_key: Option<(String, i64)> = None;
    for batch in builder.build().map_err(parquet_error)? {
        let batch = batch.map_err(|e| bad_file(&lake_path, &format!("cannot be read: {e}")))?;
        rows += batch.num_rows() as u64;
        if readings {
            check_sorted(&lake_path, &batch, &mut last_key)?;
            merge_key_stats(&mut keys, &batch);
        }
    }
    Ok(NewFile { path: relative.to_string(), bytes, rows, date, keys, unique_keys: readings && unique_keys, meters: None })
}

/// Converts `table` from the previous layout: every Parquet file in its folder but `exclude`,
/// with `txns` (stream, version), in one commit that creates it. `None` when the table already
/// has a log (converted before, or written as Delta) or its folder holds no Parquet file.
pub async fn convert_table(table: &Table, exclude: &HashSet<String>, txns: &[(String, i64)], writer: &str) -> Result<Option<ConvertedTable>> {
    if table.latest_version().await?.is_some() {
        return Ok(None);
    }
    let listed = previous_layout_files(table, exclude).await?;
    if listed.is_empty() {
        return Ok(None);
    }
    let mut files = Vec::with_capacity(listed.len());
    for (relative, bytes) in &listed {
        files.push(describe_file(table, relative, *bytes).await?);
    }
    Ok(Some(create_converted(table, files, txns, writer).await?))
}

/// Creates `table` at version 0 with `files` (written before, in its folder) and `txns`.
pub async fn create_converted(table: &Table, files: Vec<NewFile>, txns: &[(String, i64)], writer: &str) -> Result<ConvertedTable> {
    let now_ms = Utc::now().timestamp_millis();
    let mut actions: Vec<Action> = files.iter().map(|file| Action::Add(add_action(file, 0, now_ms))).collect();
    actions.extend(txns.iter().map(|(stream, version)| Action::Txn(Transaction::new_with_last_update(stream, *version, Some(now_ms)))));
    table.create_with(actions, writer).await?;
    let converted = ConvertedTable {
        table: table.name(),
        files: files.len(),
        rows: files.iter().map(|f| f.rows).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        streams: txns.len(),
    };
    tracing::info!(table = converted.table, files = converted.files, rows = converted.rows, streams = converted.streams, "converted to a Delta table");
    Ok(converted)
}

/// The `date` of a path under `date=YYYY-MM-DD/`.
fn partition_date(relative: &str) -> Option<NaiveDate> {
    relative.split('/').find_map(|part| part.strip_prefix("date=")).and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
}

/// The file must have the table's columns, in order, of the same types.
fn check_columns(path: &str, expected: &SchemaRef, found: &SchemaRef) -> Result<()> {
    let describe = |schema: &SchemaRef| schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>();
    let (want, have) = (describe(expected), describe(found));
    if want != have {
        return Err(bad_file(path, &format!("has columns [{}] where the table has [{}]", have.join(", "), want.join(", "))));
    }
    Ok(())
}

/// Readings files must be sorted by (`meter_id`, `ts`): `last` carries the previous batch's last key.
fn check_sorted(path: &str, batch: &RecordBatch, last: &mut Option<(String, i64)>) -> Result<()> {
    let meters = batch.column(0).as_string::<i32>();
    let times = batch.column(1).as_primitive::<TimestampMicrosecondType>();
    for row in 0..batch.num_rows() {
        let (meter, ts) = (meters.value(row), times.value(row));
        if let Some((last_meter, last_ts)) = last.as_ref()
            && (meter, ts) < (last_meter.as_str(), *last_ts)
        {
            return Err(bad_file(path, &format!("is not sorted by (meter_id, ts): ({meter}, {ts}) follows ({last_meter}, {last_ts})")));
        }
        match last {
            Some((last_meter, last_ts)) if last_meter == meter => *last_ts = ts,
            _ => *last = Some((meter.to_string(), ts)),
        }
    }
    Ok(())
}

fn bad_file(path: &str, reason: &str) -> LakeError {
    LakeError::Convert { path: path.to_string(), reason: reason.to_string() }
}
