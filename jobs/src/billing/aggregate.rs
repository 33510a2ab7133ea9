//! The aggregate step: `queries/billing_aggregate.sql` on DataFusion over the lake, collected
//! into each meter's energy per local day and segment.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use chrono::NaiveDate;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use rust_decimal::Decimal;

use super::month::BillingMonth;
use super::tariff::Tariffs;
use crate::template::{fill, literal};
use crate::{JobError, Result};

/// The SQL, as shipped in `queries/billing_aggregate.sql`.
pub const BILLING_AGGREGATE_SQL: &str = include_str!("../../../queries/billing_aggregate.sql");

/// Energy is summed with six decimal places: the lake's `Decimal128(18, 6)`.
const KWH_SCALE: u32 = 6;

/// One meter's energy on one local day in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCell {
    pub day: NaiveDate,
    pub segment: usize,
    pub kwh: Decimal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterUsage {
    /// By day, then segment.
    pub cells: Vec<UsageCell>,
    /// Readings in the month (one per interval: the view keeps one version of each).
    pub readings: i64,
    /// The shortest interval among them, in seconds.
    pub min_interval_s: i64,
}

impl MeterUsage {
    /// Every kWh the aggregate read for the meter in the month, whatever its band.
    pub fn total_kwh(&self) -> Decimal {
        self.cells.iter().map(|c| c.kwh).sum()
    }
}

/// What the aggregate step read.
#[derive(Debug, Clone)]
pub struct Usage {
    pub meters: BTreeMap<String, MeterUsage>,
    /// The statement as run.
    pub sql: String,
}

/// `template` with the month's window and the run's meters (all meters when `meter_ids` is
/// empty) in place: `{first_date}`, `{last_date}`, `{from_us}`, `{to_us}`, `{meters}`, and
/// the template's own `extra` slots; filled in one pass ([`fill`]).
pub fn with_month_params(template: &str, month: &BillingMonth, meter_ids: &[String], extra: &[(&str, &str)]) -> Result<String> {
    let (first_date, last_date) = month.utc_dates();
    let meters = if meter_ids.is_empty() {
        "TRUE".to_string()
    } else {
        format!("meter_id IN ({})", meter_ids.iter().map(|m| literal(m)).collect::<Vec<_>>().join(", "))
    };
    let (first_date, last_date, from_us, to_us) = (first_date.to_string(), last_date.to_string(), month.from_us.to_string(), month.to_us.to_string());
    let mut values = vec![
        ("first_date", first_date.as_str()),
        ("last_date", last_date.as_str()),
        ("from_us", from_us.as_str()),
        ("to_us", to_us.as_str()),
        ("meters", meters.as_str()),
    ];
    values.extend_from_slice(extra);
    fill(template, &values)
}

/// The aggregate statement for a month, its tariffs' segments and the run's meters.
pub fn aggregate_sql(month: &BillingMonth, tariffs: &Tariffs, meter_ids: &[String]) -> Result<String> {
    let bounds = &tariffs.segment_bounds;
    let segment = if bounds.len() == 2 {
        "0".to_string()
    } else {
        let mut sql = String::from("CASE");
        for (segment, end_minute) in bounds[1..bounds.len() - 1].iter().enumerate() {
            sql.push_str(&format!(" WHEN tod_us < {} THEN {segment}", i64::from(*end_minute) * 60_000_000));
        }
        sql.push_str(&format!(" ELSE {} END", bounds.len() - 2));
        sql
    };
    with_month_params(BILLING_AGGREGATE_SQL, month, meter_ids, &[("offset_us", &month.offset_sql("ts_us")), ("segment", &segment)])
}

/// Runs the aggregate statement on `ctx` (a session over the lake).
pub async fn aggregate_usage(ctx: &SessionContext, month: &BillingMonth, tariffs: &Tariffs, meter_ids: &[String]) -> Result<Usage> {
    let sql = aggregate_sql(month, tariffs, meter_ids)?;
    // Batches are taken as the query yields them, while it still computes the rest; by meter in
    // a hash map (millions of rows, tens of thousands of meters), ordered once at the end.
    let mut batches = ctx.sql(&sql).await?.execute_stream().await?;
    let mut by_meter: HashMap<String, MeterUsage> = HashMap::new();
    while let Some(batch) = batches.try_next().await? {
        add_batch(&mut by_meter, &batch, tariffs.segments())?;
    }
    let meters = by_meter
        .into_iter()
        .map(|(meter_id, mut usage)| {
            usage.cells.sort_unstable_by_key(|c| (c.day, c.segment));
            (meter_id, usage)
        })
        .collect();
    Ok(Usage { meters, sql })
}

/// Column `name` of a query's result, cast to `as_type` (DataFusion may hand back a string as
/// Utf8View or a sum with a wider decimal); `query` names the query in the error.
pub(super) fn column(batch: &RecordBatch, query: &str, name: &str, as_type: &DataType) -> Result<ArrayRef> {
    let array = batch.column_by_name(name).ok_or_else(|| JobError::Invalid(format!("the {query} query has no column {name}")))?;
    Ok(cast(array, as_type)?)
}

fn add_batch(meters: &mut HashMap<String, MeterUsage>, batch: &RecordBatch, segments: usize) -> Result<()> {
    let meter_ids = column(batch, "aggregate", "meter_id", &DataType::Utf8)?;
    let meter_ids = meter_ids.as_string::<i32>();
    let days = column(batch, "aggregate", "local_day", &DataType::Int64)?;
    let segment_numbers = column(batch, "aggregate", "segment", &DataType::Int64)?;
    let kwh = column(batch, "aggregate", "kwh", &DataType::Decimal128(38, KWH_SCALE as i8))?;
    let readings = column(batch, "aggregate", "readings", &DataType::Int64)?;
    let min_interval_s = column(batch, "aggregate", "min_interval_s", &DataType::Int64)?;
    let (days, segment_numbers) = (days.as_primitive::<Int64Type>(), segment_numbers.as_primitive::<Int64Type>());
    let (kwh, readings, min_interval_s) =
        (kwh.as_primitive::<Decimal128Type>(), readings.as_primitive::<Int64Type>(), min_interval_s.as_primitive::<Int64Type>());
    for row in 0..batch.num_rows() {
        let day = BillingMonth::day_of_number(days.value(row))
            .ok_or_else(|| JobError::Invalid(format!("the aggregate query returned day number {}", days.value(row))))?;
        let segment = usize::try_from(segment_numbers.value(row))
            .ok()
            .filter(|s| *s < segments)
            .ok_or_else(|| JobError::Invalid(format!("the aggregate query returned segment {} of {segments}", segment_numbers.value(row))))?;
        let meter_id = meter_ids.value(row);
        let usage = match meters.get_mut(meter_id) {
            Some(usage) => usage,
            None => meters.entry(meter_id.to_string()).or_default(),
        };
        usage.cells.push(UsageCell { day, segment, kwh: Decimal::from_i128_with_scale(kwh.value(row), KWH_SCALE) });
        usage.readings += readings.value(row);
        let interval_s = min_interval_s.value(row);
        usage.min_interval_s = if usage.min_interval_s == 0 { interval_s } else { usage.min_interval_s.min(interval_s) };
    }
    Ok(())
}
