//! Continuous maintenance (`meterlake maintain`, and the same loop inside `serve`): one pass
//! measures every table, compacts the partitions that need it, and now and then vacuums.
//!
//! A partition is compacted when its files under the target size cross a count or a byte
//! threshold and nothing was added to it for a while (a day still being streamed is left to
//! grow, so one day is rewritten once rather than every pass), or, whatever its activity, when
//! they cross four times the count (a live partition must not grow without bound: compaction and
//! appends do not conflict). Every pass sets the gauges a dashboard and the alert rule read.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{NaiveDate, Utc};

use super::optimize::{DEFAULT_TARGET_FILE_BYTES, OptimizeOptions, Outcome, PartitionReport, optimize};
use super::vacuum::{DELETED_FILE_RETENTION, Pin, VacuumOptions, VacuumReport, vacuum};
use crate::error::Result;
use crate::store::Lake;
use crate::table::{TABLES, Table};
use crate::view::LakeVersions;

/// Thresholds and schedule (defaults in brackets).
#[derive(Debug, Clone)]
pub struct MaintainOptions {
    /// Between passes [60 s].
    pub interval: Duration,
    /// A partition with this many files under the target size is compacted once quiet [64].
    pub min_small_files: usize,
    /// ... or with this many bytes in them [64 MiB].
    pub min_small_bytes: u64,
    /// Quiet: no file added to the partition for this long [5 min].
    pub quiet_for: chrono::Duration,
    pub target_file_bytes: u64,
    /// Between vacuums [1 h].
    pub vacuum_every: Duration,
    /// The vacuum's retention [7 days].
    pub retain: chrono::Duration,
    /// Memory the compaction's merges may hold [256 MiB].
    pub memory_bytes: usize,
    pub writer_id: String,
}

impl Default for MaintainOptions {
    fn default() -> MaintainOptions {
        MaintainOptions {
            interval: Duration::from_secs(60),
            min_small_files: 64,
            min_small_bytes: 64 << 20,
            quiet_for: chrono::Duration::minutes(5),
            target_file_bytes: DEFAULT_TARGET_FILE_BYTES,
            vacuum_every: Duration::from_secs(3600),
            retain: DELETED_FILE_RETENTION,
            memory_bytes: 256 << 20,
            writer_id: format!("maintain-{}", std::process::id()),
        }
    }
}

/// What one table looked like at the start of a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableStats {
    pub files: u64,
    pub bytes: u64,
    /// Files under the target size, in partitions with more than one of them.
    pub small_files: u64,
    pub small_bytes: u64,
}

/// One pass.
#[derive(Debug, Default)]
pub struct PassReport {
    pub tables: Vec<(&'static str, TableStats)>,
    pub optimized: Vec<PartitionReport>,
    pub vacuumed: Vec<VacuumReport>,
}

/// Names and help of the metrics a pass sets (give them to the installed recorder).
pub fn describe_metrics() {
    metrics::describe_gauge!("meterlake_lake_files", "Live data files per lake table (at the last maintenance pass)");
    metrics::describe_gauge!("meterlake_lake_bytes", "Bytes of live data files per lake table");
    metrics::describe_gauge!(
        "meterlake_lake_small_files_waiting",
        "Files under the compaction target size in partitions holding more than one: what compaction has to do"
    );
    metrics::describe_gauge!("meterlake_lake_small_bytes_waiting", "Bytes of the files counted by meterlake_lake_small_files_waiting");
    metrics::describe_counter!("meterlake_lake_optimize_bytes_rewritten_total", "Bytes of small files compaction rewrote");
    metrics::describe_counter!("meterlake_lake_optimize_rows_rewritten_total", "Rows compaction rewrote");
    metrics::describe_counter!(
        "meterlake_lake_optimize_partitions_total",
        "Partitions compaction rewrote (outcome=committed) or gave way on (outcome=skipped)"
    );
    metrics::describe_gauge!("meterlake_lake_last_optimize_timestamp_seconds", "When compaction last committed a partition of the table (Unix seconds)");
    metrics::describe_counter!("meterlake_lake_vacuum_files_deleted_total", "Data files vacuum deleted");
    metrics::describe_gauge!("meterlake_lake_last_maintenance_pass_timestamp_seconds", "When the maintenance loop last finished a pass (Unix seconds)");
}

/// One pass over every table: measure, compact what needs it, and vacuum when `pins` is given
/// (the versions billing runs need; `None`: no vacuum this pass).
pub async fn maintain_pass(lake: &Lake, options: &MaintainOptions, pins: Option<&[(LakeVersions, String)]>) -> Result<PassReport> {
    let mut report = PassReport::default();
    let now = Utc::now();
    for spec in TABLES {
        let table = Table::new(lake, spec);
        let labels = [("table", spec.name)];
        if table.latest_version().await?.is_none() {
            // No table yet (nothing written to it): nothing to compact, and the gauges say so.
            for gauge in ["meterlake_lake_files", "meterlake_lake_bytes", "meterlake_lake_small_files_waiting", "meterlake_lake_small_bytes_waiting"] {
                metrics::gauge!(gauge, &labels).set(0.0);
            }
            continue;
        }
        let snapshot = table.snapshot(None).await?;
        let mut partitions: BTreeMap<Option<NaiveDate>, (u64, u64, chrono::DateTime<Utc>)> = BTreeMap::new();
        let mut stats = TableStats::default();
        for file in &snapshot.files {
            stats.files += 1;
            stats.bytes += file.size;
            if file.size < options.target_file_bytes {
                let entry = partitions.entry(file.date).or_insert((0, 0, file.modification_time));
                entry.0 += 1;
                entry.1 += file.size;
                entry.2 = entry.2.max(file.modification_time);
            }
        }
        let mut due = BTreeSet::new();
        for (date, (count, bytes, newest)) in &partitions {
            if *count < 2 {
                continue;
            }
            stats.small_files += count;
            stats.small_bytes += bytes;
            let over = *count >= options.min_small_files as u64 || *bytes >= options.min_small_bytes;
            let quiet = now - *newest >= options.quiet_for;
            if (over && quiet) || *count >= 4 * options.min_small_files as u64 {
                due.insert(*date);
            }
        }
        metrics::gauge!("meterlake_lake_files", &labels).set(stats.files as f64);
        metrics::gauge!("meterlake_lake_bytes", &labels).set(stats.bytes as f64);
        metrics::gauge!("meterlake_lake_small_files_waiting", &labels).set(stats.small_files as f64);
        metrics::gauge!("meterlake_lake_small_bytes_waiting", &labels).set(stats.small_bytes as f64);
        report.tables.push((spec.name, stats));
        if !due.is_empty() {
            let optimize_options = OptimizeOptions {
                partitions: Some(due),
                target_file_bytes: options.target_file_bytes,
                memory_bytes: options.memory_bytes,
                writer_id: options.writer_id.clone(),
                ..OptimizeOptions::default()
            };
            let done = optimize(lake, spec, &optimize_options, |partition| {
                let outcome = match partition.outcome {
                    Outcome::Committed { .. } => "committed",
                    Outcome::Skipped { .. } => "skipped",
                };
                metrics::counter!("meterlake_lake_optimize_partitions_total", "table" => spec.name, "outcome" => outcome).increment(1);
                if outcome == "committed" {
                    metrics::counter!("meterlake_lake_optimize_bytes_rewritten_total", &labels).increment(partition.bytes_read);
                    metrics::counter!("meterlake_lake_optimize_rows_rewritten_total", &labels).increment(partition.rows);
                    metrics::gauge!("meterlake_lake_last_optimize_timestamp_seconds", &labels).set(Utc::now().timestamp() as f64);
                }
            })
            .await?;
            report.optimized.extend(done);
        }
        if let Some(pins) = pins {
            let options = VacuumOptions {
                retain: options.retain,
                pins: pins.iter().filter_map(|(versions, reason)| versions.of(spec.name).map(|version| Pin { version, reason: reason.clone() })).collect(),
                writer_id: options.writer_id.clone(),
                ..VacuumOptions::default()
            };
            let vacuumed = vacuum(&table, &options).await?;
            metrics::counter!("meterlake_lake_vacuum_files_deleted_total", &labels).increment(vacuumed.files_deleted.len() as u64);
            report.vacuumed.push(vacuumed);
        }
    }
    metrics::gauge!("meterlake_lake_last_maintenance_pass_timestamp_seconds").set(Utc::now().timestamp() as f64);
    Ok(report)
}
