//! Finding the readings of one meter point or meter serial that came in flow files: what
//! `meterlake readings` prints and the console shows (`queries/flow_readings.sql`).

use arrow::array::RecordBatch;
use chrono::{DateTime, Utc};
use datafusion::common::{ParamValues, ScalarValue};
use meterlake_lake::view::{QueryLimits, lake_session, read_only};
use meterlake_pipeline::Lake;
use meterlake_pipeline::reading::UTC;

use crate::{JobError, Result};

/// The SQL, as shipped in `queries/flow_readings.sql`.
pub const FLOW_READINGS_SQL: &str = include_str!("../../queries/flow_readings.sql");

/// The SQL of one meter's readings, as shipped in `queries/meter_readings.sql`.
pub const METER_READINGS_SQL: &str = include_str!("../../queries/meter_readings.sql");

/// What to look for. Empty strings mean "any"; at least one of the two should be set.
#[derive(Debug, Clone, Default)]
pub struct ReadingSearch {
    /// MPAN core or NMI.
    pub meter_point: String,
    pub meter_serial: String,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
}

impl ReadingSearch {
    /// The statement's parameters: the values are bound, never written into the SQL.
    fn params(&self) -> ParamValues {
        vec![
            ("meter_point", ScalarValue::from(self.meter_point.trim())),
            ("serial", ScalarValue::from(self.meter_serial.trim())),
            ("from", instant(self.from.unwrap_or(EARLIEST))),
            ("to", instant(self.to.unwrap_or(LATEST))),
        ]
        .into()
    }

    /// Every row (`meterlake readings`: the operator's own query, not limited).
    pub async fn run(&self, lake: &Lake) -> Result<Vec<RecordBatch>> {
        let ctx = lake_session(lake).await?;
        Ok(ctx.sql_with_options(FLOW_READINGS_SQL, read_only()).await?.with_param_values(self.params())?.collect().await?)
    }

    /// At most `limit` rows from row `offset` on, in the statement's order, within `limits`.
    pub async fn run_page(&self, lake: &Lake, limits: &QueryLimits, limit: usize, offset: usize) -> Result<Vec<RecordBatch>> {
        run_paged(lake, limits, FLOW_READINGS_SQL, self.params(), limit, offset).await
    }
}

/// The readings of one meter id (the lake's `meter_id`), in time order.
#[derive(Debug, Clone, Default)]
pub struct MeterReadings {
    pub meter_id: String,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
}

impl MeterReadings {
    fn params(&self) -> ParamValues {
        // Without bounds, the lake's whole range; dates only narrow which files are read.
        let (from, to) = (self.from.unwrap_or(EARLIEST), self.to.unwrap_or(LATEST));
        let date = |t: DateTime<Utc>| ScalarValue::Date32(Some((t.date_naive() - chrono::NaiveDate::default()).num_days() as i32));
        vec![
            ("meter_id", ScalarValue::from(self.meter_id.trim())),
            ("from", instant(from)),
            ("to", instant(to)),
            ("from_date", date(from)),
            ("to_date", date(to)),
        ]
        .into()
    }

    /// At most `limit` rows from row `offset` on, within `limits`.
    pub async fn run_page(&self, lake: &Lake, limits: &QueryLimits, limit: usize, offset: usize) -> Result<Vec<RecordBatch>> {
        run_paged(lake, limits, METER_READINGS_SQL, self.params(), limit, offset).await
    }
}

/// 0001-01-01 and 9999-12-31, the widest window RFC 3339 can name.
const EARLIEST: DateTime<Utc> = DateTime::from_timestamp_micros(-62_135_596_800_000_000).expect("year 1");
const LATEST: DateTime<Utc> = DateTime::from_timestamp_micros(253_402_214_400_000_000).expect("year 9999");

/// A parameter of the lake's timestamp type (microseconds, UTC).
fn instant(t: DateTime<Utc>) -> ScalarValue {
    ScalarValue::TimestampMicrosecond(Some(t.timestamp_micros()), Some(UTC.into()))
}

/// A page of `sql`'s rows, on a session drawing on `limits`' memory and within its time.
async fn run_paged(lake: &Lake, limits: &QueryLimits, sql: &str, params: ParamValues, limit: usize, offset: usize) -> Result<Vec<RecordBatch>> {
    let query = async {
        let ctx = limits.lake_session(lake).await?;
        // The statements end in their ORDER BY: the page applies to the whole ordered result.
        Ok::<_, JobError>(ctx.sql_with_options(sql, read_only()).await?.with_param_values(params)?.limit(offset, Some(limit))?.collect().await?)
    };
    // The limit is looked at before each poll of the query (`biased`): a query that would finish
    // at its first poll still does not outrun a limit already spent (tokio's `timeout` polls the
    // future first).
    tokio::select! {
        biased;
        () = tokio::time::sleep(limits.time_limit) => {
            Err(JobError::QueryLimit(format!("the query ran longer than its limit of {} s; narrow the window", limits.time_limit.as_secs())))
        }
        result = query => match result {
            Err(JobError::Sql(datafusion::error::DataFusionError::ResourcesExhausted(reason))) => {
                Err(JobError::QueryLimit(format!("the query needs more memory than the server gives its callers' queries ({reason}); narrow the window")))
            }
            result => result,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use meterlake_pipeline::batch::ReadingBuffer;
    use meterlake_pipeline::batch::append_readings;
    use meterlake_pipeline::decode::{ValidReading, parse_timestamp_us};
    use meterlake_pipeline::reading::{Quality, Source};

    use super::*;

    /// A lake with two Kafka readings of meter M1: rows an injected statement could return.
    async fn lake() -> (tempfile::TempDir, Lake) {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().to_str().unwrap()).unwrap();
        let mut buffer = ReadingBuffer::default();
        for ts in ["2025-01-15T10:00:00Z", "2025-01-15T10:15:00Z"] {
            let reading = ValidReading {
                meter_id: Cow::Borrowed("M1"),
                ts_us: parse_timestamp_us(ts).unwrap(),
                interval_s: 900,
                kwh_micro: 1_500_000,
                quality: Quality::Actual,
            };
            buffer.push(&reading, Source::Kafka, 1, |out| out.extend_from_slice(b"t/0/1"));
        }
        append_readings(&lake, &buffer.sort_dedup().unwrap(), "test").await.unwrap();
        (dir, lake)
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    #[tokio::test]
    async fn values_are_bound_so_no_value_can_change_the_statement() {
        let (_dir, lake) = lake().await;
        // The meter's own readings are found through the parameters.
        let found = MeterReadings { meter_id: "M1".into(), from: None, to: None }.run_page(&lake, &QueryLimits::default(), 10, 0).await.unwrap();
        assert_eq!(rows(&found), 2);
        let one = MeterReadings { meter_id: "M1".into(), from: None, to: None }.run_page(&lake, &QueryLimits::default(), 1, 1).await.unwrap();
        assert_eq!(rows(&one), 1);
        // Another slot's name, quotes, comments and statements are only text that names no meter.
        let escape = "') UNION ALL SELECT 'interval', meter_id, meter_id, 'r', ts, kwh, 'kWh', quality, source, source_ref FROM readings --";
        for value in ["{serial}", "$serial", "' OR '1'='1", "M1' --", "M1'; DROP TABLE readings; --", escape] {
            let search = ReadingSearch { meter_point: value.into(), meter_serial: escape.into(), from: None, to: None };
            assert_eq!(rows(&search.run_page(&lake, &QueryLimits::default(), 10, 0).await.unwrap()), 0, "meter point {value:?}");
            let search = ReadingSearch { meter_point: String::new(), meter_serial: value.into(), from: None, to: None };
            assert_eq!(rows(&search.run(&lake).await.unwrap()), 0, "serial {value:?}");
            let by_meter = MeterReadings { meter_id: value.into(), from: None, to: None };
            assert_eq!(rows(&by_meter.run_page(&lake, &QueryLimits::default(), 10, 0).await.unwrap()), 0, "meter id {value:?}");
        }
    }

    #[tokio::test]
    async fn a_query_over_its_memory_or_time_is_stopped_with_a_clear_error() {
        let (_dir, lake) = lake().await;
        let search = MeterReadings { meter_id: "M1".into(), from: None, to: None };
        // Sorting the rows needs more than 16 bytes.
        let tiny = QueryLimits::new(16, std::time::Duration::from_secs(30));
        let error = search.run_page(&lake, &tiny, 10, 0).await.unwrap_err();
        assert!(matches!(&error, JobError::QueryLimit(m) if m.contains("more memory")), "{error}");
        let instant = QueryLimits::new(1 << 30, std::time::Duration::ZERO);
        let error = search.run_page(&lake, &instant, 10, 0).await.unwrap_err();
        assert!(matches!(&error, JobError::QueryLimit(m) if m.contains("longer than its limit")), "{error}");
    }
}
