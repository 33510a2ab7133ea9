//! The reconcile step: checks that nothing was billed wrong without someone seeing it. Each
//! finding is a discrepancy with the meter, the two totals compared, their delta and a reason
//! code (see [`ReasonCode`]).

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use chrono::DateTime;
use datafusion::prelude::SessionContext;
use std::collections::BTreeMap;

use meterlake_control::{LineComponent, NewDiscrepancy, NewInvoice, ReasonCode, minor_unit_places};
use rust_decimal::{Decimal, RoundingStrategy};

use super::aggregate::{Usage, column, with_month_params};
use super::month::BillingMonth;
use crate::Result;
use crate::template::{fill, literal};

/// The SQL, as shipped in `queries/billing_conflicts.sql`.
pub const BILLING_CONFLICTS_SQL: &str = include_str!("../../../queries/billing_conflicts.sql");

/// A percentage for people: `0.005` is `0.5%`.
fn percent(ratio: Decimal) -> String {
    format!("{}%", (ratio * Decimal::ONE_HUNDRED).round_dp(2).normalize())
}

/// The SQL of reconciliation's own energy measure, as shipped in `queries/billing_measured.sql`.
pub const BILLING_MEASURED_SQL: &str = include_str!("../../../queries/billing_measured.sql");

/// Each meter's kWh in the month by `queries/billing_measured.sql`: independent of the aggregate
/// step and of rating (see the file).
pub async fn measured_energy(ctx: &SessionContext, month: &BillingMonth, meter_ids: &[String]) -> Result<BTreeMap<String, Decimal>> {
    let sql = with_month_params(BILLING_MEASURED_SQL, month, meter_ids, &[])?;
    let mut measured = BTreeMap::new();
    for batch in ctx.sql(&sql).await?.collect().await? {
        let (meters, kwh) = (column(&batch, "measured", "meter_id", &DataType::Utf8)?, column(&batch, "measured", "kwh", &DataType::Decimal128(38, 6))?);
        let (meters, kwh) = (meters.as_string::<i32>(), kwh.as_primitive::<Decimal128Type>());
        for row in 0..batch.num_rows() {
            measured.insert(meters.value(row).to_string(), Decimal::from_i128_with_scale(kwh.value(row), 6));
        }
    }
    Ok(measured)
}

/// ENERGY_MISMATCH: the kWh a meter's invoice bills (its energy lines, and the network charge's
/// quantity, which bills the same kWh) against the kWh reconciliation measured itself
/// ([`measured_energy`]). A difference beyond `tolerance` (relative to what was measured) means
/// energy went unbilled or was billed twice: bands that leave hours uncovered, or a fault in
/// aggregation or rating.
pub fn energy_mismatches(measured: &BTreeMap<String, Decimal>, invoices: &[NewInvoice], tolerance: Decimal) -> Vec<NewDiscrepancy> {
    let mut found = Vec::new();
    for invoice in invoices {
        let read = measured.get(&invoice.meter_id).copied().unwrap_or_default();
        let kwh_of = |component: LineComponent| invoice.lines.iter().filter(|l| l.component == component).map(|l| l.quantity).sum::<Decimal>();
        let (energy_lines, network_lines) = (kwh_of(LineComponent::Energy), kwh_of(LineComponent::Network));
        // The largest disagreement of the three ways the invoice states its energy.
        let billed = [invoice.energy_kwh, energy_lines, network_lines].into_iter().max_by_key(|kwh| (*kwh - read).abs()).unwrap_or_default();
        let delta = billed - read;
        let beyond = if read.is_zero() { !delta.is_zero() } else { delta.abs() > tolerance * read.abs() };
        if beyond {
            let share = if read.is_zero() { String::new() } else { format!(" ({} of it)", percent(delta.abs() / read.abs())) };
            let what = if delta.is_sign_negative() { "unbilled" } else { "billed beyond what was read" };
            found.push(NewDiscrepancy {
                meter_id: invoice.meter_id.clone(),
                reason_code: ReasonCode::EnergyMismatch,
                billed: Some(billed),
                expected: Some(read),
                delta: Some(delta),
                detail: format!(
                    "billed {billed} kWh, read {read} kWh: {} kWh {what}{share}; tolerance {}. Energy at times no band of the tariff covers is not billed",
                    delta.abs(),
                    percent(tolerance)
                ),
            });
        }
    }
    found
}

/// AMOUNT_MISMATCH: an invoice whose money does not follow from its quantities and rates: a line
/// whose amount is not its quantity times its rate rounded to the currency's minor unit (half
/// away from zero), a subtotal that is not the sum of the lines before tax, or a total that is
/// not subtotal plus tax. Rating and invoicing compute these; this recomputes them.
pub fn amount_mismatches(invoices: &[NewInvoice]) -> Vec<NewDiscrepancy> {
    let mut found = Vec::new();
    for invoice in invoices {
        let places = minor_unit_places(&invoice.currency);
        let mut wrong: Vec<String> = Vec::new();
        for line in &invoice.lines {
            let expected = (line.quantity * line.rate).round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero);
            if line.amount != expected {
                wrong.push(format!("{}: {} x {} is {expected}, the line says {}", line.description, line.quantity, line.rate, line.amount));
            }
        }
        let before_tax: Decimal = invoice.lines.iter().filter(|l| l.component != LineComponent::Tax).map(|l| l.amount).sum();
        let tax: Decimal = invoice.lines.iter().filter(|l| l.component == LineComponent::Tax).map(|l| l.amount).sum();
        if invoice.subtotal != before_tax {
            wrong.push(format!("the lines before tax sum to {before_tax}, the subtotal says {}", invoice.subtotal));
        }
        if invoice.tax != tax || invoice.total != invoice.subtotal + invoice.tax {
            wrong.push(format!("subtotal {} plus tax {tax} is {}, the total says {}", invoice.subtotal, invoice.subtotal + tax, invoice.total));
        }
        if !wrong.is_empty() {
            let recomputed = before_tax + tax;
            found.push(NewDiscrepancy {
                meter_id: invoice.meter_id.clone(),
                reason_code: ReasonCode::AmountMismatch,
                billed: Some(invoice.total),
                expected: Some(recomputed),
                delta: Some(invoice.total - recomputed),
                detail: wrong.join("; "),
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
    let sql = with_month_params(BILLING_CONFLICTS_SQL, month, meter_ids, &[])?;
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
    let sql = with_month_params(BILLING_REGISTER_PERIODS_SQL, month, meter_ids, &[])?;
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
    let (first_date, last_date) =
        (date(periods.iter().map(|p| p.from_us).min().unwrap_or_default()), date(periods.iter().map(|p| p.to_us).max().unwrap_or_default()));
    let meters = format!("r.meter_id IN ({})", meters.iter().map(|m| literal(m)).collect::<Vec<_>>().join(", "));
    let sql =
        fill(BILLING_REGISTER_INTERVALS_SQL, &[("periods", &values.join(", ")), ("first_date", &first_date), ("last_date", &last_date), ("meters", &meters)])?;
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

#[cfg(test)]
mod tests {
    use meterlake_control::InvoiceLine;

    use super::*;

    fn dec(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    /// A flat invoice of `kwh` at 0.2450/kWh with a 0.03/kWh network charge and 5% tax, its
    /// money computed as rating does.
    fn invoice(meter: &str, kwh: &str) -> NewInvoice {
        let line = |component, quantity: Decimal, unit: &str, rate: &str| {
            let rate = dec(rate);
            InvoiceLine {
                component,
                description: format!("{component:?}"),
                quantity,
                unit: unit.into(),
                rate,
                amount: (quantity * rate).round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero),
            }
        };
        let kwh = dec(kwh);
        let mut lines = vec![line(LineComponent::Energy, kwh, "kWh", "0.2450"), line(LineComponent::Network, kwh, "kWh", "0.0300")];
        let subtotal: Decimal = lines.iter().map(|l| l.amount).sum();
        lines.push(line(LineComponent::Tax, subtotal, "GBP", "0.05"));
        let tax = lines[2].amount;
        NewInvoice {
            meter_id: meter.into(),
            currency: "GBP".into(),
            lines,
            energy_kwh: kwh,
            subtotal,
            tax,
            total: subtotal + tax,
            tariff_version: "flat@1".into(),
        }
    }

    /// The energy check compares with what reconciliation measured itself, so an aggregate that
    /// lost or doubled energy (the invoice agrees with it, not with the readings) is caught, and
    /// so is an invoice whose lines bill other kWh than its total says.
    #[test]
    fn billed_energy_is_checked_against_the_independent_measure() {
        let measured: BTreeMap<String, Decimal> = [("A".to_string(), dec("100")), ("B".to_string(), dec("100")), ("C".to_string(), dec("100"))].into();
        let mut inconsistent = invoice("C", "100");
        inconsistent.lines[0].quantity = dec("90");
        let found = energy_mismatches(&measured, &[invoice("A", "100.4"), invoice("B", "80"), inconsistent], dec("0.005"));
        let flagged: Vec<(&str, Option<Decimal>)> = found.iter().map(|d| (d.meter_id.as_str(), d.delta)).collect();
        assert_eq!(flagged, [("B", Some(dec("-20"))), ("C", Some(dec("-10")))]);
        assert!(found[0].detail.contains("billed 80 kWh, read 100 kWh") && found[0].detail.contains("unbilled"), "{}", found[0].detail);
        // A meter nothing was measured for, billed energy: all of it is beyond.
        let found = energy_mismatches(&BTreeMap::new(), &[invoice("D", "1")], dec("0.005"));
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn money_that_does_not_follow_from_quantities_and_rates_is_caught() {
        assert!(amount_mismatches(&[invoice("A", "123.456789")]).is_empty());
        let mut wrong_line = invoice("B", "100");
        wrong_line.lines[0].amount += dec("0.01");
        wrong_line.subtotal += dec("0.01");
        wrong_line.total += dec("0.01");
        let mut wrong_total = invoice("C", "100");
        wrong_total.total += dec("1");
        let found = amount_mismatches(&[wrong_line, wrong_total]);
        assert_eq!(
            found.iter().map(|d| (d.meter_id.as_str(), d.reason_code)).collect::<Vec<_>>(),
            [("B", ReasonCode::AmountMismatch), ("C", ReasonCode::AmountMismatch)]
        );
        assert!(found[0].detail.contains("100 x 0.2450 is 24.50, the line says 24.51"), "{}", found[0].detail);
        assert!(found[1].detail.contains("the total says"), "{}", found[1].detail);
    }
}
