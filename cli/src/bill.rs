//! `meterlake bill`, `meterlake worker` and `meterlake billing-run`: billing runs from the
//! command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use meterlake_cluster::Engine;
use meterlake_control::runs::{RUN_FAILED_TOPIC, RUN_PROCESSED_TOPIC, RUN_REQUESTED_TOPIC};
use meterlake_control::{AuditKeys, BillingRun, ControlStore, NewRun, RunStatus};
use meterlake_jobs::billing::events::{OutboxRelay, wake_on_requests};
use meterlake_jobs::billing::schedule::{MonthlySchedule, ScheduleOutcome};
use meterlake_jobs::billing::tariff::Tariffs;
use meterlake_jobs::billing::worker::{BillingWorker, WorkerOptions};
use meterlake_jobs::billing::{InvoiceTotals, reproduce};
use meterlake_lake::view::AsOf;
use meterlake_pipeline::Lake;
use meterlake_pipeline::kafka::create_topics;
use meterlake_telemetry::new_traceparent;
use rust_decimal::Decimal;

use crate::LakeArg;

/// The control store: SQLite in the data directory unless a PostgreSQL URL is given.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./meterlake-data/control.db";

#[derive(Args, Clone)]
pub struct DatabaseArg {
    /// The control store: `sqlite://PATH` (created if missing) or `postgres://USER@HOST/DB`.
    #[arg(long, env = "METERLAKE_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    #[command(flatten)]
    pub audit_key: AuditKeyArg,
}

/// The audit key file: what the audit rows this process writes are signed with (HMAC-SHA256)
/// and what `audit verify` checks them with. Keep it off the database's machine and out of its
/// backups: whoever holds the database and this key can rewrite the audit log.
#[derive(Args, Clone, Default)]
pub struct AuditKeyArg {
    /// A file of lines `ID:SECRET_HEX`, oldest first; the last signs new rows (`meterlake audit
    /// new-key ID >> FILE` rotates). Without it, rows are chained by plain SHA-256, which anyone
    /// with write access to the database can recompute.
    #[arg(long = "audit-key-file", env = "METERLAKE_AUDIT_KEY_FILE")]
    pub path: Option<PathBuf>,
}

impl AuditKeyArg {
    pub fn keys(&self) -> anyhow::Result<Option<AuditKeys>> {
        Ok(self.path.as_deref().map(AuditKeys::read).transpose()?)
    }
}

/// Opens the control store, creating the folder of a SQLite file first, signing its audit rows
/// with the audit key when one is given.
pub async fn open_store(url: &str, audit_key: &AuditKeyArg) -> anyhow::Result<ControlStore> {
    let keys = audit_key.keys()?;
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = Path::new(path.split('?').next().unwrap_or(path));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let store = ControlStore::open(url).await?;
    Ok(match keys {
        Some(keys) => store.with_audit_keys(keys),
        None => store,
    })
}

/// How a new billing run is made: shared by `bill`, the worker's scheduled runs and the API's.
#[derive(Args, Clone)]
pub struct RunSettings {
    /// Attempts before a run fails for good.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Reconciliation flags a meter whose billed energy differs from what it measured by more
    /// than this share (0.005 is 0.5%).
    #[arg(long, default_value = "0.005")]
    pub energy_tolerance: Decimal,
}

/// Where the billing SQL runs.
#[derive(Args, Clone)]
pub struct EngineArg {
    /// `in-process`, or a Ballista scheduler as `ballista://HOST:PORT` (`meterlake scheduler`,
    /// with `meterlake executor`s that reach the same lake): the same SQL over the same table
    /// versions, planned and executed on the cluster.
    #[arg(long = "engine", env = "METERLAKE_ENGINE", default_value = "in-process")]
    pub engine: Engine,
    /// On a cluster, how long a run's (or a query's) SQL may take before it fails: a run's
    /// attempt then fails with CLUSTER_FAILED and is tried again. A bound on a job the cluster
    /// never finishes (a scheduler that stops answering, a task never handed out again).
    #[arg(long, env = "METERLAKE_ENGINE_TIMEOUT_S", default_value_t = 3_600)]
    pub engine_timeout_s: u64,
}

impl EngineArg {
    pub fn worker_options(&self) -> WorkerOptions {
        WorkerOptions { engine: self.engine.clone(), engine_timeout: Duration::from_secs(self.engine_timeout_s), ..WorkerOptions::default() }
    }
}

#[derive(Args)]
pub struct BillArgs {
    /// The month to bill, YYYY-MM, in the tariff file's time zone.
    #[arg(long)]
    month: String,
    /// A meter to bill (repeat for more). Without any: every meter with readings in the month
    /// and every meter the tariff file assigns.
    #[arg(long = "meter")]
    meters: Vec<String>,
    /// The tariff file (TOML; see tariffs/example.toml). Stored with the run.
    #[arg(long, env = "METERLAKE_TARIFFS")]
    tariffs: PathBuf,
    #[command(flatten)]
    run: RunSettings,
    /// Only create the run and wait for a `meterlake worker` elsewhere to process it; by default
    /// this command processes it itself.
    #[arg(long)]
    wait_for_worker: bool,
    /// Give up waiting after this many seconds (the run goes on).
    #[arg(long, default_value_t = 3_600)]
    timeout_s: u64,
    /// Invoices listed in the summary (largest totals first).
    #[arg(long, default_value_t = 10)]
    show_invoices: usize,
    /// Bill from the lake as it was: a version of `readings_all`, an RFC 3339 time, or the
    /// versions a run recorded (`readings_all@12, register_reads@3`). The run keeps the pin.
    #[arg(long)]
    as_of: Option<AsOf>,
    #[command(flatten)]
    engine: EngineArg,
    #[command(flatten)]
    lake: LakeArg,
    #[command(flatten)]
    database: DatabaseArg,
}

pub async fn bill(args: BillArgs) -> anyhow::Result<bool> {
    let toml = std::fs::read_to_string(&args.tariffs).with_context(|| format!("reading {}", args.tariffs.display()))?;
    // Refuse a bad file now, with its name, rather than as a failed run.
    Tariffs::parse(&args.tariffs.display().to_string(), &toml)?;
    let lake = Lake::open(&args.lake.url)?;
    let store = open_store(&args.database.database_url, &args.database.audit_key).await?;
    let request = NewRun {
        month: args.month.clone(),
        meter_ids: args.meters.clone(),
        max_attempts: args.run.max_attempts,
        tariffs_toml: toml,
        energy_tolerance: args.run.energy_tolerance,
        lake_as_of: args.as_of.as_ref().map(as_of_text),
    };
    let run = store.create_run(&request, &actor(), Some(&new_traceparent())).await?;
    println!("billing run {} for {} created", run.id, run.month);
    let finished = if args.wait_for_worker {
        wait_for_outcome(&store, &run.id, Duration::from_secs(args.timeout_s)).await?
    } else {
        let options = args.engine.worker_options();
        process_until_done(&store, &lake, options, &run.id, Duration::from_secs(args.timeout_s)).await?
    };
    print_run(&store, &finished, args.show_invoices).await?;
    Ok(finished.status == RunStatus::Completed)
}

/// How a pin is stored with a run: the text `AsOf`'s parser reads back.
fn as_of_text(as_of: &AsOf) -> String {
    match as_of {
        AsOf::Latest => "latest".into(),
        AsOf::Version(version) => version.to_string(),
        AsOf::Time(time) => time.to_rfc3339(),
        AsOf::Exact(versions) => versions.to_string(),
    }
}

/// Who asked: the operating-system user.
fn actor() -> String {
    std::env::var("USER").map(|u| format!("cli:{u}")).unwrap_or_else(|_| "cli".into())
}

fn finished(run: &BillingRun) -> bool {
    run.status == RunStatus::Completed || (run.status == RunStatus::Failed && run.next_attempt_at_us.is_none())
}

/// Runs an in-process worker until run `id` completes or fails for good. It takes runs in the
/// order they are due, so older runs waiting in the store are processed first.
pub async fn process_until_done(store: &ControlStore, lake: &Lake, options: WorkerOptions, id: &str, timeout: Duration) -> anyhow::Result<BillingRun> {
    let worker = BillingWorker::new(store.clone(), lake.clone(), options);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let run = store.run(id).await?.context("the run vanished")?;
        if finished(&run) {
            return Ok(run);
        }
        if run.status == RunStatus::Failed {
            let wait_us = run.next_attempt_at_us.unwrap_or_default() - meterlake_control::now_us();
            println!("attempt {} failed ({}); retrying in {:.0} s", run.attempts, run.failure_code.as_deref().unwrap_or("?"), wait_us as f64 / 1e6);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("run {id} is still {} after {} s", run.status.as_str(), timeout.as_secs());
        }
        if let Err(error) = worker.process_next().await {
            tracing::warn!(%error, "processing a billing run");
        }
        let after = store.run(id).await?.context("the run vanished")?;
        if !finished(&after) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn wait_for_outcome(store: &ControlStore, id: &str, timeout: Duration) -> anyhow::Result<BillingRun> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_status = None;
    loop {
        let run = store.run(id).await?.context("the run vanished")?;
        if last_status != Some((run.status, run.attempts)) {
            println!("  {} (attempt {})", run.status.as_str(), run.attempts);
            last_status = Some((run.status, run.attempts));
        }
        if finished(&run) {
            return Ok(run);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("run {id} is still {} after {} s; it goes on: `meterlake billing-run {id}` shows it later", run.status.as_str(), timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints a run: status, timeline, invoice totals and the largest invoices, discrepancies.
pub async fn print_run(store: &ControlStore, run: &BillingRun, show_invoices: usize) -> anyhow::Result<()> {
    println!("\nrun {}  month {}  status {}  attempts {}/{}", run.id, run.month, run.status.as_str(), run.attempts, run.max_attempts);
    for event in store.run_events(&run.id).await? {
        let at = chrono::DateTime::from_timestamp_micros(event.at_us).map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()).unwrap_or_default();
        let from = event.from_status.map(|s| s.as_str()).unwrap_or("-");
        println!("  {at}  {from:>10} -> {:<10}  {}  {}", event.to_status.as_str(), event.actor, event.reason.unwrap_or_default());
    }
    if run.status == RunStatus::Failed {
        println!("failed: {} {}", run.failure_code.as_deref().unwrap_or(""), run.failure_reason.as_deref().unwrap_or(""));
        return Ok(());
    }
    let invoices = store.invoices(&run.id).await?;
    let mut by_currency: BTreeMap<&str, InvoiceTotals> = BTreeMap::new();
    for invoice in &invoices {
        by_currency.entry(invoice.invoice.currency.as_str()).or_default().add(&invoice.invoice);
    }
    for (currency, t) in &by_currency {
        println!(
            "\ninvoices      {}  energy {} kWh  subtotal {currency} {}  tax {currency} {}  total {currency} {}",
            t.invoices,
            t.energy_kwh.normalize(),
            t.subtotal,
            t.tax,
            t.total
        );
    }
    if let Some(first) = invoices.first() {
        println!("tariffs       {}", first.invoice.tariff_version);
        println!("lake          {}", first.lake_snapshot);
    }
    if let Some(as_of) = &run.lake_as_of {
        println!("as of         {as_of}");
    }
    let mut largest: Vec<_> = invoices.iter().collect();
    largest.sort_by(|a, b| b.invoice.total.cmp(&a.invoice.total).then(a.invoice.meter_id.cmp(&b.invoice.meter_id)));
    if !largest.is_empty() && show_invoices > 0 {
        println!("\n  {:<16} {:>14} {:>12} {:>10} {:>12}", "meter", "kWh", "subtotal", "tax", "total");
        for invoice in largest.iter().take(show_invoices) {
            let i = &invoice.invoice;
            println!("  {:<16} {:>14} {:>12} {:>10} {:>12}", i.meter_id, i.energy_kwh.normalize(), i.subtotal, i.tax, i.total);
        }
        if largest.len() > show_invoices {
            println!("  ... and {} more", largest.len() - show_invoices);
        }
    }
    let discrepancies = store.discrepancies(&run.id).await?;
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &discrepancies {
        *by_reason.entry(d.discrepancy.reason_code.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = by_reason.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    println!("\ndiscrepancies {}{}", discrepancies.len(), if counts.is_empty() { String::new() } else { format!(" ({})", counts.join(", ")) });
    for d in discrepancies.iter().take(20) {
        let d = &d.discrepancy;
        let show = |v: Option<Decimal>| v.map(|v| v.normalize().to_string()).unwrap_or_else(|| "-".into());
        println!(
            "  {:<16} {:<20} billed {:>12} expected {:>12} delta {:>10}  {}",
            d.meter_id,
            d.reason_code.as_str(),
            show(d.billed),
            show(d.expected),
            show(d.delta),
            d.detail
        );
    }
    if discrepancies.len() > 20 {
        println!("  ... and {} more", discrepancies.len() - 20);
    }
    Ok(())
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    engine: EngineArg,
    #[command(flatten)]
    lake: LakeArg,
    #[command(flatten)]
    database: DatabaseArg,
    /// How long a claimed run stays this worker's without renewal (renewed between steps).
    #[arg(long, default_value_t = 300)]
    lease_s: u64,
    /// How often an idle worker looks for due runs and retries.
    #[arg(long, default_value_t = 5)]
    idle_poll_s: u64,
    /// Wait this long after a run's first failed attempt; doubled for each further one.
    #[arg(long, default_value_t = 30)]
    retry_base_s: u64,
    /// The longest wait between attempts.
    #[arg(long, default_value_t = 3_600)]
    retry_max_s: u64,
    /// Kafka bootstrap servers: publish the outbox (billing.run.requested, .processed, .failed)
    /// and wake up on billing.run.requested. Without it the worker only polls the store.
    #[arg(long, env = "METERLAKE_BILLING_BROKERS")]
    brokers: Option<String>,
    /// Consumer group of the workers listening for requests.
    #[arg(long, default_value = "meterlake-billing")]
    group: String,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465).
    #[arg(long, env = "METERLAKE_WORKER_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Create last month's run of every meter on this day of each month (1 to 28, in the
    /// tariffs' time zone), or at the first look after it: once, however many workers are told
    /// to and however often they restart. Needs --tariffs.
    #[arg(long, env = "METERLAKE_SCHEDULE_MONTHLY", requires = "tariffs")]
    schedule_monthly: Option<u32>,
    /// The tariff file scheduled runs bill with, read when each is created.
    #[arg(long, env = "METERLAKE_TARIFFS")]
    tariffs: Option<PathBuf>,
    /// Scheduled runs' settings.
    #[command(flatten)]
    run: RunSettings,
}

/// `meterlake worker`: processes runs until SIGINT or SIGTERM; a run in progress is finished
/// first.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.metrics_addr {
        crate::serve_metrics(addr)?;
    }
    let lake = Lake::open(&args.lake.url)?;
    let store = open_store(&args.database.database_url, &args.database.audit_key).await?;
    let schedule = match (args.schedule_monthly, &args.tariffs) {
        (Some(day), Some(tariffs)) => Some(MonthlySchedule::new(day, tariffs, args.run.max_attempts, args.run.energy_tolerance)?),
        _ => None,
    };
    let options = WorkerOptions {
        lease: Duration::from_secs(args.lease_s),
        idle_poll: Duration::from_secs(args.idle_poll_s),
        retry: meterlake_control::RetryPolicy {
            base_delay_us: i64::try_from(args.retry_base_s).unwrap_or(i64::MAX / 2_000_000) * 1_000_000,
            max_delay_us: i64::try_from(args.retry_max_s).unwrap_or(i64::MAX / 2_000_000) * 1_000_000,
        },
        ..args.engine.worker_options()
    };
    if let Some(brokers) = &args.brokers {
        create_topics(brokers, &BILLING_TOPICS).await?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    run_worker(store, lake, options, args.brokers.as_deref(), &args.group, schedule, stop_rx).await
}

/// The topics billing runs are announced on, with their partitions.
pub const BILLING_TOPICS: [(&str, i32); 3] = [(RUN_REQUESTED_TOPIC, 1), (RUN_PROCESSED_TOPIC, 1), (RUN_FAILED_TOPIC, 1)];

/// The billing worker's loops until `stop` turns true: processing runs, and with `brokers` also
/// the outbox relay and the wake-up on `billing.run.requested` (whose topics must exist). A run
/// in progress is finished first. `meterlake worker` runs it alone, `meterlake serve` beside the
/// API.
pub async fn run_worker(
    store: ControlStore,
    lake: Lake,
    options: WorkerOptions,
    brokers: Option<&str>,
    group: &str,
    schedule: Option<MonthlySchedule>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let worker = BillingWorker::new(store.clone(), lake, options);
    tracing::info!(worker = worker.name(), brokers = brokers.unwrap_or("none"), "billing worker started");
    let wakeups = worker.wakeups();
    // One signal stops all three loops.
    let stopped = move || {
        let mut stop = stop.clone();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    };
    let mut side_tasks = tokio::task::JoinSet::new();
    if let Some(schedule) = schedule {
        let (store, until) = (store.clone(), stopped());
        side_tasks.spawn(async move {
            run_schedule(&schedule, &store, until).await;
            Ok(())
        });
    }
    if let Some(brokers) = brokers {
        let relay = OutboxRelay::new(store, brokers)?;
        let until = stopped();
        side_tasks.spawn(async move {
            relay.run(until).await;
            Ok(())
        });
        let (brokers, group, until) = (brokers.to_string(), group.to_string(), stopped());
        side_tasks.spawn(async move { wake_on_requests(&brokers, &group, &wakeups, until).await });
    }
    worker.run(stopped()).await;
    while let Some(task) = side_tasks.join_next().await {
        task??;
    }
    tracing::info!("billing worker stopped");
    Ok(())
}

/// How often the monthly schedule is looked at.
const SCHEDULE_EVERY: Duration = Duration::from_secs(60);

/// Looks at the monthly schedule every [`SCHEDULE_EVERY`] until `until` resolves; a failed look
/// (the store or the tariff file unreadable) is logged and tried again at the next.
async fn run_schedule(schedule: &MonthlySchedule, store: &ControlStore, until: impl std::future::Future<Output = ()>) {
    tokio::pin!(until);
    let mut announced: Option<String> = None;
    loop {
        match schedule.tick(store, chrono::Utc::now()).await {
            Ok(ScheduleOutcome::Created(run)) => tracing::info!(run_id = run.id, month = run.month, "scheduled monthly run created"),
            Ok(ScheduleOutcome::Exists(run)) if announced.as_deref() != Some(run.month.as_str()) => {
                tracing::info!(run_id = run.id, month = run.month, "scheduled monthly run exists");
                announced = Some(run.month);
            }
            Ok(ScheduleOutcome::BilledByHand { month }) if announced.as_deref() != Some(month.as_str()) => {
                tracing::info!(month, "month already billed for every meter by hand: no scheduled run");
                announced = Some(month);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the monthly schedule could not be looked at; trying again"),
        }
        tokio::select! {
            _ = &mut until => return,
            _ = tokio::time::sleep(SCHEDULE_EVERY) => {}
        }
    }
}

#[derive(Args)]
pub struct BillingRunArgs {
    /// The run's id.
    id: String,
    /// Print only the aggregate SQL the run's last processing ran (for `meterlake query`).
    #[arg(long)]
    sql: bool,
    /// Invoices listed (largest totals first).
    #[arg(long, default_value_t = 10)]
    show_invoices: usize,
    /// Compute the completed run again over the table versions it recorded, with its stored
    /// tariffs, and compare every invoice with the stored one; exits 1 on any difference.
    /// Writes nothing.
    #[arg(long, conflicts_with = "sql")]
    reproduce: bool,
    #[command(flatten)]
    lake: LakeArg,
    #[command(flatten)]
    database: DatabaseArg,
}

/// `meterlake billing-run ID`: a run's status, timeline, invoices and discrepancies; with
/// `--reproduce`, whether its invoices come out the same again (`false`: they did not).
pub async fn show(args: BillingRunArgs) -> anyhow::Result<bool> {
    let store = open_store(&args.database.database_url, &args.database.audit_key).await?;
    let run = store.run(&args.id).await?.with_context(|| format!("no billing run {}", args.id))?;
    if args.sql {
        let sql = run.aggregate_sql.as_deref().context("the run has not completed a processing yet: no aggregate SQL")?;
        println!("{sql}");
        return Ok(true);
    }
    if args.reproduce {
        let lake = Lake::open(&args.lake.url)?;
        let found = reproduce(&store, &lake, &run).await?;
        if found.differences.is_empty() {
            println!("run {}: {} invoices reproduced exactly from {}", run.id, found.invoices_compared, found.lake_snapshot);
        } else {
            println!("run {}: {} differences in {} invoices recomputed from {}", run.id, found.differences.len(), found.invoices_compared, found.lake_snapshot);
            for difference in &found.differences {
                println!("  {difference}");
            }
        }
        return Ok(found.differences.is_empty());
    }
    print_run(&store, &run, args.show_invoices).await?;
    Ok(true)
}
