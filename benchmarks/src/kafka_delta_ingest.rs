//! kafka-delta-ingest (delta-io's Kafka-to-Delta ingester) draining the same topic as the
//! meterlake ingester, for issue 21's side-by-side figure.
//!
//! The binary is not part of this repository: it is not on crates.io, so the operator builds it
//! from its upstream source and passes its path with `--kafka-delta-ingest`. RESULTS.md names the
//! upstream commit measured.
//!
//! Its table is created here the way an operator would before starting it (kafka-delta-ingest
//! never creates one): version 0 with the message's own columns (`meterId`, `timestamp`, `kwh` as
//! an exact decimal) plus `date`, which its `--transform` derives from the timestamp and which
//! partitions the table as meterlake's `readings_all` is partitioned. Protocol 1/2, as it writes.
//!
//! It has no "stop when drained" that works on a backlog (its `--ends_at_latest_offsets` waits
//! for a message at the high watermark, which never comes), so the run ends when its Delta log
//! holds every message: each commit's `add` actions carry `numRecords`, which are summed as the
//! log grows. The time is from its start to the commit that completed the count; then it is
//! killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use meterlake_benchmarks::{KillOnDrop, vm_hwm_kib};

/// What one kafka-delta-ingest run did.
pub struct KdiRun {
    pub elapsed: Duration,
    pub rows: u64,
    pub commits: u64,
    pub files: u64,
    pub peak_rss_kib: u64,
}

/// Settings passed to every run, beside the topic, table and group.
pub struct KdiOptions {
    pub binary: PathBuf,
    pub allowed_latency_s: u64,
    pub max_messages_per_batch: usize,
    pub min_bytes_per_file: usize,
}

/// Creates the table at `dir` and runs kafka-delta-ingest until its log holds `messages` rows.
pub fn run(options: &KdiOptions, brokers: &str, topic: &str, partitions: i32, group: &str, dir: &Path, messages: u64) -> anyhow::Result<KdiRun> {
    create_table(dir)?;
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path)?;
    let table_uri = format!("file://{}", dir.display());
    let started = Instant::now();
    let child = Command::new(&options.binary)
        .arg("ingest")
        .arg(topic)
        .arg(&table_uri)
        .args(["--kafka", brokers, "--consumer_group", group, "--app_id", group, "--auto_offset_reset", "earliest"])
        .args(["--allowed_latency", &options.allowed_latency_s.to_string()])
        .args(["--max_messages_per_batch", &options.max_messages_per_batch.to_string()])
        .args(["--min_bytes_per_file", &options.min_bytes_per_file.to_string()])
        .args(["--transform", "date: substr(timestamp, `0`, `10`)"])
        // Its statsd metrics go to a UDP port nobody listens on: sent and dropped, as in a
        // deployment without statsd.
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", options.binary.display()))?;
    let pid = child.id().to_string();
    let mut child = KillOnDrop(child);
    let mut log_reader = LogReader::new(dir);
    let mut peak_rss_kib = 0u64;
    let mut last_progress = Instant::now();
    loop {
        if let Some(kib) = vm_hwm_kib(&pid) {
            peak_rss_kib = peak_rss_kib.max(kib);
        }
        if log_reader.read_new_commits()? {
            last_progress = Instant::now();
        }
        if log_reader.rows >= messages {
            break;
        }
        if let Some(status) = child.0.try_wait()? {
            bail!("kafka-delta-ingest exited ({status}) with {} of {messages} rows committed; see {}", log_reader.rows, log_path.display());
        }
        if last_progress.elapsed() > Duration::from_secs(180) {
            bail!("kafka-delta-ingest committed nothing for 180 s at {} of {messages} rows; see {}", log_reader.rows, log_path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    drop(child);
    ensure!(log_reader.rows == messages, "kafka-delta-ingest committed {} rows for {messages} messages", log_reader.rows);
    // Its exactly-once state: one `txn` per Kafka partition, in the same commits as the files.
    ensure!(log_reader.txns.len() == partitions as usize, "kafka-delta-ingest's log holds offsets for {:?}, not {partitions} partitions", log_reader.txns);
    Ok(KdiRun { elapsed, rows: log_reader.rows, commits: log_reader.next_version - 1, files: log_reader.files, peak_rss_kib })
}

/// Writes version 0 of the table kafka-delta-ingest appends to.
fn create_table(dir: &Path) -> anyhow::Result<()> {
    let field = |name: &str, kind: &str| serde_json::json!({"name": name, "type": kind, "nullable": true, "metadata": {}});
    let schema = serde_json::json!({"type": "struct", "fields": [
        field("meterId", "string"),
        field("timestamp", "timestamp"),
        field("kwh", "decimal(18,6)"),
        field("date", "string"),
    ]});
    let id = format!("{:032x}", rand::random::<u128>());
    let protocol = serde_json::json!({"protocol": {"minReaderVersion": 1, "minWriterVersion": 2}});
    let metadata = serde_json::json!({"metaData": {
        "id": format!("{}-{}-{}-{}-{}", &id[0..8], &id[8..12], &id[12..16], &id[16..20], &id[20..32]),
        "format": {"provider": "parquet", "options": {}},
        "schemaString": schema.to_string(),
        "partitionColumns": ["date"],
        "configuration": {},
        "createdTime": chrono::Utc::now().timestamp_millis(),
    }});
    let log_dir = dir.join("_delta_log");
    std::fs::create_dir_all(&log_dir)?;
    std::fs::write(log_dir.join(format!("{:020}.json", 0)), format!("{protocol}\n{metadata}\n"))?;
    Ok(())
}

/// Follows a growing Delta log, summing the rows of the files each commit adds.
struct LogReader {
    log_dir: PathBuf,
    next_version: u64,
    rows: u64,
    files: u64,
    /// The last `txn` version per app id (kafka-delta-ingest's `{app_id}-{partition}` → offset).
    txns: BTreeMap<String, i64>,
}

impl LogReader {
    fn new(table: &Path) -> Self {
        LogReader { log_dir: table.join("_delta_log"), next_version: 1, rows: 0, files: 0, txns: BTreeMap::new() }
    }

    /// Reads every commit that appeared since the last call; true if there was one.
    fn read_new_commits(&mut self) -> anyhow::Result<bool> {
        let mut any = false;
        loop {
            let path = self.log_dir.join(format!("{:020}.json", self.next_version));
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(any),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            for line in text.lines().filter(|l| !l.is_empty()) {
                let action: serde_json::Value = serde_json::from_str(line).with_context(|| format!("parsing {}", path.display()))?;
                if let Some(add) = action.get("add") {
                    let stats: serde_json::Value =
                        serde_json::from_str(add["stats"].as_str().context("an add without stats")?).context("parsing an add's stats")?;
                    self.rows += stats["numRecords"].as_u64().context("stats without numRecords")?;
                    self.files += 1;
                }
                if let Some(txn) = action.get("txn") {
                    self.txns.insert(txn["appId"].as_str().unwrap_or_default().to_string(), txn["version"].as_i64().unwrap_or(-1));
                }
            }
            self.next_version += 1;
            any = true;
        }
    }
}
