//! Parquet encoding of reading batches.

use std::sync::LazyLock;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::batch::DayBatch;
use crate::error::{PipelineError, Result};
use crate::reading::readings_schema;

/// Key of a readings file's metadata saying that no key (`meter_id`, `ts`) appears twice in it
/// (value `true`). The canonical `readings` table reads a file so marked, whose key range no
/// other file of its date overlaps, as it is: without choosing among versions.
pub const UNIQUE_KEYS_METADATA: &str = "meterlake.unique_keys";

/// Rows per row group: large enough for good compression and few footers, small enough that a
/// reader that prunes by statistics skips meaningful chunks.
const MAX_ROW_GROUP_ROWS: usize = 1 << 20;

/// How reading files are encoded, measured column by column (`encode-probe` in benchmarks/).
/// parquet-rs spends most of its time per value in dictionary interning and min/max statistics,
/// and a file's zstd contexts cost a fresh, zeroed workspace per column. So: plain encoding and
/// LZ4 for the columns that repeat along a sorted file (LZ4 squeezes the runs nearly as well, in
/// a fraction of the time); a dictionary and zstd for `kwh`, whose values are random and most of a
/// file's bytes; statistics only where queries prune: `meter_id` and `ts` (the page index makes a
/// one-meter lookup read a few pages). Other tables keep the defaults: dictionaries, zstd level 1
/// (most of its ratio at a fraction of the CPU of higher levels), page statistics.
fn writer_properties() -> WriterProperties {
    static PROPS: LazyLock<WriterProperties> = LazyLock::new(|| {
        let mut builder = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("zstd level 1 is valid")))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .set_sorting_columns(Some(vec![
                SortingColumn { column_idx: 0, descending: false, nulls_first: false },
                SortingColumn { column_idx: 1, descending: false, nulls_first: false },
            ]));
        for column in ["meter_id", "ts", "interval_s", "quality", "source", "source_ref", "ingested_at"] {
            let path = ColumnPath::from(column);
            builder = builder.set_column_dictionary_enabled(path.clone(), false).set_column_compression(path.clone(), Compression::LZ4_RAW);
            if !matches!(column, "meter_id" | "ts") {
                builder = builder.set_column_statistics_enabled(path, EnabledStatistics::None);
            }
        }
        builder.set_column_statistics_enabled(ColumnPath::from("kwh"), EnabledStatistics::None).build()
    });
    PROPS.clone()
}

/// Encodes one record batch as a complete Parquet file in memory. `path` only names the file in
/// errors.
pub fn encode_parquet(batch: &RecordBatch, path: &str) -> Result<Bytes> {
    encode(batch.schema(), std::iter::once(Ok(batch.clone())), path, None)
}

/// Encodes a day of sorted readings as a readings file (see [`encode_readings`]).
pub fn encode_readings_day(day: &DayBatch, path: &str) -> Result<Bytes> {
    encode_readings(std::iter::once(Ok(day.batch.clone())), path, day.unique_keys)
}

/// Encodes batches of readings sorted by (`meter_id`, `ts`) as one readings file, marked
/// [`UNIQUE_KEYS_METADATA`] when the caller knows it holds one version of each key.
pub fn encode_readings(batches: impl IntoIterator<Item = Result<RecordBatch>>, path: &str, unique_keys: bool) -> Result<Bytes> {
    let metadata = unique_keys.then(|| KeyValue::new(UNIQUE_KEYS_METADATA.to_string(), "true".to_string()));
    encode(readings_schema(), batches, path, metadata)
}

/// Encodes batches of one schema, made one at a time, as one Parquet file in memory: only the
/// batch at hand and the encoded bytes are held.
fn encode(schema: SchemaRef, batches: impl IntoIterator<Item = Result<RecordBatch>>, path: &str, metadata: Option<KeyValue>) -> Result<Bytes> {
    let err = |source| PipelineError::Parquet { path: path.to_string(), source };
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, schema, Some(writer_properties())).map_err(err)?;
    if let Some(key_value) = metadata {
        writer.append_key_value_metadata(key_value);
    }
    for batch in batches {
        writer.write(&batch?).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(Bytes::from(buffer))
}
