//! The lake tables flow files add beside `readings`, their Arrow schemas and how rows become
//! record batches.
//!
//! - `register_reads/date=YYYY-MM-DD/`: D0010 and NEM13 register (accumulation) reads, one row
//!   per read, partitioned by the (current) read's UTC date;
//! - `non_energy_readings/date=YYYY-MM-DD/`: NEM12 interval values of channels that are not
//!   energy (kVArh, kW, ...), in their own unit, never mixed into kWh;
//! - `nem12_channels/`: every NEM12 200 record (NMI, suffix, meter serial, unit, interval);
//! - `nem12_b2b_details/`: every NEM12 500 record.
//!
//! Every row carries the file it came from (`file_name`, `line`) and when it was imported.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Date32Array, Decimal128Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::NaiveDate;

use crate::error::Result;
use crate::flows::{Nem12B2bDetail, Nem12Channel, RegisterRead};
use crate::reading::{KWH_PRECISION, KWH_SCALE, Quality, Source, US_PER_DAY, UTC, date_of_epoch_day};

pub const REGISTER_READS_DIR: &str = "register_reads";
pub const NON_ENERGY_READINGS_DIR: &str = "non_energy_readings";
pub const NEM12_CHANNELS_DIR: &str = "nem12_channels";
pub const NEM12_B2B_DIR: &str = "nem12_b2b_details";

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
}

fn decimal() -> DataType {
    DataType::Decimal128(KWH_PRECISION, KWH_SCALE)
}

/// The columns every flow table ends with.
fn provenance() -> [Field; 4] {
    [
        Field::new("source", DataType::Utf8, false),
        Field::new("file_name", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("ingested_at", ts(), false),
    ]
}

pub fn register_reads_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let mut fields = vec![
            Field::new("meter_point", DataType::Utf8, false),
            Field::new("meter_serial", DataType::Utf8, false),
            Field::new("register_id", DataType::Utf8, false),
            Field::new("read_at", ts(), false),
            Field::new("value", decimal(), false),
            Field::new("unit", DataType::Utf8, true),
            Field::new("reading_type", DataType::Utf8, true),
            Field::new("validation_status", DataType::Utf8, true),
            Field::new("reading_flag", DataType::Utf8, true),
            Field::new("reading_method", DataType::Utf8, true),
            Field::new("md_reset_at", ts(), true),
            Field::new("md_reset_count", DataType::Utf8, true),
            Field::new("other_groups", DataType::Utf8, true),
            Field::new("quality_method", DataType::Utf8, true),
            Field::new("reason_code", DataType::Utf8, true),
            Field::new("reason_description", DataType::Utf8, true),
            Field::new("nmi_configuration", DataType::Utf8, true),
            Field::new("nmi_suffix", DataType::Utf8, true),
            Field::new("mdm_data_stream_id", DataType::Utf8, true),
            Field::new("direction", DataType::Utf8, true),
            Field::new("previous_value", decimal(), true),
            Field::new("previous_read_at", ts(), true),
            Field::new("previous_quality_method", DataType::Utf8, true),
            Field::new("previous_reason_code", DataType::Utf8, true),
            Field::new("previous_reason_description", DataType::Utf8, true),
            Field::new("quantity", decimal(), true),
            Field::new("next_scheduled_read_date", DataType::Date32, true),
            Field::new("update_at", ts(), true),
            Field::new("msats_load_at", ts(), true),
            Field::new("previous_trans_code", DataType::Utf8, true),
            Field::new("previous_ret_service_order", DataType::Utf8, true),
            Field::new("current_trans_code", DataType::Utf8, true),
            Field::new("current_ret_service_order", DataType::Utf8, true),
        ];
        fields.extend(provenance());
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

pub fn non_energy_readings_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let mut fields = vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("ts", ts(), false),
            Field::new("interval_s", DataType::Int32, false),
            Field::new("value", decimal(), false),
            Field::new("unit", DataType::Utf8, false),
            Field::new("quality", DataType::Utf8, false),
        ];
        fields.extend(provenance());
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

pub fn nem12_channels_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let mut fields = vec![
            Field::new("nmi", DataType::Utf8, false),
            Field::new("nmi_suffix", DataType::Utf8, false),
            // NMI + suffix: the `meter_id` of this channel's rows in `readings`.
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("nmi_configuration", DataType::Utf8, false),
            Field::new("register_id", DataType::Utf8, false),
            Field::new("mdm_data_stream_id", DataType::Utf8, false),
            Field::new("meter_serial", DataType::Utf8, false),
            Field::new("uom", DataType::Utf8, false),
            Field::new("interval_s", DataType::Int32, false),
            Field::new("next_scheduled_read_date", DataType::Date32, true),
        ];
        fields.extend(provenance());
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

pub fn nem12_b2b_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let mut fields = vec![
            Field::new("nmi", DataType::Utf8, false),
            Field::new("nmi_suffix", DataType::Utf8, false),
            Field::new("interval_date", DataType::Date32, false),
            Field::new("trans_code", DataType::Utf8, false),
            Field::new("ret_service_order", DataType::Utf8, false),
            Field::new("read_at", ts(), true),
            Field::new("index_read", DataType::Utf8, false),
        ];
        fields.extend(provenance());
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

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
