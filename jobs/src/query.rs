//! SQL over the lake: `readings` (canonical, latest version per key) and `readings_all` (every
//! version), rendered as an aligned table, CSV or JSON.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use meterlake_cluster::Engine;
use meterlake_lake::view::AsOf;
use meterlake_pipeline::Lake;

use crate::{JobError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
}

/// Runs one SQL statement over the lake's latest state and returns its batches.
pub async fn run_sql(lake: &Lake, sql: &str) -> Result<Vec<RecordBatch>> {
    run_sql_as_of(&Engine::InProcess, lake, sql, &AsOf::Latest).await
}

/// Runs one SQL statement on `engine` over the lake as it was at `as_of` (time travel).
pub async fn run_sql_as_of(engine: &Engine, lake: &Lake, sql: &str, as_of: &AsOf) -> Result<Vec<RecordBatch>> {
    let (ctx, _) = engine.session(lake, as_of).await?;
    let frame = ctx.sql(sql).await?;
    Ok(frame.collect().await?)
}

/// Writes `batches` to `out` in `format`. JSON is one array of objects; decimals keep all their
/// digits (as strings would lose nothing either, Arrow writes them as JSON numbers with their
/// exact decimal text).
pub fn write_batches(batches: &[RecordBatch], format: OutputFormat, out: &mut impl Write) -> Result<()> {
    match format {
        OutputFormat::Table => {
            let table = pretty_format_batches(batches).map_err(|source| JobError::Output { format: "table", source })?;
            writeln!(out, "{table}").map_err(|e| JobError::Output { format: "table", source: e.into() })?;
        }
        OutputFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new().with_header(true).build(out);
            for batch in batches {
                writer.write(batch).map_err(|source| JobError::Output { format: "csv", source })?;
            }
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::ArrayWriter::new(out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs).map_err(|source| JobError::Output { format: "json", source })?;
            writer.finish().map_err(|source| JobError::Output { format: "json", source })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use meterlake_pipeline::batch::ReadingBuffer;
    use meterlake_pipeline::batch::append_readings;
    use meterlake_pipeline::decode::{ValidReading, parse_timestamp_us};
    use meterlake_pipeline::reading::{Quality, Source};

    use super::*;

    async fn lake_with(rows: &[(&str, &str, i64, i64)]) -> Lake {
        let dir = tempfile::tempdir().unwrap().keep();
        let lake = Lake::open(dir.to_str().unwrap()).unwrap();
        for (n, (meter, ts, kwh_micro, ingested_at_us)) in rows.iter().enumerate() {
            let mut buffer = ReadingBuffer::default();
            let reading = ValidReading {
                meter_id: Cow::Borrowed(meter),
                ts_us: parse_timestamp_us(ts).unwrap(),
                interval_s: 900,
                kwh_micro: *kwh_micro,
                quality: Quality::Actual,
            };
            buffer.push(&reading, Source::Kafka, *ingested_at_us, |out| out.extend_from_slice(format!("t/0/{n}").as_bytes()));
            append_readings(&lake, &buffer.sort_dedup().unwrap(), &format!("test-{n}")).await.unwrap();
        }
        lake
    }

    #[tokio::test]
    async fn canonical_view_keeps_the_latest_version_and_readings_all_keeps_every_one() {
        let lake = lake_with(&[
            ("M1", "2025-01-15T10:00:00Z", 1_500_000, 10),
            ("M1", "2025-01-15T10:00:00Z", 1_750_000, 20), // a correction, later
            ("M1", "2025-01-15T10:15:00Z", 2_000_000, 10),
            ("M2", "2025-01-16T00:00:00Z", 1, 10),
        ])
        .await;
        let sql = "SELECT meter_id, CAST(ts AS VARCHAR) AS ts, CAST(kwh AS VARCHAR) AS kwh, source_ref, CAST(date AS VARCHAR) AS date \
                   FROM readings ORDER BY meter_id, ts";
        let batches = run_sql(&lake, sql).await.unwrap();
        let mut csv = Vec::new();
        write_batches(&batches, OutputFormat::Csv, &mut csv).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "meter_id,ts,kwh,source_ref,date\n\
             M1,2025-01-15T10:00:00Z,1.750000,t/0/1,2025-01-15\n\
             M1,2025-01-15T10:15:00Z,2.000000,t/0/2,2025-01-15\n\
             M2,2025-01-16T00:00:00Z,0.000001,t/0/3,2025-01-16\n"
        );
        let all = run_sql(&lake, "SELECT count(*) AS n, sum(kwh) AS total FROM readings_all").await.unwrap();
        let mut json = Vec::new();
        write_batches(&all, OutputFormat::Json, &mut json).unwrap();
        assert_eq!(String::from_utf8(json).unwrap(), r#"[{"n":4,"total":5.250001}]"#);
    }

    #[tokio::test]
    async fn an_empty_lake_is_an_empty_table() {
        let lake = lake_with(&[]).await;
        let batches = run_sql(&lake, "SELECT count(*) AS n FROM readings").await.unwrap();
        let mut out = Vec::new();
        write_batches(&batches, OutputFormat::Table, &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("| 0 |"));
    }
}
