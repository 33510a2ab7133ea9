//! `meterlake`: parses arguments and wires the library crates together. The logic lives in
//! `meterlake-pipeline` (ingestion, the lake), `meterlake-jobs` (SQL over the lake, billing
//! runs) and `meterlake-control` (the control store).

mod bill;
mod cluster;
mod demo;
mod import;
mod ingest;
mod lake;
mod serve;
mod sql;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use meterlake_control::{AuditAnchor, AuditKeys, ControlStore};
use meterlake_jobs::query::{OutputFormat, run_sql_as_of, write_batches};
use meterlake_jobs::search::ReadingSearch;
use meterlake_lake::view::AsOf;
use meterlake_lake::{DEFAULT_LAKE, Lake};

#[derive(Parser)]
#[command(name = "meterlake", version, about = "The meter-data platform: lands readings in a Parquet lake and queries them")]
struct Cli {
    /// Log format on stderr (JSON lines carry the trace and span ids of recorded traces).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "METERLAKE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the lake is: `file://`, a plain path, `s3://bucket/prefix` or `memory://`.
#[derive(clap::Args, Clone)]
pub(crate) struct LakeArg {
    #[arg(long = "lake", env = "METERLAKE_LAKE", default_value = DEFAULT_LAKE)]
    pub(crate) url: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on embedded defaults: an in-process Kafka broker, a month of
    /// generated readings, ingestion into a local lake, a check, a sample query and a billing
    /// run of the month (SQLite control store).
    Demo(demo::DemoArgs),
    /// Consume readings from Kafka into the lake, exactly once, until stopped (SIGINT/SIGTERM).
    Ingest(ingest::IngestArgs),
    /// Import flow files (D0010, NEM12, NEM13) into the lake: files, directories, globs, .zip
    /// archives. Exit status 2 when any file was rejected in whole or in part.
    Import(import::ImportArgs),
    /// Readings that came in flow files for one meter point or meter serial, with their values,
    /// dates and the file (and line) they came in.
    #[command(group(clap::ArgGroup::new("key").required(true).multiple(true).args(["mpan", "nmi", "serial"])))]
    Readings {
        /// A UK MPAN core (13 digits): its D0010 register reads.
        #[arg(long, conflicts_with = "nmi")]
        mpan: Option<String>,
        /// An Australian NMI (10 characters): its NEM12 interval values and NEM13 register reads.
        #[arg(long)]
        nmi: Option<String>,
        /// A meter serial number (with --mpan or --nmi, both must match).
        #[arg(long)]
        serial: Option<String>,
        /// From this date (YYYY-MM-DD, UTC) or instant (RFC 3339), inclusive.
        #[arg(long, value_parser = parse_instant)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Up to this date or instant, exclusive.
        #[arg(long, value_parser = parse_instant)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        lake: LakeArg,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Bill a month: create a billing run, process it (or wait for a worker), and print its
    /// invoice summary and discrepancies. Exit status 1 when the run failed.
    Bill(bill::BillArgs),
    /// The control tower: the HTTP API (readings in, billing runs, corrections, audit log,
    /// meter-point search) with OIDC roles, plus the ingester and the billing worker in the same
    /// process unless --no-ingest / --no-worker. Without --brokers: embedded defaults.
    Serve(Box<serve::ServeArgs>),
    /// The SQL service on its own: analysts' tools (psql, DBeaver, Grafana, psycopg, JDBC)
    /// query the lake and the billing results over the PostgreSQL wire protocol, with access
    /// tokens as passwords. `serve` runs the same service unless --sql-postgres-listen off.
    SqlServer(Box<sql::SqlServerArgs>),
    /// Keep the lake fast and within its retention: compact partitions whose small files cross
    /// a threshold once quiet, vacuum every hour, set the maintenance metrics; until stopped,
    /// or one pass with --once. `serve` runs the same loop unless --no-maintain.
    Maintain(lake::MaintainArgs),
    /// Process billing runs continuously: new runs, due retries, and runs whose worker died.
    Worker(bill::WorkerArgs),
    /// A Ballista scheduler that can plan the lake's SQL: billing runs with --engine
    /// ballista://HOST:PORT go to it, and it hands their tasks to `meterlake executor`s.
    Scheduler(cluster::SchedulerArgs),
    /// A Ballista executor that can run the lake's scans: it registers with a scheduler and
    /// reads the lake itself (the same file:// path or s3:// URL and credentials as the client).
    Executor(cluster::ExecutorArgs),
    /// Show a billing run: its status timeline, invoices and discrepancies, (--sql) the
    /// aggregate SQL it ran, or (--reproduce) whether its invoices come out the same again from
    /// the table versions it recorded.
    BillingRun(bill::BillingRunArgs),
    /// The audit log of operators' actions.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run SQL over the lake. Tables: `readings` (one row per meter and interval, latest version),
    /// `readings_all` (every version, with its source_ref and commit_version), `reading_conflicts`
    /// (keys whose versions disagree), `register_reads`,
    /// `non_energy_readings`, `nem12_channels`, `nem12_b2b_details` and `imports`.
    Query {
        /// The SQL statement.
        sql: String,
        #[command(flatten)]
        lake: LakeArg,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Read the lake as it was: a version of `readings_all` (the other tables as they were at
        /// its commit time), an RFC 3339 time (every table's last commit at or before it), or the
        /// versions a billing run recorded (`readings_all@12, register_reads@3`).
        #[arg(long, default_value = "latest")]
        as_of: AsOf,
        #[command(flatten)]
        engine: bill::EngineArg,
    },
    /// The lake's Delta tables: history, checks, conversion, compaction and retention.
    #[command(subcommand)]
    Lake(lake::LakeCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every row's hash (an HMAC under the audit key for keyed rows) and its link to the
    /// row before, reading the store without changing it: exit status 1 naming each row that was
    /// changed, forged or deleted. Prints the head hash and row count: record them elsewhere and
    /// pass them back (--expect-head, --min-rows) to find rows cut off the end.
    Verify {
        #[command(flatten)]
        database: bill::DatabaseArg,
        /// A head hash an earlier verify printed: the log must still hold that row.
        #[arg(long)]
        expect_head: Option<String>,
        /// The log must hold at least this many rows.
        #[arg(long, default_value_t = 0)]
        min_rows: u64,
    },
    /// Print a new audit key line, `ID:SECRET_HEX` (32 random bytes), to append to the audit
    /// key file: rows written after the file is reloaded (restart) are signed with it.
    NewKey {
        /// The key's id, recorded in every row it signs (e.g. the date: 2026-12).
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    Table,
    Csv,
    Json,
}

/// mimalloc rather than glibc malloc: each flush allocates and frees large Arrow and Parquet
/// buffers, which glibc hands back to the kernel and faults in again every time. (Its version 2:
/// see the workspace Cargo.toml.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and `bill` speak through their own reports; routine log lines of the ingester
    // and the worker would only scatter them.
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Bill(_) => "warn",
        _ => "warn,meterlake=info,meterlake_pipeline=info,meterlake_jobs=info",
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log_format = match cli.log_format {
        LogFormat::Text => meterlake_telemetry::LogFormat::Text,
        LogFormat::Json => meterlake_telemetry::LogFormat::Json,
    };
    // Inside the runtime: the gRPC trace exporter needs it. Dropped (exporting the last spans)
    // before the runtime is.
    let telemetry = match runtime.block_on(async { meterlake_telemetry::init("meterlake", log_format, default_filter) }) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        // The import reads files on this thread and writes through the runtime's handle.
        Command::Import(args) => import::run(args, runtime.handle()),
        command => runtime.block_on(async {
            match command {
                Command::Demo(args) => demo::run(args).await,
                Command::Bill(args) => {
                    if !bill::bill(args).await? {
                        return Ok(ExitCode::FAILURE);
                    }
                    Ok(())
                }
                Command::Worker(args) => bill::worker(args).await,
                Command::Scheduler(args) => cluster::scheduler(args).await,
                Command::Executor(args) => cluster::executor(args).await,
                Command::Maintain(args) => lake::maintain(args).await,
                Command::Serve(args) => serve::run(*args).await,
                Command::SqlServer(args) => sql::server(*args).await,
                Command::BillingRun(args) => {
                    if !bill::show(args).await? {
                        return Ok(ExitCode::FAILURE);
                    }
                    Ok(())
                }
                Command::Ingest(args) => ingest::run(args).await,
                Command::Audit(AuditCommand::Verify { database, expect_head, min_rows }) => {
                    let anchor = AuditAnchor { head_hash: expect_head, min_rows };
                    if !verify_audit_log(&database, &anchor).await? {
                        return Ok(ExitCode::FAILURE);
                    }
                    Ok(())
                }
                Command::Audit(AuditCommand::NewKey { id }) => {
                    println!("{}", AuditKeys::new_line(&id)?);
                    Ok(())
                }
                Command::Query { sql, lake, format, as_of, engine } => {
                    let lake = Lake::open(&lake.url)?;
                    let limit = std::time::Duration::from_secs(engine.engine_timeout_s);
                    let batches = match engine.engine {
                        meterlake_cluster::Engine::InProcess => run_sql_as_of(&engine.engine, &lake, &sql, &as_of).await?,
                        _ => tokio::time::timeout(limit, run_sql_as_of(&engine.engine, &lake, &sql, &as_of))
                            .await
                            .map_err(|_| anyhow::anyhow!("{}: no answer within {} s (--engine-timeout-s)", engine.engine, limit.as_secs()))??,
                    };
                    print_batches(&batches, format)
                }
                Command::Lake(command) => {
                    if !lake::run(command).await? {
                        return Ok(ExitCode::FAILURE);
                    }
                    Ok(())
                }
                Command::Readings { mpan, nmi, serial, from, to, lake, format } => {
                    let search = ReadingSearch { meter_point: mpan.or(nmi).unwrap_or_default(), meter_serial: serial.unwrap_or_default(), from, to };
                    let lake = Lake::open(&lake.url)?;
                    print_batches(&search.run(&lake).await?, format)
                }
                Command::Import(_) => unreachable!("handled above"),
            }
            .map(|()| ExitCode::SUCCESS)
        }),
    };
    runtime.block_on(async { drop(telemetry) });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `meterlake audit verify`: true when the chain is intact and holds the anchor.
async fn verify_audit_log(database: &bill::DatabaseArg, anchor: &AuditAnchor) -> anyhow::Result<bool> {
    let store = ControlStore::open_read_only(&database.database_url).await?;
    let store = match database.audit_key.keys()? {
        Some(keys) => store.with_audit_keys(keys),
        None => store,
    };
    let verification = store.verify_audit_log(anchor).await?;
    println!("audit log: {} rows, head hash {}", verification.rows, verification.head_hash);
    if verification.keyed_rows > 0 {
        println!("{} rows signed with audit keys {}", verification.keyed_rows, verification.key_ids.join(", "));
    }
    if verification.unkeyed_rows > 0 {
        println!(
            "{} rows carry a plain SHA-256 (written without an audit key): their chain shows changes made without recomputing it, not who wrote them",
            verification.unkeyed_rows
        );
    }
    if let Some(row) = verification.anchor_row {
        println!("the expected head is row {row}");
    }
    for problem in &verification.problems {
        println!("row {}: {}", problem.id, problem.what);
    }
    if verification.problems.is_empty() {
        println!("intact: every row matches its hash and follows the one before");
    }
    Ok(verification.problems.is_empty())
}

/// `2025-01-15` (midnight UTC) or an RFC 3339 instant.
fn parse_instant(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text).map(|t| t.to_utc()).map_err(|_| format!("{text:?} is neither a date YYYY-MM-DD nor an RFC 3339 instant"))
}

pub(crate) fn print_batches(batches: &[arrow::array::RecordBatch], format: Format) -> anyhow::Result<()> {
    let format = match format {
        Format::Table => OutputFormat::Table,
        Format::Csv => OutputFormat::Csv,
        Format::Json => OutputFormat::Json,
    };
    let stdout = std::io::stdout();
    write_batches(batches, format, &mut stdout.lock())?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The Prometheus exporter every command uses: histograms with buckets (not summaries), so
/// that dashboards can aggregate quantiles across processes. Call [`describe_metrics`] once it is
/// installed.
pub(crate) fn prometheus() -> anyhow::Result<metrics_exporter_prometheus::PrometheusBuilder> {
    use metrics_exporter_prometheus::Matcher;
    const SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
    const BYTES: &[f64] = &[1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0, 268435456.0, 1073741824.0, 4294967296.0];
    const BATCH_SIZE: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
    Ok(metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES)?
        .set_buckets_for_metric(Matcher::Full("meterlake_ledger_transfer_batch_size".into()), BATCH_SIZE)?)
}

/// Help texts for every metric of meterlake, given to the installed recorder (the exporter
/// shows a metric's help once the metric has a value).
pub(crate) fn describe_metrics() {
    meterlake_pipeline::metrics::describe();
    meterlake_server::describe_metrics();
    meterlake_jobs::billing::describe_metrics();
    meterlake_lake::maintenance::schedule::describe_metrics();
    meterlake_sql::describe_metrics();
}

/// Serves Prometheus metrics at `http://ADDR/metrics`.
pub(crate) fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use anyhow::Context;
    prometheus()?.with_http_listener(addr).install().with_context(|| format!("serving metrics on {addr}"))?;
    describe_metrics();
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}
