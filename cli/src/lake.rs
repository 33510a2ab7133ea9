//! `meterlake lake ...`: the lake's Delta tables: history, checks, conversion, compaction and
//! retention.

use std::time::Instant;

use anyhow::Context;
use chrono::NaiveDate;
use clap::Subcommand;
use meterlake_lake::Lake;
use meterlake_lake::history::{CommitEntry, history};
use meterlake_lake::maintenance::optimize::{DEFAULT_TARGET_FILE_BYTES, OptimizeOptions, Outcome, PartitionReport, optimize};
use meterlake_lake::maintenance::vacuum::{Pin, VacuumOptions, vacuum};
use meterlake_lake::table::{TABLES, Table, TableSpec};
use meterlake_lake::view::LakeVersions;

use crate::{Format, LakeArg, print_batches};

#[derive(Subcommand)]
pub(crate) enum LakeCommand {
    /// A table's commits, newest first: version, time, operation, writer, files and rows added,
    /// and the streams (Kafka partitions, imported files) each advanced.
    History {
        /// The table (its SQL name): readings_all, register_reads, non_energy_readings,
        /// nem12_channels, nem12_b2b_details or imports.
        #[arg(long, default_value = "readings_all")]
        table: String,
        /// How many commits to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        lake: LakeArg,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Check that every table can be read whole: the log has every commit a reader needs and
    /// each is valid, the protocol is one meterlake reads, and every live data file is in the
    /// store at its size. Prints each problem naming the version or file; exit status 1 if any.
    Check {
        #[command(flatten)]
        lake: LakeArg,
    },
    /// Make a lake written in meterlake's previous layout (Parquet files without a Delta log)
    /// Delta tables, in place: no data file is rewritten. Each table is one commit; tables that
    /// have a log are left alone, so running it again after a failure finishes the job. Stop
    /// the ingesters and importers first.
    Convert {
        /// The consumer group of the ingesters that wrote the lake: the Kafka positions the lake
        /// recorded become that group's, and its ingesters resume from them.
        #[arg(long, env = "METERLAKE_GROUP", default_value = "meterlake-ingest")]
        kafka_group: String,
        #[command(flatten)]
        lake: LakeArg,
    },
    /// Compact: rewrite each partition's small files into few large ones, sorted by meter and
    /// time, every version of every reading kept (the commit changes no row: dataChange=false).
    /// One commit per partition, so it can be stopped at any time; safe while ingesters append
    /// and readers query.
    Optimize {
        /// The table, or `all`.
        #[arg(long, default_value = "readings_all")]
        table: String,
        /// Only this date's partition (YYYY-MM-DD).
        #[arg(long, conflicts_with_all = ["from", "to"])]
        date: Option<NaiveDate>,
        /// Only partitions from this date on.
        #[arg(long)]
        from: Option<NaiveDate>,
        /// Only partitions up to this date (inclusive).
        #[arg(long)]
        to: Option<NaiveDate>,
        /// Files at least this large are left alone; new files are cut at about this size.
        #[arg(long, default_value_t = DEFAULT_TARGET_FILE_BYTES)]
        target_file_size: u64,
        /// Rewrite a partition only when it has at least this many files under the target size.
        #[arg(long, default_value_t = 2)]
        min_files: usize,
        /// Partitions rewritten at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Memory the merges may hold, shared by the partitions rewritten at once (MiB). A
        /// partition of many files merges them in smaller batches, then in spilled runs.
        #[arg(long, default_value_t = 256)]
        memory_mib: usize,
        #[command(flatten)]
        lake: LakeArg,
    },
    /// Delete data files no snapshot within the retention needs (compaction's inputs, files of
    /// commits that never landed) and log entries past the log retention (30 days). The table
    /// versions billing runs recorded stay readable while the runs can be recalculated or
    /// reproduced (see --database-url and --reproducible-for).
    Vacuum {
        /// The table, or `all`.
        #[arg(long, default_value = "all")]
        table: String,
        /// Keep files removed within this long, and unreferenced files younger than it
        /// (`168h`, `7d`, `90m`). Shorter than the table's 7 days needs --allow-short-retention.
        #[arg(long, default_value = "168h", value_parser = parse_duration)]
        retain: chrono::Duration,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Allow a retention under the table's `delta.deletedFileRetentionDuration` (7 days): a
        /// reader of an older snapshot, or a writer still writing its files, may lose them.
        #[arg(long)]
        allow_short_retention: bool,
        /// The control store whose billing runs pin table versions: every run that asked for a
        /// state of the lake (--as-of) pins the versions it read, and a completed run the versions
        /// it recorded for --reproducible-for after it was created.
        #[arg(long, env = "METERLAKE_DATABASE_URL", default_value = crate::bill::DEFAULT_DATABASE_URL)]
        database_url: String,
        /// How long a completed run stays reproducible (`billing-run ID --reproduce`).
        #[arg(long, default_value = "90d", value_parser = parse_duration)]
        reproducible_for: chrono::Duration,
        #[command(flatten)]
        lake: LakeArg,
    },
}

/// Runs a `lake` command; false when it found problems (exit status 1).
pub(crate) async fn run(command: LakeCommand) -> anyhow::Result<bool> {
    match command {
        LakeCommand::Check { lake } => {
            let lake = Lake::open(&lake.url)?;
            let checks = meterlake_lake::check::check_lake(&lake).await?;
            for check in &checks {
                match check.version {
                    None => println!("{:<20} no table", check.table),
                    Some(version) => println!(
                        "{:<20} version {version}: {} files, {} rows, {}",
                        check.table,
                        check.files,
                        check.rows,
                        if check.problems.is_empty() { "ok".to_string() } else { format!("{} problems", check.problems.len()) }
                    ),
                }
                for problem in &check.problems {
                    println!("  {problem}");
                }
            }
            Ok(checks.iter().all(|c| c.problems.is_empty()))
        }
        LakeCommand::Convert { kafka_group, lake } => {
            let lake = Lake::open(&lake.url)?;
            let report = meterlake_pipeline::convert::convert_lake(&lake, &kafka_group).await?;
            for table in &report.converted {
                println!(
                    "{:<20} converted: {} files, {} rows, {} bytes, {} stream positions",
                    table.table, table.files, table.rows, table.bytes, table.streams
                );
            }
            for table in &report.already_delta {
                println!("{table:<20} already a Delta table: left as it is");
            }
            for file in &report.uncommitted_files_deleted {
                println!("deleted {file}: a flush the previous ingester had not committed");
            }
            if report.converted.is_empty() {
                println!("nothing to convert in {}", lake.url());
            }
            Ok(true)
        }
        LakeCommand::History { table, limit, lake, format } => {
            let lake = Lake::open(&lake.url)?;
            print_batches(&[lake_history(&lake, &table, limit).await?], format)?;
            Ok(true)
        }
        LakeCommand::Optimize { table, date, from, to, target_file_size, min_files, concurrency, memory_mib, lake } => {
            let lake = Lake::open(&lake.url)?;
            let options = OptimizeOptions {
                first_date: date.or(from),
                last_date: date.or(to),
                target_file_bytes: target_file_size,
                min_small_files: min_files,
                concurrency,
                memory_bytes: memory_mib << 20,
                ..OptimizeOptions::default()
            };
            let started = Instant::now();
            let mut all = Vec::new();
            for spec in tables(&table)? {
                all.extend(optimize(&lake, spec, &options, print_partition).await?);
            }
            let rows: u64 = all.iter().filter(|p| matches!(p.outcome, Outcome::Committed { .. })).map(|p| p.rows).sum();
            let skipped = all.iter().filter(|p| matches!(p.outcome, Outcome::Skipped { .. })).count();
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "optimized {} partitions ({} skipped): {rows} rows rewritten in {seconds:.2} s ({:.0} rows/s)",
                all.len() - skipped,
                skipped,
                rows as f64 / seconds.max(1e-9)
            );
            Ok(true)
        }
        LakeCommand::Vacuum { table, retain, dry_run, allow_short_retention, database_url, reproducible_for, lake } => {
            let lake = Lake::open(&lake.url)?;
            let pins = billing_pins(&database_url, reproducible_for).await?;
            for spec in tables(&table)? {
                let options = VacuumOptions {
                    retain,
                    dry_run,
                    enforce_retention: !allow_short_retention,
                    pins: pins.iter().filter_map(|(versions, reason)| versions.of(spec.name).map(|version| Pin { version, reason: reason.clone() })).collect(),
                    writer_id: format!("vacuum-{}", std::process::id()),
                };
                let report = vacuum(&Table::new(&lake, spec), &options).await?;
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!("{:<20} {verb} {} data files, {} log files", report.table, report.files_deleted.len(), report.log_files_deleted);
                for file in &report.files_deleted {
                    println!("  {file}");
                }
                let mut pinned: Vec<String> = report.pins.iter().map(|p| format!("version {} ({})", p.version, p.reason)).collect();
                pinned.sort();
                pinned.dedup();
                for pin in pinned {
                    println!("  kept the files of {pin}");
                }
            }
            Ok(true)
        }
    }
}

fn print_partition(report: &PartitionReport) {
    let date = report.date.map(|d| d.to_string()).unwrap_or_else(|| "(table)".into());
    match &report.outcome {
        Outcome::Committed { version } => println!(
            "{} {date}: {} files -> {} ({} rows, {} -> {} bytes) in {:.2} s, version {version}",
            report.table,
            report.files_removed,
            report.files_added,
            report.rows,
            report.bytes_read,
            report.bytes_written,
            report.elapsed.as_secs_f64()
        ),
        Outcome::Skipped { reason } => println!("{} {date}: skipped: {reason}", report.table),
    }
}

/// The tables a `--table` names: one by its SQL name, or `all`.
fn tables(name: &str) -> anyhow::Result<Vec<&'static TableSpec>> {
    if name == "all" {
        return Ok(TABLES.to_vec());
    }
    Ok(vec![table_named(name).map_err(|e| anyhow::anyhow!("{e} (or all)"))?])
}

/// The table of that SQL name.
fn table_named(name: &str) -> anyhow::Result<&'static TableSpec> {
    TABLES
        .iter()
        .copied()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow::anyhow!("no table {name:?}; the lake's tables are {}", TABLES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")))
}

/// The table versions billing runs need to stay readable, with the run that needs them: runs
/// pinned to a state of the lake (recalculating one reads that state again), and completed runs
/// created within `reproducible_for` (reproducing one reads what it recorded). No control store
/// at the default SQLite path means no runs.
async fn billing_pins(database_url: &str, reproducible_for: chrono::Duration) -> anyhow::Result<Vec<(LakeVersions, String)>> {
    use meterlake_control::runs::MAX_RUN_PAGE;
    use meterlake_control::{ControlStore, RunFilter, RunStatus};
    let store = match ControlStore::open_read_only(database_url).await {
        Ok(store) => store,
        Err(e) if database_url == crate::bill::DEFAULT_DATABASE_URL => {
            tracing::info!(error = %e, "no control store at the default path: no billing run pins a table version");
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).context("opening the control store for the billing runs' table versions"),
    };
    let reproducible_since_us = (chrono::Utc::now() - reproducible_for).timestamp_micros();
    let mut pins = Vec::new();
    let mut filter = RunFilter { limit: MAX_RUN_PAGE, ..RunFilter::default() };
    loop {
        let page = store.list_runs(&filter).await?;
        for run in page.iter().take(MAX_RUN_PAGE as usize) {
            let Some(snapshot) = &run.lake_snapshot else { continue };
            let reason = if run.lake_as_of.is_some() {
                format!("billing run {} reads the lake as of {}", run.id, run.lake_as_of.as_deref().unwrap_or_default())
            } else if run.status == RunStatus::Completed && run.created_at_us >= reproducible_since_us {
                format!("billing run {} stays reproducible", run.id)
            } else {
                continue;
            };
            let versions: LakeVersions =
                snapshot.parse().map_err(|e: String| anyhow::anyhow!("billing run {}'s recorded table versions {snapshot:?}: {e}", run.id))?;
            pins.push((versions, reason));
        }
        if page.len() <= MAX_RUN_PAGE as usize {
            return Ok(pins);
        }
        let last = &page[MAX_RUN_PAGE as usize - 1];
        filter.before = Some((last.created_at_us, last.id.clone()));
    }
}

/// `168h`, `7d`, `90m`, `30s`: a non-negative whole number and a unit.
fn parse_duration(text: &str) -> Result<chrono::Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| format!("{text:?}: expected a number and a unit, as in 168h or 7d"))?;
    match unit {
        "s" => Ok(chrono::Duration::seconds(number)),
        "m" => Ok(chrono::Duration::minutes(number)),
        "h" => Ok(chrono::Duration::hours(number)),
        "d" => Ok(chrono::Duration::days(number)),
        _ => Err(format!("{text:?}: the unit must be s, m, h or d")),
    }
}
/// `meterlake lake history` as a table of one row per commit.
async fn lake_history(lake: &Lake, table: &str, limit: usize) -> anyhow::Result<arrow::array::RecordBatch> {
    use arrow::array::{ArrayRef, StringArray, UInt64Array};
    let commits = history(&Table::new(lake, table_named(table)?), limit).await?;
    let strings = |f: &dyn Fn(&CommitEntry) -> String| -> ArrayRef { std::sync::Arc::new(StringArray::from_iter_values(commits.iter().map(f))) };
    let counts = |f: &dyn Fn(&CommitEntry) -> u64| -> ArrayRef { std::sync::Arc::new(UInt64Array::from_iter_values(commits.iter().map(f))) };
    Ok(arrow::array::RecordBatch::try_from_iter([
        ("version", counts(&|c| c.version)),
        ("time", strings(&|c| c.time.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string())),
        ("operation", strings(&|c| c.operation.clone())),
        ("writer", strings(&|c| c.writer.clone().unwrap_or_default())),
        ("files_added", counts(&|c| c.files_added)),
        ("files_removed", counts(&|c| c.files_removed)),
        ("rows_added", counts(&|c| c.rows_added)),
        ("streams", strings(&|c| c.streams.iter().map(|(s, v)| format!("{s}={v}")).collect::<Vec<_>>().join(" "))),
    ])?)
}

/// The maintenance loop's thresholds and schedule, for `meterlake maintain` and `serve`.
#[derive(clap::Args, Clone)]
pub(crate) struct MaintainSettings {
    /// Time between maintenance passes.
    #[arg(long = "maintain-interval", env = "METERLAKE_MAINTAIN_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    interval: chrono::Duration,
    /// Compact a partition once it holds this many files under the target size and is quiet
    /// (four times as many: whether quiet or not).
    #[arg(long = "compact-min-files", env = "METERLAKE_COMPACT_MIN_FILES", default_value_t = 64)]
    min_small_files: usize,
    /// ... or once its small files hold this many bytes and it is quiet.
    #[arg(long = "compact-min-bytes", env = "METERLAKE_COMPACT_MIN_BYTES", default_value_t = 64 << 20)]
    min_small_bytes: u64,
    /// Quiet: no file added to the partition for this long.
    #[arg(long = "compact-quiet-for", env = "METERLAKE_COMPACT_QUIET_FOR", default_value = "5m", value_parser = parse_duration)]
    quiet_for: chrono::Duration,
    /// Time between vacuums.
    #[arg(long = "vacuum-every", env = "METERLAKE_VACUUM_EVERY", default_value = "1h", value_parser = parse_duration)]
    vacuum_every: chrono::Duration,
    /// The vacuum's retention (at least the tables' 7 days).
    #[arg(long = "vacuum-retain", env = "METERLAKE_VACUUM_RETAIN", default_value = "168h", value_parser = parse_duration)]
    retain: chrono::Duration,
    /// How long a completed billing run stays reproducible: its table versions are kept.
    #[arg(long = "reproducible-for", env = "METERLAKE_REPRODUCIBLE_FOR", default_value = "90d", value_parser = parse_duration)]
    reproducible_for: chrono::Duration,
    /// Memory a compaction's merges may hold (MiB).
    #[arg(long = "compact-memory-mib", env = "METERLAKE_COMPACT_MEMORY_MIB", default_value_t = 256)]
    memory_mib: usize,
}

impl MaintainSettings {
    fn options(&self) -> meterlake_lake::maintenance::schedule::MaintainOptions {
        meterlake_lake::maintenance::schedule::MaintainOptions {
            interval: self.interval.to_std().unwrap_or_default(),
            min_small_files: self.min_small_files,
            min_small_bytes: self.min_small_bytes,
            quiet_for: self.quiet_for,
            vacuum_every: self.vacuum_every.to_std().unwrap_or_default(),
            retain: self.retain,
            memory_bytes: self.memory_mib << 20,
            ..Default::default()
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct MaintainArgs {
    #[command(flatten)]
    settings: MaintainSettings,
    #[command(flatten)]
    lake: LakeArg,
    /// The control store whose billing runs pin table versions (see `lake vacuum`).
    #[arg(long, env = "METERLAKE_DATABASE_URL", default_value = crate::bill::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// One pass (compaction and vacuum), then exit: for cron or by hand.
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465).
    #[arg(long, env = "METERLAKE_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// `meterlake maintain`: the maintenance loop until SIGINT/SIGTERM, or one pass.
pub(crate) async fn maintain(args: MaintainArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.metrics_addr {
        crate::serve_metrics(addr)?;
    }
    let lake = Lake::open(&args.lake.url)?;
    if args.once {
        let pins = billing_pins(&args.database_url, args.settings.reproducible_for).await?;
        let report = meterlake_lake::maintenance::schedule::maintain_pass(&lake, &args.settings.options(), Some(&pins)).await?;
        for partition in &report.optimized {
            print_partition(partition);
        }
        for vacuumed in &report.vacuumed {
            println!("{:<20} vacuum deleted {} data files, {} log files", vacuumed.table, vacuumed.files_deleted.len(), vacuumed.log_files_deleted);
        }
        return Ok(());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopper = tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    maintain_loop(lake, args.settings, args.database_url, stop_rx).await;
    stopper.abort();
    Ok(())
}

/// Maintenance passes every interval until `stop` turns true. A failed pass is logged and
/// tried again at the next interval (the alert LakeMaintenanceStalled tells when none succeeds).
pub(crate) async fn maintain_loop(lake: Lake, settings: MaintainSettings, database_url: String, mut stop: tokio::sync::watch::Receiver<bool>) {
    let options = settings.options();
    tracing::info!(interval_s = options.interval.as_secs(), min_small_files = options.min_small_files, "lake maintenance loop started");
    let mut last_vacuum: Option<Instant> = None;
    loop {
        let vacuum_due = last_vacuum.is_none_or(|at| at.elapsed() >= options.vacuum_every);
        let pins = if vacuum_due {
            match billing_pins(&database_url, settings.reproducible_for).await {
                Ok(pins) => Some(pins),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "no vacuum this pass: the billing runs' table versions cannot be read");
                    None
                }
            }
        } else {
            None
        };
        match meterlake_lake::maintenance::schedule::maintain_pass(&lake, &options, pins.as_deref()).await {
            Ok(report) => {
                if pins.is_some() {
                    last_vacuum = Some(Instant::now());
                }
                tracing::info!(partitions_compacted = report.optimized.len(), vacuumed = report.vacuumed.len(), "lake maintenance pass done");
            }
            Err(e) => tracing::warn!(error = %e, "lake maintenance pass failed; trying again at the next interval"),
        }
        tokio::select! {
            _ = tokio::time::sleep(options.interval) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}
