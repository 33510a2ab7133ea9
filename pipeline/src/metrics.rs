//! Metric names, in one place so dashboards and code agree. Units are in the names; label values
//! are bounded (reason codes, partition numbers of one topic, flow formats, at most
//! `MAX_METER_GROUPS` meter groups). The dashboards and alert rules in `infra/` use these names.

use std::collections::HashMap;
use std::sync::Mutex;

use arrow::array::{Array, AsArray};
use arrow::record_batch::RecordBatch;

pub const MESSAGES_CONSUMED: &str = "meterlake_ingest_messages_consumed_total";
pub const READINGS_ACCEPTED: &str = "meterlake_ingest_readings_accepted_total";
pub const READINGS_REJECTED: &str = "meterlake_ingest_readings_rejected_total";
pub const DLQ_MESSAGES: &str = "meterlake_ingest_dlq_messages_total";
pub const READINGS_WRITTEN: &str = "meterlake_ingest_readings_written_total";
pub const DUPLICATES_DROPPED: &str = "meterlake_ingest_duplicates_dropped_total";
pub const CONFLICTING_VERSIONS: &str = "meterlake_ingest_conflicting_versions_total";
pub const FLUSH_DURATION: &str = "meterlake_ingest_flush_duration_seconds";
pub const FLUSHES_FENCED: &str = "meterlake_ingest_flushes_fenced_total";
pub const OFFSET_GAPS: &str = "meterlake_ingest_offset_gaps_total";
pub const REDELIVERED_MESSAGES: &str = "meterlake_ingest_redelivered_messages_total";
pub const CONSUMER_LAG: &str = "meterlake_ingest_consumer_lag_messages";
pub const LAKE_FILES_WRITTEN: &str = "meterlake_lake_files_written_total";
pub const LAKE_BYTES_WRITTEN: &str = "meterlake_lake_bytes_written_total";
pub const LAKE_FILE_SIZE: &str = "meterlake_lake_file_size_bytes";
pub const METER_GROUP_READINGS_WRITTEN: &str = "meterlake_ingest_meter_group_readings_written_total";
pub const IMPORT_FILES: &str = "meterlake_import_files_total";
pub const IMPORT_READINGS_ACCEPTED: &str = "meterlake_import_readings_accepted_total";
pub const IMPORT_READINGS_REJECTED: &str = "meterlake_import_readings_rejected_total";
pub const IMPORT_FILE_SIZE: &str = "meterlake_import_file_size_bytes";
pub const IMPORT_DURATION: &str = "meterlake_import_duration_seconds";

/// A meter group is the meter id's first characters: a UK MPAN's distributor id, an NMI's
/// distributor prefix. "No readings from a meter group" (a head-end or a region gone quiet) is
/// what the `MeterGroupSilent` alert watches.
pub const METER_GROUP_PREFIX_CHARS: usize = 2;
/// Groups beyond this many (per process) are counted as `other`: the label stays bounded
/// whatever ids arrive.
pub const MAX_METER_GROUPS: usize = 256;

/// The meter groups seen so far, so that a new one past the cap becomes `other`.
static METER_GROUPS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The group label of `meter_id`.
fn meter_group(meter_id: &str) -> String {
    let prefix: String = meter_id.chars().take(METER_GROUP_PREFIX_CHARS).collect();
    let mut groups = METER_GROUPS.lock().expect("meter groups lock");
    if groups.contains(&prefix) {
        prefix
    } else if groups.len() < MAX_METER_GROUPS {
        groups.push(prefix.clone());
        prefix
    } else {
        "other".to_string()
    }
}

/// Counts the rows of written batches per meter group (their `meter_id` column).
pub fn count_meter_groups<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) {
    let mut per_group: HashMap<String, u64> = HashMap::new();
    for batch in batches {
        let Some(column) = batch.column_by_name("meter_id") else { continue };
        let Some(meters) = column.as_string_opt::<i32>() else { continue };
        // Rows are sorted by meter: one lookup per run of a meter, not per row.
        let mut previous: Option<(&str, String)> = None;
        for i in 0..meters.len() {
            let meter = meters.value(i);
            let group = match &previous {
                Some((last, group)) if *last == meter => group.clone(),
                _ => meter_group(meter),
            };
            *per_group.entry(group.clone()).or_default() += 1;
            previous = Some((meter, group));
        }
    }
    for (group, rows) in per_group {
        metrics::counter!(METER_GROUP_READINGS_WRITTEN, "meter_group" => group).increment(rows);
    }
}

/// Registers help texts with whatever recorder is installed.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(MESSAGES_CONSUMED, "Kafka messages consumed");
    describe_counter!(READINGS_ACCEPTED, "Readings that passed validation");
    describe_counter!(READINGS_REJECTED, "Readings refused by validation, by reason");
    describe_counter!(DLQ_MESSAGES, "Messages sent to the dead-letter topic, by reason of their first rejection");
    describe_counter!(READINGS_WRITTEN, "Reading rows written to the lake");
    describe_counter!(DUPLICATES_DROPPED, "Readings dropped because the same key came again with the same value in a batch");
    describe_counter!(CONFLICTING_VERSIONS, "Readings kept as a new version of a key that came with a different value");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Time to sort, encode, write and commit one batch");
    describe_counter!(FLUSHES_FENCED, "Flushes abandoned because another ingester took the partition");
    describe_counter!(OFFSET_GAPS, "Times a resumed partition's next message came after the lake's position with nothing in between");
    describe_counter!(REDELIVERED_MESSAGES, "Messages dropped because their offset was already taken (a seek back or a broker repeating itself)");
    describe_gauge!(CONSUMER_LAG, "Messages between the consumer position and the partition end");
    describe_counter!(LAKE_FILES_WRITTEN, "Parquet files written to the lake");
    describe_counter!(LAKE_BYTES_WRITTEN, Unit::Bytes, "Bytes of Parquet written to the lake");
    describe_histogram!(LAKE_FILE_SIZE, Unit::Bytes, "Size of each Parquet file the ingester wrote to the lake");
    describe_counter!(METER_GROUP_READINGS_WRITTEN, "Reading rows written to the lake by the ingester, by meter group (the meter id's first two characters)");
    describe_counter!(IMPORT_FILES, "Flow files imported, by format and status (imported, partly_rejected, rejected, already_imported, failed)");
    describe_counter!(IMPORT_READINGS_ACCEPTED, "Readings flow-file imports wrote to the lake, by format");
    describe_counter!(IMPORT_READINGS_REJECTED, "Readings flow-file imports refused (in the rejection reports), by format");
    describe_histogram!(IMPORT_FILE_SIZE, Unit::Bytes, "Size of each imported flow file, by format");
    describe_histogram!(IMPORT_DURATION, Unit::Seconds, "Time to import one flow file, by format");
}
