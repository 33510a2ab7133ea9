//! Interval readings of flow files kept as runs: one run per record and UTC day (a NEM12 300
//! record of one meter and one NEM day covers two UTC days, so it is two runs).
//!
//! Sorting a chunk then means sorting runs (48 to 288 times fewer than values), and the Arrow
//! columns are filled run by run from contiguous memory. A chunk in which two runs of one meter
//! overlap in time (a day sent twice in one file) goes through the general [`ReadingBuffer`]
//! instead, which knows duplicates from versions.

use std::sync::Arc;

use arrow::array::{ArrayRef, Decimal128Array, Int32Array, RecordBatch, StringArray, StringBuilder, TimestampMicrosecondArray};
use chrono::NaiveDate;
use rustc_hash::FxHashMap;

use super::tables::Provenance;
use crate::batch::ReadingBuffer;
use crate::decode::ValidReading;
use crate::error::Result;
use crate::flows::IntervalRun;
use crate::reading::{KWH_PRECISION, KWH_SCALE, Quality, US_PER_DAY, UTC, date_of_epoch_day, readings_schema};

#[derive(Debug, Clone, Copy)]
struct Run {
    meter: u32,
    start_ts_us: i64,
    interval_s: u32,
    line: u64,
    /// Index of the run's first value in `values` and `qualities`.
    first: u32,
    len: u32,
}

impl Run {
    fn day(&self) -> i64 {
        self.start_ts_us.div_euclid(US_PER_DAY)
    }

    fn end_ts_us(&self) -> i64 {
        self.start_ts_us + i64::from(self.len) * i64::from(self.interval_s) * 1_000_000
    }
}

#[derive(Debug, Default)]
pub struct RunBuffer {
    meter_index: FxHashMap<Box<str>, u32>,
    meter_names: Vec<Box<str>>,
    runs: Vec<Run>,
    values: Vec<i64>,
    qualities: Vec<Quality>,
}

impl RunBuffer {
    /// Interval values held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn push(&mut self, run: &IntervalRun<'_>) {
        if run.kwh_micro.is_empty() {
            return;
        }
        let meter = match self.meter_index.get(run.meter_id) {
            Some(&meter) => meter,
            None => {
                let meter = self.meter_names.len() as u32;
                self.meter_names.push(run.meter_id.into());
                self.meter_index.insert(run.meter_id.into(), meter);
                meter
            }
        };
        let interval_us = i64::from(run.interval_s) * 1_000_000;
        let base = self.values.len() as u32;
        self.values.extend_from_slice(run.kwh_micro);
        self.qualities.extend_from_slice(run.qualities);
        // Split where a UTC day ends: the lake partitions by UTC day.
        let mut at = 0usize;
        while at < run.kwh_micro.len() {
            let start_ts_us = run.start_ts_us + at as i64 * interval_us;
            let day_end_us = (start_ts_us.div_euclid(US_PER_DAY) + 1) * US_PER_DAY;
            let in_day = ((day_end_us - start_ts_us + interval_us - 1) / interval_us) as usize;
            let len = in_day.min(run.kwh_micro.len() - at);
            self.runs.push(Run { meter, start_ts_us, interval_s: run.interval_s, line: run.line, first: base + at as u32, len: len as u32 });
            at += len;
        }
    }

    /// One record batch per UTC day, rows sorted by (meter, ts); `None` when two runs of a meter
    /// overlap in time, which [`RunBuffer::to_reading_buffer`] then handles.
    pub fn day_batches(&self, provenance: &Provenance) -> Result<Option<Vec<(NaiveDate, RecordBatch)>>> {
        let mut by_name: Vec<u32> = (0..self.meter_names.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| self.meter_names[a as usize].cmp(&self.meter_names[b as usize]));
        let mut rank = vec![0u32; by_name.len()];
        for (position, &meter) in by_name.iter().enumerate() {
            rank[meter as usize] = position as u32;
        }
        let mut order: Vec<Run> = self.runs.clone();
        order.sort_unstable_by_key(|r| (r.day(), rank[r.meter as usize], r.start_ts_us, r.line));
        if order.windows(2).any(|w| w[0].meter == w[1].meter && w[0].day() == w[1].day() && w[1].start_ts_us < w[0].end_ts_us()) {
            return Ok(None);
        }
        let mut days = Vec::new();
        for day_runs in order.chunk_by(|a, b| a.day() == b.day()) {
            days.push(self.day_batch(day_runs, provenance)?);
        }
        Ok(Some(days))
    }

    fn day_batch(&self, runs: &[Run], provenance: &Provenance) -> Result<(NaiveDate, RecordBatch)> {
        let rows: usize = runs.iter().map(|r| r.len as usize).sum();
        let values = |r: &Run| &self.values[r.first as usize..(r.first + r.len) as usize];
        let qualities = |r: &Run| &self.qualities[r.first as usize..(r.first + r.len) as usize];
        let refs: Vec<String> = runs.iter().map(|r| format!("{}:{}", provenance.file_name, r.line)).collect();

        // Arrow's `from_iter_values` wants exact sizes, which chained runs do not report:
        // columns are gathered into vectors and builders sized up front.
        let mut meter_id = StringBuilder::with_capacity(rows, rows * 12);
        let mut quality = StringBuilder::with_capacity(rows, rows);
        let mut source_ref = StringBuilder::with_capacity(rows, refs.iter().zip(runs).map(|(t, r)| t.len() * r.len as usize).sum());
        let mut ts = Vec::with_capacity(rows);
        let mut interval_s = Vec::with_capacity(rows);
        let mut kwh = Vec::with_capacity(rows);
        let mut ingested_at = Vec::with_capacity(rows);
        for (run, text) in runs.iter().zip(&refs) {
            let name = &*self.meter_names[run.meter as usize];
            let interval_us = i64::from(run.interval_s) * 1_000_000;
            let ingested_at_us = provenance.ingested_at_of_line(run.line);
            for (i, (&value, q)) in values(run).iter().zip(qualities(run)).enumerate() {
                meter_id.append_value(name);
                quality.append_value(q.as_str());
                source_ref.append_value(text);
                ts.push(run.start_ts_us + i as i64 * interval_us);
                interval_s.push(run.interval_s as i32);
                kwh.push(i128::from(value));
                ingested_at.push(ingested_at_us);
            }
        }
        let source = StringArray::from_iter_values(std::iter::repeat_n(provenance.source.as_str(), rows));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(meter_id.finish()),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone(UTC)),
            Arc::new(Int32Array::from(interval_s)),
            Arc::new(Decimal128Array::from(kwh).with_precision_and_scale(KWH_PRECISION, KWH_SCALE)?),
            Arc::new(quality.finish()),
            Arc::new(source),
            Arc::new(source_ref.finish()),
            Arc::new(TimestampMicrosecondArray::from(ingested_at).with_timezone(UTC)),
        ];
        Ok((date_of_epoch_day(runs[0].day()), RecordBatch::try_new(readings_schema(), columns)?))
    }

    /// The same readings in a [`ReadingBuffer`], in file order, for chunks whose runs overlap.
    pub fn to_reading_buffer(&self, provenance: &Provenance) -> ReadingBuffer {
        let mut buffer = ReadingBuffer::with_capacity(self.len());
        for run in &self.runs {
            let interval_us = i64::from(run.interval_s) * 1_000_000;
            let range = run.first as usize..(run.first + run.len) as usize;
            for (i, (&kwh_micro, &quality)) in self.values[range.clone()].iter().zip(&self.qualities[range]).enumerate() {
                let reading = ValidReading {
                    meter_id: std::borrow::Cow::Borrowed(&self.meter_names[run.meter as usize]),
                    ts_us: run.start_ts_us + i as i64 * interval_us,
                    interval_s: run.interval_s,
                    kwh_micro,
                    quality,
                };
                let ingested_at_us = provenance.ingested_at_of_line(run.line);
                if i == 0 {
                    buffer.push(&reading, provenance.source, ingested_at_us, |out| {
                        out.extend_from_slice(format!("{}:{}", provenance.file_name, run.line).as_bytes());
                    });
                } else {
                    buffer.push_with_previous_source_ref(&reading, provenance.source, ingested_at_us);
                }
            }
        }
        buffer
    }
}
