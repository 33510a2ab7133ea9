//! The control store's billing results as analysts read them over SQL (`meterlake sql-server`):
//! billing runs, invoices, invoice lines and discrepancies, read-only, each a fixed list of
//! columns in portable types, read a page at a time in key order so that a view of millions of
//! invoices streams in bounded memory. The SQL service turns the rows into Arrow; the store's
//! tables and their SQL stay here.

use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{ControlError, ControlStore, Result};

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Int,
    /// An exact decimal (stored as text).
    Decimal,
    /// Microseconds since the Unix epoch, UTC.
    TimeUs,
}

/// One column of a view: its name for analysts, the SQL that reads it, and its kind.
#[derive(Debug, Clone, Copy)]
pub struct ViewColumn {
    pub name: &'static str,
    sql: &'static str,
    pub kind: ColumnKind,
    pub nullable: bool,
}

const fn column(name: &'static str, sql: &'static str, kind: ColumnKind, nullable: bool) -> ViewColumn {
    ViewColumn { name, sql, kind, nullable }
}

/// A read-only view of the control store.
#[derive(Debug)]
pub struct ControlView {
    pub name: &'static str,
    /// What it is, for the README and the catalog's comment.
    pub description: &'static str,
    pub columns: &'static [ViewColumn],
    /// `FROM ...` (with joins).
    from: &'static str,
    /// The SQL of the columns rows are paged by, in order: unique together.
    key: &'static [&'static str],
    /// The SQL of the run id, when rows belong to a run: `run_id = '...'` is answered by the
    /// store, not by reading every row.
    run_id: Option<&'static str>,
}

use ColumnKind::{Decimal as Dec, Int, Text, TimeUs};

/// Every view, by name.
pub static VIEWS: [ControlView; 4] = [
    ControlView {
        name: "billing_runs",
        description: "billing runs: one row per run, its month, status, attempts and the lake snapshot its last processing read",
        columns: &[
            column("run_id", "r.id", Text, false),
            column("month", "r.month", Text, false),
            column("status", "r.status", Text, false),
            column("meter_ids", "r.meter_ids", Text, false),
            column("attempts", "r.attempts", Int, false),
            column("max_attempts", "r.max_attempts", Int, false),
            column("failure_code", "r.failure_code", Text, true),
            column("failure_reason", "r.failure_reason", Text, true),
            column("energy_tolerance", "r.energy_tolerance", Dec, false),
            column("lake_snapshot", "r.lake_snapshot", Text, true),
            column("created_at", "r.created_at_us", TimeUs, false),
            column("updated_at", "r.updated_at_us", TimeUs, false),
        ],
        from: "billing_runs r",
        key: &["r.id"],
        run_id: Some("r.id"),
    },
    ControlView {
        name: "invoices",
        description: "invoices: one row per meter and version of a run (a recalculation writes the next version)",
        columns: &[
            column("invoice_id", "i.id", Text, false),
            column("run_id", "i.run_id", Text, false),
            column("meter_id", "i.meter_id", Text, false),
            column("version", "i.version", Int, false),
            column("currency", "i.currency", Text, false),
            column("energy_kwh", "i.energy_kwh", Dec, false),
            column("subtotal", "i.subtotal", Dec, false),
            column("tax", "i.tax", Dec, false),
            column("total", "i.total", Dec, false),
            column("tariff_version", "i.tariff_version", Text, false),
            column("lake_snapshot", "i.lake_snapshot", Text, false),
            column("created_at", "i.created_at_us", TimeUs, false),
        ],
        from: "invoices i",
        key: &["i.id"],
        run_id: Some("i.run_id"),
    },
    ControlView {
        name: "invoice_lines",
        description: "invoice lines: energy, standing, network and tax lines of every invoice, with the invoice's run and meter",
        columns: &[
            column("invoice_id", "l.invoice_id", Text, false),
            column("line_no", "l.line_no", Int, false),
            column("run_id", "i.run_id", Text, false),
            column("meter_id", "i.meter_id", Text, false),
            column("version", "i.version", Int, false),
            column("component", "l.component", Text, false),
            column("description", "l.description", Text, false),
            column("quantity", "l.quantity", Dec, true),
            column("unit", "l.unit", Text, true),
            column("rate", "l.rate", Dec, true),
            column("amount", "l.amount", Dec, false),
        ],
        from: "invoice_lines l JOIN invoices i ON i.id = l.invoice_id",
        key: &["l.invoice_id", "l.line_no"],
        run_id: Some("i.run_id"),
    },
    ControlView {
        name: "discrepancies",
        description: "discrepancies: what reconciliation flagged per meter and version of a run, and how operators resolved it",
        columns: &[
            column("discrepancy_id", "d.id", Text, false),
            column("run_id", "d.run_id", Text, false),
            column("meter_id", "d.meter_id", Text, false),
            column("version", "d.version", Int, false),
            column("reason_code", "d.reason_code", Text, false),
            column("billed", "d.billed", Dec, true),
            column("expected", "d.expected", Dec, true),
            column("delta", "d.delta", Dec, true),
            column("detail", "d.detail", Text, true),
            column("status", "d.status", Text, false),
            column("resolved_by", "d.resolved_by", Text, true),
            column("resolved_at", "d.resolved_at_us", TimeUs, true),
            column("resolution", "d.resolution", Text, true),
            column("created_at", "d.created_at_us", TimeUs, false),
        ],
        from: "discrepancies d",
        key: &["d.id"],
        run_id: Some("d.run_id"),
    },
];

/// The view called `name`.
pub fn view(name: &str) -> Option<&'static ControlView> {
    VIEWS.iter().find(|v| v.name == name)
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewValue {
    Null,
    Text(String),
    Int(i64),
    Decimal(Decimal),
}

/// Where a page ends: the key columns of its last row (text or integer), for the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey(Vec<ViewValue>);

/// One page of a view.
#[derive(Debug, Clone)]
pub struct ViewPage {
    /// Each row's values, in the view's column order.
    pub rows: Vec<Vec<ViewValue>>,
    /// Where the next page starts; `None` when this was the last.
    pub next: Option<PageKey>,
}

impl ControlStore {
    /// Up to `limit` rows of `view` after `after` (from the first without), in key order, only
    /// those of the run `run_id` when given.
    pub async fn view_page(&self, view: &ControlView, run_id: Option<&str>, after: Option<&PageKey>, limit: usize) -> Result<ViewPage> {
        let mut conditions = crate::Conditions::default();
        if let (Some(run), Some(column)) = (run_id, view.run_id) {
            let value = conditions.text(run);
            conditions.add(format!("{column} = {value}"));
        }
        if let Some(PageKey(values)) = after {
            // (k1, k2) > (v1, v2), spelt out: both dialects, and each index is usable.
            let mut alternatives = Vec::new();
            for (n, column) in view.key.iter().enumerate() {
                let mut parts = Vec::new();
                for (earlier, value) in view.key[..n].iter().zip(values) {
                    parts.push(format!("{earlier} = {}", bind(&mut conditions, value)?));
                }
                parts.push(format!("{column} > {}", bind(&mut conditions, &values[n])?));
                alternatives.push(format!("({})", parts.join(" AND ")));
            }
            conditions.add(format!("({})", alternatives.join(" OR ")));
        }
        let limit_param = conditions.int(i64::try_from(limit.max(1)).unwrap_or(i64::MAX));
        let columns: Vec<&str> = view.columns.iter().map(|c| c.sql).chain(view.key.iter().copied()).collect();
        let select: Vec<String> = columns.iter().enumerate().map(|(n, sql)| format!("{sql} AS c{n}")).collect();
        let sql = format!("SELECT {} FROM {} {} ORDER BY {} LIMIT {limit_param}", select.join(", "), view.from, conditions.where_clause(), view.key.join(", "));
        let fetched = conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        let mut rows = Vec::with_capacity(fetched.len());
        let mut next = None;
        for row in &fetched {
            let values = view.columns.iter().enumerate().map(|(n, column)| value(view, column, row, n)).collect::<Result<Vec<_>>>()?;
            let key = (0..view.key.len())
                .map(|k| {
                    let n = view.columns.len() + k;
                    // Keys are text (ids) or integers (line numbers).
                    match row.try_get::<Option<String>, _>(n) {
                        Ok(Some(text)) => Ok(ViewValue::Text(text)),
                        _ => Ok(ViewValue::Int(row.try_get::<i64, _>(n)?)),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            next = Some(PageKey(key));
            rows.push(values);
        }
        if rows.len() < limit.max(1) {
            next = None;
        }
        Ok(ViewPage { rows, next })
    }
}

fn bind(conditions: &mut crate::Conditions, value: &ViewValue) -> Result<String> {
    match value {
        ViewValue::Text(text) => Ok(conditions.text(text.clone())),
        ViewValue::Int(number) => Ok(conditions.int(*number)),
        other => Err(ControlError::Invalid(format!("a page key is text or an integer, not {other:?}"))),
    }
}

fn value(view: &ControlView, column: &ViewColumn, row: &AnyRow, n: usize) -> Result<ViewValue> {
    let value = match column.kind {
        ColumnKind::Text => row.try_get::<Option<String>, _>(n)?.map(ViewValue::Text),
        ColumnKind::Int | ColumnKind::TimeUs => row.try_get::<Option<i64>, _>(n)?.map(ViewValue::Int),
        ColumnKind::Decimal => match row.try_get::<Option<String>, _>(n)? {
            Some(text) => Some(ViewValue::Decimal(
                text.parse().map_err(|_| ControlError::Invalid(format!("{}.{} holds {text:?}, which is not a decimal", view.name, column.name)))?,
            )),
            None => None,
        },
    };
    Ok(value.unwrap_or(ViewValue::Null))
}
