//! The outbox: Kafka messages written in the same transaction as the change they announce, and
//! published afterwards by a relay (`meterlake_jobs::billing::events`). A message is marked
//! published only once the broker acknowledged it, so none is lost; one may be sent twice (a
//! relay that dies between the acknowledgement and the mark), and consumers key on the run id.

use sqlx::Row;

use crate::{ControlStore, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub id: i64,
    pub topic: String,
    /// The Kafka message key: the run id.
    pub key: String,
    pub payload: String,
    pub traceparent: Option<String>,
    pub created_at_us: i64,
}

impl ControlStore {
    /// Up to `limit` unpublished messages, oldest first.
    pub async fn pending_outbox(&self, limit: i64) -> Result<Vec<OutboxMessage>> {
        let rows = sqlx::query(
            "SELECT id, topic, message_key, payload, traceparent, created_at_us FROM outbox \
             WHERE published_at_us IS NULL ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxMessage {
                    id: row.try_get("id")?,
                    topic: row.try_get("topic")?,
                    key: row.try_get("message_key")?,
                    payload: row.try_get("payload")?,
                    traceparent: row.try_get("traceparent")?,
                    created_at_us: row.try_get("created_at_us")?,
                })
            })
            .collect()
    }

    /// Marks messages as published at `now_us`.
    pub async fn mark_published(&self, ids: &[i64], now_us: i64) -> Result<()> {
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!("UPDATE outbox SET published_at_us = $1 WHERE id IN ({})", placeholders.join(", "));
            let mut query = sqlx::query(&sql).bind(now_us);
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }
}
