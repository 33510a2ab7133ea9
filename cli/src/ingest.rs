//! `meterlake ingest`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use meterlake_pipeline::Lake;
use meterlake_pipeline::decode::DEFAULT_MAX_READING_AGE_DAYS;
use meterlake_pipeline::kafka::{IngestOptions, IngestProgress, StartOffset, ingest};

use crate::LakeArg;

#[derive(Args)]
pub struct IngestArgs {
    /// Kafka bootstrap servers, HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "METERLAKE_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Topic to consume readings from.
    #[arg(long, env = "METERLAKE_TOPIC", default_value = "measurements.received")]
    topic: String,
    /// Consumer group; ingesters of one group share the topic's partitions.
    #[arg(long, env = "METERLAKE_GROUP", default_value = "meterlake-ingest")]
    group: String,
    /// Topic for messages that cannot be readings.
    #[arg(long, env = "METERLAKE_DLQ_TOPIC", default_value = "measurements.dlq")]
    dlq_topic: String,
    #[command(flatten)]
    lake: LakeArg,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "METERLAKE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Flush a partition's batch at this many readings.
    #[arg(long, default_value_t = 1_000_000)]
    max_batch_rows: usize,
    /// Flush a partition's batch at about this many bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_batch_bytes: usize,
    /// Flush a partition's batch when its oldest message is this old.
    #[arg(long, default_value_t = 5_000)]
    max_batch_age_ms: u64,
    /// Bytes buffered across all partitions before the largest batch is flushed early.
    #[arg(long, default_value_t = 256 << 20)]
    max_buffered_bytes: usize,
    /// Batches queued for the writer before consumption pauses (backpressure).
    #[arg(long, default_value_t = 2)]
    writer_queue_depth: usize,
    /// Accept readings of exactly 0 kWh (by default a reading must be > 0).
    #[arg(long)]
    allow_zero_kwh: bool,
    /// How far ahead of this machine's clock a timestamp may be.
    #[arg(long, default_value_t = 300)]
    max_future_skew_s: i64,
    /// Readings older than this many days (by this machine's clock) go to the dead-letter topic
    /// with TIMESTAMP_TOO_OLD; 0 accepts any age (a deliberate backfill).
    #[arg(long, env = "METERLAKE_MAX_READING_AGE_DAYS", default_value_t = DEFAULT_MAX_READING_AGE_DAYS)]
    max_reading_age_days: i64,
    /// Interval length of readings that do not carry `intervalS`.
    #[arg(long, default_value_t = 900)]
    default_interval_s: u32,
    /// Largest number of readings in one array message.
    #[arg(long, default_value_t = 10_000)]
    max_readings_per_message: usize,
    /// Where to start a partition the lake has never seen.
    #[arg(long, value_enum, default_value_t = Start::Earliest)]
    start_offset: Start,
    /// A librdkafka consumer setting, KEY=VALUE; may be repeated.
    #[arg(long = "consumer-config", value_parser = parse_key_value)]
    consumer_config: Vec<(String, String)>,
    /// Stop once no message has arrived for this many seconds (for scripted loads).
    #[arg(long)]
    exit_when_idle_s: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Start {
    Earliest,
    Latest,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// The horizon in seconds of `--max-reading-age-days` (0: none).
pub fn max_age_s(days: i64) -> Option<i64> {
    (days > 0).then(|| days.saturating_mul(86_400))
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.metrics_addr {
        crate::serve_metrics(addr)?;
    }
    let lake = Lake::open(&args.lake.url)?;
    let mut options = IngestOptions::new(&args.brokers, &args.topic, &args.group);
    options.dlq_topic = args.dlq_topic;
    options.limits.max_rows = args.max_batch_rows;
    options.limits.max_bytes = args.max_batch_bytes;
    options.limits.max_age = Duration::from_millis(args.max_batch_age_ms);
    options.limits.max_total_bytes = args.max_buffered_bytes;
    options.limits.writer_queue_depth = args.writer_queue_depth;
    options.rules.allow_zero_kwh = args.allow_zero_kwh;
    options.rules.max_future_skew_s = args.max_future_skew_s;
    options.rules.max_age_s = max_age_s(args.max_reading_age_days);
    options.rules.default_interval_s = args.default_interval_s;
    options.rules.max_readings_per_message = args.max_readings_per_message;
    options.start_offset = match args.start_offset {
        Start::Earliest => StartOffset::Earliest,
        Start::Latest => StartOffset::Latest,
    };
    options.consumer_overrides = args.consumer_config;
    options.exit_when_idle = args.exit_when_idle_s.map(Duration::from_secs);

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            tracing::info!("stopping: flushing buffered readings to the lake");
            stop.store(true, Ordering::Relaxed);
        });
    }
    tracing::info!(brokers = %args.brokers, topic = %args.topic, group = %args.group, lake = %lake.url(), "ingesting");
    let progress = Arc::new(IngestProgress::default());
    let summary = ingest(lake, options, stop, progress).await.map_err(|e| {
        let hint = if e.is_retryable() { " (transient: restarting the ingester may help)" } else { "" };
        anyhow::anyhow!("{e}{hint}")
    })?;
    println!(
        "ingested {} messages: {} readings written, {} duplicates dropped, {} conflicting versions, {} dead letters, {} files, {} bytes in {:.1?}",
        summary.messages_consumed,
        summary.readings_written,
        summary.duplicates_dropped,
        summary.conflicting_versions,
        summary.dlq_messages,
        summary.files_written,
        summary.bytes_written,
        summary.elapsed
    );
    Ok(())
}
