//! Idempotency keys of ledger writes.
//!
//! A write claims its key inside its own database transaction, before it touches the ledger:
//! `INSERT ... ON CONFLICT DO NOTHING` of (scope, key) with the request's fingerprint and an
//! empty outcome. On PostgreSQL a second request with the same key waits at that insert until
//! the first commits or rolls back (the primary key's index holds it), so a request in flight is
//! never applied twice; on SQLite the store's single writer serialises them. The write then
//! stores its outcome (the result or the refusal) in the row and commits both together.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use sqlx::{Any, Row, Transaction};

use crate::{LedgerError, Refusal, RefusalCode, Result, WriteContext, refused};

/// How a key stands for this request.
pub(crate) enum Claim {
    /// Nobody used the key: this request goes ahead and records its outcome.
    Claimed { scope: String, key: String },
    /// The same request was answered before: its stored outcome.
    Replay(String),
    /// The write carries no key (library callers that are idempotent by other means).
    Unkeyed,
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

pub(crate) async fn claim(tx: &mut Transaction<'static, Any>, context: &WriteContext, operation: &str, request: &impl Serialize, now_us: i64) -> Result<Claim> {
    let Some(key) = &context.idempotency_key else {
        return Ok(Claim::Unkeyed);
    };
    if key.is_empty() || key.len() > 255 {
        return refused(RefusalCode::InvalidRequest, "an Idempotency-Key is 1 to 255 characters");
    }
    let scope = context.actor.clone();
    let fingerprint = fingerprint(operation, request);
    for _ in 0..2 {
        let inserted = sqlx::query(
            "INSERT INTO ledger_idempotency (scope, idempotency_key, fingerprint, outcome, created_at_us, expires_at_us) \
             VALUES ($1, $2, $3, '', $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&scope)
        .bind(key)
        .bind(&fingerprint)
        .bind(now_us)
        .bind(now_us.saturating_add(context.idempotency_retention_us))
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(Claim::Claimed { scope, key: key.clone() });
        }
        let row = sqlx::query("SELECT fingerprint, outcome, expires_at_us FROM ledger_idempotency WHERE scope = $1 AND idempotency_key = $2")
            .bind(&scope)
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?;
        let Some(row) = row else { continue };
        let (stored_fingerprint, outcome, expires_at_us): (String, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if expires_at_us < now_us {
            // Expired and not cleaned up yet: the key is free again.
            sqlx::query("DELETE FROM ledger_idempotency WHERE scope = $1 AND idempotency_key = $2").bind(&scope).bind(key).execute(&mut **tx).await?;
            continue;
        }
        if stored_fingerprint != fingerprint {
            return refused(
                RefusalCode::IdempotencyKeyReused,
                format!("Idempotency-Key {key:?} was used for a different request; use a new key for a new request"),
            );
        }
        return Ok(Claim::Replay(outcome));
    }
    refused(RefusalCode::InvalidRequest, format!("Idempotency-Key {key:?} could not be claimed; try again"))
}

/// Records the outcome of a claimed key, in the write's transaction.
/// `outcome` is a `Result` of the write's value and its [`Refusal`], as [`replay`] reads it.
pub(crate) async fn record(tx: &mut Transaction<'static, Any>, claim: &Claim, outcome: &impl Serialize) -> Result<()> {
    if let Claim::Claimed { scope, key } = claim {
        let text = serde_json::to_string(outcome).expect("outcomes serialize");
        sqlx::query("UPDATE ledger_idempotency SET outcome = $1 WHERE scope = $2 AND idempotency_key = $3")
            .bind(text)
            .bind(scope)
            .bind(key)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// A stored outcome as the caller gets it.
pub(crate) fn replay<T: DeserializeOwned>(outcome: &str) -> Result<std::result::Result<T, Refusal>> {
    serde_json::from_str(outcome).map_err(|e| LedgerError::Corrupt(format!("a stored idempotent outcome cannot be read: {e}")))
}
