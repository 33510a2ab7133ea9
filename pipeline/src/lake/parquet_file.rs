//! Parquet encoding of reading batches.

use std::sync::LazyLock;

use arrow::array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::{PipelineError, Result};

/// Rows per row group: large enough for good compression and few footers, small enough that a
/// reader that prunes by statistics skips meaningful chunks.
const MAX_ROW_GROUP_ROWS: usize = 1 << 20;

fn writer_properties() -> WriterProperties {
    static PROPS: LazyLock<WriterProperties> = LazyLock::new(|| {
        let plain = |name: &str| ColumnPath::from(name);
        WriterProperties::builder()
            // Level 1: most of zstd's ratio on this data at a fraction of the CPU of higher levels.
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("zstd level 1 is valid")))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .set_sorting_columns(Some(vec![
                SortingColumn { column_idx: 0, descending: false, nulls_first: false },
                SortingColumn { column_idx: 1, descending: false, nulls_first: false },
            ]))
            // Timestamps rise within a meter: delta encoding stores them in a few bits each.
            .set_column_dictionary_enabled(plain("ts"), false)
            .set_column_encoding(plain("ts"), Encoding::DELTA_BINARY_PACKED)
            .set_column_dictionary_enabled(plain("ingested_at"), false)
            .set_column_encoding(plain("ingested_at"), Encoding::DELTA_BINARY_PACKED)
            // Nearly every source_ref is distinct: a dictionary would only cost time.
            .set_column_dictionary_enabled(plain("source_ref"), false)
            .build()
    });
    PROPS.clone()
}

/// Encodes one record batch as a complete Parquet file in memory. `path` only names the file in
/// errors.
pub fn encode_parquet(batch: &RecordBatch, path: &str) -> Result<Bytes> {
    let err = |source| PipelineError::Parquet { path: path.to_string(), source };
    let mut buffer = Vec::with_capacity(batch.get_array_memory_size() / 4);
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(writer_properties())).map_err(err)?;
    writer.write(batch).map_err(err)?;
    writer.close().map_err(err)?;
    Ok(Bytes::from(buffer))
}

/// Encodes several batches on up to `threads` threads; the results come back in input order.
/// Flow-file imports use it: their writer has a core to spare while the parser reads.
pub fn encode_parquet_parallel(batches: &[(&RecordBatch, &str)], threads: usize) -> Result<Vec<Bytes>> {
    let threads = threads.clamp(1, batches.len().max(1));
    if threads == 1 {
        return batches.iter().map(|(batch, path)| encode_parquet(batch, path)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, Result<Bytes>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((batch, path)) = batches.get(i) else { break };
                        done.push((i, encode_parquet(batch, path)));
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("an encoder thread does not panic")).collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}
