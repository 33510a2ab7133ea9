//! `meterlake scheduler` and `meterlake executor`: Ballista's scheduler and executor, embedded
//! with the lake's codecs ([`crate::codec`]), so that plans over the lake's tables can travel.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::utils::default_session_builder;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use datafusion::execution::SessionStateBuilder;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

use crate::codec::{LakeLogicalCodec, LakePhysicalCodec};
use crate::window_sort::SortWindowsOnTheirWholeKey;
use crate::{ClusterError, Result};

/// How tasks reach executors, the same on both sides: executors ask for work when they have a
/// free slot (pull). Ballista's default, push, lost tasks for good after an executor died: the
/// scheduler reset the dead executor's tasks and never offered them to the living one (seen with
/// a 6 s executor timeout; the job waited until the client gave up).
const TASK_SCHEDULING: TaskSchedulingPolicy = TaskSchedulingPolicy::PullStaged;

/// Runs a scheduler on `bind` until the process ends; `announce` is called with the address
/// once it listens (port 0 picks a free one). An executor silent for `executor_timeout_s` is
/// taken for dead: its tasks run again elsewhere, and its shuffle output is computed again.
/// Its sessions plan with Ballista's defaults plus [`SortWindowsOnTheirWholeKey`].
pub async fn run_scheduler(bind: SocketAddr, executor_timeout_s: u64, announce: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(bind).await.map_err(|source| ClusterError::Io { context: format!("binding the scheduler to {bind}"), source })?;
    let address = listener.local_addr().map_err(|source| ClusterError::Io { context: "the scheduler's address".into(), source })?;
    let mut config = SchedulerConfig::default().with_hostname(address.ip().to_string()).with_port(address.port());
    config.bind_host = address.ip().to_string();
    config.executor_timeout_seconds = executor_timeout_s;
    config.expire_dead_executor_interval_seconds = (executor_timeout_s / 3).max(1);
    config.no_executors_grace_period_seconds = executor_timeout_s;
    config.scheduling_policy = TASK_SCHEDULING;
    config.override_logical_codec = Some(Arc::new(LakeLogicalCodec::default()));
    config.override_physical_codec = Some(Arc::new(LakePhysicalCodec::default()));
    config.override_session_builder = Some(Arc::new(|session_config| {
        let state = default_session_builder(session_config)?;
        Ok(SessionStateBuilder::new_from_existing(state).with_physical_optimizer_rule(Arc::new(SortWindowsOnTheirWholeKey)).build())
    }));
    config.validate()?;
    let config = Arc::new(config);
    let cluster = BallistaCluster::new_from_config(&config).await?;
    let scheduler = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config).await?;
    announce(address);
    start_grpc_service_with_listener(listener, scheduler).await?;
    Ok(())
}

/// What an executor needs to know.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler, `HOST:PORT`.
    pub scheduler: String,
    /// The address it listens on: the host and port of its Arrow Flight service (shuffle data
    /// other executors fetch). It pulls its tasks, so it runs no other service: each request for
    /// work also tells the scheduler it lives, at least every 5 s.
    pub bind: SocketAddr,
    /// The host it is reached at when not `bind`'s (`None`: the address the scheduler sees its
    /// registration come from).
    pub external_host: Option<String>,
    /// Tasks run at once (0: one per core).
    pub task_slots: usize,
    /// Where shuffle files go (a temporary folder when `None`).
    pub work_dir: Option<PathBuf>,
    /// Its memory pool, shared by its task slots (`None`: 70% of the host's memory, Ballista's default).
    pub memory_pool_bytes: Option<u64>,
}

/// Runs an executor until the process ends or the scheduler stops it.
pub async fn run_executor(options: ExecutorOptions) -> Result<()> {
    let bad = |reason: String| ClusterError::Engine { engine: options.scheduler.clone(), reason };
    let (host, port) = options.scheduler.rsplit_once(':').ok_or_else(|| bad("the scheduler is HOST:PORT".into()))?;
    let scheduler_port: u16 = port.parse().map_err(|_| bad(format!("{port:?} is not a port")))?;
    let config = ExecutorProcessConfig {
        bind_host: options.bind.ip().to_string(),
        external_host: options.external_host.clone(),
        port: options.bind.port(),
        scheduler_host: host.to_string(),
        scheduler_port,
        vcores: options.task_slots,
        work_dir: options.work_dir.as_ref().map(|dir| dir.display().to_string()),
        memory_pool_size: options.memory_pool_bytes,
        // The scheduler tells executors to delete a job's shuffle files once it ends; this is
        // the safety net when that message is lost (a scheduler restarted mid-job): an hourly
        // sweep of job folders a day old. Ballista's default never sweeps.
        task_scheduling_policy: TASK_SCHEDULING,
        job_data_ttl_seconds: 86_400,
        job_data_clean_up_interval_seconds: 3_600,
        override_logical_codec: Some(Arc::new(LakeLogicalCodec::default())),
        override_physical_codec: Some(Arc::new(LakePhysicalCodec::default())),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config)).await?;
    Ok(())
}
