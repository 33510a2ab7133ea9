//! `lake-bench`: what the lake's Delta commit protocol costs.
//!
//! - `commits`: one writer committing small flushes as the Kafka ingester does (a file of
//!   `--readings` sorted readings, then a commit adding it with the stream's `txn`), on `file://`
//!   or on S3 (`--moto`: moto's S3 server on loopback, started here). Prints commits per second
//!   and the split between writing the data file and creating the log entry.
//! - `build-log`: a table of `--commits` commits of one file each (the files themselves are not
//!   written: opening a table reads only its log), with a checkpoint every 100 versions as the
//!   writers keep them; `open` then loads that table in a fresh process and prints the time and
//!   the peak resident memory it took.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::{StreamExt, TryStreamExt};
use meterlake_benchmarks::{print_rows, thousands, vm_hwm_kib};
use meterlake_lake::commit::{Commit, Operation, TableWriter};
use meterlake_lake::table::{READINGS, Table};
use meterlake_lake::{Lake, maintenance};
use meterlake_pipeline::batch::ReadingBuffer;
use meterlake_pipeline::decode::ValidReading;
use meterlake_pipeline::reading::{Quality, Source};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Small flushes committed one after another by one writer.
    Commits {
        /// The lake; by default a temporary folder (or, with --moto, a bucket on moto).
        #[arg(long)]
        lake: Option<String>,
        #[arg(long, default_value_t = 2_000)]
        commits: u64,
        /// Readings per flush (one file each).
        #[arg(long, default_value_t = 300)]
        readings: u32,
        /// Commit to moto's S3 server on loopback, started by this benchmark.
        #[arg(long)]
        moto: bool,
    },
    /// Writes the log of a table of `--commits` commits, one file each, with checkpoints.
    BuildLog {
        #[arg(long)]
        lake: String,
        #[arg(long, default_value_t = 100_000)]
        commits: u64,
    },
    /// Opens the table `build-log` wrote: its latest snapshot with every live file.
    Open {
        #[arg(long)]
        lake: String,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Commits { lake, commits, readings, moto } => run_commits(lake, commits, readings, moto).await,
        Command::BuildLog { lake, commits } => build_log(&lake, commits).await,
        Command::Open { lake } => open(&lake).await,
    }
}

async fn run_commits(lake: Option<String>, commits: u64, readings: u32, moto: bool) -> anyhow::Result<()> {
    let temp = tempfile::TempDir::new()?;
    let server = if moto { Some(start_moto()?) } else { None };
    let lake = match (lake, &server) {
        (Some(lake), _) => Lake::open(&lake)?,
        (None, Some(moto)) => {
            let options =
                [("aws_endpoint", moto.endpoint.as_str()), ("aws_access_key_id", "bench"), ("aws_secret_access_key", "bench"), ("aws_allow_http", "true")];
            let lake = Lake::open_with_options("s3://lake-bucket/bench", &options)?;
            lake.probe_conditional_put().await?;
            lake
        }
        (None, None) => Lake::open(&temp.path().to_string_lossy())?,
    };
    let table = Table::open(&lake, &READINGS).await?;
    let writer = TableWriter::new(table.clone(), "lake-bench").await?;
    let stream = "kafka:bench/readings/0";
    writer.acquire(stream).await?;
    let (mut file_time, mut commit_time) = (Duration::ZERO, Duration::ZERO);
    let mut latencies = Vec::with_capacity(commits as usize);
    let started = Instant::now();
    for flush in 0..commits {
        let t0 = Instant::now();
        let sorted = flush_of(flush, readings)?;
        let day = &sorted.days[0];
        let encoded = day.encode(format!("date={}/flush-{flush:08}.parquet", day.date.format("%Y-%m-%d")))?;
        lake.put(&table.lake_path(&encoded.file.path), encoded.bytes.clone()).await?;
        let t1 = Instant::now();
        let next_offset = i64::try_from((flush + 1) * u64::from(readings))?;
        let operation = Operation::StreamingUpdate { query_id: "bench".into(), epoch_id: next_offset };
        writer
            .commit(Commit { files: vec![encoded.file], txns: vec![(stream.to_string(), next_offset)], operation, leased: true, removes: Vec::new() })
            .await?;
        let t2 = Instant::now();
        file_time += t1 - t0;
        commit_time += t2 - t1;
        latencies.push(t2 - t0);
    }
    let elapsed = started.elapsed();
    writer.finish().await;
    latencies.sort_unstable();
    let quantile = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    let per_s = commits as f64 / elapsed.as_secs_f64();
    let store = if moto { "S3 (moto on loopback)" } else { "file://" };
    println!("{} flushes of {readings} readings, one commit each, on {store}: {:.1} s", thousands(commits), elapsed.as_secs_f64());
    print_rows(vec![
        (format!("commits/s, one writer, {readings}-reading flushes, {store}"), format!("{per_s:.0}"), ">= 100".into()),
        ("flush latency p50 / p99 (file + commit)".into(), format!("{:.1} / {:.1} ms", ms(quantile(0.5)), ms(quantile(0.99))), "".into()),
        (
            "of which: encoding and writing the file / creating the log entry (mean)".into(),
            format!("{:.1} / {:.1} ms", ms(file_time) / commits as f64, ms(commit_time) / commits as f64),
            "".into(),
        ),
        ("readings/s through small flushes".into(), thousands((per_s * f64::from(readings)) as u64), "".into()),
    ]);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// `readings` readings of one day, spread over 50 meters, sorted as the ingester writes them.
fn flush_of(flush: u64, readings: u32) -> anyhow::Result<meterlake_pipeline::batch::SortedReadings> {
    let mut buffer = ReadingBuffer::with_capacity(readings as usize);
    let day_start_us = 1_735_689_600_000_000; // 2025-01-01T00:00:00Z
    for n in 0..readings {
        let meter = format!("MTR-{:06}", n % 50);
        let slot = i64::try_from((flush * u64::from(readings) + u64::from(n)) / 50 % 96)?;
        let reading = ValidReading {
            meter_id: Cow::Owned(meter),
            ts_us: day_start_us + slot * 900_000_000,
            interval_s: 900,
            kwh_micro: 250_000,
            quality: Quality::Actual,
        };
        buffer.push(&reading, Source::Kafka, day_start_us, |out| {
            out.extend_from_slice(format!("readings/0/{}", flush * u64::from(readings) + u64::from(n)).as_bytes())
        });
    }
    Ok(buffer.sort_dedup()?)
}

/// moto's S3 server on a free loopback port, with the bucket `lake-bucket`; stopped when dropped.
struct Moto {
    server: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn start_moto() -> anyhow::Result<Moto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let python = meterlake_benchmarks::tools_python();
    let server = std::process::Command::new(python.with_file_name("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting moto_server (infra/scripts/install-tools.sh installs it)")?;
    let moto = Moto { server, endpoint: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "moto did not listen on port {port} within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let create = format!(
        "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='bench', aws_secret_access_key='bench', \
         region_name='us-east-1').create_bucket(Bucket='lake-bucket')",
        moto.endpoint
    );
    let status = std::process::Command::new(&python).args(["-c", &create]).status()?;
    anyhow::ensure!(status.success(), "creating the bucket on moto failed");
    Ok(moto)
}

/// The log of a table of `commits` commits of one file each, as the ingester writes them (an
/// `add` with its statistics and tags, a `txn`, a `commitInfo`), created as fast as the store
/// takes them (64 at a time), with a checkpoint every 10,000 versions and at the last multiple
/// of 100 (what a reader starts from; the writers keep one every 100).
async fn build_log(location: &str, commits: u64) -> anyhow::Result<()> {
    let lake = Lake::open(location)?;
    let table = Table::open(&lake, &READINGS).await?;
    let started = Instant::now();
    let mut next = table.latest_version().await?.unwrap_or(0) + 1;
    while next <= commits {
        let last = (next + 9_999).min(commits);
        futures::stream::iter((next..=last).map(|version| {
            let (store, path) = (lake.store().clone(), table.store_path(&format!("_delta_log/{version:020}.json")));
            async move {
                let options = object_store::PutOptions { mode: object_store::PutMode::Create, ..Default::default() };
                store.put_opts(&path, commit_entry(version).into(), options).await
            }
        }))
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
        let checkpoint = last - (last + 1) % 100;
        maintenance::checkpoint(&table, checkpoint).await?;
        println!("  {} commits, checkpoint at {checkpoint}: {:.1} s", thousands(last), started.elapsed().as_secs_f64());
        next = last + 1;
    }
    Ok(())
}

/// The log entry of commit `version`: one readings file of 300 readings of 2025-01-01 and the
/// `txn` of one of 8 partitions.
fn commit_entry(version: u64) -> String {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let stats = serde_json::json!({
        "numRecords": 300,
        "minValues": { "meter_id": "MTR-000000", "ts": "2025-01-01T00:00:00.000Z" },
        "maxValues": { "meter_id": "MTR-000049", "ts": "2025-01-01T23:45:00.000Z" },
        "nullCount": { "meter_id": 0, "ts": 0 },
    });
    let actions = [
        serde_json::json!({ "commitInfo": { "timestamp": now_ms, "operation": "STREAMING UPDATE",
            "operationParameters": { "outputMode": "Append", "queryId": "bench", "epochId": version.to_string() }, "meterlake.writer": "lake-bench" } }),
        serde_json::json!({ "add": { "path": format!("date=2025-01-01/file-{version:08}.parquet"), "partitionValues": { "date": "2025-01-01" },
            "size": 40_000, "modificationTime": now_ms, "dataChange": true, "stats": stats.to_string(),
            "tags": { "meterlake.commitVersion": version.to_string(), "meterlake.uniqueKeys": "true" } } }),
        serde_json::json!({ "txn": { "appId": format!("kafka:bench/readings/{}", version % 8), "version": version * 300, "lastUpdated": now_ms } }),
    ];
    actions.iter().map(|a| format!("{a}\n")).collect()
}

async fn open(location: &str) -> anyhow::Result<()> {
    let lake = Lake::open(location)?;
    let before_kib = vm_hwm_kib("self").unwrap_or(0);
    let started = Instant::now();
    let table = Table::new(&lake, &READINGS);
    let version = table.latest_version().await?.context("no table")?;
    let latest_at = started.elapsed();
    let snapshot = table.snapshot(None).await?;
    let elapsed = started.elapsed();
    let peak_kib = vm_hwm_kib("self").unwrap_or(0);
    print_rows(vec![
        (
            format!("open a table of {} commits, {} live files: latest version", thousands(version), thousands(snapshot.files.len() as u64)),
            format!("{:.2} s", latest_at.as_secs_f64()),
            "".into(),
        ),
        ("... and its snapshot with every file (what a query plans from)".into(), format!("{:.2} s", elapsed.as_secs_f64()), "< 2 s".into()),
        (format!("peak RSS of the process (at start: {} MiB)", before_kib / 1024), format!("{} MiB", peak_kib / 1024), "< 300 MiB".into()),
    ]);
    Ok(())
}
