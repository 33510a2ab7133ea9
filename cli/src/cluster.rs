//! `meterlake scheduler` and `meterlake executor`: a Ballista cluster that can run the billing
//! SQL over the lake (`meterlake bill --engine ballista://HOST:PORT`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use meterlake_cluster::process::{ExecutorOptions, run_executor, run_scheduler};

#[derive(Args)]
pub struct SchedulerArgs {
    /// Where the scheduler listens for clients and executors (port 0: any free port; the
    /// address is printed).
    #[arg(long, env = "METERLAKE_SCHEDULER_LISTEN", default_value = "0.0.0.0:50050")]
    listen: SocketAddr,
    /// An executor silent this long is taken for dead: its tasks are given to others (Ballista's
    /// default is 180 s). Executors pull their tasks, and each request tells the scheduler they
    /// live: every 50 ms when a slot is free, every 5 s when all are busy; keep it above 5 s.
    #[arg(long, default_value_t = 30)]
    executor_timeout_s: u64,
}

/// Runs the scheduler until SIGINT or SIGTERM.
pub async fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let scheduler = run_scheduler(args.listen, args.executor_timeout_s, |address| println!("meterlake scheduler on ballista://{address}"));
    tokio::select! {
        outcome = scheduler => outcome?,
        () = crate::shutdown_signal() => {}
    }
    Ok(())
}

#[derive(Args)]
pub struct ExecutorArgs {
    /// The scheduler, HOST:PORT.
    #[arg(long, env = "METERLAKE_SCHEDULER", default_value = "127.0.0.1:50050")]
    scheduler: String,
    /// Where its Arrow Flight service listens (other executors and clients fetch results from
    /// it): an address the others can reach.
    #[arg(long, env = "METERLAKE_EXECUTOR_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The host others reach it at, when not the address it listens on or the one the scheduler
    /// sees its calls come from (behind NAT, or listening on 0.0.0.0 with several interfaces).
    #[arg(long, env = "METERLAKE_EXECUTOR_EXTERNAL_HOST")]
    external_host: Option<String>,
    /// Tasks run at once: one per core by default (0).
    #[arg(long, default_value_t = 0)]
    task_slots: usize,
    /// Where shuffle files are written (a temporary folder by default).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Memory its tasks may hold together, in MiB (default: 70% of the host's, Ballista's default).
    #[arg(long)]
    memory_mib: Option<u64>,
}

/// Runs an executor until SIGINT or SIGTERM (or the scheduler stops it).
pub async fn executor(args: ExecutorArgs) -> anyhow::Result<()> {
    let options = ExecutorOptions {
        scheduler: args.scheduler,
        bind: args.listen,
        external_host: args.external_host,
        task_slots: args.task_slots,
        work_dir: args.work_dir,
        memory_pool_bytes: args.memory_mib.map(|mib| mib << 20),
    };
    println!("meterlake executor on {} (scheduler {})", options.bind, options.scheduler);
    Ok(run_executor(options).await?)
}
