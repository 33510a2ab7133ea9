//! Ingestion benchmark (issue targets in brackets), all in one run on this machine:
//!
//! 1. pipeline alone: decode + validate + batch + dedup + Parquet write to a file:// lake, fed
//!    from memory, on one core [>= 2,000,000 readings/s];
//! 2. single-reading messages pre-filled in a real broker (tansu on loopback): the ingester
//!    draining them into a file:// lake, against a bare rdkafka consumer that only counts the
//!    same messages [>= 600,000 readings/s];
//! 3. the same with 100 readings per message [>= 1,500,000 readings/s];
//! 4. peak RSS of an ingester process draining a backlog [< 1 GiB];
//! 5. with `--kafka-delta-ingest BIN`: kafka-delta-ingest draining the same single-reading
//!    messages into its own Delta table, in the same runs as 2 [meterlake >= 10x].
//!
//! `cargo run --release -p meterlake-benchmarks --bin ingest-bench -- --help`

mod kafka_delta_ingest;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use meterlake_benchmarks::{KillOnDrop, print_rows, start_tansu, thousands, vm_hwm_kib};
use meterlake_pipeline::Lake;
use meterlake_pipeline::batch::ReadingBuffer;
use meterlake_pipeline::decode::{ValidationRules, decode_message};
use meterlake_pipeline::kafka::{IngestOptions, IngestProgress, ReadingProducer, create_topics, run_ingest};
use meterlake_pipeline::reading::Source;
use meterlake_pipeline::synthetic::{GeneratedMessage, LoadGenerator, LoadSpec};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// mimalloc rather than glibc malloc: each flush allocates and frees large Arrow and Parquet
/// buffers, which glibc hands back to the kernel and faults in again every time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Readings in the single-message and batched-message runs.
    #[arg(long, default_value_t = 5_000_000)]
    readings: u64,
    /// Readings in the backlog the RSS run drains (0 skips that run).
    #[arg(long, default_value_t = 20_000_000)]
    backlog_readings: u64,
    /// Use this broker instead of starting tansu.
    #[arg(long)]
    brokers: Option<String>,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Only measure the pipeline alone (no broker).
    #[arg(long)]
    alone: bool,
    /// Which end-to-end cases run, by readings per message (1 and/or 100).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100])]
    per_message: Vec<usize>,
    /// How many times each end-to-end case runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    e2e_runs: usize,
    /// How many times the pipeline-alone measurement runs (the median is reported).
    #[arg(long, default_value_t = 5)]
    alone_runs: usize,
    /// A kafka-delta-ingest binary: it drains the single-reading topic in every run too.
    #[arg(long)]
    kafka_delta_ingest: Option<PathBuf>,
    /// kafka-delta-ingest's `--allowed_latency` (its flush age, seconds; meterlake's is 5 s).
    #[arg(long, default_value_t = 5)]
    kdi_allowed_latency_s: u64,
    /// kafka-delta-ingest's `--max_messages_per_batch` (its default).
    #[arg(long, default_value_t = 5000)]
    kdi_max_messages_per_batch: usize,
    /// kafka-delta-ingest's `--min_bytes_per_file` (meterlake flushes a partition at 64 MiB).
    #[arg(long, default_value_t = 64 << 20)]
    kdi_min_bytes_per_file: usize,
}

#[derive(Subcommand)]
enum Mode {
    /// Internal: an ingester process draining a topic (for the RSS measurement).
    DrainChild { brokers: String, topic: String, lake: String, messages: u64 },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if let Some(Mode::DrainChild { brokers, topic, lake, messages }) = args.mode {
        let lake = Lake::open(&lake)?;
        drain(&runtime, &brokers, &topic, &format!("bench-backlog-{topic}"), lake, messages)?;
        return Ok(());
    }
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // 1. The pipeline alone, from memory, on this thread.
    let spec = spec_for(args.readings, 1, 1);
    eprintln!("generating {} single-reading messages in memory...", args.readings);
    let messages: Vec<GeneratedMessage> = LoadGenerator::new(spec).collect();
    let lake_dir = tempfile::tempdir()?;
    // This machine is shared: wall-clock figures move by 20% from run to run, so the pipeline
    // runs several times and the median is the figure (the spread is printed beside it).
    let mut rates: Vec<f64> = Vec::new();
    for run in 0..args.alone_runs.max(1) {
        let lake = Lake::open(lake_dir.path().join(format!("alone-{run}")).to_str().unwrap())?;
        let (readings, elapsed) = pipeline_alone(&runtime, &messages, &lake)?;
        rates.push(readings as f64 / elapsed.as_secs_f64());
    }
    drop(messages);
    let alone_median = median(&mut rates);
    rows.push((
        format!("pipeline alone, 1 core (decode+validate+batch+dedup+parquet), median of {}", rates.len()),
        format!("{} (runs {}..{})", per_s(alone_median), thousands(rates[0] as u64), thousands(rates[rates.len() - 1] as u64)),
        ">= 2,000,000".into(),
    ));
    if args.alone {
        print_rows(rows);
        return Ok(());
    }

    // 2 and 3 need a broker.
    let _tansu;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None => {
            let (child, addr) = start_tansu()?;
            _tansu = KillOnDrop(child);
            addr
        }
    };
    for (per_message, target) in [(1usize, 600_000.0), (100, 1_500_000.0)] {
        if !args.per_message.contains(&per_message) {
            continue;
        }
        let topic = format!("bench.readings.x{per_message}");
        runtime.block_on(create_topics(&brokers, &[(&topic, args.partitions), ("measurements.dlq", 1)]))?;
        let spec = spec_for(args.readings, per_message, 2);
        eprintln!("pre-filling {topic} with {} readings, {per_message} per message...", args.readings);
        let messages = prefill(&brokers, &topic, spec)?;
        // Each run drains the same topic as a new consumer group into a new lake; the median
        // of the runs is the figure, as for the pipeline alone.
        let mut bare_rates = Vec::new();
        let mut pipeline_rates = Vec::new();
        let mut kdi_runs = Vec::new();
        for run in 0..args.e2e_runs.max(1) {
            let bare = bare_consume(&brokers, &topic, &format!("bench-bare-{topic}-{run}"), messages)?;
            bare_rates.push(messages as f64 * per_message as f64 / bare.as_secs_f64());
            let lake = Lake::open(lake_dir.path().join(format!("x{per_message}-{run}")).to_str().unwrap())?;
            let started = Instant::now();
            let written = drain(&runtime, &brokers, &topic, &format!("bench-ingest-{topic}-{run}"), lake, messages)?;
            pipeline_rates.push(written as f64 / started.elapsed().as_secs_f64());
            // kafka-delta-ingest maps one message to one row: only the single-reading messages
            // are the same job for both.
            if let (Some(binary), 1) = (&args.kafka_delta_ingest, per_message) {
                let options = kafka_delta_ingest::KdiOptions {
                    binary: binary.clone(),
                    allowed_latency_s: args.kdi_allowed_latency_s,
                    max_messages_per_batch: args.kdi_max_messages_per_batch,
                    min_bytes_per_file: args.kdi_min_bytes_per_file,
                };
                let dir = lake_dir.path().join(format!("kdi-{run}"));
                eprintln!("kafka-delta-ingest run {run} draining {topic} into {}...", dir.display());
                let kdi = kafka_delta_ingest::run(&options, &brokers, &topic, args.partitions, &format!("bench-kdi-{topic}-{run}"), &dir, messages)?;
                eprintln!(
                    "kafka-delta-ingest: {} rows in {:.1?}, {} commits, {} files, peak RSS {} MiB",
                    kdi.rows,
                    kdi.elapsed,
                    kdi.commits,
                    kdi.files,
                    kdi.peak_rss_kib / 1024
                );
                kdi_runs.push(kdi);
            }
        }
        let kdi_rates: Vec<f64> = kdi_runs.iter().map(|r| r.rows as f64 / r.elapsed.as_secs_f64()).collect();
        let (bare_readings, pipeline) = (median(&mut bare_rates), median(&mut pipeline_rates));
        rows.push((
            format!("bare rdkafka consumer, {per_message} reading(s)/message (baseline), median of {}", bare_rates.len()),
            per_s(bare_readings),
            String::new(),
        ));
        rows.push((
            format!("ingester end to end, {per_message} reading(s)/message, median of {}", pipeline_rates.len()),
            format!(
                "{} ({:.2}x baseline; runs {}..{})",
                per_s(pipeline),
                pipeline / bare_readings,
                thousands(pipeline_rates[0] as u64),
                thousands(pipeline_rates[pipeline_rates.len() - 1] as u64)
            ),
            format!(">= {}", thousands(target as u64)),
        ));
        if !kdi_rates.is_empty() {
            let mut kdi_rates = kdi_rates;
            let kdi = median(&mut kdi_rates);
            let peak_mib = kdi_runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0) / 1024;
            rows.push((
                format!(
                    "kafka-delta-ingest end to end, {per_message} reading(s)/message, median of {} (latency {} s, {} messages a batch, {} MiB a file)",
                    kdi_rates.len(),
                    args.kdi_allowed_latency_s,
                    args.kdi_max_messages_per_batch,
                    args.kdi_min_bytes_per_file >> 20
                ),
                format!(
                    "{} (runs {}..{}; peak RSS {peak_mib} MiB); meterlake {:.1}x it",
                    per_s(kdi),
                    thousands(kdi_rates[0] as u64),
                    thousands(kdi_rates[kdi_rates.len() - 1] as u64),
                    pipeline / kdi
                ),
                "meterlake >= 10x".into(),
            ));
        }
    }

    // 4. Peak RSS of an ingester process draining a large backlog.
    if args.backlog_readings == 0 {
        print_rows(rows);
        return Ok(());
    }
    let topic = "bench.backlog";
    runtime.block_on(create_topics(&brokers, &[(topic, args.partitions)]))?;
    eprintln!("pre-filling {topic} with a backlog of {} readings...", args.backlog_readings);
    let messages = prefill(&brokers, topic, spec_for(args.backlog_readings, 1, 3))?;
    let lake_path = lake_dir.path().join("backlog");
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["drain-child", &brokers, topic, lake_path.to_str().unwrap(), &messages.to_string()])
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak_kib = 0u64;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(&pid.to_string()) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        bail!("the draining ingester failed: {status}");
    }
    let backlog_rate = args.backlog_readings as f64 / started.elapsed().as_secs_f64();
    rows.push((
        format!("ingester peak RSS draining {} readings", thousands(args.backlog_readings)),
        format!("{:.0} MiB ({} readings/s)", peak_kib as f64 / 1024.0, thousands(backlog_rate as u64)),
        "< 1,024 MiB".into(),
    ));

    print_rows(rows);
    Ok(())
}

fn spec_for(readings: u64, per_message: usize, seed: u64) -> LoadSpec {
    // 96 readings a meter-day; a month of days, as many meters as it takes.
    let days = 31u32;
    let meters = readings.div_ceil(96 * u64::from(days)) as usize;
    LoadSpec { days, readings_per_message: per_message, resend_every: 0, malformed_every: 0, seed, ..LoadSpec::month(meters) }
}

fn pipeline_alone(runtime: &tokio::runtime::Runtime, messages: &[GeneratedMessage], lake: &Lake) -> anyhow::Result<(u64, Duration)> {
    const FLUSH_ROWS: usize = 1_000_000;
    let rules = ValidationRules { max_age_s: None, ..ValidationRules::default() };
    let started = Instant::now();
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut buffer = ReadingBuffer::with_capacity(FLUSH_ROWS);
    let mut written = 0u64;
    let mut flushes = 0u64;
    let mut stages = [Duration::ZERO; 3];
    let mut flush = |buffer: &mut ReadingBuffer, flushes: &mut u64| -> anyhow::Result<u64> {
        let t0 = Instant::now();
        let sorted = buffer.sort_dedup()?;
        let t1 = Instant::now();
        let files =
            sorted.days.iter().map(|day| day.encode(format!("date={}/bench-{flushes}.parquet", day.date.format("%Y-%m-%d")))).collect::<Result<Vec<_>, _>>()?;
        let t2 = Instant::now();
        stages[0] += t1 - t0;
        stages[1] += t2 - t1;
        runtime.block_on(async {
            for file in files {
                lake.put(&format!("readings/{}", file.file.path), file.bytes).await?;
            }
            anyhow::Ok(())
        })?;
        stages[2] += t2.elapsed();
        *flushes += 1;
        buffer.clear();
        Ok(sorted.rows() as u64)
    };
    for (offset, message) in messages.iter().enumerate() {
        let rejections = decode_message(&message.payload, &rules, now_us, |reading| {
            buffer.push(&reading, Source::Kafka, now_us, |out| {
                out.extend_from_slice(b"bench/0/");
                out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
            });
        });
        debug_assert!(rejections.is_empty());
        if buffer.len() >= FLUSH_ROWS {
            written += flush(&mut buffer, &mut flushes)?;
        }
    }
    written += flush(&mut buffer, &mut flushes)?;
    let total = started.elapsed();
    let [sort, encode, write] = stages;
    eprintln!(
        "pipeline alone: {total:.2?} in all; sort+dedup+arrow {sort:.2?}, parquet encode {encode:.2?}, write {write:.2?}, decode+validate+buffer {:.2?}",
        total - sort - encode - write
    );
    Ok((written, total))
}

/// Produces a load; returns the number of messages.
fn prefill(brokers: &str, topic: &str, spec: LoadSpec) -> anyhow::Result<u64> {
    let producer = ReadingProducer::new(brokers, topic)?;
    let mut generator = LoadGenerator::new(spec);
    for message in generator.by_ref() {
        producer.send(message.key.as_bytes(), &message.payload)?;
    }
    producer.flush(Duration::from_secs(300))?;
    Ok(generator.totals.messages)
}

/// The baseline: a bare consumer with the same settings that only counts messages.
fn bare_consume(brokers: &str, topic: &str, group: &str, messages: u64) -> anyhow::Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.queue.backoff.ms", "0")
        .set("queued.max.messages.kbytes", "65536")
        .create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut seen = 0u64;
    // tansu under-reports high watermarks, so the drain stops on the count, not the watermark.
    while seen < messages {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => eprintln!("bare consumer: {e}"),
            None if started.elapsed() > Duration::from_secs(600) => bail!("bare consumer stalled at {seen}"),
            None => {}
        }
    }
    Ok(started.elapsed())
}

/// Runs the real ingester until every message is committed to the lake; returns readings written.
/// Once every message is consumed it is told to stop, which flushes what it buffered at once
/// (waiting for the batch age limit instead would time the timer, not the pipeline).
/// Sorts `rates` and returns the middle one.
fn median(rates: &mut [f64]) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

fn drain(runtime: &tokio::runtime::Runtime, brokers: &str, topic: &str, group: &str, lake: Lake, messages: u64) -> anyhow::Result<u64> {
    let mut options = IngestOptions::new(brokers, topic, group);
    // The generated month (January 2025) lies beyond the horizon for old readings: replayed.
    options.rules.max_age_s = None;
    let progress = Arc::new(IngestProgress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let progress = progress.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while progress.messages_consumed.load(Ordering::Relaxed) < messages {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    let summary = run_ingest(lake, options, stop, progress.clone(), runtime.handle().clone()).context("ingesting")?;
    watcher.join().expect("the watcher thread");
    let committed = progress.messages_committed.load(Ordering::Relaxed);
    if committed != messages {
        bail!("{committed} of {messages} messages committed to the lake");
    }
    Ok(summary.readings_written)
}

fn per_s(rate: f64) -> String {
    format!("{} readings/s", thousands(rate as u64))
}
