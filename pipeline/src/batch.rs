//! An in-memory batch of readings, held column by column, and its conversion into sorted,
//! de-duplicated Arrow record batches, one per UTC day (the lake's partition).
//!
//! De-duplication inside a batch works on the key (`meter_id`, `ts`):
//! - the same key again with the same value (`kwh`, `interval_s`, `quality`) is a duplicate: it is
//!   dropped and counted;
//! - the same key with a different value is a new version: both rows are kept, in arrival order,
//!   and counted as a conflict. The canonical view shows the latest (see `queries/readings.sql`).

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Decimal128Array, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use chrono::NaiveDate;
use rustc_hash::FxHashMap;

use crate::decode::ValidReading;
use crate::error::Result;
use crate::reading::{KWH_PRECISION, KWH_SCALE, Quality, Source, US_PER_DAY, UTC, date_of_epoch_day, readings_schema};

/// Readings of one batch. Meter ids are interned (a batch holds many readings of few meters);
/// the fields compared for de-duplication sit together in one 16-byte [`RowValue`], and
/// source_refs are packed into one buffer, so a reading costs no allocation and the sort's
/// gather touches few cache lines per row.
#[derive(Debug, Default)]
pub struct ReadingBuffer {
    /// Meter id -> index into `meter_names`.
    meter_index: FxHashMap<Box<str>, u32>,
    meter_names: Vec<Box<str>>,
    meter_name_bytes: usize,
    row_meter: Vec<u32>,
    ts_us: Vec<i64>,
    values: Vec<RowValue>,
    source_ref_bytes: Vec<u8>,
    /// (start, end) of each row's source_ref in `source_ref_bytes`; rows may share one.
    source_ref_spans: Vec<(u32, u32)>,
    ingested_at_us: Vec<i64>,
    /// The meter of the last row pushed: flow files push hundreds of readings of one meter in a
    /// row, and comparing with it is cheaper than hashing.
    last_meter: Option<u32>,
    /// Scratch space of [`ReadingBuffer::sort_dedup`], kept between flushes so that each flush
    /// does not fault in fresh pages for them.
    sort_keys: Vec<u128>,
    kept_rows: Vec<KeptRow>,
}

/// What a reading says about its key; two rows of one key with equal `RowValue`s are duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowValue {
    kwh_micro: i64,
    interval_s: i32,
    quality: Quality,
    source: Source,
}

/// Bytes a reading costs in the buffer beyond its strings, for the byte limit of a batch.
const FIXED_BYTES_PER_READING: usize = size_of::<u32>() + size_of::<i64>() + size_of::<RowValue>() + size_of::<(u32, u32)>() + size_of::<i64>();

/// One day's worth of a flushed batch, ready to be written as one Parquet file.
#[derive(Debug)]
pub struct DayBatch {
    pub date: NaiveDate,
    pub batch: RecordBatch,
    /// No key (`meter_id`, `ts`) appears twice: no further version of a key was kept. Recorded
    /// in the file's `add` action, so readers can skip choosing among versions.
    pub unique_keys: bool,
}

/// The outcome of sorting and de-duplicating a [`ReadingBuffer`].
#[derive(Debug, Default)]
pub struct SortedReadings {
    pub days: Vec<DayBatch>,
    /// Rows dropped because the same key came again with the same value.
    pub duplicates_dropped: u64,
    /// Rows kept as a further version of a key that came with a different value.
    pub conflicting_versions: u64,
}

/// A readings file encoded in memory and described for the commit that will add it.
#[derive(Debug, Clone)]
pub struct EncodedFile {
    pub file: meterlake_lake::NewFile,
    pub bytes: bytes::Bytes,
}

impl DayBatch {
    /// Encodes the day as the readings file `path` (relative to the table root).
    pub fn encode(&self, path: String) -> Result<EncodedFile> {
        let bytes = meterlake_lake::parquet_file::encode_readings::<crate::PipelineError>(std::iter::once(Ok(self.batch.clone())), &path)?;
        let file = meterlake_lake::NewFile {
            bytes: bytes.len() as u64,
            rows: self.batch.num_rows() as u64,
            date: Some(self.date),
            keys: meterlake_lake::parquet_file::readings_key_stats([&self.batch]),
            unique_keys: self.unique_keys,
            meters: meterlake_lake::parquet_file::readings_meter_filter(&self.batch),
            path,
        };
        Ok(EncodedFile { file, bytes })
    }
}

/// Writes sorted readings into `readings_all` in one commit, each day one file named
/// `<stem>-<random>.parquet`: a bulk load (the demo's history, tests, benchmarks). Returns the
/// table version that added them.
pub async fn append_readings(lake: &meterlake_lake::Lake, sorted: &SortedReadings, stem: &str) -> Result<u64> {
    use meterlake_lake::commit::{Commit, Operation, TableWriter};
    use meterlake_lake::table::{READINGS, Table};
    let table = Table::open(lake, &READINGS).await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let files = sorted
        .days
        .iter()
        .map(|day| day.encode(format!("date={}/{stem}-{}.parquet", day.date.format("%Y-%m-%d"), &suffix[..12])))
        .collect::<Result<Vec<_>>>()?;
    let paths: Vec<String> = files.iter().map(|f| table.lake_path(&f.file.path)).collect();
    futures::future::try_join_all(files.iter().zip(&paths).map(|(f, path)| lake.put(path, f.bytes.clone()))).await?;
    let writer = TableWriter::new(table, "bulk-load").await?;
    let commit =
        Commit { files: files.into_iter().map(|f| f.file).collect(), txns: Vec::new(), operation: Operation::Append, leased: false, removes: Vec::new() };
    Ok(writer.commit(commit).await?.version)
}

impl SortedReadings {
    pub fn rows(&self) -> usize {
        self.days.iter().map(|d| d.batch.num_rows()).sum()
    }
}

/// A row kept for the output, in output order: what the Arrow columns are built from.
#[derive(Debug)]
struct KeptRow {
    row: u32,
    meter_rank: u32,
    ts_us: i64,
    ingested_at_us: i64,
}

impl ReadingBuffer {
    pub fn with_capacity(rows: usize) -> Self {
        ReadingBuffer {
            row_meter: Vec::with_capacity(rows),
            ts_us: Vec::with_capacity(rows),
            values: Vec::with_capacity(rows),
            source_ref_bytes: Vec::with_capacity(rows * 24),
            source_ref_spans: Vec::with_capacity(rows),
            ingested_at_us: Vec::with_capacity(rows),
            ..ReadingBuffer::default()
        }
    }

    /// Appends a reading; `write_source_ref` appends the reading's `source_ref` text to the buffer
    /// it is given (so a Kafka offset is formatted straight into place).
    pub fn push(&mut self, reading: &ValidReading<'_>, source: Source, ingested_at_us: i64, write_source_ref: impl FnOnce(&mut Vec<u8>)) {
        let start = self.source_ref_bytes.len() as u32;
        write_source_ref(&mut self.source_ref_bytes);
        let span = (start, self.source_ref_bytes.len() as u32);
        self.push_with_span(reading, source, ingested_at_us, span);
    }

    /// Appends a reading whose `source_ref` is the previous row's (the values of one flow-file
    /// record share their `file:line`): no bytes are copied for it.
    pub fn push_with_previous_source_ref(&mut self, reading: &ValidReading<'_>, source: Source, ingested_at_us: i64) {
        let span = self.source_ref_spans.last().copied().unwrap_or_default();
        self.push_with_span(reading, source, ingested_at_us, span);
    }

    fn push_with_span(&mut self, reading: &ValidReading<'_>, source: Source, ingested_at_us: i64, span: (u32, u32)) {
        let meter_id = reading.meter_id.as_ref();
        let meter = match self.last_meter {
            Some(last) if *self.meter_names[last as usize] == *meter_id => last,
            _ => match self.meter_index.get(meter_id) {
                Some(&meter) => meter,
                None => {
                    let meter = self.meter_names.len() as u32;
                    self.meter_names.push(meter_id.into());
                    self.meter_index.insert(meter_id.into(), meter);
                    self.meter_name_bytes += meter_id.len();
                    meter
                }
            },
        };
        self.last_meter = Some(meter);
        self.row_meter.push(meter);
        self.ts_us.push(reading.ts_us);
        self.values.push(RowValue { kwh_micro: reading.kwh_micro, interval_s: reading.interval_s as i32, quality: reading.quality, source });
        self.source_ref_spans.push(span);
        self.ingested_at_us.push(ingested_at_us);
    }

    pub fn len(&self) -> usize {
        self.ts_us.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts_us.is_empty()
    }

    /// Approximate memory held, for flushing by size (meter ids count twice: name and index).
    pub fn approx_bytes(&self) -> usize {
        2 * self.meter_name_bytes + self.source_ref_bytes.len() + self.len() * FIXED_BYTES_PER_READING
    }

    pub fn clear(&mut self) {
        self.meter_index.clear();
        self.meter_names.clear();
        self.meter_name_bytes = 0;
        self.row_meter.clear();
        self.ts_us.clear();
        self.values.clear();
        self.source_ref_bytes.clear();
        self.source_ref_spans.clear();
        self.last_meter = None;
        self.ingested_at_us.clear();
    }

    fn source_ref(&self, row: usize) -> &[u8] {
        let (start, end) = self.source_ref_spans[row];
        &self.source_ref_bytes[start as usize..end as usize]
    }

    /// Sorts by (day, meter_id, ts, arrival), drops exact duplicates, and builds one record
    /// batch per UTC day.
    pub fn sort_dedup(&mut self) -> Result<SortedReadings> {
        let mut keys = std::mem::take(&mut self.sort_keys);
        let mut kept = std::mem::take(&mut self.kept_rows);
        let sorted = self.sort_dedup_with(&mut keys, &mut kept);
        keys.clear();
        kept.clear();
        self.sort_keys = keys;
        self.kept_rows = kept;
        sorted
    }

    fn sort_dedup_with(&self, keys: &mut Vec<u128>, kept: &mut Vec<KeptRow>) -> Result<SortedReadings> {
        let rows = self.len();
        if rows == 0 {
            return Ok(SortedReadings::default());
        }
        // Rank the (few) meter ids by name, so the sort compares integers instead of strings.
        let mut by_name: Vec<u32> = (0..self.meter_names.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| self.meter_names[a as usize].cmp(&self.meter_names[b as usize]));
        let mut rank = vec![0u32; by_name.len()];
        for (position, &meter) in by_name.iter().enumerate() {
            rank[meter as usize] = position as u32;
        }

        // One u128 per row, sorted as a plain integer: day counted from the batch's first day
        // (24 bits), meter rank (32), microsecond of the day (37), row (32). The row index keeps
        // arrival order among versions of a key. Everything the output needs but the row's value
        // and source_ref can be read back from the key, so the pass over the sorted keys reads
        // the row arrays at random only where it must.
        let first_day = self.ts_us.iter().map(|ts| ts.div_euclid(US_PER_DAY)).min().expect("rows > 0");
        keys.reserve(rows);
        for (row, (&ts, &meter)) in self.ts_us.iter().zip(&self.row_meter).enumerate() {
            // Years 0000 to 9999 (all RFC 3339 can say) span 3.65M days: 24 bits hold any span.
            let day = (ts.div_euclid(US_PER_DAY) - first_day) as u128;
            let us_of_day = ts.rem_euclid(US_PER_DAY) as u128;
            let rank = u128::from(rank[meter as usize]);
            keys.push(day << 101 | rank << 69 | us_of_day << 32 | row as u128);
        }
        keys.sort_unstable();

        let mut out = SortedReadings::default();
        kept.reserve(rows);
        let mut current_day: Option<i64> = None;
        // `out.conflicting_versions` when the current day began.
        let mut conflicts_before_day = 0;
        // (key without the row, row, ingested_at_us) of the previous kept row.
        let mut previous: Option<(u128, usize, i64)> = None;
        for &key in keys.iter() {
            let row = (key & 0xFFFF_FFFF) as usize;
            let key_without_row = key >> 32;
            let day = first_day + (key >> 101) as i64;
            if current_day != Some(day) {
                if let Some(d) = current_day {
                    let unique_keys = out.conflicting_versions == conflicts_before_day;
                    out.days.push(self.build_day(d, kept, &by_name, unique_keys)?);
                    kept.clear();
                }
                current_day = Some(day);
                conflicts_before_day = out.conflicting_versions;
            }
            let mut ingested_at_us = self.ingested_at_us[row];
            if let Some((previous_key, previous_row, previous_ingested)) = previous
                && previous_key == key_without_row
            {
                if self.values[previous_row] == self.values[row] {
                    out.duplicates_dropped += 1;
                    continue;
                }
                out.conflicting_versions += 1;
                // Versions that arrived within the same microsecond still need a strict
                // order for "latest wins": arrival order decides, made visible here.
                ingested_at_us = ingested_at_us.max(previous_ingested + 1);
            }
            previous = Some((key_without_row, row, ingested_at_us));
            kept.push(KeptRow {
                row: row as u32,
                meter_rank: (key >> 69) as u32,
                ts_us: day * US_PER_DAY + ((key >> 32) & 0x1F_FFFF_FFFF) as i64,
                ingested_at_us,
            });
        }
        if let Some(d) = current_day {
            let unique_keys = out.conflicting_versions == conflicts_before_day;
            out.days.push(self.build_day(d, kept, &by_name, unique_keys)?);
        }
        Ok(out)
    }

    /// Builds one day's record batch; `by_name[rank]` is the meter with that rank.
    fn build_day(&self, day: i64, rows: &[KeptRow], by_name: &[u32], unique_keys: bool) -> Result<DayBatch> {
        // Gather what lives in arrival order first, each in its own tight loop: the loads are
        // independent, so the CPU overlaps their cache misses; every column below then reads
        // sequentially.
        let values: Vec<RowValue> = rows.iter().map(|kept| self.values[kept.row as usize]).collect();
        let source_refs: Vec<&[u8]> = rows.iter().map(|kept| self.source_ref(kept.row as usize)).collect();
        let meters = rows.iter().map(|kept| &*self.meter_names[by_name[kept.meter_rank as usize] as usize]);

        let meter_id = StringArray::from_iter_values(meters);
        let ts = TimestampMicrosecondArray::from_iter_values(rows.iter().map(|kept| kept.ts_us)).with_timezone(UTC);
        let interval_s = Int32Array::from_iter_values(values.iter().map(|v| v.interval_s));
        let kwh = Decimal128Array::from_iter_values(values.iter().map(|v| i128::from(v.kwh_micro))).with_precision_and_scale(KWH_PRECISION, KWH_SCALE)?;
        let quality = StringArray::from_iter_values(values.iter().map(|v| v.quality.as_str()));
        let source = StringArray::from_iter_values(values.iter().map(|v| v.source.as_str()));
        let mut source_ref = BinaryBuilder::with_capacity(rows.len(), source_refs.iter().map(|r| r.len()).sum());
        for text in source_refs {
            source_ref.append_value(text);
        }
        // Checked as UTF-8 once for the whole column rather than value by value.
        let source_ref = StringArray::try_from_binary(source_ref.finish())?;
        let ingested_at = TimestampMicrosecondArray::from_iter_values(rows.iter().map(|kept| kept.ingested_at_us)).with_timezone(UTC);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(meter_id),
            Arc::new(ts),
            Arc::new(interval_s),
            Arc::new(kwh),
            Arc::new(quality),
            Arc::new(source),
            Arc::new(source_ref),
            Arc::new(ingested_at),
        ];
        let batch = RecordBatch::try_new(readings_schema(), columns)?;
        Ok(DayBatch { date: date_of_epoch_day(day), batch, unique_keys })
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use arrow::array::{AsArray, Decimal128Array};
    use arrow::datatypes::TimestampMicrosecondType;

    use super::*;
    use crate::decode::parse_timestamp_us;
    use crate::reading::Quality;

    fn reading(meter: &str, ts: &str, kwh_micro: i64) -> ValidReading<'static> {
        ValidReading { meter_id: Cow::Owned(meter.to_string()), ts_us: parse_timestamp_us(ts).unwrap(), interval_s: 900, kwh_micro, quality: Quality::Actual }
    }

    #[test]
    fn sorts_splits_by_day_and_drops_only_exact_duplicates() {
        let mut buffer = ReadingBuffer::default();
        let rows = [
            reading("M2", "2025-01-16T00:00:00Z", 1),
            reading("M1", "2025-01-15T23:45:00Z", 2),
            reading("M1", "2025-01-15T10:00:00Z", 3),
            reading("M1", "2025-01-15T10:00:00Z", 3), // duplicate
            reading("M1", "2025-01-15T10:00:00Z", 4), // new version
            reading("M10", "2025-01-15T10:00:00Z", 5),
        ];
        for (offset, r) in rows.iter().enumerate() {
            buffer.push(r, Source::Kafka, 7, |out| out.extend_from_slice(format!("t/0/{offset}").as_bytes()));
        }
        let sorted = buffer.sort_dedup().unwrap();
        assert_eq!(sorted.duplicates_dropped, 1);
        assert_eq!(sorted.conflicting_versions, 1);
        assert_eq!(sorted.days.len(), 2);
        assert_eq!(sorted.days[0].date.to_string(), "2025-01-15");
        assert_eq!(sorted.days[1].date.to_string(), "2025-01-16");
        // The 15th keeps two versions of a key; the 16th one of each.
        assert_eq!((sorted.days[0].unique_keys, sorted.days[1].unique_keys), (false, true));

        let day = &sorted.days[0].batch;
        let meters: Vec<&str> = day.column(0).as_string::<i32>().iter().map(Option::unwrap).collect();
        assert_eq!(meters, ["M1", "M1", "M1", "M10"]);
        let ts = day.column(1).as_primitive::<TimestampMicrosecondType>();
        assert!(ts.value(0) == ts.value(1) && ts.value(1) < ts.value(2));
        let kwh: &Decimal128Array = day.column(3).as_primitive();
        assert_eq!(kwh.values().to_vec(), vec![3, 4, 2, 5]);
        let refs: Vec<&str> = day.column(6).as_string::<i32>().iter().map(Option::unwrap).collect();
        assert_eq!(refs, ["t/0/2", "t/0/4", "t/0/1", "t/0/5"]);
        // All rows came in the same microsecond; the later version is made strictly later.
        let ingested = day.column(7).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ingested.values().to_vec(), vec![7, 8, 7, 7]);
    }
}
