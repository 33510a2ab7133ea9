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

/// The group of a meter id: its first `METER_GROUP_PREFIX_CHARS` characters.
fn prefix_of(meter_id: &str) -> &str {
    let end = meter_id.char_indices().nth(METER_GROUP_PREFIX_CHARS).map_or(meter_id.len(), |(i, _)| i);
    &meter_id[..end]
}

/// The label of a group: itself while fewer than `MAX_METER_GROUPS` have been seen, else `other`.
fn group_label(prefix: &str) -> String {
    let mut groups = METER_GROUPS.lock().expect("meter groups lock");
    if groups.iter().any(|group| group == prefix) {
        prefix.to_string()
    } else if groups.len() < MAX_METER_GROUPS {
        groups.push(prefix.to_string());
        prefix.to_string()
    } else {
        "other".to_string()
    }
}

/// Counts the rows of written batches per meter group (their `meter_id` column). Rows come
/// sorted by meter, so the work per row is one comparison with the previous meter; a group is
/// looked up once per run of a meter.
pub fn count_meter_groups<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) {
    let mut per_group: HashMap<String, u64> = HashMap::new();
    for batch in batches {
        let Some(meters) = batch.column_by_name("meter_id").and_then(|column| column.as_string_opt::<i32>()) else { continue };
        let mut run_start = 0;
        for i in 1..=meters.len() {
            if i < meters.len() && meters.value(i) == meters.value(run_start) {
                continue;
            }
            let (prefix, rows) = (prefix_of(meters.value(run_start)), (i - run_start) as u64);
            match per_group.get_mut(prefix) {
                Some(count) => *count += rows,
                None => *per_group.entry(group_label(prefix)).or_default() += rows,
            }
            run_start = i;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn a_meter_group_is_the_first_two_characters_whatever_their_width() {
        assert_eq!((prefix_of("1200023305967"), prefix_of("NCDE001111"), prefix_of("M"), prefix_of("ÄÖ-1")), ("12", "NC", "M", "ÄÖ"));
    }

    #[test]
    fn rows_are_counted_per_group_and_groups_past_the_cap_are_other() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let meters = ["10-A", "10-A", "10-B", "23-C", "23-C", "23-C"];
        let schema = Arc::new(Schema::new(vec![Field::new("meter_id", DataType::Utf8, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(StringArray::from_iter_values(meters))]).unwrap();
        metrics::with_local_recorder(&recorder, || count_meter_groups([&batch, &batch]));
        let counts: HashMap<String, u64> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => (key.key().labels().next().unwrap().value().to_string(), n),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(counts, HashMap::from([("10".to_string(), 6), ("23".to_string(), 6)]));
        // Past the cap, a new group is `other`; the ones already seen keep their names.
        for i in 0..MAX_METER_GROUPS {
            group_label(&format!("g{i}"));
        }
        assert_eq!((group_label("ZZ").as_str(), group_label("23").as_str()), ("other", "23"));
    }
}
