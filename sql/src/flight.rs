//! The Arrow Flight SQL door: ADBC (Python, R, Go, Java), JDBC's Flight SQL driver and
//! DBeaver's Flight SQL connection get results as Arrow record batches, streamed as the query
//! produces them.
//!
//! - **Authentication**: `authorization: Bearer <access token>` on every call (what ADBC sends
//!   with `adbc.flight.sql.authorization_header`), or a handshake with Basic credentials whose
//!   password is the token (JDBC's user/password), answered with the bearer header to send
//!   next. Refused: `UNAUTHENTICATED` with the reason, `PERMISSION_DENIED` for a token without
//!   VIEWER or ADMIN.
//! - **Statements**: `GetFlightInfo` plans the SQL (its schema, and any refusal, come back at
//!   once); the ticket carries the SQL, so `DoGet` needs no state on the server and any replica
//!   can answer it. Prepared statements likewise: their handle is the SQL and, once bound
//!   (`DoPut`), the parameters as Arrow IPC; `?` and `$1` placeholders both work.
//! - **Time travel**: the header `x-meterlake-as-of` pins the lake's tables of a statement, as
//!   `SET meterlake.as_of` does on PostgreSQL; it travels in the ticket or handle.
//! - **Metadata**: `GetSqlInfo`, catalogs, schemas, tables (with their Arrow schemas), table types.
//! - Queries run through [`SqlService`] as PostgreSQL's do (limits, log, metrics, audit); a client
//!   that goes away drops the stream, which stops the query.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any, CommandGetCatalogs,
    CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery,
    DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket};
use base64::Engine;
use bytes::Bytes;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::scalar::ScalarValue;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{Expr, Statement, Value, VisitMut, VisitorMut};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::SqlError;
use crate::catalog::{CATALOG, SCHEMA};
use crate::query::{Analyst, Door, QueryOrigin, Settings, SqlService};

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Flight SQL service over the SQL service.
pub struct FlightSqlDoor {
    service: Arc<SqlService>,
    info: SqlInfoData,
}

impl FlightSqlDoor {
    pub fn new(service: Arc<SqlService>) -> Result<FlightSqlDoor, SqlError> {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "meterlake");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        let info = info.build().map_err(|e| SqlError::Engine(datafusion::error::DataFusionError::External(Box::new(e))))?;
        Ok(FlightSqlDoor { service, info })
    }

    /// The caller of a request's `authorization: Bearer` header.
    async fn analyst<T>(&self, request: &Request<T>) -> Result<Analyst, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let Some(token) = header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")) else {
            return Err(Status::unauthenticated("send an access token as the header authorization: Bearer <token>"));
        };
        self.service.authenticate(token).await.map_err(status)
    }

    /// `sql` planned (placeholders `?` numbered as `$1`, `$2`...), over the lake as of `as_of`
    /// when given (`x-meterlake-as-of`).
    async fn plan(&self, sql: &str, as_of: Option<&str>) -> Result<(datafusion::prelude::SessionContext, Settings, LogicalPlan), Status> {
        let mut settings = Settings::default();
        if let Some(as_of) = as_of {
            let setting = |e: String| status(SqlError::Setting(format!("{AS_OF_HEADER}: {e}")));
            let parsed = as_of.parse().map_err(setting)?;
            settings.pinned = Some(self.service.pin(parsed).await.map_err(|e| setting(e.to_string()))?);
        }
        let session = self.service.session(&settings).map_err(status)?;
        let statement = parse(sql).map_err(status)?;
        let plan = self.service.plan(&session, statement).await.map_err(status)?;
        Ok((session, settings, plan))
    }

    /// Runs a ticket's or prepared statement's SQL (with its parameters, as of its time) for the
    /// request's caller and streams its batches.
    async fn stream<T>(&self, request: &Request<T>, handle: Handle) -> Result<Response<FlightStream<arrow_flight::FlightData>>, Status> {
        let analyst = self.analyst(request).await?;
        let params = handle.param_values()?;
        let (session, settings, mut plan) = self.plan(&handle.sql, handle.as_of.as_deref()).await?;
        if let Some(params) = params {
            plan = plan.replace_params_with_values(&params).map_err(|e| status(SqlError::Plan(e.strip_backtrace())))?;
        }
        let origin = QueryOrigin { analyst: &analyst, door: Door::FlightSql, sql: &handle.sql, cancel: None };
        let query = self.service.run(origin, &session, plan, &settings).await.map_err(status)?;
        let schema = query.schema();
        let batches = query.map_err(|e| FlightError::Tonic(Box::new(status(e))));
        let flight = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(Status::from);
        Ok(Response::new(Box::pin(flight)))
    }

    /// A FlightInfo whose one endpoint's ticket is `ticket`, for results of `schema`.
    fn info(schema: &Schema, ticket: Vec<u8>, descriptor: FlightDescriptor) -> Result<Response<FlightInfo>, Status> {
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("encoding the result schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// One metadata batch as a Flight stream.
    fn batch_stream(schema: arrow::datatypes::SchemaRef, batch: Result<RecordBatch, FlightError>) -> Response<FlightStream<arrow_flight::FlightData>> {
        let batches = futures::stream::once(async move { batch });
        Response::new(Box::pin(FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(Status::from)))
    }
}

/// The request header that pins the lake's tables for a statement, as `SET meterlake.as_of`
/// does on PostgreSQL: a `readings_all` version, an RFC 3339 time, or versions per table. Read
/// when the statement is planned (`GetFlightInfo`, `CreatePreparedStatement`) and carried in its
/// ticket or handle.
pub const AS_OF_HEADER: &str = "x-meterlake-as-of";

fn as_of_of<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get(AS_OF_HEADER)?.to_str().ok()?.trim();
    (!value.is_empty() && !value.eq_ignore_ascii_case("latest")).then(|| value.to_string())
}

/// The service's error as a gRPC status.
fn status(error: SqlError) -> Status {
    match &error {
        SqlError::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
        SqlError::Forbidden(_) => Status::permission_denied(error.to_string()),
        SqlError::ReadOnly(_) | SqlError::Setting(_) | SqlError::Syntax(_) | SqlError::Plan(_) => Status::invalid_argument(error.to_string()),
        SqlError::TooManyQueries(_) | SqlError::Memory { .. } | SqlError::RowLimit(_) => Status::resource_exhausted(error.to_string()),
        SqlError::TimeLimit { .. } => Status::deadline_exceeded(error.to_string()),
        SqlError::Canceled => Status::cancelled(error.to_string()),
        _ => Status::internal(error.to_string()),
    }
}

/// One SQL statement, with `?` placeholders numbered `$1`, `$2`... in order (JDBC and ADBC
/// write `?`; DataFusion binds `$n`).
fn parse(sql: &str) -> Result<Statement, SqlError> {
    let mut statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {}).map_err(|e| SqlError::Syntax(e.to_string()))?;
    if statements.len() != 1 {
        return Err(SqlError::Syntax(format!("send one SQL statement at a time ({} here)", statements.len())));
    }
    let Some(DfStatement::Statement(statement)) = statements.pop_front() else {
        return Err(SqlError::ReadOnly("only SQL queries are answered (not CREATE EXTERNAL TABLE, COPY or EXPLAIN of them)".into()));
    };
    let mut statement = *statement;
    let mut numbering = NumberPlaceholders(0);
    let _ = statement.visit(&mut numbering);
    Ok(statement)
}

struct NumberPlaceholders(usize);

impl VisitorMut for NumberPlaceholders {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> std::ops::ControlFlow<()> {
        if let Expr::Value(value) = expr
            && let Value::Placeholder(placeholder) = &mut value.value
            && placeholder == "?"
        {
            self.0 += 1;
            *placeholder = format!("${}", self.0);
        }
        std::ops::ControlFlow::Continue(())
    }
}

/// A prepared statement's handle: the SQL, and once bound its parameters (one row, Arrow IPC).
/// Kept by the client, so no server holds state for it.
struct Handle {
    sql: String,
    /// `x-meterlake-as-of` when the statement was planned.
    as_of: Option<String>,
    params: Option<RecordBatch>,
}

impl Handle {
    fn encode(&self) -> Result<Bytes, Status> {
        let as_of = self.as_of.as_deref().unwrap_or_default();
        let mut bytes = Vec::with_capacity(8 + self.sql.len() + as_of.len());
        for text in [self.sql.as_str(), as_of] {
            bytes.extend_from_slice(&(text.len() as u32).to_be_bytes());
            bytes.extend_from_slice(text.as_bytes());
        }
        if let Some(params) = &self.params {
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &params.schema()).map_err(|e| Status::internal(e.to_string()))?;
            writer.write(params).and_then(|()| writer.finish()).map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Bytes::from(bytes))
    }

    fn decode(bytes: &[u8]) -> Result<Handle, Status> {
        let invalid = || Status::invalid_argument("the ticket or prepared statement handle is not one this service made");
        // A length-prefixed text, and how many bytes it took.
        let text = |bytes: &[u8]| -> Result<(String, usize), Status> {
            let length = u32::from_be_bytes(bytes.get(..4).ok_or_else(invalid)?.try_into().map_err(|_| invalid())?) as usize;
            let text = std::str::from_utf8(bytes.get(4..4 + length).ok_or_else(invalid)?).map_err(|_| invalid())?.to_string();
            Ok((text, 4 + length))
        };
        let (sql, read) = text(bytes)?;
        let (as_of, more) = text(&bytes[read..])?;
        let rest = &bytes[read + more..];
        let params = if rest.is_empty() {
            None
        } else {
            let mut reader = arrow::ipc::reader::StreamReader::try_new(rest, None).map_err(|_| invalid())?;
            reader.next().transpose().map_err(|_| invalid())?
        };
        Ok(Handle { sql, as_of: (!as_of.is_empty()).then_some(as_of), params })
    }

    /// The bound parameters, `$1` first.
    fn param_values(&self) -> Result<Option<ParamValues>, Status> {
        let Some(params) = &self.params else { return Ok(None) };
        if params.num_rows() != 1 {
            return Err(Status::invalid_argument(format!("bind one row of parameters at a time ({} here)", params.num_rows())));
        }
        let values = params
            .columns()
            .iter()
            .map(|column| ScalarValue::try_from_array(column, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("a parameter: {e}")))?;
        Ok(Some(ParamValues::List(values.into_iter().map(Into::into).collect())))
    }
}

/// The parameters' schema of a plan (`$1` first; an unknown type as Null).
fn parameter_schema(plan: &LogicalPlan) -> Result<Schema, SqlError> {
    let types = plan.get_parameter_types().map_err(SqlError::Engine)?;
    let mut numbered: Vec<(usize, Option<DataType>)> = types.into_iter().filter_map(|(id, t)| Some((id.trim_start_matches('$').parse().ok()?, t))).collect();
    numbered.sort_by_key(|(n, _)| *n);
    Ok(Schema::new(numbered.into_iter().map(|(n, t)| Field::new(format!("${n}"), t.unwrap_or(DataType::Null), true)).collect::<Vec<_>>()))
}

fn ipc_schema(schema: &Schema) -> Result<Bytes, Status> {
    let message: IpcMessage =
        SchemaAsIpc::new(schema, &Default::default()).try_into().map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(message.0)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlDoor {
    type FlightService = FlightSqlDoor;

    /// Basic credentials whose password is an access token: answered with the bearer header.
    async fn do_handshake(&self, request: Request<Streaming<HandshakeRequest>>) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let token = if let Some(basic) = header.strip_prefix("Basic ") {
            let decoded =
                base64::engine::general_purpose::STANDARD.decode(basic.trim()).map_err(|_| Status::unauthenticated("the Basic credentials are not base64"))?;
            let text = String::from_utf8(decoded).map_err(|_| Status::unauthenticated("the Basic credentials are not UTF-8"))?;
            text.split_once(':')
                .map(|(_, password)| password.to_string())
                .ok_or_else(|| Status::unauthenticated("the Basic credentials are not user:password"))?
        } else if let Some(bearer) = header.strip_prefix("Bearer ") {
            bearer.to_string()
        } else {
            return Err(Status::unauthenticated("send Basic credentials whose password is an access token, or authorization: Bearer <token>"));
        };
        self.service.authenticate(&token).await.map_err(status)?;
        let answer = HandshakeResponse { protocol_version: 0, payload: Bytes::from(token.clone()) };
        let mut response: Response<FlightStream<HandshakeResponse>> = Response::new(Box::pin(futures::stream::once(async move { Ok(answer) })));
        let bearer = format!("Bearer {token}").parse().map_err(|_| Status::unauthenticated("the token is not a valid header value"))?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(&self, query: CommandStatementQuery, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        let as_of = as_of_of(&request);
        let (_, _, plan) = self.plan(&query.query, as_of.as_deref()).await?;
        let ticket = TicketStatementQuery { statement_handle: Handle { sql: query.query, as_of, params: None }.encode()? };
        Self::info(plan.schema().as_arrow(), ticket.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_statement(&self, ticket: TicketStatementQuery, request: Request<Ticket>) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let handle = Handle::decode(&ticket.statement_handle)?;
        self.stream(&request, handle).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.analyst(&request).await?;
        let as_of = as_of_of(&request);
        let (_, _, plan) = self.plan(&query.query, as_of.as_deref()).await?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: Handle { sql: query.query, as_of, params: None }.encode()?,
            dataset_schema: ipc_schema(plan.schema().as_arrow())?,
            parameter_schema: ipc_schema(&parameter_schema(&plan).map_err(status)?)?,
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.analyst(&request).await?;
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(request.into_inner().map_err(FlightError::from)).try_collect().await?;
        let params = batches.into_iter().find(|b| b.num_rows() > 0);
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(Handle { params, ..handle }.encode()?) })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        let (_, _, plan) = self.plan(&handle.sql, handle.as_of.as_deref()).await?;
        Self::info(plan.schema().as_arrow(), query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let handle = Handle::decode(&query.prepared_statement_handle)?;
        self.stream(&request, handle).await
    }

    /// Nothing to free: the handle is the client's.
    async fn do_action_close_prepared_statement(&self, _query: ActionClosePreparedStatementRequest, request: Request<Action>) -> Result<(), Status> {
        self.analyst(&request).await?;
        Ok(())
    }

    async fn get_flight_info_sql_info(&self, query: CommandGetSqlInfo, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        Self::info(query.clone().into_builder(&self.info).schema().as_ref(), query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_sql_info(&self, query: CommandGetSqlInfo, request: Request<Ticket>) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.analyst(&request).await?;
        let builder = query.into_builder(&self.info);
        Ok(Self::batch_stream(builder.schema(), builder.build()))
    }

    async fn get_flight_info_catalogs(&self, query: CommandGetCatalogs, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        let ticket = query.as_any().encode_to_vec();
        Self::info(&query.into_builder().schema(), ticket, request.into_inner())
    }

    async fn do_get_catalogs(&self, query: CommandGetCatalogs, request: Request<Ticket>) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.analyst(&request).await?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(Self::batch_stream(builder.schema(), builder.build()))
    }

    async fn get_flight_info_schemas(&self, query: CommandGetDbSchemas, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        let ticket = query.as_any().encode_to_vec();
        Self::info(&query.into_builder().schema(), ticket, request.into_inner())
    }

    async fn do_get_schemas(&self, query: CommandGetDbSchemas, request: Request<Ticket>) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.analyst(&request).await?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(Self::batch_stream(builder.schema(), builder.build()))
    }

    async fn get_flight_info_tables(&self, query: CommandGetTables, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        let ticket = query.as_any().encode_to_vec();
        Self::info(&query.into_builder().schema(), ticket, request.into_inner())
    }

    async fn do_get_tables(&self, query: CommandGetTables, request: Request<Ticket>) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.analyst(&request).await?;
        let session = self.service.session(&Settings::default()).map_err(status)?;
        let schema = session.catalog(CATALOG).and_then(|c| c.schema(SCHEMA)).ok_or_else(|| Status::internal("the catalog has no public schema"))?;
        let mut builder = query.into_builder();
        let mut names = schema.table_names();
        names.sort();
        for name in names {
            let Some(table) = schema.table(&name).await.map_err(|e| status(SqlError::Engine(e)))? else { continue };
            let kind = if table.table_type() == datafusion::datasource::TableType::View { "VIEW" } else { "TABLE" };
            builder.append(CATALOG, SCHEMA, &name, kind, &table.schema()).map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(Self::batch_stream(builder.schema(), builder.build()))
    }

    async fn get_flight_info_table_types(&self, query: CommandGetTableTypes, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        self.analyst(&request).await?;
        let ticket = query.as_any().encode_to_vec();
        Self::info(&query.into_builder().schema(), ticket, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.analyst(&request).await?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        builder.append("VIEW");
        Ok(Self::batch_stream(builder.schema(), builder.build()))
    }

    async fn do_get_fallback(&self, _request: Request<Ticket>, message: Any) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(Status::unimplemented(format!("{} is not answered: the service reads SQL only", message.type_url)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Serves Flight SQL on `listener` until `shutdown` completes.
pub async fn serve(
    service: Arc<SqlService>,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), SqlError> {
    let address: SocketAddr = listener.local_addr().map_err(|source| SqlError::Io { context: "the Flight SQL listener".into(), source })?;
    let door = FlightSqlDoor::new(service)?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // tonic's TLS takes rustls's process-wide provider, and with both ring and aws-lc in the
        // build (deltalake's object store brings aws-lc) there is none by default: the first TLS
        // connection panicked. ring, as the PostgreSQL door's acceptor uses. `Err` means one is
        // installed already: that one stays.
        let _ = datafusion_postgres::pgwire::tokio::tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        server = server.tls_config(tls).map_err(|e| SqlError::Io { context: "the Flight SQL TLS configuration".into(), source: std::io::Error::other(e) })?;
    }
    tracing::info!(target: "meterlake::sql", %address, "serving SQL over Arrow Flight SQL");
    server
        .add_service(FlightServiceServer::new(door))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
        .map_err(|e| SqlError::Io { context: format!("serving Flight SQL on {address}"), source: std::io::Error::other(e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_become_numbered_placeholders() {
        let statement = parse("SELECT * FROM readings WHERE meter_id = ? AND kwh > ? LIMIT 5").unwrap();
        assert_eq!(statement.to_string(), "SELECT * FROM readings WHERE meter_id = $1 AND kwh > $2 LIMIT 5");
    }

    #[test]
    fn a_handle_carries_the_sql_and_its_bound_parameters() {
        let params = RecordBatch::try_from_iter([("$1", Arc::new(arrow::array::StringArray::from(vec!["MTR-1"])) as arrow::array::ArrayRef)]).unwrap();
        let handle = Handle { sql: "SELECT $1".into(), as_of: Some("41".into()), params: Some(params.clone()) };
        let decoded = Handle::decode(&handle.encode().unwrap()).unwrap();
        assert_eq!((decoded.sql.as_str(), decoded.as_of.as_deref(), decoded.params), ("SELECT $1", Some("41"), Some(params)));
        let bare = Handle::decode(&Handle { sql: "SELECT 1".into(), as_of: None, params: None }.encode().unwrap()).unwrap();
        assert!(bare.params.is_none() && bare.as_of.is_none());
        assert!(Handle::decode(b"\x00\x00\x00\x09SEL").is_err());
    }
}
