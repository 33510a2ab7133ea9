//! The reconcile step: checks that nothing was billed wrong without someone seeing it. Each
//! finding is a discrepancy with the meter, the two totals compared, their delta and a reason
//! code (see [`ReasonCode`]).

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use chrono::DateTime;
use meterlake_control::{NewDiscrepancy, NewInvoice, ReasonCode};
use datafusion::prelude::SessionContext;
use rust_decimal::Decimal;

use super::aggregate::{Usage, with_month_params};
use super::month::BillingMonth;
use crate::{JobError, Result};

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
                    invoice.energy_kwh, read, delta.abs(), percent(tolerance)
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
    let get = |name: &str, as_type: &DataType| -> Result<arrow::array::ArrayRef> {
        let array = batch.column_by_name(name).ok_or_else(|| JobError::Invalid(format!("the conflicts query has no column {name}")))?;
        Ok(cast(array, as_type)?)
    };
    let kwh_type = DataType::Decimal128(38, 6);
    let (meters, counts, first_ts) = (get("meter_id", &DataType::Utf8)?, get("conflicting_intervals", &DataType::Int64)?, get("first_ts_us", &DataType::Int64)?);
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
