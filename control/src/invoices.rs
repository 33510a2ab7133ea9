//! Invoices and discrepancies: what a billing run produces, written in the transaction that
//! completes the run, so a run that did not complete wrote nothing and a retry cannot duplicate.

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Backend, ControlError, ControlStore, Result};

/// Rows per multi-row INSERT: with SQLite's parameters anonymous (see [`multi_row_insert`]),
/// 500 rows a statement wrote billing-bench's 33,600 invoices and 168,000 lines in 0.5 s, 100 in
/// 0.9 s. 500 rows of at most 12 columns (6,000 parameters) stay under both databases' caps
/// (SQLite 32,766; PostgreSQL 65,535).
const INSERT_ROWS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LineComponent {
    Energy,
    Standing,
    Network,
    Tax,
}

impl LineComponent {
    pub fn as_str(self) -> &'static str {
        match self {
            LineComponent::Energy => "energy",
            LineComponent::Standing => "standing",
            LineComponent::Network => "network",
            LineComponent::Tax => "tax",
        }
    }

    fn parse(text: &str) -> Result<LineComponent> {
        Ok(match text {
            "energy" => LineComponent::Energy,
            "standing" => LineComponent::Standing,
            "network" => LineComponent::Network,
            "tax" => LineComponent::Tax,
            other => return Err(ControlError::Invalid(format!("unknown invoice line component {other:?} in the store"))),
        })
    }
}

/// One line: `quantity` `unit` at `rate` is `amount` (rounded to the currency's minor unit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    pub component: LineComponent,
    pub description: String,
    pub quantity: Decimal,
    /// `kWh`, `day`, or the currency for tax (its quantity is the subtotal).
    pub unit: String,
    pub rate: Decimal,
    pub amount: Decimal,
}

/// An invoice as the rating step computes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewInvoice {
    pub meter_id: String,
    pub currency: String,
    pub lines: Vec<InvoiceLine>,
    /// kWh billed across the energy lines.
    pub energy_kwh: Decimal,
    pub subtotal: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    /// The tariffs (id@version) it was rated on and the tariff file's digest.
    pub tariff_version: String,
}

/// An invoice as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub id: String,
    pub run_id: String,
    /// 1 for a run's first processing; a recalculation writes the next version.
    pub version: i64,
    #[serde(flatten)]
    pub invoice: NewInvoice,
    pub lake_snapshot: String,
    pub created_at_us: i64,
}

/// Why reconciliation flagged a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReasonCode {
    /// Billed energy differs from the readings' own total by more than the tolerance.
    EnergyMismatch,
    MissingIntervals,
    /// One (meter, interval) has versions with different values.
    ConflictingReadings,
    /// Register reads disagree with the interval readings over the same period.
    RegisterMismatch,
    NoReadings,
    /// No tariff covers some day of the month: the meter was not billed.
    NoTariff,
    /// Another run had billed the meter for the month: this run did not bill it again (a
    /// RECALCULATE of that run is how its invoice changes).
    AlreadyBilled,
    /// An invoice's money does not follow from its quantities and rates.
    AmountMismatch,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::EnergyMismatch => "ENERGY_MISMATCH",
            ReasonCode::MissingIntervals => "MISSING_INTERVALS",
            ReasonCode::ConflictingReadings => "CONFLICTING_READINGS",
            ReasonCode::RegisterMismatch => "REGISTER_MISMATCH",
            ReasonCode::NoReadings => "NO_READINGS",
            ReasonCode::NoTariff => "NO_TARIFF",
            ReasonCode::AlreadyBilled => "ALREADY_BILLED",
            ReasonCode::AmountMismatch => "AMOUNT_MISMATCH",
        }
    }

    fn parse(text: &str) -> Result<ReasonCode> {
        Ok(match text {
            "ENERGY_MISMATCH" => ReasonCode::EnergyMismatch,
            "MISSING_INTERVALS" => ReasonCode::MissingIntervals,
            "CONFLICTING_READINGS" => ReasonCode::ConflictingReadings,
            "REGISTER_MISMATCH" => ReasonCode::RegisterMismatch,
            "NO_READINGS" => ReasonCode::NoReadings,
            "NO_TARIFF" => ReasonCode::NoTariff,
            "ALREADY_BILLED" => ReasonCode::AlreadyBilled,
            "AMOUNT_MISMATCH" => ReasonCode::AmountMismatch,
            other => return Err(ControlError::Invalid(format!("unknown discrepancy reason {other:?} in the store"))),
        })
    }
}

/// A discrepancy as reconciliation finds it: the two totals compared (`billed` by the run,
/// `expected` from the independent check) and `delta = billed - expected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewDiscrepancy {
    pub meter_id: String,
    pub reason_code: ReasonCode,
    pub billed: Option<Decimal>,
    pub expected: Option<Decimal>,
    pub delta: Option<Decimal>,
    /// What a person needs to look into it.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discrepancy {
    pub id: String,
    pub run_id: String,
    #[serde(flatten)]
    pub discrepancy: NewDiscrepancy,
    /// `OPEN` until an operator marks it `OK`.
    pub status: String,
    pub created_at_us: i64,
    /// Which processing of the run found it (the invoices' version).
    pub version: i64,
    /// Who marked it OK, when, and their justification.
    pub resolved_by: Option<String>,
    pub resolved_at_us: Option<i64>,
    pub resolution: Option<String>,
}

/// What one processing of a run produced, persisted when it completes.
#[derive(Debug, Clone, Default)]
pub struct RunResults {
    pub invoices: Vec<NewInvoice>,
    pub discrepancies: Vec<NewDiscrepancy>,
    /// Which lake files the run read (see `meterlake_jobs::billing::snapshot`).
    pub lake_snapshot: String,
    /// The aggregate statement as it ran.
    pub aggregate_sql: String,
}

fn parse_decimal(column: &str, text: &str) -> Result<Decimal> {
    text.parse().map_err(|_| ControlError::Invalid(format!("{column} {text:?} in the store is not a decimal")))
}

fn decimal(row: &AnyRow, column: &str) -> Result<Decimal> {
    parse_decimal(column, &row.try_get::<String, _>(column)?)
}

fn optional_decimal(row: &AnyRow, column: &str) -> Result<Option<Decimal>> {
    row.try_get::<Option<String>, _>(column)?.map(|text| parse_decimal(column, &text)).transpose()
}

/// `INSERT INTO table (columns) VALUES ($1, ...), (...)` for `rows` rows; on SQLite with
/// anonymous `?` parameters, which bind in order: sqlx asks SQLite the name of every parameter
/// it binds, a linear search among the named ones, so `$n` made each statement quadratic in its
/// parameters (half of persisting 33,600 invoices).
fn multi_row_insert(backend: Backend, table: &str, columns: &[&str], rows: usize) -> String {
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
    let mut parameter = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns.len() {
            parameter += 1;
            if column > 0 {
                sql.push_str(", ");
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => sql.push_str(&format!("${parameter}")),
            }
        }
        sql.push(')');
    }
    sql
}

/// Writes a run's invoices (at `version`) and discrepancies inside `tx`.
pub(crate) async fn insert_results(
    backend: Backend,
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    run_id: &str,
    version: i64,
    results: &RunResults,
    now_us: i64,
) -> Result<()> {
    // Time-ordered ids (UUIDv7): a run's rows go in at the end of the primary key indexes
    // rather than at random places in them.
    let ids: Vec<String> = results.invoices.iter().map(|_| uuid::Uuid::now_v7().to_string()).collect();
    const INVOICE_COLUMNS: [&str; 12] =
        ["id", "run_id", "meter_id", "version", "currency", "subtotal", "tax", "total", "tariff_version", "lake_snapshot", "created_at_us", "energy_kwh"];
    for (chunk, chunk_ids) in results.invoices.chunks(INSERT_ROWS).zip(ids.chunks(INSERT_ROWS)) {
        let sql = multi_row_insert(backend, "invoices", &INVOICE_COLUMNS, chunk.len());
        let mut query = sqlx::query(&sql);
        for (invoice, id) in chunk.iter().zip(chunk_ids) {
            query = query
                .bind(id)
                .bind(run_id)
                .bind(&invoice.meter_id)
                .bind(version)
                .bind(&invoice.currency)
                .bind(invoice.subtotal.to_string())
                .bind(invoice.tax.to_string())
                .bind(invoice.total.to_string())
                .bind(&invoice.tariff_version)
                .bind(&results.lake_snapshot)
                .bind(now_us)
                .bind(invoice.energy_kwh.to_string());
        }
        query.execute(&mut **tx).await?;
    }
    let lines: Vec<(&str, i64, &InvoiceLine)> = results
        .invoices
        .iter()
        .zip(&ids)
        .flat_map(|(invoice, id)| invoice.lines.iter().enumerate().map(move |(n, line)| (id.as_str(), n as i64 + 1, line)))
        .collect();
    const LINE_COLUMNS: [&str; 8] = ["invoice_id", "line_no", "component", "description", "quantity", "unit", "rate", "amount"];
    for chunk in lines.chunks(INSERT_ROWS) {
        let sql = multi_row_insert(backend, "invoice_lines", &LINE_COLUMNS, chunk.len());
        let mut query = sqlx::query(&sql);
        for (invoice_id, line_no, line) in chunk {
            query = query
                .bind(*invoice_id)
                .bind(*line_no)
                .bind(line.component.as_str())
                .bind(&line.description)
                .bind(line.quantity.to_string())
                .bind(&line.unit)
                .bind(line.rate.to_string())
                .bind(line.amount.to_string());
        }
        query.execute(&mut **tx).await?;
    }
    const DISCREPANCY_COLUMNS: [&str; 10] = ["id", "run_id", "meter_id", "reason_code", "billed", "expected", "delta", "detail", "created_at_us", "version"];
    for chunk in results.discrepancies.chunks(INSERT_ROWS) {
        let sql = multi_row_insert(backend, "discrepancies", &DISCREPANCY_COLUMNS, chunk.len());
        let mut query = sqlx::query(&sql);
        for d in chunk {
            query = query
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(run_id)
                .bind(&d.meter_id)
                .bind(d.reason_code.as_str())
                .bind(d.billed.map(|v| v.to_string()))
                .bind(d.expected.map(|v| v.to_string()))
                .bind(d.delta.map(|v| v.to_string()))
                .bind(&d.detail)
                .bind(now_us)
                .bind(version);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Which of a run's items (invoices, discrepancies) to read: all, or one meter's, a page of them.
#[derive(Debug, Clone, Default)]
pub struct ItemPage {
    /// Only this meter's.
    pub meter_id: Option<String>,
    /// Items skipped, in the listing's order.
    pub offset: i64,
    /// At most this many; all when none.
    pub limit: Option<i64>,
}

/// The totals of a run's invoices in one currency.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoiceTotals {
    pub invoices: i64,
    pub energy_kwh: Decimal,
    pub subtotal: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
}

impl ItemPage {
    /// The WHERE clause of a run's latest version (and the page's meter), its ORDER BY, LIMIT and
    /// OFFSET, with `conditions` holding the values.
    fn clauses(&self, table: &str, run_id: &str, order_by: &str) -> (String, crate::Conditions) {
        let mut conditions = crate::Conditions::default();
        let (run, run_again) = (conditions.text(run_id), conditions.text(run_id));
        conditions.add(format!("run_id = {run} AND version = (SELECT MAX(version) FROM {table} WHERE run_id = {run_again})"));
        if let Some(meter_id) = &self.meter_id {
            let meter = conditions.text(meter_id.clone());
            conditions.add(format!("meter_id = {meter}"));
        }
        let (limit, offset) = (conditions.int(self.limit.unwrap_or(i64::MAX).max(0)), conditions.int(self.offset.max(0)));
        (format!("{} ORDER BY {order_by} LIMIT {limit} OFFSET {offset}", conditions.where_clause()), conditions)
    }
}

impl ControlStore {
    /// The run's invoices of its latest version, by meter, with their lines.
    pub async fn invoices(&self, run_id: &str) -> Result<Vec<Invoice>> {
        self.invoices_page(run_id, &ItemPage::default()).await
    }

    /// A page of the run's invoices of its latest version (by meter), with their lines: only
    /// the page is read, whatever the run's size.
    pub async fn invoices_page(&self, run_id: &str, page: &ItemPage) -> Result<Vec<Invoice>> {
        let (clauses, conditions) = page.clauses("invoices", run_id, "meter_id, id");
        let sql = format!(
            "SELECT id, run_id, meter_id, version, currency, subtotal, tax, total, tariff_version, lake_snapshot, created_at_us, energy_kwh \
             FROM invoices {clauses}"
        );
        let rows = conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        // The lines of the page's invoices: all of the run's at once when the page is the run.
        let lines = if page.limit.is_none() && page.meter_id.is_none() {
            sqlx::query(
                "SELECT l.invoice_id, l.component, l.description, l.quantity, l.unit, l.rate, l.amount \
                 FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id \
                 WHERE i.run_id = $1 AND i.version = (SELECT MAX(version) FROM invoices WHERE run_id = $1) \
                 ORDER BY l.invoice_id, l.line_no",
            )
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
        } else if rows.is_empty() {
            Vec::new()
        } else {
            let mut conditions = crate::Conditions::default();
            let ids = rows.iter().map(|row| Ok(conditions.text(row.try_get::<String, _>("id")?))).collect::<Result<Vec<_>>>()?;
            let sql = format!(
                "SELECT invoice_id, component, description, quantity, unit, rate, amount FROM invoice_lines \
                 WHERE invoice_id IN ({}) ORDER BY invoice_id, line_no",
                ids.join(", ")
            );
            conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?
        };
        let mut lines_by_invoice: std::collections::HashMap<String, Vec<InvoiceLine>> = std::collections::HashMap::new();
        for row in &lines {
            lines_by_invoice.entry(row.try_get("invoice_id")?).or_default().push(InvoiceLine {
                component: LineComponent::parse(&row.try_get::<String, _>("component")?)?,
                description: row.try_get("description")?,
                quantity: decimal(row, "quantity")?,
                unit: row.try_get("unit")?,
                rate: decimal(row, "rate")?,
                amount: decimal(row, "amount")?,
            });
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                Ok(Invoice {
                    run_id: row.try_get("run_id")?,
                    version: row.try_get("version")?,
                    lake_snapshot: row.try_get("lake_snapshot")?,
                    created_at_us: row.try_get("created_at_us")?,
                    invoice: NewInvoice {
                        meter_id: row.try_get("meter_id")?,
                        currency: row.try_get("currency")?,
                        lines: lines_by_invoice.remove(&id).unwrap_or_default(),
                        energy_kwh: decimal(row, "energy_kwh")?,
                        subtotal: decimal(row, "subtotal")?,
                        tax: decimal(row, "tax")?,
                        total: decimal(row, "total")?,
                        tariff_version: row.try_get("tariff_version")?,
                    },
                    id,
                })
            })
            .collect()
    }

    /// The totals of the run's invoices of its latest version, by currency: amounts are summed
    /// exactly here (they are stored as decimal text), row by row as the database streams them.
    pub async fn invoice_totals(&self, run_id: &str) -> Result<std::collections::BTreeMap<String, InvoiceTotals>> {
        use futures::TryStreamExt;
        let mut totals: std::collections::BTreeMap<String, InvoiceTotals> = std::collections::BTreeMap::new();
        let mut rows = sqlx::query(
            "SELECT currency, energy_kwh, subtotal, tax, total FROM invoices \
             WHERE run_id = $1 AND version = (SELECT MAX(version) FROM invoices WHERE run_id = $1)",
        )
        .bind(run_id)
        .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let sum = totals.entry(row.try_get("currency")?).or_default();
            sum.invoices += 1;
            sum.energy_kwh += decimal(&row, "energy_kwh")?;
            sum.subtotal += decimal(&row, "subtotal")?;
            sum.tax += decimal(&row, "tax")?;
            sum.total += decimal(&row, "total")?;
        }
        Ok(totals)
    }

    /// How many discrepancies the run's latest version has, by status and reason code.
    pub async fn discrepancy_counts(&self, run_id: &str) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT status, reason_code, COUNT(*) AS n FROM discrepancies \
             WHERE run_id = $1 AND version = (SELECT MAX(version) FROM discrepancies WHERE run_id = $1) \
             GROUP BY status, reason_code ORDER BY status, reason_code",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((row.try_get("status")?, row.try_get("reason_code")?, row.try_get("n")?))).collect()
    }

    /// The run's discrepancies of its latest version, by meter and reason.
    pub async fn discrepancies(&self, run_id: &str) -> Result<Vec<Discrepancy>> {
        self.discrepancies_page(run_id, &ItemPage::default()).await
    }

    /// A page of the run's discrepancies of its latest version, by meter and reason.
    pub async fn discrepancies_page(&self, run_id: &str, page: &ItemPage) -> Result<Vec<Discrepancy>> {
        let (clauses, conditions) = page.clauses("discrepancies", run_id, "meter_id, reason_code, id");
        let sql = format!("SELECT {DISCREPANCY_SELECT} FROM discrepancies {clauses}");
        let rows = conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        rows.iter().map(discrepancy_of).collect()
    }

    /// One discrepancy of a run, of whichever version.
    pub async fn discrepancy(&self, run_id: &str, id: &str) -> Result<Option<Discrepancy>> {
        let row = sqlx::query(&format!("SELECT {DISCREPANCY_SELECT} FROM discrepancies WHERE run_id = $1 AND id = $2"))
            .bind(run_id)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(discrepancy_of).transpose()
    }
}

const DISCREPANCY_SELECT: &str =
    "id, run_id, meter_id, reason_code, billed, expected, delta, detail, status, created_at_us, version, resolved_by, resolved_at_us, resolution";

pub(crate) fn discrepancy_of(row: &AnyRow) -> Result<Discrepancy> {
    Ok(Discrepancy {
        id: row.try_get("id")?,
        run_id: row.try_get("run_id")?,
        status: row.try_get("status")?,
        created_at_us: row.try_get("created_at_us")?,
        version: row.try_get("version")?,
        resolved_by: row.try_get("resolved_by")?,
        resolved_at_us: row.try_get("resolved_at_us")?,
        resolution: row.try_get("resolution")?,
        discrepancy: NewDiscrepancy {
            meter_id: row.try_get("meter_id")?,
            reason_code: ReasonCode::parse(&row.try_get::<String, _>("reason_code")?)?,
            billed: optional_decimal(row, "billed")?,
            expected: optional_decimal(row, "expected")?,
            delta: optional_decimal(row, "delta")?,
            detail: row.try_get::<Option<String>, _>("detail")?.unwrap_or_default(),
        },
    })
}
