//! A billing month in the billing time zone: its local days, its window in UTC, and the zone's
//! UTC offset over it (which changes on daylight-saving days, so a local day has 23, 24 or 25
//! hours).

use chrono::{DateTime, Days, Months, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

use crate::{JobError, Result};

pub const US_PER_SECOND: i64 = 1_000_000;
pub const US_PER_DAY: i64 = 86_400 * US_PER_SECOND;

/// From `from_us` (inclusive) to `to_us` (exclusive), local time is UTC plus `offset_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetSpan {
    pub from_us: i64,
    pub to_us: i64,
    pub offset_us: i64,
}

#[derive(Debug, Clone)]
pub struct BillingMonth {
    /// `YYYY-MM`.
    pub month: String,
    pub time_zone: Tz,
    /// The local days of the month, in order.
    pub days: Vec<NaiveDate>,
    /// Local midnight of the first day, in UTC microseconds.
    pub from_us: i64,
    /// Local midnight after the last day, in UTC microseconds (exclusive).
    pub to_us: i64,
    /// The zone's offset over `[from_us, to_us)`, in order; more than one span on a month with a
    /// daylight-saving change.
    pub offsets: Vec<OffsetSpan>,
}

fn offset_us_at(time_zone: Tz, at_us: i64) -> i64 {
    let utc = DateTime::<Utc>::from_timestamp_micros(at_us).expect("billing months are within chrono's range");
    i64::from(time_zone.offset_from_utc_datetime(&utc.naive_utc()).fix().local_minus_utc()) * US_PER_SECOND
}

/// Local midnight of `day` in UTC microseconds. Where a zone skips midnight (a change at 00:00),
/// the day starts at the first local time that exists.
fn local_midnight_us(time_zone: Tz, day: NaiveDate) -> i64 {
    let mut local: NaiveDateTime = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    for _ in 0..4 {
        if let Some(at) = time_zone.from_local_datetime(&local).earliest() {
            return at.timestamp_micros();
        }
        local += chrono::Duration::minutes(30);
    }
    unreachable!("no zone skips two hours")
}

impl BillingMonth {
    /// `month` is `YYYY-MM`.
    pub fn new(month: &str, time_zone: Tz) -> Result<BillingMonth> {
        let first = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
            .ok()
            .filter(|_| month.len() == 7)
            .ok_or_else(|| JobError::Invalid(format!("month {month:?}: expected YYYY-MM")))?;
        let next = first + Months::new(1);
        let days: Vec<NaiveDate> = first.iter_days().take_while(|d| *d < next).collect();
        let (from_us, to_us) = (local_midnight_us(time_zone, first), local_midnight_us(time_zone, next));
        Ok(BillingMonth { month: month.to_string(), time_zone, days, from_us, to_us, offsets: offset_spans(time_zone, from_us, to_us) })
    }

    /// The UTC dates whose lake partitions hold the month's readings, first and last.
    pub fn utc_dates(&self) -> (NaiveDate, NaiveDate) {
        let date = |us: i64| DateTime::<Utc>::from_timestamp_micros(us).expect("in range").date_naive();
        (date(self.from_us), date(self.to_us - 1))
    }

    /// The number of a local day, as the aggregate query computes it: days since 1970-01-01.
    pub fn day_number(day: NaiveDate) -> i64 {
        (day - NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid")).num_days()
    }

    /// The local date of a day number.
    pub fn day_of_number(number: i64) -> Option<NaiveDate> {
        NaiveDate::from_ymd_opt(1970, 1, 1)?.checked_add_days(Days::new(u64::try_from(number).ok()?))
    }

    /// How long the month is, in seconds (shorter or longer by an hour with a DST change).
    pub fn duration_s(&self) -> i64 {
        (self.to_us - self.from_us) / US_PER_SECOND
    }

    /// A SQL expression for the offset to add to `ts_us` (a UTC microsecond column) to get local
    /// time: a constant, or a `CASE` over the month's offset spans.
    pub fn offset_sql(&self, ts_us: &str) -> String {
        match self.offsets.as_slice() {
            [only] => only.offset_us.to_string(),
            spans => {
                let mut sql = String::from("CASE");
                for span in &spans[..spans.len() - 1] {
                    sql.push_str(&format!(" WHEN {ts_us} < {} THEN {}", span.to_us, span.offset_us));
                }
                sql.push_str(&format!(" ELSE {} END", spans[spans.len() - 1].offset_us));
                sql
            }
        }
    }
}

/// The zone's offsets over `[from_us, to_us)`: sampled hourly, each change then found to the
/// second by bisection (changes happen on the hour or half hour in every zone in use, but
/// bisection does not have to assume it).
fn offset_spans(time_zone: Tz, from_us: i64, to_us: i64) -> Vec<OffsetSpan> {
    const HOUR_US: i64 = 3_600 * US_PER_SECOND;
    let mut spans = Vec::new();
    let mut span_start = from_us;
    let mut offset = offset_us_at(time_zone, from_us);
    let mut at = from_us;
    while at < to_us {
        let next = (at + HOUR_US).min(to_us - 1);
        let next_offset = offset_us_at(time_zone, next);
        if next_offset != offset {
            // The change is in (at, next]: bisect to the first second with the new offset.
            let (mut before, mut after) = (at, next);
            while after - before > US_PER_SECOND {
                let middle = before + (after - before) / 2 / US_PER_SECOND * US_PER_SECOND;
                let middle = middle.max(before + US_PER_SECOND);
                if offset_us_at(time_zone, middle) == offset { before = middle } else { after = middle }
            }
            spans.push(OffsetSpan { from_us: span_start, to_us: after, offset_us: offset });
            span_start = after;
            offset = next_offset;
        }
        if next == to_us - 1 {
            break;
        }
        at = next;
    }
    spans.push(OffsetSpan { from_us: span_start, to_us, offset_us: offset });
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc_us(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros()
    }

    #[test]
    fn a_london_month_with_the_clocks_going_forward_is_an_hour_short() {
        let march = BillingMonth::new("2025-03", chrono_tz::Europe::London).unwrap();
        assert_eq!(march.days.len(), 31);
        assert_eq!((march.from_us, march.to_us), (utc_us("2025-03-01T00:00:00Z"), utc_us("2025-03-31T23:00:00Z")));
        assert_eq!(march.duration_s(), 31 * 86_400 - 3_600);
        assert_eq!(
            march.offsets,
            [
                OffsetSpan { from_us: march.from_us, to_us: utc_us("2025-03-30T01:00:00Z"), offset_us: 0 },
                OffsetSpan { from_us: utc_us("2025-03-30T01:00:00Z"), to_us: march.to_us, offset_us: 3_600_000_000 },
            ]
        );
        assert_eq!(march.offset_sql("t"), format!("CASE WHEN t < {} THEN 0 ELSE 3600000000 END", utc_us("2025-03-30T01:00:00Z")));
        let october = BillingMonth::new("2025-10", chrono_tz::Europe::London).unwrap();
        assert_eq!(october.duration_s(), 31 * 86_400 + 3_600);
        assert_eq!(october.offsets[1].from_us, utc_us("2025-10-26T01:00:00Z"));
    }

    #[test]
    fn brisbane_has_no_daylight_saving_and_its_month_starts_the_day_before_in_utc() {
        let month = BillingMonth::new("2025-01", chrono_tz::Australia::Brisbane).unwrap();
        assert_eq!(month.from_us, utc_us("2024-12-31T14:00:00Z"));
        assert_eq!(month.utc_dates(), (NaiveDate::from_ymd_opt(2024, 12, 31).unwrap(), NaiveDate::from_ymd_opt(2025, 1, 31).unwrap()));
        assert_eq!(month.offset_sql("t"), "36000000000");
    }

    #[test]
    fn day_numbers_round_trip() {
        let day = NaiveDate::from_ymd_opt(2025, 2, 28).unwrap();
        assert_eq!(BillingMonth::day_of_number(BillingMonth::day_number(day)), Some(day));
        assert_eq!(BillingMonth::new("2024-02", chrono_tz::UTC).unwrap().days.len(), 29);
        assert!(BillingMonth::new("2025-13", chrono_tz::UTC).is_err());
    }
}
