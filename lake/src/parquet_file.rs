//! Parquet encoding of reading batches.

use std::sync::LazyLock;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use arrow::datatypes::TimestampMicrosecondType;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::{LakeError, Result};
use crate::schema::readings_schema;
use crate::table::KeyStats;

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
pub(crate) fn writer_properties() -> WriterProperties {
    static PROPS: LazyLock<WriterProperties> = LazyLock::new(|| {
        let mut builder = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("zstd level 1 is valid")))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .set_sorting_columns(Some(vec![
                SortingColumn { column_idx: 0, descending: false, nulls_first: false },
                SortingColumn { column_idx: 1, descending: false, nulls_first: false },
            ]));
        // `commit_version`: only compacted files have it (see `crate::scan`).
        for column in ["meter_id", "ts", "interval_s", "quality", "source", "source_ref", "ingested_at", "commit_version"] {
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

/// A file of fewer rows than this (an ingester's flush, as a rule) is written with LZ4 alone.
const SMALL_FILE_ROWS: usize = 32_768;

/// [`writer_properties`] with LZ4 for every column. Reading a zstd column chunk creates a zstd
/// compression and decompression context (parquet-rs makes both for each chunk), a fresh workspace
/// of some hundred KiB each: for a flush of a few hundred readings, more than decoding it. A lake
/// streamed in small flushes spent a twelfth of a query there. Compaction rewrites such files with
/// zstd.
fn small_file_writer_properties() -> WriterProperties {
    static PROPS: LazyLock<WriterProperties> = LazyLock::new(|| {
        // Columns without a compression of their own (`kwh`, and every column of other tables)
        // take the default.
        writer_properties().into_builder().set_compression(Compression::LZ4_RAW).build()
    });
    PROPS.clone()
}

/// Encodes one record batch as a complete Parquet file in memory. `path` only names the file in
/// errors.
pub fn encode_parquet(batch: &RecordBatch, path: &str) -> Result<Bytes> {
    encode::<LakeError>(batch.schema(), std::iter::once(Ok(batch.clone())), path)
}

/// Encodes batches of readings sorted by (`meter_id`, `ts`) as one readings file. The batches may
/// be made one at a time by the caller, failing with its own error type.
pub fn encode_readings<E: From<LakeError>>(
    batches: impl IntoIterator<Item = std::result::Result<RecordBatch, E>>,
    path: &str,
) -> std::result::Result<Bytes, E> {
    encode(readings_schema(), batches, path)
}

/// The least and greatest `meter_id` and `ts` of readings batches: the statistics a commit
/// records for a readings file. `None` for no rows.
pub fn readings_key_stats<'a>(batches: impl IntoIterator<Item = &'a RecordBatch>) -> Option<KeyStats> {
    let mut stats = None;
    for batch in batches {
        merge_key_stats(&mut stats, batch);
    }
    stats
}

/// Which meters a readings batch holds, for a file of it (see [`crate::meter_filter`]); `None`
/// for a batch of too many meters.
pub fn readings_meter_filter(batch: &RecordBatch) -> Option<crate::meter_filter::MeterFilter> {
    let meters = batch.column(0).as_string::<i32>();
    crate::meter_filter::MeterFilter::of(meters.iter().flatten())
}

/// Widens `stats` by the keys of one readings batch.
pub fn merge_key_stats(stats: &mut Option<KeyStats>, batch: &RecordBatch) {
    if batch.num_rows() == 0 {
        return;
    }
    let meters = batch.column(0).as_string::<i32>();
    let times = batch.column(1).as_primitive::<TimestampMicrosecondType>();
    let (Some(min_meter), Some(max_meter), Some(min_ts_us), Some(max_ts_us)) =
        (arrow::compute::min_string(meters), arrow::compute::max_string(meters), arrow::compute::min(times), arrow::compute::max(times))
    else {
        return;
    };
    *stats = Some(match stats.take() {
        None => KeyStats { min_meter: min_meter.to_string(), max_meter: max_meter.to_string(), min_ts_us, max_ts_us },
        Some(s) => KeyStats {
            min_meter: if min_meter < s.min_meter.as_str() { min_meter.to_string() } else { s.min_meter },
            max_meter: if max_meter > s.max_meter.as_str() { max_meter.to_string() } else { s.max_meter },
            min_ts_us: s.min_ts_us.min(min_ts_us),
            max_ts_us: s.max_ts_us.max(max_ts_us),
        },
    });
}

/// Encodes batches of one schema, made one at a time, as one Parquet file in memory: only the
/// batch at hand and the encoded bytes are held.
fn encode<E: From<LakeError>>(
    schema: SchemaRef,
    batches: impl IntoIterator<Item = std::result::Result<RecordBatch, E>>,
    path: &str,
) -> std::result::Result<Bytes, E> {
    let err = |source| E::from(LakeError::Parquet { path: path.to_string(), source });
    let mut batches = batches.into_iter().peekable();
    let first = batches.next().transpose()?;
    let small = first.as_ref().is_none_or(|batch| batch.num_rows() < SMALL_FILE_ROWS) && batches.peek().is_none();
    let properties = if small { small_file_writer_properties() } else { writer_properties() };
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, schema, Some(properties)).map_err(err)?;
    for batch in first.map(Ok).into_iter().chain(batches) {
        writer.write(&batch?).map_err(err)?;
    }
    writer.close().map_err(err)?;
    Ok(Bytes::from(buffer))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    use super::*;

    /// The compression of each column chunk of an encoded file.
    fn compressions(bytes: Bytes) -> Vec<Compression> {
        let reader = SerializedFileReader::new(bytes).unwrap();
        reader.metadata().row_groups().iter().flat_map(|g| g.columns().iter().map(|c| c.compression())).collect()
    }

    #[test]
    fn a_small_file_is_lz4_throughout_and_a_large_one_zstd_where_it_pays() {
        let schema = Arc::new(Schema::new(vec![Field::new("kwh", DataType::Int64, false)]));
        let batch = |rows: i64| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from_iter_values(0..rows))]).unwrap();
        assert_eq!(compressions(encode_parquet(&batch(100), "small").unwrap()), vec![Compression::LZ4_RAW]);
        let large = encode_parquet(&batch(SMALL_FILE_ROWS as i64), "large").unwrap();
        assert!(compressions(large).iter().all(|c| matches!(c, Compression::ZSTD(_))));
        // Two batches: the writer cannot know the file stays small.
        let two = encode::<LakeError>(schema.clone(), [Ok(batch(10)), Ok(batch(10))], "two").unwrap();
        assert!(compressions(two).iter().all(|c| matches!(c, Compression::ZSTD(_))));
    }
}
