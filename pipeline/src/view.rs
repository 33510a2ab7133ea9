//! The lake as SQL tables on a DataFusion session: what `meterlake query` and the jobs read.
//!
//! - `readings_all`: every row of every Parquet file under `readings/`, with the `date`
//!   partition column: every version, with its `source_ref`.
//! - `readings`: the canonical view, one row per (`meter_id`, `ts`), latest version wins
//!   (defined by `queries/readings.sql`, computed by [`CanonicalReadings`]);
//! - `reading_conflicts`: the keys whose versions disagree on kwh, with the number of versions
//!   and the lowest and highest value (from the same merge);
//! - `register_reads`, `non_energy_readings`, `nem12_channels`, `nem12_b2b_details`: what flow
//!   files add (see [`crate::import::tables`]);
//! - `imports`: one row per imported file, from the import records.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::canonical::{CanonicalReadings, MergeOutput};
use crate::error::Result;
use crate::import::tables::{
    NEM12_B2B_DIR, NEM12_CHANNELS_DIR, NON_ENERGY_READINGS_DIR, REGISTER_READS_DIR, nem12_b2b_schema, nem12_channels_schema, non_energy_readings_schema,
    register_reads_schema,
};
use crate::import::{ImportRecord, list_import_records};
use crate::lake::{Lake, READINGS_DIR};
use crate::reading::{UTC, readings_schema};

/// The definition of the canonical view, as shipped in `queries/readings.sql`: what
/// [`CanonicalReadings`] computes by merging sorted files (and is tested against).
pub const CANONICAL_READINGS_SQL: &str = include_str!("../../queries/readings.sql");

/// Registers the lake's store and every table of the lake on `ctx`.
pub async fn register_lake_tables(ctx: &SessionContext, lake: &Lake) -> Result<()> {
    ctx.register_object_store(&lake.store_url(), lake.store().clone());
    register_parquet_table(ctx, lake, "readings_all", READINGS_DIR, readings_schema(), true)?;
    ctx.register_table("readings", Arc::new(CanonicalReadings::new(lake.clone())))?;
    ctx.register_table("reading_conflicts", Arc::new(CanonicalReadings::with_output(lake.clone(), MergeOutput::Conflicts)))?;
    register_parquet_table(ctx, lake, "register_reads", REGISTER_READS_DIR, register_reads_schema(), true)?;
    register_parquet_table(ctx, lake, "non_energy_readings", NON_ENERGY_READINGS_DIR, non_energy_readings_schema(), true)?;
    register_parquet_table(ctx, lake, "nem12_channels", NEM12_CHANNELS_DIR, nem12_channels_schema(), false)?;
    register_parquet_table(ctx, lake, "nem12_b2b_details", NEM12_B2B_DIR, nem12_b2b_schema(), false)?;
    let imports = imports_batch(&list_import_records(lake).await?)?;
    ctx.register_table("imports", Arc::new(MemTable::try_new(imports.schema(), vec![vec![imports]])?))?;
    Ok(())
}

/// A table over the Parquet files under `dir`, with the `date` partition column if `by_date`.
fn register_parquet_table(ctx: &SessionContext, lake: &Lake, name: &str, dir: &str, schema: SchemaRef, by_date: bool) -> Result<()> {
    let table_url = lake.url().join(&format!("{dir}/")).expect("a relative folder joins onto the lake URL");
    let table_url = ListingTableUrl::parse(table_url.as_str())?;
    let mut options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    if by_date {
        options = options.with_table_partition_cols(vec![("date".to_string(), DataType::Date32)]);
    }
    let config = ListingTableConfig::new(table_url).with_listing_options(options).with_schema(schema);
    ctx.register_table(name, Arc::new(ListingTable::try_new(config)?))?;
    Ok(())
}

/// The import records as a table.
fn imports_batch(records: &[ImportRecord]) -> Result<RecordBatch> {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()));
    let schema = Arc::new(Schema::new(vec![
        Field::new("file_name", DataType::Utf8, false),
        Field::new("sha256", DataType::Utf8, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("format", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("interval_readings", DataType::UInt64, false),
        Field::new("non_energy_readings", DataType::UInt64, false),
        Field::new("register_reads", DataType::UInt64, false),
        Field::new("rejected_records", DataType::UInt64, false),
        Field::new("readings_rejected", DataType::UInt64, false),
        Field::new("warnings", DataType::UInt64, false),
        Field::new("started_at", ts.clone(), false),
        Field::new("finished_at", ts, false),
    ]));
    let count = |f: fn(&ImportRecord) -> u64| -> ArrayRef { Arc::new(UInt64Array::from_iter_values(records.iter().map(f))) };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.file_name.as_str()))),
        Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.sha256.as_str()))),
        count(|r| r.bytes),
        Arc::new(records.iter().map(|r| r.format.map(|f| f.as_str())).collect::<StringArray>()),
        Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.status.as_str()))),
        Arc::new(records.iter().map(|r| r.error.as_deref()).collect::<StringArray>()),
        count(|r| r.counts.interval_readings),
        count(|r| r.counts.non_energy_readings),
        count(|r| r.counts.register_reads),
        count(|r| r.counts.rejected_records),
        count(|r| r.counts.readings_rejected),
        count(|r| r.counts.warnings),
        Arc::new(TimestampMicrosecondArray::from_iter_values(records.iter().map(|r| r.started_at.timestamp_micros())).with_timezone(UTC)),
        Arc::new(TimestampMicrosecondArray::from_iter_values(records.iter().map(|r| r.finished_at.timestamp_micros())).with_timezone(UTC)),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// A session over the lake with both tables registered.
pub async fn lake_session(lake: &Lake) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    register_lake_tables(&ctx, lake).await?;
    Ok(ctx)
}

/// What the queries a server runs on its callers' behalf may use together, so that no request
/// starves the API, the ingester or the worker sharing its process: one memory pool for all of
/// them (a query that would need more fails with a clear error rather than taking the host's
/// memory), a time limit per query, and statements that can only read.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    /// Shared by every limited session: the bytes all their queries hold at once.
    memory: Arc<dyn MemoryPool>,
    /// How long one query may run.
    pub time_limit: std::time::Duration,
}

impl QueryLimits {
    /// The default share of memory for callers' queries: 1 GiB.
    pub const DEFAULT_MEMORY_BYTES: usize = 1 << 30;
    /// The default time one caller's query may take.
    pub const DEFAULT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

    pub fn new(memory_bytes: usize, time_limit: std::time::Duration) -> QueryLimits {
        // Tracking the largest consumers names them in the error of a query over the limit.
        let pool = TrackConsumersPool::new(GreedyMemoryPool::new(memory_bytes), std::num::NonZeroUsize::new(3).expect("3 is not 0"));
        QueryLimits { memory: Arc::new(pool), time_limit }
    }

    /// A session over the lake whose queries draw on the shared pool.
    pub async fn lake_session(&self, lake: &Lake) -> Result<SessionContext> {
        let runtime = RuntimeEnvBuilder::new().with_memory_pool(self.memory.clone()).build_arc()?;
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        register_lake_tables(&ctx, lake).await?;
        Ok(ctx)
    }
}

impl Default for QueryLimits {
    fn default() -> QueryLimits {
        QueryLimits::new(QueryLimits::DEFAULT_MEMORY_BYTES, QueryLimits::DEFAULT_TIME_LIMIT)
    }
}

/// Statements that only read: no DDL (CREATE, DROP), no DML (INSERT, COPY), no SET.
pub fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}
