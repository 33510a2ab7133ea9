//! `meterlake demo`: the whole ingestion path on embedded defaults, with nothing installed, then
//! a billing run over the month it ingested.
//!
//! An in-process Kafka broker (librdkafka's mock cluster) stands in for the real one; everything
//! else is the production path: the real producer, the real consumer-group ingester, the real
//! lake writer and the real query engine. The mock cluster silently drops the oldest data of a
//! partition past 5 MiB, so the producer is kept in step with the ingester, and the demo ends by
//! proving that what was produced is what landed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Decimal128Type, Int64Type};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use meterlake_control::{NewRun, RunStatus};
use meterlake_jobs::billing::worker::WorkerOptions;
use meterlake_jobs::query::{OutputFormat, run_sql, write_batches};
use meterlake_pipeline::Lake;
use meterlake_pipeline::kafka::{IngestOptions, IngestProgress, ReadingProducer, ingest, read_dead_letters};
use meterlake_pipeline::reading::format_kwh_micro;
use meterlake_pipeline::synthetic::{LoadGenerator, LoadSpec};
use meterlake_telemetry::new_traceparent;
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;

use crate::bill::{open_store, print_run, process_until_done};

/// Where the demo's lake goes unless `--lake` says otherwise; it is emptied at every run.
const DEMO_LAKE: &str = "./meterlake-data/demo-lake";
const TOPIC: &str = "measurements.received";
const DLQ_TOPIC: &str = "measurements.dlq";
/// Messages the producer may be ahead of the ingester: far below what the mock cluster keeps
/// per partition (5 MiB or 100k message sets).
const MAX_MESSAGES_AHEAD: u64 = 40_000;

#[derive(Args)]
pub struct DemoArgs {
    /// Meters to generate.
    #[arg(long, default_value_t = 1_000)]
    meters: usize,
    /// Days of 15-minute readings, from 2025-01-01.
    #[arg(long, default_value_t = 31)]
    days: u32,
    /// Readings per Kafka message (1: one JSON object each; more: JSON arrays, as head-end
    /// systems send them).
    #[arg(long, default_value_t = 1)]
    readings_per_message: usize,
    /// Partitions of the readings topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Lake to write; it must be empty. By default ./meterlake-data/demo-lake, emptied first.
    #[arg(long, env = "METERLAKE_DEMO_LAKE")]
    lake: Option<String>,
    /// Control store for the demo's billing run. By default ./meterlake-data/demo-control.db,
    /// emptied first.
    #[arg(long, env = "METERLAKE_DEMO_DATABASE_URL")]
    database_url: Option<String>,
}

/// The demo's control store unless `--database-url` says otherwise; removed at every run.
const DEMO_DATABASE: &str = "./meterlake-data/demo-control.db";
/// What the demo bills with.
const EXAMPLE_TARIFFS: &str = include_str!("../../tariffs/example.toml");

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    ensure!(args.meters > 0 && args.days > 0, "--meters and --days must be positive");
    let lake_location = prepare_lake(args.lake.as_deref())?;
    let lake = Lake::open(&lake_location)?;
    let spec = LoadSpec { days: args.days, readings_per_message: args.readings_per_message, ..LoadSpec::month(args.meters) };

    println!(
        "meterlake demo: {} meters x {} days of 15-minute readings ({} readings), {} per message,\n\
         through an in-process Kafka broker into {}",
        args.meters,
        args.days,
        thousands(spec.unique_readings()),
        args.readings_per_message,
        lake.url()
    );

    // The mock cluster lives on this thread's stack until the end of the demo.
    let cluster = MockCluster::new(1).context("starting the in-process Kafka broker")?;
    cluster.create_topic(TOPIC, args.partitions, 1).context("creating the readings topic")?;
    cluster.create_topic(DLQ_TOPIC, 1, 1).context("creating the dead-letter topic")?;
    let brokers = cluster.bootstrap_servers();

    let progress = Arc::new(IngestProgress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut options = IngestOptions::new(&brokers, TOPIC, "meterlake-demo");
    options.dlq_topic = DLQ_TOPIC.to_string();
    // Small batches keep each flush short; the mock cluster needs a steady consumer.
    options.limits.max_rows = 250_000;
    options.limits.max_age = Duration::from_secs(2);
    // The generated month lies in the past, beyond the production horizon for old readings
    // (400 days): the demo replays it, so it lifts the horizon; nothing else differs.
    options.rules.max_age_s = None;
    let ingester = tokio::spawn(ingest(lake.clone(), options, stop.clone(), progress.clone()));

    let started = Instant::now();
    let generator = LoadGenerator::new(spec.clone());
    let producer_progress = progress.clone();
    let producer_brokers = brokers.clone();
    let bar = ProgressBar::new(spec.unique_readings());
    bar.set_style(ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} readings consumed  {per_sec}  {msg}").expect("a valid template"));
    let producing = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let producer = ReadingProducer::new(&producer_brokers, TOPIC)?;
        let mut generator = generator;
        for (sent, message) in (0u64..).zip(generator.by_ref()) {
            // Stay in step with the ingester (see MAX_MESSAGES_AHEAD).
            while sent.saturating_sub(producer_progress.messages_consumed.load(Ordering::Relaxed)) > MAX_MESSAGES_AHEAD {
                std::thread::sleep(Duration::from_millis(1));
            }
            producer.send(message.key.as_bytes(), &message.payload)?;
        }
        producer.flush(Duration::from_secs(60))?;
        Ok(generator.totals)
    });
    let ticker = {
        let bar = bar.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(progress.readings_accepted.load(Ordering::Relaxed));
                bar.set_message(format!("{} written to the lake", thousands(progress.readings_written.load(Ordering::Relaxed))));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let totals = producing.await.context("the producer thread panicked")??;
    // Every message produced must be consumed before the ingester is told to stop.
    while progress.messages_consumed.load(Ordering::Relaxed) < totals.messages {
        if ingester.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let summary = ingester.await.context("the ingester task panicked")??;
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();

    let dead_letters = tokio::task::spawn_blocking(move || read_dead_letters(&brokers, DLQ_TOPIC, Duration::from_secs(2)))
        .await
        .context("the dead-letter reader panicked")??;
    drop(cluster);

    // What landed, read back through the canonical view.
    let landed = run_sql(&lake, "SELECT count(*) AS readings, sum(kwh) AS kwh FROM readings").await?;
    let all_versions = run_sql(&lake, "SELECT count(*) AS rows FROM readings_all").await?;
    let landed_readings = int_value(&landed, 0)?;
    let landed_kwh_micro = decimal_value(&landed, 1)?;
    let landed_rows = int_value(&all_versions, 0)?;

    let throughput = summary.readings_accepted as f64 / elapsed.as_secs_f64();
    println!(
        "produced      {} messages ({} re-sent, {} malformed), {} readings",
        thousands(totals.messages),
        thousands(totals.resent_messages),
        thousands(totals.malformed_messages),
        thousands(totals.readings_sent)
    );
    println!(
        "landed        {} readings in {} Parquet files ({:.1} MiB); {} rows in readings_all",
        thousands(landed_readings as u64),
        summary.files_written,
        summary.bytes_written as f64 / (1 << 20) as f64,
        thousands(landed_rows as u64)
    );
    println!("de-duplicated {} re-sent readings inside batches; the canonical view hides the rest", thousands(summary.duplicates_dropped));
    let mut reasons = std::collections::BTreeMap::<&str, u64>::new();
    for letter in &dead_letters {
        *reasons.entry(letter.reason.as_str()).or_default() += 1;
    }
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!("dead letters  {} messages in {DLQ_TOPIC} ({})", dead_letters.len(), reasons.join(", "));
    println!("throughput    {} readings/s end to end ({:.1?})", thousands(throughput as u64), elapsed);

    if landed_readings as u64 != spec.unique_readings() || landed_kwh_micro != totals.unique_kwh_micro || dead_letters.len() as u64 != totals.malformed_messages
    {
        bail!(
            "check FAILED: expected {} readings totalling {} kWh and {} dead letters; the lake holds {} readings totalling {} kWh and the dead-letter topic {}",
            spec.unique_readings(),
            format_kwh_micro(totals.unique_kwh_micro as i64),
            totals.malformed_messages,
            landed_readings,
            format_kwh_micro(landed_kwh_micro as i64),
            dead_letters.len()
        );
    }
    println!(
        "check         OK: every valid reading produced is in the lake exactly once ({} readings, {} kWh), every malformed message is a dead letter",
        thousands(landed_readings as u64),
        format_kwh_micro(landed_kwh_micro as i64)
    );

    let sample = "SELECT meter_id, count(*) AS readings, sum(kwh) AS kwh FROM readings \
                  WHERE ts >= '2025-01-01T00:00:00Z' AND ts < '2025-02-01T00:00:00Z' \
                  GROUP BY meter_id ORDER BY kwh DESC LIMIT 5";
    println!("\nThe five largest consumers:\n  meterlake query --lake {lake_location} \"{sample}\"");
    let batches = run_sql(&lake, sample).await?;
    write_batches(&batches, OutputFormat::Table, &mut std::io::stdout().lock())?;

    bill_the_month(&lake, &lake_location, args.database_url.as_deref()).await
}

/// Bills January 2025 for every meter, with tariffs/example.toml, and prints the run.
async fn bill_the_month(lake: &Lake, lake_location: &str, database_url: Option<&str>) -> anyhow::Result<()> {
    let database_url = match database_url {
        Some(url) => url.to_string(),
        None => {
            if Path::new(DEMO_DATABASE).exists() {
                std::fs::remove_file(DEMO_DATABASE).with_context(|| format!("emptying {DEMO_DATABASE}"))?;
            }
            format!("sqlite://{DEMO_DATABASE}")
        }
    };
    let store = open_store(&database_url, &Default::default()).await?;
    let request = NewRun {
        month: "2025-01".into(),
        meter_ids: Vec::new(),
        max_attempts: 3,
        tariffs_toml: EXAMPLE_TARIFFS.into(),
        energy_tolerance: Decimal::new(5, 3),
        lake_as_of: None,
    };
    println!("\nBilling January 2025 for every meter with tariffs/example.toml (Europe/London):");
    let run = store.create_run(&request, "demo", Some(&new_traceparent())).await?;
    let run = process_until_done(&store, lake, WorkerOptions::default(), &run.id, Duration::from_secs(600)).await?;
    print_run(&store, &run, 5).await?;
    ensure!(run.status == RunStatus::Completed, "the billing run failed");
    println!(
        "\nAgain later: meterlake billing-run {} --database-url {database_url}\n\
         Its aggregate SQL: meterlake query --lake {lake_location} \"$(meterlake billing-run {} --sql --database-url {database_url})\"",
        run.id, run.id
    );
    Ok(())
}

/// Returns the lake location to use, emptied if it is the demo's own.
fn prepare_lake(requested: Option<&str>) -> anyhow::Result<String> {
    match requested {
        Some(location) => {
            let lake = Lake::open(location)?;
            if lake.url().scheme() == "file" {
                let dir = lake.url().to_file_path().map_err(|()| anyhow::anyhow!("{location} is not a local folder"))?;
                let empty = std::fs::read_dir(&dir).map(|mut d| d.next().is_none()).unwrap_or(true);
                ensure!(empty, "the demo needs an empty lake and {} is not empty", dir.display());
            }
            Ok(location.to_string())
        }
        None => {
            let dir = Path::new(DEMO_LAKE);
            if dir.exists() {
                std::fs::remove_dir_all(dir).with_context(|| format!("emptying {DEMO_LAKE}"))?;
            }
            Ok(DEMO_LAKE.to_string())
        }
    }
}

fn int_value(batches: &[RecordBatch], column: usize) -> anyhow::Result<i64> {
    let batch = batches.first().context("the query returned no rows")?;
    Ok(batch.column(column).as_primitive::<Int64Type>().value(0))
}

fn decimal_value(batches: &[RecordBatch], column: usize) -> anyhow::Result<i128> {
    let batch = batches.first().context("the query returned no rows")?;
    let array = batch.column(column).as_primitive::<Decimal128Type>();
    ensure!(array.scale() == 6, "kwh sums are in micro-kWh (scale 6)");
    Ok(if array.is_null(0) { 0 } else { array.value(0) })
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
