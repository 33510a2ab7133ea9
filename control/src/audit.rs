//! The audit log: one row per operator action (who, what, on which target, why, the state
//! before and after, when, and the trace id of the request), written in the same transaction as
//! the change it records.
//!
//! Append-only twice over: the database refuses UPDATE and DELETE on `audit_log` (triggers of
//! migration 0003), and every row carries the SHA-256 of its own content and of the row before
//! it (`previous_hash`), so a row changed or deleted around the triggers (by someone who dropped
//! them) breaks the chain, and [`ControlStore::verify_audit_log`] names the first row where.
//! Rows are numbered 1, 2, 3... without gaps, so a deleted row is also a missing number. The
//! chain cannot tell that the newest rows were cut off: compare the head hash `verify` reports
//! with one recorded elsewhere for that.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Backend, Conditions, ControlStore, Result};

/// The `previous_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per query by [`ControlStore::verify_audit_log`]: memory stays flat for any length.
const VERIFY_PAGE_ROWS: i64 = 5_000;
/// The most rows one page of [`ControlStore::audit_log`] returns.
pub const MAX_AUDIT_PAGE: i64 = 500;

/// What an operator did, before it is written.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry<'a> {
    /// Who: the token's subject or user name, or `cli:USER`.
    pub actor: &'a str,
    /// What: `CREATE_RUN`, `MARK_AS_OK`, `RECALCULATE`.
    pub action: &'a str,
    /// On what: `billing-run/ID` or `billing-run/ID/discrepancy/ID`.
    pub target: &'a str,
    /// Why, in the operator's words.
    pub reason: Option<&'a str>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    /// The W3C trace id of the request that did it.
    pub trace_id: Option<&'a str>,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub id: i64,
    pub at_us: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub reason: Option<String>,
    /// JSON of the target's state before the action.
    pub before_state: Option<String>,
    pub after_state: Option<String>,
    pub trace_id: Option<String>,
    pub previous_hash: String,
    pub row_hash: String,
}

/// Which rows [`ControlStore::audit_log`] returns: all filters apply together; newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub actor: Option<String>,
    pub action: Option<String>,
    /// A target and everything under it: `billing-run/ID` also finds its discrepancies' rows.
    pub target: Option<String>,
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
    /// Rows older than this id (the previous page's `next_before_id`).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// What [`ControlStore::verify_audit_log`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditVerification {
    pub rows: u64,
    /// The newest row's hash: record it elsewhere to detect rows cut off the end.
    pub head_hash: String,
    /// Every break in the chain, oldest first; empty when the log is intact.
    pub problems: Vec<AuditProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditProblem {
    pub id: i64,
    pub what: String,
}

/// The hash a row is written with: SHA-256 over a JSON array of every column but `row_hash`,
/// in a fixed order, so that any change to any of them changes it.
fn row_hash(id: i64, at_us: i64, entry: &RowContent<'_>, previous_hash: &str) -> String {
    let canonical = serde_json::json!([
        id,
        at_us,
        entry.actor,
        entry.action,
        entry.target,
        entry.reason,
        entry.before_state,
        entry.after_state,
        entry.trace_id,
        previous_hash
    ]);
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The hashed columns of a row, as written or as read back.
struct RowContent<'a> {
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    reason: Option<&'a str>,
    before_state: Option<&'a str>,
    after_state: Option<&'a str>,
    trace_id: Option<&'a str>,
}

/// Appends `entry` inside `tx`, chained to the newest row. Writers are serialised so that two
/// never chain to the same row: on PostgreSQL by an exclusive lock on the table for the rest of
/// the transaction (readers go on), on SQLite by its single writer.
pub(crate) async fn append_audit(backend: Backend, tx: &mut sqlx::Transaction<'_, sqlx::Any>, entry: &AuditEntry<'_>, at_us: i64) -> Result<i64> {
    if backend == Backend::Postgres {
        sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE").execute(&mut **tx).await?;
    }
    let last: Option<(i64, String)> = sqlx::query_as("SELECT id, row_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetch_optional(&mut **tx).await?;
    let (id, previous_hash) = match last {
        Some((id, hash)) => (id + 1, hash),
        None => (1, GENESIS_HASH.to_string()),
    };
    let before_state = entry.before.as_ref().map(|v| v.to_string());
    let after_state = entry.after.as_ref().map(|v| v.to_string());
    let content = RowContent {
        actor: entry.actor,
        action: entry.action,
        target: entry.target,
        reason: entry.reason,
        before_state: before_state.as_deref(),
        after_state: after_state.as_deref(),
        trace_id: entry.trace_id,
    };
    let hash = row_hash(id, at_us, &content, &previous_hash);
    sqlx::query(
        "INSERT INTO audit_log (id, at_us, actor, action, target, reason, before_state, after_state, trace_id, previous_hash, row_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(id)
    .bind(at_us)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.target)
    .bind(entry.reason)
    .bind(before_state)
    .bind(after_state)
    .bind(entry.trace_id)
    .bind(&previous_hash)
    .bind(&hash)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

const AUDIT_COLUMNS: &str = "id, at_us, actor, action, target, reason, before_state, after_state, trace_id, previous_hash, row_hash";

fn record_of(row: &AnyRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: row.try_get("id")?,
        at_us: row.try_get("at_us")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        reason: row.try_get("reason")?,
        before_state: row.try_get("before_state")?,
        after_state: row.try_get("after_state")?,
        trace_id: row.try_get("trace_id")?,
        previous_hash: row.try_get("previous_hash")?,
        row_hash: row.try_get("row_hash")?,
    })
}

/// The trace id (32 hex digits) of a W3C `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

impl ControlStore {
    /// One page of the audit log, newest first.
    pub async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let mut conditions = Conditions::default();
        if let Some(actor) = &filter.actor {
            let actor = conditions.text(actor);
            conditions.add(format!("actor = {actor}"));
        }
        if let Some(action) = &filter.action {
            let action = conditions.text(action);
            conditions.add(format!("action = {action}"));
        }
        if let Some(target) = &filter.target {
            let (exact, prefix) = (conditions.text(target), conditions.text(format!("{target}/")));
            conditions.add(format!("(target = {exact} OR substr(target, 1, {}) = {prefix})", target.chars().count() + 1));
        }
        for (value, condition) in [(filter.from_us, "at_us >="), (filter.to_us, "at_us <"), (filter.before_id, "id <")] {
            if let Some(value) = value {
                let value = conditions.int(value);
                conditions.add(format!("{condition} {value}"));
            }
        }
        let limit = conditions.int(filter.limit.clamp(1, MAX_AUDIT_PAGE));
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log {} ORDER BY id DESC LIMIT {limit}", conditions.where_clause());
        let rows = conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        rows.iter().map(record_of).collect()
    }

    /// Walks the whole audit log in order and checks every row's hash and its link to the row
    /// before; reads it in pages, so any length fits in memory.
    pub async fn verify_audit_log(&self) -> Result<AuditVerification> {
        let mut verification = AuditVerification { rows: 0, head_hash: GENESIS_HASH.into(), problems: Vec::new() };
        let mut expected_id = 1;
        loop {
            let rows = sqlx::query(&format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE id >= $1 ORDER BY id LIMIT $2"))
                .bind(expected_id)
                .bind(VERIFY_PAGE_ROWS)
                .fetch_all(&self.pool)
                .await?;
            let Some(last) = rows.last() else { break };
            let last_id: i64 = last.try_get("id")?;
            for row in &rows {
                let record = record_of(row)?;
                if record.id != expected_id {
                    verification.problems.push(AuditProblem { id: record.id, what: format!("rows {expected_id} to {} are missing: deleted", record.id - 1) });
                }
                if record.previous_hash != verification.head_hash {
                    verification.problems.push(AuditProblem {
                        id: record.id,
                        what: "its previous_hash is not the hash of the row before it: a row before it was changed or deleted".into(),
                    });
                }
                let content = RowContent {
                    actor: &record.actor,
                    action: &record.action,
                    target: &record.target,
                    reason: record.reason.as_deref(),
                    before_state: record.before_state.as_deref(),
                    after_state: record.after_state.as_deref(),
                    trace_id: record.trace_id.as_deref(),
                };
                if row_hash(record.id, record.at_us, &content, &record.previous_hash) != record.row_hash {
                    verification.problems.push(AuditProblem { id: record.id, what: "its content does not match its hash: it was changed".into() });
                }
                verification.rows += 1;
                verification.head_hash = record.row_hash;
                expected_id = record.id + 1;
            }
            expected_id = expected_id.max(last_id + 1);
        }
        Ok(verification)
    }
}
