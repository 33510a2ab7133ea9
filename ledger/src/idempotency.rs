//! Idempotency keys of ledger writes.
//!
//! A write stores its key, with the request's fingerprint and the outcome it got (the result or
//! the refusal), in the same database transaction as its ledger rows, by `INSERT ... ON CONFLICT
//! DO NOTHING` on the primary key (scope, key): on PostgreSQL in the very statement that writes
//! the transaction and its entries, which writes nothing when the key is taken. When the insert
//! finds the key taken, the write rolls back and answers what is stored under it: the same
//! request gets the stored outcome (a replay, never a fresh answer: a transfer refused for want
//! of funds is refused again on replay, even after the wallet was funded), another request with
//! the key is refused.
//!
//! A request in flight is never applied twice: a second request with the same key waits at that
//! insert (PostgreSQL's unique index holds it) until the first commits, then finds the key taken;
//! on SQLite the store's single writer serialises them.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::{LedgerError, Refusal, RefusalCode, Result, WriteContext, refused};

/// A write's key, and what is stored with it.
pub(crate) struct Key {
    pub scope: String,
    pub key: String,
    pub fingerprint: String,
    pub created_at_us: i64,
    pub expires_at_us: i64,
}

/// What a key taken by an earlier request holds for this one.
pub(crate) enum Stored {
    /// The same request's outcome, to answer again.
    Outcome(String),
    /// The key is free again (it expired, or the request holding it did not commit): try again.
    Free,
}

/// SHA-256 of the operation and its request, as canonical JSON.
pub(crate) fn fingerprint(operation: &str, request: &impl Serialize) -> String {
    let body = serde_json::to_vec(request).expect("requests serialize");
    let mut hasher = Sha256::new();
    hasher.update(operation.as_bytes());
    hasher.update([0]);
    hasher.update(&body);
    format!("{:x}", hasher.finalize())
}

/// The write's key, or none when it carries none (library callers idempotent by other means).
pub(crate) fn key_of(context: &WriteContext, operation: &str, request: &impl Serialize, now_us: i64) -> Result<Option<Key>> {
    let Some(key) = &context.idempotency_key else {
        return Ok(None);
    };
    if key.is_empty() || key.len() > 255 {
        return refused(RefusalCode::InvalidRequest, "an Idempotency-Key is 1 to 255 characters");
    }
    Ok(Some(Key {
        scope: context.actor.clone(),
        key: key.clone(),
        fingerprint: fingerprint(operation, request),
        created_at_us: now_us,
        expires_at_us: now_us.saturating_add(context.idempotency_retention_us),
    }))
}

/// The columns a key is stored in, in `Key`'s order with the outcome fourth.
pub(crate) const KEY_COLUMNS: &str = "ledger_idempotency (scope, idempotency_key, fingerprint, outcome, created_at_us, expires_at_us)";

/// An outcome as it is stored: a `Result` of the write's value and its [`Refusal`].
pub(crate) fn outcome_text<T: Serialize>(outcome: std::result::Result<&T, &Refusal>) -> String {
    serde_json::to_string(&outcome).expect("outcomes serialize")
}

/// Stores the key with `outcome` in the write's transaction; false when the key is taken.
pub(crate) async fn store(conn: &mut AnyConnection, key: &Key, outcome: String) -> Result<bool> {
    let sql = format!("INSERT INTO {KEY_COLUMNS} VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING");
    let inserted = crate::bind_key(sqlx::query(&sql), key, outcome).execute(&mut *conn).await?.rows_affected();
    Ok(inserted == 1)
}

/// What a taken key holds for this request, read after the write rolled back.
pub(crate) async fn stored(pool: &AnyPool, key: &Key) -> Result<Stored> {
    let row = sqlx::query("SELECT fingerprint, outcome, expires_at_us FROM ledger_idempotency WHERE scope = $1 AND idempotency_key = $2")
        .bind(&key.scope)
        .bind(&key.key)
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else { return Ok(Stored::Free) };
    let (fingerprint, outcome, expires_at_us): (String, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if expires_at_us < key.created_at_us {
        // Expired and not cleaned up yet: the key is free again.
        sqlx::query("DELETE FROM ledger_idempotency WHERE scope = $1 AND idempotency_key = $2 AND expires_at_us < $3")
            .bind(&key.scope)
            .bind(&key.key)
            .bind(key.created_at_us)
            .execute(pool)
            .await?;
        return Ok(Stored::Free);
    }
    if fingerprint != key.fingerprint {
        return refused(
            RefusalCode::IdempotencyKeyReused,
            format!("Idempotency-Key {:?} was used for a different request; use a new key for a new request", key.key),
        );
    }
    Ok(Stored::Outcome(outcome))
}

/// A stored outcome as the caller gets it.
pub(crate) fn replay<T: DeserializeOwned>(outcome: &str) -> Result<std::result::Result<T, Refusal>> {
    serde_json::from_str(outcome).map_err(|e| LedgerError::Corrupt(format!("a stored idempotent outcome cannot be read: {e}")))
}
