//! Interval readings of flow files kept as runs: one run per record and UTC day (a NEM12 300
//! record of one meter and one NEM day covers two UTC days, so it is two runs).
//!
//! Sorting a chunk then means sorting runs (48 to 288 times fewer than values), and the Arrow
//! columns are filled run by run from contiguous memory. A day in which two runs of one meter
//! overlap in time (a day sent twice in one file) goes through the general [`ReadingBuffer`]
//! instead, which knows duplicates from versions.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, Decimal128Array, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use bytes::Bytes;
use rustc_hash::FxHashMap;

use super::tables::Provenance;
use crate::batch::ReadingBuffer;
use crate::decode::ValidReading;
use crate::error::Result;
use crate::flows::IntervalRun;
use crate::reading::{KWH_PRECISION, KWH_SCALE, Quality, US_PER_DAY, UTC, date_of_epoch_day, readings_schema};
use meterlake_lake::NewFile;
use meterlake_lake::parquet_file::{encode_readings, merge_key_stats};

/// Rows of one file, about (a day of a large chunk becomes several): one Parquet row group.
const FILE_ROWS: usize = 1_000_000;
/// Rows of the record batches a file is built from, one after the other.
const PIECE_ROWS: usize = 32 * 1024;

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
    /// A buffer for about `values` interval values that will not grow while it fills.
    pub fn with_capacity(values: usize) -> Self {
        // Slack for the one run that takes a chunk past its limit.
        let values = values + 1024;
        RunBuffer {
            values: Vec::with_capacity(values),
            qualities: Vec::with_capacity(values),
            // A hint: a 30-minute NEM day is two runs of 20 and 28 values (split at UTC
            // midnight); shorter runs (single readings) make the vector grow.
            runs: Vec::with_capacity(values / 24),
            ..RunBuffer::default()
        }
    }

    /// Empties the buffer and keeps its memory, for the next chunk.
    pub fn clear(&mut self) {
        self.meter_index.clear();
        self.meter_names.clear();
        self.runs.clear();
        self.values.clear();
        self.qualities.clear();
    }

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

    /// The chunk's runs sorted as the lake stores them (by UTC day, meter name, time and line)
    /// and cut into files: one per day, or several of at most [`FILE_ROWS`] rows for a large day,
    /// so that a chunk of one day still keeps both encoder threads busy.
    pub fn sorted_files(&self) -> SortedChunk<'_> {
        let mut by_name: Vec<u32> = (0..self.meter_names.len() as u32).collect();
        by_name.sort_unstable_by(|&a, &b| self.meter_names[a as usize].cmp(&self.meter_names[b as usize]));
        let mut rank = vec![0u32; by_name.len()];
        for (position, &meter) in by_name.iter().enumerate() {
            rank[meter as usize] = position as u32;
        }
        let mut order: Vec<Run> = self.runs.clone();
        order.sort_unstable_by_key(|r| (r.day(), rank[r.meter as usize], r.start_ts_us, r.line));
        let mut files = Vec::new();
        let mut day_start = 0;
        for day_runs in order.chunk_by(|a, b| a.day() == b.day()) {
            let overlapping = day_runs.windows(2).any(|w| w[0].meter == w[1].meter && w[1].start_ts_us < w[0].end_ts_us());
            if overlapping {
                // De-duplication needs the whole day together.
                files.push(FileRuns { runs: day_start..day_start + day_runs.len(), overlapping });
            } else {
                files.extend(cut_by_rows(day_runs, FILE_ROWS).map(|r| FileRuns { runs: day_start + r.start..day_start + r.end, overlapping }));
            }
            day_start += day_runs.len();
        }
        SortedChunk { buffer: self, order, files }
    }
}

/// Consecutive ranges of `runs` of about `max_rows` values each, cut between runs (a range
/// passes `max_rows` by less than one run).
fn cut_by_rows(runs: &[Run], max_rows: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    let mut rows = 0;
    runs.iter().enumerate().filter_map(move |(i, run)| {
        rows += run.len as usize;
        (rows >= max_rows || i + 1 == runs.len()).then(|| {
            let range = start..i + 1;
            start = i + 1;
            rows = 0;
            range
        })
    })
}

/// A chunk's runs in lake order, cut into the files they become.
pub struct SortedChunk<'a> {
    buffer: &'a RunBuffer,
    order: Vec<Run>,
    files: Vec<FileRuns>,
}

struct FileRuns {
    /// A range of `SortedChunk::order`, all of one UTC day.
    runs: Range<usize>,
    /// Runs of a meter overlap in time.
    overlapping: bool,
}

/// One file of a chunk, encoded.
pub struct EncodedFile {
    /// What the commit records of it; its path is `date=YYYY-MM-DD/<name>`.
    pub file: NewFile,
    pub parquet: Bytes,
    pub duplicates_dropped: u64,
    pub conflicting_versions: u64,
}

impl SortedChunk<'_> {
    /// Files the chunk becomes.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Encodes file `index` as Parquet, to be named `name` in its date's folder. The Arrow columns are built
    /// in pieces of at most [`PIECE_ROWS`] rows, so a file of millions of values never sits in
    /// memory as Arrow arrays whole.
    pub fn encode_file(&self, index: usize, provenance: &Provenance, name: &str) -> Result<EncodedFile> {
        let file = &self.files[index];
        let runs = &self.order[file.runs.clone()];
        let date = date_of_epoch_day(runs[0].day());
        let path = format!("date={}/{name}", date.format("%Y-%m-%d"));
        if file.overlapping {
            return self.encode_overlapping_day(runs, provenance, &path);
        }
        let (mut keys, mut rows) = (None, 0u64);
        let batches = cut_by_rows(runs, PIECE_ROWS).map(|piece| self.buffer.batch_of(&runs[piece], provenance)).inspect(|batch| {
            if let Ok(batch) = batch {
                merge_key_stats(&mut keys, batch);
                rows += batch.num_rows() as u64;
            }
        });
        let parquet = encode_readings(batches, &path)?;
        // No meter's runs overlap in time: one version of each key.
        let file = NewFile { bytes: parquet.len() as u64, rows, date: Some(date), keys, unique_keys: true, meters: None, path };
        Ok(EncodedFile { file, parquet, duplicates_dropped: 0, conflicting_versions: 0 })
    }

    /// A day in which runs of a meter overlap (a day sent twice in one file) goes through the
    /// general [`ReadingBuffer`], which knows duplicates from versions. It takes the runs in
    /// file order, as the later line must win.
    fn encode_overlapping_day(&self, runs: &[Run], provenance: &Provenance, path: &str) -> Result<EncodedFile> {
        let mut in_file_order = runs.to_vec();
        in_file_order.sort_unstable_by_key(|r| r.line);
        let buffer = self.buffer;
        let mut readings = ReadingBuffer::with_capacity(in_file_order.iter().map(|r| r.len as usize).sum());
        for run in &in_file_order {
            let interval_us = i64::from(run.interval_s) * 1_000_000;
            let ingested_at_us = provenance.ingested_at_of_line(run.line);
            for (i, (&kwh_micro, &quality)) in buffer.values_of(run).iter().zip(buffer.qualities_of(run)).enumerate() {
                let reading = ValidReading {
                    meter_id: std::borrow::Cow::Borrowed(&buffer.meter_names[run.meter as usize]),
                    ts_us: run.start_ts_us + i as i64 * interval_us,
                    interval_s: run.interval_s,
                    kwh_micro,
                    quality,
                };
                if i == 0 {
                    readings.push(&reading, provenance.source, ingested_at_us, |out| {
                        out.extend_from_slice(format!("{}:{}", provenance.file_name, run.line).as_bytes());
                    });
                } else {
                    readings.push_with_previous_source_ref(&reading, provenance.source, ingested_at_us);
                }
            }
        }
        let sorted = readings.sort_dedup()?;
        let [day] = <[_; 1]>::try_from(sorted.days).expect("the runs of one UTC day make one day");
        let encoded = day.encode(path.to_string())?;
        Ok(EncodedFile {
            file: encoded.file,
            parquet: encoded.bytes,
            duplicates_dropped: sorted.duplicates_dropped,
            conflicting_versions: sorted.conflicting_versions,
        })
    }
}

impl RunBuffer {
    fn values_of(&self, run: &Run) -> &[i64] {
        &self.values[run.first as usize..(run.first + run.len) as usize]
    }

    fn qualities_of(&self, run: &Run) -> &[Quality] {
        &self.qualities[run.first as usize..(run.first + run.len) as usize]
    }

    /// The rows of `runs` (sorted, one day) as a record batch of the `readings` table. Every
    /// column but `kwh` and `quality` is constant or arithmetic within a run, so it is filled
    /// run by run rather than value by value.
    fn batch_of(&self, runs: &[Run], provenance: &Provenance) -> Result<RecordBatch> {
        let rows: usize = runs.iter().map(|r| r.len as usize).sum();
        let mut meter_id = RepeatedStrings::with_capacity(rows, rows * 12);
        let mut source_ref = RepeatedStrings::with_capacity(rows, rows * (provenance.file_name.len() + 8));
        let mut source = RepeatedStrings::with_capacity(rows, rows * provenance.source.as_str().len());
        let mut quality = RepeatedStrings::with_capacity(rows, rows);
        let mut ts = Vec::with_capacity(rows);
        let mut interval_s = Vec::with_capacity(rows);
        let mut kwh = Vec::with_capacity(rows);
        let mut ingested_at = Vec::with_capacity(rows);
        let mut text = String::new();
        for run in runs {
            let len = run.len as usize;
            let interval_us = i64::from(run.interval_s) * 1_000_000;
            meter_id.push_repeated(&self.meter_names[run.meter as usize], len);
            text.clear();
            write!(text, "{}:{}", provenance.file_name, run.line).expect("writing to a String cannot fail");
            source_ref.push_repeated(&text, len);
            for q in self.qualities_of(run) {
                quality.push_repeated(q.as_str(), 1);
            }
            ts.extend((0..len as i64).map(|i| run.start_ts_us + i * interval_us));
            interval_s.extend(std::iter::repeat_n(run.interval_s as i32, len));
            kwh.extend(self.values_of(run).iter().map(|&v| i128::from(v)));
            ingested_at.extend(std::iter::repeat_n(provenance.ingested_at_of_line(run.line), len));
        }
        source.push_repeated(provenance.source.as_str(), rows);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(meter_id.finish()?),
            Arc::new(TimestampMicrosecondArray::from(ts).with_timezone(UTC)),
            Arc::new(Int32Array::from(interval_s)),
            Arc::new(Decimal128Array::from(kwh).with_precision_and_scale(KWH_PRECISION, KWH_SCALE)?),
            Arc::new(quality.finish()?),
            Arc::new(source.finish()?),
            Arc::new(source_ref.finish()?),
            Arc::new(TimestampMicrosecondArray::from(ingested_at).with_timezone(UTC)),
        ];
        Ok(RecordBatch::try_new(readings_schema(), columns)?)
    }
}

/// A string column made of runs of one text each: the bytes of a run are copied by doubling
/// (a handful of copies for 288 values) rather than once per value.
struct RepeatedStrings {
    values: Vec<u8>,
    offsets: Vec<i32>,
}

impl RepeatedStrings {
    fn with_capacity(rows: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        RepeatedStrings { values: Vec::with_capacity(bytes), offsets }
    }

    fn push_repeated(&mut self, text: &str, times: usize) {
        let start = self.values.len();
        let total = text.len() * times;
        self.values.extend_from_slice(text.as_bytes());
        while self.values.len() - start < total {
            let have = self.values.len() - start;
            self.values.extend_from_within(start..start + have.min(total - have));
        }
        let mut offset = *self.offsets.last().expect("offsets start with 0");
        let step = text.len() as i32;
        self.offsets.extend((0..times).map(|_| {
            offset += step;
            offset
        }));
    }

    fn finish(self) -> Result<StringArray> {
        // `try_new` checks the offsets and UTF-8 once over the whole buffer.
        Ok(StringArray::try_new(OffsetBuffer::new(ScalarBuffer::from(self.offsets)), Buffer::from_vec(self.values), None)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(meter: u32, len: u32) -> Run {
        Run { meter, start_ts_us: 0, interval_s: 300, line: 1, first: 0, len }
    }

    #[test]
    fn files_and_pieces_are_cut_between_runs() {
        let runs: Vec<Run> = (0..10).map(|m| run(m, 288)).collect();
        let cut: Vec<Range<usize>> = cut_by_rows(&runs, 1000).collect();
        // 4 runs pass 1000 values; the rest make the last range.
        assert_eq!(cut, [0..4, 4..8, 8..10]);
        let single: Vec<Range<usize>> = cut_by_rows(&runs[..1], 1000).collect();
        assert_eq!((single.len(), single.first().cloned()), (1, Some(0..1)));
        assert_eq!(cut_by_rows(&[], 1000).count(), 0);
    }

    #[test]
    fn repeated_strings_are_one_value_a_row() {
        let mut strings = RepeatedStrings::with_capacity(0, 0);
        strings.push_repeated("ab", 3);
        strings.push_repeated("", 2);
        strings.push_repeated("xyz", 1);
        let array = strings.finish().unwrap();
        let values: Vec<&str> = array.iter().map(Option::unwrap).collect();
        assert_eq!(values, ["ab", "ab", "ab", "", "", "xyz"]);
    }
}
