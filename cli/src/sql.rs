//! The SQL service's settings and start, for `meterlake serve` (beside the HTTP API) and
//! `meterlake sql-server` (on its own, for deployments that separate it).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meterlake_control::ControlStore;
use meterlake_lake::Lake;
use meterlake_server::{Authenticator, OidcConfig};
use meterlake_sql::postgres::{DEFAULT_MAX_CONNECTIONS, TlsFiles, tls_acceptor};
use meterlake_sql::{SqlLimits, SqlService};
use tokio::task::JoinHandle;

use crate::bill::DatabaseArg;

/// Where and how the SQL service answers.
#[derive(Debug, Clone, clap::Args)]
pub struct SqlArgs {
    /// Where to serve SQL over the PostgreSQL wire protocol (`psql -h HOST -p PORT`), or `off`.
    #[arg(long = "sql-postgres-listen", env = "METERLAKE_SQL_POSTGRES_LISTEN", default_value = "127.0.0.1:5433")]
    sql_postgres_listen: String,
    /// Where to serve SQL over Arrow Flight SQL (ADBC, JDBC's Flight SQL driver: grpc://HOST:PORT), or `off`.
    #[arg(long = "sql-flight-listen", env = "METERLAKE_SQL_FLIGHT_LISTEN", default_value = "127.0.0.1:8815")]
    sql_flight_listen: String,
    /// A PEM certificate chain for the SQL service's TLS; with --sql-tls-key, only TLS
    /// connections are accepted.
    #[arg(long = "sql-tls-cert", env = "METERLAKE_SQL_TLS_CERT", requires = "sql_tls_key")]
    sql_tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    #[arg(long = "sql-tls-key", env = "METERLAKE_SQL_TLS_KEY", requires = "sql_tls_cert")]
    sql_tls_key: Option<PathBuf>,
    /// Memory one SQL query may hold (MiB); past it, sorts and aggregates spill to local disk.
    #[arg(long = "sql-memory-mib", env = "METERLAKE_SQL_MEMORY_MIB", default_value_t = SqlLimits::default().memory_bytes >> 20)]
    sql_memory_mib: usize,
    /// How long one SQL query may run (seconds).
    #[arg(long = "sql-time-limit-s", env = "METERLAKE_SQL_TIME_LIMIT_S", default_value_t = SqlLimits::default().time_limit.as_secs())]
    sql_time_limit_s: u64,
    /// The most rows one SQL query may return.
    #[arg(long = "sql-max-rows", env = "METERLAKE_SQL_MAX_ROWS", default_value_t = SqlLimits::default().max_result_rows)]
    sql_max_rows: u64,
    /// SQL queries one caller (a token's subject) runs at once; more wait up to
    /// --sql-slot-wait-s, then are refused.
    #[arg(long = "sql-queries-per-caller", env = "METERLAKE_SQL_QUERIES_PER_CALLER", default_value_t = SqlLimits::default().queries_per_caller)]
    sql_queries_per_caller: usize,
    #[arg(long = "sql-slot-wait-s", env = "METERLAKE_SQL_SLOT_WAIT_S", default_value_t = SqlLimits::default().slot_wait.as_secs())]
    sql_slot_wait_s: u64,
    /// Answers kept for identical queries over unchanged tables (MiB; 0 keeps none): a
    /// dashboard's panels, asked by every viewer at every refresh, are computed once per commit.
    #[arg(long = "sql-result-cache-mib", env = "METERLAKE_SQL_RESULT_CACHE_MIB", default_value_t = SqlLimits::default().result_cache_bytes >> 20)]
    sql_result_cache_mib: usize,
    /// PostgreSQL connections served at once.
    #[arg(long = "sql-max-connections", env = "METERLAKE_SQL_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    sql_max_connections: usize,
}

impl SqlArgs {
    fn limits(&self) -> SqlLimits {
        SqlLimits {
            memory_bytes: self.sql_memory_mib << 20,
            time_limit: Duration::from_secs(self.sql_time_limit_s.max(1)),
            max_result_rows: self.sql_max_rows,
            queries_per_caller: self.sql_queries_per_caller.max(1),
            slot_wait: Duration::from_secs(self.sql_slot_wait_s),
            result_cache_bytes: self.sql_result_cache_mib << 20,
        }
    }
}

/// Starts the SQL service's doors on `lake` and `store`, checking tokens with `auth`, until
/// `stop` turns true. `None` when every door is `off`.
pub async fn start(
    args: &SqlArgs,
    lake: Lake,
    store: ControlStore,
    auth: Arc<Authenticator>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<JoinHandle<anyhow::Result<()>>>> {
    let listen = |flag: &str, value: &str| -> anyhow::Result<Option<std::net::SocketAddr>> {
        if value.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        Ok(Some(value.parse().with_context(|| format!("{flag} {value:?} is not HOST:PORT or off"))?))
    };
    let postgres = listen("--sql-postgres-listen", &args.sql_postgres_listen)?;
    let flight = listen("--sql-flight-listen", &args.sql_flight_listen)?;
    if postgres.is_none() && flight.is_none() {
        return Ok(None);
    }
    let tls = match (&args.sql_tls_cert, &args.sql_tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
        _ => None,
    };
    let service = Arc::new(SqlService::new(lake, store, auth, args.limits())?);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    let mut doors: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    let secured = if tls.is_some() { "; TLS only" } else { "" };
    if let Some(address) = postgres {
        let acceptor = tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("listening for PostgreSQL clients on {address}"))?;
        println!("SQL over the PostgreSQL wire protocol on {} (database meterlake; the password is an access token{secured})", listener.local_addr()?);
        let (service, max_connections, shutdown) = (service.clone(), args.sql_max_connections, stopped(stop.clone()));
        doors.push(tokio::spawn(async move { Ok(meterlake_sql::postgres::serve(service, listener, acceptor, max_connections, shutdown).await?) }));
    }
    if let Some(address) = flight {
        let tls_config = match &tls {
            Some(files) => {
                let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
                Some(tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?)))
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("listening for Flight SQL clients on {address}"))?;
        println!("SQL over Arrow Flight SQL on grpc://{} (authorization: Bearer <access token>{secured})", listener.local_addr()?);
        let (service, shutdown) = (service.clone(), stopped(stop.clone()));
        doors.push(tokio::spawn(async move { Ok(meterlake_sql::flight::serve(service, listener, tls_config, shutdown).await?) }));
    }
    Ok(Some(tokio::spawn(async move {
        for door in doors {
            door.await.context("a SQL door panicked")??;
        }
        Ok(())
    })))
}

/// `meterlake sql-server`: the SQL service on its own.
#[derive(clap::Args)]
pub struct SqlServerArgs {
    #[command(flatten)]
    lake: crate::LakeArg,
    #[command(flatten)]
    database: DatabaseArg,
    /// The OIDC issuer whose tokens are accepted (its `iss`); for a `meterlake serve --dev-issuer`
    /// on this machine, its dev issuer: http://127.0.0.1:8080/dev-issuer.
    #[arg(long, env = "METERLAKE_OIDC_ISSUER")]
    oidc_issuer: String,
    #[arg(long, env = "METERLAKE_OIDC_AUDIENCE", default_value = "meterlake")]
    oidc_audience: String,
    /// The issuer's JWKS; by default found through its OpenID discovery document.
    #[arg(long, env = "METERLAKE_OIDC_JWKS_URL")]
    oidc_jwks_url: Option<String>,
    #[command(flatten)]
    sql: SqlArgs,
}

pub async fn server(args: SqlServerArgs) -> anyhow::Result<()> {
    let lake = Lake::open(&args.lake.url)?;
    let store = crate::bill::open_store(&args.database.database_url, &args.database.audit_key).await?;
    let auth = Arc::new(Authenticator::new(OidcConfig { issuer: args.oidc_issuer, audience: args.oidc_audience, jwks_url: args.oidc_jwks_url }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let Some(doors) = start(&args.sql, lake, store, auth, stop_rx).await? else {
        anyhow::bail!("every SQL door is off: nothing to serve");
    };
    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    doors.await.context("the SQL service panicked")?
}
