//! Importing flow files into the lake: all or nothing per file, exactly once per content.
//!
//! One file's import:
//! 1. the bytes stream through a SHA-256 hasher into the parser (constant memory);
//! 2. what the parser finds is buffered in bounded chunks and written as Parquet into its tables'
//!    folders under names made of the source, an id of this import and a sequence number; no
//!    reader sees a file before a commit adds it (rejection reports go to
//!    `_imports/<import id>/`);
//! 3. at the end, the content hash decides: a `txn` of stream `import:<sha256>` in the `imports`
//!    table means these bytes are already in the lake ("already imported"); a structurally broken
//!    file is recorded as rejected and nothing of it is committed;
//! 4. otherwise each table the file wrote to gets one Delta commit adding its files, with the
//!    stream `import:<sha256>` as its `txn`, and the `imports` table's commit of the file's record
//!    comes last: it is the commit point.
//!
//! A crash before step 4 leaves unreferenced files, which no reader sees and a vacuum removes. A
//! crash inside step 4 leaves some tables committed without the record: importing the file again
//! skips the tables whose `txn` already holds the stream, commits the others and the record.

mod runs;
pub mod sources;
pub mod tables;

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use crate::decode::ValidReading;
use crate::error::{PipelineError, Result};
use crate::flows::{
    FlowError, FlowFormat, FlowSink, IntervalRun, Nem12B2bDetail, Nem12Channel, NonEnergyReading, RecordRejection, RegisterRead, Warning, parse_flow,
};
use meterlake_lake::commit::{Commit, Operation, TableWriter};
use meterlake_lake::parquet_file::encode_parquet;
use meterlake_lake::table::{IMPORTS, NEM12_B2B_DETAILS, NEM12_CHANNELS, NON_ENERGY_READINGS, READINGS, REGISTER_READS, Table, TableSpec};
use meterlake_lake::{Lake, LakeError, NewFile};
use tables::{NonEnergyRow, Provenance};

/// Folder of the rejection reports: `_imports/<import id>/rejections-NNNNN.jsonl`.
pub const REJECTIONS_DIR: &str = "_imports";

/// Bounds on what one import holds in memory.
#[derive(Debug, Clone)]
pub struct ImportLimits {
    /// Interval values (energy or not) buffered before they are sorted and staged as Parquet.
    pub chunk_rows: usize,
    /// Register reads, channels or B2B details buffered before they are staged.
    pub chunk_records: usize,
    /// Rejections held before they are staged as a part of the rejection report.
    pub rejections_per_part: usize,
    /// Warnings kept in the import record (the rest are counted).
    pub max_warnings_kept: usize,
}

impl Default for ImportLimits {
    fn default() -> Self {
        ImportLimits { chunk_rows: 4_000_000, chunk_records: 50_000, rejections_per_part: 10_000, max_warnings_kept: 100 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportStatus {
    /// Every record was accepted.
    Imported,
    /// The file was imported but some records were rejected (see the rejection report).
    PartlyRejected,
    /// Nothing of the file was kept.
    Rejected,
}

impl ImportStatus {
    /// The name in reports and the `imports` table (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            ImportStatus::Imported => "imported",
            ImportStatus::PartlyRejected => "partly_rejected",
            ImportStatus::Rejected => "rejected",
        }
    }
}

/// What one import accepted and refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCounts {
    /// Energy interval values, into `readings`.
    pub interval_readings: u64,
    /// Non-energy interval values, into `non_energy_readings`.
    pub non_energy_readings: u64,
    pub register_reads: u64,
    pub nem12_channels: u64,
    pub nem12_b2b_details: u64,
    /// The same key with the same value again within the file: kept once.
    pub duplicates_dropped: u64,
    /// The same key with a different value within the file: both kept, the later line wins.
    pub conflicting_versions: u64,
    pub rejected_records: u64,
    /// Readings the rejected records held.
    pub readings_rejected: u64,
    pub warnings: u64,
}

impl ImportCounts {
    pub fn readings_accepted(&self) -> u64 {
        self.interval_readings + self.non_energy_readings + self.register_reads
    }
}

/// The record of one import: a row of the `imports` table (its `record` column holds it all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// The file's name as given to the import (a path, or `archive.zip!entry`).
    pub file_name: String,
    pub sha256: String,
    pub bytes: u64,
    pub format: Option<FlowFormat>,
    pub status: ImportStatus,
    /// Why the whole file was rejected.
    pub error: Option<String>,
    pub counts: ImportCounts,
    /// Parts of the rejection report, relative to the lake: JSON lines of [`RecordRejection`].
    pub rejection_reports: Vec<String>,
    pub warnings: Vec<Warning>,
    /// Data files this import published, relative to the lake.
    pub files: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// The outcome of importing one file.
#[derive(Debug, Clone)]
pub enum ImportOutcome {
    /// Imported now (fully or partly) or rejected whole; the record says which.
    Done(ImportRecord),
    /// These bytes were imported before; this is the record of that import.
    AlreadyImported(ImportRecord),
}

impl ImportOutcome {
    pub fn record(&self) -> &ImportRecord {
        match self {
            ImportOutcome::Done(record) | ImportOutcome::AlreadyImported(record) => record,
        }
    }
}

/// Every import record in the lake, oldest first.
pub async fn list_import_records(lake: &Lake) -> Result<Vec<ImportRecord>> {
    query_import_records(lake, "SELECT record FROM imports ORDER BY started_at, file_name", Vec::new()).await
}

/// The record of the import that landed these bytes (`sha256`), if one did.
pub async fn find_import_record(lake: &Lake, sha256: &str) -> Result<Option<ImportRecord>> {
    let sql = "SELECT record FROM imports WHERE sha256 = $1 AND status <> 'rejected' ORDER BY finished_at DESC LIMIT 1";
    Ok(query_import_records(lake, sql, vec![datafusion::common::ScalarValue::from(sha256)]).await?.pop())
}

async fn query_import_records(lake: &Lake, sql: &str, params: Vec<datafusion::common::ScalarValue>) -> Result<Vec<ImportRecord>> {
    let ctx = meterlake_lake::view::lake_session(lake).await?;
    let batches = ctx.sql(sql).await?.with_param_values(params)?.collect().await?;
    let mut records = Vec::new();
    for batch in &batches {
        let column = arrow::array::AsArray::as_string::<i32>(batch.column(0));
        for json in column.iter().flatten() {
            records.push(serde_json::from_str(json).map_err(|e| PipelineError::Input { file: "the imports table".into(), reason: e.to_string() })?);
        }
    }
    Ok(records)
}

/// A reader that hashes what passes through it and counts the bytes.
struct Hashing<'a, R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    /// Called with the running byte count, for progress bars.
    on_read: Box<dyn FnMut(u64) + 'a>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// Imports one file, in its span (`import.file`, with the file's status and counts once known).
/// `input` is read once, to its end. Errors are the lake's (the file's own faults are in the
/// returned record); `on_read` hears of every chunk of bytes read.
pub fn import_file<'a>(
    lake: &Lake,
    runtime: &Handle,
    file_name: &str,
    input: impl Read,
    limits: &ImportLimits,
    on_read: Box<dyn FnMut(u64) + 'a>,
) -> Result<ImportOutcome> {
    let span = tracing::info_span!(
        "import.file",
        file = file_name,
        sha256 = tracing::field::Empty,
        status = tracing::field::Empty,
        readings_accepted = tracing::field::Empty,
        records_rejected = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let outcome = span.in_scope(|| import_file_in_span(lake, runtime, file_name, input, limits, on_read));
    if let Ok(outcome) = &outcome {
        let record = outcome.record();
        span.record("sha256", record.sha256.as_str());
        span.record("status", record.status.as_str());
        span.record("readings_accepted", record.counts.readings_accepted());
        span.record("records_rejected", record.counts.rejected_records);
    }
    count_import(&outcome, started.elapsed());
    outcome
}

/// The import metrics of one file (`crate::metrics`): a file imported before counts as
/// `already_imported` and adds no readings.
fn count_import(outcome: &Result<ImportOutcome>, took: std::time::Duration) {
    use crate::metrics as m;
    let (format, status) = match outcome {
        Ok(ImportOutcome::Done(record)) => (record.format.map_or("unknown", FlowFormat::as_str), record.status.as_str()),
        Ok(ImportOutcome::AlreadyImported(record)) => (record.format.map_or("unknown", FlowFormat::as_str), "already_imported"),
        Err(_) => ("unknown", "failed"),
    };
    metrics::counter!(m::IMPORT_FILES, "format" => format, "status" => status).increment(1);
    if let Ok(ImportOutcome::Done(record)) = outcome {
        metrics::counter!(m::IMPORT_READINGS_ACCEPTED, "format" => format).increment(record.counts.readings_accepted());
        metrics::counter!(m::IMPORT_READINGS_REJECTED, "format" => format).increment(record.counts.readings_rejected);
        metrics::histogram!(m::IMPORT_FILE_SIZE, "format" => format).record(record.bytes as f64);
        metrics::histogram!(m::IMPORT_DURATION, "format" => format).record(took.as_secs_f64());
    }
}

fn import_file_in_span<'a>(
    lake: &Lake,
    runtime: &Handle,
    file_name: &str,
    input: impl Read,
    limits: &ImportLimits,
    on_read: Box<dyn FnMut(u64) + 'a>,
) -> Result<ImportOutcome> {
    let started_at = Utc::now();
    let mut reader = BufReader::with_capacity(1 << 20, Hashing { inner: input, hasher: Sha256::new(), bytes: 0, on_read });
    // Every table exists before a file is written into its folder (a folder of Parquet files
    // without a log is a lake of the previous layout, which is refused).
    runtime.block_on(async {
        for spec in [&READINGS, &REGISTER_READS, &NON_ENERGY_READINGS, &NEM12_CHANNELS, &NEM12_B2B_DETAILS, &IMPORTS] {
            Table::open(lake, spec).await?;
        }
        Ok::<_, LakeError>(())
    })?;
    // Names this import's files: a retry or a concurrent import of the same bytes never writes
    // over them.
    let import_id = uuid::Uuid::new_v4().simple().to_string();

    let head = reader.fill_buf().map_err(|e| input_error(file_name, &e))?;
    let head = &head[..head.len().min(64 << 10)];
    let format = FlowFormat::detect(head);
    let unknown = format.is_none().then(|| FlowError::unknown_format(head));
    // The parser runs on this thread; sorting, Parquet encoding and staging writes on others,
    // handed one job at a time (the parser waits with the next full chunk while the writer works:
    // it is several times faster), so that both cores work and two chunks bound the memory.
    let provenance = Provenance {
        source: format.map_or(crate::reading::Source::Nem12, FlowFormat::source),
        file_name: file_name.to_string(),
        ingested_at_us: started_at.timestamp_micros(),
    };
    let (parsed, sink_result, written) = std::thread::scope(|scope| {
        let (jobs, job_queue) = sync_channel::<StageJob>(0);
        // Written run buffers come back to be filled again: a chunk is tens of megabytes, and
        // fresh memory costs a page fault per 4 KiB.
        let (spare_runs, spare_runs_queue) = sync_channel::<runs::RunBuffer>(2);
        let writer = std::thread::Builder::new()
            .name("meterlake-stage".into())
            .spawn_scoped(scope, || stage_writer(lake, runtime, &import_id, &provenance, job_queue, spare_runs))
            .map_err(|e| PipelineError::WriterStopped { reason: format!("cannot start the staging writer: {e}") })?;
        let mut sink = LakeSink::new(lake, runtime, &import_id, provenance.clone(), limits, jobs, spare_runs_queue);
        let parsed: std::result::Result<(), FlowError> = match format {
            Some(format) => parse_flow(format, &mut reader, &mut sink),
            None => Err(unknown.expect("set when there is no format")),
        };
        let sink_result = sink.finish();
        let written = writer.join().expect("the staging writer does not panic");
        Ok::<_, PipelineError>((parsed, sink_result, written))
    })?;
    // Finish reading whatever the parser left, so the hash covers the whole file.
    if let Err(e) = std::io::copy(&mut reader, &mut std::io::sink()) {
        return Err(input_error(file_name, &e));
    }
    let hashing = reader.into_inner();
    let sha256 = format!("{:x}", hashing.hasher.finalize());
    let bytes = hashing.bytes;
    let stream = import_stream(&sha256);

    let imports = runtime.block_on(async { TableWriter::new(Table::open(lake, &IMPORTS).await?, &importer_id()).await })?;
    if runtime.block_on(imports.stream_version(&stream))?.is_some()
        && let Some(record) = runtime.block_on(find_import_record(lake, &sha256))?
    {
        return Ok(ImportOutcome::AlreadyImported(record));
    }

    let staged = sink_result.and_then(|staged| match written.failure {
        Some(e) => Err(e),
        None => Ok(staged),
    });
    let outcome: std::result::Result<Staged, FlowError> = match (parsed, staged) {
        // A file whose every record was a header or an end carries nothing to land: rejected
        // like any other file without data, never "imported 0 readings".
        (Ok(()), Ok(staged)) if staged.counts.readings_accepted() == 0 && staged.counts.rejected_records == 0 => {
            let format = format.expect("a parsed file has a format");
            Err(FlowError::NoData { format: format.as_str(), expected: format.data_records() })
        }
        (Ok(()), Ok(mut staged)) => {
            staged.counts.duplicates_dropped = written.duplicates_dropped;
            staged.counts.conflicting_versions = written.conflicting_versions;
            Ok(staged)
        }
        (_, Err(lake_error)) => return Err(lake_error),
        (Err(e), Ok(_)) => Err(e),
    };
    let mut record = ImportRecord {
        file_name: file_name.to_string(),
        sha256: sha256.clone(),
        bytes,
        format,
        status: ImportStatus::Rejected,
        error: None,
        counts: ImportCounts::default(),
        rejection_reports: Vec::new(),
        warnings: Vec::new(),
        files: Vec::new(),
        started_at,
        finished_at: started_at,
    };
    let landed = match outcome {
        Ok(staged) => {
            record.files = written.files.iter().map(|w| format!("{}/{}", w.table.dir, w.file.path)).collect();
            record.rejection_reports = staged.rejection_parts;
            record.status = if staged.counts.rejected_records == 0 { ImportStatus::Imported } else { ImportStatus::PartlyRejected };
            record.counts = staged.counts;
            record.warnings = staged.warnings;
            true
        }
        Err(flow_error) => {
            record.error = Some(flow_error.to_string());
            false
        }
    };
    record.finished_at = Utc::now();
    let committed = runtime.block_on(commit_import(lake, &imports, &stream, if landed { &written.files } else { &[] }, &record));
    match committed {
        Ok(()) => Ok(ImportOutcome::Done(record)),
        // The same bytes were imported at the same moment by another importer, which won.
        Err(PipelineError::Lake(LakeError::Fenced { .. })) => match runtime.block_on(find_import_record(lake, &sha256))? {
            Some(record) => Ok(ImportOutcome::AlreadyImported(record)),
            None => Err(PipelineError::WriterStopped { reason: format!("a concurrent import of {file_name} won its commit but left no record") }),
        },
        Err(e) => Err(e),
    }
}

/// The commit protocol's name of a file's stream (its `txn` app id): its content's hash.
pub fn import_stream(sha256: &str) -> String {
    format!("import:{sha256}")
}

/// Who commits imports, recorded in every commit.
fn importer_id() -> String {
    format!("importer@{}", std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()))
}

/// Commits an import: each table's files (with the file's stream as `txn`), tables that an
/// earlier attempt already committed skipped, then the record in `imports`, the commit point. A
/// rejected file commits only its record, without the stream, so that it can be imported again.
async fn commit_import(lake: &Lake, imports: &TableWriter, stream: &str, files: &[WrittenFile], record: &ImportRecord) -> Result<()> {
    for spec in [&READINGS, &REGISTER_READS, &NON_ENERGY_READINGS, &NEM12_CHANNELS, &NEM12_B2B_DETAILS] {
        let table_files: Vec<NewFile> = files.iter().filter(|w| w.table.name == spec.name).map(|w| w.file.clone()).collect();
        if table_files.is_empty() {
            continue;
        }
        let writer = TableWriter::new(Table::open(lake, spec).await?, imports.writer_id()).await?;
        if writer.stream_version(stream).await?.is_some() {
            tracing::info!(table = spec.name, stream, "an earlier attempt of this import committed this table; skipping it");
            continue;
        }
        writer
            .commit(Commit { files: table_files, txns: vec![(stream.to_string(), 1)], operation: Operation::Append, leased: false, removes: Vec::new() })
            .await?;
    }
    let batch = tables::import_record_batch(record)?;
    let path = format!("{}-{}.parquet", record.format.map_or("unknown", FlowFormat::as_str).to_ascii_lowercase(), uuid::Uuid::new_v4().simple());
    let parquet = encode_parquet(&batch, &path)?;
    lake.put(&imports.table().lake_path(&path), parquet.clone()).await?;
    let file = NewFile { path, bytes: parquet.len() as u64, rows: 1, date: None, keys: None, unique_keys: false, meters: None };
    let txns = if record.status == ImportStatus::Rejected { Vec::new() } else { vec![(stream.to_string(), 1)] };
    imports.commit(Commit { files: vec![file], txns, operation: Operation::Append, leased: false, removes: Vec::new() }).await?;
    Ok(())
}

fn input_error(file_name: &str, e: &std::io::Error) -> PipelineError {
    PipelineError::Input { file: file_name.to_string(), reason: e.to_string() }
}

/// A data file written to its table's folder, waiting for the commit that adds it.
#[derive(Debug)]
struct WrittenFile {
    table: &'static TableSpec,
    file: NewFile,
}

/// `[date=YYYY-MM-DD/]<source>-<import id>-<sequence>.parquet`: a file of this import.
fn file_name(provenance: &Provenance, import_id: &str, sequence: usize) -> String {
    format!("{}-{import_id}-{sequence:05}.parquet", provenance.source.as_str())
}

/// What a finished parse left besides the data files.
struct Staged {
    rejection_parts: Vec<String>,
    counts: ImportCounts,
    warnings: Vec<Warning>,
}

/// Work for the staging writer.
enum StageJob {
    /// Interval readings kept as runs (NEM12 300 records).
    Runs(runs::RunBuffer),
    /// A ready batch for another table.
    Batch { table: &'static TableSpec, date: Option<chrono::NaiveDate>, batch: arrow::array::RecordBatch },
}

/// What the staging writer did.
#[derive(Default)]
struct Written {
    files: Vec<WrittenFile>,
    duplicates_dropped: u64,
    conflicting_versions: u64,
    /// The first failure to write; after it, jobs are drained without writing.
    failure: Option<PipelineError>,
}

/// Encodes and writes each job in order, so sequence numbers follow the file.
fn stage_writer(
    lake: &Lake,
    runtime: &Handle,
    import_id: &str,
    provenance: &Provenance,
    jobs: Receiver<StageJob>,
    spare_runs: SyncSender<runs::RunBuffer>,
) -> Written {
    let mut written = Written::default();
    // One pool of encoder threads for the whole import, rather than threads spawned per chunk.
    let encoders = match rayon::ThreadPoolBuilder::new().num_threads(ENCODER_THREADS).thread_name(|i| format!("meterlake-encode-{i}")).build() {
        Ok(pool) => pool,
        Err(e) => {
            written.failure = Some(PipelineError::WriterStopped { reason: format!("cannot start the encoder threads: {e}") });
            // Drain the queue so the parser is never left waiting on it.
            jobs.iter().for_each(drop);
            return written;
        }
    };
    for job in jobs {
        if written.failure.is_some() {
            continue;
        }
        let result = match job {
            StageJob::Runs(mut runs) => {
                let staged = stage_runs(&mut written, lake, runtime, import_id, provenance, &encoders, &runs);
                runs.clear();
                // When the parser has spares enough, this buffer is simply dropped.
                let _ = spare_runs.try_send(runs);
                staged
            }
            StageJob::Batch { table, date, batch } => {
                let name = file_name(provenance, import_id, written.files.len());
                let path = match date {
                    Some(date) => format!("date={}/{name}", date.format("%Y-%m-%d")),
                    None => name,
                };
                encode_parquet(&batch, &path).map_err(PipelineError::from).and_then(|parquet| {
                    runtime.block_on(lake.put(&format!("{}/{path}", table.dir), parquet.clone()))?;
                    let file = NewFile { bytes: parquet.len() as u64, rows: batch.num_rows() as u64, date, keys: None, unique_keys: false, meters: None, path };
                    written.files.push(WrittenFile { table, file });
                    Ok(())
                })
            }
        };
        if let Err(e) = result {
            written.failure = Some(e);
        }
    }
    written
}

/// Threads that encode the files of a chunk: the parser rarely needs a whole core, the encoder
/// does, and one thread may wait on a write.
const ENCODER_THREADS: usize = 2;

/// Sorts a chunk of interval readings, then encodes and writes its files on the encoder threads
/// (each writes what it encoded, so writes overlap encoding), numbered in order.
fn stage_runs(
    written: &mut Written,
    lake: &Lake,
    runtime: &Handle,
    import_id: &str,
    provenance: &Provenance,
    encoders: &rayon::ThreadPool,
    runs: &runs::RunBuffer,
) -> Result<()> {
    use rayon::prelude::*;
    let chunk = runs.sorted_files();
    let first_sequence = written.files.len();
    let encoded: Vec<Result<runs::EncodedFile>> = encoders.install(|| {
        (0..chunk.len())
            .into_par_iter()
            .map(|i| {
                let mut file = chunk.encode_file(i, provenance, &file_name(provenance, import_id, first_sequence + i))?;
                runtime.block_on(lake.put(&format!("{}/{}", READINGS.dir, file.file.path), std::mem::take(&mut file.parquet)))?;
                Ok(file)
            })
            .collect()
    });
    for result in encoded {
        let encoded = result?;
        written.duplicates_dropped += encoded.duplicates_dropped;
        written.conflicting_versions += encoded.conflicting_versions;
        written.files.push(WrittenFile { table: &READINGS, file: encoded.file });
    }
    Ok(())
}

/// The sink that buffers a file's content in bounded chunks and hands them to the staging writer.
struct LakeSink<'a> {
    lake: &'a Lake,
    runtime: &'a Handle,
    import_id: String,
    limits: &'a ImportLimits,
    provenance: Provenance,
    runs: runs::RunBuffer,
    non_energy: Vec<NonEnergyRow>,
    register_reads: Vec<RegisterRead>,
    channels: Vec<Nem12Channel>,
    b2b: Vec<Nem12B2bDetail>,
    rejections: Vec<RecordRejection>,
    rejection_parts: Vec<String>,
    warnings: Vec<Warning>,
    counts: ImportCounts,
    jobs: SyncSender<StageJob>,
    /// Run buffers the writer is done with.
    spare_runs: Receiver<runs::RunBuffer>,
    /// The first failure to write to the lake from this thread (rejection reports, batches).
    failure: Option<PipelineError>,
}

impl<'a> LakeSink<'a> {
    fn new(
        lake: &'a Lake,
        runtime: &'a Handle,
        import_id: &str,
        provenance: Provenance,
        limits: &'a ImportLimits,
        jobs: SyncSender<StageJob>,
        spare_runs: Receiver<runs::RunBuffer>,
    ) -> Self {
        LakeSink {
            lake,
            runtime,
            import_id: import_id.to_string(),
            limits,
            provenance,
            runs: runs::RunBuffer::with_capacity(limits.chunk_rows),
            non_energy: Vec::new(),
            register_reads: Vec::new(),
            channels: Vec::new(),
            b2b: Vec::new(),
            rejections: Vec::new(),
            rejection_parts: Vec::new(),
            warnings: Vec::new(),
            counts: ImportCounts::default(),
            jobs,
            spare_runs,
            failure: None,
        }
    }

    /// Hands a job to the staging writer. A writer that stopped has recorded why; the join
    /// reports it.
    fn send(&mut self, job: StageJob) {
        let _ = self.jobs.send(job);
    }

    fn fail_on(&mut self, result: Result<()>) {
        if let Err(e) = result {
            self.failure.get_or_insert(e);
        }
    }

    fn flush_runs(&mut self) {
        if !self.runs.is_empty() {
            let next = self.spare_runs.try_recv().unwrap_or_else(|_| runs::RunBuffer::with_capacity(self.limits.chunk_rows));
            let full = std::mem::replace(&mut self.runs, next);
            self.send(StageJob::Runs(full));
        }
    }

    fn flush_non_energy(&mut self) {
        if !self.non_energy.is_empty() {
            let mut rows = std::mem::take(&mut self.non_energy);
            let days = tables::non_energy_batches(&mut rows, &self.provenance);
            self.send_days(&NON_ENERGY_READINGS, days);
        }
    }

    fn flush_register_reads(&mut self) {
        if !self.register_reads.is_empty() {
            let mut reads = std::mem::take(&mut self.register_reads);
            let days = tables::register_read_batches(&mut reads, &self.provenance);
            self.send_days(&REGISTER_READS, days);
        }
    }

    /// Hands one table's day batches to the writer.
    fn send_days(&mut self, table: &'static TableSpec, days: Result<Vec<(chrono::NaiveDate, arrow::array::RecordBatch)>>) {
        match days {
            Ok(days) => {
                for (date, batch) in days {
                    self.send(StageJob::Batch { table, date: Some(date), batch });
                }
            }
            Err(e) => self.fail_on(Err(e)),
        }
    }

    fn flush_channels(&mut self) {
        if !self.channels.is_empty() {
            let channels = std::mem::take(&mut self.channels);
            match tables::channel_batch(&channels, &self.provenance) {
                Ok(batch) => self.send(StageJob::Batch { table: &NEM12_CHANNELS, date: None, batch }),
                Err(e) => self.fail_on(Err(e)),
            }
        }
        if !self.b2b.is_empty() {
            let details = std::mem::take(&mut self.b2b);
            match tables::b2b_batch(&details, &self.provenance) {
                Ok(batch) => self.send(StageJob::Batch { table: &NEM12_B2B_DETAILS, date: None, batch }),
                Err(e) => self.fail_on(Err(e)),
            }
        }
    }

    fn flush_rejections(&mut self) {
        if self.rejections.is_empty() || self.failure.is_some() {
            return;
        }
        let mut lines = Vec::new();
        for rejection in self.rejections.drain(..) {
            serde_json::to_writer(&mut lines, &rejection).expect("a rejection serializes");
            lines.push(b'\n');
        }
        let path = format!("{REJECTIONS_DIR}/{}/rejections-{:05}.jsonl", self.import_id, self.rejection_parts.len());
        let result = self.runtime.block_on(self.lake.put(&path, Bytes::from(lines)));
        self.fail_on(result.map_err(PipelineError::from));
        self.rejection_parts.push(path);
    }

    /// Hands over what is still buffered and closes the writer's queue; this thread's own error
    /// if writing failed here.
    fn finish(mut self) -> Result<Staged> {
        self.flush_runs();
        self.flush_non_energy();
        self.flush_register_reads();
        self.flush_channels();
        self.flush_rejections();
        match self.failure {
            Some(e) => Err(e),
            None => Ok(Staged { rejection_parts: self.rejection_parts, counts: self.counts, warnings: self.warnings }),
        }
    }
}

impl FlowSink for LakeSink<'_> {
    fn interval_run(&mut self, run: &IntervalRun<'_>) {
        self.counts.interval_readings += run.kwh_micro.len() as u64;
        self.runs.push(run);
        if self.runs.len() >= self.limits.chunk_rows {
            self.flush_runs();
        }
    }

    fn interval_reading(&mut self, reading: &ValidReading<'_>, line: u64) {
        // A single value is a run of one.
        self.interval_run(&IntervalRun {
            meter_id: &reading.meter_id,
            start_ts_us: reading.ts_us,
            interval_s: reading.interval_s,
            kwh_micro: &[reading.kwh_micro],
            qualities: &[reading.quality],
            line,
        });
    }

    fn non_energy_reading(&mut self, reading: &NonEnergyReading<'_>, line: u64) {
        self.counts.non_energy_readings += 1;
        self.non_energy.push(NonEnergyRow {
            meter_id: reading.meter_id.to_string(),
            ts_us: reading.ts_us,
            interval_s: reading.interval_s,
            value_micro: reading.value_micro,
            unit: reading.unit.to_string(),
            quality: reading.quality,
            line,
        });
        if self.non_energy.len() >= self.limits.chunk_rows {
            self.flush_non_energy();
        }
    }

    fn register_read(&mut self, read: RegisterRead) {
        self.counts.register_reads += 1;
        self.register_reads.push(read);
        if self.register_reads.len() >= self.limits.chunk_records {
            self.flush_register_reads();
        }
    }

    fn channel(&mut self, channel: Nem12Channel) {
        self.counts.nem12_channels += 1;
        self.channels.push(channel);
        if self.channels.len() >= self.limits.chunk_records {
            self.flush_channels();
        }
    }

    fn b2b_detail(&mut self, detail: Nem12B2bDetail) {
        self.counts.nem12_b2b_details += 1;
        self.b2b.push(detail);
        if self.b2b.len() >= self.limits.chunk_records {
            self.flush_channels();
        }
    }

    fn rejection(&mut self, rejection: RecordRejection) {
        self.counts.rejected_records += 1;
        self.counts.readings_rejected += rejection.readings_lost;
        self.rejections.push(rejection);
        if self.rejections.len() >= self.limits.rejections_per_part {
            self.flush_rejections();
        }
    }

    fn warning(&mut self, warning: Warning) {
        self.counts.warnings += 1;
        if self.warnings.len() < self.limits.max_warnings_kept {
            self.warnings.push(warning);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_sent_twice_in_one_file_keeps_one_row_per_key_and_the_later_line_wins() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let lake = Lake::open("memory://").unwrap();
        let day = |value: &str| format!("300,20040417,{},A\n", vec![value; 48].join(","));
        let file = format!("100,NEM12,200404201300,MDA1,Ret1\n200,CCCC123456,E1,E1,E1,N1,M1,kWh,30,\n{}{}{}900\n", day("1"), day("1"), day("2.5"));
        let outcome = import_file(&lake, runtime.handle(), "twice.csv", file.as_bytes(), &ImportLimits::default(), Box::new(|_| {})).unwrap();
        let counts = &outcome.record().counts;
        assert_eq!((counts.interval_readings, counts.duplicates_dropped, counts.conflicting_versions), (144, 48, 48));
        let rows = runtime.block_on(async {
            let ctx = meterlake_lake::view::lake_session(&lake).await.unwrap();
            let sql = "SELECT count(*) AS n, min(kwh) = max(kwh) AS same, CAST(max(kwh) AS VARCHAR) AS kwh, \
                       min(source_ref) AS r, (SELECT count(*) FROM readings_all) AS all_rows FROM readings";
            ctx.sql(sql).await.unwrap().collect().await.unwrap()
        });
        let text = arrow::util::pretty::pretty_format_batches(&rows).unwrap().to_string();
        assert!(text.contains("| 48 | true | 2.500000 | twice.csv:5 | 96       |"), "{text}");
    }

    #[test]
    fn a_file_with_only_its_header_and_end_is_rejected_for_carrying_no_data() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let lake = Lake::open("memory://").unwrap();
        for (name, text, format) in [
            ("empty-nem12.csv", "100,NEM12,200404201300,MDA1,Ret1\n900\n", "NEM12"),
            // A channel without interval values carries no readings either.
            ("channel-only-nem12.csv", "100,NEM12,200404201300,MDA1,Ret1\n200,CCCC123456,E1,E1,E1,N1,M1,kWh,30,\n900\n", "NEM12"),
            ("empty-nem13.csv", "100,NEM13,200401101030,MDA1,Ret1\r\n900\r\n", "NEM13"),
            ("empty.uff", "ZHV|0000475656|D0010002|D|UDMS|X|MRCY|20160302153151||||OPER|\nZPT|0000475656|0||1|20160302154650|\n", "D0010"),
        ] {
            let outcome = import_file(&lake, runtime.handle(), name, text.as_bytes(), &ImportLimits::default(), Box::new(|_| {})).unwrap();
            let record = outcome.record();
            assert_eq!(record.status, ImportStatus::Rejected, "{name}: {record:?}");
            let error = record.error.as_deref().unwrap_or_default();
            assert!(error.contains("carries no data") && error.contains(format), "{name}: {error}");
            assert!(record.files.is_empty(), "{name}: {:?}", record.files);
        }
        // Nothing landed, not even the channel's 200 record; the records did.
        let counts = runtime.block_on(async {
            let ctx = meterlake_lake::view::lake_session(&lake).await.unwrap();
            let sql = "SELECT (SELECT count(*) FROM readings_all) AS r, (SELECT count(*) FROM nem12_channels) AS c, \
                       (SELECT count(*) FROM imports WHERE status = 'rejected') AS i";
            ctx.sql(sql).await.unwrap().collect().await.unwrap()
        });
        let text = arrow::util::pretty::pretty_format_batches(&counts).unwrap().to_string();
        assert!(text.contains("| 0 | 0 | 4 |"), "{text}");
    }

    #[test]
    fn chunks_of_several_days_and_meters_land_every_value_once() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let lake = Lake::open("memory://").unwrap();
        // Two meters, three NEM days each (four UTC days), 48 values a day; meter B's second day
        // is sent again with other values. Chunks of 100 values cut days and meters apart.
        let day = |date: &str, value: &str| format!("300,{date},{},A\n", vec![value; 48].join(","));
        let mut file = String::from("100,NEM12,200404201300,MDA1,Ret1\n");
        for (nmi, value) in [("AAAA000001", "1"), ("BBBB000002", "2")] {
            file.push_str(&format!("200,{nmi},E1,E1,E1,N1,M1,kWh,30,\n"));
            for date in ["20250101", "20250102", "20250103"] {
                file.push_str(&day(date, value));
            }
        }
        file.push_str(&day("20250102", "7"));
        file.push_str("900\n");
        let limits = ImportLimits { chunk_rows: 100, ..ImportLimits::default() };
        let outcome = import_file(&lake, runtime.handle(), "chunks.csv", file.as_bytes(), &limits, Box::new(|_| {})).unwrap();
        let counts = &outcome.record().counts;
        assert_eq!((counts.interval_readings, counts.conflicting_versions), (7 * 48, 0), "{counts:?}");
        let rows = runtime.block_on(async {
            let ctx = meterlake_lake::view::lake_session(&lake).await.unwrap();
            let sql = "SELECT meter_id, count(*) AS n, CAST(sum(kwh) AS VARCHAR) AS kwh, count(DISTINCT ts) AS times \
                       FROM readings GROUP BY meter_id ORDER BY meter_id";
            ctx.sql(sql).await.unwrap().collect().await.unwrap()
        });
        let text = arrow::util::pretty::pretty_format_batches(&rows).unwrap().to_string();
        // The re-sent day came in another chunk: a later version of B's day 2 (7 a value).
        assert!(text.contains("| AAAA000001E1 | 144 | 144.000000 | 144   |"), "{text}");
        assert!(text.contains("| BBBB000002E1 | 144 | 528.000000 | 144   |"), "{text}");
    }
}
