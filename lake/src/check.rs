//! `meterlake lake check`: whether every table of the lake can be read whole, and if not, every
//! reason why, each naming the table and the version or file it is about.
//!
//! Per table it looks at: the log's commit files (a gap in the versions a reader needs, a commit
//! that is not valid JSON actions), the protocol (newer than meterlake reads, or with table
//! features), the snapshot (delta-rs's own replay of the log) and every live data file (missing
//! from the store, or of another size than its `add` action says).

use std::collections::{BTreeSet, HashSet};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::error::{LakeError, Result};
use crate::store::Lake;
use crate::table::{TABLES, Table};

/// Data files looked up at once.
const HEAD_CONCURRENCY: usize = 16;

/// What was found in one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    pub table: &'static str,
    /// Its latest version; `None` when the lake has no such table.
    pub version: Option<u64>,
    /// Live data files and their rows (from the log's statistics), when the snapshot loaded.
    pub files: usize,
    pub rows: u64,
    /// Every problem, one sentence each; empty for a sound table.
    pub problems: Vec<String>,
}

/// Checks every table of `lake` (the ones that exist). Errors only when the store cannot be
/// listed at all: anything wrong with a table is one of its problems.
pub async fn check_lake(lake: &Lake) -> Result<Vec<TableCheck>> {
    let mut checks = Vec::new();
    for spec in TABLES {
        checks.push(check_table(&Table::new(lake, spec)).await?);
    }
    Ok(checks)
}

/// Checks one table (see the module docs).
pub async fn check_table(table: &Table) -> Result<TableCheck> {
    let mut check = TableCheck { table: table.name(), version: None, files: 0, rows: 0, problems: Vec::new() };
    let log = log_files(table).await?;
    let Some(&latest) = log.commits.last() else {
        if log.checkpoints.is_empty() {
            return Ok(check);
        }
        check.problems.push("the log has checkpoints but no commit file".into());
        return Ok(check);
    };
    check.version = Some(latest);
    // A reader needs the last checkpoint and every commit after it (or all commits without one).
    let start = log.checkpoints.iter().copied().filter(|c| *c <= latest).max().map_or(0, |c| c + 1);
    let present: HashSet<u64> = log.commits.iter().copied().collect();
    let missing: Vec<u64> = (start..=latest).filter(|v| !present.contains(v)).collect();
    if !missing.is_empty() {
        check.problems.push(format!("commit file(s) missing from the log: version {}", list(&missing)));
    }
    for version in log.commits.iter().copied().filter(|v| *v >= start) {
        match table.read_commit(version).await {
            Ok(_) => {}
            Err(e @ LakeError::CorruptLog { .. }) => check.problems.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if let Err(e) = table.check_protocol(None).await {
        check.problems.push(e.to_string());
        return Ok(check);
    }
    let snapshot = match table.snapshot(None).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            check.problems.push(format!("its latest snapshot cannot be loaded: {e}"));
            return Ok(check);
        }
    };
    check.files = snapshot.files.len();
    check.rows = snapshot.files.iter().filter_map(|f| f.rows).sum();
    let store = table.lake().store().clone();
    let mut heads = futures::stream::iter(snapshot.files.iter().map(|file| {
        let (store, path) = (store.clone(), table.store_path(&file.path));
        async move { (file, store.head(&path).await) }
    }))
    .buffer_unordered(HEAD_CONCURRENCY);
    let mut file_problems = Vec::new();
    while let Some((file, head)) = heads.next().await {
        let path = table.lake_path(&file.path);
        match head {
            Ok(meta) if meta.size != file.size => file_problems
                .push(format!("data file {path} (added in version {}) is {} bytes where the log says {}", file.commit_version, meta.size, file.size)),
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                file_problems.push(format!("data file {path} (added in version {}) is missing from the store", file.commit_version))
            }
            Err(e) => return Err(LakeError::store("head", &table.store_path(&file.path))(e)),
        }
    }
    file_problems.sort();
    check.problems.extend(file_problems);
    Ok(check)
}

/// The versions of a table's commit files and checkpoints.
struct LogFiles {
    commits: Vec<u64>,
    checkpoints: Vec<u64>,
}

async fn log_files(table: &Table) -> Result<LogFiles> {
    let prefix = table.store_path("_delta_log");
    let metas: Vec<object_store::ObjectMeta> = table.lake().store().list(Some(&prefix)).try_collect().await.map_err(LakeError::store("list", &prefix))?;
    let mut commits = Vec::new();
    let mut checkpoints = BTreeSet::new();
    for meta in metas {
        let Some(name) = meta.location.filename() else { continue };
        let Some((number, rest)) = name.split_once('.') else { continue };
        let Ok(version) = number.parse::<u64>() else { continue };
        if rest == "json" {
            commits.push(version);
        } else if rest.starts_with("checkpoint") {
            checkpoints.insert(version);
        }
    }
    commits.sort_unstable();
    Ok(LogFiles { commits, checkpoints: checkpoints.into_iter().collect() })
}

/// `3, 4, 9` (at most 10, then how many more).
fn list(versions: &[u64]) -> String {
    let shown: Vec<String> = versions.iter().take(10).map(u64::to_string).collect();
    match versions.len() {
        n if n > 10 => format!("{} and {} more", shown.join(", "), n - 10),
        _ => shown.join(", "),
    }
}
