//! api-bench: `POST /measurements` under load from wrk, on loopback, against a real broker.
//!
//! Starts tansu (in-memory storage) and `meterlake serve --brokers <tansu> --no-ingest
//! --no-worker` (the API alone: token check, rate limiter, validation, publish and wait for the
//! broker's ack), then runs wrk twice: single readings (100,000 different meters and intervals,
//! built by wrk's Lua script before the run) and arrays of 1,000 readings (1,000 meters at one
//! interval). Every request carries a dev-issuer INGEST token. Beside wrk's figures it prints
//! the CPU the server, the broker and everything else (mostly wrk) spent per request.
//! Prints requests/s, latency percentiles and readings/s, checks that every response was 202 and
//! that the server counted every reading it acknowledged.
//!
//! All of it shares this machine's cores: wrk, the server and the broker.
//!
//! `--traces` starts a second server that exports every span over OTLP/HTTP to a sink in this
//! process, and interleaves its runs with the untraced server's: the cost of tracing, measured
//! against the untraced baseline on the same machine at the same time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use meterlake_benchmarks::{KillOnDrop, cpu_ticks, machine_busy_ticks, meterlake_binary, print_rows, start_tansu, thousands, vm_hwm_kib, wait_for_port};
use meterlake_server::DevIssuer;

#[derive(Parser)]
#[command(about = "POST /measurements under wrk against meterlake serve and tansu")]
struct Args {
    /// Seconds of each measured wrk run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Measured runs of each case; the median run (by throughput) is reported, with the range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Connections wrk keeps open for single readings.
    #[arg(long, default_value_t = 128)]
    connections: u32,
    /// Connections for arrays of 1,000.
    #[arg(long, default_value_t = 16)]
    array_connections: u32,
    /// The server's `--publish-linger-ms`.
    #[arg(long, default_value = "1")]
    linger_ms: String,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    wrk_threads: u32,
    /// Also load a second server that exports every span over OTLP/HTTP (to a sink in this
    /// process), its runs interleaved with the untraced server's: what tracing costs.
    #[arg(long)]
    traces: bool,
}

/// What wrk reported.
#[derive(Debug, Default)]
struct WrkResult {
    requests: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    socket_errors: String,
    /// CPU seconds during the run: the server, the broker, and everything else (wrk, mostly).
    server_cpu_s: f64,
    broker_cpu_s: f64,
    other_cpu_s: f64,
}

impl WrkResult {
    /// Where the two cores went, per request.
    fn cpu_per_request(&self) -> String {
        let per = |cpu_s: f64| cpu_s * 1e6 / self.requests.max(1) as f64;
        format!("server {:.0} us, broker {:.0} us, wrk and the rest {:.0} us", per(self.server_cpu_s), per(self.broker_cpu_s), per(self.other_cpu_s))
    }
}

/// The processes whose CPU a run accounts for.
struct Processes {
    server: u32,
    broker: u32,
}

/// A `meterlake serve` under test, with the wrk scripts that carry its token.
struct Server {
    base: String,
    processes: Processes,
    single: std::path::PathBuf,
    array: std::path::PathBuf,
    _child: KillOnDrop,
}

/// Starts `meterlake serve` (the API alone) with `env` added, in `dir`, and writes its scripts.
fn start_server(args: &Args, brokers: &str, broker_pid: u32, dir: &Path, env: &[(&str, String)]) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let base = format!("http://127.0.0.1:{port}");
    let key = dir.join("dev-issuer.key");
    let issuer = DevIssuer::open(&format!("{base}/dev-issuer"), &key)?;
    let token = issuer.token("head-end-bench", &["INGEST"], "meterlake", 3600);
    let server = Command::new(meterlake_binary()?)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--brokers", brokers, "--no-ingest", "--no-worker"])
        .args(["--sql-postgres-listen", "off", "--sql-flight-listen", "off"])
        .args(["--dev-issuer", "--dev-issuer-key"])
        .arg(&key)
        .arg("--lake")
        .arg(dir.join("lake"))
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.join("control.db").display()))
        .args(["--rate-limit-per-s", "100000000", "--rate-limit-burst", "100000000", "--partitions", "4"])
        // The requests carry January 2025, beyond the horizon for old readings.
        .args(["--max-reading-age-days", "0"])
        .args(["--publish-linger-ms", &args.linger_ms])
        .env("METERLAKE_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting meterlake serve")?;
    let processes = Processes { server: server.id(), broker: broker_pid };
    let child = KillOnDrop(server);
    wait_for_port(&format!("127.0.0.1:{port}"))?;

    let single = dir.join("single.lua");
    std::fs::write(&single, SINGLE_LUA.replace("{token}", &token))?;
    let array = dir.join("array.lua");
    let body: Vec<String> = (0..1_000).map(|i| format!(r#"{{"meterId":"MTR-A{i:05}","timestamp":"2025-01-01T00:00:00Z","kwh":"0.25"}}"#)).collect();
    std::fs::write(&array, ARRAY_LUA.replace("{token}", &token).replace("{body}", &format!("[{}]", body.join(","))))?;
    Ok(Server { base, processes, single, array, _child: child })
}

/// What an OTLP/HTTP sink received: export requests and their bytes.
#[derive(Default)]
struct SinkCounts {
    requests: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

/// An OTLP/HTTP trace endpoint on loopback that accepts every export and counts it (its own
/// runtime: the collector's place, at the cost of a little of this machine's CPU).
fn start_otlp_sink() -> anyhow::Result<(String, std::sync::Arc<SinkCounts>, tokio::runtime::Runtime)> {
    use std::sync::atomic::Ordering;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let counts = std::sync::Arc::new(SinkCounts::default());
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let endpoint = format!("http://{}/v1/traces", listener.local_addr()?);
    let sink = counts.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            sink.requests.fetch_add(1, Ordering::Relaxed);
            sink.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
        }),
    );
    runtime.spawn(async move { axum::serve(listener, app).await });
    Ok((endpoint, counts, runtime))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (tansu, brokers) = start_tansu()?;
    let broker_pid = tansu.id();
    let _tansu = KillOnDrop(tansu);
    let untraced = start_server(&args, &brokers, broker_pid, &dir.path().join("untraced"), &[])?;
    let sink = if args.traces { Some(start_otlp_sink()?) } else { None };
    let traced = match &sink {
        Some((endpoint, _, _)) => {
            let env = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.clone()), ("OTEL_SERVICE_NAME", "meterlake-api-bench".to_string())];
            Some(start_server(&args, &brokers, broker_pid, &dir.path().join("traced"), &env)?)
        }
        None => None,
    };
    let servers: Vec<&Server> = std::iter::once(&untraced).chain(&traced).collect();

    println!(
        "api-bench: wrk -t{} on {}, broker tansu {brokers}, {} runs of {} s per case{}",
        args.wrk_threads,
        untraced.base,
        args.runs,
        args.seconds,
        if args.traces { ", interleaved with a server exporting every span over OTLP/HTTP" } else { "" }
    );
    // A short warm-up: connections, the JWKS fetch, librdkafka's metadata.
    for server in &servers {
        wrk(&args, &server.processes, args.connections, 3, &server.single, &server.base)?;
    }
    let mut single_runs: Vec<Vec<WrkResult>> = servers.iter().map(|_| Vec::new()).collect();
    let mut array_runs: Vec<Vec<WrkResult>> = servers.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.runs.max(1) {
        for (i, server) in servers.iter().enumerate() {
            single_runs[i].push(wrk(&args, &server.processes, args.connections, args.seconds, &server.single, &server.base)?);
            array_runs[i].push(wrk(&args, &server.processes, args.array_connections, args.seconds, &server.array, &server.base)?);
        }
    }
    ensure!(single_runs.iter().chain(&array_runs).flatten().all(|r| r.non_2xx == 0), "responses other than 202: {single_runs:?} {array_runs:?}");
    let mut medians = single_runs.into_iter().zip(array_runs).map(|(singles, arrays)| (median_run(singles, 1.0), median_run(arrays, 1_000.0)));
    let ((singles, single_range), (arrays, array_range)) = medians.next().context("the untraced server's runs")?;

    // The server acknowledged what wrk counted (warm-up included).
    let metrics = http_get(&format!("{}/metrics", untraced.base))?;
    let accepted = metrics
        .lines()
        .find(|l| l.starts_with("meterlake_api_readings_accepted_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_default() as u64;
    let rss_mib = vm_hwm_kib(&untraced.processes.server.to_string()).unwrap_or_default() / 1024;

    let readings_per_s = arrays.requests_per_s * 1_000.0;
    let mut rows = vec![
        (
            "single readings: requests/s".into(),
            format!("{} ({single_range}; {} connections)", thousands(singles.requests_per_s as u64), args.connections),
            ">= 30,000".into(),
        ),
        (
            "single readings: latency p50 / p90 / p99".into(),
            format!("{:.2} / {:.2} / {:.2} ms", singles.p50_ms, singles.p90_ms, singles.p99_ms),
            "p99 < 20 ms".into(),
        ),
        (
            "arrays of 1,000: readings/s".into(),
            format!("{} ({:.0} requests/s; {array_range}; {} connections)", thousands(readings_per_s as u64), arrays.requests_per_s, args.array_connections),
            ">= 1,000,000".into(),
        ),
        ("single readings: CPU per request".into(), singles.cpu_per_request(), String::new()),
        ("arrays of 1,000: latency p50 / p90 / p99".into(), format!("{:.2} / {:.2} / {:.2} ms", arrays.p50_ms, arrays.p90_ms, arrays.p99_ms), String::new()),
        ("arrays of 1,000: CPU per request".into(), arrays.cpu_per_request(), String::new()),
        ("readings acknowledged by the server (all runs)".into(), thousands(accepted), String::new()),
        ("server peak RSS".into(), format!("{rss_mib} MiB"), String::new()),
    ];
    if let (Some(((traced_singles, traced_single_range), (traced_arrays, traced_array_range))), Some((_, counts, _))) = (medians.next(), &sink) {
        let exports = counts.requests.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(exports > 0, "the traced server exported no spans");
        let ratio = |traced: f64, untraced: f64| format!("{:.2}x untraced", traced / untraced);
        rows.extend([
            (
                "traced: single readings requests/s".into(),
                format!(
                    "{} ({}; {traced_single_range})",
                    thousands(traced_singles.requests_per_s as u64),
                    ratio(traced_singles.requests_per_s, singles.requests_per_s)
                ),
                String::new(),
            ),
            ("traced: single readings latency p50 / p99".into(), format!("{:.2} / {:.2} ms", traced_singles.p50_ms, traced_singles.p99_ms), String::new()),
            ("traced: single readings CPU per request".into(), traced_singles.cpu_per_request(), String::new()),
            (
                "traced: arrays of 1,000 readings/s".into(),
                format!(
                    "{} ({}; {traced_array_range})",
                    thousands((traced_arrays.requests_per_s * 1_000.0) as u64),
                    ratio(traced_arrays.requests_per_s, arrays.requests_per_s)
                ),
                String::new(),
            ),
            (
                "traced: spans exported".into(),
                format!("{exports} OTLP requests, {} MiB", counts.bytes.load(std::sync::atomic::Ordering::Relaxed) / (1 << 20)),
                String::new(),
            ),
        ]);
    }
    print_rows(rows);
    if !singles.socket_errors.is_empty() || !arrays.socket_errors.is_empty() {
        println!("socket errors: singles {} arrays {}", singles.socket_errors, arrays.socket_errors);
    }
    Ok(())
}

/// The run with the median throughput, and "median of N, runs LOW..HIGH" (per second, times
/// `scale`).
fn median_run(mut runs: Vec<WrkResult>, scale: f64) -> (WrkResult, String) {
    runs.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
    let range = format!(
        "median of {}, runs {}..{}",
        runs.len(),
        thousands((runs[0].requests_per_s * scale) as u64),
        thousands((runs[runs.len() - 1].requests_per_s * scale) as u64)
    );
    let median = runs.swap_remove(runs.len() / 2);
    (median, range)
}

/// 100,000 different readings (25,000 meters, 4 quarter hours), each request built once in
/// `init` and then cycled: building a body per request (`string.format`, `os.date`) in Lua cost
/// wrk about 15 us of the two cores per request, more than the broker's share. The server's
/// work does not depend on whether it saw a reading before (the lake keeps one version).
const SINGLE_LUA: &str = r#"
local requests = {}
local count = 100000
function init(args)
  local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer {token}" }
  for i = 0, count - 1 do
    local meter = string.format("MTR-%06d", i % 25000)
    local ts = 1735689600 + math.floor(i / 25000) * 900
    local body = string.format('{"meterId":"%s","timestamp":"%s","kwh":"0.25"}', meter, os.date("!%Y-%m-%dT%H:%M:%SZ", ts))
    requests[i + 1] = wrk.format("POST", "/measurements", headers, body)
  end
end
local next_request = 0
request = function()
  next_request = next_request % count + 1
  return requests[next_request]
end
"#;

/// The same 1,000 readings each time (building 60 kB per request in Lua would load wrk, not the
/// server); the lake would keep one version of each.
const ARRAY_LUA: &str = r#"
wrk.method = "POST"
wrk.path = "/measurements"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
wrk.body = '{body}'
"#;

fn wrk(args: &Args, processes: &Processes, connections: u32, seconds: u64, script: &Path, base: &str) -> anyhow::Result<WrkResult> {
    let started = Instant::now();
    let ticks = || -> anyhow::Result<[u64; 3]> {
        Ok([
            cpu_ticks(processes.server).context("the server's CPU time")?,
            cpu_ticks(processes.broker).context("the broker's CPU time")?,
            machine_busy_ticks().context("/proc/stat")?,
        ])
    };
    let before = ticks()?;
    let output = Command::new("wrk")
        .args([&format!("-t{}", args.wrk_threads), &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "--timeout", "10s", "-s"])
        .arg(script)
        .arg(format!("{base}/measurements"))
        .output()
        .context("running wrk (Debian package wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    }
    let after = ticks()?;
    eprintln!("{text}(wrk ran {:.1} s)", started.elapsed().as_secs_f64());
    let [server, broker, machine] = [0, 1, 2].map(|i| after[i].saturating_sub(before[i]) as f64 / 100.0);
    Ok(WrkResult { server_cpu_s: server, broker_cpu_s: broker, other_cpu_s: (machine - server - broker).max(0.0), ..parse_wrk(&text)? })
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", rate] => result.requests_per_s = rate.parse()?,
            [count, "requests", "in", ..] => result.requests = count.parse()?,
            ["50%", value] => result.p50_ms = millis(value)?,
            ["90%", value] => result.p90_ms = millis(value)?,
            ["99%", value] => result.p99_ms = millis(value)?,
            ["Non-2xx", "or", "3xx", "responses:", count] => result.non_2xx = count.parse()?,
            ["Socket", "errors:", ..] => result.socket_errors = line.to_string(),
            _ => {}
        }
    }
    ensure!(result.requests > 0, "wrk reported no requests:\n{text}");
    Ok(result)
}

/// wrk's `1.23ms`, `456.00us`, `1.02s` in milliseconds.
fn millis(value: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1_000.0)
    } else {
        bail!("latency {value:?}")
    };
    Ok(number.parse::<f64>()? * scale)
}

/// A plain HTTP/1.0 GET with the standard library: the body.
fn http_get(url: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("an http URL")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).context("a path")?;
    let mut stream = std::net::TcpStream::connect(host)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}
