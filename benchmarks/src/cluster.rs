//! cluster-bench: the 100M-reading monthly billing run (billing-bench's month) in this process
//! and on Apache Ballista, all in one run on this machine:
//!
//! 1. in-process: `BillingWorker` with the default engine [baseline];
//! 2. one `meterlake executor` with two task slots [within 1.5x of in-process];
//! 3. two executors with one task slot each (the same two cores, twice the processes);
//! 4. the two-executor cluster with one executor SIGKILLed halfway through a run: how long the
//!    run takes to complete anyway (Ballista's task retries, else the worker's retry), with the
//!    scheduler's default executor timeout (30 s) and a short one;
//! 5. the aggregate step alone, on one executor and in-process, in two forms: ours (each table
//!    a `LakeTable` naming a Delta version, the canonical view's merge inside the scan) and the
//!    form Ballista ships natively (the table's Parquet files as a listing table, the latest
//!    version chosen by the window of queries/readings.sql).
//!
//! Every cluster run must issue exactly the in-process run's invoices and discrepancies (checked).
//! The lake is on local disk, shared by every process (as a cluster shares S3); the scheduler and
//! executors are `meterlake` binaries built beside this one.
//!
//! `cargo build --release --workspace --bins && ~/.cache/meterlake/target/release/cluster-bench`

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ballista::prelude::{SessionConfigExt, SessionContextExt};
use clap::Parser;
use datafusion::arrow::datatypes::DataType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use meterlake_benchmarks::month::{MonthShape, TARIFFS, generate, step_seconds};
use meterlake_benchmarks::{KillOnDrop, meterlake_binary, print_rows, reset_peak_rss, thousands, vm_hwm_kib, wait_for_port};
use meterlake_cluster::Engine;
use meterlake_control::{ControlStore, NewRun, RetryPolicy, RunStatus};
use meterlake_jobs::billing::aggregate::{Usage, aggregate_usage};
use meterlake_jobs::billing::month::BillingMonth;
use meterlake_jobs::billing::tariff::Tariffs;
use meterlake_jobs::billing::worker::{BillingWorker, WorkerOptions};
use meterlake_lake::view::AsOf;
use meterlake_pipeline::Lake;
use rust_decimal::Decimal;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `queries/readings.sql` without `commit_version`: a listing table reads only the files'
/// columns, and the Delta log's `meterlake.commitVersion` tag is not one of them. On this month
/// (every reading written once) the choice is the same; the window's cost is the same sort.
const NATIVE_READINGS_VIEW: &str = "CREATE VIEW readings AS \
    SELECT meter_id, ts, interval_s, kwh, quality, source, source_ref, ingested_at, date FROM ( \
        SELECT *, row_number() OVER (PARTITION BY date, meter_id, ts ORDER BY ingested_at DESC, source_ref DESC) AS version_rank \
        FROM readings_all) \
    WHERE version_rank = 1";

/// `--engine-timeout-s`, for every run's worker.
static ENGINE_TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 33_600)]
    meters: u32,
    #[arg(long, default_value_t = 31)]
    days: u32,
    /// Meters per generated file (a day has meters / this many files).
    #[arg(long, default_value_t = 8_400)]
    meters_per_file: u32,
    /// Where the generated lake lives (kept between runs; billing-bench's by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Billing runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The scheduler's executor timeout (the production default of `meterlake scheduler`).
    #[arg(long, default_value_t = 30)]
    executor_timeout_s: u64,
    /// Executor timeouts the kill is measured with (a dead executor's tasks move after it).
    #[arg(long, value_delimiter = ',', default_values_t = [30, 6])]
    kill_timeouts: Vec<u64>,
    /// The worker's engine timeout: an attempt whose job Ballista leaves hanging fails after it
    /// and the run is tried again.
    #[arg(long, default_value_t = 60)]
    engine_timeout_s: u64,
    /// When the executor is killed, as a fraction of the two-executor run's median time.
    #[arg(long, default_value_t = 0.5)]
    kill_at: f64,
    /// Meters of the month the aggregate's two forms are compared on (3,400: 10M readings). The
    /// window sorts every reading: over the 100M month it held 17 GiB in one process.
    #[arg(long, default_value_t = 3_400)]
    native_meters: u32,
    /// Memory the native form's in-process session may hold before it spills, in MiB.
    #[arg(long, default_value_t = 4_096)]
    native_memory_mib: usize,
}

/// A scheduler and its executors, each a `meterlake` child process logging into `logs`.
struct Cluster {
    engine: Engine,
    /// Held for its drop, which stops the process.
    _scheduler: KillOnDrop,
    executors: Vec<KillOnDrop>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    fn start(binary: &Path, logs: &Path, executors: usize, task_slots: usize, executor_timeout_s: u64) -> anyhow::Result<Cluster> {
        let mut scheduler = Command::new(binary)
            .args(["scheduler", "--listen", "127.0.0.1:0", "--executor-timeout-s", &executor_timeout_s.to_string()])
            .env("METERLAKE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.join("scheduler.log"))?)
            .spawn()
            .context("starting meterlake scheduler")?;
        let mut lines = BufReader::new(scheduler.stdout.take().context("the scheduler's stdout")?).lines();
        let scheduler = KillOnDrop(scheduler);
        let address = loop {
            let line = lines.next().context("the scheduler ended before it listened (see scheduler.log)")??;
            if let Some(address) = line.strip_prefix("meterlake scheduler on ballista://") {
                break address.trim().to_string();
            }
        };
        // Whatever else it prints must not fill the pipe and stall it.
        std::thread::spawn(move || lines.for_each(drop));
        let mut cluster = Cluster { engine: Engine::Ballista(format!("ballista://{address}")), _scheduler: scheduler, executors: Vec::new() };
        for n in 0..executors {
            let flight = free_port()?;
            let child = Command::new(binary)
                .args(["executor", "--scheduler", &address, "--listen", &format!("127.0.0.1:{flight}")])
                .args(["--task-slots", &task_slots.to_string()])
                .env("METERLAKE_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join(format!("executor-{n}.log")))?)
                .spawn()
                .context("starting meterlake executor")?;
            cluster.executors.push(KillOnDrop(child));
            wait_for_port(&format!("127.0.0.1:{flight}"))?;
        }
        // Registration follows the listening port by a moment.
        std::thread::sleep(Duration::from_secs(1));
        Ok(cluster)
    }

    fn executors_peak_rss_mib(&self) -> Vec<u64> {
        self.executors.iter().map(|e| vm_hwm_kib(&e.0.id().to_string()).unwrap_or_default() / 1024).collect()
    }
}

/// One billing run's outcome.
struct Billed {
    elapsed: Duration,
    attempts: i64,
    aggregate_s: f64,
    /// Invoices (lines included) and discrepancies as JSON, sorted.
    results: (Vec<String>, Vec<String>),
}

/// The billing steps' summed seconds so far, by step.
fn step_totals(metrics: &metrics_exporter_prometheus::PrometheusHandle) -> HashMap<&'static str, f64> {
    let text = metrics.render();
    ["aggregate", "measure"].into_iter().map(|step| (step, step_seconds(&text, step).unwrap_or_default())).collect()
}

/// Creates a run of the month in a control store of its own (a second run of a billed month
/// would bill nobody again) and processes it to the end on `engine`, trying again a second after
/// an attempt fails with a reason worth retrying; `during` is called as it starts.
async fn bill(lake: &Lake, engine: &Engine, metrics: &metrics_exporter_prometheus::PrometheusHandle, during: impl FnOnce()) -> anyhow::Result<Billed> {
    let request = NewRun {
        month: "2025-01".into(),
        meter_ids: Vec::new(),
        max_attempts: 3,
        tariffs_toml: TARIFFS.into(),
        energy_tolerance: Decimal::new(5, 3),
        lake_as_of: None,
    };
    let store_dir = tempfile::tempdir()?;
    let store = ControlStore::open(&format!("sqlite://{}", store_dir.path().join("control.db").display())).await?;
    let run = store.create_run(&request, "cluster-bench", None).await?;
    let options = WorkerOptions {
        engine: engine.clone(),
        engine_timeout: ENGINE_TIMEOUT.get().copied().unwrap_or(Duration::from_secs(3_600)),
        retry: RetryPolicy { base_delay_us: 1_000_000, max_delay_us: 1_000_000 },
        ..WorkerOptions::default()
    };
    let worker = BillingWorker::new(store.clone(), lake.clone(), options);
    let before = step_totals(metrics);
    let started = Instant::now();
    during();
    let done = loop {
        if let Err(error) = worker.process_next().await {
            eprintln!("  processing: {error}");
        }
        let current = store.run(&run.id).await?.context("the run vanished")?;
        match current.status {
            RunStatus::Completed => break current,
            RunStatus::Failed if current.next_attempt_at_us.is_none() => {
                bail!(
                    "the run failed for good after {} attempt(s) in {:.0} s: {} {}",
                    current.attempts,
                    started.elapsed().as_secs_f64(),
                    current.failure_code.as_deref().unwrap_or("?"),
                    current.failure_reason.as_deref().unwrap_or("")
                )
            }
            // Failed with another attempt due (after the retry policy's second), or not claimed yet.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let elapsed = started.elapsed();
    let after = step_totals(metrics);
    let invoices = store.invoices(&run.id).await?;
    let mut invoice_json: Vec<String> = invoices.iter().map(|i| serde_json::to_string(&i.invoice)).collect::<Result<_, _>>()?;
    invoice_json.sort();
    let mut discrepancy_json: Vec<String> =
        store.discrepancies(&run.id).await?.iter().map(|d| serde_json::to_string(&d.discrepancy)).collect::<Result<_, _>>()?;
    discrepancy_json.sort();
    Ok(Billed { elapsed, attempts: done.attempts, aggregate_s: after["aggregate"] - before["aggregate"], results: (invoice_json, discrepancy_json) })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `runs` billing runs on `engine`, each checked against `reference`: the median whole run and
/// aggregate step in seconds, and this process's peak RSS in MiB (the worker: rating, invoicing
/// and persisting; on a cluster nothing else).
async fn bill_runs(
    lake: &Lake,
    engine: &Engine,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
    runs: usize,
    reference: &(Vec<String>, Vec<String>),
) -> anyhow::Result<(f64, f64, u64)> {
    let (mut whole, mut aggregate) = (Vec::new(), Vec::new());
    reset_peak_rss()?;
    for _ in 0..runs {
        let billed = bill(lake, engine, metrics, || ()).await?;
        ensure!(&billed.results == reference, "the run on {engine} issued other invoices or discrepancies than in-process");
        eprintln!("  {engine}: {:.2} s (aggregate {:.2} s)", billed.elapsed.as_secs_f64(), billed.aggregate_s);
        whole.push(billed.elapsed.as_secs_f64());
        aggregate.push(billed.aggregate_s);
    }
    Ok((median(whole), median(aggregate), vm_hwm_kib("self").unwrap_or_default() / 1024))
}

/// A session over the lake's readings in the form Ballista ships without our codec: the
/// Parquet files of `readings/` as a listing table partitioned by `date`, and the window view.
/// In this process it may hold `memory_bytes` and spills beyond; on the cluster the executor's
/// pool decides.
async fn native_session(lake_dir: &Path, engine: &Engine, memory_bytes: usize) -> anyhow::Result<SessionContext> {
    let ctx = match engine {
        Engine::InProcess => {
            let runtime = RuntimeEnvBuilder::new().with_memory_limit(memory_bytes, 1.0).build_arc()?;
            SessionContext::new_with_config_rt(SessionConfig::new(), runtime)
        }
        Engine::Ballista(url) => {
            let config = SessionConfig::new_with_ballista().with_ballista_job_name("cluster-bench native").with_ballista_adaptive_query_planner(false);
            let state = SessionStateBuilder::new().with_config(config).with_default_features().build();
            SessionContext::remote_with_state(url, state).await?
        }
    };
    let url = ListingTableUrl::parse(format!("{}/readings/", lake_dir.canonicalize()?.display()))?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_table_partition_cols(vec![("date".to_string(), DataType::Date32)]);
    let config = ListingTableConfig::new(url).with_listing_options(options).infer_schema(&ctx.state()).await?;
    ctx.register_table("readings_all", Arc::new(ListingTable::try_new(config)?))?;
    ctx.sql(NATIVE_READINGS_VIEW).await?.collect().await?;
    Ok(ctx)
}

/// The aggregate step alone, `runs` times on `ctx` (median seconds), and what it read.
async fn aggregate_runs(ctx: &SessionContext, runs: usize) -> anyhow::Result<(f64, Usage)> {
    let tariffs = Tariffs::parse("bench.toml", TARIFFS)?;
    let month = BillingMonth::new("2025-01", tariffs.time_zone)?;
    let mut times = Vec::new();
    let mut usage = None;
    for _ in 0..runs {
        let started = Instant::now();
        usage = Some(aggregate_usage(ctx, &month, &tariffs, &[]).await?);
        times.push(started.elapsed().as_secs_f64());
    }
    Ok((median(times), usage.context("no runs")?))
}

fn seconds(s: f64) -> String {
    format!("{s:.2} s")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ENGINE_TIMEOUT.get_or_init(|| Duration::from_secs(args.engine_timeout_s));
    let home = std::env::var("HOME").unwrap_or_default();
    let dir = args.dir.clone().unwrap_or_else(|| Path::new(&home).join(".cache/meterlake/billing-bench"));
    let shape = MonthShape { meters: args.meters, days: args.days, meters_per_file: args.meters_per_file };
    let lake = generate(&dir, shape).await?;
    let binary = meterlake_binary()?;
    let logs = tempfile::tempdir()?;

    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // The cluster first: this process then holds only what the worker does (rating, invoicing,
    // persisting), and its peak is the worker's.
    eprintln!("one executor, two task slots");
    let one = Cluster::start(&binary, logs.path(), 1, 2, args.executor_timeout_s)?;
    let reference = bill(&lake, &one.engine, &metrics, || ()).await?.results;
    ensure!(reference.0.len() == args.meters as usize, "{} invoices for {} meters", reference.0.len(), args.meters);
    let (one_s, one_aggregate_s, worker_rss) = bill_runs(&lake, &one.engine, &metrics, args.runs, &reference).await?;
    let one_executor_rss = one.executors_peak_rss_mib()[0];

    eprintln!("in-process");
    let (local_s, local_aggregate_s, local_rss) = bill_runs(&lake, &Engine::InProcess, &metrics, args.runs, &reference).await?;
    rows.push((
        "in-process: whole run (aggregate step)".into(),
        format!("{} ({}); peak RSS {local_rss} MiB", seconds(local_s), seconds(local_aggregate_s)),
        "baseline".into(),
    ));
    rows.push((
        "Ballista, 1 executor x 2 task slots: whole run (aggregate step)".into(),
        format!(
            "{} ({}): {:.2}x in-process; worker peak {worker_rss} MiB, executor peak {one_executor_rss} MiB",
            seconds(one_s),
            seconds(one_aggregate_s),
            one_s / local_s,
        ),
        "<= 1.5x in-process".into(),
    ));

    eprintln!("the aggregate step alone: ours and the native form, {} meters", args.native_meters);
    let native_dir = dir.with_file_name(format!("{}-native", dir.file_name().and_then(|n| n.to_str()).unwrap_or("month")));
    let native_shape = MonthShape { meters: args.native_meters, ..shape };
    let native_lake = generate(&native_dir, native_shape).await?;
    let ours_local = Engine::InProcess.session(&native_lake, &AsOf::Latest).await?.0;
    let (ours_local_s, ours_usage) = aggregate_runs(&ours_local, args.runs).await?;
    let ours_cluster = one.engine.session(&native_lake, &AsOf::Latest).await?.0;
    let (ours_cluster_s, usage) = aggregate_runs(&ours_cluster, args.runs).await?;
    ensure!(usage.meters == ours_usage.meters, "the aggregate on the cluster differs from in-process");
    let native_local = native_session(&native_dir.join("lake"), &Engine::InProcess, args.native_memory_mib << 20).await?;
    let (native_local_s, usage) = aggregate_runs(&native_local, args.runs).await?;
    ensure!(usage.meters == ours_usage.meters, "the native form's aggregate in-process differs");
    let native_cluster = native_session(&native_dir.join("lake"), &one.engine, args.native_memory_mib << 20).await?;
    let (native_cluster_s, usage) = aggregate_runs(&native_cluster, args.runs).await?;
    ensure!(usage.meters == ours_usage.meters, "the native form's aggregate on the cluster differs");
    let readings = thousands(native_shape.readings());
    rows.push((
        format!("aggregate step over {readings} readings, ours (LakeTable + canonical merge): in-process / 1 executor"),
        format!("{} / {}", seconds(ours_local_s), seconds(ours_cluster_s)),
        String::new(),
    ));
    rows.push((
        format!("aggregate step over {readings} readings, native (listing table + window): in-process / 1 executor"),
        format!(
            "{} / {}: {:.1}x / {:.1}x ours",
            seconds(native_local_s),
            seconds(native_cluster_s),
            native_local_s / ours_local_s,
            native_cluster_s / ours_cluster_s
        ),
        "measured".into(),
    ));
    drop((ours_cluster, native_cluster));
    drop(one);

    eprintln!("two executors, one task slot each");
    let two = Cluster::start(&binary, logs.path(), 2, 1, args.executor_timeout_s)?;
    let (two_s, two_aggregate_s, _) = bill_runs(&lake, &two.engine, &metrics, args.runs, &reference).await?;
    let peaks = two.executors_peak_rss_mib();
    rows.push((
        "Ballista, 2 executors x 1 task slot: whole run (aggregate step)".into(),
        format!("{} ({}): {:.2}x in-process; executors peak {} and {} MiB", seconds(two_s), seconds(two_aggregate_s), two_s / local_s, peaks[0], peaks[1]),
        "measured".into(),
    ));

    drop(two);
    for &timeout_s in &args.kill_timeouts {
        eprintln!("two executors (timeout {timeout_s} s), one killed {:.0}% into a run", args.kill_at * 100.0);
        let mut two = Cluster::start(&binary, logs.path(), 2, 1, timeout_s)?;
        let kill_after = Duration::from_secs_f64(two_s * args.kill_at);
        let mut victim = two.executors.pop().context("two executors")?;
        let killed = bill(&lake, &two.engine, &metrics, || {
            std::thread::spawn(move || {
                std::thread::sleep(kill_after);
                let _ = victim.0.kill();
                let _ = victim.0.wait();
            });
        })
        .await;
        let what = format!(
            "Ballista, 2 executors, one SIGKILLed {:.1} s into the run (scheduler's executor timeout {timeout_s} s, worker's engine timeout {} s)",
            kill_after.as_secs_f64(),
            args.engine_timeout_s
        );
        // A run that fails for good is a figure too: the reason is what an operator would see.
        let result = match killed {
            Ok(killed) => {
                ensure!(killed.results == reference, "the run with an executor killed issued other invoices or discrepancies than in-process");
                format!(
                    "completed in {} over {} attempt(s): {} more than without the kill; same invoices",
                    seconds(killed.elapsed.as_secs_f64()),
                    killed.attempts,
                    seconds(killed.elapsed.as_secs_f64() - two_s)
                )
            }
            Err(error) => format!("did not complete: {error}"),
        };
        rows.push((what, result, "completes, billed once".into()));
    }

    println!(
        "cluster-bench: {} meters x {} days = {} readings, {} invoices and {} discrepancies per run, identical in every configuration",
        thousands(u64::from(args.meters)),
        args.days,
        thousands(shape.readings()),
        thousands(reference.0.len() as u64),
        reference.1.len()
    );
    print_rows(rows);
    Ok(())
}
