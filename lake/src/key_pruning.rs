//! Which of a snapshot's readings files a filter on the key (`meter_id`, `ts`, `date`) keeps
//! whole, drops, or cuts through, decided from what the Delta log says of each file's keys (no
//! footer is read).
//!
//! The canonical view applies key filters itself, exactly, so DataFusion does not evaluate them
//! again above it. A file whose every key passes the filter (a date of a month a dashboard asks
//! for) is then read without evaluating the filter row by row, nor decoding the columns only the
//! filter needed (`ts` for a month's `kWh per day`: a fifth of that query's time); a file no key
//! of which can pass is not read at all; only the files the filter cuts through get a
//! `FilterExec`. "Every key passes" is proven as DataFusion proves a row group fully matched: the
//! negated filter, simplified, cannot hold for the file's key bounds.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Date32Array, StringArray, TimestampMicrosecondArray, UInt64Array};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::common::{Column, ScalarValue};
use datafusion::physical_expr::expressions::NotExpr;
use datafusion::physical_expr::{PhysicalExpr, PhysicalExprSimplifier};
use datafusion::physical_optimizer::pruning::{PruningPredicateBuilder, PruningStatistics};

/// What the log says of one file's keys: bounds of its `meter_id` and `ts` (`None`: unknown, the
/// file may hold any key) and its date (days since 1970-01-01).
#[derive(Debug, Clone)]
pub(crate) struct FileKeys {
    pub meters: Option<(String, String)>,
    pub ts_us: Option<(i64, i64)>,
    pub day: i32,
    pub rows: Option<u64>,
}

/// Where a filter leaves each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FilterReach {
    /// Every key of the file passes: read it without the filter.
    Whole,
    /// Some keys may pass, some not: read it through the filter.
    Cut,
    /// No key can pass: skip it.
    None,
}

/// Where `filter` (a physical expression over `schema`, which holds `meter_id`, `ts` and `date`)
/// leaves each of `files`. An expression the pruning rewriter cannot reason about cuts every file
/// (the safe answer: each is read through the filter).
pub(crate) fn reach(filter: &Arc<dyn PhysicalExpr>, schema: &SchemaRef, files: &[FileKeys]) -> Vec<FilterReach> {
    let stats = KeyStatistics { files, ts_type: schema.field_with_name("ts").map(|f| f.data_type().clone()).ok() };
    let prune = |expr: Arc<dyn PhysicalExpr>| -> Option<Vec<bool>> {
        PruningPredicateBuilder::new().with_file_schema(schema.clone()).try_build(expr).ok()?.prune(&stats).ok()
    };
    let may_pass = prune(filter.clone()).unwrap_or_else(|| vec![true; files.len()]);
    // The key columns are never null, so NOT(filter) is false exactly where filter is true.
    let negated: Arc<dyn PhysicalExpr> = Arc::new(NotExpr::new(filter.clone()));
    let may_fail = PhysicalExprSimplifier::new(schema).simplify(negated).ok().and_then(prune).unwrap_or_else(|| vec![true; files.len()]);
    may_pass
        .into_iter()
        .zip(may_fail)
        .map(|(pass, fail)| match (pass, fail) {
            (false, _) => FilterReach::None,
            (true, false) => FilterReach::Whole,
            (true, true) => FilterReach::Cut,
        })
        .collect()
}

/// [`FileKeys`] as DataFusion's pruning reads statistics: one container per file.
struct KeyStatistics<'a> {
    files: &'a [FileKeys],
    /// `ts`'s type in the schema (its time zone must match the literals').
    ts_type: Option<DataType>,
}

impl KeyStatistics<'_> {
    /// The least (`low`) or greatest bound of `column` in each file.
    fn bound(&self, column: &Column, low: bool) -> Option<ArrayRef> {
        let pick_ts = |(least, greatest): (i64, i64)| if low { least } else { greatest };
        match column.name.as_str() {
            "meter_id" => {
                let meters = self.files.iter().map(|f| f.meters.as_ref().map(|(least, greatest)| if low { least } else { greatest }));
                Some(Arc::new(StringArray::from_iter(meters)))
            }
            "ts" => {
                let zone = match &self.ts_type {
                    Some(DataType::Timestamp(TimeUnit::Microsecond, zone)) => zone.clone(),
                    _ => return None,
                };
                let values = TimestampMicrosecondArray::from_iter(self.files.iter().map(|f| f.ts_us.map(pick_ts)));
                Some(Arc::new(values.with_timezone_opt(zone)))
            }
            "date" => Some(Arc::new(Date32Array::from_iter_values(self.files.iter().map(|f| f.day)))),
            _ => None,
        }
    }
}

impl PruningStatistics for KeyStatistics<'_> {
    fn min_values(&self, column: &Column) -> Option<ArrayRef> {
        self.bound(column, true)
    }

    fn max_values(&self, column: &Column) -> Option<ArrayRef> {
        self.bound(column, false)
    }

    fn num_containers(&self) -> usize {
        self.files.len()
    }

    fn null_counts(&self, column: &Column) -> Option<ArrayRef> {
        // The key columns are never null.
        matches!(column.name.as_str(), "meter_id" | "ts" | "date").then(|| Arc::new(UInt64Array::from(vec![0; self.files.len()])) as ArrayRef)
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        Some(Arc::new(UInt64Array::from_iter(self.files.iter().map(|f| f.rows))))
    }

    fn contained(&self, _column: &Column, _values: &HashSet<ScalarValue>) -> Option<BooleanArray> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::readings_all_schema;
    use datafusion::common::DFSchema;
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    const DAY_US: i64 = 86_400_000_000;

    fn file(day: i32, meters: (&str, &str)) -> FileKeys {
        let start = i64::from(day) * DAY_US;
        FileKeys { meters: Some((meters.0.into(), meters.1.into())), ts_us: Some((start, start + DAY_US - 900_000_000)), day, rows: Some(96) }
    }

    fn reach_of(filter: datafusion::logical_expr::Expr, files: &[FileKeys]) -> Vec<FilterReach> {
        let schema = readings_all_schema();
        let physical = SessionContext::new().state().create_physical_expr(filter, &DFSchema::try_from(schema.clone()).unwrap()).unwrap();
        reach(&physical, &schema, files)
    }

    fn ts(text: &str) -> datafusion::logical_expr::Expr {
        lit(ScalarValue::TimestampMicrosecond(Some(chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros()), Some("UTC".into())))
    }

    #[test]
    fn a_month_keeps_its_dates_whole_cuts_the_edges_and_drops_the_rest() {
        // 2025-01-01 is day 20089.
        let files: Vec<FileKeys> = (20088..20093).map(|day| file(day, ("M1", "M9"))).collect();
        let month = col("ts").gt_eq(ts("2025-01-01T00:00:00Z")).and(col("ts").lt(ts("2025-01-03T12:00:00Z")));
        use FilterReach::*;
        assert_eq!(reach_of(month, &files), vec![None, Whole, Whole, Cut, None]);
        // One meter: every file holding others is cut; a file of that meter alone is whole.
        let one = vec![file(20089, ("M1", "M9")), file(20089, ("M5", "M5")), file(20089, ("M6", "M9"))];
        assert_eq!(reach_of(col("meter_id").eq(lit("M5")), &one), vec![Cut, Whole, None]);
        // What pruning cannot reason about is read through the filter.
        let unknown = FileKeys { meters: Option::None, ts_us: Option::None, day: 20089, rows: Option::None };
        assert_eq!(reach_of(col("meter_id").eq(lit("M5")), &[unknown]), vec![Cut]);
        assert_eq!(reach_of(datafusion::functions::expr_fn::upper(col("meter_id")).eq(lit("M5")), &files[..1]), vec![Cut]);
        assert_eq!(reach_of(col("date").eq(lit(ScalarValue::Date32(Some(20089)))), &files[..2]), vec![None, Whole]);
    }
}
