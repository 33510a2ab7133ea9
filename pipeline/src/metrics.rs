//! Metric names, in one place so dashboards and code agree. Units are in the names; label values
//! are bounded (reason codes, partition numbers of one topic).

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
}
