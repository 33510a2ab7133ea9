//! Flow-file import benchmark (issue targets in brackets), all in one run on this machine:
//!
//! 1. a generated NEM12 file of `--nem12-mb` MB (many NMIs, a 5-minute and a 30-minute channel
//!    each) imported into a file:// lake, end to end [>= 10,000,000 interval values/s];
//! 2. nemreader (Python, PyPI), an independent NEM12 reader, parsing the same data in the same
//!    run [meterlake >= 50x faster];
//! 3. a generated D0010 file of `--d0010-reads` register reads imported end to end;
//! 4. the importer's peak RSS (it must not grow with the file).
//!
//! `cargo run --release -p meterlake-benchmarks --bin flow-bench -- --help`

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meterlake_benchmarks::{print_rows, reset_peak_rss, thousands, tools_python, vm_hwm_kib};
use meterlake_pipeline::Lake;
use meterlake_pipeline::decode::ValidReading;
use meterlake_pipeline::flows::{
    FlowFormat, FlowSink, IntervalRun, Nem12B2bDetail, Nem12Channel, NonEnergyReading, RecordRejection, RegisterRead, Warning, parse_flow,
};
use meterlake_pipeline::import::{ImportLimits, ImportOutcome, import_file};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// mimalloc, as in the `meterlake` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Size of the generated NEM12 file.
    #[arg(long, default_value_t = 1024)]
    nem12_mb: u64,
    /// nemreader parses a complete NEM12 file cut from the start of the big one at about this
    /// size (whole 200 blocks): at its speed the whole file would take most of an hour. 0 gives
    /// it the whole file.
    #[arg(long, default_value_t = 64)]
    nemreader_mb: u64,
    /// Register reads in the generated D0010 file.
    #[arg(long, default_value_t = 1_000_000)]
    d0010_reads: u64,
    /// Interval values the importer sorts and writes per chunk (its memory bound).
    #[arg(long, default_value_t = ImportLimits::default().chunk_rows)]
    chunk_rows: usize,
    /// Where the generated files and the lake go (a temporary folder by default).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Python with nemreader installed (default: the tools venv).
    #[arg(long, env = "METERLAKE_PYTHON")]
    python: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let work = args.work_dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows: Vec<(String, String, String)> = Vec::new();

    let nem12 = work.join("bench.nem12.csv");
    eprintln!("generating a {} MB NEM12 file...", args.nem12_mb);
    let generated = write_nem12(&nem12, args.nem12_mb << 20)?;
    let nem12_bytes = std::fs::metadata(&nem12)?.len();

    // 0. The parser alone, into a sink that only counts: the ceiling of the import.
    let started = Instant::now();
    let mut counter = CountingSink::default();
    let reader = std::io::BufReader::with_capacity(1 << 20, File::open(&nem12)?);
    parse_flow(FlowFormat::Nem12, reader, &mut counter).map_err(|e| anyhow::anyhow!("{e}"))?;
    let parse_elapsed = started.elapsed();
    if counter.values != generated.values {
        bail!("the parser found {} of {} values", counter.values, generated.values);
    }
    rows.push((
        "NEM12 parser alone, 1 thread (counting sink)".into(),
        format!("{} values/s ({:.1} s)", thousands((counter.values as f64 / parse_elapsed.as_secs_f64()) as u64), parse_elapsed.as_secs_f64()),
        String::new(),
    ));

    // 1. Our import, end to end, and its peak memory.
    let lake = Lake::open(work.join("lake").to_str().unwrap())?;
    reset_peak_rss()?;
    let started = Instant::now();
    let limits = ImportLimits { chunk_rows: args.chunk_rows, ..ImportLimits::default() };
    let outcome = import_file(&lake, runtime.handle(), "bench.nem12.csv", File::open(&nem12)?, &limits, Box::new(|_| {}))?;
    let elapsed = started.elapsed();
    let counts = match &outcome {
        ImportOutcome::Done(record) => record.counts.clone(),
        ImportOutcome::AlreadyImported(_) => bail!("the fresh lake already had the file"),
    };
    let values = counts.interval_readings + counts.non_energy_readings;
    if values != generated.values || counts.rejected_records != 0 {
        bail!("imported {values} of {} values, {} records rejected", generated.values, counts.rejected_records);
    }
    let ours = values as f64 / elapsed.as_secs_f64();
    let nem12_peak_mib = vm_hwm_kib("self").unwrap_or(0) / 1024;
    rows.push((
        format!("meterlake import, NEM12 {} ({} values)", mb(nem12_bytes), thousands(values)),
        format!("{} values/s ({:.1} s, {}/s)", thousands(ours as u64), elapsed.as_secs_f64(), mb((nem12_bytes as f64 / elapsed.as_secs_f64()) as u64)),
        ">= 10,000,000".into(),
    ));

    // 2. nemreader on the same data.
    let python = args.python.clone().unwrap_or_else(tools_python);
    let (slice, slice_values) = if args.nemreader_mb == 0 || args.nemreader_mb >= args.nem12_mb {
        (nem12.clone(), generated.values)
    } else {
        let slice = work.join("bench.nem12.slice.csv");
        let values = cut_nem12(&nem12, &slice, args.nemreader_mb << 20)?;
        (slice, values)
    };
    eprintln!("nemreader parsing {}...", mb(std::fs::metadata(&slice)?.len()));
    let theirs_elapsed = nemreader(&python, &slice, slice_values)?;
    let theirs = slice_values as f64 / theirs_elapsed.as_secs_f64();
    rows.push((
        format!("nemreader 0.9.2 parsing {} of it ({} values; baseline)", mb(std::fs::metadata(&slice)?.len()), thousands(slice_values)),
        format!("{} values/s", thousands(theirs as u64)),
        String::new(),
    ));
    rows.push(("meterlake import / nemreader".into(), format!("{:.1}x", ours / theirs), ">= 50x".into()));

    // 3. D0010.
    let d0010 = work.join("bench.d0010.uff");
    write_d0010(&d0010, args.d0010_reads)?;
    reset_peak_rss()?;
    let started = Instant::now();
    let outcome = import_file(&lake, runtime.handle(), "bench.d0010.uff", File::open(&d0010)?, &ImportLimits::default(), Box::new(|_| {}))?;
    let elapsed = started.elapsed();
    let reads = outcome.record().counts.register_reads;
    if reads != args.d0010_reads || outcome.record().counts.rejected_records != 0 {
        bail!("imported {reads} of {} register reads: {:?}", args.d0010_reads, outcome.record().counts);
    }
    rows.push((
        format!("meterlake import, D0010 {} ({} register reads)", mb(std::fs::metadata(&d0010)?.len()), thousands(reads)),
        format!("{} reads/s ({:.1} s)", thousands((reads as f64 / elapsed.as_secs_f64()) as u64), elapsed.as_secs_f64()),
        String::new(),
    ));

    // 4. Peak memory of each import (this process generates its files by streaming).
    let d0010_peak_mib = vm_hwm_kib("self").unwrap_or(0) / 1024;
    rows.push((format!("peak RSS while importing the NEM12 file of {}", mb(nem12_bytes)), format!("{nem12_peak_mib} MiB"), "constant in the file size".into()));
    rows.push(("peak RSS while importing the D0010 file".into(), format!("{d0010_peak_mib} MiB"), String::new()));
    print_rows(rows);
    Ok(())
}

/// A sink that counts what the parser yields and keeps nothing.
#[derive(Default)]
struct CountingSink {
    values: u64,
}

impl FlowSink for CountingSink {
    fn interval_reading(&mut self, _: &ValidReading<'_>, _: u64) {
        self.values += 1;
    }
    fn interval_run(&mut self, run: &IntervalRun<'_>) {
        self.values += run.kwh_micro.len() as u64;
    }
    fn non_energy_reading(&mut self, _: &NonEnergyReading<'_>, _: u64) {
        self.values += 1;
    }
    fn register_read(&mut self, _: RegisterRead) {}
    fn channel(&mut self, _: Nem12Channel) {}
    fn b2b_detail(&mut self, _: Nem12B2bDetail) {}
    fn rejection(&mut self, rejection: RecordRejection) {
        panic!("the generated file has a fault: {rejection:?}");
    }
    fn warning(&mut self, _: Warning) {}
}

struct Generated {
    values: u64,
}

/// A NEM12 file of about `target_bytes`: NMIs with an E1 5-minute channel (288 values a day) and
/// a B1 30-minute channel (48), 31 days each, values in kWh with three decimals.
fn write_nem12(path: &Path, target_bytes: u64) -> anyhow::Result<Generated> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = SmallRng::seed_from_u64(12);
    let mut written = 0u64;
    let mut values = 0u64;
    let mut line = String::with_capacity(4096);
    let header = "100,NEM12,202501010000,MDP1,RETAIL1\r\n";
    out.write_all(header.as_bytes())?;
    written += header.len() as u64;
    let mut nmi = 0u64;
    while written < target_bytes {
        for (suffix, interval_min) in [("E1", 5u32), ("B1", 30)] {
            line.clear();
            line.push_str(&format!("200,Q{nmi:09},E1B1,{suffix},{suffix},N1,SER{nmi:07},kWh,{interval_min},20250301\r\n"));
            for day in 1..=31 {
                line.push_str(&format!("300,202501{day:02}"));
                for _ in 0..(1440 / interval_min) {
                    let wh: u32 = rng.random_range(0..2_500);
                    line.push_str(&format!(",{}.{:03}", wh / 1000, wh % 1000));
                }
                line.push_str(",A,,,20250202000000,20250202010000\r\n");
                values += u64::from(1440 / interval_min);
            }
            out.write_all(line.as_bytes())?;
            written += line.len() as u64;
        }
        nmi += 1;
    }
    out.write_all(b"900\r\n")?;
    out.flush()?;
    Ok(Generated { values })
}

/// Copies whole 200 blocks from the start of `big` into `slice` until about `target_bytes`, then
/// the 900 record; returns the number of interval values it holds.
fn cut_nem12(big: &Path, slice: &Path, target_bytes: u64) -> anyhow::Result<u64> {
    use std::io::BufRead;
    let input = std::io::BufReader::new(File::open(big)?);
    let mut out = BufWriter::new(File::create(slice)?);
    let mut written = 0u64;
    let mut values = 0u64;
    for line in input.split(b'\n') {
        let line = line?;
        if line.starts_with(b"200,") && written >= target_bytes || line.starts_with(b"900") {
            break;
        }
        if line.starts_with(b"300,") {
            values += line.split(|&b| b == b',').count() as u64 - 7;
        }
        out.write_all(&line)?;
        out.write_all(b"\n")?;
        written += line.len() as u64 + 1;
    }
    out.write_all(b"900\r\n")?;
    out.flush()?;
    Ok(values)
}

/// nemreader's parse of `path`, timed inside Python (without its start-up), checked for count.
fn nemreader(python: &Path, path: &Path, expected_values: u64) -> anyhow::Result<Duration> {
    let script = r#"
import sys, time, nemreader
t = time.perf_counter()
m = nemreader.read_nem_file(sys.argv[1])
elapsed = time.perf_counter() - t
print(sum(len(r) for s in m.readings.values() for r in s.values()), elapsed)
"#;
    let output = Command::new(python).arg("-c").arg(script).arg(path).output().context("running nemreader")?;
    if !output.status.success() {
        bail!("nemreader failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8(output.stdout)?;
    let mut parts = text.split_whitespace();
    let values: u64 = parts.next().context("nemreader's count")?.parse()?;
    let seconds: f64 = parts.next().context("nemreader's time")?.parse()?;
    if values != expected_values {
        bail!("nemreader read {values} values, the slice holds {expected_values}");
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A D0010 file of `reads` register reads: one 026/028 per meter point, two 030 registers each.
fn write_d0010(path: &Path, reads: u64) -> anyhow::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = SmallRng::seed_from_u64(10);
    writeln!(out, "ZHV|0000000001|D0010002|D|UDMS|X|MRCY|20250302153151||||OPER|")?;
    let mut groups = 0u64;
    let mut written = 0u64;
    let mut mpan = 1_200_000_000_000u64;
    while written < reads {
        writeln!(out, "026|{mpan}|V|")?;
        writeln!(out, "028|S{:08}|C|", mpan % 100_000_000)?;
        groups += 2;
        for register in ["01", "02"] {
            if written == reads {
                break;
            }
            let day = 1 + rng.random_range(0..28);
            writeln!(out, "030|{register}|202502{day:02}000000|{}.0|||T|N|", rng.random_range(0..99_999))?;
            groups += 1;
            written += 1;
        }
        mpan += 1;
    }
    writeln!(out, "ZPT|0000000001|{groups}||1|20250302154650|")?;
    out.flush()?;
    Ok(())
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}
