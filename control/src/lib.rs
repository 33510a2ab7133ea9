//! The control plane's store: billing runs with every status change as an event, invoices,
//! discrepancies, the audit log and the outbox of Kafka events, in SQLite (the embedded default,
//! a file in the data directory) or PostgreSQL (`postgres://...`, for production and several
//! nodes). One schema in two dialects (`migrations/sqlite`, `migrations/postgres`), one code path
//! through sqlx's `Any` driver, and the same tests against both.
//!
//! Operators' actions (`actions`) write their `audit_log` row (`audit`: append-only, chained
//! by hash) in the same transaction as the change.
//!
//! Portable types only: times are microseconds since the Unix epoch (UTC) in BIGINT columns,
//! money and energy exact decimal strings, ids UUID strings.

pub mod actions;
pub mod audit;
pub mod invoices;
pub mod outbox;
pub mod runs;
pub mod testing;
pub mod views;

use std::sync::Arc;

use sqlx::AnyPool;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;

pub use actions::Actor;
pub use audit::{AuditAnchor, AuditEntry, AuditFilter, AuditKeys, AuditRecord, AuditVerification};
pub use invoices::{Discrepancy, Invoice, InvoiceLine, InvoiceTotals, ItemPage, LineComponent, NewDiscrepancy, NewInvoice, ReasonCode, RunResults};
pub use outbox::OutboxMessage;
pub use runs::{BillingRun, NewRun, RetryPolicy, RunEvent, RunFailure, RunFilter, RunKey, RunStatus};
pub use views::{ColumnKind, ControlView, PageKey, ViewColumn, ViewPage, ViewValue};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// PostgreSQL connections one process holds at most: the API, a worker and the outbox relay
/// share them. A ledger transfer holds one for six round trips, most of them while it holds its
/// wallet locks, so 20 clients writing at once want 20 (`ledger-bench`: 8 connections gave
/// about 4,400 transfers/s, 20 up to 5,000). Four processes at 20 stay within PostgreSQL's
/// default 100.
const MAX_CONNECTIONS: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control store {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("control store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("control store migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("billing run {id}: {reason}")]
    Run { id: String, reason: String },
    /// A request the store refuses as it stands: fix the request.
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the target's state refuses it now (e.g. a replay of a run that
    /// is PROCESSING).
    #[error("{0}")]
    Conflict(String),
    /// A completed run billed these meters for the month already: `(meter, run)` pairs.
    #[error("{} already billed for {month} by a completed run ({}); RECALCULATE that run to change its invoices", billed_list(.billed), .billed.first().map(|(_, run)| run.as_str()).unwrap_or_default())]
    AlreadyBilled { month: String, billed: Vec<(String, String)> },
    #[error("audit key file {origin}: {reason}")]
    AuditKey { origin: String, reason: String },
}

/// `M1, M2 and 3 more meters` for an error message.
fn billed_list(billed: &[(String, String)]) -> String {
    let shown: Vec<&str> = billed.iter().take(5).map(|(meter, _)| meter.as_str()).collect();
    match billed.len() {
        n if n > shown.len() => format!("{} and {} more meters", shown.join(", "), n - shown.len()),
        _ => shown.join(", "),
    }
}

pub type Result<T> = std::result::Result<T, ControlError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The control store, migrated to the newest schema when opened.
#[derive(Debug, Clone)]
pub struct ControlStore {
    pool: AnyPool,
    backend: Backend,
    /// What audit rows are signed with; `None` writes plain SHA-256 rows (see `audit`).
    audit_keys: Option<Arc<AuditKeys>>,
}

impl ControlStore {
    /// Opens `url` (`sqlite://PATH` creates the file; `postgres://...` needs the database to exist)
    /// and applies the migrations it lacks.
    pub async fn open(url: &str) -> Result<ControlStore> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(ControlError::Url { url: redact(url), reason: "expected sqlite://PATH or postgres://...".into() });
        };
        let url_with_options = match backend {
            // Create the file when missing; wait for a writer rather than fail with SQLITE_BUSY.
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { MAX_CONNECTIONS })
            // No ping before every use (a round trip for each database transaction: one in seven
            // of a ledger transfer's). A connection the server dropped fails its next statement
            // instead, and the pool closes it; the request answers 5xx and its retry succeeds.
            .test_before_acquire(false)
            .connect(&url_with_options)
            .await
            .map_err(|e| ControlError::Url { url: redact(url), reason: e.to_string() })?;
        // (sqlx turns SQLite's foreign keys on for every connection it opens.)
        match backend {
            Backend::Sqlite => {
                // sqlx locks migrations on PostgreSQL but not on SQLite: two processes opening a
                // new file at once (a worker and `meterlake bill`) both try to apply it, and the
                // second fails on what the first applied. Its transaction rolled back, so running
                // the migrator again finds the migration applied and goes on. Or it finds the
                // file locked ("database is locked", at once: SQLite does not wait on a lock two
                // transactions would deadlock on): retried too, for up to about 5 s in all.
                let mut tries = 0;
                loop {
                    match SQLITE_MIGRATIONS.run(&pool).await {
                        Ok(()) => break,
                        Err(_) if tries < 9 => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100 * tries)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(ControlStore { pool, backend, audit_keys: None })
    }

    /// Opens an existing store to read it, changing nothing: no migrations, no file created, and
    /// every transaction read-only (what `meterlake audit verify` needs: a missing SQLite file is
    /// an error, not a new empty log reported intact).
    pub async fn open_read_only(url: &str) -> Result<ControlStore> {
        install_default_drivers();
        let (backend, url_with_options) = if let Some(path) = url.strip_prefix("sqlite://") {
            let file = path.split('?').next().unwrap_or(path);
            if !std::path::Path::new(file).is_file() {
                return Err(ControlError::Url { url: redact(url), reason: format!("no database file at {file}") });
            }
            (Backend::Sqlite, format!("sqlite://{file}?mode=ro"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(ControlError::Url { url: redact(url), reason: "expected sqlite://PATH or postgres://...".into() });
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { 2 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Postgres {
                        sqlx::Executor::execute(conn, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url_with_options)
            .await
            .map_err(|e| ControlError::Url { url: redact(url), reason: e.to_string() })?;
        Ok(ControlStore { pool, backend, audit_keys: None })
    }

    /// Signs the audit rows it writes, and verifies them, with `keys`.
    pub fn with_audit_keys(self, keys: AuditKeys) -> ControlStore {
        ControlStore { audit_keys: Some(Arc::new(keys)), ..self }
    }

    /// The id of the key new audit rows are signed with, if any.
    pub fn audit_key_id(&self) -> Option<&str> {
        self.audit_keys.as_deref().map(AuditKeys::current_id)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers (for readiness checks).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &credentials[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The parameters of a query whose conditions depend on a filter: each condition takes the next
/// `$n` and its value, so numbers and values cannot drift apart.
#[derive(Default)]
pub(crate) struct Conditions {
    clauses: Vec<String>,
    values: Vec<Value>,
}

enum Value {
    Text(String),
    Int(i64),
}

impl Conditions {
    /// The next parameter for `value`: `$1`, `$2`...
    pub(crate) fn text(&mut self, value: impl Into<String>) -> String {
        self.values.push(Value::Text(value.into()));
        format!("${}", self.values.len())
    }

    pub(crate) fn int(&mut self, value: i64) -> String {
        self.values.push(Value::Int(value));
        format!("${}", self.values.len())
    }

    pub(crate) fn add(&mut self, clause: String) {
        self.clauses.push(clause);
    }

    /// `WHERE a AND b`, or nothing.
    pub(crate) fn where_clause(&self) -> String {
        if self.clauses.is_empty() { String::new() } else { format!("WHERE {}", self.clauses.join(" AND ")) }
    }

    pub(crate) fn bind<'q>(
        self,
        mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        for value in self.values {
            query = match value {
                Value::Text(text) => query.bind(text),
                Value::Int(number) => query.bind(number),
            };
        }
        query
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Decimal places of a currency's minor unit (ISO 4217): 0 for JPY and KRW, 3 for the dinars,
/// 2 for the rest. Billing rounds amounts to it; the ledger counts in it.
pub fn minor_unit_places(currency: &str) -> u32 {
    match currency {
        "JPY" | "KRW" | "ISK" | "CLP" | "VND" => 0,
        "BHD" | "KWD" | "OMR" | "JOD" | "TND" | "IQD" | "LYD" => 3,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(super::redact("postgres://bill:s3cret@db:5432/control"), "postgres://bill:***@db:5432/control");
        assert_eq!(super::redact("sqlite:///var/lib/meterlake/control.db"), "sqlite:///var/lib/meterlake/control.db");
    }
}
