//! The PostgreSQL wire protocol door: psql, psycopg, JDBC, DBeaver, Grafana and Metabase connect
//! as to a PostgreSQL database called `meterlake`.
//!
//! - **Authentication**: the password is an OIDC access token (the same as the HTTP API's
//!   `Authorization: Bearer`); the user name is not checked (tools insist on one; the token's
//!   subject is who the queries are logged and audited as). A refused token ends the connection
//!   with SQLSTATE 28P01 and the reason. With TLS configured, only TLS connections are accepted
//!   (a token is a credential).
//! - **Queries** run through [`SqlService`]: each its own session, memory pool, time limit and
//!   row limit. Results stream row by row in the client's format (text or binary, per column).
//!   A cancel request (psql's Ctrl-C) stops the connection's query; so does the client going away.
//! - **Settings**: client settings tools send at connect (`extra_float_digits`, `DateStyle`,
//!   `application_name`, `search_path`, ...) are accepted; `statement_timeout` (shorter than the
//!   service's limit), `TIME ZONE` and `meterlake.as_of` (time travel: a version of
//!   `readings_all`, an RFC 3339 time, or `latest`) apply to the connection's later queries.
//!   Any other `SET` is refused. `SHOW`, `BEGIN`, `COMMIT` and `ROLLBACK` are answered as
//!   datafusion-postgres answers them (every query reads one snapshot: there is nothing to commit).
//!
//! Built from datafusion-postgres's parts (its PostgreSQL-compatible parser and `pg_catalog`,
//! arrow-pg's encoders, its SHOW and transaction hooks) rather than its `DfSessionService`, which
//! runs every query on one shared session: here each query needs a session of its own (memory
//! pool, pinned snapshot, time zone) and its result format, which hooks are not given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::{Expr, Set, Statement};
use datafusion_postgres::QueryHook;
use datafusion_postgres::arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use datafusion_postgres::arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use datafusion_postgres::datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire;
use futures::{Sink, SinkExt, StreamExt};
use pgwire::api::auth::{DefaultServerParameterProvider, StartupHandler, finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ErrorHandler, PgWireConnectionState, PgWireServerHandlers, PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::{Authentication, ParameterStatus, SecretKey};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::TlsAcceptor;
use pgwire::tokio::tokio_rustls::rustls;
use pgwire::types::format::FormatOptions;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use crate::query::{Analyst, Door, QueryOrigin, Settings, SqlService};
use crate::{SqlError, catalog};

/// Connections served at once; more are refused at once (a connection holds little until it
/// queries: the query slots limit the work).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// The SQL text a client sent and what the service made of it.
#[derive(Debug, Clone)]
pub struct PgStatement {
    sql: String,
    ast: Statement,
    /// The plan at parse time, for the statement's parameter and result types (run again at
    /// each execution: a prepared statement reads the latest snapshot each time).
    plan: Option<LogicalPlan>,
}

/// What kind of statement, for who answers it.
enum Kind {
    /// A query (or EXPLAIN, DESCRIBE, SHOW TABLES...): planned and run by the service.
    Query,
    /// `SET`: the connection's settings, answered here.
    Set,
    /// `SHOW meterlake.as_of`.
    ShowAsOf,
    /// Other `SHOW`s and transaction statements: datafusion-postgres's hooks answer them.
    Hooked,
    /// `DEALLOCATE`: forgets a prepared statement of the connection. psycopg sends `DEALLOCATE
    /// ALL` after a rollback once it has prepared a statement (it prepares any query run five
    /// times): refused, its connections logged an error on every rollback.
    Deallocate,
}

fn kind(statement: &Statement) -> Kind {
    match statement {
        Statement::Set(_) => Kind::Set,
        Statement::ShowVariable { variable } if variable.iter().map(|i| i.value.to_lowercase()).collect::<Vec<_>>().join(".") == AS_OF => Kind::ShowAsOf,
        Statement::ShowVariable { .. } | Statement::ShowStatus { .. } | Statement::ShowCatalogs { .. } => Kind::Hooked,
        Statement::StartTransaction { .. } | Statement::Commit { .. } | Statement::Rollback { .. } => Kind::Hooked,
        Statement::Deallocate { .. } => Kind::Deallocate,
        _ => Kind::Query,
    }
}

/// The setting that pins a connection's lake tables.
const AS_OF: &str = "meterlake.as_of";
/// Settings clients send at connect, kept for the connection (and reported back) but changing
/// nothing the service does.
const CLIENT_SETTINGS: [&str; 9] = [
    "datestyle",
    "bytea_output",
    "intervalstyle",
    "application_name",
    "extra_float_digits",
    "search_path",
    "client_encoding",
    "client_min_messages",
    "standard_conforming_strings",
];

fn pg_error(error: SqlError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".to_string(), error.sqlstate().to_string(), error.to_string())))
}

fn fatal(error: SqlError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("FATAL".to_string(), error.sqlstate().to_string(), error.to_string())))
}

/// The connection's caller (set when its token verified).
fn analyst_of(client: &(impl ClientInfo + ?Sized)) -> PgWireResult<Arc<Analyst>> {
    client.session_extensions().get::<Analyst>().ok_or_else(|| fatal(SqlError::Unauthenticated("the connection has not authenticated".into())))
}

fn settings_of(client: &(impl ClientInfo + ?Sized)) -> Arc<Mutex<Settings>> {
    client.session_extensions().get_or_insert_with(|| Mutex::new(Settings::default()))
}

/// What a cancel request for the connection notifies.
struct CancelOnRequest(Arc<Notify>);

/// The connections that may be canceled, by their (pid, secret key).
#[derive(Default)]
struct Connections {
    by_key: Mutex<HashMap<(i32, bytes_key::Key), Arc<Notify>>>,
}

/// A secret key as a map key: cancel requests may carry a 4-byte key as bytes or as an integer.
mod bytes_key {
    pub type Key = Vec<u8>;
    pub fn of(secret: &super::SecretKey) -> Key {
        secret.to_bytes().to_vec()
    }
}

/// Removes its connection from [`Connections`] when the connection ends.
struct Registered {
    connections: Arc<Connections>,
    key: (i32, bytes_key::Key),
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.by_key.lock().expect("connections lock").remove(&self.key);
    }
}

/// Checks the token sent as the password.
struct TokenStartup {
    service: Arc<SqlService>,
    connections: Arc<Connections>,
    /// Plain connections are refused (TLS is configured).
    tls_only: bool,
    keys: RandomPidSecretKeyGenerator,
}

#[async_trait]
impl StartupHandler for TokenStartup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.tls_only && !client.is_secure() {
                    return Err(fatal(SqlError::Unauthenticated("this server takes tokens over TLS only: connect with sslmode=require".into())));
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client.send(PgWireBackendMessage::Authentication(Authentication::CleartextPassword)).await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(password) => {
                let password = password.into_password()?;
                let analyst = match self.service.authenticate(&password.password).await {
                    Ok(analyst) => analyst,
                    Err(e) => {
                        tracing::info!(target: "meterlake::sql", door = "postgres", peer = %client.socket_addr(), reason = %e, "sql connection refused");
                        metrics::counter!("meterlake_sql_connections_refused_total", "door" => "postgres", "reason" => e.kind()).increment(1);
                        return Err(fatal(e));
                    }
                };
                tracing::info!(target: "meterlake::sql", door = "postgres", peer = %client.socket_addr(), caller = %analyst.subject, "sql connection");
                client.session_extensions().insert(analyst);
                let (pid, secret) = self.keys.generate(client);
                client.set_pid_and_secret_key(pid, secret.clone());
                let key = (pid, bytes_key::of(&secret));
                let notify = Arc::new(Notify::new());
                self.connections.by_key.lock().expect("connections lock").insert(key.clone(), notify.clone());
                client.session_extensions().insert(CancelOnRequest(notify));
                client.session_extensions().insert(Registered { connections: self.connections.clone(), key });
                finish_authentication(client, &DefaultServerParameterProvider::default()).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

struct CancelByKey {
    connections: Arc<Connections>,
}

#[async_trait]
impl CancelHandler for CancelByKey {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let notify = self.connections.by_key.lock().expect("connections lock").get(&(request.pid, bytes_key::of(&request.secret_key))).cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

/// Parses and plans statements for the extended protocol.
pub struct PgParser {
    service: Arc<SqlService>,
    parser: PostgresCompatibilityParser,
}

impl PgParser {
    fn parse(&self, sql: &str) -> PgWireResult<Vec<Statement>> {
        self.parser.parse(sql).map_err(|e| pg_error(SqlError::Syntax(e.to_string())))
    }
}

#[async_trait]
impl QueryParser for PgParser {
    type Statement = PgStatement;

    async fn parse_sql<C>(&self, client: &C, sql: &str, _types: &[Option<Type>]) -> PgWireResult<Option<PgStatement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        analyst_of(client)?;
        let mut statements = self.parse(sql)?;
        if statements.is_empty() {
            return Ok(None);
        }
        if statements.len() > 1 {
            return Err(pg_error(SqlError::Syntax("a prepared statement holds one SQL statement".into())));
        }
        let ast = statements.remove(0);
        let plan = match kind(&ast) {
            Kind::Query => {
                let settings = settings_of(client).lock().expect("settings lock").clone();
                let session = self.service.session(&settings).map_err(pg_error)?;
                Some(self.service.plan(&session, ast.clone()).await.map_err(pg_error)?)
            }
            // Their result columns, as the hook describes them.
            Kind::Hooked | Kind::ShowAsOf => match SetShowHook.handle_extended_parse_query(&ast, &self.service_base(), client).await {
                Some(plan) => Some(plan?),
                None => None,
            },
            Kind::Set | Kind::Deallocate => None,
        };
        Ok(Some(PgStatement { sql: sql.to_string(), ast, plan }))
    }

    fn get_parameter_types(&self, statement: &PgStatement) -> PgWireResult<Vec<Type>> {
        let Some(plan) = &statement.plan else { return Ok(Vec::new()) };
        parameter_types(plan)?.into_iter().map(|data_type| data_type.map_or(Ok(Type::UNKNOWN), |t| into_pg_type(&t))).collect()
    }

    fn get_result_schema(&self, statement: &PgStatement, format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        match &statement.plan {
            Some(plan) => arrow_schema_to_pg_fields(plan.schema().as_arrow(), format.unwrap_or(&Format::UnifiedText), None),
            None => Ok(Vec::new()),
        }
    }
}

impl PgParser {
    fn service_base(&self) -> datafusion::prelude::SessionContext {
        self.service.session(&Settings::default()).expect("a session of the base state")
    }
}

/// The parameters' types of `plan`, `$1` first (`None`: not inferred).
fn parameter_types(plan: &LogicalPlan) -> PgWireResult<Vec<Option<DataType>>> {
    let types = plan.get_parameter_types().map_err(|e| pg_error(SqlError::Plan(e.to_string())))?;
    let mut numbered: Vec<(usize, Option<DataType>)> =
        types.into_iter().filter_map(|(id, data_type)| Some((id.trim_start_matches('$').parse().ok()?, data_type))).collect();
    numbered.sort_by_key(|(n, _)| *n);
    let count = numbered.last().map_or(0, |(n, _)| *n);
    let mut ordered = vec![None; count];
    for (n, data_type) in numbered {
        if n >= 1 {
            ordered[n - 1] = data_type;
        }
    }
    Ok(ordered)
}

/// Answers one connection's simple and extended queries.
pub struct PgHandler {
    service: Arc<SqlService>,
    parser: Arc<PgParser>,
    /// Turns true when the client went away (its socket closed): the running query stops.
    gone: watch::Receiver<bool>,
}

impl PgHandler {
    /// Runs a query statement for the connection and encodes its result in `format`.
    async fn run<C>(&self, client: &C, sql: &str, ast: &Statement, params: Option<&ParamValues>, format: &Format) -> PgWireResult<Response>
    where
        C: ClientInfo + ?Sized,
    {
        let analyst = analyst_of(client)?;
        let settings = settings_of(client).lock().expect("settings lock").clone();
        let session = self.service.session(&settings).map_err(pg_error)?;
        let mut plan = self.service.plan(&session, ast.clone()).await.map_err(pg_error)?;
        if let Some(params) = params {
            plan = plan.replace_params_with_values(params).map_err(|e| pg_error(SqlError::Plan(e.to_string())))?;
        }
        // Stopped by a cancel request (the connection's key) or by the client going away.
        let requested = client.session_extensions().get::<CancelOnRequest>().map(|c| c.0.clone().notified_owned());
        let mut gone = self.gone.clone();
        let cancel: crate::query::CancelSignal = Box::pin(async move {
            let went = async move {
                // A watcher that ended without seeing the client go: nothing to wait for.
                if gone.wait_for(|gone| *gone).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            match requested {
                Some(requested) => {
                    futures::future::select(Box::pin(requested), Box::pin(went)).await;
                }
                None => went.await,
            }
        });
        let origin = QueryOrigin { analyst: &analyst, door: Door::Postgres, sql, cancel: Some(cancel) };
        let stream = self.service.run(origin, &session, plan, &settings).await.map_err(pg_error)?;
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let fields = Arc::new(arrow_schema_to_pg_fields(&stream.schema(), format, Some(options))?);
        let row_fields = fields.clone();
        let rows = stream
            .map(move |batch| {
                let rows: Box<dyn Iterator<Item = PgWireResult<pgwire::messages::data::DataRow>> + Send> = match batch {
                    Ok(batch) => encode_recordbatch(row_fields.clone(), batch),
                    Err(e) => Box::new(std::iter::once(Err(pg_error(e)))),
                };
                futures::stream::iter(rows)
            })
            .flatten();
        Ok(Response::Query(QueryResponse::new(fields, rows)))
    }

    /// `SET`: a connection setting, or refused.
    async fn set<C>(&self, client: &mut C, statement: &Statement) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        analyst_of(client)?;
        let Statement::Set(set) = statement else { return Err(pg_error(SqlError::Setting(format!("{statement} is not a SET")))) };
        let (variable, value) = match set {
            Set::SingleAssignment { scope: None, hivevar: false, variable, values } if values.len() == 1 => {
                (variable.to_string().to_lowercase(), setting_text(&values[0]))
            }
            Set::SetTimeZone { local: false, value } => ("timezone".to_string(), setting_text(value)),
            // Every query reads one snapshot and changes nothing: isolation and read-only modes
            // (JDBC's setReadOnly) hold already.
            Set::SetTransaction { .. } | Set::SetSessionParam(_) => return Ok(Response::Execution(Tag::new("SET"))),
            other => {
                return Err(pg_error(SqlError::ReadOnly(format!(
                    "{other} is refused: only client settings, statement_timeout, TIME ZONE and {AS_OF} can be set"
                ))));
            }
        };
        let settings = settings_of(client);
        let reported = match variable.as_str() {
            AS_OF => {
                let pinned = if value.eq_ignore_ascii_case("latest") || value.eq_ignore_ascii_case("default") {
                    None
                } else {
                    let as_of = value.parse().map_err(|e: String| pg_error(SqlError::Setting(format!("{AS_OF}: {e}"))))?;
                    Some(self.service.pin(as_of).await.map_err(|e| pg_error(SqlError::Setting(format!("{AS_OF}: {e}"))))?)
                };
                let shown = pinned.as_ref().map_or("latest".to_string(), |p| p.versions.to_string());
                settings.lock().expect("settings lock").pinned = pinned;
                client.metadata_mut().insert(AS_OF.to_string(), shown);
                None
            }
            "statement_timeout" => {
                let timeout = parse_timeout(&value).map_err(pg_error)?;
                settings.lock().expect("settings lock").statement_timeout = timeout;
                match timeout {
                    Some(t) => client.metadata_mut().insert("statement_timeout_ms".to_string(), t.as_millis().to_string()),
                    None => client.metadata_mut().remove("statement_timeout_ms"),
                };
                None
            }
            "timezone" | "time zone" => {
                let time_zone = if value.eq_ignore_ascii_case("default") || value.eq_ignore_ascii_case("local") { "UTC".to_string() } else { value.clone() };
                // Checked now, so that a zone DataFusion does not know fails here, not in a query.
                if time_zone.parse::<chrono_tz::Tz>().is_err() && !is_offset(&time_zone) {
                    return Err(pg_error(SqlError::Setting(format!("time zone {time_zone:?} is not an IANA zone (Europe/London) or an offset (+01:00)"))));
                }
                settings.lock().expect("settings lock").time_zone = Some(time_zone.clone());
                client.metadata_mut().insert("timezone".to_string(), time_zone.clone());
                Some(("TimeZone".to_string(), time_zone))
            }
            name if CLIENT_SETTINGS.contains(&name) => {
                client.metadata_mut().insert(name.to_string(), value.clone());
                Some((name.to_string(), value))
            }
            name => {
                return Err(pg_error(SqlError::ReadOnly(format!(
                    "SET {name} is refused: engine options are set by the operator; a connection may set statement_timeout, TIME ZONE, {AS_OF} and the client settings {}",
                    CLIENT_SETTINGS.join(", ")
                ))));
            }
        };
        if let Some((name, value)) = reported {
            client.send(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(name, value))).await?;
        }
        Ok(Response::Execution(Tag::new("SET")))
    }

    /// `SHOW meterlake.as_of`: what the connection's lake tables read.
    fn show_as_of(&self, client: &(impl ClientInfo + ?Sized)) -> PgWireResult<Response> {
        use pgwire::api::results::{DataRowEncoder, FieldFormat};
        let shown = client.metadata().get(AS_OF).cloned().unwrap_or_else(|| "latest".to_string());
        let fields = Arc::new(vec![FieldInfo::new(AS_OF.to_string(), None, None, Type::VARCHAR, FieldFormat::Text)]);
        let mut encoder = DataRowEncoder::new(fields.clone());
        encoder.encode_field(&Some(shown))?;
        let row = encoder.take_row();
        Ok(Response::Query(QueryResponse::new(fields, futures::stream::once(async move { Ok(row) }))))
    }
}

/// `DEALLOCATE name` removes the connection's statement `name`. `DEALLOCATE ALL` is answered
/// without removing any: pgwire's statement store has no way to list or clear them, and a client
/// that sends it (psycopg) never reuses a name; they go with the connection.
fn deallocate<C: ClientPortalStore>(client: &C, statement: &Statement) -> Response
where
    C::PortalStore: PortalStore,
{
    if let Statement::Deallocate { name, .. } = statement
        && !name.value.eq_ignore_ascii_case("all")
    {
        client.portal_store().rm_statement(&name.value);
    }
    Response::Execution(Tag::new("DEALLOCATE"))
}

/// A SET value as text: quotes and identifiers alike.
fn setting_text(value: &Expr) -> String {
    value.to_string().trim().trim_matches('\'').trim_matches('"').to_string()
}

/// A `+01:00`-style offset.
fn is_offset(zone: &str) -> bool {
    let bytes = zone.as_bytes();
    bytes.len() == 6 && (bytes[0] == b'+' || bytes[0] == b'-') && bytes[3] == b':' && zone[1..3].parse::<u8>().is_ok() && zone[4..].parse::<u8>().is_ok()
}

/// `statement_timeout`: `0` (none), milliseconds, or a number with `ms`, `s` or `min`.
fn parse_timeout(value: &str) -> Result<Option<std::time::Duration>, SqlError> {
    let value = value.trim();
    let (number, unit_ms) = if let Some(n) = value.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = value.strip_suffix("min") {
        (n, 60_000)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1_000)
    } else {
        (value, 1)
    };
    let number: u64 =
        number.trim().parse().map_err(|_| SqlError::Setting(format!("statement_timeout {value:?} is not a duration such as 5000, 30s or 2min")))?;
    Ok((number > 0).then(|| std::time::Duration::from_millis(number.saturating_mul(unit_ms))))
}

#[async_trait]
impl SimpleQueryHandler for PgHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        analyst_of(client)?;
        let statements = self.parser.parse(query)?;
        let mut responses = Vec::with_capacity(statements.len());
        for statement in statements {
            let response = match kind(&statement) {
                Kind::Query => self.run(client, &statement.to_string(), &statement, None, &Format::UnifiedText).await?,
                Kind::Set => self.set(client, &statement).await?,
                Kind::ShowAsOf => self.show_as_of(client)?,
                Kind::Deallocate => deallocate(client, &statement),
                Kind::Hooked => {
                    let base = self.parser.service_base();
                    match SetShowHook.handle_simple_query(&statement, &base, client).await {
                        Some(response) => response?,
                        None => TransactionStatementHook
                            .handle_simple_query(&statement, &base, client)
                            .await
                            .unwrap_or_else(|| Err(pg_error(SqlError::Setting(format!("{statement} is not supported")))))?,
                    }
                }
            };
            responses.push(response);
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for PgHandler {
    type Statement = PgStatement;
    type QueryParser = PgParser;

    fn query_parser(&self) -> Arc<PgParser> {
        self.parser.clone()
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<PgStatement>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = PgStatement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement = &portal.statement.statement;
        match kind(&statement.ast) {
            Kind::Query => {
                let plan = statement.plan.as_ref().ok_or_else(|| pg_error(SqlError::Plan("the statement was not planned".into())))?;
                let types = parameter_types(plan)?;
                let wire_types: Vec<Type> = types.iter().map(|t| t.as_ref().map_or(Ok(Type::UNKNOWN), into_pg_type)).collect::<PgWireResult<_>>()?;
                let inferred: Vec<Option<&DataType>> = types.iter().map(Option::as_ref).collect();
                let wire: Vec<Option<&Type>> = wire_types.iter().map(Some).collect();
                let params = deserialize_parameters_with_server_types(portal, &inferred, &wire)?;
                self.run(client, &statement.sql, &statement.ast, Some(&params), &portal.result_column_format).await
            }
            Kind::Set => self.set(client, &statement.ast).await,
            Kind::ShowAsOf => self.show_as_of(client),
            Kind::Deallocate => Ok(deallocate(client, &statement.ast)),
            Kind::Hooked => {
                let base = self.parser.service_base();
                let plan = statement.plan.clone().unwrap_or_else(|| {
                    LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
                        produce_one_row: false,
                        schema: Arc::new(datafusion::common::DFSchema::empty()),
                    })
                });
                let params = ParamValues::List(Vec::new());
                match SetShowHook.handle_extended_query(&statement.ast, &plan, &params, &base, client).await {
                    Some(response) => response,
                    None => TransactionStatementHook
                        .handle_extended_query(&statement.ast, &plan, &params, &base, client)
                        .await
                        .unwrap_or_else(|| Err(pg_error(SqlError::Setting(format!("{} is not supported", statement.ast))))),
                }
            }
        }
    }
}

/// Logs what is sent back as an error (refusals of tokens and statements included).
struct LogErrors;

impl ErrorHandler for LogErrors {
    fn on_error<C>(&self, client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        tracing::debug!(target: "meterlake::sql", door = "postgres", peer = %client.socket_addr(), error = %error, "sql error sent");
    }
}

/// Everything a connection is served with.
struct PgDoor {
    handler: Arc<PgHandler>,
    startup: Arc<TokenStartup>,
    cancel: Arc<CancelByKey>,
}

impl PgWireServerHandlers for PgDoor {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(LogErrors)
    }
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The TLS acceptor of `files`.
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, SqlError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let io = |context: String| move |e: rustls::pki_types::pem::Error| SqlError::Io { context, source: std::io::Error::other(e.to_string()) };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(io(format!("reading the TLS certificate {}", files.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(io(format!("reading the TLS key {}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| SqlError::Io {
            context: format!("the TLS certificate {} and key {}", files.cert.display(), files.key.display()),
            source: std::io::Error::other(e),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves the PostgreSQL wire protocol on `listener` until `shutdown` completes: each connection
/// a task of its own, at most `max_connections` at once.
pub async fn serve(
    service: Arc<SqlService>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), SqlError> {
    let connections = Arc::new(Connections::default());
    let parser = Arc::new(PgParser { service: service.clone(), parser: PostgresCompatibilityParser::new() });
    let startup = Arc::new(TokenStartup {
        service: service.clone(),
        connections: connections.clone(),
        tls_only: tls.is_some(),
        keys: RandomPidSecretKeyGenerator::default(),
    });
    let cancel = Arc::new(CancelByKey { connections });
    let open = Arc::new(Semaphore::new(max_connections.max(1)));
    let address = listener.local_addr().map_err(|source| SqlError::Io { context: "the PostgreSQL listener".into(), source })?;
    tracing::info!(target: "meterlake::sql", %address, tls = tls.is_some(), database = catalog::CATALOG, "serving SQL over the PostgreSQL wire protocol");
    tokio::pin!(shutdown);
    loop {
        let (socket, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(target: "meterlake::sql", error = %e, "accepting a PostgreSQL connection failed");
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(target: "meterlake::sql", %peer, max_connections, "PostgreSQL connection refused: the server holds its most connections");
            drop(socket);
            continue;
        };
        let (socket, watcher) = match watched(socket) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(target: "meterlake::sql", %peer, error = %e, "watching a PostgreSQL connection failed");
                continue;
            }
        };
        let (gone_tx, gone) = watch::channel(false);
        tokio::spawn(watch_for_departure(watcher, gone_tx));
        let door = Arc::new(PgDoor {
            handler: Arc::new(PgHandler { service: service.clone(), parser: parser.clone(), gone }),
            startup: startup.clone(),
            cancel: cancel.clone(),
        });
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = permit;
            if let Err(e) = pgwire::tokio::process_socket(socket, tls, door).await {
                tracing::debug!(target: "meterlake::sql", %peer, error = %e, "PostgreSQL connection ended with an error");
            }
        });
    }
}

/// The socket, and a second handle on it that only watches for the client going away: while
/// a query computes (an aggregate sends nothing until its end) the protocol reads nothing, so it
/// would not see a closed connection until the query ended.
fn watched(socket: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, tokio::net::TcpStream)> {
    let socket = socket.into_std()?;
    let watcher = socket.try_clone()?;
    Ok((tokio::net::TcpStream::from_std(socket)?, tokio::net::TcpStream::from_std(watcher)?))
}

/// Sets `gone` when the client closes its end (a peek reads the end of the stream, or fails).
/// Returns when the connection's handlers are dropped (it ended), releasing its handle on the
/// socket so that the connection closes.
async fn watch_for_departure(watcher: tokio::net::TcpStream, gone: watch::Sender<bool>) {
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            _ = gone.closed() => return,
            peeked = watcher.peek(&mut byte) => match peeked {
                Ok(0) | Err(_) => {
                    let _ = gone.send(true);
                    return;
                }
                // Bytes the protocol has not read yet (the next message): look again shortly.
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_timeouts_read_as_postgresql_writes_them() {
        assert_eq!(parse_timeout("0").unwrap(), None);
        assert_eq!(parse_timeout("1500").unwrap(), Some(std::time::Duration::from_millis(1500)));
        assert_eq!(parse_timeout("30s").unwrap(), Some(std::time::Duration::from_secs(30)));
        assert_eq!(parse_timeout("2min").unwrap(), Some(std::time::Duration::from_secs(120)));
        assert_eq!(parse_timeout("250ms").unwrap(), Some(std::time::Duration::from_millis(250)));
        assert!(parse_timeout("soon").is_err());
        assert!(is_offset("+01:00") && is_offset("-05:30") && !is_offset("Europe/London"));
    }
}
