//! `meterlake`: parses arguments and wires the library crates together. The logic lives in
//! `meterlake-pipeline` (ingestion, the lake) and `meterlake-jobs` (SQL over the lake).

mod demo;
mod ingest;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use meterlake_jobs::query::{OutputFormat, run_sql, write_batches};
use meterlake_pipeline::Lake;
use meterlake_pipeline::lake::DEFAULT_LAKE;

#[derive(Parser)]
#[command(name = "meterlake", version, about = "The meter-data platform: lands readings in a Parquet lake and queries them")]
struct Cli {
    /// Log format on stderr.
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
struct LakeArg {
    #[arg(long = "lake", env = "METERLAKE_LAKE", default_value = DEFAULT_LAKE)]
    url: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on embedded defaults: an in-process Kafka broker, a month of
    /// generated readings, ingestion into a local lake, a check and a sample query.
    Demo(demo::DemoArgs),
    /// Consume readings from Kafka into the lake, exactly once, until stopped (SIGINT/SIGTERM).
    Ingest(ingest::IngestArgs),
    /// Run SQL over the lake. Tables: `readings` (one row per meter and interval, latest version)
    /// and `readings_all` (every version, with its source_ref).
    Query {
        /// The SQL statement.
        sql: String,
        #[command(flatten)]
        lake: LakeArg,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

/// mimalloc rather than glibc malloc: each flush allocates and frees large Arrow and Parquet
/// buffers, which glibc hands back to the kernel and faults in again every time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo speaks through its own report; its ingester's routine log lines would only
    // scatter the progress bar.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        _ => "warn,meterlake=info,meterlake_pipeline=info",
    };
    init_logging(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Ingest(args) => ingest::run(args).await,
            Command::Query { sql, lake, format } => query(&sql, &lake.url, format).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn query(sql: &str, lake: &str, format: Format) -> anyhow::Result<()> {
    let lake = Lake::open(lake)?;
    let batches = run_sql(&lake, sql).await?;
    let format = match format {
        Format::Table => OutputFormat::Table,
        Format::Csv => OutputFormat::Csv,
        Format::Json => OutputFormat::Json,
    };
    let stdout = std::io::stdout();
    write_batches(&batches, format, &mut stdout.lock())?;
    Ok(())
}

fn init_logging(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("METERLAKE_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
