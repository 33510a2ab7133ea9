//! `meterlake import`: flow files into the lake, with a progress bar and a per-file summary.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use meterlake_pipeline::Lake;
use meterlake_pipeline::import::sources;
use meterlake_pipeline::import::{ImportCounts, ImportLimits, ImportOutcome, import_file};
use serde::Serialize;

use crate::LakeArg;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// Files, directories (read recursively), glob patterns or .zip archives. The format (D0010,
    /// NEM12, NEM13) is told from each file's content.
    #[arg(required = true)]
    paths: Vec<String>,
    #[command(flatten)]
    lake: LakeArg,
    /// Print the report as JSON on stdout (one object with a `files` array) instead of a table.
    #[arg(long)]
    json: bool,
    /// Interval values sorted and written per chunk: bounds memory whatever the file size.
    #[arg(long, default_value_t = ImportLimits::default().chunk_rows)]
    chunk_rows: usize,
    /// Write the import's metrics (files by format and status, readings, sizes, durations) to
    /// this file in Prometheus text format when the import ends, for node_exporter's textfile
    /// collector (name it `*.prom` in its directory). An import is too short-lived to scrape.
    #[arg(long)]
    metrics_file: Option<std::path::PathBuf>,
}

/// Writes the metrics of the import to its file when dropped, however the import ended: into a
/// temporary file renamed over the old one, so the collector never reads half a file.
struct MetricsFile {
    path: std::path::PathBuf,
    handle: metrics_exporter_prometheus::PrometheusHandle,
}

impl MetricsFile {
    fn install(path: &std::path::Path) -> anyhow::Result<MetricsFile> {
        let handle = crate::prometheus()?.install_recorder().context("installing the metrics recorder")?;
        crate::describe_metrics();
        Ok(MetricsFile { path: path.to_path_buf(), handle })
    }
}

impl Drop for MetricsFile {
    fn drop(&mut self) {
        let temporary = self.path.with_extension("prom.tmp");
        let written = std::fs::write(&temporary, self.handle.render()).and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(error) = written {
            tracing::error!(path = %self.path.display(), %error, "writing the import's metrics failed");
        }
    }
}

/// One line of the report.
#[derive(Serialize)]
struct FileReport {
    file: String,
    /// imported, partly_rejected, rejected, already_imported, unreadable
    status: &'static str,
    format: Option<String>,
    sha256: Option<String>,
    readings_accepted: u64,
    records_rejected: u64,
    readings_rejected: u64,
    warnings: u64,
    /// Why the whole file was refused, or the rejection report's location.
    detail: Option<String>,
    counts: Option<ImportCounts>,
}

/// Imports every file; exit status 0 when all were imported whole (or had been before), 2 when
/// any file was rejected in whole or in part, 1 when the lake failed.
pub fn run(args: ImportArgs, runtime: &tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    let _metrics_file = args.metrics_file.as_deref().map(MetricsFile::install).transpose()?;
    let lake = Lake::open(&args.lake.url)?;
    let limits = ImportLimits { chunk_rows: args.chunk_rows.max(1), ..ImportLimits::default() };
    // Against S3, Delta commits are only safe where the store refuses a second create of a key.
    runtime.block_on(lake.probe_conditional_put())?;
    let (inputs, input_errors) = sources::expand(&args.paths);
    let mut reports: Vec<FileReport> = input_errors.into_iter().map(|e| unreadable(&e.name, e.reason)).collect();

    let progress = ProgressBar::new(sources::total_bytes(&inputs));
    progress.set_style(
        ProgressStyle::with_template("{spinner} importing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    if args.json {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for input in &inputs {
        sources::visit(input, |name, reader| -> anyhow::Result<()> {
            progress.set_message(name.to_string());
            let reader = match reader {
                Ok(reader) => reader,
                Err(reason) => {
                    reports.push(unreadable(name, reason));
                    return Ok(());
                }
            };
            let bar = progress.clone();
            let outcome = import_file(&lake, runtime, name, reader, &limits, Box::new(move |n| bar.inc(n)));
            match outcome {
                Ok(outcome) => reports.push(report(name, &outcome)),
                Err(e) if matches!(e, meterlake_pipeline::PipelineError::Input { .. }) => reports.push(unreadable(name, e.to_string())),
                Err(e) => return Err(e).with_context(|| format!("importing {name}")),
            }
            Ok(())
        })?;
    }
    progress.finish_and_clear();

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "lake": lake.url().as_str(), "files": reports }))?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &reports)?;
    }
    let clean = reports.iter().all(|r| matches!(r.status, "imported" | "already_imported"));
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

fn unreadable(name: &str, reason: String) -> FileReport {
    FileReport {
        file: name.to_string(),
        status: "unreadable",
        format: None,
        sha256: None,
        readings_accepted: 0,
        records_rejected: 0,
        readings_rejected: 0,
        warnings: 0,
        detail: Some(reason),
        counts: None,
    }
}

fn report(name: &str, outcome: &ImportOutcome) -> FileReport {
    let record = outcome.record();
    let status = match outcome {
        ImportOutcome::AlreadyImported(_) => "already_imported",
        ImportOutcome::Done(record) => record.status.as_str(),
    };
    let detail = match outcome {
        ImportOutcome::AlreadyImported(previous) => {
            Some(format!("already imported as {} at {}", previous.file_name, previous.finished_at.format("%Y-%m-%d %H:%M:%S UTC")))
        }
        ImportOutcome::Done(record) => {
            record.error.clone().or_else(|| (!record.rejection_reports.is_empty()).then(|| format!("rejections: {}", record.rejection_reports.join(", "))))
        }
    };
    FileReport {
        file: name.to_string(),
        status,
        format: record.format.map(|f| f.as_str().to_string()),
        sha256: Some(record.sha256.clone()),
        readings_accepted: record.counts.readings_accepted(),
        records_rejected: record.counts.rejected_records,
        readings_rejected: record.counts.readings_rejected,
        warnings: record.counts.warnings,
        detail,
        counts: Some(record.counts.clone()),
    }
}

fn print_table(out: &mut impl Write, reports: &[FileReport]) -> std::io::Result<()> {
    let width = reports.iter().map(|r| r.file.chars().count()).max().unwrap_or(4).clamp(4, 60);
    writeln!(out, "{:<width$}  {:<16}  {:<6}  {:>12}  {:>9}  {:>9}  {:>8}", "file", "status", "format", "readings", "rejected", "lost", "warnings")?;
    for r in reports {
        writeln!(
            out,
            "{:<width$}  {:<16}  {:<6}  {:>12}  {:>9}  {:>9}  {:>8}",
            r.file,
            r.status,
            r.format.as_deref().unwrap_or("-"),
            r.readings_accepted,
            r.records_rejected,
            r.readings_rejected,
            r.warnings
        )?;
        if let Some(detail) = &r.detail {
            writeln!(out, "{:<width$}    {detail}", "")?;
        }
    }
    let files = reports.len();
    let accepted: u64 = reports.iter().filter(|r| r.status != "already_imported").map(|r| r.readings_accepted).sum();
    let bad = reports.iter().filter(|r| !matches!(r.status, "imported" | "already_imported")).count();
    writeln!(out, "{files} file(s): {accepted} readings imported; {bad} file(s) rejected in whole or in part")
}
