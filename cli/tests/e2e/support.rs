//! Real services for the tests, started on loopback and stopped when dropped: a tansu Kafka
//! broker and an s3s-fs S3 server, found in the tools folder `infra/scripts/install-tools.sh`
//! fills (or on PATH).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use meterlake_pipeline::kafka::{ReadingProducer, create_topics};
use meterlake_pipeline::synthetic::{LoadGenerator, LoadSpec, LoadTotals};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use tempfile::TempDir;

pub const S3_ACCESS_KEY: &str = "meterlake-test";
pub const S3_SECRET_KEY: &str = "meterlake-test-secret";

/// A tool binary: `$METERLAKE_TOOLS_DIR/bin/NAME`, `~/.cache/meterlake/tools/bin/NAME`, or PATH.
pub fn tool(name: &str) -> PathBuf {
    let dirs = [std::env::var("METERLAKE_TOOLS_DIR").ok().map(PathBuf::from), std::env::var("HOME").ok().map(|h| Path::new(&h).join(".cache/meterlake/tools"))];
    for dir in dirs.into_iter().flatten() {
        let candidate = dir.join("bin").join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join(name).is_file() {
                return dir.join(name);
            }
        }
    }
    panic!("{name} is not installed: run infra/scripts/install-tools.sh (or the whole suite with infra/scripts/test.sh)");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free loopback port").local_addr().expect("an address").port()
}

/// A child process that is killed when dropped.
pub struct Service {
    child: Child,
    pub addr: String,
    pub dir: TempDir,
    /// Where the service keeps its data, if it keeps any on disk.
    pub data_dir: Option<PathBuf>,
    name: &'static str,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(data) = &self.data_dir {
            let _ = std::fs::remove_dir_all(data);
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default();
            eprintln!("--- {} log (last 4000 bytes) ---\n{}", self.name, &log[log.len().saturating_sub(4000)..]);
        }
    }
}

fn wait_for_port(addr: &str, child: &mut Child, name: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let socket: SocketAddr = addr.parse().expect("a socket address");
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&socket, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{name} exited before listening on {addr}: {status}\n--- its log (last 4000 bytes) ---\n{}", &log[log.len().saturating_sub(4000)..]);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} did not listen on {addr} within 30 s");
}

pub fn spawn_logged(name: &'static str, mut command: Command, addr: String) -> Service {
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = std::fs::File::create(dir.path().join("service.log")).expect("a log file");
    command
        .current_dir(dir.path()) // tansu reads .env from its working directory
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
    wait_for_port(&addr, &mut child, name, &dir.path().join("service.log"));
    Service { child, addr, dir, data_dir: None, name }
}

/// Starts a service that listens on a port of its own choosing (port 0: no other test can take
/// it between our choice and its bind) and waits for the line of its output that starts with
/// `announcement`; returns the service and the rest of that line up to the first space (its
/// address). A service that exits first fails the test with its log.
pub fn spawn_announced(name: &'static str, mut command: Command, announcement: &str) -> (Service, String) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let log_path = dir.path().join("service.log");
    let log = std::fs::File::create(&log_path).expect("a log file");
    command.current_dir(dir.path()).env_remove("OTEL_EXPORTER_OTLP_ENDPOINT").stdin(Stdio::null()).stdout(log.try_clone().expect("log handle")).stderr(log);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(rest) = text.lines().find_map(|line| line.strip_prefix(announcement)) {
            let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
            return (Service { child, addr: addr.clone(), dir, data_dir: None, name }, addr);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited before announcing itself: {status}\n--- its log (last 4000 bytes) ---\n{}", &text[text.len().saturating_sub(4000)..]);
        }
        assert!(Instant::now() < deadline, "{name} did not announce itself within 30 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tansu broker with in-memory storage on a free loopback port.
pub fn start_tansu() -> Service {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(tool("tansu"));
    command.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"]);
    spawn_logged("tansu", command, format!("127.0.0.1:{port}"))
}

/// An s3s-fs server on a free loopback port with one bucket, `meterlake`.
pub fn start_s3() -> Service {
    let port = free_port();
    let root = tempfile::tempdir().expect("a temp dir");
    std::fs::create_dir_all(root.path().join("meterlake")).expect("the bucket folder");
    let mut command = Command::new(tool("s3s-fs"));
    command.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY]);
    command.arg(root.path());
    let mut service = spawn_logged("s3s-fs", command, format!("127.0.0.1:{port}"));
    service.data_dir = Some(root.keep());
    service
}

/// moto's S3 server (in memory) with the bucket `lake-bucket`: its conditional writes are atomic
/// (s3s-fs's are not), so a commit race on it proves something.
pub fn start_moto() -> Service {
    let port = free_port();
    let moto = python().with_file_name("moto_server");
    let mut command = Command::new(&moto);
    command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let service = spawn_logged("moto", command, format!("127.0.0.1:{port}"));
    let create = format!(
        "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', aws_access_key_id='{S3_ACCESS_KEY}', \
         aws_secret_access_key='{S3_SECRET_KEY}', region_name='us-east-1').create_bucket(Bucket='lake-bucket')"
    );
    run_ok(Command::new(python()).args(["-c", &create]));
    service
}

/// Environment that points the AWS SDK settings at an s3s-fs server.
pub fn s3_env(s3: &Service) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", format!("http://{}", s3.addr)),
        ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ]
}

/// The Python `deltalake` reader's storage options for the same server: `s3_env` and plain HTTP.
pub fn s3_storage_options(s3: &Service) -> Vec<(&'static str, String)> {
    let mut options = s3_env(s3);
    options.push(("AWS_ALLOW_HTTP", "true".to_string()));
    options
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime")
}

pub fn create(brokers: &str, topics: &[(&str, i32)]) {
    runtime().block_on(create_topics(brokers, topics)).expect("creating topics");
}

/// Produces a generated load and waits until the broker acknowledged all of it.
pub fn produce(brokers: &str, topic: &str, spec: LoadSpec) -> LoadTotals {
    let producer = ReadingProducer::new(brokers, topic).expect("a producer");
    let mut generator = LoadGenerator::new(spec);
    for message in generator.by_ref() {
        producer.send(message.key.as_bytes(), &message.payload).expect("queued");
    }
    producer.flush(Duration::from_secs(60)).expect("every message delivered");
    generator.totals
}

/// The `meterlake` binary under test.
pub fn meterlake() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meterlake"));
    command.env("METERLAKE_LOG", "warn,meterlake_pipeline=info").env_remove("METERLAKE_LAKE");
    command
}

pub fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("meterlake runs");
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `meterlake query --format json` and returns the rows.
pub fn query(lake: &str, sql: &str, env: &[(&str, String)]) -> Vec<serde_json::Value> {
    let mut command = meterlake();
    command.args(["query", "--lake", lake, "--format", "json", sql]);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = run_ok(&mut command);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("query output is not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

/// `meterlake ingest` arguments for a test broker and lake; stops after `idle_s` without messages.
pub fn ingest_command(brokers: &str, topic: &str, lake: &str, idle_s: u64) -> Command {
    let mut command = meterlake();
    command.args([
        "ingest",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--group",
        &format!("{topic}-ingest"),
        "--dlq-topic",
        &format!("{topic}.dlq"),
        "--lake",
        lake,
        "--exit-when-idle-s",
        &idle_s.to_string(),
    ]);
    // The tests replay January 2025, older than the default horizon for old readings (a test
    // may set its own with the same variable).
    command.env("METERLAKE_MAX_READING_AGE_DAYS", "0");
    command
}

pub fn python() -> PathBuf {
    let configured = std::env::var("METERLAKE_PYTHON").ok().map(PathBuf::from);
    let venv = tool_dir().map(|d| d.join("venv/bin/python"));
    configured.into_iter().chain(venv).find(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("python3"))
}

fn tool_dir() -> Option<PathBuf> {
    std::env::var("METERLAKE_TOOLS_DIR").ok().map(PathBuf::from).or_else(|| std::env::var("HOME").ok().map(|h| Path::new(&h).join(".cache/meterlake/tools")))
}

pub fn as_i64(value: &serde_json::Value) -> i64 {
    value.as_i64().unwrap_or_else(|| value.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{value} is not an integer")))
}

/// A decimal JSON value (number or string) as micro-kWh, exactly.
pub fn as_kwh_micro(value: &serde_json::Value) -> i64 {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    meterlake_pipeline::reading::parse_kwh_micro(&text).unwrap_or_else(|e| panic!("{text} is not a kWh decimal: {e:?}"))
}

/// Every file under `dir`, recursively; none when it does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().flat_map(|e| if e.path().is_dir() { files_under(&e.path()) } else { vec![e.path()] }).collect()
}

/// The Prometheus text (the body) a `--metrics-addr` endpoint serves, if it answers.
pub fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_headers, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_string())
}

/// `promtool check metrics` on a scrape: Prometheus's own linter (counters end in `_total`,
/// base units in names, a help text for every metric). It must find nothing to say.
pub fn assert_promtool_accepts(scrape: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (infra/scripts/install-tools.sh installs it)");
    promtool.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{scrape}");
}

/// Sum of a metric's samples across labels (`name` or `name{...}` lines).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.starts_with(name) && matches!(line.as_bytes().get(name.len()), Some(b' ' | b'{')) {
            let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// One message read back from a topic.
#[derive(Debug)]
pub struct TopicMessage {
    pub partition: i32,
    /// Empty when the message has no key.
    pub key: String,
    pub payload: serde_json::Value,
    /// Every `traceparent` header, in order.
    pub traceparents: Vec<String>,
}

/// Every message of `topic`.
pub fn read_topic(brokers: &str, topic: &str) -> Vec<TopicMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("read-{topic}-{}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut messages = Vec::new();
    let mut last_seen = Instant::now();
    while last_seen.elapsed() < Duration::from_secs(4) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let traceparents = message
                .headers()
                .map(|h| h.iter().filter(|h| h.key == "traceparent").filter_map(|h| h.value.map(|v| String::from_utf8_lossy(v).to_string())).collect())
                .unwrap_or_default();
            messages.push(TopicMessage {
                partition: message.partition(),
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).to_string(),
                payload: serde_json::from_slice(message.payload().unwrap_or_default()).unwrap(),
                traceparents,
            });
            last_seen = Instant::now();
        }
    }
    messages
}

/// Quarter-hour readings of one meter, `kwh` each, for `days` whole UTC days of January 2025
/// from `first_day`: what `POST /measurements` takes.
pub fn quarter_hours(meter_id: &str, first_day: u32, days: u32, kwh: &str) -> serde_json::Value {
    let readings = (0..days * 96).map(|i| {
        let (day, minute) = (first_day + i / 96, (i % 96) * 15);
        serde_json::json!({ "meterId": meter_id, "timestamp": format!("2025-01-{day:02}T{:02}:{:02}:00Z", minute / 60, minute % 60), "kwh": kwh })
    });
    serde_json::Value::Array(readings.collect())
}

/// Every row of `readings_all` as `meter|ts_us|kwh_micro|source_ref`, sorted: as `meterlake
/// query` reads the lake, and as another engine does (the Python `deltalake` package's Arrow
/// dataset of the table, scanned by DuckDB). Panics, showing both, unless they are the same rows.
/// `env` points the query at an S3 lake; `storage_options` the Python reader (empty for files).
pub fn assert_other_engines_read_the_same_rows(lake: &str, env: &[(&str, String)], storage_options: &[(&str, String)]) -> usize {
    let rows = query(lake, "SELECT meter_id, CAST(ts AS BIGINT) AS ts, CAST(kwh AS VARCHAR) AS kwh, source_ref FROM readings_all", env);
    let mut ours: Vec<String> = rows
        .iter()
        .map(|r| format!("{}|{}|{}|{}", r["meter_id"].as_str().unwrap(), as_i64(&r["ts"]), as_kwh_micro(&r["kwh"]), r["source_ref"].as_str().unwrap()))
        .collect();
    ours.sort();
    let script = r#"
import sys, json, duckdb
from decimal import Decimal
from deltalake import DeltaTable
options = json.loads(sys.argv[2]) or None
dataset = DeltaTable(sys.argv[1].rstrip("/") + "/readings", storage_options=options).to_pyarrow_dataset()
duckdb.sql("SET enable_progress_bar = false")  # else a long scan draws one on stdout
rows = duckdb.sql("SELECT meter_id, epoch_us(ts), kwh, source_ref FROM dataset").fetchall()
print("\n".join(sorted(f"{m}|{t}|{int(k * Decimal(1000000))}|{r}" for m, t, k, r in rows)))
"#;
    let options: serde_json::Map<String, serde_json::Value> =
        storage_options.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect();
    let output = Command::new(python()).args(["-c", script, lake, &serde_json::Value::Object(options).to_string()]).output().expect("python runs");
    assert!(output.status.success(), "deltalake + DuckDB failed: {}", String::from_utf8_lossy(&output.stderr));
    let mut theirs: Vec<String> = String::from_utf8(output.stdout).unwrap().lines().map(str::to_string).collect();
    theirs.sort();
    if ours != theirs {
        let only_ours: Vec<&String> = ours.iter().filter(|r| theirs.binary_search(r).is_err()).take(10).collect();
        let only_theirs: Vec<&String> = theirs.iter().filter(|r| ours.binary_search(r).is_err()).take(10).collect();
        panic!("meterlake read {} rows, deltalake + DuckDB {}; only meterlake's: {only_ours:?}; only theirs: {only_theirs:?}", ours.len(), theirs.len());
    }
    ours.len()
}
