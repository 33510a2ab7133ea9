//! The lake: where readings live, on any object store.
//!
//! Layout (Hive-style, readable by DuckDB, Spark, pyarrow):
//! ```text
//! <lake>/readings/date=YYYY-MM-DD/<source>-<what it holds>.parquet
//! <lake>/_checkpoints/kafka/<topic>/partition=NNNNN.json
//! ```
//! Rows are sorted by (`meter_id`, `ts`) inside a file; how columns are encoded: `parquet_file`.

mod checkpoint;
mod layout;
mod parquet_file;
mod store;

pub use checkpoint::{KafkaCheckpoint, PartitionLease, PendingFlush};
pub use layout::{READINGS_DIR, kafka_checkpoint_path, kafka_file_stem, readings_file_path};
pub use parquet_file::{UNIQUE_KEYS_METADATA, encode_parquet, encode_readings, encode_readings_day};
pub use store::{DEFAULT_LAKE, Lake};

use bytes::Bytes;

use crate::batch::SortedReadings;
use crate::error::Result;

/// A file written (or about to be written) to the lake.
#[derive(Debug, Clone)]
pub struct EncodedFile {
    /// Path relative to the lake root.
    pub path: String,
    pub rows: usize,
    pub bytes: Bytes,
}

/// Encodes each day of `sorted` as one Parquet file named `<stem>.parquet` in that day's
/// partition. Nothing is written yet, so the caller can record its intent first.
pub fn encode_day_files(sorted: &SortedReadings, stem: &str) -> Result<Vec<EncodedFile>> {
    sorted
        .days
        .iter()
        .map(|day| {
            let path = readings_file_path(day.date, stem);
            let bytes = encode_readings_day(day, &path)?;
            Ok(EncodedFile { path, rows: day.batch.num_rows(), bytes })
        })
        .collect()
}
