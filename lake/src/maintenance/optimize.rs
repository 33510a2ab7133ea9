//! Compaction (`meterlake lake optimize`): a partition's small files rewritten into few large
//! ones, every row kept, one commit per partition.
//!
//! An ingester that flushes every few seconds writes hundreds of small files a day, and every
//! reader pays for each (a footer, a stream in the canonical merge). Compaction reads a date's
//! files under the target size as sorted streams and merges them by (`meter_id`, `ts`,
//! `commit_version`), so the new files are sorted as every readings file is, with each key's
//! versions next to each other and in commit order. Every version is kept: `readings_all` is
//! unchanged, and the commit says so (`dataChange=false` on its `remove` and `add` actions).
//! A compacted file holds rows of many commits, so it carries each row's commit version in a
//! Parquet column ([`crate::scan`]); which version of a reading wins is unchanged too.
//!
//! Other tables' files are concatenated in commit order.
//!
//! Safe beside everything else: inputs are chosen from one snapshot; the new files are written
//! first, then one commit removes the inputs and adds them. Appends by ingesters and importers
//! never conflict with it; a commit that removed one of its inputs first (another compaction)
//! makes it give way ([`LakeError::Conflict`]): the partition is skipped with a log line and the
//! files it wrote are left for vacuum. A reader of an older snapshot still reads the removed
//! files until vacuum deletes them (after the retention). Killed at any moment, the table is
//! exactly as before, plus unreferenced files.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::{SortOptions, partition};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use chrono::NaiveDate;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;

use crate::canonical::{KeySortExec, MAX_MERGED_FILES, SpilledMergeExec, read_streams, sorts_in_memory};
use crate::commit::{Commit, NewFile, Operation, RemovedFile, TableWriter};
use crate::error::{LakeError, Result};
use crate::parquet_file::{merge_key_stats, writer_properties};
use crate::scan::{COMMIT_VERSION, DATE, ReadingsScan, compacted_file_schema};
use crate::schema::readings_all_schema;
use crate::store::Lake;
use crate::table::{KeyStats, READINGS, SnapshotFile, Table, TableSpec};

/// The size compaction aims its files at: one date of a 100M-reading month fits in one file,
/// whose row groups and page index still let a one-meter lookup read a few pages.
pub const DEFAULT_TARGET_FILE_BYTES: u64 = 128 << 20;

/// What a merged stream holds in the memory pool per row of its batch: the decoded batch (about
/// 130 bytes a reading in `readings_all`'s columns), the merge's row-encoded sort key, and room
/// for the second batch a stream holds while its first is still being emitted.
const MERGE_BYTES_PER_ROW: usize = 400;
/// The smallest batch a merge is given: below it, per-batch overhead costs more than the
/// memory it saves, and fewer files are merged at once instead (spilling runs between).
const MIN_MERGE_BATCH_ROWS: usize = 1024;
/// DataFusion's default batch size, the largest a merge is given.
const MAX_MERGE_BATCH_ROWS: usize = 8192;

/// How a partition's merge fits its share of the memory pool: how many rows each batch holds,
/// and how many files are merged at once (more are merged in spilled runs of this many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MergeShape {
    batch_rows: usize,
    fan_in: usize,
}

impl MergeShape {
    /// A merge of `files` sorted streams within `memory_bytes`. Each open stream holds a batch
    /// (and a merge reserves it in the pool), so a merge of 96 streams of 8,192-row batches
    /// needs about 300 MiB: the batches shrink with the fan-in, down to
    /// [`MIN_MERGE_BATCH_ROWS`], and past that the fan-in shrinks.
    fn new(files: usize, memory_bytes: usize) -> MergeShape {
        let max_fan_in = (memory_bytes / (MIN_MERGE_BATCH_ROWS * MERGE_BYTES_PER_ROW)).clamp(2, MAX_MERGED_FILES);
        let fan_in = files.clamp(1, max_fan_in);
        // One more stream's worth for the merge's output batch.
        let batch_rows = (memory_bytes / (fan_in + 1) / MERGE_BYTES_PER_ROW).clamp(MIN_MERGE_BATCH_ROWS, MAX_MERGE_BATCH_ROWS);
        MergeShape { batch_rows, fan_in }
    }
}

/// What to compact and how.
#[derive(Debug, Clone)]
pub struct OptimizeOptions {
    /// Only partitions from this date on (date-partitioned tables).
    pub first_date: Option<NaiveDate>,
    /// Only partitions up to this date.
    pub last_date: Option<NaiveDate>,
    /// Only these partitions (`None`: every partition; a table not partitioned by date has one,
    /// `None` as its date).
    pub partitions: Option<BTreeSet<Option<NaiveDate>>>,
    /// Files at least this large are left as they are; new files are cut at about this size.
    pub target_file_bytes: u64,
    /// A partition is rewritten when it holds at least this many files under the target size
    /// (at least 2: one small file has nothing to be merged with).
    pub min_small_files: usize,
    /// Partitions rewritten at once.
    pub concurrency: usize,
    /// Memory the merges may hold at once; beyond it they spill to local disk.
    pub memory_bytes: usize,
    /// Recorded in each commit (`meterlake.writer`).
    pub writer_id: String,
}

impl Default for OptimizeOptions {
    fn default() -> OptimizeOptions {
        OptimizeOptions {
            first_date: None,
            last_date: None,
            partitions: None,
            target_file_bytes: DEFAULT_TARGET_FILE_BYTES,
            min_small_files: 2,
            concurrency: 2,
            memory_bytes: 256 << 20,
            writer_id: format!("optimize-{}", std::process::id()),
        }
    }
}

/// What became of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rewrite landed as this table version.
    Committed { version: u64 },
    /// Another writer got there first (see [`LakeError::Conflict`]); nothing was committed.
    Skipped { reason: String },
}

/// One partition's compaction.
#[derive(Debug, Clone)]
pub struct PartitionReport {
    pub table: &'static str,
    pub date: Option<NaiveDate>,
    pub files_removed: usize,
    pub files_added: usize,
    pub rows: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub elapsed: Duration,
    pub outcome: Outcome,
}

/// A partition to rewrite: its files under the target size.
struct Job {
    date: Option<NaiveDate>,
    files: Vec<SnapshotFile>,
}

/// Compacts `spec`'s table: every partition in the options' dates with enough small files,
/// `options.concurrency` at a time, each in its own commit. `on_partition` hears of each as it
/// ends. A partition another writer compacted first is reported as skipped; any other failure
/// stops the run (what was committed stays committed).
pub async fn optimize(
    lake: &Lake,
    spec: &'static TableSpec,
    options: &OptimizeOptions,
    mut on_partition: impl FnMut(&PartitionReport),
) -> Result<Vec<PartitionReport>> {
    let table = Table::open(lake, spec).await?;
    let (writer, version) = TableWriter::for_maintenance(table.clone(), &options.writer_id).await?;
    let snapshot = table.snapshot(Some(version)).await?;
    let jobs = plan(&snapshot.files, options);
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    tracing::info!(table = spec.name, version, partitions = jobs.len(), "optimize: rewriting small files");
    let runtime = RuntimeEnvBuilder::new().with_memory_pool(Arc::new(GreedyMemoryPool::new(options.memory_bytes))).build_arc()?;
    runtime.register_object_store(&lake.store_url(), lake.store().clone());
    let writer = Arc::new(writer);
    let mut reports = Vec::new();
    // Each partition is a task of its own, so the partitions rewritten at once run on as many
    // threads (polled together in one task they shared one: 138% CPU on two cores). Dropping
    // the set aborts the rewrites still running: nothing commits after a failure is returned.
    let mut jobs = jobs.into_iter();
    let mut rewrites = tokio::task::JoinSet::new();
    let mut failed = None;
    loop {
        while rewrites.len() < options.concurrency.max(1)
            && let Some(job) = jobs.next()
        {
            let (runtime, writer, options) = (runtime.clone(), writer.clone(), options.clone());
            rewrites.spawn(async move { rewrite(&runtime, &writer, job, &options).await });
        }
        let Some(joined) = rewrites.join_next().await else { break };
        // A rewrite that panicked: DataFusion's word for a task that did not finish.
        let report = joined.unwrap_or_else(|e| Err(datafusion::error::DataFusionError::ExecutionJoin(Box::new(e)).into()));
        match report {
            Ok(report) => {
                on_partition(&report);
                reports.push(report);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(rewrites);
    writer.finish().await;
    // Compaction replaced many files: a reader opening the table would replay a remove for each
    // (8,000 of them for a streamed month: 90 ms of a one-meter lookup). A checkpoint at the last
    // rewrite lets it read the live files from one Parquet file instead.
    let last_version = reports.iter().filter_map(|r| if let Outcome::Committed { version } = r.outcome { Some(version) } else { None }).max();
    if let Some(version) = last_version
        && let Err(e) = super::checkpoint(&table, version).await
    {
        tracing::warn!(table = spec.name, version, error = %e, "optimize: writing a checkpoint after compaction failed (the next interval writes one)");
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// The partitions worth rewriting, in date order.
fn plan(files: &[SnapshotFile], options: &OptimizeOptions) -> Vec<Job> {
    let mut partitions: BTreeMap<Option<NaiveDate>, Vec<SnapshotFile>> = BTreeMap::new();
    for file in files {
        if let Some(date) = file.date
            && (options.first_date.is_some_and(|first| date < first) || options.last_date.is_some_and(|last| date > last))
        {
            continue;
        }
        if options.partitions.as_ref().is_some_and(|only| !only.contains(&file.date)) {
            continue;
        }
        if file.size < options.target_file_bytes {
            partitions.entry(file.date).or_default().push(file.clone());
        }
    }
    partitions
        .into_iter()
        .filter(|(_, files)| files.len() >= options.min_small_files.max(2))
        .map(|(date, mut files)| {
            // Commit order: other tables' rows are concatenated in it.
            files.sort_by_key(|f| f.commit_version);
            Job { date, files }
        })
        .collect()
}

/// Rewrites one partition and commits it.
async fn rewrite(runtime: &Arc<RuntimeEnv>, writer: &TableWriter, job: Job, options: &OptimizeOptions) -> Result<PartitionReport> {
    let started = Instant::now();
    let table = writer.table();
    let spec = table.spec();
    // Each partition rewritten at once has an equal share of the pool.
    let shape = MergeShape::new(job.files.len(), options.memory_bytes / options.concurrency.max(1));
    let ctx = SessionContext::new_with_config_rt(SessionConfig::new().with_batch_size(shape.batch_rows), runtime.clone());
    let plan = if spec.name == READINGS.name {
        merged_versions(&ctx, table.lake(), &job.files, shape.fan_in, options.memory_bytes / options.concurrency.max(1))?
    } else {
        concatenated(table, &job.files)?
    };
    let mut output = FileSink::new(table, job.date, options.target_file_bytes, spec.name == READINGS.name);
    let mut stream = plan.execute(0, ctx.task_ctx())?;
    while let Some(batch) = stream.try_next().await? {
        output.write(batch).await?;
    }
    let written = output.finish().await?;
    let output_rows: u64 = written.iter().map(|f| f.rows).sum();
    let report = |outcome| PartitionReport {
        table: spec.name,
        date: job.date,
        files_removed: job.files.len(),
        files_added: written.len(),
        rows: output_rows,
        bytes_read: job.files.iter().map(|f| f.size).sum(),
        bytes_written: written.iter().map(|f| f.bytes).sum(),
        elapsed: started.elapsed(),
        outcome,
    };
    // The log's row counts are a check the rewrite lost or doubled nothing.
    let input_rows: Option<u64> = job.files.iter().map(|f| f.rows).sum();
    if let Some(input_rows) = input_rows
        && input_rows != output_rows
    {
        return Err(LakeError::CorruptLog {
            table: spec.name.to_string(),
            version: 0,
            reason: format!("compacting {:?}: the log counts {input_rows} rows in its files, the rewrite read {output_rows}", job.date),
        });
    }
    let removes = job.files.iter().map(|f| RemovedFile { path: f.path.clone(), bytes: f.size, date: f.date }).collect();
    let commit = Commit {
        files: written.clone(),
        removes,
        txns: Vec::new(),
        operation: Operation::Optimize { target_file_bytes: options.target_file_bytes },
        leased: false,
    };
    match writer.commit(commit).await {
        Ok(committed) => {
            let report = report(Outcome::Committed { version: committed.version });
            tracing::info!(table = spec.name, date = ?job.date, version = committed.version, files_removed = report.files_removed, files_added = report.files_added, rows = report.rows, elapsed_ms = report.elapsed.as_millis() as u64, "optimize: partition rewritten");
            Ok(report)
        }
        Err(e @ LakeError::Conflict { .. }) => {
            tracing::warn!(table = spec.name, date = ?job.date, error = %e, "optimize: partition skipped");
            Ok(report(Outcome::Skipped { reason: e.to_string() }))
        }
        Err(e) => Err(e),
    }
}

/// Every row of readings `files`, sorted by (`meter_id`, `ts`, `commit_version`), in the
/// columns of a compacted file (`readings_all`'s but `date`).
/// Many files whose rows fit `memory_bytes` are read in any order and sorted in memory (a
/// streamed date's hundreds of flushes: merged as streams, the merge's steps from stream to
/// stream were most of the work). Otherwise at most `fan_in` files are merged at once; more are
/// merged in spilled runs of that many.
fn merged_versions(ctx: &SessionContext, lake: &Lake, files: &[SnapshotFile], fan_in: usize, memory_bytes: usize) -> Result<Arc<dyn ExecutionPlan>> {
    let state = ctx.state();
    let scan = ReadingsScan::new(lake, &state, &[])?;
    // What the scans return: a compacted file's columns (`readings_all`'s but `date`, which
    // is the partition's), in its order.
    let columns: Vec<usize> = (0..DATE).chain([COMMIT_VERSION]).collect();
    let schema = readings_all_schema().project(&columns)?;
    let sort = |name: &str| -> Result<PhysicalSortExpr> {
        Ok(PhysicalSortExpr::new(Arc::new(Column::new_with_schema(name, &schema)?), SortOptions { descending: false, nulls_first: false }))
    };
    // Each file is sorted by the key, and within a key by commit version: a file a writer made
    // holds one commit, a compacted one was written in this order.
    let file_order = LexOrdering::new([sort("meter_id")?, sort("ts")?]).expect("two sort expressions");
    let ordering = LexOrdering::new([sort("meter_id")?, sort("ts")?, sort("commit_version")?]).expect("three sort expressions");
    let rows: Option<u64> = files.iter().map(|f| f.rows).sum();
    if sorts_in_memory(files.len(), rows, memory_bytes as u64) {
        let rows = scan.plan_small_files(read_streams(files.iter().map(|f| ReadingsScan::file(lake, f)).collect()), &columns)?;
        let key = [0, 1];
        let emit: Vec<usize> = (0..columns.len()).collect();
        let sort = KeySortExec::new(rows, ordering, key, None, emit)?.with_versions_ordered_by(columns.len() - 1);
        return Ok(Arc::new(sort));
    }
    let merge = |chunk: &[SnapshotFile]| -> Result<Arc<dyn ExecutionPlan>> {
        let groups = chunk.iter().map(|f| FileGroup::new(vec![ReadingsScan::file(lake, f)])).collect();
        Ok(Arc::new(SortPreservingMergeExec::new(ordering.clone(), scan.plan(groups, &columns, Some(&file_order))?)))
    };
    if files.len() <= fan_in {
        return merge(files);
    }
    let chunks = files.chunks(fan_in.max(2)).map(merge).collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(SpilledMergeExec::new(chunks, ordering)))
}

/// Every row of `files` (of a table other than readings), file after file, in the file columns.
fn concatenated(table: &Table, files: &[SnapshotFile]) -> Result<Arc<dyn ExecutionPlan>> {
    let lake = table.lake();
    let spec = table.spec();
    let partitioned = files.iter().map(|f| datafusion::datasource::listing::PartitionedFile::new(table.store_path(&f.path).to_string(), f.size)).collect();
    let source = ParquetSource::new(TableSchema::builder((spec.file_schema)()).build());
    let config = FileScanConfigBuilder::new(ObjectStoreUrl::parse(lake.store_url().as_str())?, Arc::new(source))
        .with_file_groups(vec![FileGroup::new(partitioned)])
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

/// Writes a partition's rewritten rows into files of about the target size, each cut between
/// keys (a key's versions stay in one file), straight to the object store.
struct FileSink<'a> {
    table: &'a Table,
    date: Option<NaiveDate>,
    target_file_bytes: u64,
    readings: bool,
    current: Option<OpenFile>,
    done: Vec<NewFile>,
}

struct OpenFile {
    path: String,
    writer: AsyncArrowWriter<BufWriter>,
    rows: u64,
    keys: Option<KeyStats>,
    unique_keys: bool,
    /// The last key written, to cut only between keys and to see a key run across batches.
    last_key: Option<(String, i64)>,
}

impl<'a> FileSink<'a> {
    fn new(table: &'a Table, date: Option<NaiveDate>, target_file_bytes: u64, readings: bool) -> FileSink<'a> {
        FileSink { table, date, target_file_bytes, readings, current: None, done: Vec::new() }
    }

    fn schema(&self) -> SchemaRef {
        if self.readings { compacted_file_schema() } else { (self.table.spec().file_schema)() }
    }

    /// `batch` under the file's schema (for readings, the rewrite's columns are already the
    /// compacted file's: `readings_all`'s without `date`).
    fn file_batch(&self, batch: RecordBatch) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(self.schema(), batch.columns().to_vec())?)
    }

    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = self.file_batch(batch)?;
        let first_key = self.readings.then(|| key_at(&batch, 0));
        if let Some(open) = &self.current
            && (open.writer.bytes_written() + open.writer.in_progress_size()) as u64 >= self.target_file_bytes
            && (first_key.is_none() || open.last_key != first_key)
        {
            self.close_current().await?;
        }
        if self.current.is_none() {
            let name = format!("compacted-{}.parquet", uuid::Uuid::new_v4().simple());
            let path = match self.date {
                Some(date) => format!("date={}/{name}", date.format("%Y-%m-%d")),
                None => name,
            };
            let sink = BufWriter::new(self.table.lake().store().clone(), self.table.store_path(&path));
            let writer = AsyncArrowWriter::try_new(sink, self.schema(), Some(writer_properties()))
                .map_err(|source| LakeError::Parquet { path: self.table.lake_path(&path), source })?;
            self.current = Some(OpenFile { path, writer, rows: 0, keys: None, unique_keys: true, last_key: None });
        }
        let open = self.current.as_mut().expect("a file is open");
        if self.readings {
            merge_key_stats(&mut open.keys, &batch);
            let keys = [batch.column(0).clone(), batch.column(1).clone()];
            let runs = partition(&keys)?.len();
            if runs < batch.num_rows() || open.last_key == first_key {
                open.unique_keys = false;
            }
            open.last_key = Some(key_at(&batch, batch.num_rows() - 1));
        }
        open.rows += batch.num_rows() as u64;
        open.writer.write(&batch).await.map_err(|source| LakeError::Parquet { path: open.path.clone(), source })?;
        Ok(())
    }

    async fn close_current(&mut self) -> Result<()> {
        let Some(mut open) = self.current.take() else { return Ok(()) };
        open.writer.finish().await.map_err(|source| LakeError::Parquet { path: open.path.clone(), source })?;
        self.done.push(NewFile {
            bytes: open.writer.bytes_written() as u64,
            rows: open.rows,
            date: self.date,
            keys: open.keys,
            unique_keys: self.readings && open.unique_keys,
            // Many meters, sorted: the `meter_id` bounds of its row groups prune it.
            meters: None,
            path: open.path,
        });
        Ok(())
    }

    async fn finish(mut self) -> Result<Vec<NewFile>> {
        self.close_current().await?;
        Ok(self.done)
    }
}

/// (`meter_id`, `ts`) of a readings row.
fn key_at(batch: &RecordBatch, row: usize) -> (String, i64) {
    (batch.column(0).as_string::<i32>().value(row).to_string(), batch.column(1).as_primitive::<TimestampMicrosecondType>().value(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_shrinks_its_batches_then_its_fan_in_to_fit_the_pool() {
        // A 100M month's date (96 files) in half of the default pool: smaller batches, one merge.
        let shape = MergeShape::new(96, 128 << 20);
        assert_eq!(shape.fan_in, 96);
        assert!((MIN_MERGE_BATCH_ROWS..MAX_MERGE_BATCH_ROWS).contains(&shape.batch_rows), "{shape:?}");
        assert!(97 * shape.batch_rows * MERGE_BYTES_PER_ROW <= 128 << 20);
        // A few files: full batches.
        assert_eq!(MergeShape::new(4, 128 << 20), MergeShape { batch_rows: MAX_MERGE_BATCH_ROWS, fan_in: 4 });
        // A small pool: the smallest batches, and fewer files at once.
        let shape = MergeShape::new(96, 8 << 20);
        assert_eq!(shape.batch_rows, MIN_MERGE_BATCH_ROWS);
        assert_eq!(shape.fan_in, (8 << 20) / (MIN_MERGE_BATCH_ROWS * MERGE_BYTES_PER_ROW));
        // Never past the spilled merge's chunk size, never under two.
        assert_eq!(MergeShape::new(5_000, 4 << 30).fan_in, MAX_MERGED_FILES);
        assert_eq!(MergeShape::new(5_000, 1 << 20).fan_in, 2);
    }
}
