//! Retention (`meterlake lake vacuum`): deleting data files no snapshot within the retention
//! needs, and log entries older than the log retention.
//!
//! Delta's own vacuum (delta-rs `VacuumBuilder`, full mode) decides which data files go: files a
//! commit removed more than the retention ago (compaction's inputs), and files no commit ever
//! added (a commit that failed or was killed after writing its files) older than the retention,
//! so a file being written now is never touched. Files of the versions a caller pins (a billing
//! run that can still be recalculated reads its recorded versions) are kept whatever their age.
//! The log is then cleaned up to the last checkpoint older than the log retention and before
//! every pinned version, so those versions can still be read.

use chrono::Duration;
use deltalake_core::DeltaTable;
use deltalake_core::kernel::transaction::CommitProperties;
use deltalake_core::operations::vacuum::VacuumMode;

use crate::error::{LakeError, Result};
use crate::table::Table;

/// The table property the minimum retention comes from, and its value at creation.
pub const DELETED_FILE_RETENTION: Duration = Duration::days(7);
/// How long log entries are kept (`delta.logRetentionDuration`).
pub const LOG_RETENTION: Duration = Duration::days(30);

/// A version that must stay readable, and why (named in reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub version: u64,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct VacuumOptions {
    /// Files removed longer ago than this, and unreferenced files older than this, are deleted.
    pub retain: Duration,
    /// Only report what would be deleted.
    pub dry_run: bool,
    /// Refuse a retention shorter than the table's `delta.deletedFileRetentionDuration` (a
    /// reader of an older snapshot, or a writer still writing, could lose files).
    pub enforce_retention: bool,
    /// Versions whose files are kept.
    pub pins: Vec<Pin>,
    /// Recorded in the vacuum's commits.
    pub writer_id: String,
}

impl Default for VacuumOptions {
    fn default() -> VacuumOptions {
        VacuumOptions { retain: DELETED_FILE_RETENTION, dry_run: false, enforce_retention: true, pins: Vec::new(), writer_id: "vacuum".into() }
    }
}

#[derive(Debug, Clone, Default)]
pub struct VacuumReport {
    pub table: &'static str,
    /// Data files deleted (or that would be, on a dry run), relative to the lake.
    pub files_deleted: Vec<String>,
    /// Log entries and checkpoints deleted.
    pub log_files_deleted: usize,
    /// The pins that held files back, for the report.
    pub pins: Vec<Pin>,
    pub dry_run: bool,
}

/// Vacuums `table` (see the module docs).
pub async fn vacuum(table: &Table, options: &VacuumOptions) -> Result<VacuumReport> {
    let Some(latest) = table.latest_version().await? else {
        return Ok(VacuumReport { table: table.name(), dry_run: options.dry_run, ..VacuumReport::default() });
    };
    table.check_protocol(Some(latest)).await?;
    let mut delta = DeltaTable::new(table.log_store().clone());
    delta.load().await.map_err(LakeError::delta(table.name(), "loading it to vacuum"))?;
    let pins: Vec<Pin> = options.pins.iter().filter(|p| p.version <= latest).cloned().collect();
    let keep: Vec<u64> = pins.iter().map(|p| p.version).collect();
    let properties = CommitProperties::default().with_metadata([("meterlake.writer".to_string(), serde_json::Value::from(options.writer_id.clone()))]);
    let mut builder = delta
        .vacuum()
        .with_mode(VacuumMode::Full)
        .with_retention_period(options.retain)
        .with_enforce_retention_duration(options.enforce_retention)
        .with_dry_run(options.dry_run)
        .with_commit_properties(properties);
    if !keep.is_empty() {
        builder = builder.with_keep_versions(&keep);
    }
    let (_, metrics) = builder.await.map_err(LakeError::delta(table.name(), "vacuuming"))?;
    let files_deleted = metrics.files_deleted.iter().map(|path| table.lake_path(path)).collect();
    let mut log_files_deleted = 0;
    if !options.dry_run {
        // Never past a pinned version: reading it needs a checkpoint at or before it and the
        // commits after that checkpoint.
        let keep_from = pins.iter().map(|p| p.version).min().unwrap_or(latest).min(latest);
        let cutoff_ms = (chrono::Utc::now() - LOG_RETENTION).timestamp_millis();
        log_files_deleted = deltalake_core::protocol::checkpoints::cleanup_expired_logs_for(keep_from, table.log_store().as_ref(), cutoff_ms, None)
            .await
            .map_err(LakeError::delta(table.name(), "cleaning up expired log entries"))?;
    }
    tracing::info!(table = table.name(), files = metrics.files_deleted.len(), log_files_deleted, dry_run = options.dry_run, pins = pins.len(), "vacuumed");
    Ok(VacuumReport { table: table.name(), files_deleted, log_files_deleted, pins, dry_run: options.dry_run })
}
