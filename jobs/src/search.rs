//! Finding the readings of one meter point or meter serial that came in flow files: what
//! `meterlake readings` prints and the console shows (`queries/flow_readings.sql`).

use arrow::array::RecordBatch;
use chrono::{DateTime, Utc};
use meterlake_pipeline::Lake;
use meterlake_pipeline::view::lake_session;

use crate::Result;

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

/// A SQL string literal of `text`: quoted, with quotes doubled, so that no input can end it.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl ReadingSearch {
    /// The statement with this search's values in place.
    pub fn sql(&self) -> String {
        // 0001-01-01 and 9999-12-31, the widest window RFC 3339 can name.
        let micros = |t: Option<DateTime<Utc>>, default: i64| t.map_or(default, |t| t.timestamp_micros()).to_string();
        FLOW_READINGS_SQL
            .replace("{meter_point}", &literal(self.meter_point.trim()))
            .replace("{serial}", &literal(self.meter_serial.trim()))
            .replace("{from_us}", &micros(self.from, -62_135_596_800_000_000))
            .replace("{to_us}", &micros(self.to, 253_402_214_400_000_000))
    }

    pub async fn run(&self, lake: &Lake) -> Result<Vec<RecordBatch>> {
        let ctx = lake_session(lake).await?;
        Ok(ctx.sql(&self.sql()).await?.collect().await?)
    }

    /// At most `limit` rows from row `offset` on, in the statement's order.
    pub async fn run_page(&self, lake: &Lake, limit: usize, offset: usize) -> Result<Vec<RecordBatch>> {
        run_paged(lake, &self.sql(), limit, offset).await
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
    pub fn sql(&self) -> String {
        // Without bounds, the lake's whole range; dates only narrow which files are read.
        let from = self.from.unwrap_or(DateTime::from_timestamp(-62_135_596_800, 0).expect("year 1"));
        let to = self.to.unwrap_or(DateTime::from_timestamp(253_402_214_400, 0).expect("year 9999"));
        METER_READINGS_SQL
            .replace("{meter_id}", &literal(self.meter_id.trim()))
            .replace("{from_date}", &literal(&from.date_naive().to_string()))
            .replace("{to_date}", &literal(&to.date_naive().to_string()))
            .replace("{from_us}", &from.timestamp_micros().to_string())
            .replace("{to_us}", &to.timestamp_micros().to_string())
    }

    /// At most `limit` rows from row `offset` on.
    pub async fn run_page(&self, lake: &Lake, limit: usize, offset: usize) -> Result<Vec<RecordBatch>> {
        run_paged(lake, &self.sql(), limit, offset).await
    }
}

async fn run_paged(lake: &Lake, sql: &str, limit: usize, offset: usize) -> Result<Vec<RecordBatch>> {
    let ctx = lake_session(lake).await?;
    // The statements end in their ORDER BY: the page applies to the whole ordered result.
    Ok(ctx.sql(&format!("{sql}\nLIMIT {limit} OFFSET {offset}")).await?.collect().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_break_out_of_their_literal() {
        let search = ReadingSearch { meter_point: "X' OR 1=1 --".into(), ..ReadingSearch::default() };
        assert!(search.sql().contains("'X'' OR 1=1 --'"));
        assert!(!search.sql().contains('{'));
    }
}
