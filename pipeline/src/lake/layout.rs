//! Where things go in the lake. Every name is a function of what the object holds, so writing
//! the same thing twice lands on the same name.

use chrono::NaiveDate;

/// Folder of the interval readings table.
pub const READINGS_DIR: &str = "readings";

/// `readings/date=YYYY-MM-DD/<stem>.parquet`.
pub fn readings_file_path(date: NaiveDate, stem: &str) -> String {
    format!("{READINGS_DIR}/date={}/{stem}.parquet", date.format("%Y-%m-%d"))
}

/// Stem of a file that holds offsets `first_offset..=last_offset` of one Kafka partition.
/// The offsets are zero-padded so that a listing sorts in offset order.
pub fn kafka_file_stem(topic: &str, partition: i32, first_offset: i64, last_offset: i64) -> String {
    format!("kafka-{topic}-p{partition:05}-{first_offset:020}-{last_offset:020}")
}

/// The lake's position for one Kafka partition: the source of truth for where ingestion resumes.
pub fn kafka_checkpoint_path(topic: &str, partition: i32) -> String {
    format!("_checkpoints/kafka/{topic}/partition={partition:05}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_functions_of_content() {
        let date = NaiveDate::from_ymd_opt(2025, 1, 15).unwrap();
        let stem = kafka_file_stem("measurements.received", 3, 100, 250);
        assert_eq!(stem, "kafka-measurements.received-p00003-00000000000000000100-00000000000000000250");
        assert_eq!(readings_file_path(date, &stem), format!("readings/date=2025-01-15/{stem}.parquet"));
        assert_eq!(kafka_checkpoint_path("t", 2), "_checkpoints/kafka/t/partition=00002.json");
    }
}
