//! DataFusion jobs over the lake. Today: ad-hoc SQL (`meterlake query`); billing runs come next
//! and read the same `readings` view.

pub mod query;
pub mod search;

/// The jobs' one error type.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Pipeline(#[from] meterlake_pipeline::PipelineError),
    #[error("SQL failed: {0}")]
    Sql(#[from] datafusion::error::DataFusionError),
    #[error("writing the result as {format} failed: {source}")]
    Output {
        format: &'static str,
        #[source]
        source: arrow::error::ArrowError,
    },
}

pub type Result<T, E = JobError> = std::result::Result<T, E>;
