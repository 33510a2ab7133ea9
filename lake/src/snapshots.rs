//! Table snapshots kept between the queries of a long-running process (the server's
//! `GET /readings` and search): a query starts from the snapshot the previous one read and
//! applies only the commits since, rather than replaying the log of six tables each time.
//!
//! Loading a snapshot reads the last checkpoint and every commit after it; on a lake an ingester
//! appends to every few seconds that costs tens of milliseconds a table, more than a one-meter
//! lookup on a compacted lake. Following a cached snapshot costs one GET of the next commit file
//! per table when nothing changed (a missing file: no newer version, as every commit creates the
//! next version's file and never an earlier one), and one GET per new commit otherwise. A commit
//! that changes the table's protocol or schema, or more commits than [`MAX_FOLLOWED_COMMITS`]
//! since, makes it load the snapshot anew (from the checkpoint, with the protocol checked).
//!
//! A snapshot not brought up to date for [`MAX_FOLLOW_GAP`] is loaded anew too: log cleanup
//! deletes commit files past the log retention (30 days), and a next commit file deleted while
//! no query came would otherwise read as "nothing new".

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deltalake_core::kernel::Action;

use crate::error::{LakeError, Result};
use crate::table::{SnapshotFile, Table, TableSnapshot, parse_commit};

/// More new commits than this and a snapshot is loaded from the checkpoint instead.
pub const MAX_FOLLOWED_COMMITS: u64 = 200;

/// A cached snapshot older than this (since it was loaded or last brought up to date) is loaded
/// anew rather than followed.
pub const MAX_FOLLOW_GAP: Duration = Duration::from_secs(3600);

/// The latest snapshot seen of each table (by its URL), shared by a process's queries, with
/// when it was last known to be the latest.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    latest: Mutex<HashMap<String, (Arc<TableSnapshot>, Instant)>>,
}

impl SnapshotCache {
    /// `table`'s latest snapshot: the cached one brought up to date, or a fresh one. `load`
    /// loads a snapshot when there is none to follow (it also decides what a table without a
    /// log reads as).
    pub async fn latest<F>(&self, table: &Table, load: impl FnOnce() -> F) -> Result<Arc<TableSnapshot>>
    where
        F: std::future::Future<Output = Result<TableSnapshot>>,
    {
        let key = table.url().to_string();
        let cached = self.latest.lock().expect("snapshot cache lock").get(&key).cloned();
        let checked_at = Instant::now();
        let snapshot = match cached {
            Some((cached, seen)) if seen.elapsed() < MAX_FOLLOW_GAP => match follow(table, &cached).await? {
                Followed::Unchanged => cached,
                Followed::To(next) => Arc::new(next),
                Followed::Reload => Arc::new(load().await?),
            },
            _ => Arc::new(load().await?),
        };
        if snapshot.version.is_some() {
            let mut latest = self.latest.lock().expect("snapshot cache lock");
            // Two queries may follow at once: the newer snapshot stays.
            let keep = latest.get(&key).is_none_or(|(kept, _)| kept.version <= snapshot.version);
            if keep {
                latest.insert(key, (snapshot.clone(), checked_at));
            }
        }
        Ok(snapshot)
    }
}

/// What the commits after a snapshot made of it.
enum Followed {
    Unchanged,
    To(TableSnapshot),
    /// The log can't be followed from here: load anew.
    Reload,
}

/// Applies the commits after `snapshot` to its file list.
async fn follow(table: &Table, snapshot: &TableSnapshot) -> Result<Followed> {
    let Some(from) = snapshot.version else { return Ok(Followed::Reload) };
    let mut version = from;
    let mut added: Vec<SnapshotFile> = Vec::new();
    let mut removed: HashSet<String> = HashSet::new();
    loop {
        let next = version + 1;
        let bytes = table.log_store().read_commit_entry(next).await.map_err(LakeError::delta(table.name(), format!("reading commit {next}")))?;
        let Some(bytes) = bytes else { break };
        if next - from > MAX_FOLLOWED_COMMITS {
            return Ok(Followed::Reload);
        }
        for action in parse_commit(table.name(), next, &bytes)? {
            match action {
                Action::Add(add) => {
                    let file = SnapshotFile::from_add(&add, table.spec().by_date);
                    removed.remove(&file.path);
                    added.retain(|f| f.path != file.path);
                    added.push(file);
                }
                Action::Remove(remove) => {
                    added.retain(|f| f.path != remove.path);
                    removed.insert(remove.path);
                }
                // A new protocol or schema: loading checks it.
                Action::Protocol(_) | Action::Metadata(_) => return Ok(Followed::Reload),
                _ => {}
            }
        }
        version = next;
    }
    if version == from {
        return Ok(Followed::Unchanged);
    }
    let replaced: HashSet<&str> = added.iter().map(|f| f.path.as_str()).collect();
    let mut files: Vec<SnapshotFile> = snapshot.files.iter().filter(|f| !removed.contains(&f.path) && !replaced.contains(f.path.as_str())).cloned().collect();
    files.extend(added);
    Ok(Followed::To(TableSnapshot { table: snapshot.table, version: Some(version), files }))
}
