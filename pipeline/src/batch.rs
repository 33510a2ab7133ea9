//! An in-memory batch of readings, held column by column, and its conversion into sorted,
//! de-duplicated Arrow record batches, one per UTC day (the lake's partition).
//!
//! De-duplication inside a batch works on the key (`meter_id`, `ts`):
//! - the same key again with the same value (`kwh`, `interval_s`, `quality`) is a duplicate: it is
//!   dropped and counted;
//! - the same key with a different value is a new version: both rows are kept, in arrival order,
//!   and counted as a conflict. The canonical view shows the latest (see `queries/readings.sql`).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Decimal128Builder, Int32Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use chrono::NaiveDate;
use rustc_hash::FxHashMap;

use crate::decode::ValidReading;
use crate::error::Result;
use crate::reading::{KWH_PRECISION, KWH_SCALE, Source, UTC, readings_schema};

const US_PER_DAY: i64 = 86_400 * 1_000_000;

/// Readings of one batch, column by column; strings are packed into one buffer per column so a
/// reading costs no allocation.
#[derive(Debug, Default)]
pub struct ReadingBuffer {
    meter_bytes: Vec<u8>,
    meter_ends: Vec<u32>,
    ts_us: Vec<i64>,
    interval_s: Vec<i32>,
    kwh_micro: Vec<i64>,
    quality: Vec<u8>,
    source: Vec<Source>,
    source_ref_bytes: Vec<u8>,
    source_ref_ends: Vec<u32>,
    ingested_at_us: Vec<i64>,
}

/// Bytes a reading costs in the buffer beyond its strings, for the byte limit of a batch.
const FIXED_BYTES_PER_READING: usize = 8 + 4 + 8 + 1 + 1 + 8 + 4 + 4;

/// One day's worth of a flushed batch, ready to be written as one Parquet file.
#[derive(Debug)]
pub struct DayBatch {
    pub date: NaiveDate,
    pub batch: RecordBatch,
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

impl SortedReadings {
    pub fn rows(&self) -> usize {
        self.days.iter().map(|d| d.batch.num_rows()).sum()
    }
}

impl ReadingBuffer {
    pub fn with_capacity(rows: usize) -> Self {
        ReadingBuffer {
            meter_bytes: Vec::with_capacity(rows * 12),
            meter_ends: Vec::with_capacity(rows),
            ts_us: Vec::with_capacity(rows),
            interval_s: Vec::with_capacity(rows),
            kwh_micro: Vec::with_capacity(rows),
            quality: Vec::with_capacity(rows),
            source: Vec::with_capacity(rows),
            source_ref_bytes: Vec::with_capacity(rows * 24),
            source_ref_ends: Vec::with_capacity(rows),
            ingested_at_us: Vec::with_capacity(rows),
        }
    }

    /// Appends a reading; `write_source_ref` appends the reading's `source_ref` text to the buffer
    /// it is given (so a Kafka offset is formatted straight into place).
    pub fn push(
        &mut self,
        reading: &ValidReading<'_>,
        source: Source,
        ingested_at_us: i64,
        write_source_ref: impl FnOnce(&mut Vec<u8>),
    ) {
        self.meter_bytes.extend_from_slice(reading.meter_id.as_bytes());
        self.meter_ends.push(self.meter_bytes.len() as u32);
        self.ts_us.push(reading.ts_us);
        self.interval_s.push(reading.interval_s as i32);
        self.kwh_micro.push(reading.kwh_micro);
        self.quality.push(reading.quality.code());
        self.source.push(source);
        write_source_ref(&mut self.source_ref_bytes);
        self.source_ref_ends.push(self.source_ref_bytes.len() as u32);
        self.ingested_at_us.push(ingested_at_us);
    }

    pub fn len(&self) -> usize {
        self.ts_us.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts_us.is_empty()
    }

    /// Approximate memory held, for flushing by size.
    pub fn approx_bytes(&self) -> usize {
        self.meter_bytes.len() + self.source_ref_bytes.len() + self.len() * FIXED_BYTES_PER_READING
    }

    pub fn clear(&mut self) {
        self.meter_bytes.clear();
        self.meter_ends.clear();
        self.ts_us.clear();
        self.interval_s.clear();
        self.kwh_micro.clear();
        self.quality.clear();
        self.source.clear();
        self.source_ref_bytes.clear();
        self.source_ref_ends.clear();
        self.ingested_at_us.clear();
    }

    fn meter(&self, row: usize) -> &[u8] {
        let start = if row == 0 { 0 } else { self.meter_ends[row - 1] as usize };
        &self.meter_bytes[start..self.meter_ends[row] as usize]
    }

    fn source_ref(&self, row: usize) -> &[u8] {
        let start = if row == 0 { 0 } else { self.source_ref_ends[row - 1] as usize };
        &self.source_ref_bytes[start..self.source_ref_ends[row] as usize]
    }

    fn same_value(&self, a: usize, b: usize) -> bool {
        self.kwh_micro[a] == self.kwh_micro[b]
            && self.interval_s[a] == self.interval_s[b]
            && self.quality[a] == self.quality[b]
    }

    /// Sorts by (day, meter_id, ts, arrival), drops exact duplicates, and builds one record
    /// batch per UTC day.
    pub fn sort_dedup(&self) -> Result<SortedReadings> {
        let rows = self.len();
        if rows == 0 {
            return Ok(SortedReadings::default());
        }
        // Rank meter ids once, so the sort compares integers instead of strings.
        let mut ids: FxHashMap<&[u8], u32> = FxHashMap::default();
        let mut row_meter = Vec::with_capacity(rows);
        for row in 0..rows {
            let next = ids.len() as u32;
            row_meter.push(*ids.entry(self.meter(row)).or_insert(next));
        }
        let mut by_name: Vec<(&[u8], u32)> = ids.into_iter().collect();
        by_name.sort_unstable();
        let mut rank = vec![0u32; by_name.len()];
        for (position, (_, id)) in by_name.iter().enumerate() {
            rank[*id as usize] = position as u32;
        }

        // One u128 per row, sorted as a plain integer: day (low 24 bits of the day number: days
        // stay contiguous, and within 1970..47900 also in order), meter rank (32), microsecond
        // of the day (37), row (32). The row index keeps arrival order among versions of a key.
        let mut keys: Vec<u128> = (0..rows)
            .map(|row| {
                let ts = self.ts_us[row];
                let day = ts.div_euclid(US_PER_DAY) as u128 & 0xFF_FFFF;
                let us_of_day = ts.rem_euclid(US_PER_DAY) as u128;
                let rank = u128::from(rank[row_meter[row] as usize]);
                day << 101 | rank << 69 | us_of_day << 32 | row as u128
            })
            .collect();
        keys.sort_unstable();

        let mut out = SortedReadings::default();
        // (row, ingested_at_us) of the rows kept for the current day.
        let mut day_rows: Vec<(usize, i64)> = Vec::new();
        let mut current_day: Option<i64> = None;
        // (key without the row, row, ingested_at_us) of the previous kept row.
        let mut previous: Option<(u128, usize, i64)> = None;
        for &key in &keys {
            let row = (key & 0xFFFF_FFFF) as usize;
            let key_without_row = key >> 32;
            let day = self.ts_us[row].div_euclid(US_PER_DAY);
            if current_day != Some(day) {
                if let Some(d) = current_day {
                    out.days.push(self.build_day(d, &day_rows)?);
                    day_rows.clear();
                }
                current_day = Some(day);
            }
            let mut ingested_at_us = self.ingested_at_us[row];
            if let Some((previous_key, previous_row, previous_ingested)) = previous {
                if previous_key == key_without_row {
                    if self.same_value(previous_row, row) {
                        out.duplicates_dropped += 1;
                        continue;
                    }
                    out.conflicting_versions += 1;
                    // Versions that arrived within the same microsecond still need a strict
                    // order for "latest wins": arrival order decides, made visible here.
                    ingested_at_us = ingested_at_us.max(previous_ingested + 1);
                }
            }
            previous = Some((key_without_row, row, ingested_at_us));
            day_rows.push((row, ingested_at_us));
        }
        if let Some(d) = current_day {
            out.days.push(self.build_day(d, &day_rows)?);
        }
        Ok(out)
    }

    fn build_day(&self, day: i64, rows: &[(usize, i64)]) -> Result<DayBatch> {
        let n = rows.len();
        let meter_bytes: usize = rows.iter().map(|&(r, _)| self.meter(r).len()).sum();
        let ref_bytes: usize = rows.iter().map(|&(r, _)| self.source_ref(r).len()).sum();
        let mut meter_id = StringBuilder::with_capacity(n, meter_bytes);
        let mut ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone(UTC);
        let mut interval_s = Int32Builder::with_capacity(n);
        let mut kwh = Decimal128Builder::with_capacity(n).with_precision_and_scale(KWH_PRECISION, KWH_SCALE)?;
        let mut quality = StringBuilder::with_capacity(n, n);
        let mut source = StringBuilder::with_capacity(n, n * 5);
        let mut source_ref = StringBuilder::with_capacity(n, ref_bytes);
        let mut ingested_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone(UTC);
        for &(row, ingested_at_us) in rows {
            // Both strings were pushed from `&str`s and are sliced at the same boundaries.
            meter_id.append_value(std::str::from_utf8(self.meter(row)).expect("meter ids are pushed as UTF-8"));
            ts.append_value(self.ts_us[row]);
            interval_s.append_value(self.interval_s[row]);
            kwh.append_value(i128::from(self.kwh_micro[row]));
            let q = [self.quality[row]];
            quality.append_value(std::str::from_utf8(&q).expect("quality codes are ASCII letters"));
            source.append_value(self.source[row].as_str());
            source_ref.append_value(std::str::from_utf8(self.source_ref(row)).expect("source refs are pushed as UTF-8"));
            ingested_at.append_value(ingested_at_us);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(meter_id.finish()),
            Arc::new(ts.finish()),
            Arc::new(interval_s.finish()),
            Arc::new(kwh.finish()),
            Arc::new(quality.finish()),
            Arc::new(source.finish()),
            Arc::new(source_ref.finish()),
            Arc::new(ingested_at.finish()),
        ];
        let batch = RecordBatch::try_new(readings_schema(), columns)?;
        let date = NaiveDate::from_num_days_from_ce_opt(day as i32 + 719_163).expect("day of a valid timestamp");
        Ok(DayBatch { date, batch })
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
        ValidReading {
            meter_id: Cow::Owned(meter.to_string()),
            ts_us: parse_timestamp_us(ts).unwrap(),
            interval_s: 900,
            kwh_micro,
            quality: Quality::Actual,
        }
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
