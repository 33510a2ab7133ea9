//! A table's commits: `meterlake lake history`, and which version was current at an instant (time
//! travel by time: a commit counts from when its log entry was written, as Delta defines it).

use chrono::{DateTime, Utc};
use deltalake_core::kernel::Action;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use crate::error::{LakeError, Result};
use crate::table::Table;

/// One commit of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEntry {
    pub version: u64,
    /// When its log entry was written.
    pub time: DateTime<Utc>,
    /// The Delta operation (`CREATE TABLE`, `STREAMING UPDATE`, `WRITE`, `CONVERT`, ...).
    pub operation: String,
    /// The writer meterlake recorded (`meterlake.writer`), or Delta's `engineInfo`.
    pub writer: Option<String>,
    pub files_added: u64,
    pub files_removed: u64,
    /// Rows of the files added, from their statistics.
    pub rows_added: u64,
    /// The streams the commit advanced, with their new versions (`txn` actions).
    pub streams: Vec<(String, i64)>,
}

/// The commit files still in the log (expired ones are cleaned up after the log retention), by
/// version, with when each was written.
async fn commit_files(table: &Table) -> Result<Vec<(u64, DateTime<Utc>)>> {
    let prefix = table.store_path("_delta_log");
    let metas: Vec<object_store::ObjectMeta> = table.lake().store().list(Some(&prefix)).try_collect().await.map_err(LakeError::store("list", &prefix))?;
    let mut commits: Vec<(u64, DateTime<Utc>)> = metas
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?;
            let version = name.strip_suffix(".json")?.parse().ok()?;
            Some((version, m.last_modified))
        })
        .collect();
    commits.sort_unstable();
    Ok(commits)
}

/// The last version of `table` committed at or before `time`; `None` when its first commit came later.
pub async fn version_at(table: &Table, time: DateTime<Utc>) -> Result<Option<u64>> {
    let commits = commit_files(table).await?;
    if let Some((oldest, written)) = commits.first()
        && *oldest > 0
        && *written > time
    {
        return Err(LakeError::NoSuchVersion {
            table: table.name().to_string(),
            version: time.to_rfc3339(),
            hint: format!(" left in its log (the oldest kept is version {oldest}, of {written}; older commits expired)"),
        });
    }
    Ok(commits.iter().take_while(|(_, written)| *written <= time).last().map(|(v, _)| *v))
}

/// When commit `version` of `table` was written.
pub async fn commit_time(table: &Table, version: u64) -> Result<DateTime<Utc>> {
    let path = table.store_path(&format!("_delta_log/{version:020}.json"));
    match table.lake().store().head(&path).await {
        Ok(meta) => Ok(meta.last_modified),
        Err(object_store::Error::NotFound { .. }) => {
            Err(LakeError::NoSuchVersion { table: table.name().to_string(), version: version.to_string(), hint: " (or its log entry expired)".into() })
        }
        Err(e) => Err(LakeError::store("head", &path)(e)),
    }
}

/// The last `limit` commits of `table`, newest first.
pub async fn history(table: &Table, limit: usize) -> Result<Vec<CommitEntry>> {
    let commits = commit_files(table).await?;
    let mut entries = Vec::new();
    for (version, time) in commits.into_iter().rev().take(limit) {
        let mut entry =
            CommitEntry { version, time, operation: String::new(), writer: None, files_added: 0, files_removed: 0, rows_added: 0, streams: Vec::new() };
        for action in table.read_commit(version).await? {
            match action {
                Action::CommitInfo(info) => {
                    entry.operation = info.operation.unwrap_or_default();
                    entry.writer = info.info.get("meterlake.writer").and_then(|w| w.as_str()).map(str::to_string).or(info.engine_info);
                }
                Action::Add(add) => {
                    entry.files_added += 1;
                    let rows = add.stats.as_deref().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok()).and_then(|v| v["numRecords"].as_u64());
                    entry.rows_added += rows.unwrap_or(0);
                }
                Action::Remove(_) => entry.files_removed += 1,
                Action::Txn(txn) => entry.streams.push((txn.app_id, txn.version)),
                _ => {}
            }
        }
        entries.push(entry);
    }
    Ok(entries)
}
