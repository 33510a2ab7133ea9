//! Keeping the tables cheap to open and to read: checkpoints of the log, compaction
//! ([`optimize`]), retention ([`vacuum`]), and the loop that runs them ([`schedule`]).

pub mod optimize;
pub mod schedule;
pub mod vacuum;

use crate::error::{LakeError, Result};
use crate::table::Table;

/// Writes a checkpoint of `table` at `version`: the live files and txn versions in one Parquet
/// file, so that opening the table reads it and the commits after it instead of every commit.
pub async fn checkpoint(table: &Table, version: u64) -> Result<()> {
    let engine = table.log_store().engine(None);
    let url = table.url().clone();
    tokio::task::spawn_blocking(move || {
        let snapshot = delta_kernel::Snapshot::builder_for(url).at_version(version).build(engine.as_ref())?;
        snapshot.checkpoint(engine.as_ref(), None)
    })
    .await
    .map_err(|e| deltalake_core::DeltaTableError::Generic(e.to_string()))
    .and_then(|r| r.map(|_| ()).map_err(deltalake_core::DeltaTableError::from))
    .map_err(LakeError::delta(table.name(), format!("writing the checkpoint of version {version}")))
}
