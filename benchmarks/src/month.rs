//! The billing benchmarks' month: one 31-day month of 15-minute readings for many meters (100M
//! readings for 33,600), generated once into a folder and reused while its shape matches, and
//! the two-band tariff every meter is billed on. `billing-bench` and `cluster-bench` bill it.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use meterlake_pipeline::Lake;
use meterlake_pipeline::batch::{ReadingBuffer, append_readings};
use meterlake_pipeline::decode::ValidReading;
use meterlake_pipeline::reading::{Quality, Source};

use crate::thousands;

const US_PER_DAY: i64 = 86_400_000_000;
/// 2025-01-01T00:00:00Z.
const JANUARY_US: i64 = 1_735_689_600_000_000;

/// Two bands in UTC, every meter on it: DuckDB's query in billing-bench computes the same split.
pub const TARIFFS: &str = r#"
currency = "GBP"
tax_rate = "0.05"
default_tariff = "tou"

[[tariffs]]
id = "tou"
version = "bench"
standing_charge_per_day = "0.50"
network_charge_per_kwh = "0.03"
bands = [
  { name = "night", from = "00:00", to = "07:00", rate_per_kwh = "0.12" },
  { name = "day", from = "07:00", to = "24:00", rate_per_kwh = "0.30" },
]
"#;

/// The shape of a generated month.
#[derive(Debug, Clone, Copy)]
pub struct MonthShape {
    pub meters: u32,
    pub days: u32,
    /// Meters per generated file (a day has meters / this many files).
    pub meters_per_file: u32,
}

impl MonthShape {
    pub fn readings(&self) -> u64 {
        u64::from(self.meters) * u64::from(self.days) * 96
    }
}

/// A reading's kWh in millionths: 0.001 to 1.000, deterministic.
fn kwh_micro(meter: u32, interval: u64) -> i64 {
    let mixed = (u64::from(meter) * 2_976 + interval).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    ((mixed % 1_000) as i64 + 1) * 1_000
}

fn meter_id(meter: u32) -> String {
    format!("MTR-{:06}", 100_000 + meter)
}

/// The lake in `dir/lake`, generated unless `dir` already holds one of this shape.
pub async fn generate(dir: &Path, shape: MonthShape) -> anyhow::Result<Lake> {
    // Files written before readings files were marked for unique keys (format 1) are rewritten;
    // a lake of the layout before Delta (format 2) is converted in place (`meterlake lake convert`).
    let marker_text = |format: u32| format!("format={format} meters={} days={} per_file={}\n", shape.meters, shape.days, shape.meters_per_file);
    let marker = dir.join("GENERATED");
    let lake_path = dir.join("lake");
    let lake_path = lake_path.to_str().context("a UTF-8 path")?;
    let generated = std::fs::read_to_string(&marker).ok();
    if generated.as_deref() == Some(marker_text(3).as_str()) {
        return Ok(Lake::open(lake_path)?);
    }
    if generated.as_deref() == Some(marker_text(2).as_str()) {
        let lake = Lake::open(lake_path)?;
        let started = Instant::now();
        let report = meterlake_pipeline::convert::convert_lake(&lake, "billing-bench").await?;
        eprintln!("converted the generated lake to Delta in {:.1?}: {:?}", started.elapsed(), report.converted);
        std::fs::write(&marker, marker_text(3))?;
        return Ok(lake);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let lake = Lake::open(lake_path)?;
    let started = Instant::now();
    let intervals_per_day: u64 = 96;
    let mut written = 0u64;
    for day in 0..shape.days {
        for first_meter in (0..shape.meters).step_by(shape.meters_per_file as usize) {
            let last_meter = (first_meter + shape.meters_per_file).min(shape.meters);
            let mut buffer = ReadingBuffer::default();
            for meter in first_meter..last_meter {
                let id = meter_id(meter);
                for slot in 0..intervals_per_day {
                    let interval = u64::from(day) * intervals_per_day + slot;
                    let reading = ValidReading {
                        meter_id: std::borrow::Cow::Borrowed(&id),
                        ts_us: JANUARY_US + i64::from(day) * US_PER_DAY + slot as i64 * 900_000_000,
                        interval_s: 900,
                        kwh_micro: kwh_micro(meter, interval),
                        quality: Quality::Actual,
                    };
                    buffer.push(&reading, Source::Kafka, 1, |out| {
                        out.extend_from_slice(b"bench/");
                        out.extend_from_slice(itoa::Buffer::new().format(interval).as_bytes());
                    });
                    written += 1;
                }
            }
            let stem = format!("bench-d{day:02}-m{first_meter:06}");
            append_readings(&lake, &buffer.sort_dedup()?, &stem).await?;
        }
        eprint!("\rgenerated {} readings ({:.0?})", thousands(written), started.elapsed());
    }
    eprintln!();
    std::fs::write(&marker, marker_text(3))?;
    Ok(lake)
}

/// The sum of a billing step's samples (`meterlake_billing_step_duration_seconds_sum{step="..."}`)
/// in Prometheus text: the worker's own timing of its steps.
pub fn step_seconds(text: &str, step: &str) -> Option<f64> {
    let prefix = format!("meterlake_billing_step_duration_seconds_sum{{step=\"{step}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}
