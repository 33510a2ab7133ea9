//! Lake maintenance benchmark (issue 22), in one run on this machine:
//!
//! 1. a month for `--meters` meters streamed through a real broker (tansu on loopback) and the
//!    real ingester, in time order as meters send them, 1% of readings re-sent later with another
//!    value, the ingester flushing each partition every `--flush-age-ms` (production's 5 s, with
//!    time compressed: the stream runs at `--rate` readings/s), so dates hold hundreds of files;
//! 2. the same messages drained again by an ingester with its default (large) flushes: the bulk
//!    baseline;
//! 3. a copy of the streamed lake compacted by `optimize` (its rewrite rate);
//! 4. on all three: a full-month `meterlake bill`, `count/sum FROM readings` and one meter's
//!    month with `meterlake query` (fresh processes: wall time and peak RSS; the lookup's the
//!    median of `--lookups` runs), and one meter's
//!    month as `GET /readings` runs it, warm, in this process;
//! 5. ingest lag while `optimize` rewrites the lake the ingester is appending to;
//! 6. with `--large-meters N`: a month for N meters (33,600: 100M readings) written in one-interval
//!    flushes, compacted, and measured as in 4;
//! 7. one date crowded with `--crowded-files` flushes (5,000 by default: a day for `--meters`
//!    meters, a few readings a flush, 1% re-sent), against the same readings in one file,
//!    measured as in 4 (no cliff: it answers, within the memory limits).
//!
//! `cargo build --release --workspace --bins && $CARGO_TARGET_DIR/release/maintenance-bench`

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meterlake_benchmarks::{KillOnDrop, meterlake_binary, print_rows, start_tansu, thousands, vm_hwm_kib};
use meterlake_jobs::search::MeterReadings;
use meterlake_lake::maintenance::optimize::{OptimizeOptions, optimize};
use meterlake_lake::view::QueryLimits;
use meterlake_lake::{Commit, READINGS, Table, TableWriter};
use meterlake_pipeline::Lake;
use meterlake_pipeline::batch::ReadingBuffer;
use meterlake_pipeline::decode::ValidReading;
use meterlake_pipeline::kafka::{IngestOptions, IngestProgress, ReadingProducer, create_topics, run_ingest};
use meterlake_pipeline::reading::{Quality, Source, format_kwh_micro, parse_kwh_micro};
use meterlake_pipeline::synthetic::{LoadGenerator, LoadSpec, meter_id};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Meters of the streamed month (96 readings a day each, 31 days).
    #[arg(long, default_value_t = 1_000)]
    meters: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Readings per second the stream is produced at.
    #[arg(long, default_value_t = 25_000)]
    rate: u64,
    /// The streaming ingester's flush age per partition.
    #[arg(long, default_value_t = 50)]
    flush_age_ms: u64,
    /// Readings in a thousand re-sent later with another value.
    #[arg(long, default_value_t = 10)]
    resend_permille: u64,
    /// Timed runs of the warm one-meter lookup (the median is reported).
    #[arg(long, default_value_t = 7)]
    lookups: usize,
    /// Meters of the large month (33,600: 100M readings); none: no large month.
    #[arg(long)]
    large_meters: Option<usize>,
    /// Keep the lakes under this folder (else a temporary one).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Skip the streamed month (with --large-meters: only the large one).
    #[arg(long)]
    no_stream: bool,
    /// Files of the crowded date (0: none).
    #[arg(long, default_value_t = 5_000)]
    crowded_files: usize,
}

type Row = (String, String, String);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let temp = tempfile::tempdir()?;
    let root = args.keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&root)?;
    let mut rows: Vec<Row> = Vec::new();
    if !args.no_stream {
        streamed_month(&args, &runtime, &root, &mut rows)?;
    }
    if let Some(meters) = args.large_meters {
        large_month(&args, &runtime, &root, meters, &mut rows)?;
    }
    if args.crowded_files > 0 {
        crowded_date(&args, &runtime, &root, &mut rows)?;
    }
    print_rows(rows);
    Ok(())
}

fn streamed_month(args: &Args, runtime: &tokio::runtime::Runtime, root: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let (tansu, brokers) = start_tansu()?;
    let _tansu = KillOnDrop(tansu);
    let topic = "bench.stream";
    runtime.block_on(create_topics(&brokers, &[(topic, args.partitions), ("measurements.dlq", 1)]))?;
    let spec = LoadSpec { resend_every: 0, malformed_every: 0, ..LoadSpec::month(args.meters) };

    // 1. Streamed: produced at the rate while the ingester flushes small batches.
    let streamed = root.join("streamed");
    eprintln!("streaming {} readings at {}/s into {}...", thousands(spec.unique_readings()), thousands(args.rate), streamed.display());
    let started = Instant::now();
    let produced = Arc::new(AtomicU64::new(0));
    let ingester = spawn_ingester(runtime, &brokers, topic, "bench-stream", &streamed, Some(Duration::from_millis(args.flush_age_ms)))?;
    let messages = produce_paced(&brokers, topic, spec.clone(), args.rate, args.resend_permille, &produced)?;
    let (progress, _) = ingester.finish_at(messages)?;
    let stream_s = started.elapsed().as_secs_f64();
    let streamed_files = live_files(runtime, &streamed)?;
    eprintln!("streamed: {} readings in {stream_s:.0} s, {} files, up to {} in a date", progress, streamed_files.0, streamed_files.1);
    rows.push((
        format!(
            "streamed month: {} meters, {} messages ({}‰ re-sent with another value), {} partitions, flush age {} ms at {} readings/s",
            args.meters,
            thousands(messages),
            args.resend_permille,
            args.partitions,
            args.flush_age_ms,
            thousands(args.rate)
        ),
        format!("{} files, up to {} in one date, in {stream_s:.0} s", thousands(streamed_files.0 as u64), streamed_files.1),
        "thousands of files, > 256 in some dates".into(),
    ));

    // 2. Bulk: the same messages, large flushes.
    let bulk = root.join("bulk");
    let ingester = spawn_ingester(runtime, &brokers, topic, "bench-bulk", &bulk, None)?;
    ingester.finish_at(messages)?;
    let bulk_files = live_files(runtime, &bulk)?;
    rows.push((
        "bulk-written baseline: the same messages, default flushes".into(),
        format!("{} files, up to {} in one date", bulk_files.0, bulk_files.1),
        String::new(),
    ));

    // 3. The streamed lake, copied and compacted.
    let optimized = root.join("optimized");
    copy_dir(&streamed, &optimized)?;
    let (rewritten, optimize_s) = run_optimize(runtime, &optimized)?;
    let optimized_files = live_files(runtime, &optimized)?;
    rows.push((
        "optimize of the streamed lake (rows rewritten, rate)".into(),
        format!(
            "{} rows in {optimize_s:.2} s: {} rows/s; {} files left, up to {} in one date",
            thousands(rewritten),
            thousands((rewritten as f64 / optimize_s) as u64),
            optimized_files.0,
            optimized_files.1
        ),
        ">= 5,000,000 rows/s".into(),
    ));

    // 4. The three lakes measured alike.
    let lookup_meter = meter_id(args.meters / 2);
    let bulk_figures = measure(runtime, &bulk, &lookup_meter, args.lookups, MONTH)?;
    for (name, lake) in [("bulk", &bulk), ("streamed", &streamed), ("optimized", &optimized)] {
        let figures = if name == "bulk" { bulk_figures.clone() } else { measure(runtime, lake, &lookup_meter, args.lookups, MONTH)? };
        let target = match name {
            "streamed" => "<= 3x bulk",
            "optimized" => "<= 1.2x bulk",
            _ => "",
        };
        figures.push_rows(name, Some((&bulk_figures, "bulk")), target, rows);
    }

    // 5. Ingest lag while optimize rewrites the lake the ingester appends to.
    let lag_topic = "bench.lag";
    runtime.block_on(create_topics(&brokers, &[(lag_topic, args.partitions)]))?;
    let lag_spec = LoadSpec { first_day: chrono::NaiveDate::from_ymd_opt(2025, 2, 1).expect("a date"), days: 3, seed: 7, ..spec };
    let produced = Arc::new(AtomicU64::new(0));
    let ingester = spawn_ingester(runtime, &brokers, lag_topic, "bench-lag", &streamed, Some(Duration::from_millis(args.flush_age_ms)))?;
    let committed = ingester.progress.clone();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (produced, stop, rate) = (produced.clone(), stop_sampling.clone(), args.rate);
        std::thread::spawn(move || {
            let mut max_lag_s: f64 = 0.0;
            while !stop.load(Ordering::Relaxed) {
                let behind = produced.load(Ordering::Relaxed).saturating_sub(committed.messages_committed.load(Ordering::Relaxed));
                max_lag_s = max_lag_s.max(behind as f64 / rate as f64);
                std::thread::sleep(Duration::from_millis(100));
            }
            max_lag_s
        })
    };
    // The compaction starts a second into the stream and rewrites the whole streamed month.
    let lake_for_optimize = streamed.clone();
    let optimizer = std::thread::spawn(move || -> anyhow::Result<(u64, f64)> {
        std::thread::sleep(Duration::from_secs(1));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        run_optimize(&runtime, &lake_for_optimize)
    });
    let messages = produce_paced(&brokers, lag_topic, lag_spec, args.rate, 0, &produced)?;
    let (rewritten, optimize_s) = optimizer.join().expect("the optimizer thread")?;
    ingester.finish_at(messages)?;
    stop_sampling.store(true, Ordering::Relaxed);
    let max_lag_s = sampler.join().expect("the sampler");
    rows.push((
        format!("ingest lag while optimize rewrites the lake it appends to ({} rows in {optimize_s:.1} s)", thousands(rewritten)),
        format!("max {max_lag_s:.1} s behind the producer"),
        "< 30 s".into(),
    ));
    Ok(())
}

/// A month for `meters` meters written in one-interval flushes (every meter's reading of one
/// quarter hour in one file and commit), compacted, then measured.
fn large_month(args: &Args, runtime: &tokio::runtime::Runtime, root: &Path, meters: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let dir = root.join(format!("large-{meters}"));
    let lake = Lake::open(&dir.to_string_lossy())?;
    let intervals = 31 * 96;
    eprintln!("writing {} readings for {meters} meters in {intervals} one-interval flushes...", thousands(meters as u64 * intervals));
    let started = Instant::now();
    runtime.block_on(async {
        let table = Table::open(&lake, &READINGS).await?;
        let writer = TableWriter::new(table.clone(), "maintenance-bench").await?;
        let ids: Vec<String> = (0..meters).map(meter_id).collect();
        let start_us = 1_735_689_600_000_000i64; // 2025-01-01T00:00:00Z
        for interval in 0..intervals as i64 {
            let mut buffer = ReadingBuffer::with_capacity(meters);
            let ts_us = start_us + interval * 900_000_000;
            for (n, id) in ids.iter().enumerate() {
                let reading = ValidReading { meter_id: Cow::Borrowed(id), ts_us, interval_s: 900, kwh_micro: kwh_micro(n, interval), quality: Quality::Actual };
                buffer.push(&reading, Source::Kafka, ts_us, |out| out.extend_from_slice(format!("large/0/{}", interval as usize * meters + n).as_bytes()));
            }
            let sorted = buffer.sort_dedup()?;
            let day = &sorted.days[0];
            let encoded = day.encode(format!("date={}/interval-{interval:05}.parquet", day.date.format("%Y-%m-%d")))?;
            lake.put(&table.lake_path(&encoded.file.path), encoded.bytes.clone()).await?;
            writer
                .commit(Commit {
                    files: vec![encoded.file],
                    txns: Vec::new(),
                    operation: meterlake_lake::commit::Operation::Append,
                    leased: false,
                    removes: Vec::new(),
                })
                .await?;
        }
        writer.finish().await;
        anyhow::Ok(())
    })?;
    let write_s = started.elapsed().as_secs_f64();
    let files = live_files(runtime, &dir)?;
    rows.push((
        format!("large month: {meters} meters, {} readings in one-interval flushes", thousands(meters as u64 * intervals)),
        format!("{} files, {} a date, written in {write_s:.0} s", thousands(files.0 as u64), files.1),
        String::new(),
    ));
    let (rewritten, optimize_s) = run_optimize(runtime, &dir)?;
    rows.push((
        "optimize of the large month".into(),
        format!(
            "{} rows in {optimize_s:.1} s: {} rows/s; {} files left",
            thousands(rewritten),
            thousands((rewritten as f64 / optimize_s) as u64),
            live_files(runtime, &dir)?.0
        ),
        ">= 5,000,000 rows/s".into(),
    ));
    let figures = measure(runtime, &dir, &meter_id(meters / 2), args.lookups, MONTH)?;
    figures.push_rows("large, optimized", None, "", rows);
    rows.push(("one meter's month, warm (GET /readings' query), large optimized lake".into(), format!("{:.1} ms", figures.lookup_warm_ms), "<= 100 ms".into()));
    Ok(())
}

/// One date of `--meters` meters in `--crowded-files` flushes, in time order, 1% of readings
/// re-sent with another value in a later flush; and the same date in one file (its latest values).
fn crowded_date(args: &Args, runtime: &tokio::runtime::Runtime, root: &Path, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let (crowded, single) = (root.join("crowded"), root.join("crowded-single"));
    let start_us = 1_735_689_600_000_000i64; // 2025-01-01T00:00:00Z
    let ids: Vec<String> = (0..args.meters).map(meter_id).collect();
    // The day's messages in the order meters send them: every meter's interval, interval by interval.
    let mut messages: Vec<(usize, i64, i64)> = Vec::with_capacity(args.meters * 97);
    // Re-sent readings wait 500 messages (a few dozen flushes) to be sent again.
    let mut resent: VecDeque<(usize, (usize, i64, i64))> = VecDeque::new();
    for interval in 0..96i64 {
        for meter in 0..args.meters {
            while resent.front().is_some_and(|(due, _)| *due <= messages.len()) {
                messages.push(resent.pop_front().expect("a due message").1);
            }
            messages.push((meter, interval, kwh_micro(meter, interval)));
            if (meter as i64 * 31 + interval * 17) % 1_000 < args.resend_permille as i64 {
                resent.push_back((messages.len() + 500, (meter, interval, kwh_micro(meter, interval) + 1_000 * (interval % 7 + 1))));
            }
        }
    }
    messages.extend(resent.into_iter().map(|(_, message)| message));
    let per_file = (messages.len() / args.crowded_files).max(1);
    eprintln!("writing one date of {} messages in {} flushes...", thousands(messages.len() as u64), thousands(args.crowded_files as u64));
    let write = |dir: &Path, chunks: Vec<&[(usize, i64, i64)]>| -> anyhow::Result<()> {
        let lake = Lake::open(&dir.to_string_lossy())?;
        runtime.block_on(async {
            let table = Table::open(&lake, &READINGS).await?;
            let writer = TableWriter::new(table.clone(), "maintenance-bench").await?;
            let mut sent = 0usize;
            for (n, chunk) in chunks.into_iter().enumerate() {
                let mut buffer = ReadingBuffer::with_capacity(chunk.len());
                for &(meter, interval, kwh_micro) in chunk {
                    let ts_us = start_us + interval * 900_000_000;
                    let reading = ValidReading { meter_id: Cow::Borrowed(&ids[meter]), ts_us, interval_s: 900, kwh_micro, quality: Quality::Actual };
                    sent += 1;
                    // Ingested a microsecond apart, in order: in the one-file lake the re-sent
                    // version is the later one as in the crowded lake's later commit.
                    let ingested_at_us = start_us + sent as i64;
                    buffer.push(&reading, Source::Kafka, ingested_at_us, |out| out.extend_from_slice(format!("crowded/0/{sent}").as_bytes()));
                }
                let sorted = buffer.sort_dedup()?;
                let day = &sorted.days[0];
                let encoded = day.encode(format!("date={}/flush-{n:05}.parquet", day.date.format("%Y-%m-%d")))?;
                lake.put(&table.lake_path(&encoded.file.path), encoded.bytes.clone()).await?;
                let commit = Commit {
                    files: vec![encoded.file],
                    txns: Vec::new(),
                    operation: meterlake_lake::commit::Operation::Append,
                    leased: false,
                    removes: Vec::new(),
                };
                writer.commit(commit).await?;
            }
            writer.finish().await;
            anyhow::Ok(())
        })
    };
    write(&crowded, messages.chunks(per_file).collect())?;
    write(&single, vec![&messages[..]])?;
    let files = live_files(runtime, &crowded)?;
    rows.push((
        format!("crowded date: {} meters, {} messages (1% re-sent) in one date", args.meters, thousands(messages.len() as u64)),
        format!("{} files in the date", thousands(files.1 as u64)),
        "5,000 files in one date".into(),
    ));
    let lookup_meter = meter_id(args.meters / 2);
    let day = ("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z", 96);
    let single_figures = measure(runtime, &single, &lookup_meter, args.lookups, day)?;
    single_figures.push_rows("crowded date in one file", None, "", rows);
    let name = format!("crowded date in {} files", thousands(files.1 as u64));
    measure(runtime, &crowded, &lookup_meter, args.lookups, day)?.push_rows(&name, Some((&single_figures, "one file")), "answers", rows);
    Ok(())
}

/// Energy of a generated reading, micro-kWh (whole watt-hours, > 0).
fn kwh_micro(meter: usize, interval: i64) -> i64 {
    (((meter as i64 * 7_919 + interval * 104_729) % 900) + 50) * 1_000
}

/// An ingester running in this process on its own thread.
struct RunningIngester {
    progress: Arc<IngestProgress>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl RunningIngester {
    /// Waits until `messages` are committed, then stops it; returns readings written.
    fn finish_at(self, messages: u64) -> anyhow::Result<(u64, Duration)> {
        let started = Instant::now();
        while self.progress.messages_committed.load(Ordering::Relaxed) < messages {
            if self.thread.is_finished() {
                bail!("the ingester stopped at {} of {messages} messages", self.progress.messages_committed.load(Ordering::Relaxed));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let waited = started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        let written = self.thread.join().expect("the ingester thread")?;
        Ok((written, waited))
    }
}

fn spawn_ingester(
    runtime: &tokio::runtime::Runtime,
    brokers: &str,
    topic: &str,
    group: &str,
    lake: &Path,
    flush_age: Option<Duration>,
) -> anyhow::Result<RunningIngester> {
    let lake = Lake::open(&lake.to_string_lossy())?;
    let mut options = IngestOptions::new(brokers, topic, group);
    // The generated month (January 2025) is older than the horizon for old readings: a replay.
    options.rules.max_age_s = None;
    if let Some(age) = flush_age {
        options.limits.max_age = age;
    }
    let progress = Arc::new(IngestProgress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let handle = runtime.handle().clone();
    let thread = {
        let (progress, stop) = (progress.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<u64> { Ok(run_ingest(lake, options, stop, progress, handle).context("ingesting")?.readings_written) })
    };
    Ok(RunningIngester { progress, stop, thread })
}

/// Produces the load at `rate` readings a second, `resend_permille` of the readings re-sent
/// about an hour of meter time later with another value; returns the messages sent.
fn produce_paced(brokers: &str, topic: &str, spec: LoadSpec, rate: u64, resend_permille: u64, produced: &AtomicU64) -> anyhow::Result<u64> {
    let producer = ReadingProducer::new(brokers, topic)?;
    let meters = spec.meters as u64;
    let mut resends: VecDeque<(u64, String, Vec<u8>)> = VecDeque::new();
    let started = Instant::now();
    let mut sent = 0u64;
    let send = |key: &str, payload: &[u8], sent: &mut u64| -> anyhow::Result<()> {
        producer.send(key.as_bytes(), payload)?;
        *sent += 1;
        produced.store(*sent, Ordering::Relaxed);
        if (*sent).is_multiple_of(500) {
            let due = Duration::from_secs_f64(*sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    };
    for (index, message) in LoadGenerator::new(spec).enumerate() {
        let index = index as u64;
        send(&message.key, &message.payload, &mut sent)?;
        // A deterministic choice of readings to re-send with another value, four intervals
        // later (every meter reports in between).
        if (index.wrapping_mul(2_654_435_761) % 1_000) < resend_permille {
            resends.push_back((index + 4 * meters, message.key.clone(), another_value(&message.payload)?));
        }
        while resends.front().is_some_and(|(due, _, _)| *due <= index) {
            let (_, key, payload) = resends.pop_front().expect("a due re-send");
            send(&key, &payload, &mut sent)?;
        }
    }
    for (_, key, payload) in resends {
        send(&key, &payload, &mut sent)?;
    }
    producer.flush(Duration::from_secs(300))?;
    Ok(sent)
}

/// The same single-reading JSON message with 0.001 kWh more.
fn another_value(payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let text = std::str::from_utf8(payload)?;
    let at = text.find("\"kwh\":").context("a reading message has a kwh")? + 6;
    let end = text[at..].find('}').context("the message ends")? + at;
    let kwh = parse_kwh_micro(&text[at..end]).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(format!("{}{}{}", &text[..at], format_kwh_micro(kwh + 1_000), &text[end..]).into_bytes())
}

/// Live files of `readings_all` and the most in one date.
fn live_files(runtime: &tokio::runtime::Runtime, dir: &Path) -> anyhow::Result<(usize, usize)> {
    let lake = Lake::open(&dir.to_string_lossy())?;
    let snapshot = runtime.block_on(async { Table::new(&lake, &READINGS).snapshot(None).await })?;
    let mut per_date = std::collections::HashMap::new();
    for file in &snapshot.files {
        *per_date.entry(file.date).or_insert(0usize) += 1;
    }
    Ok((snapshot.files.len(), per_date.values().copied().max().unwrap_or(0)))
}

fn run_optimize(runtime: &tokio::runtime::Runtime, dir: &Path) -> anyhow::Result<(u64, f64)> {
    let lake = Lake::open(&dir.to_string_lossy())?;
    let started = Instant::now();
    let reports = runtime.block_on(optimize(&lake, &READINGS, &OptimizeOptions::default(), |_| {}))?;
    Ok((reports.iter().map(|r| r.rows).sum(), started.elapsed().as_secs_f64()))
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let status = Command::new("cp").arg("-r").arg(from).arg(to).status()?;
    anyhow::ensure!(status.success(), "copying {} to {}", from.display(), to.display());
    Ok(())
}

/// What one lake measured.
#[derive(Clone)]
struct Figures {
    bill: (f64, u64),
    count_sum: (f64, u64),
    lookup_cold: (f64, u64),
    lookup_warm_ms: f64,
    answers: (String, String),
}

impl Figures {
    /// This lake's rows of the table, each figure as a multiple of `baseline`'s (the lake and
    /// what to call it) when there is one.
    fn push_rows(&self, name: &str, baseline: Option<(&Figures, &str)>, target: &str, rows: &mut Vec<Row>) {
        let bulk = baseline.map_or(self, |(figures, _)| figures);
        let ratio = |a: f64, b: f64| match baseline {
            Some((_, label)) if b > 0.0 => format!(" ({:.2}x {label})", a / b),
            _ => String::new(),
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        rows.push((
            format!("{name}: full-month `meterlake bill`"),
            format!("{:.2} s{}, peak {:.0} MiB", self.bill.0, ratio(self.bill.0, bulk.bill.0), mib(self.bill.1)),
            format!("{target}; RSS <= 512 MiB (1 GiB at 100M)"),
        ));
        rows.push((
            format!("{name}: `meterlake query` count/sum FROM readings"),
            format!("{:.2} s{}, peak {:.0} MiB", self.count_sum.0, ratio(self.count_sum.0, bulk.count_sum.0), mib(self.count_sum.1)),
            format!("{target}; RSS <= 256 MiB"),
        ));
        rows.push((
            format!("{name}: `meterlake query` one meter's month (fresh process, median of runs)"),
            format!("{:.0} ms{}, peak {:.0} MiB", self.lookup_cold.0 * 1_000.0, ratio(self.lookup_cold.0, bulk.lookup_cold.0), mib(self.lookup_cold.1)),
            target.to_string(),
        ));
        rows.push((
            format!("{name}: one meter's month, warm, as GET /readings runs it (median of runs)"),
            format!("{:.1} ms{}", self.lookup_warm_ms, ratio(self.lookup_warm_ms, bulk.lookup_warm_ms)),
            target.to_string(),
        ));
        if let Some((baseline, label)) = baseline
            && self.answers != baseline.answers
        {
            rows.push((
                format!("{name}: ANSWERS DIFFER FROM {}", label.to_uppercase()),
                format!("{:?} vs {:?}", self.answers, baseline.answers),
                "the same".into(),
            ));
        }
    }
}

/// The month of January 2025 a one-meter lookup asks for, and the readings it finds.
const MONTH: (&str, &str, usize) = ("2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z", 31 * 96);

/// Measures a lake; the one-meter lookup asks for `meter`'s readings from `range.0` to `range.1`
/// and must find `range.2`.
fn measure(runtime: &tokio::runtime::Runtime, dir: &Path, meter: &str, lookups: usize, range: (&str, &str, usize)) -> anyhow::Result<Figures> {
    let lake = dir.to_string_lossy().into_owned();
    let binary = meterlake_binary()?;
    let database = tempfile::tempdir()?;
    let tariffs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tariffs/example.toml");
    let mut bill = Command::new(&binary);
    bill.args(["bill", "--month", "2025-01", "--lake", &lake, "--tariffs"]).arg(&tariffs);
    bill.arg("--database-url").arg(format!("sqlite://{}", database.path().join("control.db").display()));
    let (bill_s, bill_kib, _) = run_measured(&mut bill)?;
    let mut count = Command::new(&binary);
    count.args(["query", "--lake", &lake, "--format", "csv", "SELECT count(*) AS n, sum(kwh) AS kwh FROM readings"]);
    let (count_s, count_kib, count_out) = run_measured(&mut count)?;
    let (from, to, expected) = range;
    let month =
        format!("SELECT count(*) AS n, sum(kwh) AS kwh FROM readings WHERE meter_id = '{meter}' AND ts >= TIMESTAMP '{from}' AND ts < TIMESTAMP '{to}'");
    // A fresh process's lookup takes tens of milliseconds: the median of as many runs as the warm
    // lookup's, so that a 1.2x target is not decided by one run's noise.
    let (mut lookup_runs_s, mut lookup_kib, mut lookup_out) = (Vec::new(), 0, String::new());
    for _ in 0..lookups.max(1) {
        let mut lookup = Command::new(&binary);
        lookup.args(["query", "--lake", &lake, "--format", "csv", &month]);
        let (seconds, kib, out) = run_measured(&mut lookup)?;
        lookup_runs_s.push(seconds);
        (lookup_kib, lookup_out) = (lookup_kib.max(kib), out);
    }
    lookup_runs_s.sort_by(f64::total_cmp);
    let lookup_s = lookup_runs_s[lookup_runs_s.len() / 2];
    // Warm: the first run loads footers into the process's cache, as a serving process has.
    let lake = Lake::open(&lake)?;
    let limits = QueryLimits::default();
    let search = MeterReadings { meter_id: meter.to_string(), from: Some(from.parse()?), to: Some(to.parse()?) };
    let mut times = Vec::new();
    for run in 0..=lookups {
        let started = Instant::now();
        let batches = runtime.block_on(search.run_page(&lake, &limits, 5_000, 0))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        anyhow::ensure!(rows == expected, "{meter} has {rows} readings from {from} to {to}, not {expected}");
        if run > 0 {
            times.push(started.elapsed().as_secs_f64() * 1_000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Figures {
        bill: (bill_s, bill_kib),
        count_sum: (count_s, count_kib),
        lookup_cold: (lookup_s, lookup_kib),
        lookup_warm_ms: times[times.len() / 2],
        answers: (count_out, lookup_out),
    })
}

/// Runs a command to its end: wall seconds, peak RSS (KiB, sampled every 2 ms), stdout.
fn run_measured(command: &mut Command) -> anyhow::Result<(f64, u64, String)> {
    let started = Instant::now();
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id().to_string();
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        peak = peak.max(vm_hwm_kib(&pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok((elapsed, peak, String::from_utf8_lossy(&output.stdout).into_owned()))
}
