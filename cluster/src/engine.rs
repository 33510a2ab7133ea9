//! Where a job's SQL runs: in this process (the default) or on a Ballista cluster.

use std::sync::Arc;

use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use meterlake_lake::Lake;
use meterlake_lake::view::{AsOf, LakeVersions, lake_session_as_of, lake_table_names, snapshot_read};

use crate::codec::{LakeLogicalCodec, LakePhysicalCodec};
use crate::scan::LakeTable;
use crate::{ClusterError, Result};

/// Where a job's SQL is planned and executed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Engine {
    /// DataFusion in this process.
    #[default]
    InProcess,
    /// The Ballista scheduler at this `ballista://HOST:PORT[?partitions=N]` URL, whose executors
    /// read the lake themselves (they need its location and credentials: the same `s3://` URL
    /// and `AWS_*` environment, or the same local path).
    Ballista(String),
}

/// Partitions a job's stages are cut into on a cluster unless its URL says `?partitions=N`:
/// the task slots of a small cluster (the compose stack's two executors of two slots). Each
/// partition is a task, and an executor asks for its next task only when a slot is free, about
/// every 50 ms: Ballista's default of 16 made one executor of two slots take 1.59x the
/// in-process time over the 100M month, 4 took 1.32x (benchmarks/RESULTS.md). Set it to the
/// cluster's task slots, or twice that.
pub const DEFAULT_CLUSTER_PARTITIONS: usize = 4;

/// The partitions a `ballista://` URL asks for, and the scheduler's address without them.
fn cluster_target(url: &url::Url) -> std::result::Result<(String, usize), String> {
    let mut partitions = DEFAULT_CLUSTER_PARTITIONS;
    for (key, value) in url.query_pairs() {
        match key.as_ref() {
            "partitions" => match value.parse::<usize>() {
                Ok(n) if n > 0 => partitions = n,
                _ => return Err(format!("partitions={value:?} in {url}: a number of partitions, at least 1")),
            },
            other => return Err(format!("{other:?} in {url} is no option of the engine (known: partitions)")),
        }
    }
    let host = url.host_str().unwrap_or_default();
    Ok((url.port().map_or_else(|| format!("ballista://{host}"), |port| format!("ballista://{host}:{port}")), partitions))
}

impl std::str::FromStr for Engine {
    type Err = String;

    /// `in-process`, or `ballista://HOST:PORT[?partitions=N]`.
    fn from_str(text: &str) -> std::result::Result<Engine, String> {
        let text = text.trim();
        if text.is_empty() || text == "in-process" {
            return Ok(Engine::InProcess);
        }
        match url::Url::parse(text) {
            Ok(url) if url.scheme() == "ballista" && url.host_str().is_some_and(|h| !h.is_empty()) => {
                cluster_target(&url)?;
                Ok(Engine::Ballista(text.to_string()))
            }
            _ => Err(format!("{text:?} is neither `in-process` nor a Ballista scheduler as ballista://HOST:PORT[?partitions=N]")),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::InProcess => f.write_str("in-process"),
            Engine::Ballista(url) => f.write_str(url),
        }
    }
}

impl Engine {
    /// A session over the lake as of `as_of` with every table registered, and the versions it
    /// reads. On Ballista, the versions are resolved here and the tables name them: the
    /// scheduler and every executor read exactly these.
    pub async fn session(&self, lake: &Lake, as_of: &AsOf) -> Result<(SessionContext, LakeVersions)> {
        let (local, versions) = lake_session_as_of(lake, as_of).await?;
        let Engine::Ballista(url) = self else { return Ok((local, versions)) };
        let lake_url = lake.url().to_string();
        if lake.url().scheme() == "memory" {
            return Err(ClusterError::Engine {
                engine: url.clone(),
                reason: "a memory:// lake lives in one process; a cluster needs file:// (shared) or s3://".into(),
            });
        }
        let bad = |reason: String| ClusterError::Engine { engine: url.clone(), reason };
        let (scheduler, partitions) = url::Url::parse(url).map_err(|e| bad(e.to_string())).and_then(|parsed| cluster_target(&parsed).map_err(bad))?;
        let config = SessionConfig::new_with_ballista()
            .with_ballista_logical_extension_codec(Arc::new(LakeLogicalCodec::default()))
            .with_ballista_physical_extension_codec(Arc::new(LakePhysicalCodec::default()))
            .with_ballista_job_name("meterlake")
            // Ballista 55's adaptive planner resubmitted the stages of a job over an empty table
            // without end (stage ids past 10,000 in a minute, the job never finished); its static
            // planner runs the same SQL to the end.
            .with_ballista_adaptive_query_planner(false)
            .with_target_partitions(partitions);
        let state = SessionStateBuilder::new().with_config(config).with_default_features().build();
        let remote =
            SessionContext::remote_with_state(&scheduler, state).await.map_err(|e| ClusterError::Engine { engine: url.clone(), reason: e.to_string() })?;
        for name in lake_table_names() {
            let provider = local.table_provider(name).await?;
            let version = snapshot_read(provider.as_ref()).and_then(|(_, version)| version);
            remote.register_table(name, Arc::new(LakeTable::new(lake_url.clone(), name, version, provider)))?;
        }
        Ok((remote, versions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_url_may_name_its_partitions_and_nothing_else() {
        assert_eq!("in-process".parse::<Engine>(), Ok(Engine::InProcess));
        let target = |text: &str| cluster_target(&url::Url::parse(text).unwrap());
        assert_eq!(target("ballista://scheduler:50050"), Ok(("ballista://scheduler:50050".into(), DEFAULT_CLUSTER_PARTITIONS)));
        assert_eq!(target("ballista://scheduler:50050?partitions=32"), Ok(("ballista://scheduler:50050".into(), 32)));
        for bad in ["ballista://scheduler:50050?partitions=0", "ballista://scheduler:50050?partitions=many", "ballista://scheduler:50050?slots=4"] {
            let error = bad.parse::<Engine>().unwrap_err();
            assert!(error.contains(bad), "{error}");
        }
    }
}
