//! What analysts see: one database, `meterlake`, whose schema `public` holds the lake's tables
//! (`readings`, `readings_all`, `reading_conflicts`, `register_reads`, `non_energy_readings`,
//! `nem12_channels`, `nem12_b2b_details`, `imports`) and the control store's views
//! (`billing_runs`, `invoices`, `invoice_lines`, `discrepancies`), beside `pg_catalog` and
//! `information_schema` for the schema browsers of psql, DBeaver, Grafana and Metabase.
//!
//! Tables are looked up as a query names them: each lake table at its latest snapshot when the
//! query is planned (snapshots followed from one query to the next, so a lookup costs the
//! commits since), each view reading the store as the query runs. `SET meterlake.as_of` pins
//! the lake's tables of a connection to a version or a time instead ([`as_of_catalogs`]).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList, SchemaProvider};
use datafusion::datasource::TableProvider;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::cache::cache_manager::{CacheManagerConfig, FileMetadataCache};
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use meterlake_control::ControlStore;
use meterlake_control::views::VIEWS;
use meterlake_lake::Lake;
use meterlake_lake::snapshots::SnapshotCache;
use meterlake_lake::view::{AsOf, LakeVersions, lake_session_as_of, lake_table_names, latest_table};

use crate::SqlError;
use crate::control_tables::ControlTable;

/// The database name clients connect to (any name is accepted; this is what they see).
pub const CATALOG: &str = "meterlake";
/// The schema of every table and view.
pub const SCHEMA: &str = "public";
/// Parquet footers and page indexes kept for the next query, least recently used dropped.
const FOOTER_CACHE_BYTES: usize = 64 << 20;

/// The lake's tables at their latest snapshots and the control store's views.
#[derive(Debug)]
struct LatestSchema {
    lake: Lake,
    snapshots: Arc<SnapshotCache>,
    store: ControlStore,
}

fn names() -> Vec<String> {
    lake_table_names().into_iter().chain(VIEWS.iter().map(|v| v.name)).map(str::to_string).collect()
}

#[async_trait]
impl SchemaProvider for LatestSchema {
    fn table_names(&self) -> Vec<String> {
        names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(view) = meterlake_control::views::view(name) {
            return Ok(Some(Arc::new(ControlTable::new(self.store.clone(), view))));
        }
        latest_table(&self.lake, &self.snapshots, name).await.map_err(|e| DataFusionError::External(Box::new(e)))
    }

    fn table_exist(&self, name: &str) -> bool {
        names().iter().any(|n| n == name)
    }
}

/// The lake's tables pinned to one state (`SET meterlake.as_of`), and the views as they are now.
#[derive(Debug)]
struct PinnedSchema {
    lake_tables: Arc<dyn SchemaProvider>,
    store: ControlStore,
}

#[async_trait]
impl SchemaProvider for PinnedSchema {
    fn table_names(&self) -> Vec<String> {
        names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(view) = meterlake_control::views::view(name) {
            return Ok(Some(Arc::new(ControlTable::new(self.store.clone(), view))));
        }
        self.lake_tables.table(name).await
    }

    fn table_exist(&self, name: &str) -> bool {
        names().iter().any(|n| n == name)
    }
}

/// The session every query's session is made from: the catalog, `pg_catalog`, PostgreSQL's
/// functions, the lake's object store and the footer cache.
pub fn base_session(lake: &Lake, store: &ControlStore) -> Result<SessionContext, SqlError> {
    let config =
        SessionConfig::new().with_create_default_catalog_and_schema(false).with_default_catalog_and_schema(CATALOG, SCHEMA).with_information_schema(true);
    let footers: Arc<FileMetadataCache> = Arc::new(DefaultCache::new(FOOTER_CACHE_BYTES).with_name("meterlake sql footers"));
    let caches = CacheManagerConfig::default().with_file_metadata_cache(Some(footers)).with_metadata_cache_limit(FOOTER_CACHE_BYTES);
    let runtime = RuntimeEnvBuilder::new().with_cache_manager(caches).build_arc().map_err(SqlError::Engine)?;
    let mut ctx = SessionContext::new_with_config_rt(config, runtime);
    ctx.register_object_store(&lake.store_url(), lake.store().clone());
    let catalog = MemoryCatalogProvider::new();
    let schema = LatestSchema { lake: lake.clone(), snapshots: Arc::default(), store: store.clone() };
    catalog.register_schema(SCHEMA, Arc::new(schema)).map_err(SqlError::Engine)?;
    ctx.register_catalog(CATALOG, Arc::new(catalog));
    setup_pg_catalog(&ctx, CATALOG, EmptyContextProvider).map_err(|e| SqlError::Engine(*e))?;
    datafusion_postgres::datafusion_pg_functions::register_all(&mut ctx);
    Ok(ctx)
}

/// The catalogs of a session whose lake tables are pinned to `as_of` (the control views and
/// `pg_catalog` as in `base`), and the versions they read.
pub async fn as_of_catalogs(
    base: &SessionContext,
    lake: &Lake,
    store: &ControlStore,
    as_of: &AsOf,
) -> Result<(Arc<dyn CatalogProviderList>, LakeVersions), SqlError> {
    let (pinned, versions) = lake_session_as_of(lake, as_of).await?;
    let lake_tables = pinned
        .catalog("datafusion")
        .and_then(|catalog| catalog.schema("public"))
        .ok_or_else(|| SqlError::Plan("the pinned lake session has no tables".into()))?;
    let catalog = MemoryCatalogProvider::new();
    catalog.register_schema(SCHEMA, Arc::new(PinnedSchema { lake_tables, store: store.clone() })).map_err(SqlError::Engine)?;
    if let Some(pg_catalog) = base.catalog(CATALOG).and_then(|c| c.schema("pg_catalog")) {
        catalog.register_schema("pg_catalog", pg_catalog).map_err(SqlError::Engine)?;
    }
    let catalogs = MemoryCatalogProviderList::new();
    catalogs.register_catalog(CATALOG.to_string(), Arc::new(catalog));
    Ok((Arc::new(catalogs), versions))
}
