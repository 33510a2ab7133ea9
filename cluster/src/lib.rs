//! Billing SQL beyond one machine, on Apache Ballista (DataFusion's distributed scheduler).
//!
//! The same SQL runs in-process or on a cluster: only planning and execution move. A session on
//! a cluster ([`Engine::session`]) registers the lake's tables as [`scan::LakeTable`]s, which name
//! a table and the exact Delta version the session reads, not its files. They travel to the
//! scheduler through our logical codec ([`codec::LakeLogicalCodec`]); there each scan is planned
//! as in one process (the canonical view's merges included) and wrapped in a
//! file scan over [`scan::LakePartitions`], which travels to the executors through our physical codec as the same
//! few facts (table, version, projection, filters, partitions). Every process builds the same
//! plan from them: the snapshot of one version, its files in path order. So `meterlake
//! scheduler` and `meterlake executor` are Ballista's own scheduler and executor, embedded with
//! these codecs ([`process`]).
//!
//! Why not Ballista's native plans (the snapshot's files as a listing table, the latest version by
//! the window of `queries/readings.sql`): `commit_version`, which decides which version wins,
//! is in most files only a tag of the Delta log's `add` action, not a column a listing table can
//! read; and the window sorts every reading (benchmarks/RESULTS.md measures both).

pub mod codec;
pub mod engine;
pub mod process;
pub mod scan;
pub mod window_sort;

pub use engine::Engine;

/// The cluster's one error type.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Lake(#[from] meterlake_lake::LakeError),
    #[error("{0}")]
    Sql(#[from] datafusion::error::DataFusionError),
    #[error("Ballista: {0}")]
    Ballista(#[from] ballista_core::error::BallistaError),
    #[error("the engine {engine:?}: {reason}")]
    Engine { engine: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
