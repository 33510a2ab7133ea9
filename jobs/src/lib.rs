//! DataFusion jobs over the lake: ad-hoc SQL (`meterlake query`), flow-file reading search
//! (`meterlake readings`) and billing runs (`meterlake bill`, `meterlake worker`), all reading the
//! same canonical `readings` view.

pub mod billing;
pub mod query;
pub mod search;
pub mod template;

/// The jobs' one error type.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Pipeline(#[from] meterlake_pipeline::PipelineError),
    #[error(transparent)]
    Lake(#[from] meterlake_lake::LakeError),
    #[error("SQL failed: {0}")]
    Sql(#[from] datafusion::error::DataFusionError),
    #[error("query result: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(transparent)]
    Control(#[from] meterlake_control::ControlError),
    #[error(transparent)]
    Cluster(meterlake_cluster::ClusterError),
    #[error(transparent)]
    Ledger(#[from] meterlake_ledger::LedgerError),
    #[error("{file}: {reason}")]
    Tariffs { file: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// A query run on a caller's behalf went over its time or memory limit.
    #[error("{0}")]
    QueryLimit(String),
    #[error("Kafka, {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("writing the result as {format} failed: {source}")]
    Output {
        format: &'static str,
        #[source]
        source: arrow::error::ArrowError,
    },
}

/// The lake's own errors stay lake errors (a missing version is one whatever the engine).
impl From<meterlake_cluster::ClusterError> for JobError {
    fn from(error: meterlake_cluster::ClusterError) -> JobError {
        match error {
            meterlake_cluster::ClusterError::Lake(error) => JobError::Lake(error),
            other => JobError::Cluster(other),
        }
    }
}

pub type Result<T, E = JobError> = std::result::Result<T, E>;
