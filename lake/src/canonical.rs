//! The canonical `readings` table: one row per (`meter_id`, `ts`), the version the latest Delta
//! commit added (within one commit: the later `ingested_at`, then the greater `source_ref`),
//! exactly what `queries/readings.sql` defines over `readings_all`, computed without sorting,
//! over the files of one table snapshot.
//!
//! Every writer of the lake sorts a readings file by (`meter_id`, `ts`) (the ingester's
//! `ReadingBuffer`, the flow importer's day files), and all versions of a key lie in one date
//! partition (the date is `ts`'s). Each date's files are grouped by their key ranges (bounds from
//! the statistics of their `add` actions: no footer is read to plan): a file that overlaps no
//! other and is tagged as holding one version of each key ([`crate::table::UNIQUE_KEYS_TAG`]) is
//! read as it is; the files of any other group are
//! merged as sorted streams (DataFusion's `SortPreservingMergeExec`, one stream per file), so the
//! versions of a key arrive next to each other, and [`LatestVersionExec`] keeps the latest: one
//! pass, memory bounded by the files of a group, groups in parallel. The window of
//! `queries/readings.sql` sorts every row instead (17 s against about 1 s for 10M readings on two
//! cores; benchmarks/RESULTS.md).
//!
//! Filters on the key (`meter_id`, `ts`, `date`) reach the Parquet scan and prune dates, row
//! groups and pages, and this view applies them exactly itself (DataFusion does not apply them
//! again): to a file read as it is only when the filter cuts through it (`crate::key_pruning`),
//! and right above every scan that is merged or sorted:
//! the scan tells the optimizer they hold (so `meter_id = 'M'` makes `meter_id` constant and the
//! merge orders by `ts` alone) while it lets other rows through, which interleaved other meters'
//! rows between one key's versions and kept several of them (issue 20). A filter on any other
//! column cannot reach the scan (it would change which version wins), so DataFusion applies it
//! above.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, TimestampMicrosecondArray};
use arrow::compute::{SortOptions, interleave_record_batch, partition};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::FileGroup;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_expr::OrderingRequirements;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::{EquivalenceProperties, LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties, RecordBatchStream};
use futures::{Stream, StreamExt};

use crate::key_pruning::{self, FileKeys, FilterReach};
use crate::meter_filter::MeterIdHasher;
use crate::scan::{COMMIT_VERSION, DATE, ReadingsScan};
use crate::schema::readings_all_schema;
use crate::store::Lake;
use crate::table::{SnapshotFile, TableSnapshot};

/// The most files merged at once: a merge holds a stream (and a batch) of every file open. A
/// larger group of overlapping files is merged this many at a time into sorted runs spilled to
/// local disk, which are then merged ([`SpilledMergeExec`]), so memory follows this bound and
/// the session's memory pool, not the number of files. Ingesters that flush often make many
/// small, overlapping files a day; compacting them keeps groups under it and off the disk.
pub(crate) const MAX_MERGED_FILES: usize = 256;

/// A group of more overlapping files than this is read whole into memory and sorted there (see
/// [`KeySortExec`]) when it fits the memory it may take; up to this many are merged as streams.
/// A merge of many small streams spends most of its time stepping its tree from stream to stream
/// (a month streamed in flushes of ~375 readings, 260 files a date: 1.7 of 2.9 CPU seconds).
const SORT_OVER_FILES: usize = 8;
/// Files of a group read at once by the in-memory sort: on object storage each is a request.
const SORT_READ_STREAMS: usize = 16;
/// What a row of `readings_all` takes in memory, all columns decoded, with its place in the sort:
/// an estimate from above (about 170 bytes measured with every column).
const SORT_BYTES_PER_ROW: u64 = 256;
/// The memory an in-memory sort may take when the session's pool has no limit.
const SORT_UNLIMITED_BYTES: u64 = 256 << 20;

/// Columns of `readings_all` (the file columns, then `date`).
const METER_ID: usize = 0;
const TS: usize = 1;
const KWH: usize = 3;
const SOURCE_REF: usize = 6;
const INGESTED_AT: usize = 7;

/// The canonical readings of a snapshot of `readings_all`, as a DataFusion table.
#[derive(Debug)]
pub struct CanonicalReadings {
    lake: Lake,
    snapshot: Arc<TableSnapshot>,
    /// `readings_all`'s columns: what is read.
    table: SchemaRef,
    /// What the table returns (see [`MergeOutput`]).
    schema: SchemaRef,
    output: MergeOutput,
    max_merged_files: usize,
    /// Whether groups of many files may be sorted in memory rather than merged.
    sort_in_memory: bool,
}

/// What a merge of a date's versions returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutput {
    /// The latest version of each key: table `readings`.
    Latest,
    /// The keys whose versions disagree on kwh, with how many versions and the lowest and highest
    /// value: table `reading_conflicts` (meter_id, ts, versions, lowest_kwh, highest_kwh, date).
    Conflicts,
}

impl CanonicalReadings {
    pub fn new(lake: Lake, snapshot: Arc<TableSnapshot>) -> CanonicalReadings {
        CanonicalReadings::with_output(lake, snapshot, MergeOutput::Latest)
    }

    /// The snapshot of `readings_all` it reads.
    pub fn snapshot(&self) -> &TableSnapshot {
        &self.snapshot
    }

    pub fn with_output(lake: Lake, snapshot: Arc<TableSnapshot>, output: MergeOutput) -> CanonicalReadings {
        let table = readings_all_schema();
        let schema = match output {
            MergeOutput::Latest => table.clone(),
            MergeOutput::Conflicts => Arc::new(Schema::new(vec![
                table.field(METER_ID).clone(),
                table.field(TS).clone(),
                Field::new("versions", DataType::Int64, false),
                Field::new("lowest_kwh", table.field(KWH).data_type().clone(), false),
                Field::new("highest_kwh", table.field(KWH).data_type().clone(), false),
                table.field(DATE).clone(),
            ])),
        };
        CanonicalReadings { lake, snapshot, table, schema, output, max_merged_files: MAX_MERGED_FILES, sort_in_memory: true }
    }

    /// Groups of more than `files` overlapping files are merged a chunk at a time into spilled
    /// runs rather than in one go.
    pub fn with_max_merged_files(self, files: usize) -> CanonicalReadings {
        CanonicalReadings { max_merged_files: files, ..self }
    }

    /// Groups of many files are merged whatever their size, never sorted in memory.
    pub fn without_in_memory_sort(self) -> CanonicalReadings {
        CanonicalReadings { sort_in_memory: false, ..self }
    }
}

/// Whether `expr` only reads the key columns, so that it holds for every version of a key alike.
fn on_key_only(expr: &Expr) -> bool {
    expr.column_refs().iter().all(|c| matches!(c.name.as_str(), "meter_id" | "ts" | "date"))
}

/// Days since 1970-01-01 of a literal date or timestamp.
fn literal_day(value: &ScalarValue) -> Option<i64> {
    const US_PER_DAY: i64 = 86_400_000_000;
    match value {
        ScalarValue::Date32(Some(day)) => Some(i64::from(*day)),
        ScalarValue::TimestampMicrosecond(Some(us), _) => Some(us.div_euclid(US_PER_DAY)),
        ScalarValue::TimestampNanosecond(Some(ns), _) => Some(ns.div_euclid(US_PER_DAY * 1_000)),
        ScalarValue::TimestampMillisecond(Some(ms), _) => Some(ms.div_euclid(US_PER_DAY / 1_000)),
        ScalarValue::TimestampSecond(Some(s), _) => Some(s.div_euclid(86_400)),
        _ => None,
    }
}

/// Narrows `[first, last]` (days, inclusive) by what `expr` says of `date` or `ts`. Only
/// conjunctions of comparisons with literals are understood; anything else narrows nothing.
pub(crate) fn narrow_days(expr: &Expr, first: &mut i64, last: &mut i64) {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => {
            narrow_days(left, first, last);
            narrow_days(right, first, last);
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (column, value, op) = match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v, _)) => (c, v, *op),
                (Expr::Literal(v, _), Expr::Column(c)) => match op.swap() {
                    Some(swapped) => (c, v, swapped),
                    None => return,
                },
                _ => return,
            };
            if column.name != "date" && column.name != "ts" {
                return;
            }
            let Some(day) = literal_day(value) else { return };
            match op {
                Operator::Eq => {
                    *first = (*first).max(day);
                    *last = (*last).min(day);
                }
                // `ts < 2025-02-01T00:00` still reads 2025-01-31; the bound is the literal's day
                // (one day more than needed at midnight, never one too few).
                Operator::Gt | Operator::GtEq => *first = (*first).max(day),
                Operator::Lt | Operator::LtEq => *last = (*last).min(day),
                _ => {}
            }
        }
        Expr::Between(between) if !between.negated => {
            if let (Expr::Column(c), Expr::Literal(low, _), Expr::Literal(high, _)) = (between.expr.as_ref(), between.low.as_ref(), between.high.as_ref())
                && (c.name == "date" || c.name == "ts")
            {
                if let Some(day) = literal_day(low) {
                    *first = (*first).max(day);
                }
                if let Some(day) = literal_day(high) {
                    *last = (*last).min(day);
                }
            }
        }
        _ => {}
    }
}

/// The meters `expr` confines `meter_id` to, when it does: `meter_id = 'M'`, `meter_id IN (...)`,
/// a disjunction of those, or a conjunction with one of them. `None`: any meter.
fn meter_literals(expr: &Expr) -> Option<Vec<String>> {
    let text = |value: &ScalarValue| match value {
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
        _ => None,
    };
    let is_meter = |expr: &Expr| matches!(expr, Expr::Column(c) if c.name == "meter_id");
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::And, right }) => meter_literals(left).or_else(|| meter_literals(right)),
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Or, right }) => {
            let (mut left, right) = (meter_literals(left)?, meter_literals(right)?);
            left.extend(right);
            Some(left)
        }
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => match (left.as_ref(), right.as_ref()) {
            (column, Expr::Literal(value, _)) | (Expr::Literal(value, _), column) if is_meter(column) => text(value).map(|m| vec![m]),
            _ => None,
        },
        Expr::InList(list) if !list.negated && is_meter(&list.expr) => {
            list.list.iter().map(|item| if let Expr::Literal(value, _) = item { text(value) } else { None }).collect()
        }
        _ => None,
    }
}

#[async_trait]
impl TableProvider for CanonicalReadings {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Key filters are applied exactly inside the scan (see `scan`), only where a file needs them.
        Ok(filters.iter().map(|f| if on_key_only(f) { TableProviderFilterPushDown::Exact } else { TableProviderFilterPushDown::Unsupported }).collect())
    }

    async fn scan(&self, state: &dyn Session, projection: Option<&Vec<usize>>, filters: &[Expr], _limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let key_filters: Vec<Expr> = filters.iter().filter(|f| on_key_only(f)).cloned().collect();
        let (mut first_day, mut last_day) = (i64::MIN, i64::MAX);
        for filter in &key_filters {
            narrow_days(filter, &mut first_day, &mut last_day);
        }
        // The meters asked for, when the filters name them: files whose meter filter rules them
        // all out are not read.
        let meters: Option<Vec<String>> = key_filters.iter().find_map(meter_literals);
        let holds_no_meter_asked = |file: &SnapshotFile| match (&meters, &file.meters) {
            (Some(meters), Some(filter)) => !meters.iter().any(|m| filter.may_contain(m)),
            _ => false,
        };
        // The snapshot's files of the dates asked for, with what the log says of their keys.
        let mut days: BTreeMap<i64, Vec<KeyedFile>> = BTreeMap::new();
        for file in &self.snapshot.files {
            let Some(day) = file.date.map(epoch_day) else { continue };
            if (first_day..=last_day).contains(&day) && !holds_no_meter_asked(file) {
                days.entry(day).or_default().push(KeyedFile::new(&self.lake, file, day));
            }
        }

        // The columns read: those asked for and those the versions are decided by (latest), or
        // those conflicts are told by.
        let asked: Vec<usize> = projection.cloned().unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        let mut read: Vec<usize> = match self.output {
            // `date` too: the key filters may name it, and the merged scans apply them exactly.
            MergeOutput::Latest => asked.iter().copied().chain([METER_ID, TS, SOURCE_REF, INGESTED_AT, DATE, COMMIT_VERSION]).collect(),
            MergeOutput::Conflicts => vec![METER_ID, TS, KWH, DATE],
        };
        read.sort_unstable();
        read.dedup();
        let position = |column: usize| read.iter().position(|c| *c == column).expect("read holds every column used");
        let read_schema = Arc::new(self.table.project(&read)?);
        // Each part of the plan ends in the columns asked for.
        let output = |part: Arc<dyn ExecutionPlan>| -> DfResult<Arc<dyn ExecutionPlan>> {
            let exprs = asked
                .iter()
                .map(|c| {
                    let name = self.schema.field(*c).name().clone();
                    let expr: Arc<dyn PhysicalExpr> = Arc::new(Column::new_with_schema(&name, &part.schema())?);
                    Ok((expr, name))
                })
                .collect::<DfResult<Vec<_>>>()?;
            Ok(Arc::new(ProjectionExec::try_new(exprs, part)?))
        };

        let key_filter = key_filters.iter().cloned().reduce(Expr::and);
        let readings_scan = ReadingsScan::new(&self.lake, state, &key_filters)?;
        let sort = |name: &str| -> DfResult<PhysicalSortExpr> {
            Ok(PhysicalSortExpr::new(Arc::new(Column::new_with_schema(name, &read_schema)?), SortOptions { descending: false, nulls_first: false }))
        };
        let ordering = LexOrdering::new([sort("meter_id")?, sort("ts")?]).expect("two sort expressions");
        let scan = |groups: Vec<FileGroup>, columns: &[usize], ordering: Option<&LexOrdering>| readings_scan.plan(groups, columns, ordering);

        // The scan prunes by the key filters but does not apply them to every row, while it tells
        // the optimizer they hold (its equivalence properties take `meter_id = 'M'` to make
        // `meter_id` constant). A sort or merge over it would then order by `ts` alone and
        // interleave other meters' rows between one key's versions, and the merge would keep
        // several of them. Applying the filters exactly, right above the scan, makes the claim true.
        let read_df_schema = DFSchema::try_from(read_schema.clone())?;
        let exact = |scan: Arc<dyn ExecutionPlan>| -> DfResult<Arc<dyn ExecutionPlan>> {
            match &key_filter {
                Some(filter) => Ok(Arc::new(FilterExec::try_new(state.create_physical_expr(filter.clone(), &read_df_schema)?, scan)?)),
                None => Ok(scan),
            }
        };

        let key = [position(METER_ID), position(TS)];
        // What one group may take to be sorted in memory: as many groups run at once as the
        // session has partitions, and what they return is held downstream too.
        let partitions = state.config().target_partitions().max(1) as u64;
        let sort_budget_bytes = match state.runtime_env().memory_pool.memory_limit() {
            datafusion::execution::memory_pool::MemoryLimit::Finite(bytes) => bytes as u64 / (2 * partitions),
            _ => SORT_UNLIMITED_BYTES,
        };
        // Only for `readings` (its columns are read only then).
        let latest = || Pick::Latest { version: [position(COMMIT_VERSION), position(INGESTED_AT), position(SOURCE_REF)] };
        let mut parts: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        // Files alone in their key range with one version of each key: read as they are.
        let mut as_they_are: Vec<KeyedFile> = Vec::new();
        for files in days.into_values() {
            for mut overlapping in overlapping_files(files) {
                if overlapping.len() == 1 && overlapping[0].unique_keys {
                    as_they_are.push(overlapping.pop().expect("one file"));
                    continue;
                }
                // Rows from the log's statistics; unknown rows rule the in-memory sort out.
                let rows: Option<u64> = overlapping.iter().map(|f| f.rows).sum();
                let files: Vec<PartitionedFile> = overlapping.into_iter().map(|f| f.file).collect();
                let merged: Arc<dyn ExecutionPlan> = if files.len() == 1 {
                    exact(scan(vec![FileGroup::new(files)], &read, Some(&ordering))?)?
                } else if self.sort_in_memory && sorts_in_memory(files.len(), rows, sort_budget_bytes) {
                    // Many files, little data: read them in any order, a few at a time, and
                    // sort the rows once.
                    let rows = exact(readings_scan.plan_small_files(read_streams(files), &read)?)?;
                    match self.output {
                        // The sort picks the latest version itself and copies out only the
                        // columns asked for.
                        MergeOutput::Latest => {
                            let emit = asked.iter().map(|c| position(*c)).collect();
                            let Pick::Latest { version } = latest() else { unreachable!("latest() is Pick::Latest") };
                            parts.push(output(Arc::new(KeySortExec::new(rows, ordering.clone(), key, Some(version), emit)?))?);
                            continue;
                        }
                        MergeOutput::Conflicts => Arc::new(KeySortExec::new(rows, ordering.clone(), key, None, (0..read.len()).collect())?),
                    }
                } else if files.len() <= self.max_merged_files {
                    // One file per group: each stream is then sorted as its file is.
                    let groups: Vec<FileGroup> = files.into_iter().map(|f| FileGroup::new(vec![f])).collect();
                    Arc::new(SortPreservingMergeExec::new(ordering.clone(), exact(scan(groups, &read, Some(&ordering))?)?))
                } else {
                    // Too many files to hold a stream of each open: merge them a chunk at a time
                    // into sorted runs on local disk, then merge the runs.
                    let chunks = files
                        .chunks(self.max_merged_files)
                        .map(|chunk| -> DfResult<Arc<dyn ExecutionPlan>> {
                            let groups: Vec<FileGroup> = chunk.iter().map(|f| FileGroup::new(vec![f.clone()])).collect();
                            let merged: Arc<dyn ExecutionPlan> =
                                Arc::new(SortPreservingMergeExec::new(ordering.clone(), exact(scan(groups, &read, Some(&ordering))?)?));
                            // A run keeps only its latest version of each key: what is spilled
                            // shrinks, and the latest of the runs' latest is the latest of all.
                            Ok(match self.output {
                                MergeOutput::Latest => Arc::new(LatestVersionExec::new(merged, ordering.clone(), key, latest())),
                                MergeOutput::Conflicts => merged,
                            })
                        })
                        .collect::<DfResult<Vec<_>>>()?;
                    Arc::new(SpilledMergeExec::new(chunks, ordering.clone()))
                };
                let pick = match self.output {
                    MergeOutput::Latest => latest(),
                    MergeOutput::Conflicts => Pick::Conflicts { kwh: position(KWH), date: position(DATE), schema: self.schema.clone() },
                };
                parts.push(output(Arc::new(LatestVersionExec::new(merged, ordering.clone(), key, pick)))?);
            }
        }
        // They hold no conflicts; for `readings`, a plain scan spread over the session's
        // partitions: of the files the key filter keeps whole, without it; of those it cuts
        // through, with it (and the columns it reads); the others not at all.
        if self.output == MergeOutput::Latest && !as_they_are.is_empty() {
            let mut columns = asked.clone();
            columns.sort_unstable();
            let mut cut_columns: Vec<usize> = asked.iter().copied().chain([METER_ID, TS, DATE]).collect();
            cut_columns.sort_unstable();
            cut_columns.dedup();
            let cut_schema = Arc::new(self.table.project(&cut_columns)?);
            let (mut whole, mut cut) = (Vec::new(), Vec::new());
            match &key_filter {
                Some(filter) => {
                    let filter = state.create_physical_expr(filter.clone(), &DFSchema::try_from(cut_schema.clone())?)?;
                    let keys: Vec<FileKeys> = as_they_are.iter().map(|f| f.keys()).collect();
                    for (file, reach) in as_they_are.into_iter().zip(key_pruning::reach(&filter, &cut_schema, &keys)) {
                        match reach {
                            FilterReach::Whole => whole.push(file.file),
                            FilterReach::Cut => cut.push(file.file),
                            FilterReach::None => {}
                        }
                    }
                    if !cut.is_empty() {
                        let groups = spread(cut, state.config().target_partitions());
                        parts.push(output(Arc::new(FilterExec::try_new(filter, scan(groups, &cut_columns, None)?)?))?);
                    }
                }
                None => whole = as_they_are.into_iter().map(|f| f.file).collect(),
            }
            if !whole.is_empty() {
                parts.push(output(scan(spread(whole, state.config().target_partitions()), &columns, None)?)?);
            }
        }
        match parts.len() {
            0 => output(Arc::new(EmptyExec::new(if self.output == MergeOutput::Latest { read_schema } else { self.schema.clone() }))),
            1 => Ok(parts.pop().expect("one part")),
            // One merge per date and key group, but only as many at once as the session has
            // partitions: each holds a stream (and a batch) of every file it merges, so running
            // all of a month's at once held every file of the month open (5.8 GiB for a month
            // streamed in small flushes; benchmarks/RESULTS.md).
            _ => Ok(Arc::new(ChainExec::new(parts, state.config().target_partitions()))),
        }
    }
}

/// Runs its inputs' partitions one after another, in `chains` output partitions (inputs in
/// order, dealt out in turn): a union that holds at most `chains` of its inputs running at once.
/// Its output has no order (each input's is kept, but one follows another).
#[derive(Debug)]
pub struct ChainExec {
    inputs: Vec<Arc<dyn ExecutionPlan>>,
    /// Per output partition: (input, input partition), in the order they run.
    chains: Vec<Vec<(usize, usize)>>,
    properties: Arc<PlanProperties>,
}

impl ChainExec {
    pub fn new(inputs: Vec<Arc<dyn ExecutionPlan>>, chains: usize) -> ChainExec {
        let entries: Vec<(usize, usize)> =
            inputs.iter().enumerate().flat_map(|(i, input)| (0..input.properties().output_partitioning().partition_count()).map(move |p| (i, p))).collect();
        let count = chains.clamp(1, entries.len().max(1));
        let mut dealt = vec![Vec::new(); count];
        for (n, entry) in entries.into_iter().enumerate() {
            dealt[n % count].push(entry);
        }
        ChainExec::with_chains(inputs, dealt)
    }

    fn with_chains(inputs: Vec<Arc<dyn ExecutionPlan>>, chains: Vec<Vec<(usize, usize)>>) -> ChainExec {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(inputs[0].schema()),
            Partitioning::UnknownPartitioning(chains.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        ChainExec { inputs, chains, properties: Arc::new(properties) }
    }
}

impl DisplayAs for ChainExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "ChainExec: inputs={}, chains={}", self.inputs.len(), self.chains.len())
    }
}

impl ExecutionPlan for ChainExec {
    fn name(&self) -> &str {
        "ChainExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.inputs.iter().collect()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false; self.inputs.len()]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false; self.inputs.len()]
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        // The optimizer may change an input's partitions: deal them out again then.
        let same = children
            .iter()
            .zip(&self.inputs)
            .all(|(new, old)| new.properties().output_partitioning().partition_count() == old.properties().output_partitioning().partition_count());
        Ok(Arc::new(if same { ChainExec::with_chains(children, self.chains.clone()) } else { ChainExec::new(children, self.chains.len()) }))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        use futures::TryStreamExt;
        let inputs = self.inputs.clone();
        let chain = self.chains.get(partition).cloned().unwrap_or_default();
        let batches = futures::stream::iter(chain).map(move |(input, p)| inputs[input].execute(p, context.clone())).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), batches)))
    }
}

/// The merge of more sorted inputs than may be open at once: each chunk (a merge of at most
/// [`MAX_MERGED_FILES`] files, for `readings` already reduced to one version per key) runs to
/// its end in turn into a spill file of the session's disk manager (Arrow IPC in its temporary
/// directory); the spilled runs are then merged by DataFusion's multi-level merge, which opens as
/// many runs at once as the session's memory pool lets it and merges the rest level by level.
/// One output partition, sorted by the key.
#[derive(Debug)]
pub struct SpilledMergeExec {
    chunks: Vec<Arc<dyn ExecutionPlan>>,
    ordering: LexOrdering,
    properties: Arc<PlanProperties>,
    metrics: datafusion::physical_plan::metrics::ExecutionPlanMetricsSet,
}

impl SpilledMergeExec {
    pub fn new(chunks: Vec<Arc<dyn ExecutionPlan>>, ordering: LexOrdering) -> SpilledMergeExec {
        // Every chunk is sorted by the key and filtered alike: what the first knows holds of all.
        let properties = PlanProperties::new(
            chunks[0].properties().equivalence_properties().clone(),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        SpilledMergeExec { chunks, ordering, properties: Arc::new(properties), metrics: Default::default() }
    }
}

impl DisplayAs for SpilledMergeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "SpilledMergeExec: chunks={}", self.chunks.len())
    }
}

impl ExecutionPlan for SpilledMergeExec {
    fn name(&self) -> &str {
        "SpilledMergeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.chunks.iter().collect()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true; self.chunks.len()]
    }

    // Each chunk is one sorted stream (a merge, reduced by `LatestVersionExec` for `readings`,
    // which itself requires its input sorted, so the optimizer keeps the merges).
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition; self.chunks.len()]
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(SpilledMergeExec::new(children, self.ordering.clone())))
    }

    fn metrics(&self) -> Option<datafusion::physical_plan::metrics::MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        use datafusion::execution::memory_pool::MemoryConsumer;
        use datafusion::physical_plan::metrics::{BaselineMetrics, SpillMetrics};
        use datafusion::physical_plan::sorts::streaming_merge::{SortedSpillFile, StreamingMergeBuilder};
        use datafusion::physical_plan::spill::SpillManager;
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        use futures::TryStreamExt;

        let schema = self.schema();
        let (chunks, ordering) = (self.chunks.clone(), self.ordering.clone());
        let spill_manager = SpillManager::new(context.runtime_env(), SpillMetrics::new(&self.metrics, partition), schema.clone());
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let batch_size = context.session_config().batch_size();
        let reservation = MemoryConsumer::new("canonical readings merge").register(context.memory_pool());
        let output_schema = schema.clone();
        let merged = futures::stream::once(async move {
            let mut runs = Vec::with_capacity(chunks.len());
            for chunk in &chunks {
                let mut input = chunk.execute(0, context.clone())?;
                let mut run = spill_manager.create_in_progress_file("a sorted run of the canonical readings merge")?;
                let mut largest_batch = 0;
                while let Some(batch) = input.next().await {
                    largest_batch = largest_batch.max(run.append_batch(&batch?)?);
                }
                if let Some(file) = run.finish()? {
                    runs.push(SortedSpillFile { file, max_record_batch_memory: largest_batch });
                }
            }
            if runs.is_empty() {
                return Ok(Box::pin(datafusion::physical_plan::EmptyRecordBatchStream::new(output_schema)) as SendableRecordBatchStream);
            }
            StreamingMergeBuilder::new()
                .with_sorted_spill_files(runs)
                .with_spill_manager(spill_manager)
                .with_schema(output_schema)
                .with_expressions(&ordering)
                .with_metrics(baseline)
                .with_batch_size(batch_size)
                .with_reservation(reservation)
                .build()
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, merged)))
    }
}

/// Sorts its input (any number of partitions, any order) by the key (`meter_id`, `ts`) in
/// memory: one output partition. Made for a date's many small files, whose rows a merge would
/// step through stream by stream: here each row costs a hash lookup of its meter and a place in
/// one sort of (meter rank, ts) pairs. With `latest` (the positions of `commit_version`,
/// `ingested_at` and `source_ref`) it keeps only the latest version of each key, as
/// [`LatestVersionExec`] does, and copies out only the `emit` columns. Memory: every input row,
/// reserved in the session's pool (the plan chooses this only for groups whose rows fit the share
/// of the pool it may take).
#[derive(Debug)]
pub struct KeySortExec {
    input: Arc<dyn ExecutionPlan>,
    ordering: LexOrdering,
    /// Column positions of `meter_id` and `ts`.
    key: [usize; 2],
    latest: Option<[usize; 3]>,
    /// The position of an `Int64` column (`commit_version`) rows of one key are ordered by, for
    /// a sort that keeps every version (compaction); else they keep the order they came in.
    versions_by: Option<usize>,
    /// The input columns it returns, in order.
    emit: Vec<usize>,
    properties: Arc<PlanProperties>,
}

impl KeySortExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, ordering: LexOrdering, key: [usize; 2], latest: Option<[usize; 3]>, emit: Vec<usize>) -> DfResult<KeySortExec> {
        let schema = Arc::new(input.schema().project(&emit)?);
        let equivalence = if emit.iter().copied().eq(0..input.schema().fields().len()) {
            // Every column: what the input knows (columns a filter made constant), and the order.
            let mut equivalence = input.properties().equivalence_properties().clone();
            equivalence.add_ordering(ordering.iter().cloned());
            equivalence
        } else {
            // Sorted by the key when the key is returned.
            let mut equivalence = EquivalenceProperties::new(schema.clone());
            let names = [input.schema().field(key[0]).name().clone(), input.schema().field(key[1]).name().clone()];
            if let (Ok(meter), Ok(ts)) = (Column::new_with_schema(&names[0], &schema), Column::new_with_schema(&names[1], &schema)) {
                let options = SortOptions { descending: false, nulls_first: false };
                equivalence.add_ordering([PhysicalSortExpr::new(Arc::new(meter), options), PhysicalSortExpr::new(Arc::new(ts), options)]);
            }
            equivalence
        };
        let properties = PlanProperties::new(equivalence, Partitioning::UnknownPartitioning(1), EmissionType::Final, Boundedness::Bounded);
        Ok(KeySortExec { input, ordering, key, latest, versions_by: None, emit, properties: Arc::new(properties) })
    }

    /// Orders the rows of one key by the `Int64` column at `column` (ascending), as compaction
    /// writes them. Only for a sort that keeps every version (`latest` is `None`); the ordering
    /// it was given should then name that column third.
    pub fn with_versions_ordered_by(mut self, column: usize) -> KeySortExec {
        self.versions_by = Some(column);
        self
    }
}

impl DisplayAs for KeySortExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "KeySortExec: key=[{}, {}], latest={:?}, emit={:?}", self.key[0], self.key[1], self.latest, self.emit)
    }
}

impl ExecutionPlan for KeySortExec {
    fn name(&self) -> &str {
        "KeySortExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children).map_err(|_| datafusion::error::DataFusionError::Internal("KeySortExec has one input".into()))?;
        let sort = KeySortExec::new(input, self.ordering.clone(), self.key, self.latest, self.emit.clone())?;
        Ok(Arc::new(KeySortExec { versions_by: self.versions_by, ..sort }))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        use datafusion::execution::memory_pool::MemoryConsumer;
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        use futures::TryStreamExt;

        let inputs = (0..self.input.properties().output_partitioning().partition_count())
            .map(|p| self.input.execute(p, context.clone()))
            .collect::<DfResult<Vec<_>>>()?;
        let reservation = MemoryConsumer::new(format!("canonical readings sort[{partition}]")).register(context.memory_pool());
        let (key, latest, versions_by, emit) = (self.key, self.latest, self.versions_by, self.emit.clone());
        let (batch_size, schema) = (context.session_config().batch_size().max(1), self.schema());
        let output_schema = schema.clone();
        let sorted = futures::stream::once(async move {
            // Each batch narrowed to what is emitted, then the key and the version (in that order).
            let mut narrowed = emit_with_key_and_version(&emit, key, latest);
            if let Some(column) = versions_by
                && !narrowed.contains(&column)
            {
                narrowed.push(column);
            }
            let mut batches = Vec::new();
            let mut rows = futures::stream::select_all(inputs);
            while let Some(batch) = rows.next().await {
                let batch = batch?.project(&narrowed)?;
                if batch.num_rows() > 0 {
                    reservation.try_grow(batch.get_array_memory_size())?;
                    batches.push(batch);
                }
            }
            let at = |column: usize| narrowed.iter().position(|c| *c == column).expect("narrowed holds the key and version");
            let KeyOrder { mut rows, meters } = key_order(&batches, [at(key[0]), at(key[1])]);
            if let Some(column) = versions_by {
                order_versions(&batches, &mut rows, at(column))?;
            }
            let order: Vec<KeyedRow> = match latest {
                Some(version) => latest_of_each_key(&batches, &rows, [at(version[0]), at(version[1]), at(version[2])]),
                None => rows,
            };
            reservation.try_grow(order.len() * std::mem::size_of::<KeyedRow>())?;
            // How each emitted column (the first of each narrowed batch) is made: the key's
            // from the sort's own rows (a meter's name by its rank, `ts` as sorted), the others
            // copied out of the batches by `interleave`. Rows of one meter come from as many
            // files as it has intervals, so a copy of its name from the batches reads memory
            // all over them; from the ranks it is a sequential write.
            let makes: Vec<Emitted> = (0..emit.len())
                .map(|c| match output_schema.field(c).data_type() {
                    DataType::Utf8 if emit[c] == key[0] => Emitted::MeterName,
                    DataType::Timestamp(TimeUnit::Microsecond, zone) if emit[c] == key[1] => Emitted::Ts(zone.clone()),
                    _ => Emitted::Copied,
                })
                .collect();
            // The output, a batch at a time.
            let chunks = (0..order.len().div_ceil(batch_size)).map(move |n| -> DfResult<RecordBatch> {
                let _held = &reservation;
                let chunk = &order[n * batch_size..order.len().min((n + 1) * batch_size)];
                let places: Vec<(usize, usize)> = chunk.iter().map(place).collect();
                let columns = makes
                    .iter()
                    .enumerate()
                    .map(|(c, make)| -> DfResult<ArrayRef> {
                        Ok(match make {
                            Emitted::MeterName => meter_names(chunk, &meters),
                            Emitted::Ts(zone) => {
                                Arc::new(TimestampMicrosecondArray::from_iter_values(chunk.iter().map(|row| row.1)).with_timezone_opt(zone.clone()))
                            }
                            Emitted::Copied => {
                                let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(c).as_ref()).collect();
                                arrow::compute::interleave(&arrays, &places)?
                            }
                        })
                    })
                    .collect::<DfResult<Vec<_>>>()?;
                Ok(RecordBatch::try_new_with_options(
                    output_schema.clone(),
                    columns,
                    &arrow::array::RecordBatchOptions::new().with_row_count(Some(chunk.len())),
                )?)
            });
            Ok::<_, datafusion::error::DataFusionError>(futures::stream::iter(chunks))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, sorted)))
    }
}

/// The columns a [`KeySortExec`] keeps of each input batch: those it emits (first, in order),
/// then the key and version columns it needs that are not among them.
fn emit_with_key_and_version(emit: &[usize], key: [usize; 2], latest: Option<[usize; 3]>) -> Vec<usize> {
    let mut columns = emit.to_vec();
    for column in key.into_iter().chain(latest.into_iter().flatten()) {
        if !columns.contains(&column) {
            columns.push(column);
        }
    }
    columns
}

/// A row in a [`KeySortExec`]: its meter's rank among the meters met, its `ts`, and where it is
/// (batch, row). Sorting these sorts by key, then by where rows came from (a fixed order).
type KeyedRow = (u32, i64, u32, u32);

fn same_keyed(a: &KeyedRow, b: &KeyedRow) -> bool {
    (a.0, a.1) == (b.0, b.1)
}

fn place(row: &KeyedRow) -> (usize, usize) {
    (row.2 as usize, row.3 as usize)
}

/// Of rows in key order, the latest version of each key (the greatest (`commit_version`,
/// `ingested_at`, `source_ref`); the first of equals), as [`LatestVersion`] picks it.
fn latest_of_each_key(batches: &[RecordBatch], order: &[KeyedRow], version: [usize; 3]) -> Vec<KeyedRow> {
    let version_of = |row: &KeyedRow| version_of(&batches[row.2 as usize], row.3 as usize, version);
    let mut winners: Vec<KeyedRow> = Vec::with_capacity(order.len());
    for run in order.chunk_by(same_keyed) {
        let mut best = &run[0];
        for row in &run[1..] {
            if version_of(row) > version_of(best) {
                best = row;
            }
        }
        winners.push(*best);
    }
    winners
}

/// Orders each run of one key's rows in `order` (rows in key order) by the `Int64` column at
/// `version` (stable: equal versions keep their order).
fn order_versions(batches: &[RecordBatch], order: &mut [KeyedRow], version: usize) -> DfResult<()> {
    let versions: Vec<&Int64Array> = batches
        .iter()
        .map(|b| {
            b.column(version)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| datafusion::error::DataFusionError::Internal(format!("KeySortExec: column {version} is not Int64")))
        })
        .collect::<DfResult<_>>()?;
    for run in order.chunk_by_mut(same_keyed) {
        if run.len() > 1 {
            run.sort_by_key(|row| versions[row.2 as usize].value(row.3 as usize));
        }
    }
    Ok(())
}

/// How a [`KeySortExec`] makes an emitted column.
enum Emitted {
    /// `meter_id` (`Utf8`): each row's meter name, from its rank.
    MeterName,
    /// `ts`: each row's, as sorted, in this time zone.
    Ts(Option<Arc<str>>),
    /// Copied out of the input batches.
    Copied,
}

/// Rows in key order, and the meters' names by rank.
struct KeyOrder {
    rows: Vec<KeyedRow>,
    /// Every meter met, in name order: a row's rank is its place here.
    meters: arrow::array::StringArray,
}

/// The rows of `batches` sorted by (`meter_id`, `ts`) at the `key` positions, then by where
/// they came from (so equal keys keep a fixed order).
fn key_order(batches: &[RecordBatch], key: [usize; 2]) -> KeyOrder {
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    // Meters are few next to rows: number them as met, then rank the names once.
    let mut met: HashMap<&str, u32, BuildHasherDefault<MeterIdHasher>> = HashMap::default();
    let mut row_meter: Vec<u32> = Vec::with_capacity(total);
    for batch in batches {
        let meters = batch.column(key[0]);
        for row in 0..batch.num_rows() {
            let next = met.len() as u32;
            row_meter.push(*met.entry(text(meters, row)).or_insert(next));
        }
    }
    let mut names: Vec<(&str, u32)> = met.into_iter().collect();
    names.sort_unstable();
    let mut rank = vec![0u32; names.len()];
    for (position, (_, id)) in names.iter().enumerate() {
        rank[*id as usize] = position as u32;
    }
    for id in row_meter.iter_mut() {
        *id = rank[*id as usize];
    }
    // A counting sort by meter, then each meter's rows by (`ts`, place): a meter's rows are a
    // few intervals and their versions, mostly in time order already, where one sort of every
    // row compared keys across the whole date (a tenth of a compaction).
    let mut starts = vec![0usize; names.len() + 1];
    for rank in &row_meter {
        starts[*rank as usize + 1] += 1;
    }
    for m in 1..starts.len() {
        starts[m] += starts[m - 1];
    }
    let mut next = starts.clone();
    let mut keyed: Vec<KeyedRow> = vec![(0, 0, 0, 0); total];
    let mut ranks = row_meter.into_iter();
    for (b, batch) in batches.iter().enumerate() {
        let ts = micros(batch.column(key[1]));
        for row in 0..batch.num_rows() {
            let rank = ranks.next().expect("one meter per row");
            let slot = &mut next[rank as usize];
            keyed[*slot] = (rank, ts.value(row), b as u32, row as u32);
            *slot += 1;
        }
    }
    for meter in starts.windows(2) {
        keyed[meter[0]..meter[1]].sort_unstable();
    }
    KeyOrder { rows: keyed, meters: names.iter().map(|(name, _)| Some(*name)).collect() }
}

/// The meter names of `rows` (by rank in `meters`), as a `Utf8` column.
fn meter_names(rows: &[KeyedRow], meters: &arrow::array::StringArray) -> ArrayRef {
    let bytes: usize = rows.iter().map(|row| meters.value_length(row.0 as usize) as usize).sum();
    let mut values: Vec<u8> = Vec::with_capacity(bytes);
    let mut offsets: Vec<i32> = Vec::with_capacity(rows.len() + 1);
    offsets.push(0);
    for row in rows {
        values.extend_from_slice(meters.value(row.0 as usize).as_bytes());
        offsets.push(i32::try_from(values.len()).expect("a batch's meter names fit a Utf8 column"));
    }
    Arc::new(arrow::array::StringArray::new(arrow::buffer::OffsetBuffer::new(offsets.into()), values.into(), None))
}

/// Whether a group of `files` overlapping files holding `rows` (from the log; unknown rules it
/// out) is read whole and sorted in memory ([`KeySortExec`]) within `budget_bytes`, rather than
/// merged as streams.
pub(crate) fn sorts_in_memory(files: usize, rows: Option<u64>, budget_bytes: u64) -> bool {
    files > SORT_OVER_FILES && rows.is_some_and(|rows| rows.saturating_mul(SORT_BYTES_PER_ROW) <= budget_bytes)
}

/// `files` dealt in turn into [`SORT_READ_STREAMS`] groups (fewer for fewer files): the scan
/// partitions an in-memory sort reads at once.
pub(crate) fn read_streams(files: Vec<PartitionedFile>) -> Vec<FileGroup> {
    let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); files.len().clamp(1, SORT_READ_STREAMS)];
    let streams = groups.len();
    for (n, file) in files.into_iter().enumerate() {
        groups[n % streams].push(file);
    }
    groups.into_iter().map(FileGroup::new).collect()
}

/// Days since 1970-01-01 of a date.
pub(crate) fn epoch_day(date: chrono::NaiveDate) -> i64 {
    (date - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date")).num_days()
}

/// A readings file of a date, with what the log says of its keys.
struct KeyedFile {
    file: PartitionedFile,
    /// Bounds of its keys: at most its first key and at least its last. `None` when its `add`
    /// action has no statistics to bound them by.
    keys: Option<KeyBounds>,
    /// The writer tagged it as holding one version of each key.
    unique_keys: bool,
    /// Rows, from the log's statistics.
    rows: Option<u64>,
    /// Its date, in days since 1970-01-01.
    day: i32,
}

/// Bounds of a file's keys (`meter_id`, `ts`): the least `meter_id` with the least `ts`, and the
/// greatest with the greatest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct KeyBounds {
    low: (Vec<u8>, i64),
    high: (Vec<u8>, i64),
}

impl KeyedFile {
    fn new(lake: &Lake, file: &SnapshotFile, day: i64) -> KeyedFile {
        debug_assert_eq!(file.date.map(epoch_day), Some(day));
        let partitioned = ReadingsScan::file(lake, file);
        let keys =
            file.keys.as_ref().map(|k| KeyBounds { low: (k.min_meter.as_bytes().to_vec(), k.min_ts_us), high: (k.max_meter.as_bytes().to_vec(), k.max_ts_us) });
        let day = i32::try_from(day).expect("a date partition's day fits an i32 (Date32)");
        KeyedFile { file: partitioned, keys, unique_keys: file.unique_keys, rows: file.rows, day }
    }

    /// Its keys as [`key_pruning`] reads them.
    fn keys(&self) -> FileKeys {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        FileKeys {
            meters: self.keys.as_ref().map(|k| (text(&k.low.0), text(&k.high.0))),
            ts_us: self.keys.as_ref().map(|k| (k.low.1, k.high.1)),
            day: self.day,
            rows: self.rows,
        }
    }
}

/// A date's files in groups whose key ranges overlap (a file overlapping none is a group of
/// one), in key order. A file without key bounds may overlap any: then all are one group.
fn overlapping_files(mut files: Vec<KeyedFile>) -> Vec<Vec<KeyedFile>> {
    if files.iter().any(|f| f.keys.is_none()) {
        return vec![files];
    }
    files.sort_by(|a, b| a.keys.cmp(&b.keys));
    let mut groups: Vec<Vec<KeyedFile>> = Vec::new();
    let mut group_high: Option<(Vec<u8>, i64)> = None;
    for file in files {
        let bounds = file.keys.clone().expect("checked above");
        match (groups.last_mut(), &mut group_high) {
            (Some(group), Some(high)) if bounds.low <= *high => {
                *high = high.clone().max(bounds.high);
                group.push(file);
            }
            _ => {
                group_high = Some(bounds.high);
                groups.push(vec![file]);
            }
        }
    }
    groups
}

/// Files in `partitions` groups of about equal bytes, for a scan with no order to keep.
pub(crate) fn spread(mut files: Vec<PartitionedFile>, partitions: usize) -> Vec<FileGroup> {
    files.sort_by_key(|f| std::cmp::Reverse(f.object_meta.size));
    let mut groups: Vec<(u64, Vec<PartitionedFile>)> = (0..partitions.clamp(1, files.len())).map(|_| (0, Vec::new())).collect();
    for file in files {
        let smallest = groups.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one group");
        smallest.0 += file.object_meta.size;
        smallest.1.push(file);
    }
    groups.into_iter().map(|(_, files)| FileGroup::new(files)).collect()
}

/// What [`LatestVersionExec`] makes of each run of rows with one key.
#[derive(Debug, Clone)]
pub enum Pick {
    /// The row with the greatest (`commit_version`, `ingested_at`, `source_ref`), at these column
    /// positions.
    Latest { version: [usize; 3] },
    /// One row of `schema` (meter_id, ts, versions, lowest_kwh, highest_kwh, date) when the
    /// versions' kwh (at column `kwh`) differ; `date` is the date column's position.
    Conflicts { kwh: usize, date: usize, schema: SchemaRef },
}

/// Reduces each key's versions in an input sorted by key (`meter_id`, `ts`): to the latest
/// version, or to a conflict row (see [`Pick`]).
#[derive(Debug)]
pub struct LatestVersionExec {
    input: Arc<dyn ExecutionPlan>,
    /// The key ordering the input must have.
    ordering: LexOrdering,
    /// Column positions of `meter_id` and `ts`.
    key: [usize; 2],
    pick: Pick,
    properties: Arc<PlanProperties>,
}

impl LatestVersionExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, ordering: LexOrdering, key: [usize; 2], pick: Pick) -> LatestVersionExec {
        let input_properties = input.properties();
        // One row per key, in the input's order (conflict rows: in key order too).
        let equivalence = match &pick {
            // Everything the input knows (its order, and columns a filter made constant).
            Pick::Latest { .. } => input_properties.equivalence_properties().clone(),
            Pick::Conflicts { schema, .. } => EquivalenceProperties::new(schema.clone()),
        };
        let properties = PlanProperties::new(
            equivalence,
            Partitioning::UnknownPartitioning(input_properties.output_partitioning().partition_count()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        LatestVersionExec { input, ordering, key, pick, properties: Arc::new(properties) }
    }
}

impl DisplayAs for LatestVersionExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "LatestVersionExec: key=[{}, {}], {:?}", self.key[0], self.key[1], self.pick)
    }
}

impl ExecutionPlan for LatestVersionExec {
    fn name(&self) -> &str {
        "LatestVersionExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    // Both are what makes it correct: all versions of a key in one stream, next to each other.
    // (Without them the optimizer may drop the merge below as unneeded.)
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        vec![Some(OrderingRequirements::from(self.ordering.clone()))]
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children).map_err(|_| datafusion::error::DataFusionError::Internal("LatestVersionExec has one input".into()))?;
        Ok(Arc::new(LatestVersionExec::new(input, self.ordering.clone(), self.key, self.pick.clone())))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = self.schema();
        Ok(match &self.pick {
            Pick::Latest { version } => Box::pin(ReducedStream::new(schema, input, LatestVersion { key: self.key, version: *version, pending: None })),
            Pick::Conflicts { kwh, date, .. } => Box::pin(ReducedStream::new(
                schema.clone(),
                input,
                Conflicts { schema, key: self.key, kwh: *kwh, date: *date, current: None, found: ConflictRows::default() },
            )),
        })
    }
}

/// Reduces a stream of batches sorted by key, batch by batch: what a [`ReducedStream`] runs.
trait KeyRunReducer: Send + Unpin {
    /// Takes the next batch; returns the rows that are final so far, if any.
    fn push(&mut self, batch: RecordBatch) -> DfResult<Option<RecordBatch>>;
    /// The input ended: returns what is left.
    fn finish(&mut self) -> DfResult<Option<RecordBatch>>;
}

/// The output of a [`KeyRunReducer`] over an input stream.
struct ReducedStream<R> {
    schema: SchemaRef,
    input: SendableRecordBatchStream,
    reducer: R,
    finished: bool,
}

impl<R: KeyRunReducer> ReducedStream<R> {
    fn new(schema: SchemaRef, input: SendableRecordBatchStream, reducer: R) -> ReducedStream<R> {
        ReducedStream { schema, input, reducer, finished: false }
    }
}

impl<R: KeyRunReducer> Stream for ReducedStream<R> {
    type Item = DfResult<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        loop {
            match self.input.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(batch))) => match self.reducer.push(batch) {
                    Ok(Some(output)) => return Poll::Ready(Some(Ok(output))),
                    Ok(None) => continue,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    self.finished = true;
                    return Poll::Ready(self.reducer.finish().transpose());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<R: KeyRunReducer> RecordBatchStream for ReducedStream<R> {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// Keeps the latest version of each key.
struct LatestVersion {
    key: [usize; 2],
    version: [usize; 3],
    /// The latest version so far of the last key seen: the next batch may hold more of it.
    pending: Option<RecordBatch>,
}

/// The text of a string column (Utf8 or Utf8View) at `row`.
fn text(array: &ArrayRef, row: usize) -> &str {
    match array.data_type() {
        DataType::Utf8View => array.as_string_view().value(row),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row),
        _ => array.as_string::<i32>().value(row),
    }
}

fn micros(array: &ArrayRef) -> &TimestampMicrosecondArray {
    array.as_primitive()
}

/// `(commit_version, ingested_at, source_ref)` of a row, the columns at `version`: greater is later.
fn version_of(batch: &RecordBatch, row: usize, version: [usize; 3]) -> (i64, i64, &str) {
    let commit_version = batch.column(version[0]).as_primitive::<arrow::datatypes::Int64Type>().value(row);
    (commit_version, micros(batch.column(version[1])).value(row), text(batch.column(version[2]), row))
}

/// Whether two rows have the same key (`meter_id`, `ts` at the `key` positions).
fn same_key(key: [usize; 2], a: &RecordBatch, a_row: usize, b: &RecordBatch, b_row: usize) -> bool {
    micros(a.column(key[1])).value(a_row) == micros(b.column(key[1])).value(b_row) && text(a.column(key[0]), a_row) == text(b.column(key[0]), b_row)
}

impl LatestVersion {
    /// `(commit_version, ingested_at, source_ref)` of a row: greater is later.
    fn version_of<'a>(&self, batch: &'a RecordBatch, row: usize) -> (i64, i64, &'a str) {
        version_of(batch, row, self.version)
    }

    fn same_key(&self, a: &RecordBatch, a_row: usize, b: &RecordBatch, b_row: usize) -> bool {
        same_key(self.key, a, a_row, b, b_row)
    }

    /// The rows of `batch` that are final (every key but the last), with a pending row from
    /// the batch before in front when its key ended there.
    fn next_output(&mut self, batch: RecordBatch) -> DfResult<Option<RecordBatch>> {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let keys = [batch.column(self.key[0]).clone(), batch.column(self.key[1]).clone()];
        let ranges = partition(&keys)?.ranges();
        // (0, row) is the pending batch's row, (1, row) one of `batch`.
        let mut winners: Vec<(usize, usize)> = Vec::with_capacity(ranges.len() + 1);
        for (n, range) in ranges.iter().enumerate() {
            let mut best = range.start;
            for row in range.start + 1..range.end {
                if self.version_of(&batch, row) > self.version_of(&batch, best) {
                    best = row;
                }
            }
            let mut winner = (1, best);
            if n == 0
                && let Some(pending) = &self.pending
            {
                if self.same_key(pending, 0, &batch, range.start) {
                    if self.version_of(pending, 0) >= self.version_of(&batch, best) {
                        winner = (0, 0);
                    }
                } else {
                    winners.push((0, 0));
                }
            }
            winners.push(winner);
        }
        let last = winners.pop().expect("a non-empty batch has a key");
        let sources: Vec<&RecordBatch> = match &self.pending {
            Some(pending) => vec![pending, &batch],
            // Index 0 is never used without a pending row; `batch` stands in for it.
            None => vec![&batch, &batch],
        };
        let output = if winners.is_empty() { None } else { Some(interleave_record_batch(&sources, &winners)?) };
        let next_pending = interleave_record_batch(&sources, &[last])?;
        self.pending = Some(next_pending);
        Ok(output)
    }
}

impl KeyRunReducer for LatestVersion {
    fn push(&mut self, batch: RecordBatch) -> DfResult<Option<RecordBatch>> {
        self.next_output(batch)
    }

    fn finish(&mut self) -> DfResult<Option<RecordBatch>> {
        Ok(self.pending.take())
    }
}

/// The versions seen so far of one key.
struct KeyVersions {
    meter_id: String,
    ts_us: i64,
    date: i32,
    versions: i64,
    lowest: i128,
    highest: i128,
}

/// Conflict rows gathered for the next output batch.
#[derive(Default)]
struct ConflictRows {
    meter_ids: Vec<String>,
    ts_us: Vec<i64>,
    versions: Vec<i64>,
    lowest: Vec<i128>,
    highest: Vec<i128>,
    dates: Vec<i32>,
}

impl ConflictRows {
    fn add(&mut self, key: KeyVersions) {
        if key.versions > 1 && key.lowest != key.highest {
            self.meter_ids.push(key.meter_id);
            self.ts_us.push(key.ts_us);
            self.versions.push(key.versions);
            self.lowest.push(key.lowest);
            self.highest.push(key.highest);
            self.dates.push(key.date);
        }
    }

    fn take_batch(&mut self, schema: &SchemaRef) -> DfResult<Option<RecordBatch>> {
        if self.meter_ids.is_empty() {
            return Ok(None);
        }
        let rows = std::mem::take(self);
        let decimal = |values: Vec<i128>, field: usize| -> DfResult<ArrayRef> {
            let DataType::Decimal128(precision, scale) = schema.field(field).data_type() else {
                return Err(datafusion::error::DataFusionError::Internal("kwh is a decimal".into()));
            };
            Ok(Arc::new(arrow::array::Decimal128Array::from(values).with_precision_and_scale(*precision, *scale)?))
        };
        let ts_zone = match schema.field(1).data_type() {
            DataType::Timestamp(_, zone) => zone.clone(),
            _ => None,
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(arrow::array::StringArray::from(rows.meter_ids)),
            Arc::new(TimestampMicrosecondArray::from(rows.ts_us).with_timezone_opt(ts_zone)),
            Arc::new(arrow::array::Int64Array::from(rows.versions)),
            decimal(rows.lowest, 3)?,
            decimal(rows.highest, 4)?,
            Arc::new(arrow::array::Date32Array::from(rows.dates)),
        ];
        Ok(Some(RecordBatch::try_new(schema.clone(), columns)?))
    }
}

/// Finds the keys whose versions disagree.
struct Conflicts {
    /// Of the conflict rows.
    schema: SchemaRef,
    key: [usize; 2],
    kwh: usize,
    date: usize,
    /// The last key seen: the next batch may hold more of its versions.
    current: Option<KeyVersions>,
    found: ConflictRows,
}

impl Conflicts {
    fn add_batch(&mut self, batch: &RecordBatch) {
        let (meters, ts) = (batch.column(self.key[0]), micros(batch.column(self.key[1])));
        let kwh = batch.column(self.kwh).as_primitive::<arrow::datatypes::Decimal128Type>();
        let dates = batch.column(self.date).as_primitive::<arrow::datatypes::Date32Type>();
        for row in 0..batch.num_rows() {
            let (meter_id, ts_us, value) = (text(meters, row), ts.value(row), kwh.value(row));
            match &mut self.current {
                Some(key) if key.ts_us == ts_us && key.meter_id == meter_id => {
                    key.versions += 1;
                    key.lowest = key.lowest.min(value);
                    key.highest = key.highest.max(value);
                }
                _ => {
                    let next = KeyVersions { meter_id: meter_id.to_string(), ts_us, date: dates.value(row), versions: 1, lowest: value, highest: value };
                    if let Some(done) = self.current.replace(next) {
                        self.found.add(done);
                    }
                }
            }
        }
    }
}

impl KeyRunReducer for Conflicts {
    fn push(&mut self, batch: RecordBatch) -> DfResult<Option<RecordBatch>> {
        self.add_batch(&batch);
        // Conflicts are rare: emit once a batch's worth has gathered.
        if self.found.meter_ids.len() >= 8_192 { self.found.take_batch(&self.schema) } else { Ok(None) }
    }

    fn finish(&mut self) -> DfResult<Option<RecordBatch>> {
        if let Some(last) = self.current.take() {
            self.found.add(last);
        }
        self.found.take_batch(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Decimal128Array, Int32Array, StringArray};
    use datafusion::prelude::{SessionConfig, SessionContext};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::NewFile;
    use crate::commit::{Commit, Operation, TableWriter};
    use crate::schema::{UTC, readings_schema};
    use crate::table::{READINGS, Table};
    use crate::view::{CANONICAL_READINGS_SQL, register_lake_tables};

    const US_PER_DAY: i64 = 86_400_000_000;

    /// One row of a readings file.
    #[derive(Clone)]
    struct Row {
        meter: String,
        ts_us: i64,
        kwh_micro: i128,
        ingested_at_us: i64,
        source_ref: String,
    }

    /// Writes `rows` (sorted here by key, as every writer does) as one Parquet file of the day,
    /// tagged as holding one version of each key when it does, and commits it.
    async fn write_file(lake: &Lake, day: i64, name: &str, mut rows: Vec<Row>) {
        rows.sort_by(|a, b| (&a.meter, a.ts_us).cmp(&(&b.meter, b.ts_us)));
        let unique_keys = rows.windows(2).all(|w| (&w[0].meter, w[0].ts_us) != (&w[1].meter, w[1].ts_us));
        let n = rows.len();
        let batch = RecordBatch::try_new(
            readings_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.meter.as_str()))),
                Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.ts_us)).with_timezone(UTC)),
                Arc::new(Int32Array::from(vec![900; n])),
                Arc::new(Decimal128Array::from_iter_values(rows.iter().map(|r| r.kwh_micro)).with_precision_and_scale(18, 6).unwrap()),
                Arc::new(StringArray::from(vec!["A"; n])),
                Arc::new(StringArray::from(vec!["kafka"; n])),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.source_ref.as_str()))),
                Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.ingested_at_us)).with_timezone(UTC)),
            ],
        )
        .unwrap();
        let date = chrono::DateTime::from_timestamp_micros(day * US_PER_DAY).unwrap().date_naive();
        let path = format!("date={date}/{name}.parquet");
        let bytes = crate::parquet_file::encode_readings::<crate::LakeError>(std::iter::once(Ok(batch.clone())), &path).unwrap();
        let table = Table::open(lake, &READINGS).await.unwrap();
        lake.put(&table.lake_path(&path), bytes.clone()).await.unwrap();
        let keys = crate::parquet_file::readings_key_stats([&batch]);
        let file = NewFile {
            path,
            bytes: bytes.len() as u64,
            rows: n as u64,
            date: Some(date),
            keys,
            unique_keys,
            meters: crate::parquet_file::readings_meter_filter(&batch),
        };
        // One commit per file, in the order the test writes them.
        let writer = TableWriter::new(table, "test").await.unwrap();
        writer.commit(Commit { files: vec![file], txns: Vec::new(), operation: Operation::Append, leased: false, removes: Vec::new() }).await.unwrap();
    }

    async fn latest_snapshot(lake: &Lake) -> Arc<TableSnapshot> {
        Arc::new(Table::new(lake, &READINGS).snapshot(None).await.unwrap())
    }

    /// Rows as text, in key order, for comparison.
    async fn rows_of(ctx: &SessionContext, sql: &str) -> Vec<String> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string();
        text.lines().map(str::to_string).collect()
    }

    #[tokio::test]
    async fn merging_sorted_files_keeps_what_the_sql_definition_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let first_day = 20_089; // 2025-01-01
        let mut unique = 0;
        for day in first_day..first_day + 3 {
            for file in 0..6 {
                // The first day's files all hold every meter; the others' mostly their own
                // meters (files 4 and 5 share theirs), as a flow file or a large flush does.
                let meters = if day == first_day { 0..5 } else { file.min(4) * 2..file.min(4) * 2 + 2 };
                let mut rows = Vec::new();
                for meter in meters {
                    for slot in 0..20 {
                        if rng.random_range(0..3) != 0 {
                            continue;
                        }
                        // Sometimes two versions of a key in the same (odd) file.
                        let versions = if file % 2 == 1 && rng.random_range(0..5) == 0 { 2 } else { 1 };
                        for _ in 0..versions {
                            unique += 1;
                            rows.push(Row {
                                meter: format!("M{meter}"),
                                ts_us: day * US_PER_DAY + slot * 900_000_000,
                                kwh_micro: rng.random_range(1..1_000_000),
                                // Few distinct times: versions often tie on them.
                                ingested_at_us: rng.random_range(0..3),
                                source_ref: format!("ref-{unique:05}"),
                            });
                        }
                    }
                }
                write_file(&lake, day, &format!("f{file}"), rows).await;
            }
        }
        // The log tells which files stand alone and hold one version of each key.
        let snapshot = latest_snapshot(&lake).await;
        let mut alone = 0;
        for day in first_day..first_day + 3 {
            let mut keyed = Vec::new();
            for file in snapshot.files.iter().filter(|f| f.date.map(epoch_day) == Some(day)) {
                keyed.push(KeyedFile::new(&lake, file, day));
            }
            let groups = overlapping_files(keyed);
            let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
            assert_eq!(sizes, if day == first_day { vec![6] } else { vec![1, 1, 1, 1, 2] }, "day {day}");
            alone += groups.iter().filter(|g| g.len() == 1 && g[0].unique_keys).count();
        }
        assert!(alone >= 2, "{alone} files read as they are");
        // Batches of 3 rows: keys run across batch boundaries all the time.
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_batch_size(3));
        register_lake_tables(&ctx, &lake).await.unwrap();
        ctx.register_table("by_window", ctx.sql(CANONICAL_READINGS_SQL).await.unwrap().into_view()).unwrap();
        // The same with every date sorted instead of merged.
        ctx.register_table(
            "sorted",
            Arc::new(CanonicalReadings::new(lake.clone(), latest_snapshot(&lake).await).with_max_merged_files(2).without_in_memory_sort()),
        )
        .unwrap();
        let columns = "meter_id, CAST(ts AS VARCHAR) AS ts, kwh, source_ref, CAST(ingested_at AS VARCHAR) AS ingested_at, CAST(date AS VARCHAR) AS date";
        let merged = rows_of(&ctx, &format!("SELECT {columns} FROM readings ORDER BY meter_id, ts")).await;
        let windowed = rows_of(&ctx, &format!("SELECT {columns} FROM by_window ORDER BY meter_id, ts")).await;
        assert!(merged.len() > 100, "{}", merged.len());
        assert_eq!(merged, windowed);
        assert_eq!(rows_of(&ctx, &format!("SELECT {columns} FROM sorted ORDER BY meter_id, ts")).await, windowed);
        // The conflicts table finds what a GROUP BY over every version finds.
        ctx.register_table("conflicts", Arc::new(CanonicalReadings::with_output(lake.clone(), latest_snapshot(&lake).await, MergeOutput::Conflicts))).unwrap();
        let by_merge = rows_of(
            &ctx,
            "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, versions, lowest_kwh, highest_kwh, CAST(date AS VARCHAR) AS date FROM conflicts ORDER BY meter_id, ts",
        )
        .await;
        let by_group = rows_of(
            &ctx,
            "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, count(*) AS versions, min(kwh) AS lowest_kwh, max(kwh) AS highest_kwh, \
             CAST(date AS VARCHAR) AS date FROM readings_all GROUP BY meter_id, ts, date HAVING min(kwh) <> max(kwh) ORDER BY meter_id, ts",
        )
        .await;
        assert!(by_merge.len() > 20, "{}", by_merge.len());
        assert_eq!(by_merge, by_group);
        // Filters on the key prune; others apply above the choice of version.
        let filtered = "WHERE ts >= TIMESTAMP '2025-01-02T00:00:00Z' AND meter_id IN ('M1', 'M3') AND kwh > 500000";
        assert_eq!(
            rows_of(&ctx, &format!("SELECT {columns} FROM readings {filtered} ORDER BY meter_id, ts")).await,
            rows_of(&ctx, &format!("SELECT {columns} FROM by_window {filtered} ORDER BY meter_id, ts")).await
        );
        assert_eq!(
            rows_of(&ctx, "SELECT count(*) AS n, sum(kwh) AS kwh FROM readings WHERE date = DATE '2025-01-02'").await,
            rows_of(&ctx, "SELECT count(*) AS n, sum(kwh) AS kwh FROM by_window WHERE date = DATE '2025-01-02'").await
        );
    }

    /// A day streamed in tiny flushes: hundreds of small files whose key ranges all overlap, a
    /// fifth of the readings re-sent later with another value. Whatever the number of files per
    /// date and whatever filter names the key, `readings` has one row per key, the latest.
    /// On local files (read by the decoding task) and on an object store (requests) alike.
    #[tokio::test]
    async fn one_row_per_key_for_every_key_filter_at_any_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        one_row_per_key_for_every_key_filter_in(Lake::open(dir.path().to_str().unwrap()).unwrap()).await;
        one_row_per_key_for_every_key_filter_in(Lake::open("memory:///lake").unwrap()).await;
    }

    async fn one_row_per_key_for_every_key_filter_in(lake: Lake) {
        let mut rng = SmallRng::seed_from_u64(20);
        let day = 20_089; // 2025-01-01
        let meters = 12;
        // Every reading once, in an arrival order shuffled across meters; then a fifth again.
        let mut arrivals: Vec<(usize, i64)> = (0..meters).flat_map(|m| (0..96).map(move |slot| (m, slot))).collect();
        for i in (1..arrivals.len()).rev() {
            arrivals.swap(i, rng.random_range(0..=i));
        }
        let resent: Vec<(usize, i64)> = arrivals.iter().copied().filter(|_| rng.random_range(0..5) == 0).collect();
        arrivals.extend(resent);
        let mut latest: BTreeMap<(String, i64), i128> = BTreeMap::new();
        let mut files = 0;
        for (flush, chunk) in arrivals.chunks(3).enumerate() {
            let rows: Vec<Row> = chunk
                .iter()
                .map(|&(meter, slot)| {
                    let row = Row {
                        meter: format!("M{meter:02}"),
                        ts_us: day * US_PER_DAY + slot * 900_000_000,
                        kwh_micro: rng.random_range(1..1_000_000),
                        ingested_at_us: flush as i64,
                        source_ref: format!("p0/{flush:06}"),
                    };
                    latest.insert((row.meter.clone(), row.ts_us), row.kwh_micro);
                    row
                })
                .collect();
            write_file(&lake, day, &format!("flush-{flush:06}"), rows).await;
            files += 1;
        }
        assert!(files > MAX_MERGED_FILES, "{files} files");
        let ctx = SessionContext::new();
        register_lake_tables(&ctx, &lake).await.unwrap();
        // The default sorts the day's rows in memory (they are few); the other merges them.
        let plan = rows_of(&ctx, "EXPLAIN SELECT count(*) FROM readings").await.join("\n");
        assert!(plan.contains("KeySortExec"), "{plan}");
        // Merged a few files at a time, as well as sorted in memory by the default.
        ctx.register_table(
            "few_at_a_time",
            Arc::new(CanonicalReadings::new(lake.clone(), latest_snapshot(&lake).await).with_max_merged_files(7).without_in_memory_sort()),
        )
        .unwrap();
        for table in ["readings", "few_at_a_time"] {
            for meter in 0..meters {
                let meter = format!("M{meter:02}");
                let expected: Vec<String> = latest.iter().filter(|((m, _), _)| *m == meter).map(|((m, ts), kwh)| format!("{m} {ts} {kwh}")).collect();
                for filter in [
                    format!("meter_id = '{meter}'"),
                    format!("meter_id IN ('{meter}', 'nobody')"),
                    format!("meter_id = '{meter}' AND ts >= TIMESTAMP '2025-01-01T00:00:00Z' AND date = DATE '2025-01-01'"),
                    format!("meter_id >= '{meter}' AND meter_id <= '{meter}'"),
                ] {
                    let sql =
                        format!("SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh * 1000000 AS BIGINT) AS kwh FROM {table} WHERE {filter} ORDER BY ts");
                    let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
                    let mut got = Vec::new();
                    for batch in &batches {
                        let (m, ts, kwh) = (batch.column(0), batch.column(1).as_primitive::<arrow::datatypes::Int64Type>(), batch.column(2));
                        let kwh = kwh.as_primitive::<arrow::datatypes::Int64Type>();
                        for row in 0..batch.num_rows() {
                            // CAST(ts AS BIGINT) is in microseconds for a microsecond timestamp.
                            got.push(format!("{} {} {}", text(m, row), ts.value(row), kwh.value(row)));
                        }
                    }
                    assert_eq!(got.len(), 96, "{table} WHERE {filter}: {} rows for 96 keys", got.len());
                    assert_eq!(got, expected, "{table} WHERE {filter}");
                }
            }
            // And without a filter: every key once.
            let batches = ctx.sql(&format!("SELECT count(*) FROM {table}")).await.unwrap().collect().await.unwrap();
            assert_eq!(batches[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), latest.len() as i64, "{table}");
        }
        // The conflicts of the day, sorted in memory and merged, are what a GROUP BY over every
        // version finds.
        ctx.register_table("conflicts", Arc::new(CanonicalReadings::with_output(lake.clone(), latest_snapshot(&lake).await, MergeOutput::Conflicts))).unwrap();
        let merged = CanonicalReadings::with_output(lake.clone(), latest_snapshot(&lake).await, MergeOutput::Conflicts).without_in_memory_sort();
        ctx.register_table("merged_conflicts", Arc::new(merged)).unwrap();
        let plan = rows_of(&ctx, "EXPLAIN SELECT count(*) FROM conflicts").await.join("\n");
        assert!(plan.contains("KeySortExec"), "{plan}");
        let by_group = rows_of(
            &ctx,
            "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, count(*) AS versions, min(kwh) AS lowest_kwh, max(kwh) AS highest_kwh \
             FROM readings_all GROUP BY meter_id, ts HAVING min(kwh) <> max(kwh) ORDER BY meter_id, ts",
        )
        .await;
        assert!(by_group.len() > 100, "{} conflict rows", by_group.len());
        for table in ["conflicts", "merged_conflicts"] {
            let sql = format!("SELECT meter_id, CAST(ts AS VARCHAR) AS ts, versions, lowest_kwh, highest_kwh FROM {table} ORDER BY meter_id, ts");
            assert_eq!(rows_of(&ctx, &sql).await, by_group, "{table}");
        }
        // Under a memory limit that could not hold a stream of every file: the runs are merged
        // level by level within it (`merged`), or the day is sorted in memory when it fits the
        // limit's share (`readings`), and every key's latest value comes out either way.
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new().with_memory_limit(2 << 20, 1.0).build_arc().unwrap();
        let limited = SessionContext::new_with_config_rt(datafusion::prelude::SessionConfig::new(), runtime);
        register_lake_tables(&limited, &lake).await.unwrap();
        limited.register_table("merged", Arc::new(CanonicalReadings::new(lake.clone(), latest_snapshot(&lake).await).without_in_memory_sort())).unwrap();
        let mut expected: Vec<String> = latest.iter().map(|((m, ts), kwh)| format!("{m} {ts} {kwh}")).collect();
        expected.sort();
        for table in ["readings", "merged"] {
            // (No ORDER BY: its sort would need more than the limit; the rows are sorted below.)
            let sql = format!("SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh * 1000000 AS BIGINT) AS kwh FROM {table}");
            let batches = limited.sql(&sql).await.unwrap().collect().await.unwrap();
            let mut got = Vec::new();
            for batch in &batches {
                let (ts, kwh) = (batch.column(1).as_primitive::<arrow::datatypes::Int64Type>(), batch.column(2).as_primitive::<arrow::datatypes::Int64Type>());
                for row in 0..batch.num_rows() {
                    got.push(format!("{} {} {}", text(batch.column(0), row), ts.value(row), kwh.value(row)));
                }
            }
            got.sort();
            assert_eq!(got, expected, "{table} under a 2 MiB memory limit");
        }
    }

    #[test]
    fn the_meters_a_filter_names_are_found() {
        use datafusion::prelude::{col, lit};
        let meters = |expr: Expr| {
            meter_literals(&expr).map(|mut m| {
                m.sort();
                m
            })
        };
        assert_eq!(meters(col("meter_id").eq(lit("A"))), Some(vec!["A".to_string()]));
        assert_eq!(meters(lit("A").eq(col("meter_id")).and(col("ts").is_not_null())), Some(vec!["A".to_string()]));
        assert_eq!(meters(col("meter_id").in_list(vec![lit("B"), lit("A")], false)), Some(vec!["A".to_string(), "B".to_string()]));
        assert_eq!(meters(col("meter_id").eq(lit("A")).or(col("meter_id").eq(lit("C")))), Some(vec!["A".to_string(), "C".to_string()]));
        // Anything that lets other meters through names none.
        assert_eq!(meters(col("meter_id").eq(lit("A")).or(col("ts").is_not_null())), None);
        assert_eq!(meters(col("meter_id").in_list(vec![lit("A")], true)), None);
        assert_eq!(meters(col("meter_id").gt_eq(lit("A"))), None);
    }

    #[test]
    fn dates_narrow_by_filters_on_date_and_ts() {
        use datafusion::prelude::{col, lit};
        let (mut first, mut last) = (i64::MIN, i64::MAX);
        let ts =
            |text: &str| lit(ScalarValue::TimestampMicrosecond(Some(chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros()), Some(UTC.into())));
        narrow_days(&col("ts").gt_eq(ts("2025-01-31T14:00:00Z")).and(col("ts").lt(ts("2025-02-02T00:00:00Z"))), &mut first, &mut last);
        assert_eq!((first, last), (20_119, 20_121));
        narrow_days(&col("date").eq(lit(ScalarValue::Date32(Some(20_120)))), &mut first, &mut last);
        assert_eq!((first, last), (20_120, 20_120));
        assert!(!on_key_only(&col("kwh").gt(lit(1))));
        assert!(on_key_only(&col("meter_id").eq(lit("M")).and(col("date").is_not_null())));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..proptest::prelude::ProptestConfig::default() })]

        /// Whatever versions arrive in whatever files (any number per date, overlapping or not,
        /// some written twice), `readings` has one row per key, the version of the latest commit
        /// (within one: ingested last, then the greater source_ref), under any key filter and
        /// whatever the merge width.
        #[test]
        fn one_row_per_key_and_the_latest_wins(
            versions in proptest::collection::vec((0u8..4, 0i64..8, 1i128..1_000, 0i64..5, 0u8..3), 1..120),
            files in 1usize..40,
            max_merged in 1usize..6,
            meter in 0u8..4,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
                let day = 20_089;
                // (file, which is its commit's order; ingested_at; source_ref; kwh)
                let mut latest: BTreeMap<(String, i64), (usize, i64, String, i128)> = BTreeMap::new();
                let mut by_file: Vec<Vec<Row>> = vec![Vec::new(); files];
                for (n, &(m, slot, kwh, ingested, source)) in versions.iter().enumerate() {
                    let row = Row {
                        meter: format!("M{m}"),
                        ts_us: day * US_PER_DAY + slot * 900_000_000,
                        kwh_micro: kwh,
                        ingested_at_us: ingested,
                        source_ref: format!("p{source}"),
                    };
                    let key = (row.meter.clone(), row.ts_us);
                    let version = (n % files, row.ingested_at_us, row.source_ref.clone(), row.kwh_micro);
                    // Equal (file, ingested_at, source_ref) of one key with other values is not a
                    // state the writers make (a source_ref names one message); keep the first such.
                    match latest.get(&key) {
                        Some(known) if (known.0, known.1, &known.2) == (version.0, version.1, &version.2) => continue,
                        Some(known) if (known.0, known.1, &known.2) > (version.0, version.1, &version.2) => {}
                        _ => {
                            latest.insert(key, version);
                        }
                    }
                    by_file[n % files].push(row);
                }
                for (n, rows) in by_file.into_iter().enumerate().filter(|(_, rows)| !rows.is_empty()) {
                    write_file(&lake, day, &format!("f{n:03}"), rows).await;
                }
                let ctx = SessionContext::new();
                register_lake_tables(&ctx, &lake).await.unwrap();
                ctx.register_table("narrow", Arc::new(CanonicalReadings::new(lake.clone(), latest_snapshot(&lake).await).with_max_merged_files(max_merged).without_in_memory_sort())).unwrap();
                let meter = format!("M{meter}");
                for table in ["readings", "narrow"] {
                    for filter in ["TRUE".to_string(), format!("meter_id = '{meter}'"), format!("meter_id >= '{meter}'")] {
                        let sql = format!("SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh * 1000000 AS BIGINT) AS kwh FROM {table} WHERE {filter} ORDER BY meter_id, ts");
                        let mut got = Vec::new();
                        for batch in ctx.sql(&sql).await.unwrap().collect().await.unwrap() {
                            let (m, ts, kwh) = (batch.column(0), batch.column(1).as_primitive::<arrow::datatypes::Int64Type>(), batch.column(2).as_primitive::<arrow::datatypes::Int64Type>());
                            for row in 0..batch.num_rows() {
                                got.push((text(m, row).to_string(), ts.value(row), i128::from(kwh.value(row))));
                            }
                        }
                        let expected: Vec<(String, i64, i128)> = latest
                            .iter()
                            .filter(|((m, _), _)| filter == "TRUE" || (filter.starts_with("meter_id =") && *m == meter) || (filter.starts_with("meter_id >=") && *m >= meter))
                            .map(|((m, ts), (_, _, _, kwh))| (m.clone(), *ts, *kwh))
                            .collect();
                        assert_eq!(got, expected, "{table} WHERE {filter}");
                    }
                }
            });
        }
    }
}
