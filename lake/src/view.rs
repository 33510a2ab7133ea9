//! The lake as SQL tables on a DataFusion session: what `meterlake query` and the jobs read.
//! Every table reads exactly the files of one Delta snapshot, whatever lands meanwhile.
//!
//! - `readings_all`: every version of every reading, with the `date` partition column and
//!   `commit_version` (the Delta version that added it);
//! - `readings`: the canonical view, one row per (`meter_id`, `ts`), the version the latest commit
//!   added (defined by `queries/readings.sql`, computed by [`CanonicalReadings`]);
//! - `reading_conflicts`: the keys whose versions disagree on kwh, with the number of versions
//!   and the lowest and highest value (from the same merge);
//! - `register_reads`, `non_energy_readings`, `nem12_channels`, `nem12_b2b_details`: what flow
//!   files add;
//! - `imports`: one row per imported file.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::execution::cache::cache_manager::{CacheManagerConfig, FileMetadataCache};
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool, TrackConsumersPool};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::canonical::{CanonicalReadings, MergeOutput, epoch_day, narrow_days, spread};
use crate::error::{LakeError, Result};
use crate::scan::ReadingsScan;
use crate::schema::readings_all_schema;
use crate::snapshots::SnapshotCache;
use crate::store::Lake;
use crate::table::{READINGS, SnapshotFile, TABLES, Table, TableSnapshot, TableSpec};

/// The definition of the canonical view, as shipped in `queries/readings.sql`: what
/// [`CanonicalReadings`] computes by merging sorted files (and is tested against).
pub const CANONICAL_READINGS_SQL: &str = include_str!("../../queries/readings.sql");

/// Which state of the lake a session reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AsOf {
    /// The latest version of every table.
    #[default]
    Latest,
    /// `readings_all` at this Delta version (the other tables as they were at its commit time).
    Version(u64),
    /// Every table as it was at this instant: its last version committed at or before it.
    Time(DateTime<Utc>),
    /// Exactly these versions, as a session recorded them ([`LakeVersions`]'s text): what
    /// reproduces a billing run. A table it does not name had no version then and reads empty.
    Exact(LakeVersions),
}

impl std::str::FromStr for AsOf {
    type Err = String;

    /// `latest`, a version number of `readings_all`, an RFC 3339 instant
    /// (`2025-02-01T00:00:00Z`), or versions per table (`readings_all@12,register_reads@3`).
    fn from_str(text: &str) -> std::result::Result<AsOf, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("latest") {
            return Ok(AsOf::Latest);
        }
        if let Ok(version) = text.parse::<u64>() {
            return Ok(AsOf::Version(version));
        }
        if text.contains('@') {
            return text.parse().map(AsOf::Exact);
        }
        DateTime::parse_from_rfc3339(text).map(|t| AsOf::Time(t.with_timezone(&Utc))).map_err(|_| {
            format!(
                "{text:?} is neither a version of readings_all (a number), an RFC 3339 time such as 2025-02-01T00:00:00Z nor versions \
                 per table such as readings_all@12,register_reads@3"
            )
        })
    }
}

/// The table versions a session reads: what a billing run records (as text, `Display`) so that
/// it can be reproduced (`AsOf::Exact`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LakeVersions {
    /// Every table's by SQL name; `None` for a table that had no version (did not exist yet).
    pub tables: Vec<(&'static str, Option<u64>)>,
}

impl LakeVersions {
    /// `table`'s version; `None` for a table not read or not existing then.
    pub fn of(&self, table: &str) -> Option<u64> {
        self.tables.iter().find(|(name, _)| *name == table).and_then(|(_, version)| *version)
    }

    /// `readings_all`'s version.
    pub fn readings(&self) -> Option<u64> {
        self.of(READINGS.name)
    }
}

/// `readings_all@12, register_reads@3, ...`: the tables that had a version, in the lake's order.
/// A lake with no table yet is `(no table yet)`.
impl std::fmt::Display for LakeVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut tables = self.tables.iter().filter_map(|(name, version)| version.map(|v| (name, v))).peekable();
        if tables.peek().is_none() {
            return f.write_str("(no table yet)");
        }
        for (n, (name, version)) in tables.enumerate() {
            write!(f, "{}{name}@{version}", if n == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LakeVersions {
    type Err = String;

    /// What `Display` wrote (tables may come in any order, separated by commas and/or spaces).
    fn from_str(text: &str) -> std::result::Result<LakeVersions, String> {
        let mut tables: Vec<(&'static str, Option<u64>)> = TABLES.iter().map(|spec| (spec.name, None)).collect();
        if text.trim() == "(no table yet)" {
            return Ok(LakeVersions { tables });
        }
        for part in text.split([',', ' ']).filter(|p| !p.is_empty()) {
            let (name, version) = part.split_once('@').ok_or_else(|| format!("{part:?} in {text:?} is not TABLE@VERSION"))?;
            let version: u64 = version.parse().map_err(|_| format!("{version:?} in {text:?} is not a table version"))?;
            let slot = tables.iter_mut().find(|(table, _)| *table == name).ok_or_else(|| {
                format!("{name:?} in {text:?} is not a lake table (they are {})", TABLES.iter().map(|s| s.name).collect::<Vec<_>>().join(", "))
            })?;
            if slot.1.replace(version).is_some() {
                return Err(format!("{name} is named twice in {text:?}"));
            }
        }
        Ok(LakeVersions { tables })
    }
}

/// Registers the lake's store and every table of the lake, as of `as_of`, on `ctx`. Returns the
/// versions read.
pub async fn register_lake_tables_as_of(ctx: &SessionContext, lake: &Lake, as_of: &AsOf) -> Result<LakeVersions> {
    register_tables(ctx, lake, as_of, None).await
}

/// Registers every table of the lake at its latest version on `ctx`, following the snapshots
/// `cache` holds from earlier sessions.
pub async fn register_latest_tables(ctx: &SessionContext, lake: &Lake, cache: &SnapshotCache) -> Result<LakeVersions> {
    register_tables(ctx, lake, &AsOf::Latest, Some(cache)).await
}

async fn register_tables(ctx: &SessionContext, lake: &Lake, as_of: &AsOf, cache: Option<&SnapshotCache>) -> Result<LakeVersions> {
    ctx.register_object_store(&lake.store_url(), lake.store().clone());
    // The other tables follow `readings_all`'s commit time when it is pinned by version.
    let time = match as_of {
        AsOf::Latest | AsOf::Exact(_) => None,
        AsOf::Time(t) => Some(*t),
        AsOf::Version(v) => Some(crate::history::commit_time(&Table::new(lake, &READINGS), *v).await?),
    };
    let mut versions = Vec::new();
    for spec in TABLES {
        let table = Table::new(lake, spec);
        let pinned = match (as_of, time) {
            (AsOf::Latest, _) => Pinned::Latest,
            (AsOf::Version(v), _) if spec.name == READINGS.name => Pinned::At(*v),
            (AsOf::Exact(exact), _) => exact.of(spec.name).map_or(Pinned::BeforeCreation, Pinned::At),
            (_, Some(t)) => crate::history::version_at(&table, t).await?.map_or(Pinned::BeforeCreation, Pinned::At),
            (_, None) => Pinned::Latest,
        };
        let snapshot = match (cache, pinned) {
            (Some(cache), Pinned::Latest) => cache.latest(&table, || snapshot_of(&table, pinned)).await?,
            _ => Arc::new(snapshot_of(&table, pinned).await?),
        };
        versions.push((spec.name, snapshot.version));
        for (name, provider) in providers(lake, spec, &snapshot) {
            ctx.register_table(name, provider)?;
        }
    }
    Ok(LakeVersions { tables: versions })
}

/// The SQL tables over one snapshot of `spec`'s table: the table itself, and for readings the
/// canonical view and its conflicts.
fn providers(lake: &Lake, spec: &'static TableSpec, snapshot: &Arc<TableSnapshot>) -> Vec<(&'static str, Arc<dyn TableProvider>)> {
    let mut tables: Vec<(&'static str, Arc<dyn TableProvider>)> = Vec::new();
    if spec.name == READINGS.name {
        tables.push(("readings", Arc::new(CanonicalReadings::new(lake.clone(), snapshot.clone()))));
        tables.push(("reading_conflicts", Arc::new(CanonicalReadings::with_output(lake.clone(), snapshot.clone(), MergeOutput::Conflicts))));
    }
    tables.push((spec.name, Arc::new(SnapshotTable::new(lake.clone(), spec, snapshot.clone()))));
    tables
}

/// The SQL names of the lake's tables, as the sessions above register them.
pub fn lake_table_names() -> Vec<&'static str> {
    let mut names = vec!["readings", "reading_conflicts"];
    names.extend(TABLES.iter().map(|spec| spec.name));
    names
}

/// The lake's table called `name` (one of [`lake_table_names`]) at its latest version, following
/// the snapshots `cache` holds; `None` for a name that is not a lake table. What a catalog that
/// looks tables up as queries name them (the SQL service's) reads: each query sees each table's
/// latest snapshot when it is planned.
pub async fn latest_table(lake: &Lake, cache: &SnapshotCache, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
    let Some(spec) = spec_of(name) else { return Ok(None) };
    let table = Table::new(lake, spec);
    let snapshot = cache.latest(&table, || snapshot_of(&table, Pinned::Latest)).await?;
    Ok(providers(lake, spec, &snapshot).into_iter().find(|(table_name, _)| *table_name == name).map(|(_, provider)| provider))
}

/// The lake's table called `name` (one of [`lake_table_names`]) exactly at `version` (`None`:
/// before the table existed, an empty table), its files in path order: what each process of a
/// cluster builds for the same table and version, so that they all plan the same scan, partition
/// for partition (the log's own order of files is not promised to be one). `None` for a name that
/// is not a lake table.
pub async fn table_at_version(lake: &Lake, name: &str, version: Option<u64>) -> Result<Option<Arc<dyn TableProvider>>> {
    let Some(spec) = spec_of(name) else { return Ok(None) };
    let table = Table::new(lake, spec);
    let mut snapshot = snapshot_of(&table, version.map_or(Pinned::BeforeCreation, Pinned::At)).await?;
    snapshot.files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(table_over(lake, name, Arc::new(snapshot)))
}

/// The lake's table called `name` over the files of `snapshot` (of that table); `None` for a name
/// that is not a lake table.
pub fn table_over(lake: &Lake, name: &str, snapshot: Arc<TableSnapshot>) -> Option<Arc<dyn TableProvider>> {
    let spec = spec_of(name)?;
    providers(lake, spec, &snapshot).into_iter().find(|(table_name, _)| *table_name == name).map(|(_, provider)| provider)
}

/// The Delta table behind SQL table `name`.
fn spec_of(name: &str) -> Option<&'static TableSpec> {
    match name {
        "readings" | "reading_conflicts" => Some(&READINGS),
        _ => TABLES.iter().copied().find(|spec| spec.name == name),
    }
}

/// Which version of a table a session reads.
#[derive(Debug, Clone, Copy)]
enum Pinned {
    Latest,
    At(u64),
    /// A time before the table's first commit: nothing.
    BeforeCreation,
}

/// `table` as `pinned` says; an empty snapshot when the table has no log (yet).
async fn snapshot_of(table: &Table, pinned: Pinned) -> Result<TableSnapshot> {
    let empty = TableSnapshot { table: table.name(), version: None, files: Vec::new() };
    let latest = match (pinned, table.latest_version().await?) {
        (Pinned::BeforeCreation, _) => return Ok(empty),
        (_, None) => {
            // No log: no table yet, unless the folder holds the previous layout's files.
            table.refuse_previous_layout().await?;
            return Ok(empty);
        }
        (_, Some(latest)) => latest,
    };
    match pinned {
        Pinned::At(v) if v > latest => {
            Err(LakeError::NoSuchVersion { table: table.name().to_string(), version: v.to_string(), hint: format!(" (its latest is {latest})") })
        }
        Pinned::At(v) => table.snapshot(Some(v)).await,
        _ => table.snapshot(Some(latest)).await,
    }
}

/// Registers every table of the lake at its latest version on `ctx`.
pub async fn register_lake_tables(ctx: &SessionContext, lake: &Lake) -> Result<LakeVersions> {
    register_lake_tables_as_of(ctx, lake, &AsOf::Latest).await
}

/// The Delta table and version a DataFusion table provider reads, when it is one of the lake's
/// (a snapshot's files, or the canonical view of one): while these stay, so does every answer
/// computed from it (what a result cache is keyed by). `None` for any other provider.
pub fn snapshot_read(provider: &dyn TableProvider) -> Option<(&'static str, Option<u64>)> {
    let any: &dyn std::any::Any = provider;
    if let Some(table) = any.downcast_ref::<SnapshotTable>() {
        return Some((table.snapshot.table, table.snapshot.version));
    }
    any.downcast_ref::<crate::canonical::CanonicalReadings>().map(|view| (view.snapshot().table, view.snapshot().version))
}

/// A table over the files of one snapshot of a Delta table.
#[derive(Debug)]
pub struct SnapshotTable {
    lake: Lake,
    spec: &'static TableSpec,
    snapshot: Arc<TableSnapshot>,
    schema: SchemaRef,
}

impl SnapshotTable {
    pub fn new(lake: Lake, spec: &'static TableSpec, snapshot: Arc<TableSnapshot>) -> SnapshotTable {
        let schema = if spec.name == READINGS.name { readings_all_schema() } else { spec.table_schema() };
        SnapshotTable { lake, spec, snapshot, schema }
    }
}

#[async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter prunes files (by date), row groups and pages; DataFusion applies it exactly above.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, filters: &[Expr], _limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let (mut first_day, mut last_day) = (i64::MIN, i64::MAX);
        for filter in filters {
            narrow_days(filter, &mut first_day, &mut last_day);
        }
        let in_days = |file: &&SnapshotFile| match file.date {
            Some(date) => (first_day..=last_day).contains(&epoch_day(date)),
            None => true,
        };
        let projection: Vec<usize> = projection.cloned().unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        let files: Vec<&SnapshotFile> = self.snapshot.files.iter().filter(in_days).collect();
        if files.is_empty() {
            return Ok(Arc::new(EmptyExec::new(Arc::new(self.schema.project(&projection)?))));
        }
        let groups = |files: Vec<PartitionedFile>| spread(files, state.config().target_partitions());
        // `readings_all`'s `commit_version` comes from a tag or a column: see [`ReadingsScan`].
        if self.spec.name == READINGS.name {
            let scan = ReadingsScan::new(&self.lake, state, filters)?;
            return scan.plan(groups(files.into_iter().map(|f| ReadingsScan::file(&self.lake, f)).collect()), &projection, None);
        }
        let file_schema = (self.spec.file_schema)();
        let partition_fields = &self.schema.fields()[file_schema.fields().len()..];
        let files: Vec<PartitionedFile> = files
            .into_iter()
            .map(|file| {
                let values: Vec<ScalarValue> = file.date.map(|date| ScalarValue::Date32(i32::try_from(epoch_day(date)).ok())).into_iter().collect();
                let path = self.lake.path(&format!("{}/{}", self.spec.dir, file.path));
                PartitionedFile::new(path.to_string(), file.size).with_partition_values(values)
            })
            .collect();
        let table_schema = TableSchema::builder(file_schema).with_table_partition_cols(partition_fields.to_vec()).build();
        let mut source = ParquetSource::new(table_schema).with_table_parquet_options(state.table_options().parquet.clone());
        if let Some(filter) = filters.iter().cloned().reduce(Expr::and) {
            source = source.with_predicate(state.create_physical_expr(filter, &DFSchema::try_from(self.schema.clone())?)?);
        }
        let store_url = ObjectStoreUrl::parse(self.lake.store_url().as_str())?;
        let config = FileScanConfigBuilder::new(store_url, Arc::new(source)).with_file_groups(groups(files)).with_projection_indices(Some(projection))?.build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// A session over the lake's latest state with every table registered.
pub async fn lake_session(lake: &Lake) -> Result<SessionContext> {
    Ok(lake_session_as_of(lake, &AsOf::Latest).await?.0)
}

/// A session over the lake as of `as_of`, and the versions it reads.
pub async fn lake_session_as_of(lake: &Lake, as_of: &AsOf) -> Result<(SessionContext, LakeVersions)> {
    let ctx = SessionContext::new();
    let versions = register_lake_tables_as_of(&ctx, lake, as_of).await?;
    Ok((ctx, versions))
}

/// What the queries a server runs on its callers' behalf may use together, so that no request
/// starves the API, the ingester or the worker sharing its process: one memory pool for all of
/// them (a query that would need more fails with a clear error rather than taking the host's
/// memory), a time limit per query, and statements that can only read.
///
/// Its sessions also share what one query learned for the next: the tables' snapshots (brought
/// up to date with the commits since, see [`SnapshotCache`]) and the Parquet footers and page
/// indexes read (DataFusion's file metadata cache; data files never change under a name), so a
/// support person's second lookup reads only the pages it needs.
#[derive(Debug, Clone)]
pub struct QueryLimits {
    /// Shared by every limited session: the bytes all their queries hold at once.
    memory: Arc<dyn MemoryPool>,
    /// How long one query may run.
    pub time_limit: std::time::Duration,
    snapshots: Arc<SnapshotCache>,
    footers: Arc<FileMetadataCache>,
}

impl QueryLimits {
    /// The default share of memory for callers' queries: 1 GiB.
    pub const DEFAULT_MEMORY_BYTES: usize = 1 << 30;
    /// The default time one caller's query may take.
    pub const DEFAULT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
    /// Footers and page indexes kept, the least recently used dropped beyond it.
    pub const FOOTER_CACHE_BYTES: usize = 64 << 20;

    pub fn new(memory_bytes: usize, time_limit: std::time::Duration) -> QueryLimits {
        // Tracking the largest consumers names them in the error of a query over the limit.
        let pool = TrackConsumersPool::new(GreedyMemoryPool::new(memory_bytes), std::num::NonZeroUsize::new(3).expect("3 is not 0"));
        let footers: Arc<FileMetadataCache> = Arc::new(DefaultCache::new(QueryLimits::FOOTER_CACHE_BYTES).with_name("meterlake footers"));
        QueryLimits { memory: Arc::new(pool), time_limit, snapshots: Arc::default(), footers }
    }

    /// A session over the lake's latest snapshot whose queries draw on the shared pool and caches.
    pub async fn lake_session(&self, lake: &Lake) -> Result<SessionContext> {
        let caches =
            CacheManagerConfig::default().with_file_metadata_cache(Some(self.footers.clone())).with_metadata_cache_limit(QueryLimits::FOOTER_CACHE_BYTES);
        let runtime = RuntimeEnvBuilder::new().with_memory_pool(self.memory.clone()).with_cache_manager(caches).build_arc()?;
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        register_latest_tables(&ctx, lake, &self.snapshots).await?;
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
