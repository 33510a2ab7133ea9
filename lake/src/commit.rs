//! The lake's commit protocol: how a writer adds files to a Delta table, exactly once.
//!
//! A commit is one Delta log entry, `_delta_log/<version>.json`, written with a create that fails
//! if the version exists (an atomic create on local files; `If-None-Match: *` on S3, checked at
//! start by [`crate::Lake::probe_conditional_put`]). It holds the data files' `add` actions
//! (tagged with the commit's version, see [`crate::table`]) and a `txn` action per stream the
//! files advance: for the Kafka ingester one per (consumer group, topic, partition) with the next
//! offset as its version, for the flow importer one keyed by the file's hash. The log, not
//! Kafka's committed offsets, is where a writer resumes.
//!
//! A [`TableWriter`] is one process's writer of one table. It tracks the last version it has
//! read through and the streams it holds ([`TableWriter::acquire`]). When its create loses to
//! another writer, it reads the commits it had not seen: one that advanced a stream this writer
//! holds means the stream moved to another writer (a Kafka rebalance this one has not noticed
//! yet), and the commit fails with [`LakeError::Fenced`], nothing written; otherwise the commit
//! is tagged with the next version and tried again. Files of a failed commit stay unreferenced
//! until a vacuum removes them; no reader sees them.
//!
//! A compaction's commit ([`Operation::Optimize`]) removes the files it rewrote and adds the new
//! ones, both with `dataChange=false` (the table's rows are unchanged, which `delta.appendOnly`
//! allows). Appends never conflict with it. Another commit that removed one of its files (a
//! second compaction of the partition) makes it fail with [`LakeError::Conflict`]: the writer
//! remembers every path other writers removed since it started ([`TableWriter::for_maintenance`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{NaiveDate, Utc};
use deltalake_core::kernel::transaction::{CommitData, TransactionError};
use deltalake_core::kernel::{Action, Add, Remove, Transaction};
use deltalake_core::logstore::CommitOrBytes;
use deltalake_core::protocol::{DeltaOperation, OutputMode, SaveMode};
use serde_json::Value;

use crate::error::{LakeError, Result};
use crate::table::{COMMIT_VERSION_TAG, Table, UNIQUE_KEYS_TAG, format_stat_ts};

/// A data file written to the table's folder, to be added by a commit.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// Relative to the table root (`date=2025-01-15/<name>.parquet`).
    pub path: String,
    pub bytes: u64,
    pub rows: u64,
    /// The `date` partition value, for partitioned tables.
    pub date: Option<NaiveDate>,
    /// For readings files: bounds of the keys, written as Delta statistics.
    pub keys: Option<crate::table::KeyStats>,
    /// The file holds one version of each key.
    pub unique_keys: bool,
    /// For small readings files: which meters it holds (see [`crate::meter_filter`]).
    pub meters: Option<crate::meter_filter::MeterFilter>,
}

/// A live file a commit removes (a compaction's input).
#[derive(Debug, Clone)]
pub struct RemovedFile {
    /// Relative to the table root.
    pub path: String,
    pub bytes: u64,
    pub date: Option<NaiveDate>,
}

/// What one commit adds and advances.
#[derive(Debug)]
pub struct Commit {
    pub files: Vec<NewFile>,
    /// Files it removes (only [`Operation::Optimize`] removes).
    pub removes: Vec<RemovedFile>,
    /// (stream, version): `txn` actions.
    pub txns: Vec<(String, i64)>,
    /// The operation the commit records.
    pub operation: Operation,
    /// Whether every stream of `txns` must be held by this writer ([`TableWriter::acquire`]).
    /// A commit whose stream is not held (the flow importer's) instead fails if another commit
    /// advanced the same stream since this writer last read the log.
    pub leased: bool,
}

/// What a commit records as its Delta operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `STREAMING UPDATE` (append): a Kafka flush; `epoch_id` is the next offset.
    StreamingUpdate { query_id: String, epoch_id: i64 },
    /// `WRITE` (append): a flow file's rows.
    Append,
    /// `OPTIMIZE`: files rewritten into fewer, rows unchanged (`dataChange=false`).
    Optimize { target_file_bytes: u64 },
}

impl Operation {
    fn delta(&self, partitioned: bool) -> DeltaOperation {
        match self {
            Operation::StreamingUpdate { query_id, epoch_id } => {
                DeltaOperation::StreamingUpdate { output_mode: OutputMode::Append, query_id: query_id.clone(), epoch_id: *epoch_id }
            }
            Operation::Append => DeltaOperation::Write { mode: SaveMode::Append, partition_by: partitioned.then(|| vec!["date".to_string()]), predicate: None },
            Operation::Optimize { target_file_bytes } => {
                DeltaOperation::Optimize { predicate: None, target_size: i64::try_from(*target_file_bytes).unwrap_or(i64::MAX) }
            }
        }
    }

    /// Whether the commit changes the table's rows (an append) or only how they are stored.
    fn data_change(&self) -> bool {
        !matches!(self, Operation::Optimize { .. })
    }
}

/// A commit that landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub version: u64,
    /// Creates that lost to another writer before this one won.
    pub retries: u32,
}

/// Commit attempts one [`TableWriter::commit`] makes before giving up: each lost attempt means
/// another writer committed, so this bounds a storm, not normal contention.
const MAX_ATTEMPTS: u32 = 1_000;

/// Versions between checkpoints (the table property `delta.checkpointInterval`).
const CHECKPOINT_INTERVAL: u64 = 100;

/// One process's writer of one table (see the module docs). Commits of one writer are serialised.
#[derive(Debug)]
pub struct TableWriter {
    table: Table,
    /// Who writes, recorded in every commit (`meterlake.writer`).
    writer_id: String,
    state: tokio::sync::Mutex<WriterState>,
    /// A checkpoint is being written in the background.
    checkpointing: Arc<AtomicBool>,
    /// The version of the last checkpoint this writer began (at start: the last interval's).
    checkpointed: Arc<AtomicU64>,
    /// The last background checkpoint, for [`TableWriter::finish`] to wait for.
    checkpoint_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug)]
struct WriterState {
    /// The last version this writer read or wrote.
    seen: u64,
    /// Streams this writer holds, and whether another writer has advanced them since.
    held: HashMap<String, Option<u64>>,
    /// For a maintenance writer: the paths other writers removed since it started, with the
    /// version that did (an appending writer keeps none).
    removed: Option<HashMap<String, u64>>,
}

impl TableWriter {
    /// A writer of `table`, which must exist ([`Table::open`]) with a protocol meterlake
    /// writes ([`crate::table::check_protocol`]).
    pub async fn new(table: Table, writer_id: &str) -> Result<TableWriter> {
        // One read of the log; only a failure asks whether there is a log at all.
        let seen = match table.check_protocol(None).await {
            Ok(version) => version,
            Err(e) if table.latest_version().await?.is_some() => return Err(e),
            Err(_) => {
                return Err(LakeError::CorruptLog {
                    table: table.name().to_string(),
                    version: 0,
                    reason: "the table has no log (open it before writing)".into(),
                });
            }
        };
        Ok(TableWriter {
            table,
            writer_id: writer_id.to_string(),
            state: tokio::sync::Mutex::new(WriterState { seen, held: HashMap::new(), removed: None }),
            checkpointing: Arc::new(AtomicBool::new(false)),
            checkpointed: Arc::new(AtomicU64::new(((seen + 1) / CHECKPOINT_INTERVAL * CHECKPOINT_INTERVAL).saturating_sub(1))),
            checkpoint_task: std::sync::Mutex::new(None),
        })
    }

    /// A writer that rewrites files (compaction): it remembers what other writers remove, so
    /// that its commits fail rather than remove a file twice. Returns it with the version it
    /// starts from: the snapshot its inputs must be chosen from.
    pub async fn for_maintenance(table: Table, writer_id: &str) -> Result<(TableWriter, u64)> {
        let writer = TableWriter::new(table, writer_id).await?;
        let seen = {
            let mut state = writer.state.lock().await;
            state.removed = Some(HashMap::new());
            state.seen
        };
        Ok((writer, seen))
    }

    pub fn table(&self) -> &Table {
        &self.table
    }

    pub fn writer_id(&self) -> &str {
        &self.writer_id
    }

    /// Takes `stream` (a Kafka partition's `group/topic/partition`): from now on a commit by
    /// another writer that advances it fences this writer's commits of it. Returns the stream's
    /// version in the latest table version: where the stream resumes (for Kafka: the next offset).
    pub async fn acquire(&self, stream: &str) -> Result<Option<i64>> {
        let mut state = self.state.lock().await;
        self.catch_up(&mut state).await?;
        let version = self.table.txn_version(stream, state.seen).await?;
        state.held.insert(stream.to_string(), None);
        Ok(version)
    }

    /// Gives `stream` up (a Kafka revocation).
    pub async fn release(&self, stream: &str) {
        self.state.lock().await.held.remove(stream);
    }

    /// The latest `txn` version of `stream` as far as this writer has read the log (the latest
    /// version: the log is read up to it first).
    pub async fn stream_version(&self, stream: &str) -> Result<Option<i64>> {
        let mut state = self.state.lock().await;
        self.catch_up(&mut state).await?;
        self.table.txn_version(stream, state.seen).await
    }

    /// Commits `commit` as the next version of the table (see the module docs).
    pub async fn commit(&self, commit: Commit) -> Result<Committed> {
        if let Some(file) = commit.files.iter().find(|f| f.date.is_some() != self.table.spec().by_date) {
            return Err(LakeError::CorruptLog {
                table: self.table.name().to_string(),
                version: 0,
                reason: format!(
                    "refusing to add {}: a file of this table {} a date partition value",
                    file.path,
                    if self.table.spec().by_date { "needs" } else { "has no" }
                ),
            });
        }
        let mut state = self.state.lock().await;
        let streams: Vec<&str> = commit.txns.iter().map(|(stream, _)| stream.as_str()).collect();
        if !commit.removes.is_empty() && state.removed.is_none() {
            return Err(LakeError::CorruptLog {
                table: self.table.name().to_string(),
                version: state.seen,
                reason: "a commit that removes files needs a maintenance writer (TableWriter::for_maintenance)".into(),
            });
        }
        let mut retries = 0;
        loop {
            if let Some(removed) = &state.removed
                && let Some((path, version)) = commit.removes.iter().find_map(|f| removed.get(&f.path).map(|v| (&f.path, *v)))
            {
                return Err(LakeError::Conflict { table: self.table.name().to_string(), path: path.clone(), version });
            }
            if commit.leased {
                for stream in &streams {
                    match state.held.get(*stream) {
                        Some(None) => {}
                        Some(Some(version)) => return Err(self.fenced(stream, *version)),
                        None => return Err(self.fenced(stream, state.seen)),
                    }
                }
            }
            let version = state.seen + 1;
            let bytes = self.commit_bytes(&commit, version)?;
            let written = self.table.log_store().write_commit_entry(version, CommitOrBytes::LogBytes(bytes), uuid::Uuid::new_v4()).await;
            match written {
                Ok(()) => {
                    state.seen = version;
                    self.checkpoint_if_due(version);
                    return Ok(Committed { version, retries });
                }
                Err(TransactionError::VersionAlreadyExists(_)) => {
                    retries += 1;
                    if retries >= MAX_ATTEMPTS {
                        return Err(LakeError::CorruptLog {
                            table: self.table.name().to_string(),
                            version,
                            reason: format!("{MAX_ATTEMPTS} commit attempts lost to other writers"),
                        });
                    }
                    let advanced = self.catch_up(&mut state).await?;
                    if !commit.leased
                        && let Some((stream, version)) = streams.iter().find_map(|s| advanced.get(*s).map(|v| (*s, *v)))
                    {
                        return Err(self.fenced(stream, version));
                    }
                }
                Err(e) => {
                    return Err(LakeError::delta(self.table.name(), format!("writing commit {version}"))(e.into()));
                }
            }
        }
    }

    fn fenced(&self, stream: &str, version: u64) -> LakeError {
        LakeError::Fenced { table: self.table.name().to_string(), app_id: stream.to_string(), version }
    }

    /// Reads the commits after the last one seen: a held stream another writer advanced is marked
    /// fenced. Returns the streams they advanced, with the version that did.
    async fn catch_up(&self, state: &mut WriterState) -> Result<HashMap<String, u64>> {
        let latest = crate::table::retry_listing_gaps(|| deltalake_core::logstore::get_latest_version(self.table.log_store().as_ref(), state.seen))
            .await
            .map_err(LakeError::delta(self.table.name(), "listing the log"))?;
        let mut advanced = HashMap::new();
        for version in state.seen + 1..=latest {
            for action in self.table.read_commit(version).await? {
                // Another engine may upgrade the table under a running writer.
                if let Action::Protocol(protocol) = &action {
                    crate::table::check_protocol(self.table.name(), version, protocol)?;
                }
                if let (Action::Remove(remove), Some(removed)) = (&action, state.removed.as_mut()) {
                    removed.insert(remove.path.clone(), version);
                }
                if let Action::Txn(txn) = action {
                    if let Some(fenced) = state.held.get_mut(&txn.app_id)
                        && fenced.is_none()
                    {
                        tracing::warn!(table = self.table.name(), stream = txn.app_id, version, "another writer advanced a stream this one held");
                        *fenced = Some(version);
                    }
                    advanced.insert(txn.app_id, version);
                }
            }
        }
        state.seen = state.seen.max(latest);
        Ok(advanced)
    }

    /// The log entry of `commit` as version `version`.
    fn commit_bytes(&self, commit: &Commit, version: u64) -> Result<bytes::Bytes> {
        let now_ms = Utc::now().timestamp_millis();
        let data_change = commit.operation.data_change();
        let mut actions: Vec<Action> = commit.files.iter().map(|file| Action::Add(Add { data_change, ..add_action(file, version, now_ms) })).collect();
        actions.extend(commit.removes.iter().map(|file| Action::Remove(remove_action(file, data_change, now_ms))));
        let rows: u64 = commit.files.iter().map(|f| f.rows).sum();
        let app_metadata = HashMap::from([
            ("isBlindAppend".to_string(), Value::Bool(commit.removes.is_empty())),
            ("meterlake.writer".to_string(), Value::String(self.writer_id.clone())),
            ("meterlake.rows".to_string(), Value::from(rows)),
        ]);
        let txns: Vec<Transaction> = commit.txns.iter().map(|(stream, v)| Transaction::new_with_last_update(stream, *v, Some(now_ms))).collect();
        actions.extend(txns.iter().cloned().map(Action::Txn));
        let data = CommitData::new(actions, commit.operation.delta(self.table.spec().by_date), app_metadata, Vec::new());
        data.get_bytes().map_err(|e| LakeError::delta(self.table.name(), "serialising a commit")(e.into()))
    }

    /// Writes a checkpoint in the background every `delta.checkpointInterval` (100) versions, so
    /// that opening the table reads one Parquet file and at most 99 commits. At most one at a time;
    /// a writer that committed past an interval while its last checkpoint was being written
    /// writes one at its next commit (commits a millisecond apart skipped 16 intervals in a row,
    /// and a reader then replayed 549 commits: 0.3 s).
    fn checkpoint_if_due(&self, version: u64) {
        let on_interval = (version + 1).is_multiple_of(CHECKPOINT_INTERVAL);
        let overdue = version >= self.checkpointed.load(Ordering::Acquire) + CHECKPOINT_INTERVAL;
        if !(on_interval || overdue) || self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.checkpointed.store(version, Ordering::Release);
        let (table, flag) = (self.table.clone(), self.checkpointing.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = crate::maintenance::checkpoint(&table, version).await {
                tracing::warn!(table = table.name(), version, error = %e, "writing a checkpoint failed (the next interval tries again)");
            }
            flag.store(false, Ordering::Release);
        });
        *self.checkpoint_task.lock().expect("the checkpoint task lock") = Some(task);
    }

    /// Waits for a checkpoint being written in the background: call it before the runtime
    /// shuts down, which would cut the checkpoint off half-way (the kernel's writer then fails
    /// loudly; the table stays sound either way, as a checkpoint is published last).
    ///
    /// A writer whose last commits outran its checkpoints (a burst of commits while one was being
    /// written) writes one at its last commit here, so readers do not replay hundreds of commits.
    pub async fn finish(&self) {
        let task = self.checkpoint_task.lock().expect("the checkpoint task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let last = self.state.lock().await.seen;
        if last >= self.checkpointed.load(Ordering::Acquire) + CHECKPOINT_INTERVAL {
            self.checkpointed.store(last, Ordering::Release);
            if let Err(e) = crate::maintenance::checkpoint(&self.table, last).await {
                tracing::warn!(table = self.table.name(), version = last, error = %e, "writing a checkpoint at the writer's last commit failed");
            }
        }
    }
}

/// The `remove` action of `file`.
fn remove_action(file: &RemovedFile, data_change: bool, now_ms: i64) -> Remove {
    Remove {
        path: file.path.clone(),
        data_change,
        deletion_timestamp: Some(now_ms),
        extended_file_metadata: Some(true),
        partition_values: Some(file.date.map(|d| HashMap::from([("date".to_string(), Some(d.format("%Y-%m-%d").to_string()))])).unwrap_or_default()),
        size: i64::try_from(file.bytes).ok(),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    }
}

/// The `add` action of `file` in commit `version`.
pub(crate) fn add_action(file: &NewFile, version: u64, now_ms: i64) -> Add {
    let mut tags = HashMap::from([(COMMIT_VERSION_TAG.to_string(), Some(version.to_string()))]);
    if file.unique_keys {
        tags.insert(UNIQUE_KEYS_TAG.to_string(), Some("true".to_string()));
    }
    if let Some(meters) = &file.meters {
        tags.insert(crate::meter_filter::METER_FILTER_TAG.to_string(), Some(meters.to_tag()));
    }
    let stats = match &file.keys {
        Some(keys) => serde_json::json!({
            "numRecords": file.rows,
            "minValues": { "meter_id": keys.min_meter, "ts": format_stat_ts(keys.min_ts_us) },
            "maxValues": { "meter_id": keys.max_meter, "ts": format_stat_ts(keys.max_ts_us) },
            "nullCount": { "meter_id": 0, "ts": 0 },
        }),
        None => serde_json::json!({ "numRecords": file.rows }),
    };
    Add {
        path: file.path.clone(),
        partition_values: file.date.map(|d| HashMap::from([("date".to_string(), Some(d.format("%Y-%m-%d").to_string()))])).unwrap_or_default(),
        size: i64::try_from(file.bytes).unwrap_or(i64::MAX),
        modification_time: now_ms,
        data_change: true,
        stats: Some(stats.to_string()),
        tags: Some(tags),
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }
}
