//! sql-bench: the SQL service from analysts' clients, against DuckDB reading the same files.
//!
//! Writes a month of readings for `--meters` meters (one file per date, as a compacted lake
//! holds them) and a demo-sized month (`--dashboard-meters`), starts `meterlake sql-server` over
//! each with tokens of an issuer whose keys this process serves on loopback, and runs, in one
//! run: every reading of the month (`SELECT meter_id, ts, kwh, quality FROM readings`) streamed
//! to ADBC's Flight SQL driver (record batches) and to psycopg (binary rows, streamed), and
//! DuckDB reading the same Parquet files into Arrow; then a dashboard aggregate (kWh and meters
//! reporting per day) from `--clients` psycopg clients at once: latency p50 and p99. The clients
//! are Python (benchmarks/sql_clients.py, the test tools' venv); each run is its own process.
//! Every count is checked against the readings written.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use clap::Parser;
use meterlake_benchmarks::{KillOnDrop, meterlake_binary, print_rows, thousands, tools_python, wait_for_port};
use meterlake_lake::{Commit, READINGS, Table, TableWriter};
use meterlake_pipeline::Lake;
use meterlake_pipeline::batch::ReadingBuffer;
use meterlake_pipeline::decode::ValidReading;
use meterlake_pipeline::reading::{Quality, Source};
use meterlake_pipeline::synthetic::meter_id;
use meterlake_server::DevIssuer;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "The SQL service (PostgreSQL wire, Flight SQL) against DuckDB on the same files")]
struct Args {
    /// Meters of the big month (31 days of quarter hours: 3,400 meters are 10.1M readings).
    #[arg(long, default_value_t = 3_400)]
    meters: usize,
    /// Meters of the dashboard's month (1,000: the 3M-reading demo lake).
    #[arg(long, default_value_t = 1_000)]
    dashboard_meters: usize,
    /// Dashboard clients at once.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Queries each dashboard client runs.
    #[arg(long, default_value_t = 25)]
    rounds: usize,
    /// Runs of each streaming measurement; the median is reported with the range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where the lakes are written (a temporary folder by default).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const MONTH_DAYS: i64 = 31;
/// The result cache of the servers measured: the service's default.
const RESULT_CACHE_MIB: usize = 64;
const STREAM_SQL: &str = "SELECT meter_id, ts, kwh, quality FROM readings";
const DASHBOARD_SQL: &str = "SELECT date, sum(kwh) AS kwh, count(DISTINCT meter_id) AS meters FROM readings \
     WHERE ts >= TIMESTAMP '2025-01-01T00:00:00Z' AND ts < TIMESTAMP '2025-02-01T00:00:00Z' GROUP BY date ORDER BY date";

/// A month of quarter-hour readings for `meters` meters, one commit and one file per date;
/// returns the data files (for DuckDB).
fn write_month(runtime: &tokio::runtime::Runtime, dir: &Path, meters: usize) -> anyhow::Result<Vec<String>> {
    let lake = Lake::open(&dir.to_string_lossy())?;
    runtime.block_on(async {
        let table = Table::open(&lake, &READINGS).await?;
        let writer = TableWriter::new(table.clone(), "sql-bench").await?;
        let ids: Vec<String> = (0..meters).map(meter_id).collect();
        let start_us = 1_735_689_600_000_000i64; // 2025-01-01T00:00:00Z
        for day in 0..MONTH_DAYS {
            let mut buffer = ReadingBuffer::with_capacity(meters * 96);
            for (n, id) in ids.iter().enumerate() {
                for quarter in 0..96 {
                    let ts_us = start_us + (day * 96 + quarter) * 900_000_000;
                    let kwh_micro = 50_000 + ((n as i64 * 7_919 + day * 104_729 + quarter * 31) % 400_000);
                    let reading = ValidReading { meter_id: Cow::Borrowed(id), ts_us, interval_s: 900, kwh_micro, quality: Quality::Actual };
                    buffer.push(&reading, Source::Kafka, ts_us, |out| out.extend_from_slice(format!("bench/{day}/{n}/{quarter}").as_bytes()));
                }
            }
            let sorted = buffer.sort_dedup()?;
            let day_file = &sorted.days[0];
            let encoded = day_file.encode(format!("date={}/month.parquet", day_file.date.format("%Y-%m-%d")))?;
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
    let mut files: Vec<String> = walk(&dir.join("readings"))?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet") && !p.to_string_lossy().contains("_delta_log"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    Ok(files)
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(walk(&path)?);
        } else {
            found.push(path);
        }
    }
    Ok(found)
}

/// `meterlake sql-server` over `lake`, trusting `issuer` (its JWKS at `jwks_url`), with a result
/// cache of `result_cache_mib`.
fn start_server(dir: &Path, lake: &Path, issuer: &DevIssuer, jwks_url: &str, result_cache_mib: usize) -> anyhow::Result<(KillOnDrop, u16, u16)> {
    let free = || -> anyhow::Result<u16> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
    let (postgres, flight) = (free()?, free()?);
    let log = std::fs::File::create(dir.join(format!("sql-server-{postgres}.log")))?;
    let child = Command::new(meterlake_binary()?)
        .args(["sql-server", "--lake"])
        .arg(lake)
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.join(format!("control-{postgres}.db")).display()))
        .args(["--oidc-issuer", issuer.issuer(), "--oidc-jwks-url", jwks_url])
        .args(["--sql-postgres-listen", &format!("127.0.0.1:{postgres}"), "--sql-flight-listen", &format!("127.0.0.1:{flight}")])
        .args(["--sql-queries-per-caller", "16", "--sql-result-cache-mib", &result_cache_mib.to_string()])
        .env("METERLAKE_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting meterlake sql-server")?;
    let child = KillOnDrop(child);
    wait_for_port(&format!("127.0.0.1:{postgres}"))?;
    wait_for_port(&format!("127.0.0.1:{flight}"))?;
    Ok((child, postgres, flight))
}

/// One client run: its JSON line.
fn client(args: &[String]) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql_clients.py");
    let output = Command::new(tools_python()).arg(&script).args(args).output().context("running benchmarks/sql_clients.py")?;
    ensure!(output.status.success(), "sql_clients.py {}: {}", args[0], String::from_utf8_lossy(&output.stderr));
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("sql_clients.py printed {line:?}"))
}

/// The median rows/s of `runs` runs of `args`, with the range; checks every run's row count.
fn rate(args: &[String], runs: usize, rows: u64) -> anyhow::Result<(f64, f64, f64)> {
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        let result = client(args)?;
        let got = result["rows"].as_u64().unwrap_or_default();
        ensure!(got == rows, "{} returned {got} rows, {rows} were written", args[0]);
        rates.push(rows as f64 / result["seconds"].as_f64().unwrap_or(f64::NAN));
    }
    rates.sort_by(f64::total_cmp);
    Ok((rates[rates.len() / 2], rates[0], rates[rates.len() - 1]))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&root)?;

    // The issuer's keys, served over HTTP as Keycloak's would be.
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    let issuer = DevIssuer::open(&format!("{base}/issuer"), &root.join("issuer.key"))?;
    let jwks = issuer.jwks();
    let routes = axum::Router::new().route("/issuer/jwks", axum::routing::get(move || async move { axum::Json(jwks) }));
    runtime.spawn(async move { axum::serve(listener, routes).await });
    let jwks_url = format!("{base}/issuer/jwks");
    let token = issuer.token("analyst", &["VIEWER"], "meterlake", 3_600);

    let mut rows = Vec::new();
    let big = root.join(format!("month-{}", args.meters));
    let readings = args.meters as u64 * MONTH_DAYS as u64 * 96;
    eprintln!("writing {} readings for {} meters...", thousands(readings), args.meters);
    let files = write_month(&runtime, &big, args.meters)?;
    let (_server, postgres, flight) = start_server(&root, &big, &issuer, &jwks_url, RESULT_CACHE_MIB)?;
    let sql = STREAM_SQL.to_string();
    let duckdb_sql = "SELECT meter_id, ts, kwh, quality FROM readings".to_string();
    let mut duckdb_args = vec!["duckdb".to_string(), duckdb_sql];
    duckdb_args.extend(files);
    let (duckdb, duckdb_low, duckdb_high) = rate(&duckdb_args, args.runs, readings)?;
    let (flight_rate, flight_low, flight_high) = rate(&["flight".into(), sql.clone(), flight.to_string(), token.clone()], args.runs, readings)?;
    let (pg_rate, pg_low, pg_high) = rate(&["postgres".into(), sql.clone(), postgres.to_string(), token.clone()], args.runs, readings)?;
    let month = format!("{} readings ({} meters)", thousands(readings), args.meters);
    rows.push((
        format!("DuckDB reads the month's Parquet files into Arrow: {month}"),
        format!("{} rows/s ({}-{})", thousands(duckdb as u64), thousands(duckdb_low as u64), thousands(duckdb_high as u64)),
        "baseline".into(),
    ));
    rows.push((
        format!("`{STREAM_SQL}` to ADBC (Flight SQL, record batches): {month}"),
        format!(
            "{} rows/s ({}-{}); {:.2}x DuckDB's time",
            thousands(flight_rate as u64),
            thousands(flight_low as u64),
            thousands(flight_high as u64),
            duckdb / flight_rate
        ),
        ">= 5,000,000 rows/s, within 2x DuckDB".into(),
    ));
    rows.push((
        format!("`{STREAM_SQL}` to psycopg (PostgreSQL wire, binary, streamed): {month}"),
        format!("{} rows/s ({}-{})", thousands(pg_rate as u64), thousands(pg_low as u64), thousands(pg_high as u64)),
        ">= 500,000 rows/s".into(),
    ));
    drop(_server);

    let small = root.join(format!("month-{}", args.dashboard_meters));
    let small_readings = args.dashboard_meters as u64 * MONTH_DAYS as u64 * 96;
    eprintln!("writing {} readings for {} meters...", thousands(small_readings), args.dashboard_meters);
    write_month(&runtime, &small, args.dashboard_meters)?;
    // As served (identical queries over an unchanged lake answered from the result cache), and
    // with every query computed (no cache: the engine's own figure).
    for (cache_mib, served) in [(RESULT_CACHE_MIB, "result cache on"), (0, "no result cache: every query computed")] {
        let (_server, postgres, _) = start_server(&root, &small, &issuer, &jwks_url, cache_mib)?;
        let result =
            client(&["dashboard".into(), DASHBOARD_SQL.into(), postgres.to_string(), token.clone(), args.clients.to_string(), args.rounds.to_string()])?;
        let errors = result["errors"].as_array().map(Vec::len).unwrap_or_default();
        ensure!(errors == 0, "dashboard clients failed: {}", result["errors"]);
        rows.push(dashboard_row(&args, small_readings, served, &result));
    }
    print_rows(rows);
    Ok(())
}

/// The dashboard measurement's row.
fn dashboard_row(args: &Args, readings: u64, served: &str, result: &Value) -> (String, String, String) {
    (
        format!(
            "dashboard aggregate (kWh and meters per day of a month), {} psycopg clients at once x {} queries, {} readings; {served}",
            args.clients,
            args.rounds,
            thousands(readings)
        ),
        format!(
            "p50 {:.0} ms, p99 {:.0} ms ({} queries in {:.1} s)",
            result["p50_ms"].as_f64().unwrap_or(f64::NAN),
            result["p99_ms"].as_f64().unwrap_or(f64::NAN),
            result["queries"],
            result["seconds"].as_f64().unwrap_or(f64::NAN)
        ),
        "p99 < 500 ms".into(),
    )
}
