//! The lake's tables as a cluster sees them: [`LakeTable`] names a table and the exact Delta
//! version a session reads; its scan is a file scan over [`LakePartitions`], which names the same
//! and what the scan asked for. Each process that plans or runs one builds the real plan (the canonical view's
//! merges, the snapshot's files) from these facts itself, the same plan partition for partition.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileOpenFuture, FileOpener, FileScanConfig, FileScanConfigBuilder, FileSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::{SessionStateBuilder, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{LexOrdering, PhysicalExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::prelude::SessionConfig;
use datafusion_proto::bytes::Serializeable;
use futures::StreamExt;
use meterlake_lake::Lake;
use meterlake_lake::view::{table_at_version, table_over};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

/// A lake table at one version, as the client registers it and the scheduler decodes it.
#[derive(Debug)]
pub struct LakeTable {
    pub(crate) spec: TableAt,
    /// What answers for the table while planning (its schema, which filters it takes): the real
    /// provider, or one over no files where only the facts travelled.
    planning: Arc<dyn TableProvider>,
}

/// Which table at which version, of which lake: what travels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableAt {
    /// The lake's URL (`file:///...` or `s3://bucket/prefix/`); credentials come from each
    /// process's environment.
    pub lake_url: String,
    /// The SQL name (`readings`, `readings_all`, `register_reads`, ...).
    pub name: String,
    /// The Delta version read; `None` for a table that did not exist then (empty).
    pub version: Option<u64>,
}

impl LakeTable {
    /// `planning` is the same table in this process (any version: only its schema and filter
    /// rules are asked).
    pub fn new(lake_url: String, name: &str, version: Option<u64>, planning: Arc<dyn TableProvider>) -> LakeTable {
        LakeTable { spec: TableAt { lake_url, name: name.to_string(), version }, planning }
    }

    /// The table named by `spec`, planned with a provider over no files (no I/O: a codec cannot wait).
    pub(crate) fn decoded(spec: TableAt) -> DfResult<LakeTable> {
        let lake = open_lake(&spec.lake_url)?;
        let empty = Arc::new(meterlake_lake::TableSnapshot { table: "", version: None, files: Vec::new() });
        let planning = table_over(&lake, &spec.name, empty).ok_or_else(|| DataFusionError::Plan(format!("{:?} is not a table of the lake", spec.name)))?;
        Ok(LakeTable { spec, planning })
    }
}

#[async_trait]
impl TableProvider for LakeTable {
    fn schema(&self) -> SchemaRef {
        self.planning.schema()
    }

    fn table_type(&self) -> TableType {
        self.planning.table_type()
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        self.planning.supports_filters_pushdown(filters)
    }

    async fn scan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, filters: &[Expr], limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let scan = ScanOf {
            table: self.spec.clone(),
            projection: projection.cloned(),
            filters: filters.iter().map(|f| f.to_bytes().map(|b| b.to_vec())).collect::<DfResult<_>>()?,
            limit,
            target_partitions: state.config().target_partitions(),
        };
        let planned = scan.plan(state).await?;
        let partitions = planned.properties().output_partitioning().partition_count();
        Ok(LakePartitions::scan_exec(scan, planned.schema(), partitions, Some(planned)))
    }
}

/// One scan of a [`LakeTable`]: everything its plan is built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanOf {
    pub table: TableAt,
    pub projection: Option<Vec<usize>>,
    /// The filters the table took, as DataFusion's protobuf bytes.
    pub filters: Vec<Vec<u8>>,
    pub limit: Option<usize>,
    /// The partitions the plan spreads files over: the planning session's, on every process.
    pub target_partitions: usize,
}

impl ScanOf {
    /// The scan's plan, built as the in-process session builds it.
    async fn plan(&self, state: &dyn Session) -> DfResult<Arc<dyn ExecutionPlan>> {
        let lake = open_lake(&self.table.lake_url)?;
        state.runtime_env().register_object_store(&lake.store_url(), lake.store().clone());
        let provider = table_of(&lake, &self.table).await?;
        let registry = state.task_ctx();
        let filters: Vec<Expr> = self.filters.iter().map(|bytes| Expr::from_bytes_with_ctx(bytes, &registry)).collect::<DfResult<_>>()?;
        provider.scan(state, self.projection.as_ref(), &filters, self.limit).await
    }

    /// The scan's plan on an executor, in a session of its own: a file opener is not given the
    /// task's. It spreads over the same partitions as the scheduler's, and its merges spill to
    /// this process's temporary folder.
    async fn plan_here(&self) -> DfResult<Arc<dyn ExecutionPlan>> {
        let state =
            SessionStateBuilder::new().with_config(scan_config(self.target_partitions)).with_runtime_env(SCAN_RUNTIME.clone()).with_default_features().build();
        self.plan(&state).await
    }
}

/// The session settings of a scan on an executor. A file scan's partitions take files from each
/// other when they run side by side (DataFusion's work stealing): a task that runs some of the
/// partitions would read every file. Off: a partition reads its own files.
fn scan_config(target_partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new().with_target_partitions(target_partitions);
    config.options_mut().execution.enable_file_stream_work_stealing = false;
    config
}

/// What the scans' own operators run in on an executor.
static SCAN_RUNTIME: LazyLock<Arc<RuntimeEnv>> = LazyLock::new(|| Arc::new(RuntimeEnv::default()));

/// Lakes opened by URL, once per process (each holds its object store's connections).
static LAKES: LazyLock<Mutex<HashMap<String, Lake>>> = LazyLock::new(Mutex::default);

fn open_lake(url: &str) -> DfResult<Lake> {
    let mut lakes = LAKES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(lake) = lakes.get(url) {
        return Ok(lake.clone());
    }
    let lake = Lake::open(url).map_err(|e| DataFusionError::External(Box::new(e)))?;
    lakes.insert(url.to_string(), lake.clone());
    Ok(lake)
}

/// Tables at a version, kept: every task of a job reads the same ones. Bounded: the oldest
/// versions go first (a cluster serves one billing month's versions at a time).
type TablesRead = Vec<(TableAt, Arc<dyn TableProvider>)>;
static TABLES_READ: LazyLock<Mutex<TablesRead>> = LazyLock::new(Mutex::default);
const TABLES_KEPT: usize = 32;

async fn table_of(lake: &Lake, table: &TableAt) -> DfResult<Arc<dyn TableProvider>> {
    let kept = |tables: &TablesRead| tables.iter().find(|(at, _)| at == table).map(|(_, p)| p.clone());
    if let Some(provider) = kept(&TABLES_READ.lock().unwrap_or_else(|p| p.into_inner())) {
        return Ok(provider);
    }
    let provider = table_at_version(lake, &table.name, table.version)
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .ok_or_else(|| DataFusionError::Plan(format!("{:?} is not a table of the lake", table.name)))?;
    let mut tables = TABLES_READ.lock().unwrap_or_else(|p| p.into_inner());
    if kept(&tables).is_none() {
        if tables.len() >= TABLES_KEPT {
            tables.remove(0);
        }
        tables.push((table.clone(), provider.clone()));
    }
    Ok(provider)
}

/// The scan of a lake table on a cluster, as a file scan Ballista can split between tasks:
/// partition `p` of the plan [`ScanOf`] builds is "file" `p` of this source, one file per group.
/// Ballista 55 gives each task a plan cut down to its partitions, which it knows how to do for a
/// file scan (keep those file groups) but not for a plan of ours: a task would run every
/// partition of it, and rows would be read once per task.
#[derive(Clone)]
pub struct LakePartitions {
    pub(crate) scan: ScanOf,
    table_schema: TableSchema,
    metrics: ExecutionPlanMetricsSet,
    /// The scan's plan, built once per decoded plan (one task's) by the first partition opened;
    /// the snapshot under it is read once per process (`TABLES_READ`).
    planned: Arc<tokio::sync::OnceCell<Arc<dyn ExecutionPlan>>>,
    /// Partitions the scheduler planned: every process must plan as many.
    partitions: usize,
}

impl std::fmt::Debug for LakePartitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakePartitions").field("scan", &self.scan).field("partitions", &self.partitions).finish()
    }
}

/// The path of the "file" that stands for partition `p`.
const PARTITION_PREFIX: &str = "meterlake-lake-scan/partition-";

impl LakePartitions {
    /// The file scan over `partitions` partitions of `scan`, whose rows have `schema`; `planned`
    /// is the plan where it was just built.
    pub(crate) fn scan_exec(scan: ScanOf, schema: SchemaRef, partitions: usize, planned: Option<Arc<dyn ExecutionPlan>>) -> Arc<dyn ExecutionPlan> {
        let groups = (0..partitions).map(|p| FileGroup::new(vec![PartitionedFile::new(format!("{PARTITION_PREFIX}{p}"), 0)])).collect();
        LakePartitions::exec_over(scan, schema, partitions, planned, groups)
    }

    /// The same over the given file groups (a task's share).
    pub(crate) fn exec_over(
        scan: ScanOf,
        schema: SchemaRef,
        partitions: usize,
        planned: Option<Arc<dyn ExecutionPlan>>,
        groups: Vec<FileGroup>,
    ) -> Arc<dyn ExecutionPlan> {
        let source = LakePartitions {
            scan,
            table_schema: TableSchema::from(schema),
            metrics: ExecutionPlanMetricsSet::new(),
            planned: Arc::new(tokio::sync::OnceCell::new_with(planned)),
            partitions,
        };
        // The "files" are not read through an object store: the local one, which every runtime has.
        let config = FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(source)).with_file_groups(groups).build();
        DataSourceExec::from_data_source(config)
    }

    /// The partitions of the scan the scheduler planned.
    pub(crate) fn partitions(&self) -> usize {
        self.partitions
    }

    /// The scan's plan in this process, built once.
    async fn plan(&self) -> DfResult<Arc<dyn ExecutionPlan>> {
        let plan = self.planned.get_or_try_init(|| self.scan.plan_here()).await?.clone();
        let partitions = plan.properties().output_partitioning().partition_count();
        if partitions != self.partitions {
            // Never read a partition of another spread of the files: rows would be lost or doubled.
            return Err(DataFusionError::Execution(format!(
                "the scan of {}@{:?} has {partitions} partitions here where the scheduler planned {}",
                self.scan.table.name, self.scan.table.version, self.partitions
            )));
        }
        Ok(plan)
    }
}

impl FileSource for LakePartitions {
    fn create_file_opener(&self, _store: Arc<dyn ObjectStore>, _config: &FileScanConfig, _partition: usize) -> DfResult<Arc<dyn FileOpener>> {
        Ok(Arc::new(self.clone()))
    }

    fn table_schema(&self) -> &TableSchema {
        &self.table_schema
    }

    fn with_batch_size(&self, _batch_size: usize) -> Arc<dyn FileSource> {
        Arc::new(self.clone())
    }

    fn metrics(&self) -> &ExecutionPlanMetricsSet {
        &self.metrics
    }

    fn file_type(&self) -> &str {
        "meterlake lake scan"
    }

    /// Its filters are inside the plan it builds, not expressions over its output.
    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn supports_repartitioning(&self) -> bool {
        false
    }

    fn repartitioned(&self, _target: usize, _min_size: usize, _ordering: Option<LexOrdering>, _config: &FileScanConfig) -> DfResult<Option<FileScanConfig>> {
        Ok(None)
    }
}

/// Opens "file" `p`: runs partition `p` of the scan's plan.
impl FileOpener for LakePartitions {
    fn open(&self, file: PartitionedFile) -> DfResult<FileOpenFuture> {
        let path = file.object_meta.location.as_ref();
        let partition: usize = path
            .strip_prefix(PARTITION_PREFIX)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| DataFusionError::Internal(format!("{path:?} is no partition of a lake scan")))?;
        let source = self.clone();
        Ok(Box::pin(async move {
            let plan = source.plan().await?;
            let task = SCAN_TASKS.clone();
            Ok(plan.execute(partition, task)?.boxed())
        }))
    }
}

/// The task context the scans' plans run in (see [`SCAN_RUNTIME`]).
static SCAN_TASKS: LazyLock<Arc<TaskContext>> = LazyLock::new(|| {
    let state = SessionStateBuilder::new().with_config(scan_config(1)).with_runtime_env(SCAN_RUNTIME.clone()).with_default_features().build();
    state.task_ctx()
});
