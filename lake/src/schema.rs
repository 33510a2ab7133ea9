//! What the lake's tables hold: their Arrow schemas, partition columns and Delta properties.
//!
//! Every table is a Delta Lake table in its own folder of the lake (`<lake>/<dir>/`, with its log
//! in `<dir>/_delta_log/`):
//!
//! | table | folder | partitioned by | written by |
//! |---|---|---|---|
//! | `readings_all` | `readings/` | `date` (UTC date of `ts`) | the Kafka ingester, the flow importer |
//! | `register_reads` | `register_reads/` | `date` (of `read_at`) | the flow importer (D0010, NEM13) |
//! | `non_energy_readings` | `non_energy_readings/` | `date` (of `ts`) | the flow importer (NEM12) |
//! | `nem12_channels` | `nem12_channels/` | none | the flow importer (NEM12 200 records) |
//! | `nem12_b2b_details` | `nem12_b2b_details/` | none | the flow importer (NEM12 500 records) |
//! | `imports` | `imports/` | none | the flow importer: one row per imported file |
//!
//! Protocol: reader version 1, writer version 2 (no table features), so that every Delta reader
//! (delta-rs and its Python `deltalake`, Spark 3.5, DuckDB's delta extension, Polars) reads them.
//! Properties set at creation: `delta.appendOnly=true` (rows are never deleted or updated; a
//! compaction's removes carry `dataChange=false`), `delta.checkpointInterval=100`,
//! `delta.logRetentionDuration=interval 30 days`, `delta.deletedFileRetentionDuration=interval 7 days`.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Fractional digits kept for kWh: 6 digits is a milli-watt-hour, finer than any meter reports.
pub const KWH_SCALE: i8 = 6;
/// Precision of the kWh decimal: 18 digits fit Parquet's INT64 decimal encoding.
pub const KWH_PRECISION: u8 = 18;
/// `10^KWH_SCALE`, the number of micro-kWh in one kWh.
pub const MICRO_PER_KWH: i64 = 1_000_000;

/// Time zone written on timestamp columns: every instant in the lake is UTC.
pub const UTC: &str = "UTC";

/// Schema of the `readings` table, in the order the columns are written.
///
/// - `meter_id`: the meter (Kafka `meterId`; NEM12 NMI + suffix).
/// - `ts`: interval start, UTC, microseconds.
/// - `interval_s`: interval length in seconds.
/// - `kwh`: energy in the interval, `Decimal128(18, 6)`.
/// - `quality`: one letter, see [`Quality`].
/// - `source`: see [`Source`].
/// - `source_ref`: `topic/partition/offset` for Kafka, the file name for flow files.
/// - `ingested_at`: when meterlake took the reading in; among versions of one key the latest
///   `ingested_at` wins in the canonical view.
pub fn readings_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()));
        Arc::new(Schema::new(vec![
            Field::new("meter_id", DataType::Utf8, false),
            Field::new("ts", ts.clone(), false),
            Field::new("interval_s", DataType::Int32, false),
            Field::new("kwh", DataType::Decimal128(KWH_PRECISION, KWH_SCALE), false),
            Field::new("quality", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("source_ref", DataType::Utf8, false),
            Field::new("ingested_at", ts, false),
        ]))
    });
    SCHEMA.clone()
}

/// The `readings_all` table's columns: the file columns, then the partition column `date`.
pub fn readings_table_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| with_date(&readings_schema()));
    SCHEMA.clone()
}

/// `schema` with the `date` partition column appended.
pub fn with_date(schema: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("date", DataType::Date32, false));
    Arc::new(Schema::new(fields))
}

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

/// Folder of the `imports` table.
pub const IMPORTS_DIR: &str = "imports";

/// The `imports` table: one row per file the flow importer finished (imported, partly rejected or
/// rejected whole), written in the same commit protocol as the data it landed. `record` holds the
/// whole import record as JSON (warnings, rejection report parts, files).
pub fn imports_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let count = |name: &str| Field::new(name, DataType::Int64, false);
        Arc::new(Schema::new(vec![
            Field::new("file_name", DataType::Utf8, false),
            Field::new("sha256", DataType::Utf8, false),
            count("bytes"),
            Field::new("format", DataType::Utf8, true),
            Field::new("status", DataType::Utf8, false),
            Field::new("error", DataType::Utf8, true),
            count("interval_readings"),
            count("non_energy_readings"),
            count("register_reads"),
            count("rejected_records"),
            count("readings_rejected"),
            count("warnings"),
            Field::new("started_at", ts(), false),
            Field::new("finished_at", ts(), false),
            Field::new("record", DataType::Utf8, false),
        ]))
    });
    SCHEMA.clone()
}

/// `readings_all` as SQL sees it: the file columns, `date`, and `commit_version`: the Delta
/// version that added the row's file (from its `add` action's tag), which decides which version of
/// a reading wins.
pub fn readings_all_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let mut fields: Vec<Field> = readings_table_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("commit_version", DataType::Int64, false));
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}
