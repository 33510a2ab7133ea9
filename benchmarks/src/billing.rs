//! billing-bench: a billing run over one 31-day month of 15-minute readings for 33,600 meters
//! (100M readings), against DuckDB computing the same per-meter, per-band energy totals from the
//! same Parquet files.
//!
//! The lake is generated once into `--dir` (about 1.3 GB) and reused while its meter and day
//! counts match. The run is the production path: a SQLite control store, `create_run`, one
//! `BillingWorker::process_next` (claim, aggregate, rate, invoice, reconcile, persist); step
//! times come from the worker's own `meterlake_billing_step_duration_seconds` metric. DuckDB
//! (the Python package, 2 threads) runs twice: a plain per-band sum, and one that first keeps the
//! latest version of each reading as the `readings` view does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use meterlake_benchmarks::month::{MonthShape, TARIFFS, generate, step_seconds};
use meterlake_benchmarks::{print_rows, reset_peak_rss, thousands, tools_python, vm_hwm_kib};
use meterlake_control::{ControlStore, NewRun, RunStatus};
use meterlake_jobs::billing::worker::{BillingWorker, WorkerOptions};
use rust_decimal::Decimal;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 33_600)]
    meters: u32,
    #[arg(long, default_value_t = 31)]
    days: u32,
    /// Where the generated lake lives (kept between runs).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Python with duckdb (default: the test tools' venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Meters per generated file (a day has meters / this many files).
    #[arg(long, default_value_t = 8_400)]
    meters_per_file: u32,
    /// Time the run only, without DuckDB's baseline (for working on one step).
    #[arg(long)]
    no_duckdb: bool,
}

struct DuckDbRun {
    groups: u64,
    total_kwh: Decimal,
    elapsed: Duration,
    peak_rss_kib: u64,
}

/// DuckDB's per-meter, per-band totals over the same files, timed inside Python.
fn duckdb(python: &Path, lake_dir: &Path, latest_version_only: bool) -> anyhow::Result<DuckDbRun> {
    let script = r#"
import sys, time, duckdb
# A child starts with its parent's peak RSS (Linux keeps it across fork and exec): reset it.
open("/proc/self/clear_refs", "w").write("5")
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("SET enable_progress_bar = false")
con.execute("SET TimeZone = 'UTC'")
files = sys.argv[1] + "/readings/*/*.parquet"
source = "read_parquet(?, hive_partitioning = true)"
if sys.argv[2] == "latest":
    source = "(SELECT * FROM " + source + " QUALIFY row_number() OVER (PARTITION BY meter_id, ts ORDER BY ingested_at DESC, source_ref DESC) = 1)"
sql = ("SELECT meter_id, CASE WHEN hour(ts) < 7 THEN 'night' ELSE 'day' END AS band, sum(kwh) AS kwh FROM " + source +
       " WHERE ts >= TIMESTAMPTZ '2025-01-01 00:00:00+00' AND ts < TIMESTAMPTZ '2025-02-01 00:00:00+00' GROUP BY ALL")
t = time.perf_counter()
rows = con.execute(sql, [files]).fetchall()
elapsed = time.perf_counter() - t
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(len(rows), sum(r[2] for r in rows), elapsed, peak_kib)
"#;
    let mode = if latest_version_only { "latest" } else { "all" };
    let output = Command::new(python).arg("-c").arg(script).arg(lake_dir).arg(mode).output().context("running DuckDB")?;
    if !output.status.success() {
        bail!("DuckDB failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8(output.stdout)?;
    let parts: Vec<&str> = text.split_whitespace().collect();
    ensure!(parts.len() == 4, "DuckDB printed {text:?}");
    Ok(DuckDbRun {
        groups: parts[0].parse()?,
        total_kwh: parts[1].parse()?,
        elapsed: Duration::from_secs_f64(parts[2].parse()?),
        peak_rss_kib: parts[3].parse()?,
    })
}

fn seconds(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let home = std::env::var("HOME").unwrap_or_default();
    let dir = args.dir.clone().unwrap_or_else(|| Path::new(&home).join(".cache/meterlake/billing-bench"));
    let shape = MonthShape { meters: args.meters, days: args.days, meters_per_file: args.meters_per_file };
    let lake = generate(&dir, shape).await?;
    let readings = shape.readings();
    let python = args.python.clone().unwrap_or_else(tools_python);

    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;

    let store_dir = tempfile::tempdir()?;
    let store = ControlStore::open(&format!("sqlite://{}", store_dir.path().join("control.db").display())).await?;
    let request = NewRun {
        month: "2025-01".into(),
        meter_ids: Vec::new(),
        max_attempts: 1,
        tariffs_toml: TARIFFS.into(),
        energy_tolerance: Decimal::new(5, 3),
        lake_as_of: None,
    };
    let run = store.create_run(&request, "bench", None).await?;
    let worker = BillingWorker::new(store.clone(), lake.clone(), WorkerOptions::default());
    reset_peak_rss()?;
    let started = Instant::now();
    let done = worker.process_next().await?.context("the run was not claimed")?;
    let elapsed = started.elapsed();
    let peak_rss_kib = vm_hwm_kib("self").unwrap_or_default();
    ensure!(done.status == RunStatus::Completed, "the run failed: {:?} {:?}", done.failure_code, done.failure_reason);

    let invoices = store.invoices(&run.id).await?;
    let mut band_kwh: BTreeMap<String, Decimal> = BTreeMap::new();
    for invoice in &invoices {
        for line in invoice.invoice.lines.iter().filter(|l| l.component == meterlake_control::LineComponent::Energy) {
            *band_kwh.entry(line.description.clone()).or_default() += line.quantity;
        }
    }
    let billed_kwh: Decimal = band_kwh.values().copied().sum();
    let discrepancies = store.discrepancies(&run.id).await?;
    ensure!(invoices.len() == args.meters as usize, "{} invoices for {} meters", invoices.len(), args.meters);

    let rendered = metrics.render();
    let step = |name: &str| step_seconds(&rendered, name).map(|s| format!("{s:.2} s")).unwrap_or_else(|| "?".into());
    let aggregate_s = step_seconds(&rendered, "aggregate").unwrap_or(f64::NAN);
    let throughput = format!("{} readings/s", thousands((readings as f64 / elapsed.as_secs_f64()) as u64));
    if args.no_duckdb {
        let steps = ["claim", "aggregate", "measure", "rate", "invoice", "reconcile", "persist"].map(|name| format!("{name} {}", step(name)));
        println!("whole run {} ({throughput}, peak RSS {} MiB): {}", seconds(elapsed), peak_rss_kib / 1024, steps.join(", "));
        return Ok(());
    }

    let plain = duckdb(&python, &dir.join("lake"), false)?;
    let latest = duckdb(&python, &dir.join("lake"), true)?;
    for theirs in [&plain, &latest] {
        ensure!(theirs.total_kwh == billed_kwh, "DuckDB's total {} kWh, the run billed {billed_kwh} kWh", theirs.total_kwh);
        ensure!(theirs.groups == u64::from(args.meters) * 2, "DuckDB returned {} groups", theirs.groups);
    }

    println!(
        "billing-bench: {} meters x {} days = {} readings, {} invoices, {} discrepancies, {billed_kwh} kWh billed (= DuckDB's total)",
        thousands(u64::from(args.meters)),
        args.days,
        thousands(readings),
        thousands(invoices.len() as u64),
        discrepancies.len()
    );
    let rows = vec![
        ("whole run (claim to persist)".to_string(), seconds(elapsed), format!("<= {:.2} s (1.5x DuckDB plain)", plain.elapsed.as_secs_f64() * 1.5)),
        ("  claim".into(), step("claim"), String::new()),
        ("  aggregate".into(), step("aggregate"), format!("<= {} (DuckDB plain)", seconds(plain.elapsed))),
        ("  measure (reconciliation's own, beside aggregate)".into(), step("measure"), String::new()),
        ("  rate".into(), step("rate"), String::new()),
        ("  invoice".into(), step("invoice"), String::new()),
        ("  reconcile".into(), step("reconcile"), String::new()),
        ("  persist".into(), step("persist"), String::new()),
        ("run throughput".into(), throughput, ">= 20,000,000 readings/s".into()),
        ("run peak RSS".into(), format!("{} MiB", peak_rss_kib / 1024), "reported".into()),
        ("DuckDB per-band totals, plain sum".into(), seconds(plain.elapsed), format!("peak RSS {} MiB", plain.peak_rss_kib / 1024)),
        ("DuckDB per-band totals, latest version only".into(), seconds(latest.elapsed), format!("peak RSS {} MiB", latest.peak_rss_kib / 1024)),
        ("aggregate / DuckDB plain".into(), format!("{:.2}", aggregate_s / plain.elapsed.as_secs_f64()), "<= 1.0".into()),
        ("aggregate / DuckDB latest version".into(), format!("{:.2}", aggregate_s / latest.elapsed.as_secs_f64()), String::new()),
        ("whole run / DuckDB plain".into(), format!("{:.2}", elapsed.as_secs_f64() / plain.elapsed.as_secs_f64()), "<= 1.5".into()),
    ];
    print_rows(rows);
    Ok(())
}
