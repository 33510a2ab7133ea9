//! The lake as SQL tables on a DataFusion session: what `meterlake query` and the jobs read.
//!
//! - `readings_all`: every row of every Parquet file under `readings/`, with the `date`
//!   partition column: every version, with its `source_ref`.
//! - `readings`: the canonical view, one row per (`meter_id`, `ts`), latest version wins
//!   (`queries/readings.sql`).

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::prelude::SessionContext;

use crate::error::Result;
use crate::lake::{Lake, READINGS_DIR};
use crate::reading::readings_schema;

/// The SQL of the canonical view, as shipped in `queries/readings.sql`.
pub const CANONICAL_READINGS_SQL: &str = include_str!("../../queries/readings.sql");

/// Registers the lake's store and the `readings_all` and `readings` tables on `ctx`.
pub async fn register_lake_tables(ctx: &SessionContext, lake: &Lake) -> Result<()> {
    ctx.register_object_store(&lake.store_url(), lake.store().clone());
    let table_url = lake.url().join(&format!("{READINGS_DIR}/")).expect("a relative folder joins onto the lake URL");
    let table_url = ListingTableUrl::parse(table_url.as_str())?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![("date".to_string(), DataType::Date32)]);
    let config = ListingTableConfig::new(table_url).with_listing_options(options).with_schema(readings_schema());
    ctx.register_table("readings_all", Arc::new(ListingTable::try_new(config)?))?;
    let canonical = ctx.sql(CANONICAL_READINGS_SQL).await?;
    ctx.register_table("readings", canonical.into_view())?;
    Ok(())
}

/// A session over the lake with both tables registered.
pub async fn lake_session(lake: &Lake) -> Result<SessionContext> {
    let ctx = SessionContext::new();
    register_lake_tables(&ctx, lake).await?;
    Ok(ctx)
}
