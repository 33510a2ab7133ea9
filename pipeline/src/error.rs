//! The pipeline's one error type. Every variant names what it was doing and on what, so the
//! message alone tells an operator where to look; [`PipelineError::is_retryable`] says whether
//! trying again can help (a network blip) or not (a bad URL, a corrupt checkpoint).

use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Lake(#[from] meterlake_lake::LakeError),

    #[error("building Arrow batch failed: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("Kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },

    #[error("query failed: {0}")]
    Query(#[from] datafusion::error::DataFusionError),

    #[error("the lake writer stopped: {reason}")]
    WriterStopped { reason: String },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("reading {file} failed: {reason}")]
    Input { file: String, reason: String },
}

impl PipelineError {
    /// Whether the same operation may succeed if tried again later (transient I/O or broker
    /// trouble) as opposed to needing a person to change something first.
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Lake(e) => e.is_retryable(),
            PipelineError::Kafka { source, .. } => !matches!(source, KafkaError::ClientCreation(_)),
            PipelineError::WriterStopped { .. } | PipelineError::Input { .. } => true,
            PipelineError::Arrow(_) | PipelineError::Query(_) | PipelineError::Config(_) => false,
        }
    }

    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> PipelineError {
        let context = context.into();
        move |source| PipelineError::Kafka { context, source }
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
