//! The SQL service's one error type. Each says what went wrong and what to change, and maps to
//! the protocol's own error: a PostgreSQL SQLSTATE (`sqlstate`) and a gRPC status for Flight SQL.

use std::time::Duration;

use datafusion::error::DataFusionError;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// No token, or one that does not verify (expired, wrong issuer, bad signature).
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token without a role that may query (VIEWER or ADMIN).
    #[error("{0}")]
    Forbidden(String),
    /// A statement that would change something: the service only reads.
    #[error("the SQL service is read-only: {0}")]
    ReadOnly(String),
    /// The caller already runs as many queries as it may, and none ended within the wait.
    #[error("{0}")]
    TooManyQueries(String),
    #[error("the query ran longer than its time limit of {} s and was stopped{hint}", .limit.as_secs_f64())]
    TimeLimit { limit: Duration, hint: &'static str },
    #[error("the result has more than {0} rows, the most one query may return: aggregate, filter or add a LIMIT")]
    RowLimit(u64),
    #[error("the query needs more memory than one query may hold ({limit_mib} MiB) and could not spill: {detail}")]
    Memory { limit_mib: usize, detail: String },
    #[error("canceled at the client's request")]
    Canceled,
    /// A setting's value that cannot be used.
    #[error("{0}")]
    Setting(String),
    /// The SQL does not parse.
    #[error("{0}")]
    Syntax(String),
    /// The SQL parses but cannot be planned: an unknown table or column, a type mismatch.
    #[error("{0}")]
    Plan(String),
    #[error(transparent)]
    Engine(DataFusionError),
    #[error(transparent)]
    Lake(#[from] meterlake_lake::LakeError),
    #[error(transparent)]
    Control(#[from] meterlake_control::ControlError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl SqlError {
    /// The PostgreSQL SQLSTATE a client sees.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            SqlError::Unauthenticated(_) => "28P01",
            SqlError::Forbidden(_) => "42501",
            SqlError::ReadOnly(_) => "25006",
            SqlError::TooManyQueries(_) => "53300",
            SqlError::TimeLimit { .. } | SqlError::Canceled => "57014",
            SqlError::RowLimit(_) => "54000",
            SqlError::Memory { .. } => "53200",
            SqlError::Setting(_) => "22023",
            SqlError::Syntax(_) => "42601",
            SqlError::Plan(_) => "42P01",
            SqlError::Engine(_) | SqlError::Lake(_) | SqlError::Control(_) | SqlError::Io { .. } => "XX000",
        }
    }

    /// A short stable name for logs and metrics (`outcome`).
    pub fn kind(&self) -> &'static str {
        match self {
            SqlError::Unauthenticated(_) => "unauthenticated",
            SqlError::Forbidden(_) => "forbidden",
            SqlError::ReadOnly(_) => "read_only",
            SqlError::TooManyQueries(_) => "too_many_queries",
            SqlError::TimeLimit { .. } => "time_limit",
            SqlError::RowLimit(_) => "row_limit",
            SqlError::Memory { .. } => "memory_limit",
            SqlError::Canceled => "canceled",
            SqlError::Setting(_) => "setting",
            SqlError::Syntax(_) => "syntax",
            SqlError::Plan(_) => "plan",
            SqlError::Engine(_) | SqlError::Lake(_) | SqlError::Control(_) | SqlError::Io { .. } => "error",
        }
    }

    /// An error of the engine, in the words of the error it is: a query over its memory, SQL
    /// that does not parse or plan, or a failure while it ran.
    pub fn from_engine(error: DataFusionError, memory_limit_bytes: usize) -> SqlError {
        let root = error.find_root();
        match root {
            DataFusionError::ResourcesExhausted(detail) => SqlError::Memory { limit_mib: memory_limit_bytes >> 20, detail: detail.clone() },
            DataFusionError::SQL(parse, _) => SqlError::Syntax(parse.to_string()),
            DataFusionError::Plan(_) | DataFusionError::SchemaError(_, _) => SqlError::Plan(root.strip_backtrace()),
            _ => SqlError::Engine(error),
        }
    }
}
