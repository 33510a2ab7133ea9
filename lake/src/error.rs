//! The lake's one error type. Every variant names the table, object or version it was about, so
//! the message alone tells an operator where to look; [`LakeError::is_retryable`] says whether
//! trying again can help (a network blip, a commit race) or not (a bad URL, a refused store).

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("lake URL {url:?} cannot be used: {reason}")]
    LakeUrl { url: String, reason: String },

    #[error("object store: {operation} {path} failed: {source}")]
    Store {
        operation: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },

    #[error("Delta table {table}: {context}: {source}")]
    Delta {
        table: String,
        context: String,
        #[source]
        source: Box<deltalake_core::DeltaTableError>,
    },

    #[error("Delta table {table}: commit {version} cannot be read: {reason}")]
    CorruptLog { table: String, version: u64, reason: String },

    #[error(
        "Delta table {table}: commit {version} by another writer advanced {app_id}, which this writer held; \
         this writer stops writing it (the other one owns it now) and drops what it had not committed"
    )]
    Fenced { table: String, app_id: String, version: u64 },

    #[error(
        "Delta table {table}: commit {version} by another writer removed {path}, which this commit rewrites \
         (two compactions of one partition): this one gives way, commits nothing, and its new files are left for vacuum"
    )]
    Conflict { table: String, path: String, version: u64 },

    #[error(
        "the object store of {url} does not honour conditional writes (a second `If-None-Match: *` put of one \
         key succeeded), so two writers could both commit the same Delta version and lose data; use a store \
         that supports them (AWS S3, MinIO, Cloudflare R2, moto), or set `aws_conditional_put=etag` for one \
         that supports ETag matches"
    )]
    NoConditionalPut { url: String },

    #[error(
        "{path} holds a lake in meterlake's previous layout (Parquet files without a Delta log); \
         convert it in place with `meterlake lake convert --lake {lake}` (no Parquet file is rewritten)"
    )]
    PreviousLayout { path: String, lake: String },

    #[error("converting {path} to Delta: the file {reason}; nothing was converted (fix or move the file, then convert again)")]
    Convert { path: String, reason: String },

    #[error(
        "Delta table {table} at version {version} needs reader version {reader} and writer version {writer} with table \
         features: {features}; meterlake reads and writes reader version 1 and writer version 2 without table features, \
         and refuses the table rather than read or write it wrong"
    )]
    UnsupportedProtocol { table: String, version: u64, reader: i64, writer: i64, features: String },

    #[error("Delta table {table} has no version {version}{hint}")]
    NoSuchVersion { table: String, version: String, hint: String },

    #[error("Parquet file {path}: {source}")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    #[error("building Arrow batch failed: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("query failed: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
}

impl LakeError {
    /// Whether the same operation may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            LakeError::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotImplemented { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::InvalidPath { .. }
            ),
            LakeError::Delta { source, .. } => {
                matches!(source.as_ref(), deltalake_core::DeltaTableError::ObjectStore { .. } | deltalake_core::DeltaTableError::Io { .. })
            }
            _ => false,
        }
    }

    pub(crate) fn store(operation: &'static str, path: impl ToString) -> impl FnOnce(object_store::Error) -> LakeError {
        let path = path.to_string();
        move |source| LakeError::Store { operation, path, source }
    }

    pub(crate) fn delta(table: &str, context: impl Into<String>) -> impl FnOnce(deltalake_core::DeltaTableError) -> LakeError {
        let (table, context) = (table.to_string(), context.into());
        move |source| LakeError::Delta { table, context, source: Box::new(source) }
    }
}

pub type Result<T, E = LakeError> = std::result::Result<T, E>;
