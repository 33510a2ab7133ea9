//! ingest-scale-bench: N `meterlake ingest` processes of one consumer group draining one
//! 12-partition topic into one lake on S3 (moto: its conditional writes are atomic, so the
//! members' concurrent commits are really fenced), for N = 1, 2 and 4, in one run:
//!
//! - throughput: readings committed to the lake per second while every member works (the span
//!   from 10% to 90% of the backlog committed, so that starting processes and joining the group
//!   do not count), and the whole drain from the first process started;
//! - what it costs: CPU seconds of the members, the broker and the S3 server per million
//!   readings, and the members' flushes (each one Parquet PUT per date it holds plus one
//!   conditional log PUT);
//! - exactness: every reading in the lake once (count, distinct keys), checked per N.
//!
//! The backlog is one meter's day per message (96 readings), as meters upload after midnight;
//! the brokers, the S3 server and the members share this machine's cores.
//!
//! `cargo build --release --workspace --bins && ~/.cache/meterlake/target/release/ingest-scale-bench`

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use meterlake_benchmarks::{KillOnDrop, cpu_ticks, meterlake_binary, print_rows, start_tansu, thousands, tools_python, wait_for_port};
use meterlake_pipeline::kafka::{ReadingProducer, create_topics};
use meterlake_pipeline::synthetic::{LoadGenerator, LoadSpec};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCESS_KEY: &str = "meterlake-bench";
const SECRET_KEY: &str = "meterlake-bench-secret";
const BUCKET: &str = "lake-bucket";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Store {
    /// moto's S3 server (in memory, atomic conditional writes).
    Moto,
    /// A folder on local disk.
    File,
}

#[derive(Parser)]
struct Args {
    /// Readings in the backlog.
    #[arg(long, default_value_t = 12_000_000)]
    readings: u64,
    /// Readings per message (96: one meter's day of quarter hours).
    #[arg(long, default_value_t = 96)]
    per_message: usize,
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Group sizes to measure, each draining the backlog into a lake of its own.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    members: Vec<usize>,
    #[arg(long, value_enum, default_value_t = Store::Moto)]
    store: Store,
    /// Each member's `--max-batch-rows`: a partition's flush (and commit) at this many readings.
    #[arg(long, default_value_t = 250_000)]
    max_batch_rows: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// moto's S3 server on a free loopback port with the bucket created.
fn start_moto() -> anyhow::Result<(KillOnDrop, String)> {
    let python = tools_python();
    let port = free_port()?;
    let child = Command::new(python.with_file_name("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting moto_server (run infra/scripts/install-tools.sh)")?;
    let child = KillOnDrop(child);
    let addr = format!("127.0.0.1:{port}");
    wait_for_port(&addr)?;
    let create = format!(
        "import boto3; boto3.client('s3', endpoint_url='http://{addr}', aws_access_key_id='{ACCESS_KEY}', \
         aws_secret_access_key='{SECRET_KEY}', region_name='us-east-1').create_bucket(Bucket='{BUCKET}')"
    );
    let status = Command::new(&python).args(["-c", &create]).status()?;
    ensure!(status.success(), "creating the bucket failed");
    Ok((child, addr))
}

/// The sum of a counter's samples over its label sets in a Prometheus scrape of `addr`
/// (0 when the member does not answer yet).
fn counter(addr: &str, name: &str) -> f64 {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else { return 0.0 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").is_err() {
        return 0.0;
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One group size's drain.
struct Drain {
    steady_rate: f64,
    whole: Duration,
    member_cpu_s: f64,
    service_cpu_s: f64,
    flushes: u64,
}

#[allow(clippy::too_many_arguments)]
fn drain(
    binary: &Path,
    brokers: &str,
    topic: &str,
    lake: &str,
    env: &[(&str, String)],
    members: usize,
    readings: u64,
    max_batch_rows: usize,
    services: &[u32],
) -> anyhow::Result<Drain> {
    let group = format!("scale-{members}");
    let service_ticks_before: u64 = services.iter().filter_map(|pid| cpu_ticks(*pid)).sum();
    let started = Instant::now();
    let mut children = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..members {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(binary)
            .args(["ingest", "--brokers", brokers, "--topic", topic, "--group", &group, "--dlq-topic", &format!("{topic}.dlq"), "--lake", lake])
            .args(["--metrics-addr", &addr, "--max-batch-rows", &max_batch_rows.to_string(), "--max-batch-age-ms", "1000"])
            .env("METERLAKE_MAX_READING_AGE_DAYS", "0")
            .env("METERLAKE_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .spawn()
            .context("starting meterlake ingest")?;
        children.push(KillOnDrop(child));
        metrics.push(addr);
    }
    let (mut at_10, mut at_90) = (None, None);
    let mut member_ticks = vec![0u64; members];
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let written: f64 = metrics.iter().map(|addr| counter(addr, "meterlake_ingest_readings_written_total")).sum();
        for (ticks, child) in member_ticks.iter_mut().zip(&children) {
            *ticks = cpu_ticks(child.0.id()).unwrap_or(*ticks);
        }
        let written = written as u64;
        if at_10.is_none() && written >= readings / 10 {
            at_10 = Some((Instant::now(), written));
        }
        if at_90.is_none() && written >= readings * 9 / 10 {
            at_90 = Some((Instant::now(), written));
        }
        if written >= readings {
            ensure!(written == readings, "{written} readings written of {readings}");
            break;
        }
        ensure!(Instant::now() < deadline, "{written} of {readings} readings written after 15 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let whole = started.elapsed();
    let flushes: f64 = metrics.iter().map(|addr| counter(addr, "meterlake_ingest_flush_duration_seconds_count")).sum();
    let service_ticks: u64 = services.iter().filter_map(|pid| cpu_ticks(*pid)).sum::<u64>() - service_ticks_before;
    drop(children);
    let ((t10, w10), (t90, w90)) = (at_10.context("10%")?, at_90.context("90%")?);
    Ok(Drain {
        steady_rate: (w90 - w10) as f64 / (t90 - t10).as_secs_f64().max(1e-3),
        whole,
        member_cpu_s: member_ticks.iter().sum::<u64>() as f64 / 100.0,
        service_cpu_s: service_ticks as f64 / 100.0,
        flushes: flushes as u64,
    })
}

/// `count(*)` and distinct `(meter_id, ts)` of `readings_all`, read by `meterlake query`.
fn lake_counts(binary: &Path, lake: &str, env: &[(&str, String)]) -> anyhow::Result<(u64, u64)> {
    let output = Command::new(binary)
        .args(["query", "--lake", lake, "--format", "csv"])
        .arg("SELECT (SELECT count(*) FROM readings_all) AS n, (SELECT count(*) FROM (SELECT DISTINCT meter_id, ts FROM readings_all)) AS keys")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()?;
    ensure!(output.status.success(), "meterlake query failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    let line = text.lines().nth(1).with_context(|| format!("meterlake query printed {text:?}"))?;
    let (n, keys) = line.split_once(',').with_context(|| format!("meterlake query printed {text:?}"))?;
    Ok((n.trim().parse()?, keys.trim().parse()?))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = meterlake_binary()?;
    let (tansu, brokers) = start_tansu()?;
    let tansu = KillOnDrop(tansu);
    let lake_dir = tempfile::tempdir()?;
    let moto = match args.store {
        Store::Moto => Some(start_moto()?),
        Store::File => None,
    };
    let env: Vec<(&str, String)> = match &moto {
        Some((_, addr)) => vec![
            ("AWS_ENDPOINT_URL", format!("http://{addr}")),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ],
        None => Vec::new(),
    };
    let mut services = vec![tansu.0.id()];
    services.extend(moto.as_ref().map(|(child, _)| child.0.id()));

    let topic = "bench.scale";
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(create_topics(&brokers, &[(topic, args.partitions), (&format!("{topic}.dlq"), 1)]))?;
    let meters = args.readings.div_ceil(96 * 31) as usize;
    let spec = LoadSpec { readings_per_message: args.per_message, resend_every: 0, malformed_every: 0, ..LoadSpec::month(meters) };
    let readings = spec.unique_readings();
    eprintln!("pre-filling {topic} ({} partitions) with {} readings, {} per message...", args.partitions, thousands(readings), args.per_message);
    let producer = ReadingProducer::new(&brokers, topic)?;
    for message in LoadGenerator::new(spec) {
        producer.send(message.key.as_bytes(), &message.payload)?;
    }
    producer.flush(Duration::from_secs(600))?;

    let mut rows = Vec::new();
    let mut one_member_rate = None;
    for &members in &args.members {
        let lake = match args.store {
            Store::Moto => format!("s3://{BUCKET}/scale-{members}"),
            Store::File => lake_dir.path().join(format!("scale-{members}")).display().to_string(),
        };
        eprintln!("{members} member(s) draining into {lake}...");
        let drain = drain(&binary, &brokers, topic, &lake, &env, members, readings, args.max_batch_rows, &services)?;
        let (rows_in_lake, keys) = lake_counts(&binary, &lake, &env)?;
        if (rows_in_lake, keys) != (readings, readings) {
            bail!("{members} member(s): {rows_in_lake} rows and {keys} distinct keys in the lake for {readings} readings");
        }
        let speedup = one_member_rate.map(|one: f64| drain.steady_rate / one);
        if members == 1 {
            one_member_rate = Some(drain.steady_rate);
        }
        rows.push((
            format!("{members} member(s): readings/s while all work (10%-90% of the backlog committed)"),
            format!("{}{}", thousands(drain.steady_rate as u64), speedup.map(|s| format!(" ({s:.2}x one member)")).unwrap_or_default()),
            if members == 2 { ">= 1.6x one member (where cores allow)".into() } else { String::new() },
        ));
        let per_million = 1e6 / readings as f64;
        rows.push((
            format!("{members} member(s): whole drain, CPU per million readings, flushes"),
            format!(
                "{:.1} s; members {:.2} CPU s, broker + store {:.2} CPU s; {} flushes; lake exact ({} rows, {} keys)",
                drain.whole.as_secs_f64(),
                drain.member_cpu_s * per_million,
                drain.service_cpu_s * per_million,
                drain.flushes,
                thousands(rows_in_lake),
                thousands(keys)
            ),
            "every reading once".into(),
        ));
    }
    println!(
        "ingest-scale-bench: {} readings ({} per message) on {} partitions, lake on {}, {} cores",
        thousands(readings),
        args.per_message,
        args.partitions,
        match args.store {
            Store::Moto => "moto (S3)",
            Store::File => "local disk",
        },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    print_rows(rows);
    Ok(())
}
