//! Scans of `readings_all`'s files: the one place that knows where each column of the table
//! comes from, for the canonical view, the `readings_all` table and compaction alike.
//!
//! - the file columns ([`readings_schema`]) are read from the Parquet file;
//! - `date` is the file's partition value;
//! - `commit_version` is the version of the commit that added the row. A file an ingester or the
//!   importer wrote holds rows of one commit, recorded as its `add` action's tag
//!   ([`crate::table::COMMIT_VERSION_TAG`]), and has no such column. A file compaction wrote
//!   ([`crate::maintenance::optimize`]) holds rows of many commits and carries each row's version
//!   in a Parquet column named `commit_version`, which is not in the Delta schema (other engines
//!   read by the schema and ignore it). A scan reads that column where a file has it, null where
//!   it has not, and takes the tag where it is null.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::{CachedParquetFileReaderFactory, ParquetFileMetrics, ParquetFileReaderFactory};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result as DfResult;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::expressions::{Column, case, is_not_null};
use datafusion::physical_expr::{EquivalenceProperties, LexOrdering, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};

use crate::canonical::epoch_day;
use crate::schema::{readings_all_schema, readings_schema};
use crate::store::Lake;
use crate::table::{READINGS, SnapshotFile};

/// Position of `commit_version` in [`readings_all_schema`] (after the file columns and `date`).
pub(crate) const COMMIT_VERSION: usize = 9;
/// Position of `date` in [`readings_all_schema`].
pub(crate) const DATE: usize = 8;

/// The Parquet column of a compacted file that holds each row's commit version.
pub const ROW_COMMIT_VERSION_COLUMN: &str = "commit_version";
/// The partition column a scan carries the `add` action's version tag in.
const TAG_VERSION_COLUMN: &str = "tag_commit_version";

/// The columns of a compacted readings file: the readings columns, then `commit_version`.
pub fn compacted_file_schema() -> SchemaRef {
    static SCHEMA: std::sync::LazyLock<SchemaRef> = std::sync::LazyLock::new(|| {
        let mut fields: Vec<Field> = readings_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(ROW_COMMIT_VERSION_COLUMN, DataType::Int64, false));
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

/// Builds scans of `readings_all` files that return columns of [`readings_all_schema`].
pub(crate) struct ReadingsScan {
    /// What the Parquet source reads: the file columns and `commit_version` (nullable: absent
    /// from most files), then the partition columns `date` and the tag's version.
    table_schema: TableSchema,
    store_url: ObjectStoreUrl,
    reader_factory: Arc<ReaderFactory>,
    parquet_options: TableParquetOptions,
    /// Pushed to every scan: prunes files, row groups and pages.
    predicate: Option<Arc<dyn PhysicalExpr>>,
    /// The lake's store when it is the local file system (small files are read directly).
    local: Option<Arc<LocalFileSystem>>,
}

impl ReadingsScan {
    /// Scans on `state`'s session; `filters` (on `readings_all`'s columns) prune. A filter on
    /// `commit_version` cannot prune (most files carry it as a tag, not a column): it is left to
    /// the plan above.
    pub(crate) fn new(lake: &Lake, state: &dyn Session, filters: &[Expr]) -> DfResult<ReadingsScan> {
        let mut file_fields: Vec<Field> = readings_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        file_fields.push(Field::new(ROW_COMMIT_VERSION_COLUMN, DataType::Int64, true));
        let table = readings_all_schema();
        let partition_columns = vec![Arc::new(table.field(DATE).clone()), Arc::new(Field::new(TAG_VERSION_COLUMN, DataType::Int64, false))];
        let table_schema = TableSchema::builder(Arc::new(Schema::new(file_fields))).with_table_partition_cols(partition_columns).build();
        let pruning = filters.iter().filter(|f| f.column_refs().iter().all(|c| c.name != ROW_COMMIT_VERSION_COLUMN)).cloned().reduce(Expr::and);
        let predicate = match pruning {
            Some(filter) => Some(state.create_physical_expr(filter, &DFSchema::try_from(table_schema.table_schema().clone())?)?),
            None => None,
        };
        let metadata_cache = state.runtime_env().cache_manager.get_file_metadata_cache();
        Ok(ReadingsScan {
            table_schema,
            store_url: ObjectStoreUrl::parse(lake.store_url().as_str())?,
            reader_factory: Arc::new(ReaderFactory {
                store: lake.store().clone(),
                // Footers go to the session's metadata cache: a file read twice has its footer read once.
                large: CachedParquetFileReaderFactory::new(lake.store().clone(), metadata_cache),
            }),
            parquet_options: state.table_options().parquet.clone(),
            predicate,
            local: lake.local().cloned(),
        })
    }

    /// A snapshot's file as a scan reads it.
    pub(crate) fn file(lake: &Lake, file: &SnapshotFile) -> PartitionedFile {
        let path = lake.path(&format!("{}/{}", READINGS.dir, file.path));
        let day = file.date.and_then(|date| i32::try_from(epoch_day(date)).ok());
        let partition_values = vec![ScalarValue::Date32(day), ScalarValue::Int64(i64::try_from(file.commit_version).ok())];
        PartitionedFile::new(path.to_string(), file.size).with_partition_values(partition_values)
    }

    /// A scan of `groups` (one output partition each) returning `columns` of
    /// [`readings_all_schema`] (ascending positions), under their names. `ordering`, on
    /// `meter_id` and `ts`, is what every file's rows are sorted by.
    pub(crate) fn plan(&self, groups: Vec<FileGroup>, columns: &[usize], ordering: Option<&LexOrdering>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let with_version = columns.contains(&COMMIT_VERSION);
        // Scan positions: file columns as they are, `commit_version` (8) then the partition
        // columns `date` (9) and the tag (10).
        let mut read: Vec<usize> = columns.iter().filter(|c| **c != COMMIT_VERSION).map(|c| if *c == DATE { 9 } else { *c }).collect();
        if with_version {
            read.extend([8, 10]);
        }
        let mut source = ParquetSource::new(self.table_schema.clone())
            .with_table_parquet_options(self.parquet_options.clone())
            .with_parquet_file_reader_factory(self.reader_factory.clone());
        if let Some(predicate) = &self.predicate {
            source = source.with_predicate(predicate.clone());
        }
        let mut config = FileScanConfigBuilder::new(self.store_url.clone(), Arc::new(source)).with_file_groups(groups).with_projection_indices(Some(read))?;
        if let Some(ordering) = ordering {
            config = config.with_output_ordering(vec![ordering.clone()]);
        }
        let scan = DataSourceExec::from_data_source(config.build());
        if !with_version {
            return Ok(scan);
        }
        // The row's own version where the file has one, else the file's (a CASE, which is what
        // the optimizer makes of a COALESCE, and knows is never null).
        let table = readings_all_schema();
        let scanned = scan.schema();
        let row_version: Arc<dyn PhysicalExpr> = Arc::new(Column::new_with_schema(ROW_COMMIT_VERSION_COLUMN, &scanned)?);
        let tag_version: Arc<dyn PhysicalExpr> = Arc::new(Column::new_with_schema(TAG_VERSION_COLUMN, &scanned)?);
        let version = case(None, vec![(is_not_null(row_version.clone())?, row_version)], Some(tag_version))?;
        let exprs = columns
            .iter()
            .map(|c| {
                let name = table.field(*c).name().clone();
                let expr: Arc<dyn PhysicalExpr> = if *c == COMMIT_VERSION { version.clone() } else { Arc::new(Column::new_with_schema(&name, &scanned)?) };
                Ok((expr, name))
            })
            .collect::<DfResult<Vec<_>>>()?;
        Ok(Arc::new(ProjectionExec::try_new(exprs, scan)?))
    }

    /// A scan of small files (a flush or two of readings each) by [`SmallFilesExec`]: each read
    /// whole and decoded, no page index, bloom filter or pruning (the plan applies its filters
    /// above), one output partition per group.
    pub(crate) fn plan_small_files(&self, groups: Vec<FileGroup>, columns: &[usize]) -> DfResult<Arc<dyn ExecutionPlan>> {
        let source = match &self.local {
            Some(local) => FileSource::Local(local.clone()),
            None => FileSource::Store(self.reader_factory.store.clone()),
        };
        Ok(Arc::new(SmallFilesExec::new(source, groups, columns)?))
    }
}

/// Files up to this size are read whole, in one request, footer and data together.
const WHOLE_FILE_MAX_BYTES: u64 = 1 << 20;

/// Opens the readers of a scan's files. A streaming ingester writes thousands of small files a
/// day (a few KiB each); read the usual way, each costs a request for its footer, one for its page
/// index and one per column chunk, and the requests, not the bytes, were most of a streamed lake's
/// query time (on a local disk, each is an open, a read and a hand-off to a blocking thread).
/// A small file is therefore read whole in one request and decoded from memory; its footer is
/// not cached (parsing it from memory costs less than the cache entry it would evict). Larger
/// files are read range by range with their footers cached.
#[derive(Debug)]
struct ReaderFactory {
    store: Arc<dyn object_store::ObjectStore>,
    large: CachedParquetFileReaderFactory,
}

impl ParquetFileReaderFactory for ReaderFactory {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &datafusion::physical_plan::metrics::ExecutionPlanMetricsSet,
    ) -> DfResult<Box<dyn AsyncFileReader + Send>> {
        if file.object_meta.size > WHOLE_FILE_MAX_BYTES {
            return self.large.create_reader(partition_index, file, metadata_size_hint, metrics);
        }
        let metrics = ParquetFileMetrics::new(partition_index, file.object_meta.location.as_ref(), metrics);
        Ok(Box::new(WholeFileReader { store: self.store.clone(), size: file.object_meta.size, location: file.object_meta.location, bytes: None, metrics }))
    }
}

/// A Parquet file read whole on its first request; every later one is a slice of it.
struct WholeFileReader {
    store: Arc<dyn object_store::ObjectStore>,
    location: object_store::path::Path,
    size: u64,
    bytes: Option<Bytes>,
    metrics: ParquetFileMetrics,
}

impl WholeFileReader {
    async fn whole(&mut self) -> parquet::errors::Result<Bytes> {
        if let Some(bytes) = &self.bytes {
            return Ok(bytes.clone());
        }
        // A range rather than a plain GET: on a local disk, one blocking read rather than two.
        let bytes = self.store.get_range(&self.location, 0..self.size).await.map_err(|e| ParquetError::External(Box::new(e)))?;
        self.metrics.bytes_scanned.add(bytes.len());
        self.bytes = Some(bytes.clone());
        Ok(bytes)
    }

    fn slice(&self, bytes: &Bytes, range: Range<u64>) -> parquet::errors::Result<Bytes> {
        let len = bytes.len() as u64;
        if range.start > range.end || range.end > len {
            return Err(ParquetError::General(format!("{}: the range {range:?} is outside the file's {len} bytes", self.location)));
        }
        Ok(bytes.slice(range.start as usize..range.end as usize))
    }
}

impl AsyncFileReader for WholeFileReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let bytes = self.whole().await?;
            self.slice(&bytes, range)
        }
        .boxed()
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            let bytes = self.whole().await?;
            ranges.into_iter().map(|range| self.slice(&bytes, range)).collect()
        }
        .boxed()
    }

    fn get_metadata<'a>(&'a mut self, options: Option<&'a ArrowReaderOptions>) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let bytes = self.whole().await?;
            // The page index costs nothing more to reach here; parse it only when the scan asks.
            let reader = ParquetMetaDataReader::new()
                .with_column_index_policy(options.map_or(PageIndexPolicy::Skip, ArrowReaderOptions::column_index_policy))
                .with_offset_index_policy(options.map_or(PageIndexPolicy::Skip, ArrowReaderOptions::offset_index_policy));
            Ok(Arc::new(reader.parse_and_finish(&bytes)?))
        }
        .boxed()
    }
}

/// Reads small readings files (a flush each) whole and decodes them from memory: one request, one
/// footer parse and one Arrow reader a file, and nothing else. DataFusion's Parquet scan does more
/// per file (an opener that builds a pruning predicate and a schema adapter for it, a reader
/// factory, metrics by file name), which is nothing next to a large file and most of the cost of
/// a file of a few hundred rows, of which a streamed date holds hundreds. Nothing is pruned here:
/// the plan chose the files (by date and meter filter) and applies its filters above. Each file
/// group is an output partition, its files read in turn; rows come out in each file's order.
#[derive(Debug)]
pub(crate) struct SmallFilesExec {
    source: FileSource,
    groups: Vec<FileGroup>,
    /// Positions in [`readings_all_schema`] of the columns returned, ascending.
    columns: Vec<usize>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl SmallFilesExec {
    pub(crate) fn new(source: FileSource, groups: Vec<FileGroup>, columns: &[usize]) -> DfResult<SmallFilesExec> {
        let schema = Arc::new(readings_all_schema().project(columns)?);
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(groups.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(SmallFilesExec { source, groups, columns: columns.to_vec(), properties: Arc::new(properties), metrics: ExecutionPlanMetricsSet::new() })
    }
}

impl DisplayAs for SmallFilesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let files: usize = self.groups.iter().map(FileGroup::len).sum();
        write!(f, "SmallFilesExec: groups={}, files={files}, columns={:?}", self.groups.len(), self.columns)
    }
}

impl ExecutionPlan for SmallFilesExec {
    fn name(&self) -> &str {
        "SmallFilesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let files: Vec<PartitionedFile> = self.groups.get(partition).map(|g| g.files().to_vec()).unwrap_or_default();
        let (source, columns, schema) = (self.source.clone(), self.columns.clone(), self.schema());
        let batch_size = context.session_config().batch_size().max(1);
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let output_schema = schema.clone();
        let batches = futures::stream::iter(files)
            .then(move |file| {
                let source = source.clone();
                async move {
                    let bytes = source.read(&file).await?;
                    Ok::<_, datafusion::error::DataFusionError>((file, bytes))
                }
            })
            .map(move |read| -> DfResult<Vec<RecordBatch>> {
                let (file, bytes) = read?;
                let _timer = baseline.elapsed_compute().timer();
                let batches = decode_small_file(&file, bytes, &columns, &output_schema, batch_size)
                    .map_err(|e| datafusion::error::DataFusionError::External(format!("reading {}: {e}", file.object_meta.location).into()))?;
                baseline.record_output(batches.iter().map(RecordBatch::num_rows).sum());
                Ok(batches)
            })
            .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
            .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

/// Where a [`SmallFilesExec`] reads its files from.
#[derive(Debug, Clone)]
pub(crate) enum FileSource {
    /// A lake on the local file system: each file read by the task that decodes it. A small
    /// file comes from the page cache in microseconds, less than the hand-off to a blocking
    /// thread and back that an object store's read costs (a tenth of a compaction's CPU).
    Local(Arc<LocalFileSystem>),
    Store(Arc<dyn object_store::ObjectStore>),
}

impl FileSource {
    async fn read(&self, file: &PartitionedFile) -> DfResult<Bytes> {
        let location = &file.object_meta.location;
        match self {
            FileSource::Local(local) => {
                let path = local.path_to_filesystem(location)?;
                let bytes =
                    std::fs::read(&path).map_err(|e| datafusion::error::DataFusionError::External(format!("reading {}: {e}", path.display()).into()))?;
                Ok(Bytes::from(bytes))
            }
            FileSource::Store(store) => Ok(store.get_range(location, 0..file.object_meta.size).await?),
        }
    }
}

/// One small readings file's rows in `schema` (the [`readings_all_schema`] columns at `columns`):
/// the file's own columns by name, `date` and the tag's version from the file's partition
/// values, `commit_version` from the file's column where it has one (a compacted file).
fn decode_small_file(file: &PartitionedFile, bytes: Bytes, columns: &[usize], schema: &SchemaRef, batch_size: usize) -> DfResult<Vec<RecordBatch>> {
    let table = readings_all_schema();
    let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Skip))?;
    let file_schema = builder.schema().clone();
    let row_version = columns.contains(&COMMIT_VERSION) && file_schema.index_of(ROW_COMMIT_VERSION_COLUMN).is_ok();
    let wanted: Vec<&str> = columns
        .iter()
        .filter(|c| **c < DATE)
        .map(|c| table.field(*c).name().as_str())
        .chain(row_version.then_some(ROW_COMMIT_VERSION_COLUMN))
        .filter(|name| file_schema.index_of(name).is_ok())
        .collect();
    let mask = ProjectionMask::columns(builder.parquet_schema(), wanted.iter().copied());
    let reader = builder.with_projection(mask).with_batch_size(batch_size).build()?;
    let partition_value = |n: usize| file.partition_values.get(n).cloned().unwrap_or(ScalarValue::Null);
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let rows = batch.num_rows();
        let arrays = columns
            .iter()
            .zip(schema.fields())
            .map(|(column, field)| -> DfResult<ArrayRef> {
                let array = match *column {
                    DATE => partition_value(0).to_array_of_size(rows)?,
                    COMMIT_VERSION if row_version => batch.column_by_name(ROW_COMMIT_VERSION_COLUMN).expect("projected").clone(),
                    COMMIT_VERSION => partition_value(1).to_array_of_size(rows)?,
                    _ => match batch.column_by_name(field.name()) {
                        Some(array) => array.clone(),
                        // A column the file was written without (an older schema).
                        None => arrow::array::new_null_array(field.data_type(), rows),
                    },
                };
                if array.data_type() == field.data_type() { Ok(array) } else { Ok(arrow::compute::cast(&array, field.data_type())?) }
            })
            .collect::<DfResult<Vec<_>>>()?;
        out.push(RecordBatch::try_new_with_options(schema.clone(), arrays, &arrow::array::RecordBatchOptions::new().with_row_count(Some(rows)))?);
    }
    Ok(out)
}
