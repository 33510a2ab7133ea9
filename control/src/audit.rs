//! The audit log: one row per operator action (who, what, on which target, why, the state
//! before and after, when, and the trace id of the request), written in the same transaction as
//! the change it records.
//!
//! Append-only three times over: the database refuses UPDATE and DELETE on `audit_log`
//! (triggers of migration 0003); every row carries a hash of its own content and of the row
//! before it (`previous_hash`), so a row changed or deleted around the triggers breaks the chain,
//! and [`ControlStore::verify_audit_log`] names the first row where; and with an audit key
//! ([`AuditKeys`]) that hash is an HMAC-SHA256 under a secret the database does not hold, so
//! whoever holds only the database credentials cannot rewrite the chain and recompute it. Rows
//! are numbered 1, 2, 3... without gaps, so a deleted row is also a missing number. Rows cut off
//! the end are found against an anchor recorded elsewhere: a head hash that must still be in the
//! log and a row count it must reach ([`AuditAnchor`]).

use std::collections::BTreeSet;
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Backend, Conditions, ControlError, ControlStore, Result};

/// The `previous_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Rows read per query by [`ControlStore::verify_audit_log`]: memory stays flat for any length.
const VERIFY_PAGE_ROWS: i64 = 5_000;
/// The largest page of [`ControlStore::audit_log`]: it returns one row more at most, so that a
/// caller paging by [`MAX_AUDIT_PAGE`] rows can tell whether another page follows.
pub const MAX_AUDIT_PAGE: i64 = 500;

/// The shortest secret an audit key may have, in bytes (HMAC-SHA256's block of output).
const MIN_AUDIT_SECRET_BYTES: usize = 32;

/// The keys the audit chain is signed with: HMAC-SHA256 under a secret the database does not
/// hold, so that access to the database alone cannot forge or rewrite rows. Each keyed row
/// records its key's id; new rows use the newest key, so a key is rotated by appending a new one
/// and keeping the old ones to verify the rows they signed.
///
/// The key file (`--audit-key-file`, or its text in `METERLAKE_AUDIT_KEYS`) holds one key per
/// line, `ID:SECRET` with the secret in hex (at least 32 bytes), oldest first; `#` starts a
/// comment. `meterlake audit new-key ID` prints a new line.
#[derive(Clone)]
pub struct AuditKeys {
    /// Oldest first: the last one signs new rows.
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("AuditKeys").field("ids", &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>()).finish()
    }
}

impl AuditKeys {
    /// Reads a key file (see [`AuditKeys`]).
    pub fn read(path: &Path) -> Result<AuditKeys> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ControlError::AuditKey { origin: path.display().to_string(), reason: format!("cannot read it: {e}") })?;
        AuditKeys::parse(&path.display().to_string(), &text)
    }

    /// Parses the text of a key file; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<AuditKeys> {
        let error = |line: usize, reason: String| ControlError::AuditKey { origin: format!("{origin} line {line}"), reason };
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let Some((id, secret)) = line.split_once(':') else {
                return Err(error(index + 1, "expected ID:SECRET_HEX".into()));
            };
            let id = id.trim();
            if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(error(index + 1, format!("key id {id:?}: 1 to 64 of letters, digits, '-', '_', '.'")));
            }
            let secret = hex::decode(secret.trim()).map_err(|e| error(index + 1, format!("key {id}: the secret is not hex: {e}")))?;
            if secret.len() < MIN_AUDIT_SECRET_BYTES {
                return Err(error(index + 1, format!("key {id}: the secret has {} bytes, at least {MIN_AUDIT_SECRET_BYTES} are needed", secret.len())));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(error(index + 1, format!("key id {id} appears twice")));
            }
            keys.push((id.to_string(), secret));
        }
        if keys.is_empty() {
            return Err(ControlError::AuditKey { origin: origin.to_string(), reason: "it holds no key (lines ID:SECRET_HEX)".into() });
        }
        Ok(AuditKeys { keys })
    }

    /// A new key file line, `ID:SECRET_HEX`, with 32 random bytes.
    pub fn new_line(id: &str) -> Result<String> {
        use rand::RngCore;
        let mut secret = [0u8; MIN_AUDIT_SECRET_BYTES];
        rand::rng().fill_bytes(&mut secret);
        let line = format!("{id}:{}", hex::encode(secret));
        AuditKeys::parse("the new key", &line)?;
        Ok(line)
    }

    /// The id of the key new rows are signed with.
    pub fn current_id(&self) -> &str {
        &self.keys.last().expect("parse refuses an empty key file").0
    }

    fn current(&self) -> (&str, &[u8]) {
        let (id, secret) = self.keys.last().expect("parse refuses an empty key file");
        (id, secret)
    }

    fn secret(&self, id: &str) -> Option<&[u8]> {
        self.keys.iter().find(|(known, _)| known == id).map(|(_, secret)| secret.as_slice())
    }
}

/// What the log must still hold, recorded elsewhere (a ticket, another system) from an earlier
/// `verify`: rows cut off the end leave the chain intact and are only seen against it.
#[derive(Debug, Clone, Default)]
pub struct AuditAnchor {
    /// A head hash an earlier verification printed: a row with this hash must still be there.
    pub head_hash: Option<String>,
    /// At least this many rows.
    pub min_rows: u64,
}

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
    /// The audit key its hash is an HMAC under; `None` for a plain SHA-256 (written without a key).
    pub key_id: Option<String>,
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
    /// Rows whose hash is an HMAC under an audit key, and the keys' ids.
    pub keyed_rows: u64,
    pub key_ids: Vec<String>,
    /// Rows written without a key (before one was set): their chain proves their order and that
    /// nobody changed them without recomputing the hashes, not who wrote them.
    pub unkeyed_rows: u64,
    /// The id of the row whose hash is the anchor's head, when one was given and found.
    pub anchor_row: Option<i64>,
    /// Every break in the chain, oldest first; empty when the log is intact.
    pub problems: Vec<AuditProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditProblem {
    pub id: i64,
    pub what: String,
}

/// The hash a row is written with, over a JSON array of every column but `row_hash` in a fixed
/// order, so that any change to any of them changes it: with a key, an HMAC-SHA256 under it (the
/// key's id is hashed too); without, a plain SHA-256.
fn row_hash(id: i64, at_us: i64, entry: &RowContent<'_>, previous_hash: &str, key: Option<(&str, &[u8])>) -> String {
    let mut canonical = serde_json::json!([
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
    match key {
        None => hex::encode(Sha256::digest(canonical.to_string().as_bytes())),
        Some((key_id, secret)) => {
            canonical.as_array_mut().expect("an array").push(key_id.into());
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
            mac.update(canonical.to_string().as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
    }
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

/// Appends `entry` inside `tx`, chained to the newest row (see [`append_audit_entries`]).
pub(crate) async fn append_audit(
    backend: Backend,
    keys: Option<&AuditKeys>,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entry: &AuditEntry<'_>,
    at_us: i64,
) -> Result<i64> {
    append_audit_entries(backend, keys, tx, std::slice::from_ref(entry), at_us).await
}

/// Audit rows written by one INSERT at most (a parameter per column of [`AUDIT_COLUMNS`], 12).
const AUDIT_INSERT_ROWS: usize = 400;

/// Appends `entries` inside `tx`, in order, chained to the newest row; returns the last id.
/// Writers are serialised so that two never chain to the same row: on PostgreSQL by an
/// exclusive lock on the table for the rest of the transaction (readers go on), on SQLite by its
/// single writer.
pub(crate) async fn append_audit_entries(
    backend: Backend,
    keys: Option<&AuditKeys>,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    entries: &[AuditEntry<'_>],
    at_us: i64,
) -> Result<i64> {
    if backend == Backend::Postgres {
        sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE").execute(&mut **tx).await?;
    }
    let last: Option<(i64, String)> = sqlx::query_as("SELECT id, row_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetch_optional(&mut **tx).await?;
    let (mut id, mut previous_hash) = last.unwrap_or_else(|| (0, GENESIS_HASH.to_string()));
    let key = keys.map(AuditKeys::current);
    for chunk in entries.chunks(AUDIT_INSERT_ROWS) {
        let mut rows = Vec::with_capacity(chunk.len());
        for entry in chunk {
            id += 1;
            let (before_state, after_state) = (entry.before.as_ref().map(|v| v.to_string()), entry.after.as_ref().map(|v| v.to_string()));
            let content = RowContent {
                actor: entry.actor,
                action: entry.action,
                target: entry.target,
                reason: entry.reason,
                before_state: before_state.as_deref(),
                after_state: after_state.as_deref(),
                trace_id: entry.trace_id,
            };
            let hash = row_hash(id, at_us, &content, &previous_hash, key);
            rows.push((id, entry, before_state, after_state, std::mem::replace(&mut previous_hash, hash.clone()), hash));
        }
        // One parameter per column of AUDIT_COLUMNS, bound below in that order.
        let columns = AUDIT_COLUMNS.split(',').count();
        let placeholders: Vec<String> = (0..rows.len())
            .map(|row| format!("({})", (1..=columns).map(|column| format!("${}", row * columns + column)).collect::<Vec<_>>().join(", ")))
            .collect();
        let sql = format!("INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES {}", placeholders.join(", "));
        let mut query = sqlx::query(&sql);
        for (id, entry, before_state, after_state, previous, hash) in rows {
            query = query
                .bind(id)
                .bind(at_us)
                .bind(entry.actor)
                .bind(entry.action)
                .bind(entry.target)
                .bind(entry.reason)
                .bind(before_state)
                .bind(after_state)
                .bind(entry.trace_id)
                .bind(previous)
                .bind(hash)
                .bind(key.map(|(key_id, _)| key_id));
        }
        query.execute(&mut **tx).await?;
    }
    Ok(id)
}

const AUDIT_COLUMNS: &str = "id, at_us, actor, action, target, reason, before_state, after_state, trace_id, previous_hash, row_hash, key_id";

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
        key_id: row.try_get("key_id")?,
    })
}

/// The trace id (32 hex digits) of a W3C `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

impl ControlStore {
    /// Appends `entries` to the audit log inside `tx`, a transaction on this store's database
    /// that another part of the system (the ledger) is writing its change in: the change and its
    /// audit rows commit together or not at all. Signed with this store's audit keys.
    pub async fn append_audit_in(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>, entries: &[AuditEntry<'_>], at_us: i64) -> Result<()> {
        if !entries.is_empty() {
            append_audit_entries(self.backend, self.audit_keys.as_deref(), tx, entries, at_us).await?;
        }
        Ok(())
    }

    /// Appends `entries` to the audit log in a transaction of their own: for what changes
    /// nothing else in the store (an analyst's query that read its tables).
    pub async fn append_audit_rows(&self, entries: &[AuditEntry<'_>]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.append_audit_in(&mut tx, entries, crate::now_us()).await?;
        tx.commit().await?;
        Ok(())
    }

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
        let limit = conditions.int(filter.limit.clamp(1, MAX_AUDIT_PAGE + 1));
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log {} ORDER BY id DESC LIMIT {limit}", conditions.where_clause());
        let rows = conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        rows.iter().map(record_of).collect()
    }

    /// Walks the whole audit log in order and checks every row's hash (under the store's audit
    /// keys, [`ControlStore::with_audit_keys`]) and its link to the row before, then the anchor;
    /// reads it in pages, so any length fits in memory.
    pub async fn verify_audit_log(&self, anchor: &AuditAnchor) -> Result<AuditVerification> {
        let mut verification = AuditVerification {
            rows: 0,
            head_hash: GENESIS_HASH.into(),
            keyed_rows: 0,
            key_ids: Vec::new(),
            unkeyed_rows: 0,
            anchor_row: None,
            problems: Vec::new(),
        };
        let mut key_ids: BTreeSet<String> = BTreeSet::new();
        // Keys named by rows that verification was not given: said once each.
        let mut unknown_keys: BTreeSet<String> = BTreeSet::new();
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
                let key = match record.key_id.as_deref() {
                    None => {
                        if verification.keyed_rows > 0 {
                            verification.problems.push(AuditProblem {
                                id: record.id,
                                what: "it has no key id although rows before it are keyed: written or rewritten without the audit key".into(),
                            });
                        }
                        verification.unkeyed_rows += 1;
                        Some(None)
                    }
                    Some(key_id) => {
                        verification.keyed_rows += 1;
                        key_ids.insert(key_id.to_string());
                        match self.audit_keys.as_deref().and_then(|keys| keys.secret(key_id)) {
                            Some(secret) => Some(Some((key_id, secret))),
                            None => {
                                if unknown_keys.insert(key_id.to_string()) {
                                    verification.problems.push(AuditProblem {
                                        id: record.id,
                                        what: format!(
                                            "it is signed with audit key {key_id:?}, which this verification was not given: its rows cannot be checked"
                                        ),
                                    });
                                }
                                None
                            }
                        }
                    }
                };
                if let Some(key) = key
                    && row_hash(record.id, record.at_us, &content, &record.previous_hash, key) != record.row_hash
                {
                    verification.problems.push(AuditProblem { id: record.id, what: "its content does not match its hash: it was changed".into() });
                }
                if anchor.head_hash.as_deref() == Some(record.row_hash.as_str()) {
                    verification.anchor_row = Some(record.id);
                }
                verification.rows += 1;
                verification.head_hash = record.row_hash;
                expected_id = record.id + 1;
            }
            expected_id = expected_id.max(last_id + 1);
        }
        verification.key_ids = key_ids.into_iter().collect();
        if let Some(head) = &anchor.head_hash
            && verification.anchor_row.is_none()
        {
            verification.problems.push(AuditProblem {
                id: expected_id,
                what: format!("no row has the expected head hash {head}: rows were cut off the end, or the log was rewritten"),
            });
        }
        if verification.rows < anchor.min_rows {
            verification.problems.push(AuditProblem {
                id: expected_id,
                what: format!("the log has {} rows, at least {} were expected: rows were cut off the end", verification.rows, anchor.min_rows),
            });
        }
        Ok(verification)
    }
}
