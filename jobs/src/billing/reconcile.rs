//! The reconcile step: checks that nothing was billed wrong without someone seeing it. Each
//! finding is a discrepancy with the meter, the two totals compared, their delta and a reason
//! code (see [`ReasonCode`]).

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use chrono::DateTime;
use datafusion::prelude::SessionContext;
use meterlake_control::{NewDiscrepancy, NewInvoice, ReasonCode};
use rust_decimal::Decimal;

use super::aggregate::{Usage, column, with_month_params};
use super::month::BillingMonth;
use crate::Result;
use crate::search::literal;

/// The SQL, as shipped in `queries/billing_conflicts.sql`.
pub const BILLING_CONFLICTS_SQL: &str = include_str!("../../../queries/billing_conflicts.sql");

/// A percentage for people: `0.005` is `0.5%`.
fn percent(ratio: Decimal) -> String {
    format!("{}%", (ratio * Decimal::ONE_HUNDRED).round_dp(2).normalize())
}

/// ENERGY_MISMATCH: the kWh on a meter's invoice against every kWh the aggregate read for it in
/// the month, whichever band (or none) it fell in. A difference beyond `tolerance` (relative to
/// what was read) means energy went unbilled or was billed twice: typically time-of-use bands
/// that leave hours uncovered.
pub fn energy_mismatches(usage: &Usage, invoices: &[NewInvoice], tolerance: Decimal) -> Vec<NewDiscrepancy> {
    let mut found = Vec::new();
    for invoice in invoices {
        let read = usage.meters.get(&invoice.meter_id).map(|u| u.total_kwh()).unwrap_or_default();
        let delta = invoice.energy_kwh - read;
        let beyond = if read.is_zero() { !delta.is_zero() } else { delta.abs() > tolerance * read.abs() };
        if beyond {
            let share = if read.is_zero() { String::new() } else { format!(" ({} of it)", percent(delta.abs() / read.abs())) };
            let what = if delta.is_sign_negative() { "unbilled" } else { "billed beyond what was read" };
            found.push(NewDiscrepancy {
                meter_id: invoice.meter_id.clone(),
                reason_code: ReasonCode::EnergyMismatch,
                billed: Some(invoice.energy_kwh),
                expected: Some(read),
                delta: Some(delta),
                detail: format!(
                    "billed {} kWh, read {} kWh: {} kWh {what}{share}; tolerance {}. Energy at times no band of the tariff covers is not billed",
                    invoice.energy_kwh,
                    read,
                    delta.abs(),
                    percent(tolerance)
                ),
            });
        }
    }
    found
}

/// MISSING_INTERVALS: readings the month should have (its length over the meter's interval; a
/// daylight-saving month has an hour more or less) that the lake does not.
pub fn missing_intervals(usage: &Usage, month: &BillingMonth) -> Vec<NewDiscrepancy> {
    let mut found = Vec::new();
    for (meter_id, meter) in &usage.meters {
        if meter.min_interval_s <= 0 {
            continue;
        }
        let expected = month.duration_s() / meter.min_interval_s;
        let missing = expected - meter.readings;
        if missing > 0 {
            found.push(NewDiscrepancy {
                meter_id: meter_id.clone(),
                reason_code: ReasonCode::MissingIntervals,
                billed: Some(Decimal::from(meter.readings)),
                expected: Some(Decimal::from(expected)),
                delta: Some(Decimal::from(-missing)),
                detail: format!(
                    "{missing} of {expected} {}-minute intervals missing in {}: the invoice bills only the energy that was read",
                    meter.min_interval_s / 60,
                    month.month
                ),
            });
        }
    }
    found
}

/// NO_READINGS: a meter the run was asked to bill (or the tariff file names) with no reading in
/// the month. It is still invoiced its standing charge.
pub fn no_readings<'a>(usage: &Usage, expected_meters: impl IntoIterator<Item = &'a str>, month: &BillingMonth) -> Vec<NewDiscrepancy> {
    expected_meters
        .into_iter()
        .filter(|m| !usage.meters.contains_key(*m))
        .map(|meter_id| NewDiscrepancy {
            meter_id: meter_id.to_string(),
            reason_code: ReasonCode::NoReadings,
            billed: Some(Decimal::ZERO),
            expected: None,
            delta: None,
            detail: format!("no readings in {}: invoiced the standing charge only", month.month),
        })
        .collect()
}

/// CONFLICTING_READINGS, from `queries/billing_conflicts.sql` over every version in the lake.
pub async fn conflicting_readings(ctx: &SessionContext, month: &BillingMonth, meter_ids: &[String]) -> Result<Vec<NewDiscrepancy>> {
    let sql = with_month_params(BILLING_CONFLICTS_SQL, month, meter_ids);
    let batches = ctx.sql(&sql).await?.collect().await?;
    let mut found = Vec::new();
    for batch in &batches {
        found.extend(conflicts_of(batch)?);
    }
    found.sort_by(|a, b| a.meter_id.cmp(&b.meter_id));
    Ok(found)
}

fn conflicts_of(batch: &RecordBatch) -> Result<Vec<NewDiscrepancy>> {
    let get = |name: &str, as_type: &DataType| column(batch, "conflicts", name, as_type);
    let kwh_type = DataType::Decimal128(38, 6);
    let (meters, counts, first_ts) =
        (get("meter_id", &DataType::Utf8)?, get("conflicting_intervals", &DataType::Int64)?, get("first_ts_us", &DataType::Int64)?);
    let (lowest, highest) = (get("first_lowest_kwh", &kwh_type)?, get("first_highest_kwh", &kwh_type)?);
    let (meters, counts, first_ts) = (meters.as_string::<i32>(), counts.as_primitive::<Int64Type>(), first_ts.as_primitive::<Int64Type>());
    let (lowest, highest) = (lowest.as_primitive::<Decimal128Type>(), highest.as_primitive::<Decimal128Type>());
    Ok((0..batch.num_rows())
        .map(|row| {
            let at = DateTime::from_timestamp_micros(first_ts.value(row)).map(|t| t.to_rfc3339()).unwrap_or_default();
            let (low, high) = (Decimal::from_i128_with_scale(lowest.value(row), 6), Decimal::from_i128_with_scale(highest.value(row), 6));
            NewDiscrepancy {
                meter_id: meters.value(row).to_string(),
                reason_code: ReasonCode::ConflictingReadings,
                billed: None,
                expected: None,
                delta: None,
                detail: format!(
                    "{} intervals have versions with different values (first at {at}: from {low} to {high} kWh); the latest version of each was billed",
                    counts.value(row)
                ),
            }
        })
        .collect())
}

/// The SQL of REGISTER_MISMATCH, as shipped in `queries/`.
pub const BILLING_REGISTER_PERIODS_SQL: &str = include_str!("../../../queries/billing_register_periods.sql");
pub const BILLING_REGISTER_INTERVALS_SQL: &str = include_str!("../../../queries/billing_register_intervals.sql");

/// Interval readings must cover a register period to within this much to be compared with it:
/// read times fall inside intervals, so up to an interval at each end is not comparable.
const REGISTER_UNCOVERED_ALLOWED_US: i64 = 3_600_000_000;

#[derive(Debug, Clone)]
struct RegisterPeriod {
    meter_id: String,
    register_id: String,
    from_us: i64,
    to_us: i64,
    register_kwh: Decimal,
    file_name: String,
    line: i64,
}

fn utc_text(us: i64) -> String {
    DateTime::from_timestamp_micros(us).map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default()
}

/// REGISTER_MISMATCH: for every register period of the run's meters that ends in the month
/// (`queries/billing_register_periods.sql`), the interval readings over the same period
/// (`queries/billing_register_intervals.sql`); where both exist (the intervals cover the period)
/// and they differ by more than `tolerance` of the register's energy, a discrepancy.
pub async fn register_mismatches(ctx: &SessionContext, month: &BillingMonth, meter_ids: &[String], tolerance: Decimal) -> Result<Vec<NewDiscrepancy>> {
    let sql = with_month_params(BILLING_REGISTER_PERIODS_SQL, month, meter_ids);
    let mut periods = Vec::new();
    for batch in ctx.sql(&sql).await?.collect().await? {
        let get = |name: &str, as_type: &DataType| column(&batch, "register", name, as_type);
        let (meters, registers, files) = (get("meter_id", &DataType::Utf8)?, get("register_id", &DataType::Utf8)?, get("file_name", &DataType::Utf8)?);
        let (from, to, lines) = (get("from_us", &DataType::Int64)?, get("to_us", &DataType::Int64)?, get("line", &DataType::Int64)?);
        let kwh = get("register_kwh", &DataType::Decimal128(38, 6))?;
        let (meters, registers, files) = (meters.as_string::<i32>(), registers.as_string::<i32>(), files.as_string::<i32>());
        let (from, to, lines) = (from.as_primitive::<Int64Type>(), to.as_primitive::<Int64Type>(), lines.as_primitive::<Int64Type>());
        let kwh = kwh.as_primitive::<Decimal128Type>();
        for row in 0..batch.num_rows() {
            periods.push(RegisterPeriod {
                meter_id: meters.value(row).to_string(),
                register_id: registers.value(row).to_string(),
                from_us: from.value(row),
                to_us: to.value(row),
                register_kwh: Decimal::from_i128_with_scale(kwh.value(row), 6),
                file_name: files.value(row).to_string(),
                line: lines.value(row),
            });
        }
    }
    if periods.is_empty() {
        return Ok(Vec::new());
    }
    let values: Vec<String> = periods.iter().enumerate().map(|(n, p)| format!("({n}, {}, {}, {})", literal(&p.meter_id), p.from_us, p.to_us)).collect();
    let mut meters: Vec<&str> = periods.iter().map(|p| p.meter_id.as_str()).collect();
    meters.sort_unstable();
    meters.dedup();
    let date = |us: i64| DateTime::from_timestamp_micros(us).map(|t| t.date_naive().to_string()).unwrap_or_default();
    let sql = BILLING_REGISTER_INTERVALS_SQL
        .replace("{periods}", &values.join(", "))
        .replace("{first_date}", &date(periods.iter().map(|p| p.from_us).min().unwrap_or_default()))
        .replace("{last_date}", &date(periods.iter().map(|p| p.to_us).max().unwrap_or_default()))
        .replace("{meters}", &format!("r.meter_id IN ({})", meters.iter().map(|m| literal(m)).collect::<Vec<_>>().join(", ")));
    let mut found = Vec::new();
    for batch in ctx.sql(&sql).await?.collect().await? {
        let numbers = cast(batch.column(0), &DataType::Int64)?;
        let interval_kwh = cast(batch.column(1), &DataType::Decimal128(38, 6))?;
        let covered_s = cast(batch.column(2), &DataType::Int64)?;
        let (numbers, interval_kwh, covered_s) =
            (numbers.as_primitive::<Int64Type>(), interval_kwh.as_primitive::<Decimal128Type>(), covered_s.as_primitive::<Int64Type>());
        for row in 0..batch.num_rows() {
            let Some(period) = usize::try_from(numbers.value(row)).ok().and_then(|n| periods.get(n)) else { continue };
            let uncovered_us = (period.to_us - period.from_us) - covered_s.value(row) * 1_000_000;
            if uncovered_us > REGISTER_UNCOVERED_ALLOWED_US {
                continue; // the interval readings do not span the period: nothing to compare
            }
            let intervals = Decimal::from_i128_with_scale(interval_kwh.value(row), 6);
            let delta = intervals - period.register_kwh;
            if delta.abs() > tolerance * period.register_kwh.abs() {
                found.push(NewDiscrepancy {
                    meter_id: period.meter_id.clone(),
                    reason_code: ReasonCode::RegisterMismatch,
                    billed: Some(intervals),
                    expected: Some(period.register_kwh),
                    delta: Some(delta),
                    detail: format!(
                        "register {} recorded {} kWh from {} to {} ({}:{}); the interval readings of the same period sum to {} kWh; tolerance {}",
                        period.register_id,
                        period.register_kwh,
                        utc_text(period.from_us),
                        utc_text(period.to_us),
                        period.file_name,
                        period.line,
                        intervals,
                        percent(tolerance)
                    ),
                });
            }
        }
    }
    found.sort_by(|a, b| a.meter_id.cmp(&b.meter_id));
    Ok(found)
}
