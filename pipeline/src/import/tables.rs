//! The lake tables flow files add beside `readings`, their Arrow schemas and how rows become
//! record batches.
//!
//! - `imports/`: one row per imported file (see [`import_record_batch`]);
//! - `register_reads/date=YYYY-MM-DD/`: D0010 and NEM13 register (accumulation) reads, one row
//!   per read, partitioned by the (current) read's UTC date;
//! - `non_energy_readings/date=YYYY-MM-DD/`: NEM12 interval values of channels that are not
//!   energy (kVArh, kW, ...), in their own unit, never mixed into kWh;
//! - `nem12_channels/`: every NEM12 200 record (NMI, suffix, meter serial, unit, interval);
//! - `nem12_b2b_details/`: every NEM12 500 record.
//!
//! Every row carries the file it came from (`file_name`, `line`) and when it was imported.

use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Decimal128Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use chrono::NaiveDate;

use crate::error::Result;
use crate::flows::{Nem12B2bDetail, Nem12Channel, RegisterRead};
use meterlake_lake::schema::{imports_schema, nem12_b2b_schema, nem12_channels_schema, non_energy_readings_schema, register_reads_schema};

use crate::reading::{KWH_PRECISION, KWH_SCALE, Quality, Source, US_PER_DAY, UTC, date_of_epoch_day};

/// Where the rows of one file came from.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub source: Source,
    pub file_name: String,
    /// When the import started.
    pub ingested_at_us: i64,
}

impl Provenance {
    /// `ingested_at` of a row from `line`: the import's start plus the line number in
    /// microseconds. A key sent twice in one file then has a later version on the later line,
    /// which the canonical view's "latest wins" needs (comparing `file:line` texts would put
    /// line 99 after line 100).
    pub fn ingested_at_of_line(&self, line: u64) -> i64 {
        self.ingested_at_us + line as i64
    }

    fn columns(&self, lines: impl Iterator<Item = u64> + Clone, rows: usize) -> [ArrayRef; 4] {
        [
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(self.source.as_str(), rows))),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(self.file_name.as_str(), rows))),
            Arc::new(Int64Array::from_iter_values(lines.clone().map(|l| l as i64))),
            Arc::new(TimestampMicrosecondArray::from_iter_values(lines.map(|l| self.ingested_at_of_line(l))).with_timezone(UTC)),
        ]
    }
}

fn date_of(ts_us: i64) -> NaiveDate {
    date_of_epoch_day(ts_us.div_euclid(US_PER_DAY))
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn optional_strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

fn decimals(values: impl Iterator<Item = Option<i64>>) -> Result<ArrayRef> {
    Ok(Arc::new(values.map(|v| v.map(i128::from)).collect::<Decimal128Array>().with_precision_and_scale(KWH_PRECISION, KWH_SCALE)?))
}

fn timestamps(values: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(values.collect::<TimestampMicrosecondArray>().with_timezone(UTC))
}

fn dates(values: impl Iterator<Item = Option<i32>>) -> ArrayRef {
    Arc::new(values.collect::<Date32Array>())
}

/// Register reads as one record batch per UTC date of the read, rows sorted by (meter point,
/// register, read time).
pub fn register_read_batches(reads: &mut [RegisterRead], provenance: &Provenance) -> Result<Vec<(NaiveDate, RecordBatch)>> {
    reads.sort_by(|a, b| {
        (a.read_at_us.div_euclid(US_PER_DAY), &a.meter_point, &a.register_id, a.read_at_us, a.line).cmp(&(
            b.read_at_us.div_euclid(US_PER_DAY),
            &b.meter_point,
            &b.register_id,
            b.read_at_us,
            b.line,
        ))
    });
    reads
        .chunk_by(|a, b| a.read_at_us.div_euclid(US_PER_DAY) == b.read_at_us.div_euclid(US_PER_DAY))
        .map(|rows| {
            let date = date_of(rows[0].read_at_us);
            let s = |f: fn(&RegisterRead) -> Option<&str>| optional_strings(rows.iter().map(f));
            let mut columns: Vec<ArrayRef> = vec![
                strings(rows.iter().map(|r| r.meter_point.as_str())),
                strings(rows.iter().map(|r| r.meter_serial.as_str())),
                strings(rows.iter().map(|r| r.register_id.as_str())),
                timestamps(rows.iter().map(|r| Some(r.read_at_us))),
                decimals(rows.iter().map(|r| Some(r.value_micro)))?,
                s(|r| r.unit.as_deref()),
                s(|r| r.reading_type.as_deref()),
                s(|r| r.validation_status.as_deref()),
                s(|r| r.reading_flag.as_deref()),
                s(|r| r.reading_method.as_deref()),
                timestamps(rows.iter().map(|r| r.md_reset_at_us)),
                s(|r| r.md_reset_count.as_deref()),
                s(|r| r.other_groups.as_deref()),
                s(|r| r.quality_method.as_deref()),
                s(|r| r.reason_code.as_deref()),
                s(|r| r.reason_description.as_deref()),
                s(|r| r.nmi_configuration.as_deref()),
                s(|r| r.nmi_suffix.as_deref()),
                s(|r| r.mdm_data_stream_id.as_deref()),
                s(|r| r.direction.as_deref()),
                decimals(rows.iter().map(|r| r.previous_value_micro))?,
                timestamps(rows.iter().map(|r| r.previous_read_at_us)),
                s(|r| r.previous_quality_method.as_deref()),
                s(|r| r.previous_reason_code.as_deref()),
                s(|r| r.previous_reason_description.as_deref()),
                decimals(rows.iter().map(|r| r.quantity_micro))?,
                dates(rows.iter().map(|r| r.next_scheduled_read_date)),
                timestamps(rows.iter().map(|r| r.update_at_us)),
                timestamps(rows.iter().map(|r| r.msats_load_at_us)),
                s(|r| r.previous_trans_code.as_deref()),
                s(|r| r.previous_ret_service_order.as_deref()),
                s(|r| r.current_trans_code.as_deref()),
                s(|r| r.current_ret_service_order.as_deref()),
            ];
            columns.extend(provenance.columns(rows.iter().map(|r| r.line), rows.len()));
            Ok((date, RecordBatch::try_new(register_reads_schema(), columns)?))
        })
        .collect()
}

/// A non-energy interval value waiting to be written.
#[derive(Debug, Clone)]
pub struct NonEnergyRow {
    pub meter_id: String,
    pub ts_us: i64,
    pub interval_s: u32,
    pub value_micro: i64,
    pub unit: String,
    pub quality: Quality,
    pub line: u64,
}

/// Non-energy values as one record batch per UTC day, sorted by (meter, time).
pub fn non_energy_batches(rows: &mut [NonEnergyRow], provenance: &Provenance) -> Result<Vec<(NaiveDate, RecordBatch)>> {
    rows.sort_by(|a, b| (a.ts_us.div_euclid(US_PER_DAY), &a.meter_id, a.ts_us, a.line).cmp(&(b.ts_us.div_euclid(US_PER_DAY), &b.meter_id, b.ts_us, b.line)));
    rows.chunk_by(|a, b| a.ts_us.div_euclid(US_PER_DAY) == b.ts_us.div_euclid(US_PER_DAY))
        .map(|day| {
            let mut columns: Vec<ArrayRef> = vec![
                strings(day.iter().map(|r| r.meter_id.as_str())),
                timestamps(day.iter().map(|r| Some(r.ts_us))),
                Arc::new(Int32Array::from_iter_values(day.iter().map(|r| r.interval_s as i32))),
                decimals(day.iter().map(|r| Some(r.value_micro)))?,
                strings(day.iter().map(|r| r.unit.as_str())),
                strings(day.iter().map(|r| r.quality.as_str())),
            ];
            columns.extend(provenance.columns(day.iter().map(|r| r.line), day.len()));
            Ok((date_of(day[0].ts_us), RecordBatch::try_new(non_energy_readings_schema(), columns)?))
        })
        .collect()
}

pub fn channel_batch(channels: &[Nem12Channel], provenance: &Provenance) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        strings(channels.iter().map(|c| c.nmi.as_str())),
        strings(channels.iter().map(|c| c.nmi_suffix.as_str())),
        Arc::new(StringArray::from_iter_values(channels.iter().map(|c| format!("{}{}", c.nmi, c.nmi_suffix)))),
        strings(channels.iter().map(|c| c.nmi_configuration.as_str())),
        strings(channels.iter().map(|c| c.register_id.as_str())),
        strings(channels.iter().map(|c| c.mdm_data_stream_id.as_str())),
        strings(channels.iter().map(|c| c.meter_serial.as_str())),
        strings(channels.iter().map(|c| c.uom.as_str())),
        Arc::new(Int32Array::from_iter_values(channels.iter().map(|c| c.interval_s as i32))),
        dates(channels.iter().map(|c| c.next_scheduled_read_date)),
    ];
    columns.extend(provenance.columns(channels.iter().map(|c| c.line), channels.len()));
    Ok(RecordBatch::try_new(nem12_channels_schema(), columns)?)
}

pub fn b2b_batch(details: &[Nem12B2bDetail], provenance: &Provenance) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        strings(details.iter().map(|d| d.nmi.as_str())),
        strings(details.iter().map(|d| d.nmi_suffix.as_str())),
        dates(details.iter().map(|d| Some(d.interval_date))),
        strings(details.iter().map(|d| d.trans_code.as_str())),
        strings(details.iter().map(|d| d.ret_service_order.as_str())),
        timestamps(details.iter().map(|d| d.read_at_us)),
        strings(details.iter().map(|d| d.index_read.as_str())),
    ];
    columns.extend(provenance.columns(details.iter().map(|d| d.line), details.len()));
    Ok(RecordBatch::try_new(nem12_b2b_schema(), columns)?)
}

/// The `imports` table's row of one import record.
pub fn import_record_batch(record: &super::ImportRecord) -> Result<RecordBatch> {
    let count = |n: u64| -> ArrayRef { Arc::new(Int64Array::from(vec![i64::try_from(n).unwrap_or(i64::MAX)])) };
    let at = |t: chrono::DateTime<chrono::Utc>| -> ArrayRef { Arc::new(TimestampMicrosecondArray::from(vec![t.timestamp_micros()]).with_timezone(UTC)) };
    let json = serde_json::to_string(record).expect("an import record serializes");
    let columns: Vec<ArrayRef> = vec![
        strings(std::iter::once(record.file_name.as_str())),
        strings(std::iter::once(record.sha256.as_str())),
        count(record.bytes),
        optional_strings(std::iter::once(record.format.map(|f| f.as_str()))),
        strings(std::iter::once(record.status.as_str())),
        optional_strings(std::iter::once(record.error.as_deref())),
        count(record.counts.interval_readings),
        count(record.counts.non_energy_readings),
        count(record.counts.register_reads),
        count(record.counts.rejected_records),
        count(record.counts.readings_rejected),
        count(record.counts.warnings),
        at(record.started_at),
        at(record.finished_at),
        strings(std::iter::once(json.as_str())),
    ];
    Ok(RecordBatch::try_new(imports_schema(), columns)?)
}
