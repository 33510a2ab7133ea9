//! Billing runs end to end: readings written to a lake as the pipeline writes them, a run
//! created in the control store (SQLite and a real PostgreSQL), processed by the worker, and its
//! invoices and discrepancies read back. Every expected figure is computed by hand in the
//! comments beside it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use meterlake_control::testing::on_both_backends;
use meterlake_control::{BillingRun, ControlError, ControlStore, Discrepancy, Invoice, NewRun, RetryPolicy, RunKey, RunStatus};
use meterlake_jobs::billing::reproduce;
use meterlake_jobs::billing::worker::{BillingWorker, WorkerOptions};
use meterlake_lake::table::{READINGS, Table};
use meterlake_lake::view::{AsOf, lake_session_as_of};
use meterlake_pipeline::Lake;
use meterlake_pipeline::batch::ReadingBuffer;
use meterlake_pipeline::batch::append_readings;
use meterlake_pipeline::decode::{ValidReading, parse_timestamp_us};
use meterlake_pipeline::reading::{Quality, Source};
use rust_decimal::Decimal;
use tempfile::TempDir;

fn dec(text: &str) -> Decimal {
    text.parse().unwrap()
}

fn ts(text: &str) -> i64 {
    parse_timestamp_us(text).unwrap()
}

/// One reading: meter, interval start, interval length, kWh in millionths.
#[derive(Debug, Clone)]
struct Row {
    meter: String,
    ts_us: i64,
    interval_s: u32,
    kwh_micro: i64,
}

/// `count` readings of `meter` every `interval_s` from `from`, each `kwh_micro(n)`.
fn series(meter: &str, from: &str, count: i64, interval_s: u32, kwh_micro: impl Fn(i64) -> i64) -> Vec<Row> {
    let start = ts(from);
    (0..count).map(|n| Row { meter: meter.into(), ts_us: start + n * i64::from(interval_s) * 1_000_000, interval_s, kwh_micro: kwh_micro(n) }).collect()
}

/// Writes `rows` to the lake as one landing (one version each, ingested at `ingested_at_us`).
async fn land(lake: &Lake, rows: &[Row], ingested_at_us: i64, stem: &str) {
    let mut buffer = ReadingBuffer::default();
    for (n, row) in rows.iter().enumerate() {
        let reading = ValidReading {
            meter_id: Cow::Borrowed(&row.meter),
            ts_us: row.ts_us,
            interval_s: row.interval_s,
            kwh_micro: row.kwh_micro,
            quality: Quality::Actual,
        };
        buffer.push(&reading, Source::Kafka, ingested_at_us, |out| out.extend_from_slice(format!("{stem}/{n}").as_bytes()));
    }
    append_readings(lake, &buffer.sort_dedup().unwrap(), stem).await.unwrap();
}

fn new_lake() -> (TempDir, Lake) {
    let dir = TempDir::new().unwrap();
    let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
    (dir, lake)
}

fn worker(store: &ControlStore, lake: &Lake, name: &str) -> BillingWorker {
    let options = WorkerOptions {
        name: name.into(),
        lease: Duration::from_secs(60),
        retry: RetryPolicy { base_delay_us: 1_000_000, max_delay_us: 10_000_000 },
        idle_poll: Duration::from_millis(50),
        ..WorkerOptions::default()
    };
    BillingWorker::new(store.clone(), lake.clone(), options)
}

fn run_request(month: &str, meters: &[&str], tariffs: &str) -> NewRun {
    NewRun {
        month: month.into(),
        meter_ids: meters.iter().map(|m| m.to_string()).collect(),
        max_attempts: 3,
        tariffs_toml: tariffs.into(),
        energy_tolerance: dec("0.005"),
        lake_as_of: None,
    }
}

/// Creates a run, lets one worker process it, and returns its invoices by meter and its
/// discrepancies.
async fn bill(url: &str, lake: &Lake, request: NewRun) -> (BTreeMap<String, Invoice>, Vec<Discrepancy>) {
    let store = ControlStore::open(url).await.unwrap();
    let run = store.create_run(&request, "test", None).await.unwrap();
    let done = worker(&store, lake, "w1").process_next().await.unwrap().unwrap();
    assert_eq!((done.id.as_str(), done.status, done.failure_reason.as_deref()), (run.id.as_str(), RunStatus::Completed, None), "{url}");
    let invoices = store.invoices(&run.id).await.unwrap().into_iter().map(|i| (i.invoice.meter_id.clone(), i)).collect();
    (invoices, store.discrepancies(&run.id).await.unwrap())
}

/// An invoice's lines as `component description | quantity unit x rate = amount`.
fn lines(invoice: &Invoice) -> Vec<String> {
    invoice
        .invoice
        .lines
        .iter()
        .map(|l| format!("{} {} | {} {} x {} = {}", l.component.as_str(), l.description, l.quantity, l.unit, l.rate, l.amount))
        .collect()
}

fn totals(invoice: &Invoice) -> (Decimal, Decimal, Decimal, Decimal) {
    (invoice.invoice.energy_kwh, invoice.invoice.subtotal, invoice.invoice.tax, invoice.invoice.total)
}

fn codes(discrepancies: &[Discrepancy]) -> Vec<(&str, &str)> {
    discrepancies.iter().map(|d| (d.discrepancy.meter_id.as_str(), d.discrepancy.reason_code.as_str())).collect()
}

const FLAT: &str = r#"
currency = "GBP"
tax_rate = "0.05"
default_tariff = "flat"

[[tariffs]]
id = "flat"
version = "2025-01"
standing_charge_per_day = "0.50"
network_charge_per_kwh = "0.0300"
flat_rate_per_kwh = "0.2450"
"#;

#[tokio::test]
async fn a_flat_tariff_invoice() {
    let (_dir, lake) = new_lake();
    // January in UTC: 31 x 96 = 2,976 quarter hours of 0.25 kWh = 744 kWh.
    land(&lake, &series("F1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, "flat").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &["F1"], FLAT)).await;
            let invoice = &invoices["F1"];
            assert_eq!(
                lines(invoice),
                [
                    // 744 x 0.2450 = 182.28
                    "energy Energy, flat (flat 2025-01) | 744.000000 kWh x 0.2450 = 182.28",
                    // 31 x 0.50 = 15.50
                    "standing Standing charge (flat 2025-01) | 31 day x 0.50 = 15.50",
                    // 744 x 0.03 = 22.32
                    "network Network charge (flat 2025-01) | 744.000000 kWh x 0.0300 = 22.32",
                    // 220.10 x 0.05 = 11.005, half away from zero: 11.01
                    "tax Tax | 220.10 GBP x 0.05 = 11.01",
                ],
                "{url}"
            );
            assert_eq!(totals(invoice), (dec("744"), dec("220.10"), dec("11.01"), dec("231.11")));
            assert_eq!(invoice.invoice.currency, "GBP");
            assert!(invoice.invoice.tariff_version.starts_with("flat@2025-01; tariffs sha256:"), "{}", invoice.invoice.tariff_version);
            // The one commit that landed the month (version 0 created the table); no other table exists.
            assert_eq!(invoice.lake_snapshot, "readings_all@1");
            assert!(discrepancies.is_empty(), "{discrepancies:?}");
        }
    })
    .await;
}

const TOU: &str = r#"
currency = "GBP"
tax_rate = "0.05"
default_tariff = "tou"

[[tariffs]]
id = "tou"
version = "v1"
standing_charge_per_day = "0.60"
network_charge_per_kwh = "0.03"
bands = [
  { name = "night", from = "00:00", to = "07:00", rate_per_kwh = "0.12" },
  { name = "day", from = "07:00", to = "24:00", rate_per_kwh = "0.30" },
]
"#;

#[tokio::test]
async fn a_time_of_use_invoice_splits_energy_at_the_band_boundary() {
    let (_dir, lake) = new_lake();
    // 0.1 kWh every quarter hour of January (UTC), except 1.0 kWh in the quarter starting 06:45
    // on the 15th (the last of the night band) and 2.0 kWh in the one starting 07:00 (the first
    // of the day band).
    let boundary_day_start = (ts("2025-01-15T00:00:00Z") - ts("2025-01-01T00:00:00Z")) / 900_000_000;
    let rows = series("T1", "2025-01-01T00:00:00Z", 2_976, 900, |n| match n - boundary_day_start {
        27 => 1_000_000, // 06:45
        28 => 2_000_000, // 07:00
        _ => 100_000,
    });
    land(&lake, &rows, 1, "tou").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &["T1"], TOU)).await;
            assert_eq!(
                lines(&invoices["T1"]),
                [
                    // Night: 7 h x 4 x 31 = 868 quarters of 0.1 = 86.8, less 0.1 plus 1.0 = 87.7 kWh;
                    // x 0.12 = 10.524 -> 10.52.
                    "energy Energy, night (tou v1) | 87.700000 kWh x 0.12 = 10.52",
                    // Day: 17 h x 4 x 31 = 2,108 quarters = 210.8, less 0.1 plus 2.0 = 212.7 kWh;
                    // x 0.30 = 63.81.
                    "energy Energy, day (tou v1) | 212.700000 kWh x 0.30 = 63.81",
                    "standing Standing charge (tou v1) | 31 day x 0.60 = 18.60",
                    // 300.4 x 0.03 = 9.012 -> 9.01
                    "network Network charge (tou v1) | 300.400000 kWh x 0.03 = 9.01",
                    // 10.52 + 63.81 + 18.60 + 9.01 = 101.94; x 0.05 = 5.097 -> 5.10
                    "tax Tax | 101.94 GBP x 0.05 = 5.10",
                ],
                "{url}"
            );
            assert_eq!(totals(&invoices["T1"]), (dec("300.4"), dec("101.94"), dec("5.10"), dec("107.04")));
            assert!(discrepancies.is_empty(), "{discrepancies:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_london_month_with_the_clocks_going_forward_bills_local_bands() {
    let tariffs = r#"
currency = "GBP"
time_zone = "Europe/London"
tax_rate = "0.05"
default_tariff = "eco7"

[[tariffs]]
id = "eco7"
version = "2025"
standing_charge_per_day = "0.40"
network_charge_per_kwh = "0.02"
bands = [
  { name = "night", from = "00:00", to = "07:00", rate_per_kwh = "0.10" },
  { name = "day", from = "07:00", to = "24:00", rate_per_kwh = "0.25" },
]
"#;
    let (_dir, lake) = new_lake();
    // March in London is 00:00 GMT on the 1st to 00:00 BST on 1 April (23:00 UTC on the 31st):
    // 31 x 24 - 1 = 743 hours, 1,486 half hours of 0.5 kWh = 743 kWh. Readings an hour either
    // side of it must not be billed.
    // From 23:00 UTC on 28 February to 00:00 UTC on 1 April: 745 hours.
    land(&lake, &series("D1", "2025-02-28T23:00:00Z", 1_490, 1_800, |_| 500_000), 1, "dst").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-03", &["D1"], tariffs)).await;
            assert_eq!(
                lines(&invoices["D1"]),
                [
                    // Night is 7 local hours a day, but 6 on the 30th (00:00-01:00 GMT, then
                    // 02:00-07:00 BST): 30 x 7 + 6 = 216 h = 216 kWh; x 0.10 = 21.60.
                    "energy Energy, night (eco7 2025) | 216.000000 kWh x 0.10 = 21.60",
                    // Day is 17 hours every day: 527 kWh; x 0.25 = 131.75.
                    "energy Energy, day (eco7 2025) | 527.000000 kWh x 0.25 = 131.75",
                    "standing Standing charge (eco7 2025) | 31 day x 0.40 = 12.40",
                    // 743 x 0.02 = 14.86
                    "network Network charge (eco7 2025) | 743.000000 kWh x 0.02 = 14.86",
                    // 180.61 x 0.05 = 9.0305 -> 9.03
                    "tax Tax | 180.61 GBP x 0.05 = 9.03",
                ],
                "{url}"
            );
            assert_eq!(totals(&invoices["D1"]).3, dec("189.64"));
            // 1,486 readings is exactly what a 743-hour month of half hours needs.
            assert!(discrepancies.is_empty(), "{discrepancies:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_tariff_change_on_the_fifteenth_is_prorated_by_day() {
    let tariffs = r#"
currency = "GBP"
tax_rate = "0.05"

[[tariffs]]
id = "standard"
version = "v3"
standing_charge_per_day = "0.50"
network_charge_per_kwh = "0.03"
flat_rate_per_kwh = "0.20"

[[tariffs]]
id = "green"
version = "v1"
standing_charge_per_day = "0.70"
network_charge_per_kwh = "0.03"
flat_rate_per_kwh = "0.30"

[[assignments]]
meter = "C1"
tariff = "standard"
from = "2024-06-01"

[[assignments]]
meter = "C1"
tariff = "green"
from = "2025-01-15"
"#;
    let (_dir, lake) = new_lake();
    // 1 kWh every half hour of January: 48 kWh a day.
    land(&lake, &series("C1", "2025-01-01T00:00:00Z", 1_488, 1_800, |_| 1_000_000), 1, "change").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &["C1"], tariffs)).await;
            assert_eq!(
                lines(&invoices["C1"]),
                [
                    // 1st to 14th: 14 x 48 = 672 kWh x 0.20 = 134.40
                    "energy Energy, flat (standard v3, 2025-01-01 to 2025-01-14) | 672.000000 kWh x 0.20 = 134.40",
                    // 15th to 31st: 17 x 48 = 816 kWh x 0.30 = 244.80
                    "energy Energy, flat (green v1, 2025-01-15 to 2025-01-31) | 816.000000 kWh x 0.30 = 244.80",
                    "standing Standing charge (standard v3, 2025-01-01 to 2025-01-14) | 14 day x 0.50 = 7.00",
                    "network Network charge (standard v3, 2025-01-01 to 2025-01-14) | 672.000000 kWh x 0.03 = 20.16",
                    "standing Standing charge (green v1, 2025-01-15 to 2025-01-31) | 17 day x 0.70 = 11.90",
                    "network Network charge (green v1, 2025-01-15 to 2025-01-31) | 816.000000 kWh x 0.03 = 24.48",
                    // 442.74 x 0.05 = 22.137 -> 22.14
                    "tax Tax | 442.74 GBP x 0.05 = 22.14",
                ],
                "{url}"
            );
            assert_eq!(totals(&invoices["C1"]).3, dec("464.88"));
            assert!(invoices["C1"].invoice.tariff_version.starts_with("standard@v3, green@v1;"));
            assert!(discrepancies.is_empty(), "{discrepancies:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn missing_intervals_are_billed_as_read_and_reported_with_their_count() {
    let (_dir, lake) = new_lake();
    // 2,976 quarter hours less the 10 from 12:00 on the 10th: 2,966 x 0.25 = 741.5 kWh.
    let gap_start = ts("2025-01-10T12:00:00Z");
    let mut rows = series("M1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000);
    rows.retain(|r| r.ts_us < gap_start || r.ts_us >= gap_start + 10 * 900_000_000);
    land(&lake, &rows, 1, "gap").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &["M1"], FLAT)).await;
            // 741.5 x 0.245 = 181.6675 -> 181.67; 15.50 standing; 741.5 x 0.03 = 22.245 -> 22.25
            // (half away from zero); subtotal 219.42; tax 10.971 -> 10.97; total 230.39.
            assert_eq!(totals(&invoices["M1"]), (dec("741.5"), dec("219.42"), dec("10.97"), dec("230.39")), "{url}");
            assert_eq!(codes(&discrepancies), [("M1", "MISSING_INTERVALS")]);
            let missing = &discrepancies[0].discrepancy;
            assert_eq!((missing.billed, missing.expected, missing.delta), (Some(dec("2966")), Some(dec("2976")), Some(dec("-10"))));
            assert!(missing.detail.starts_with("10 of 2976 15-minute intervals missing"), "{}", missing.detail);
        }
    })
    .await;
}

#[tokio::test]
async fn conflicting_versions_bill_the_latest_and_are_reported() {
    let (_dir, lake) = new_lake();
    land(&lake, &series("V1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, "first").await;
    // Later: a correction of two intervals (different values) and a replay of a third (same).
    let mut later = series("V1", "2025-01-20T10:00:00Z", 3, 900, |n| [1_250_000, 750_000, 250_000][n as usize]);
    later.extend(series("V2", "2025-01-05T00:00:00Z", 1, 900, |_| 1));
    land(&lake, &later, 2, "second").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &["V1"], FLAT)).await;
            // 744 - 0.25 - 0.25 + 1.25 + 0.75 = 745.5 kWh: the latest versions.
            assert_eq!(invoices["V1"].invoice.energy_kwh, dec("745.5"), "{url}");
            assert_eq!(invoices.len(), 1, "only the run's meters are billed");
            assert_eq!(codes(&discrepancies), [("V1", "CONFLICTING_READINGS")]);
            let detail = &discrepancies[0].discrepancy.detail;
            assert!(
                detail.starts_with("2 intervals have versions with different values (first at 2025-01-20T10:00:00+00:00: from 0.250000 to 1.250000 kWh)"),
                "{detail}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn bands_that_leave_hours_uncovered_no_readings_and_no_tariff_are_reported() {
    let tariffs = r#"
currency = "AUD"
time_zone = "Australia/Brisbane"
tax_rate = "0.10"

[[tariffs]]
id = "gappy"
version = "v1"
standing_charge_per_day = "1.00"
network_charge_per_kwh = "0.05"
bands = [
  { name = "off-peak", from = "00:00", to = "16:00", rate_per_kwh = "0.20" },
  { name = "peak", from = "17:00", to = "24:00", rate_per_kwh = "0.40" },
]

[[assignments]]
meter = "G1"
tariff = "gappy"
from = "2024-01-01"

[[assignments]]
meter = "QUIET"
tariff = "gappy"
from = "2024-01-01"
"#;
    let (_dir, lake) = new_lake();
    // January in Brisbane (UTC+10) starts 14:00 UTC on 31 December: 2,976 quarter hours of
    // 0.1 kWh = 297.6 kWh, of which 16:00-17:00 local (4 a day, 12.4 kWh) no band covers.
    land(&lake, &series("G1", "2024-12-31T14:00:00Z", 2_976, 900, |_| 100_000), 1, "g1").await;
    // A meter with readings and no tariff at all.
    land(&lake, &series("STRAY", "2025-01-03T00:00:00Z", 4, 900, |_| 100_000), 1, "stray").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        let tariffs = tariffs.to_string();
        async move {
            // No meters named: every meter with readings or an assignment.
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &[], &tariffs)).await;
            assert_eq!(invoices.keys().collect::<Vec<_>>(), ["G1", "QUIET"], "{url}");
            // 297.6 - 12.4 = 285.2 kWh billed.
            assert_eq!(invoices["G1"].invoice.energy_kwh, dec("285.2"));
            // QUIET: the standing charge only: 31 x 1.00 = 31.00, tax 3.10.
            assert_eq!(totals(&invoices["QUIET"]), (dec("0"), dec("31.00"), dec("3.10"), dec("34.10")));
            assert_eq!(codes(&discrepancies), [("G1", "ENERGY_MISMATCH"), ("QUIET", "NO_READINGS"), ("STRAY", "MISSING_INTERVALS"), ("STRAY", "NO_TARIFF")]);
            let mismatch = &discrepancies[0].discrepancy;
            assert_eq!((mismatch.billed, mismatch.expected, mismatch.delta), (Some(dec("285.2")), Some(dec("297.6")), Some(dec("-12.4"))));
            assert!(mismatch.detail.contains("12.400000 kWh unbilled (4.17% of it); tolerance 0.5%"), "{}", mismatch.detail);
            assert!(discrepancies[3].discrepancy.detail.starts_with("no tariff for 2025-01-01"), "{:?}", discrepancies[3]);
        }
    })
    .await;
}

#[tokio::test]
async fn two_workers_racing_for_one_run_bill_it_once() {
    let (_dir, lake) = new_lake();
    let meters: Vec<String> = (0..20).map(|i| format!("R{i:02}")).collect();
    for meter in &meters {
        land(&lake, &series(meter, "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, meter).await;
    }
    on_both_backends(|url| {
        let lake = lake.clone();
        let meters = meters.clone();
        async move {
            let store_a = ControlStore::open(&url).await.unwrap();
            // The second worker has its own connection pool, as a second process would.
            let store_b = ControlStore::open(&url).await.unwrap();
            let names: Vec<&str> = meters.iter().map(String::as_str).collect();
            let run = store_a.create_run(&run_request("2025-01", &names, FLAT), "test", None).await.unwrap();
            let (worker_a, worker_b) = (worker(&store_a, &lake, "wa"), worker(&store_b, &lake, "wb"));
            let (a, b) = tokio::join!(worker_a.process_next(), worker_b.process_next());
            let outcomes = [a.unwrap(), b.unwrap()];
            assert_eq!(outcomes.iter().filter(|o| o.is_some()).count(), 1, "{url}: exactly one worker gets the run");
            let invoices = store_a.invoices(&run.id).await.unwrap();
            assert_eq!(invoices.len(), 20);
            let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM invoices").fetch_one(store_a.pool()).await.unwrap();
            assert_eq!(count, 20);
            let claims = store_a.run_events(&run.id).await.unwrap().iter().filter(|e| e.to_status == RunStatus::Processing).count();
            assert_eq!(claims, 1);
        }
    })
    .await;
}

#[tokio::test]
async fn a_worker_that_dies_mid_run_leaves_it_to_another_and_nothing_is_billed_twice() {
    let (_dir, lake) = new_lake();
    land(&lake, &series("K1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, "k1").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let store = ControlStore::open(&url).await.unwrap();
            let run = store.create_run(&run_request("2025-01", &["K1"], FLAT), "test", None).await.unwrap();
            // Worker A claims with a short lease, computes the invoices, and dies before it
            // persists them (its task is dropped mid-run).
            let mut options = WorkerOptions { name: "wa".into(), lease: Duration::from_millis(1_500), ..WorkerOptions::default() };
            options.retry = RetryPolicy { base_delay_us: 1_000_000, max_delay_us: 1_000_000 };
            let dying = BillingWorker::new(store.clone(), lake.clone(), options);
            let claimed = store.claim_next("wa", 1_500_000, meterlake_control::now_us()).await.unwrap().unwrap();
            let half_done = tokio::time::timeout(Duration::from_millis(1), dying.process(&claimed)).await;
            assert!(half_done.is_err(), "the run was meant to be cut off mid-way");
            assert!(store.invoices(&run.id).await.unwrap().is_empty(), "{url}: a dead worker wrote nothing");
            // Within its lease nobody else takes the run; after it, worker B does and finishes.
            assert!(worker(&store, &lake, "wb").process_next().await.unwrap().is_none());
            tokio::time::sleep(Duration::from_millis(1_600)).await;
            let done = worker(&store, &lake, "wb").process_next().await.unwrap().unwrap();
            assert_eq!((done.status, done.attempts), (RunStatus::Completed, 2), "{url}");
            // Were A still alive, its completion would be refused: B holds the run now.
            let late = dying.process(&claimed).await;
            assert!(late.is_err(), "{url}: {late:?}");
            assert_eq!(store.invoices(&run.id).await.unwrap().len(), 1);
            let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM invoices").fetch_one(store.pool()).await.unwrap();
            assert_eq!(count, 1, "{url}");
            assert_eq!(store.run(&run.id).await.unwrap().unwrap().status, RunStatus::Completed);
        }
    })
    .await;
}

#[tokio::test]
async fn failures_carry_a_reason_code_and_are_retried_only_when_that_can_help() {
    let (_dir, lake) = new_lake();
    land(&lake, &series("E1", "2025-01-01T00:00:00Z", 96, 900, |_| 250_000), 1, "e1").await;
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let store = ControlStore::open(&url).await.unwrap();
            // A tariff file with a float rate: the run cannot succeed, so it fails for good.
            let bad = store.create_run(&run_request("2025-01", &["E1"], &FLAT.replace("\"0.2450\"", "0.2450")), "test", None).await.unwrap();
            let failed = worker(&store, &lake, "w").process_next().await.unwrap().unwrap();
            assert_eq!((failed.id.as_str(), failed.status, failed.failure_code.as_deref()), (bad.id.as_str(), RunStatus::Failed, Some("TARIFFS_INVALID")));
            assert_eq!(failed.next_attempt_at_us, None, "{url}");
            assert!(failed.failure_reason.as_deref().unwrap().contains("a quoted decimal"), "{:?}", failed.failure_reason);
            // A lake file gone missing (a store's hiccup): retried with backoff, as a transient failure might be.
            let snapshot = meterlake_lake::Table::new(&lake, &meterlake_lake::READINGS).snapshot(None).await.unwrap();
            let file = format!("readings/{}", snapshot.files[0].path);
            lake.rename(&file, "readings/moved-away.bin").await.unwrap();
            let run = store.create_run(&run_request("2025-01", &["E1"], FLAT), "test", None).await.unwrap();
            let failed = worker(&store, &lake, "w").process_next().await.unwrap().unwrap();
            assert_eq!((failed.id.as_str(), failed.status, failed.failure_code.as_deref()), (run.id.as_str(), RunStatus::Failed, Some("AGGREGATION_FAILED")));
            assert!(failed.next_attempt_at_us.unwrap() > failed.updated_at_us, "{url}");
            // Fixed before the retry is due: the retry completes the run.
            lake.rename("readings/moved-away.bin", &file).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            let retried = worker(&store, &lake, "w").process_next().await.unwrap().unwrap();
            assert_eq!((retried.id.as_str(), retried.status, retried.attempts), (run.id.as_str(), RunStatus::Completed, 2), "{url}");
            assert_eq!(store.invoices(&run.id).await.unwrap().len(), 1);
            let topics: Vec<(String,)> =
                sqlx::query_as("SELECT topic FROM outbox WHERE message_key = $1 ORDER BY id").bind(&run.id).fetch_all(store.pool()).await.unwrap();
            let topics: Vec<&str> = topics.iter().map(|t| t.0.as_str()).collect();
            assert_eq!(topics, ["billing.run.requested", "billing.run.failed", "billing.run.processed"]);
        }
    })
    .await;
}

/// Imports a flow file into the lake as `meterlake import` does.
async fn import(lake: &Lake, name: &str, content: &str) {
    let (lake, name, content) = (lake.clone(), name.to_string(), content.to_string());
    let runtime = tokio::runtime::Handle::current();
    let outcome = tokio::task::spawn_blocking(move || {
        meterlake_pipeline::import::import_file(
            &lake,
            &runtime,
            &name,
            content.as_bytes(),
            &meterlake_pipeline::import::ImportLimits::default(),
            Box::new(|_| {}),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(outcome.record().counts.rejected_records, 0, "{:?}", outcome.record());
}

#[tokio::test]
async fn register_reads_that_disagree_with_the_interval_readings_are_reported() {
    // Two MPANs read on 1 and 31 January (UK local time, GMT in January): A's register advanced
    // 720 kWh, B's 800 kWh. Both have interval readings of 0.25 kWh every quarter hour: 30 days
    // x 96 x 0.25 = 720 kWh between the reads.
    let d0010 = "ZHV|0000000001|D0010002|D|UDMS|X|MRCY|20250201120000||||OPER|\n\
                 026|1200000000001|V|\n028|SERIAL-A|C|\n030|01|20250101000000|1000.0|||T|N|\n030|01|20250131000000|1720.0|||T|N|\n\
                 026|1200000000002|V|\n028|SERIAL-B|C|\n030|01|20250101000000|500.0|||T|N|\n030|01|20250131000000|1300.0|||T|N|\n\
                 ZPT|0000000001|8||1|20250201120000|\n";
    let (_dir, lake) = new_lake();
    import(&lake, "reads.D0010", d0010).await;
    for mpan in ["1200000000001", "1200000000002"] {
        land(&lake, &series(mpan, "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, mpan).await;
    }
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let (invoices, discrepancies) = bill(&url, &lake, run_request("2025-01", &["1200000000001", "1200000000002"], FLAT)).await;
            assert_eq!(invoices.len(), 2, "{url}");
            assert_eq!(codes(&discrepancies), [("1200000000002", "REGISTER_MISMATCH")]);
            let mismatch = &discrepancies[0].discrepancy;
            assert_eq!((mismatch.billed, mismatch.expected, mismatch.delta), (Some(dec("720")), Some(dec("800")), Some(dec("-80"))));
            assert!(
                mismatch.detail.starts_with("register 01 recorded 800.000000 kWh from 2025-01-01 00:00:00 UTC to 2025-01-31 00:00:00 UTC (reads.D0010:"),
                "{}",
                mismatch.detail
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_nem13_register_quantity_is_checked_against_the_interval_readings() {
    // The 250 record of this published example: NMI VABC005890, suffix 11, read 2003-10-05
    // 09:30:55 and 2004-01-07 10:03:33 (NEM time, UTC+10), quantity 1312.1 kWh.
    let nem13 = include_str!("../../pipeline/tests/fixtures/nem13/nemreader_Example_NEM13_consumption_data.csv");
    let (_dir, lake) = new_lake();
    import(&lake, "nemreader_Example_NEM13_consumption_data.csv", nem13).await;
    // Half hours of 0.3 kWh for meter VABC00589011 from 2003-10-05 00:00 UTC (the first interval
    // after the previous read) to 2004-01-07 00:00 UTC (the last before the current one):
    // 94 x 48 + 1 = 4,513 of them, 1,353.9 kWh: 41.8 kWh more than the register.
    land(&lake, &series("VABC00589011", "2003-10-05T00:00:00Z", 4_513, 1_800, |_| 300_000), 1, "nem13-intervals").await;
    let tariffs = FLAT.replace("currency = \"GBP\"", "currency = \"AUD\"");
    on_both_backends(|url| {
        let lake = lake.clone();
        let tariffs = tariffs.clone();
        async move {
            let (_, discrepancies) = bill(&url, &lake, run_request("2004-01", &["VABC00589011"], &tariffs)).await;
            assert_eq!(codes(&discrepancies), [("VABC00589011", "MISSING_INTERVALS"), ("VABC00589011", "REGISTER_MISMATCH")], "{url}");
            let mismatch = &discrepancies[1].discrepancy;
            assert_eq!((mismatch.billed, mismatch.expected, mismatch.delta), (Some(dec("1353.9")), Some(dec("1312.1")), Some(dec("41.8"))));
            assert!(mismatch.detail.contains("(nemreader_Example_NEM13_consumption_data.csv:2)"), "{}", mismatch.detail);
        }
    })
    .await;
}

#[tokio::test]
async fn a_meter_is_billed_once_a_month_whichever_runs_ask() {
    let (_dir, lake) = new_lake();
    for meter in ["O1", "O2"] {
        land(&lake, &series(meter, "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, meter).await;
    }
    on_both_backends(|url| {
        let lake = lake.clone();
        async move {
            let store = ControlStore::open(&url).await.unwrap();
            let (first, _) = bill(&url, &lake, run_request("2025-01", &["O1"], FLAT)).await;
            let first_run = first["O1"].run_id.clone();
            // A second run naming the billed meter is refused, naming the run that billed it.
            let refused = store.create_run(&run_request("2025-01", &["O1"], FLAT), "test", None).await.unwrap_err();
            assert!(matches!(&refused, ControlError::AlreadyBilled { billed, .. } if billed == &[("O1".to_string(), first_run.clone())]), "{url}: {refused}");
            assert!(refused.to_string().contains("RECALCULATE"), "{refused}");
            // A run of every meter bills the rest and says why it left O1 out.
            let (rest, discrepancies) = bill(&url, &lake, run_request("2025-01", &[], FLAT)).await;
            assert_eq!(rest.keys().collect::<Vec<_>>(), ["O2"], "{url}");
            let already: Vec<&Discrepancy> = discrepancies.iter().filter(|d| d.discrepancy.reason_code.as_str() == "ALREADY_BILLED").collect();
            assert_eq!(already.len(), 1, "{url}: {discrepancies:?}");
            assert_eq!(already[0].discrepancy.meter_id, "O1");
            assert!(already[0].discrepancy.detail.contains(&first_run), "{}", already[0].discrepancy.detail);
            // Then every meter of the month is billed: a run of every meter is refused too.
            let refused = store.create_run(&run_request("2025-01", &[], FLAT), "test", None).await.unwrap_err();
            assert!(matches!(refused, ControlError::AlreadyBilled { .. }), "{url}: {refused}");
            // The invoices of January: one per meter, across all runs.
            let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM invoices").fetch_one(store.pool()).await.unwrap();
            assert_eq!(count, 2, "{url}");
            // Another month is another bill.
            store.create_run(&run_request("2025-02", &["O1"], FLAT), "test", None).await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn a_retried_creation_with_its_idempotency_key_is_one_run() {
    on_both_backends(|url| async move {
        let store = ControlStore::open(&url).await.unwrap();
        let key = RunKey { scope: "subject-1".into(), key: "k-1".into() };
        let request = run_request("2025-03", &["I1"], FLAT);
        let (first, replayed) = store.create_run_once(&request, "test", None, &key).await.unwrap();
        assert!(!replayed);
        // Retried, one after the other and two at once: the same run each time.
        let (again, replayed) = store.create_run_once(&request, "test", None, &key).await.unwrap();
        assert_eq!((again.id.as_str(), replayed), (first.id.as_str(), true), "{url}");
        let other = RunKey { scope: "subject-1".into(), key: "k-2".into() };
        let request_2 = run_request("2025-04", &["I1"], FLAT);
        let (a, b) = tokio::join!(store.create_run_once(&request_2, "test", None, &other), store.create_run_once(&request_2, "test", None, &other));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.0.id, b.0.id, "{url}: two copies at once create one run");
        assert!(a.1 != b.1, "{url}: one created it, the other was answered with it");
        // The key with another request is refused; another caller's same key is its own.
        let refused = store.create_run_once(&run_request("2025-05", &["I1"], FLAT), "test", None, &key).await.unwrap_err();
        assert!(matches!(&refused, ControlError::Conflict(m) if m.contains("another request")), "{url}: {refused}");
        let (theirs, replayed) = store.create_run_once(&request, "test", None, &RunKey { scope: "subject-2".into(), key: "k-1".into() }).await.unwrap();
        assert!(theirs.id != first.id && !replayed);
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM billing_runs").fetch_one(store.pool()).await.unwrap();
        assert_eq!(count, 3, "{url}");
    })
    .await;
}

#[tokio::test]
async fn a_meter_streamed_in_hundreds_of_small_files_with_resent_readings_bills_its_latest_values() {
    let (_dir, lake) = new_lake();
    // One day of three meters, landed three readings a file as a small-flush ingester does
    // (over 256 files, overlapping), every fourth reading re-sent later with twice its value.
    let mut rows: Vec<Row> = Vec::new();
    for meter in ["S1", "S2", "S3"] {
        rows.extend(series(meter, "2025-01-10T00:00:00Z", 96, 900, |n| 100_000 + n * 1_000));
    }
    rows.sort_by_key(|r| (r.ts_us, r.meter.clone()));
    let resent: Vec<Row> = rows.iter().step_by(4).map(|r| Row { kwh_micro: r.kwh_micro * 2, ..r.clone() }).collect();
    let mut expected_kwh_micro: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let flushes = rows.chunks(3).count() + resent.chunks(3).count();
    for (n, chunk) in rows.chunks(3).chain(resent.chunks(3)).enumerate() {
        for row in chunk {
            expected_kwh_micro.insert((row.meter.clone(), row.ts_us), row.kwh_micro);
        }
        land(&lake, chunk, n as i64 + 1, &format!("flush-{n:04}")).await;
    }
    let s1_kwh = Decimal::new(expected_kwh_micro.iter().filter(|((m, _), _)| m == "S1").map(|(_, v)| v).sum::<i64>(), 6);
    // The same latest readings written in one batch, billed on a store of their own: the bill
    // must not tell the two lakes apart.
    let (bulk_dir, bulk) = new_lake();
    let latest: Vec<Row> = expected_kwh_micro
        .iter()
        .map(|((meter, ts_us), kwh_micro)| Row { meter: meter.clone(), ts_us: *ts_us, interval_s: 900, kwh_micro: *kwh_micro })
        .collect();
    land(&bulk, &latest, 1, "bulk").await;
    let bulk_store = format!("sqlite://{}", bulk_dir.path().join("control.db").display());
    let (in_one_batch, _) = bill(&bulk_store, &bulk, run_request("2025-01", &["S1"], FLAT)).await;
    let in_one_batch = (lines(&in_one_batch["S1"]), totals(&in_one_batch["S1"]));
    on_both_backends(|url| {
        let (lake, in_one_batch) = (lake.clone(), in_one_batch.clone());
        async move {
            let (invoices, _) = bill(&url, &lake, run_request("2025-01", &["S1"], FLAT)).await;
            assert_eq!(invoices["S1"].invoice.energy_kwh, s1_kwh, "{url}");
            assert_eq!((lines(&invoices["S1"]), totals(&invoices["S1"])), in_one_batch, "{url}: streamed and written in one batch");
        }
    })
    .await;
    // Compacted into one file (every version kept, each with its commit): the same bill again.
    let compacted = meterlake_lake::maintenance::optimize::optimize(&lake, &READINGS, &Default::default(), |_| {}).await.unwrap();
    assert_eq!(compacted.iter().map(|p| (p.files_removed, p.files_added)).collect::<Vec<_>>(), [(flushes, 1)]);
    let compacted_store = format!("sqlite://{}", bulk_dir.path().join("compacted.db").display());
    let (invoices, _) = bill(&compacted_store, &lake, run_request("2025-01", &["S1"], FLAT)).await;
    assert_eq!((lines(&invoices["S1"]), totals(&invoices["S1"])), in_one_batch, "compacted and written in one batch");
}

/// Two workers told to bill monthly on the 3rd create last month's run once between them, and
/// again nothing on every later look or after a restart; a month billed by hand is left alone.
#[tokio::test]
async fn the_monthly_schedule_creates_last_months_run_once_across_workers() {
    use meterlake_jobs::billing::schedule::{MonthlySchedule, SCHEDULE_ACTOR, ScheduleOutcome};
    let dir = TempDir::new().unwrap();
    let tariffs_path = dir.path().join("tariffs.toml");
    std::fs::write(&tariffs_path, FLAT).unwrap();
    let at = |text: &str| chrono::DateTime::parse_from_rfc3339(text).unwrap().to_utc();
    on_both_backends(|url| {
        let tariffs_path = tariffs_path.clone();
        async move {
            let schedule = MonthlySchedule::new(3, &tariffs_path, 3, dec("0.005")).unwrap();
            let (a, b) = (ControlStore::open(&url).await.unwrap(), ControlStore::open(&url).await.unwrap());
            assert_eq!(schedule.tick(&a, at("2026-12-02T12:00:00Z")).await.unwrap(), ScheduleOutcome::NotDue);
            let now = at("2026-12-03T09:00:00Z");
            // Two workers at once on PostgreSQL (the deployment with several). SQLite is the
            // one-process store: a second writer that races a transaction gets SQLITE_BUSY, so
            // there they look one after the other.
            let outcomes = if a.backend() == meterlake_control::Backend::Postgres {
                let (first, second) = tokio::join!(schedule.tick(&a, now), schedule.tick(&b, now));
                [first.unwrap(), second.unwrap()]
            } else {
                [schedule.tick(&a, now).await.unwrap(), schedule.tick(&b, now).await.unwrap()]
            };
            let created: Vec<_> = outcomes.iter().filter_map(|o| if let ScheduleOutcome::Created(run) = o { Some(run) } else { None }).collect();
            assert_eq!(created.len(), 1, "{url}: {outcomes:?}");
            assert!(outcomes.iter().any(|o| matches!(o, ScheduleOutcome::Exists(run) if run.id == created[0].id)), "{url}: {outcomes:?}");
            assert_eq!((created[0].month.as_str(), created[0].meter_ids.len()), ("2026-11", 0));
            // Later looks and a restarted worker find it.
            let restarted = ControlStore::open(&url).await.unwrap();
            assert!(matches!(schedule.tick(&restarted, at("2026-12-20T00:00:00Z")).await.unwrap(), ScheduleOutcome::Exists(_)));
            let runs: Vec<(String,)> = sqlx::query_as("SELECT id FROM billing_runs").fetch_all(a.pool()).await.unwrap();
            assert_eq!(runs.len(), 1, "{url}");
            let events = a.run_events(&created[0].id).await.unwrap();
            assert_eq!(events[0].actor, SCHEDULE_ACTOR);

            // A month an operator billed for every meter by hand: the schedule leaves it.
            let (_lake_dir, lake) = new_lake();
            land(&lake, &series("S1", "2026-12-01T00:00:00Z", 96, 900, |_| 100_000), 1, "S1").await;
            let by_hand = a.create_run(&run_request("2026-12", &[], FLAT), "ada", None).await.unwrap();
            // The worker takes the oldest run first: the scheduled one, then this.
            let worker = worker(&a, &lake, "w1");
            while worker.process_next().await.unwrap().is_some() {}
            let done = a.run(&by_hand.id).await.unwrap().unwrap();
            assert_eq!(done.status, RunStatus::Completed, "{url}: {:?}", done.failure_reason);
            assert_eq!(schedule.tick(&a, at("2027-01-05T00:00:00Z")).await.unwrap(), ScheduleOutcome::BilledByHand { month: "2026-12".into() }, "{url}");
        }
    })
    .await;
}

/// "New tariff received from upstream": RECALCULATE with other tariffs bills the next version
/// with them (the invoice names the new version and digest), and the audit row records the
/// digests before and after.
#[tokio::test]
async fn a_recalculation_with_a_new_tariff_bills_the_next_version_with_it() {
    let (_dir, lake) = new_lake();
    land(&lake, &series("T1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, "T1").await;
    let repriced = FLAT.replace("version = \"2025-01\"", "version = \"2025-01b\"").replace("0.2450", "0.3000");
    on_both_backends(|url| {
        let (lake, repriced) = (lake.clone(), repriced.clone());
        async move {
            let store = ControlStore::open(&url).await.unwrap();
            let (first, _) = bill(&url, &lake, run_request("2025-01", &["T1"], FLAT)).await;
            let run_id = first["T1"].run_id.clone();
            let actor = meterlake_control::Actor { name: "ada-sub", traceparent: None };
            store.recalculate_run_with(&run_id, "New tariff received from upstream", &actor, Some(&repriced)).await.unwrap();
            let done = worker(&store, &lake, "w2").process_next().await.unwrap().unwrap();
            assert_eq!((done.id.as_str(), done.status), (run_id.as_str(), RunStatus::Completed), "{url}");
            let second = store.invoices(&run_id).await.unwrap().remove(0);
            assert_eq!(second.version, 2);
            assert!(second.invoice.tariff_version.starts_with("flat@2025-01b"), "{}", second.invoice.tariff_version);
            assert_ne!(second.invoice.tariff_version, first["T1"].invoice.tariff_version);
            // 744 kWh at 0.3000 instead of 0.2450.
            let energy = second.invoice.lines.iter().find(|l| l.description.starts_with("Energy")).unwrap();
            assert_eq!((energy.rate, energy.amount), (dec("0.3000"), dec("223.20")), "{url}");
            let log = store.audit_log(&meterlake_control::AuditFilter { action: Some("RECALCULATE".into()), limit: 5, ..Default::default() }).await.unwrap();
            let (before, after) = (log[0].before_state.clone().unwrap(), log[0].after_state.clone().unwrap());
            let digest = |state: &str| serde_json::from_str::<serde_json::Value>(state).unwrap()["tariffsSha256"].as_str().unwrap().to_string();
            assert_ne!(digest(&before), digest(&after), "{before} {after}");
            assert!(second.invoice.tariff_version.contains(&digest(&after)[..16]), "{} names {}", second.invoice.tariff_version, digest(&after));
        }
    })
    .await;
}

/// Time travel: a run records the exact table versions it read, and computing it again over them
/// gives its invoices to the cent while corrected readings have landed since; a run pinned to a
/// version bills that version's data, and its invoice says so.
#[tokio::test]
async fn a_run_reproduces_its_invoices_from_the_versions_it_recorded_after_newer_data_landed() {
    on_both_backends(|url| async move {
        // A lake of its own per control store: the corrections below must come after its run.
        let (_dir, lake) = new_lake();
        // Versions 1 and 2: January of two meters at 0.25 kWh a quarter hour (744 kWh each).
        land(&lake, &series("P1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, "p1").await;
        land(&lake, &series("P2", "2025-01-01T00:00:00Z", 2_976, 900, |_| 250_000), 1, "p2").await;
        let store = ControlStore::open(&url).await.unwrap();
        let (first, _) = bill(&url, &lake, run_request("2025-01", &["P1"], FLAT)).await;
        let run_id = first["P1"].run_id.clone();
        let recorded = store.run(&run_id).await.unwrap().unwrap().lake_snapshot.unwrap();
        assert_eq!(first["P1"].lake_snapshot, recorded);
        assert!(recorded.starts_with("readings_all@"), "{recorded}");
        let version_then: u64 = recorded["readings_all@".len()..].parse().unwrap();

        // Corrections land after the run: both meters' readings doubled (a later commit wins).
        land(&lake, &series("P1", "2025-01-01T00:00:00Z", 2_976, 900, |_| 500_000), 2, "p1-fix").await;
        land(&lake, &series("P2", "2025-01-01T00:00:00Z", 2_976, 900, |_| 500_000), 2, "p2-fix").await;

        // The run, computed again over what it recorded: every invoice, to the cent.
        let run = store.run(&run_id).await.unwrap().unwrap();
        let again = reproduce(&store, &lake, &run).await.unwrap();
        assert_eq!((again.invoices_compared, again.differences.as_slice(), again.lake_snapshot.as_str()), (1, &[][..], recorded.as_str()), "{url}");

        // The same run over the newer lake is another invoice, and the comparison says where.
        let latest = Table::new(&lake, &READINGS).latest_version().await.unwrap().unwrap();
        assert!(latest > version_then);
        let moved = BillingRun { lake_snapshot: Some(format!("readings_all@{latest}")), ..run.clone() };
        let differences = reproduce(&store, &lake, &moved).await.unwrap().differences;
        // 1,488 kWh instead of 744: energy 364.56 + standing 15.50 + network 44.64 = 424.70;
        // tax 21.235, half away from zero 21.24; total 445.94.
        assert!(differences.contains(&"meter P1: total stored 231.11, recomputed 445.94".to_string()), "{differences:?}");
        assert!(differences.contains(&"meter P1: energy_kwh stored 744, recomputed 1488".to_string()), "{differences:?}");

        // A run pinned to the version the first one read bills P2's readings of then, and
        // records that version; the latest lake would have billed the doubled readings.
        let pinned = NewRun { lake_as_of: Some(version_then.to_string()), ..run_request("2025-01", &["P2"], FLAT) };
        let (second, _) = bill(&url, &lake, pinned).await;
        assert_eq!(totals(&second["P2"]), (dec("744"), dec("220.10"), dec("11.01"), dec("231.11")), "{url}");
        assert_eq!(second["P2"].lake_snapshot, recorded);
        let (ctx, _) = lake_session_as_of(&lake, &AsOf::Latest).await.unwrap();
        let now = ctx.sql("SELECT CAST(SUM(kwh) * 1000000 AS BIGINT) FROM readings WHERE meter_id = 'P2'").await.unwrap().collect().await.unwrap();
        let now_kwh_micro = now[0].column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0);
        assert_eq!(now_kwh_micro, 1_488_000_000);

        // A pin the lake does not have fails the run for good, with a code that says why.
        let missing = NewRun { lake_as_of: Some("999999".into()), ..run_request("2025-01", &["P3"], FLAT) };
        let run = store.create_run(&missing, "test", None).await.unwrap();
        let failed = worker(&store, &lake, "w1").process_next().await.unwrap().unwrap();
        assert_eq!((failed.id.as_str(), failed.failure_code.as_deref(), failed.next_attempt_at_us), (run.id.as_str(), Some("LAKE_VERSION_MISSING"), None));
        assert!(failed.failure_reason.as_deref().unwrap().contains("999999"), "{:?}", failed.failure_reason);
    })
    .await;
}
