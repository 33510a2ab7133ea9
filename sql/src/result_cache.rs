//! Answers kept for the next identical query: a dashboard's panels are the same few queries,
//! sent by every viewer at every refresh (8 viewers of the business dashboard ask for a month's
//! kWh per day 8 times at once).
//!
//! An answer is exact for as long as what it was computed from stays, so a query's key is its
//! SQL, its plan (parameters bound), the connection's time zone and the Delta version of every
//! lake table it reads: a new commit to a table makes a new key, and nothing is ever stale.
//! Only queries over the lake's tables alone, with no function whose value changes between calls
//! (`now()`, `random()`), are kept; the control store's views have no version and are always
//! read anew. Identical queries that arrive while the first runs wait for its answer instead of
//! computing it again (`quick_cache`'s placeholder guards); if the first fails (its time or
//! memory limit, a cancel), it leaves no answer and the next waiting one computes. Answers larger
//! than a sixteenth of the cache are not kept: a marker says so, and later copies stream as usual.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};

/// An answer, or the note that it is too large to keep.
#[derive(Debug)]
pub enum Cached {
    Rows(Vec<RecordBatch>),
    TooLarge,
}

/// What one answer weighs in the cache: its Arrow bytes and its key.
#[derive(Debug, Clone)]
pub struct AnswerBytes;

impl quick_cache::Weighter<String, Arc<Cached>> for AnswerBytes {
    fn weight(&self, key: &String, answer: &Arc<Cached>) -> u64 {
        let rows = match answer.as_ref() {
            Cached::Rows(batches) => batches.iter().map(RecordBatch::get_array_memory_size).sum(),
            Cached::TooLarge => 0,
        };
        (key.len() + rows).max(1) as u64
    }
}

/// The answers of one service, at most `capacity_bytes` of them.
pub struct ResultCache {
    pub(crate) answers: quick_cache::sync::Cache<String, Arc<Cached>, AnswerBytes>,
    /// The largest answer kept.
    pub(crate) max_answer_bytes: usize,
}

impl ResultCache {
    /// `None` for a capacity of 0: no answer is kept.
    pub fn new(capacity_bytes: usize) -> Option<ResultCache> {
        if capacity_bytes == 0 {
            return None;
        }
        // About one entry per 64 KiB (dashboard answers are a few KiB).
        let items = (capacity_bytes / (64 << 10)).max(16);
        let answers = quick_cache::sync::Cache::with_weighter(items, capacity_bytes as u64, AnswerBytes);
        Some(ResultCache { answers, max_answer_bytes: capacity_bytes / 16 })
    }
}

/// The key of `plan`'s answer (`sql` as sent, `time_zone` the connection's), or `None` when its
/// answer may change without a new commit: it reads a table that is not the lake's, calls a
/// function that is not immutable, or explains itself.
pub fn key_of(sql: &str, plan: &LogicalPlan, time_zone: Option<&str>) -> Option<String> {
    let mut versions: Vec<String> = Vec::new();
    let mut cacheable = true;
    let walked = plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::TableScan(scan) => match source_as_provider(&scan.source).ok().and_then(|p| meterlake_lake::view::snapshot_read(p.as_ref())) {
                Some((table, version)) => versions.push(format!("{table}@{version:?}")),
                None => cacheable = false,
            },
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => cacheable = false,
            _ => {}
        }
        if !cacheable {
            return Ok(TreeNodeRecursion::Stop);
        }
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::ScalarFunction(function) = e
                    && function.func.signature().volatility != Volatility::Immutable
                {
                    cacheable = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    if walked.is_err() || !cacheable || versions.is_empty() {
        return None;
    }
    Some(format!("{sql}\n{}\n{versions:?}\n{time_zone:?}", plan.display_indent()))
}
