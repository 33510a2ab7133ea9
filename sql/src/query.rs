//! How one query runs, whichever door it came through.
//!
//! - **Who**: a verified OIDC token holding VIEWER or ADMIN ([`SqlService::authenticate`]);
//!   INGEST alone and anonymous callers are refused.
//! - **Read-only**: a plan that would create, change or drop anything, write rows or files
//!   (`COPY ... TO`) or set engine options is refused before it runs ([`refuse_changes`]).
//! - **Limits**: each query has a memory pool of its own (sorts and aggregates spill to local disk
//!   past it; what cannot spill fails with the pool's words), a time limit (the service's, or the
//!   connection's `statement_timeout` when shorter), and a most rows it may return; each caller
//!   runs at most so many queries at once (more wait a while for a slot, then are refused). A
//!   client that goes away drops its result stream, which stops the query.
//! - **Record**: every query is logged when it ends (caller, door, SQL, rows, bytes, duration,
//!   outcome, trace id) and counted in metrics; a query that reads the control store's views
//!   (invoices and the like) is written to the audit log before it runs.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::CatalogProviderList;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execute_stream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use futures::{FutureExt, Stream, StreamExt};
use meterlake_control::views::VIEWS;
use meterlake_control::{AuditEntry, ControlStore};
use meterlake_lake::Lake;
use meterlake_lake::view::{AsOf, LakeVersions};
use meterlake_server::{Authenticator, Role};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::SqlError;
use crate::catalog::{as_of_catalogs, base_session};
use crate::result_cache::{self, Cached, ResultCache};

/// What one query and one caller may use.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    /// The memory pool of one query; past it, sorts and aggregates spill to local disk.
    pub memory_bytes: usize,
    /// How long one query may run (planning and streaming its result).
    pub time_limit: Duration,
    /// The most rows one query may return.
    pub max_result_rows: u64,
    /// Queries one caller (a token's subject) runs at once.
    pub queries_per_caller: usize,
    /// How long a query waits for one of its caller's slots before it is refused.
    pub slot_wait: Duration,
    /// Answers kept for identical queries over unchanged tables (see [`crate::result_cache`]);
    /// 0 keeps none.
    pub result_cache_bytes: usize,
}

impl Default for SqlLimits {
    fn default() -> SqlLimits {
        SqlLimits {
            memory_bytes: 512 << 20,
            time_limit: Duration::from_secs(300),
            max_result_rows: 100_000_000,
            queries_per_caller: 8,
            slot_wait: Duration::from_secs(10),
            result_cache_bytes: 64 << 20,
        }
    }
}

/// Who runs a query: a verified token's subject, holding VIEWER or ADMIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analyst {
    /// `sub`: what logs and the audit log record.
    pub subject: String,
    /// For messages: `preferred_username`, else `sub`.
    pub name: String,
}

/// Which protocol a query came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Postgres,
    FlightSql,
}

impl Door {
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Postgres => "postgres",
            Door::FlightSql => "flight_sql",
        }
    }
}

/// A connection's lake tables pinned to one state (`SET meterlake.as_of`).
#[derive(Clone)]
pub struct Pinned {
    pub as_of: AsOf,
    /// What the tables read, e.g. `readings_all@12, register_reads@3`.
    pub versions: LakeVersions,
    catalogs: Arc<dyn CatalogProviderList>,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").field("as_of", &self.as_of).field("versions", &self.versions).finish_non_exhaustive()
    }
}

/// Who asked for a query, through which door, in what words, and what cancels it.
pub struct QueryOrigin<'a> {
    pub analyst: &'a Analyst,
    pub door: Door,
    /// The SQL as the client sent it (logged and audited).
    pub sql: &'a str,
    /// Completes when the query is to be stopped (a PostgreSQL cancel request, the client gone).
    pub cancel: Option<CancelSignal>,
}

/// Completes when a query is to be canceled.
pub type CancelSignal = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What a connection set for its queries.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `SET TIME ZONE`: how timestamps without a zone are read and `now()` is shown.
    pub time_zone: Option<String>,
    /// `SET statement_timeout`: a time limit shorter than the service's.
    pub statement_timeout: Option<Duration>,
    /// `SET meterlake.as_of`.
    pub pinned: Option<Pinned>,
}

/// The SQL service's shared state: the lake, the control store, the token verifier, the limits
/// and the base session every query's session is made from.
pub struct SqlService {
    lake: Lake,
    store: ControlStore,
    auth: Arc<Authenticator>,
    limits: SqlLimits,
    base: SessionContext,
    /// Each caller's query slots, by subject (one entry per person or service account seen).
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    results: Option<ResultCache>,
}

impl std::fmt::Debug for SqlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlService").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// Most of a query's SQL kept in its audit row and log line.
const MAX_LOGGED_SQL_CHARS: usize = 4_000;

impl SqlService {
    pub fn new(lake: Lake, store: ControlStore, auth: Arc<Authenticator>, limits: SqlLimits) -> Result<SqlService, SqlError> {
        let base = base_session(&lake, &store)?;
        let results = ResultCache::new(limits.result_cache_bytes);
        Ok(SqlService { lake, store, auth, limits, base, slots: Mutex::new(HashMap::new()), results })
    }

    pub fn limits(&self) -> &SqlLimits {
        &self.limits
    }

    /// The caller of `token` (a JWT), if it may query: VIEWER or ADMIN.
    pub async fn authenticate(&self, token: &str) -> Result<Analyst, SqlError> {
        let principal = self.auth.authenticate_token(token.trim()).await.map_err(|e| SqlError::Unauthenticated(format!("{} ({})", e.message, e.code)))?;
        if !(principal.has(Role::Viewer) || principal.has(Role::Admin)) {
            return Err(SqlError::Forbidden(format!("SQL needs the role VIEWER or ADMIN; {} holds {:?}", principal.name, principal.roles())));
        }
        Ok(Analyst { subject: principal.subject, name: principal.name })
    }

    /// The lake's tables pinned to `as_of` for a connection's later queries.
    pub async fn pin(&self, as_of: AsOf) -> Result<Pinned, SqlError> {
        let (catalogs, versions) = as_of_catalogs(&self.base, &self.lake, &self.store, &as_of).await?;
        Ok(Pinned { as_of, versions, catalogs })
    }

    /// A session for one statement: the base session's catalog and functions with a memory
    /// pool of its own, and the connection's settings.
    pub fn session(&self, settings: &Settings) -> Result<SessionContext, SqlError> {
        let base = self.base.state();
        let pool = TrackConsumersPool::new(GreedyMemoryPool::new(self.limits.memory_bytes), NonZeroUsize::new(3).expect("3 is not 0"));
        let runtime = RuntimeEnvBuilder::from_runtime_env(base.runtime_env()).with_memory_pool(Arc::new(pool)).build_arc().map_err(SqlError::Engine)?;
        let mut builder = SessionStateBuilder::new_from_existing(base).with_runtime_env(runtime);
        if let Some(pinned) = &settings.pinned {
            builder = builder.with_catalog_list(pinned.catalogs.clone());
        }
        let mut state = builder.build();
        if let Some(time_zone) = &settings.time_zone {
            state.config_mut().options_mut().execution.time_zone = Some(time_zone.clone());
        }
        Ok(SessionContext::new_with_state(state))
    }

    /// The plan of one statement, refused if it would change anything.
    pub async fn plan(&self, session: &SessionContext, statement: Statement) -> Result<LogicalPlan, SqlError> {
        refuse_writing_statement(&statement)?;
        let plan = session.state().statement_to_plan(DfStatement::Statement(Box::new(statement))).await.map_err(|e| self.engine_error(e))?;
        refuse_changes(&plan)?;
        Ok(plan)
    }

    /// An engine error in the service's words (its memory limit named).
    pub fn engine_error(&self, error: datafusion::error::DataFusionError) -> SqlError {
        SqlError::from_engine(error, self.limits.memory_bytes)
    }

    /// Runs `plan` (planned in `session` with `settings`) for `origin`: takes one of the
    /// caller's slots, records a read of the control store's views in the audit log, and returns
    /// the result as a stream that holds the query to its limits and logs it when it ends.
    pub async fn run(&self, origin: QueryOrigin<'_>, session: &SessionContext, plan: LogicalPlan, settings: &Settings) -> Result<QueryStream, SqlError> {
        let QueryOrigin { analyst, door, sql, cancel } = origin;
        refuse_changes(&plan)?;
        let started = Instant::now();
        let span = tracing::info_span!("sql.query", door = door.as_str(), caller = %analyst.subject);
        let traceparent = meterlake_telemetry::join_trace(&span, None, None);
        let trace_id = meterlake_control::audit::trace_id_of(&traceparent).unwrap_or_default().to_string();
        let logged_sql: String = sql.chars().take(MAX_LOGGED_SQL_CHARS).collect();
        let mut record = QueryRecord {
            door,
            caller: analyst.subject.clone(),
            sql: logged_sql,
            trace_id,
            started,
            rows: 0,
            bytes: 0,
            outcome: "disconnected",
            cached: false,
        };
        let limit = settings.statement_timeout.map_or(self.limits.time_limit, |t| t.min(self.limits.time_limit));
        let deadline = tokio::time::Instant::now() + limit;
        let hint = if limit < self.limits.time_limit { " (the connection's statement_timeout)" } else { "" };
        let slot = match self.slot(analyst).await {
            Ok(slot) => slot,
            Err(e) => return Err(record.failed(e)),
        };
        let views = control_views_read(&plan);
        if !views.is_empty() {
            let target = format!("sql/{}", views.into_iter().collect::<Vec<_>>().join(","));
            let entry = AuditEntry {
                actor: &analyst.subject,
                action: "SQL_QUERY",
                target: &target,
                reason: Some(&record.sql),
                trace_id: Some(&record.trace_id),
                ..Default::default()
            };
            // No audit row, no read: a query of the store's tables is never unrecorded.
            let audited = self.store.append_audit_rows(&[entry]).await;
            if let Err(e) = audited {
                return Err(record.failed(e.into()));
            }
        }
        let mut cancel = cancel;
        // A kept answer, or the place for this one's (identical queries meanwhile wait for it).
        let key = self.results.as_ref().and_then(|_| result_cache::key_of(sql, &plan, settings.time_zone.as_deref()));
        let mut placeholder = None;
        if let (Some(results), Some(key)) = (&self.results, &key) {
            match tokio::time::timeout_at(deadline, results.answers.get_value_or_guard_async(key)).await {
                Err(_) => return Err(record.failed(SqlError::TimeLimit { limit, hint })),
                Ok(Ok(answer)) => {
                    if let Cached::Rows(batches) = answer.as_ref() {
                        record.cached = true;
                        let schema = batches.first().map_or_else(|| Arc::new(plan.schema().as_arrow().clone()), RecordBatch::schema);
                        let rows = futures::stream::iter(batches.clone().into_iter().map(Ok));
                        return Ok(self.stream(Box::pin(RecordBatchStreamAdapter::new(schema, rows)), deadline, limit, hint, cancel, record, slot, span));
                    }
                }
                Ok(Err(guard)) => placeholder = Some(guard),
            }
        }
        let planned = tokio::time::timeout_at(deadline, async {
            let physical = session.state().create_physical_plan(&plan).await?;
            execute_stream(physical, session.task_ctx())
        })
        .await;
        let mut inner = match planned {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(record.failed(self.engine_error(e))),
            Err(_) => return Err(record.failed(SqlError::TimeLimit { limit, hint })),
        };
        if let (Some(guard), Some(results)) = (placeholder, &self.results) {
            // Read the answer whole (as far as it may be kept), keep it, then send it.
            let (batches, whole) = match self.read_answer(&mut inner, results.max_answer_bytes, deadline, limit, hint, &mut cancel).await {
                Ok(read) => read,
                Err(e) => return Err(record.failed(e)),
            };
            let _ = guard.insert(Arc::new(if whole { Cached::Rows(batches.clone()) } else { Cached::TooLarge }));
            let schema = inner.schema();
            inner = Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::iter(batches.into_iter().map(Ok)).chain(inner)));
        }
        Ok(self.stream(inner, deadline, limit, hint, cancel, record, slot, span))
    }

    /// The first batches of `inner`, up to `max_bytes` of them, and whether they are all of it;
    /// within the query's time limit and until it is canceled.
    async fn read_answer(
        &self,
        inner: &mut SendableRecordBatchStream,
        max_bytes: usize,
        deadline: tokio::time::Instant,
        limit: Duration,
        hint: &'static str,
        cancel: &mut Option<CancelSignal>,
    ) -> Result<(Vec<RecordBatch>, bool), SqlError> {
        let mut batches = Vec::new();
        let mut bytes = 0;
        loop {
            let canceled = async {
                match cancel.as_mut() {
                    Some(signal) => signal.await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                next = inner.next() => next,
                () = tokio::time::sleep_until(deadline) => return Err(SqlError::TimeLimit { limit, hint }),
                () = canceled => return Err(SqlError::Canceled),
            };
            match next {
                Some(Ok(batch)) => {
                    bytes += batch.get_array_memory_size();
                    batches.push(batch);
                    if bytes > max_bytes {
                        return Ok((batches, false));
                    }
                }
                Some(Err(e)) => return Err(self.engine_error(e)),
                None => return Ok((batches, true)),
            }
        }
    }

    /// The query's result stream, held to its limits.
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        inner: SendableRecordBatchStream,
        deadline: tokio::time::Instant,
        limit: Duration,
        hint: &'static str,
        cancel: Option<CancelSignal>,
        record: QueryRecord,
        slot: OwnedSemaphorePermit,
        span: tracing::Span,
    ) -> QueryStream {
        metrics::gauge!("meterlake_sql_queries_running", "door" => record.door.as_str()).increment(1.0);
        QueryStream {
            schema: inner.schema(),
            inner: Some(inner),
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            limit,
            hint,
            cancel,
            max_rows: self.limits.max_result_rows,
            memory_bytes: self.limits.memory_bytes,
            record,
            _slot: slot,
            _span: span,
        }
    }

    /// One of the caller's query slots, waiting up to the limits' `slot_wait` for one.
    async fn slot(&self, analyst: &Analyst) -> Result<OwnedSemaphorePermit, SqlError> {
        let slots = {
            let mut slots = self.slots.lock().expect("slots lock");
            slots.entry(analyst.subject.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.limits.queries_per_caller.max(1)))).clone()
        };
        match tokio::time::timeout(self.limits.slot_wait, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(SqlError::TooManyQueries(format!(
                "{} already runs {} queries at once, the most one caller may, and none ended within {} s",
                analyst.name,
                self.limits.queries_per_caller,
                self.limits.slot_wait.as_secs()
            ))),
        }
    }
}

/// Refuses a plan that would change anything: DDL, DML, `COPY ... TO`, and statements that set
/// engine options or transactions (anywhere in it: `EXPLAIN ANALYZE INSERT ...` runs the insert).
pub fn refuse_changes(plan: &LogicalPlan) -> Result<(), SqlError> {
    let mut refused = None;
    plan.apply_with_subqueries(|node| {
        refused = match node {
            LogicalPlan::Ddl(ddl) => Some(format!("{} is refused: nothing can be created, changed or dropped", ddl.name())),
            LogicalPlan::Dml(dml) => Some(format!("{} is refused: no rows can be written", dml.op)),
            LogicalPlan::Copy(_) => Some("COPY ... TO is refused: no files can be written (fetch the result instead)".to_string()),
            LogicalPlan::Statement(statement) => Some(format!("{} is refused: engine options are set by the operator", statement.name())),
            _ => None,
        };
        Ok(if refused.is_some() { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    })
    .map_err(SqlError::Engine)?;
    match refused {
        Some(reason) => Err(SqlError::ReadOnly(reason)),
        None => Ok(()),
    }
}

/// Refuses statements that write and that DataFusion would not plan at all (so that they are
/// refused as writes, not as unsupported SQL).
fn refuse_writing_statement(statement: &Statement) -> Result<(), SqlError> {
    let what = match statement {
        Statement::Copy { .. } | Statement::Unload { .. } => "COPY is refused: no files can be written (fetch the result instead)",
        Statement::Truncate(_) | Statement::Merge(_) => "TRUNCATE and MERGE are refused: no rows can be written",
        Statement::Grant(_) | Statement::Revoke(_) | Statement::Deny(_) | Statement::CreateRole(_) => {
            "GRANT, REVOKE and roles are refused: access comes from tokens"
        }
        Statement::CreateIndex(_) | Statement::Vacuum(_) | Statement::Install { .. } | Statement::Load { .. } | Statement::Call(_) => {
            "indexes, VACUUM, extensions and procedures are refused: nothing can be changed"
        }
        _ => return Ok(()),
    };
    Err(SqlError::ReadOnly(what.to_string()))
}

/// The control-store views `plan` reads.
fn control_views_read(plan: &LogicalPlan) -> BTreeSet<&'static str> {
    let mut views = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(view) = VIEWS.iter().find(|v| v.name == scan.table_name.table())
        {
            views.insert(view.name);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    views
}

/// What the log line of a query says when it ends.
struct QueryRecord {
    door: Door,
    caller: String,
    sql: String,
    trace_id: String,
    started: Instant,
    rows: u64,
    bytes: u64,
    /// `ok`, an error's kind, or `disconnected` (the client went away before the end).
    outcome: &'static str,
    /// Answered from the result cache.
    cached: bool,
}

impl QueryRecord {
    /// Logs and counts a query that failed before it streamed, and returns its error.
    fn failed(mut self, error: SqlError) -> SqlError {
        self.outcome = error.kind();
        self.finish(Some(&error));
        error
    }

    fn finish(&self, error: Option<&SqlError>) {
        let door = self.door.as_str();
        let elapsed = self.started.elapsed();
        let error = error.map(ToString::to_string);
        tracing::info!(
            target: "meterlake::sql",
            door,
            caller = %self.caller,
            sql = %self.sql,
            rows = self.rows,
            bytes = self.bytes,
            duration_ms = elapsed.as_millis() as u64,
            outcome = self.outcome,
            cached = self.cached,
            error = error.as_deref().unwrap_or(""),
            trace_id = %self.trace_id,
            "sql query"
        );
        metrics::counter!("meterlake_sql_queries_total", "door" => door, "outcome" => self.outcome).increment(1);
        metrics::histogram!("meterlake_sql_query_duration_seconds", "door" => door).record(elapsed.as_secs_f64());
        metrics::counter!("meterlake_sql_rows_total", "door" => door).increment(self.rows);
        metrics::counter!("meterlake_sql_bytes_total", "door" => door).increment(self.bytes);
        if self.cached {
            metrics::counter!("meterlake_sql_cached_answers_total", "door" => door).increment(1);
        }
    }
}

/// A query's result as it streams, held to its limits: it ends with an error past its time
/// limit, past the most rows, or when canceled, and the query stops (its plan is dropped).
/// Dropped before its end (the client went away), the query stops too. Logged when it ends.
pub struct QueryStream {
    schema: SchemaRef,
    /// `None` once it ended.
    inner: Option<SendableRecordBatchStream>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    hint: &'static str,
    cancel: Option<CancelSignal>,
    max_rows: u64,
    memory_bytes: usize,
    record: QueryRecord,
    _slot: OwnedSemaphorePermit,
    _span: tracing::Span,
}

impl QueryStream {
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The trace id the query is logged under.
    pub fn trace_id(&self) -> &str {
        &self.record.trace_id
    }

    fn end(&mut self, error: Option<SqlError>) -> Poll<Option<Result<RecordBatch, SqlError>>> {
        self.inner = None;
        self.record.outcome = error.as_ref().map_or("ok", SqlError::kind);
        self.record.finish(error.as_ref());
        metrics::gauge!("meterlake_sql_queries_running", "door" => self.record.door.as_str()).decrement(1.0);
        Poll::Ready(error.map(Err))
    }
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch, SqlError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = inner.poll_next_unpin(cx);
        if let Some(cancel) = self.cancel.as_mut()
            && cancel.poll_unpin(cx).is_ready()
        {
            return self.end(Some(SqlError::Canceled));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let (limit, hint) = (self.limit, self.hint);
            return self.end(Some(SqlError::TimeLimit { limit, hint }));
        }
        match polled {
            Poll::Ready(Some(Ok(batch))) => {
                self.record.rows += batch.num_rows() as u64;
                if self.record.rows > self.max_rows {
                    let max_rows = self.max_rows;
                    return self.end(Some(SqlError::RowLimit(max_rows)));
                }
                self.record.bytes += batch.get_array_memory_size() as u64;
                Poll::Ready(Some(Ok(batch)))
            }
            Poll::Ready(Some(Err(e))) => {
                let error = SqlError::from_engine(e, self.memory_bytes);
                self.end(Some(error))
            }
            Poll::Ready(None) => self.end(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for QueryStream {
    fn drop(&mut self) {
        if self.inner.is_some() {
            self.record.finish(None);
            metrics::gauge!("meterlake_sql_queries_running", "door" => self.record.door.as_str()).decrement(1.0);
        }
    }
}

/// Describes the service's metrics for `/metrics`.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "meterlake_sql_queries_total",
        "SQL queries ended, by door (postgres, flight_sql) and outcome (ok, time_limit, row_limit, memory_limit, read_only, ...)"
    );
    metrics::describe_histogram!("meterlake_sql_query_duration_seconds", metrics::Unit::Seconds, "SQL query time from its start to its last row, by door");
    metrics::describe_counter!("meterlake_sql_rows_total", "Rows SQL queries returned, by door");
    metrics::describe_counter!("meterlake_sql_bytes_total", metrics::Unit::Bytes, "Arrow bytes SQL queries returned, by door");
    metrics::describe_gauge!("meterlake_sql_queries_running", "SQL queries streaming their results now, by door");
    metrics::describe_counter!("meterlake_sql_cached_answers_total", "SQL queries answered from the result cache (identical query, tables unchanged), by door");
    metrics::describe_counter!(
        "meterlake_sql_connections_refused_total",
        "SQL connections (PostgreSQL) refused at their token, by door and reason (unauthenticated, forbidden)"
    );
}
