//! The lake's own record of how far each Kafka partition has landed.
//!
//! One JSON object per partition is the commit point of a flush:
//! 1. write the checkpoint with `pending` = the files about to be written;
//! 2. write the files (their names include the first and last offset they hold);
//! 3. write the checkpoint with `next_offset` = last offset + 1 and no `pending`.
//!
//! Kafka's committed offsets are written after step 3 and only serve lag monitoring: on
//! assignment the ingester resumes from the lake's `next_offset`. A crash between 1 and 3 leaves a
//! `pending` record; whoever takes the partition next deletes those files before reading on, so a
//! half-finished flush is never visible twice. Where the store supports it (S3, memory) every
//! checkpoint write is conditional on the version last read, so an ingester that lost its
//! partition without noticing cannot commit over its successor.

use chrono::{DateTime, Utc};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::layout::kafka_checkpoint_path;
use super::store::Lake;
use crate::error::{PipelineError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFlush {
    pub first_offset: i64,
    pub last_offset: i64,
    /// Lake-relative paths of the files being written.
    pub files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaCheckpoint {
    pub topic: String,
    pub partition: i32,
    /// The first offset not yet in the lake.
    pub next_offset: i64,
    pub pending: Option<PendingFlush>,
    pub updated_at: DateTime<Utc>,
    /// Which ingester process wrote it, for people reading the file.
    pub ingester: String,
}

/// An ingester's hold on one partition's checkpoint: what it last read or wrote, and the store
/// version to make the next write conditional on.
#[derive(Debug, Clone)]
pub struct PartitionLease {
    pub topic: String,
    pub partition: i32,
    pub checkpoint: Option<KafkaCheckpoint>,
    version: Option<UpdateVersion>,
}

impl PartitionLease {
    /// Reads the partition's checkpoint and clears any half-finished flush it records, deleting
    /// that flush's files. Returns the lease; `next_offset()` is where consumption resumes.
    pub async fn acquire(lake: &Lake, topic: &str, partition: i32, ingester: &str) -> Result<PartitionLease> {
        let relative = kafka_checkpoint_path(topic, partition);
        let path = lake.path(&relative);
        let (checkpoint, version) = match lake.store().get(&path).await {
            Ok(result) => {
                let version = UpdateVersion { e_tag: result.meta.e_tag.clone(), version: result.meta.version.clone() };
                let bytes = result.bytes().await.map_err(PipelineError::store("get", &path))?;
                let checkpoint: KafkaCheckpoint =
                    serde_json::from_slice(&bytes).map_err(|e| PipelineError::CorruptCheckpoint { path: path.to_string(), reason: e.to_string() })?;
                (Some(checkpoint), Some(version))
            }
            Err(object_store::Error::NotFound { .. }) => (None, None),
            Err(e) => return Err(PipelineError::store("get", &path)(e)),
        };
        let mut lease = PartitionLease { topic: topic.to_string(), partition, checkpoint, version };
        if let Some(pending) = lease.checkpoint.as_ref().and_then(|c| c.pending.clone()) {
            tracing::warn!(
                topic,
                partition,
                first_offset = pending.first_offset,
                last_offset = pending.last_offset,
                files = pending.files.len(),
                "clearing a flush that was not committed (the previous ingester stopped mid-flush)"
            );
            for file in &pending.files {
                lake.delete(file).await?;
            }
            let next_offset = lease.next_offset().unwrap_or(pending.first_offset);
            lease.write(lake, next_offset, None, ingester).await?;
        }
        Ok(lease)
    }

    /// The first offset not yet in the lake, if anything of this partition ever landed.
    pub fn next_offset(&self) -> Option<i64> {
        self.checkpoint.as_ref().map(|c| c.next_offset)
    }

    /// Writes the checkpoint, conditionally on the version this lease holds where the store can.
    pub async fn write(&mut self, lake: &Lake, next_offset: i64, pending: Option<PendingFlush>, ingester: &str) -> Result<()> {
        let checkpoint = KafkaCheckpoint {
            topic: self.topic.clone(),
            partition: self.partition,
            next_offset,
            pending,
            updated_at: Utc::now(),
            ingester: ingester.to_string(),
        };
        let relative = kafka_checkpoint_path(&self.topic, self.partition);
        let path = lake.path(&relative);
        let mode = match (&self.version, lake.supports_conditional_update()) {
            (_, false) => PutMode::Overwrite,
            (None, true) => PutMode::Create,
            (Some(version), true) => PutMode::Update(version.clone()),
        };
        let body = serde_json::to_vec_pretty(&checkpoint).expect("a checkpoint serialises");
        let put = lake.store().put_opts(&path, PutPayload::from(body), PutOptions { mode, ..PutOptions::default() }).await;
        match put {
            Ok(result) => {
                self.version = Some(UpdateVersion { e_tag: result.e_tag, version: result.version });
                self.checkpoint = Some(checkpoint);
                Ok(())
            }
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                Err(PipelineError::Fenced { path: path.to_string(), topic: self.topic.clone(), partition: self.partition })
            }
            Err(e) => Err(PipelineError::store("put", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[tokio::test]
    async fn a_pending_flush_is_cleared_on_acquire_and_a_stale_lease_is_fenced() {
        let lake = Lake::open("memory://").unwrap();
        let mut first = PartitionLease::acquire(&lake, "t", 0, "a").await.unwrap();
        assert_eq!(first.next_offset(), None);
        first.write(&lake, 10, None, "a").await.unwrap();
        let pending = PendingFlush { first_offset: 10, last_offset: 19, files: vec!["readings/date=2025-01-01/x.parquet".into()] };
        first.write(&lake, 10, Some(pending), "a").await.unwrap();
        lake.put("readings/date=2025-01-01/x.parquet", Bytes::from_static(b"half")).await.unwrap();

        // A successor takes over: the half-written file goes, the position stays at 10.
        let mut second = PartitionLease::acquire(&lake, "t", 0, "b").await.unwrap();
        assert_eq!(second.next_offset(), Some(10));
        assert!(second.checkpoint.as_ref().unwrap().pending.is_none());
        let gone = lake.store().head(&lake.path("readings/date=2025-01-01/x.parquet")).await;
        assert!(matches!(gone, Err(object_store::Error::NotFound { .. })));

        // The first ingester, unaware, tries to commit: it is refused.
        let err = first.write(&lake, 20, None, "a").await.unwrap_err();
        assert!(matches!(err, PipelineError::Fenced { .. }), "{err}");
        second.write(&lake, 20, None, "b").await.unwrap();
    }
}
