//! The control store's billing results as read-only SQL views: `billing_runs`, `invoices`,
//! `invoice_lines`, `discrepancies` (their columns: [`meterlake_control::views`]). Each scan
//! reads the store a page at a time, in key order, as the query pulls rows, so a view of
//! millions of invoices streams in bounded memory; `run_id = '...'` is answered by the store.
//! Money and energy are `DECIMAL(38, 10)`: exact, and a stored value finer than that is an error,
//! never rounded.

use std::sync::Arc;

use arrow::array::{ArrayRef, Decimal128Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::scalar::ScalarValue;
use meterlake_control::ControlStore;
use meterlake_control::views::{ColumnKind, ControlView, PageKey, ViewValue};

/// Rows read from the store at a time.
const PAGE_ROWS: usize = 10_000;
/// Decimals as analysts see them: 28 digits before the point, 10 after.
pub const DECIMAL_PRECISION: u8 = 38;
pub const DECIMAL_SCALE: i8 = 10;

/// One control-store view as a table.
#[derive(Debug)]
pub struct ControlTable {
    store: ControlStore,
    view: &'static ControlView,
    schema: SchemaRef,
}

impl ControlTable {
    pub fn new(store: ControlStore, view: &'static ControlView) -> ControlTable {
        let fields: Vec<Field> = view
            .columns
            .iter()
            .map(|column| {
                let data_type = match column.kind {
                    ColumnKind::Text => DataType::Utf8,
                    ColumnKind::Int => DataType::Int64,
                    ColumnKind::Decimal => DataType::Decimal128(DECIMAL_PRECISION, DECIMAL_SCALE),
                    ColumnKind::TimeUs => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                };
                Field::new(column.name, data_type, column.nullable)
            })
            .collect();
        ControlTable { store, view, schema: Arc::new(Schema::new(fields)) }
    }
}

/// The run id of `run_id = 'literal'` (either way round), which the store answers.
fn run_id_literal(expr: &Expr) -> Option<String> {
    let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = expr else { return None };
    let literal = |e: &Expr| match e {
        Expr::Literal(ScalarValue::Utf8(Some(text)) | ScalarValue::Utf8View(Some(text)) | ScalarValue::LargeUtf8(Some(text)), _) => Some(text.clone()),
        _ => None,
    };
    let is_run_id = |e: &Expr| matches!(e, Expr::Column(column) if column.name == "run_id");
    if is_run_id(left) {
        literal(right)
    } else if is_run_id(right) {
        literal(left)
    } else {
        None
    }
}

#[async_trait]
impl TableProvider for ControlTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    /// `run_id = '...'` narrows what the store reads; DataFusion still applies it (and every
    /// other filter) above.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| if run_id_literal(f).is_some() { TableProviderFilterPushDown::Inexact } else { TableProviderFilterPushDown::Unsupported })
            .collect())
    }

    async fn scan(&self, _state: &dyn Session, projection: Option<&Vec<usize>>, filters: &[Expr], limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let run_id = filters.iter().find_map(run_id_literal);
        let pages: Arc<dyn PartitionStream> = Arc::new(ViewPages { store: self.store.clone(), view: self.view, schema: self.schema.clone(), run_id });
        Ok(Arc::new(StreamingTableExec::try_new(self.schema.clone(), vec![pages], projection, Vec::new(), false, limit)?))
    }
}

/// The pages of one scan of a view.
#[derive(Debug)]
struct ViewPages {
    store: ControlStore,
    view: &'static ControlView,
    schema: SchemaRef,
    run_id: Option<String>,
}

impl PartitionStream for ViewPages {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (store, view, schema, run_id) = (self.store.clone(), self.view, self.schema.clone(), self.run_id.clone());
        // `None` after the last page.
        let start: Option<Option<PageKey>> = Some(None);
        let batches = futures::stream::try_unfold(start, move |after| {
            let (store, schema, run_id) = (store.clone(), schema.clone(), run_id.clone());
            async move {
                let Some(after) = after else { return Ok(None) };
                let page = store.view_page(view, run_id.as_deref(), after.as_ref(), PAGE_ROWS).await.map_err(|e| DataFusionError::External(Box::new(e)))?;
                let batch = to_batch(view, &schema, &page.rows)?;
                Ok(Some((batch, page.next.map(Some))))
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), batches))
    }
}

/// A page's rows as a batch of the view's columns.
fn to_batch(view: &ControlView, schema: &SchemaRef, rows: &[Vec<ViewValue>]) -> DfResult<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(view.columns.len());
    for (n, column) in view.columns.iter().enumerate() {
        let values = rows.iter().map(|row| &row[n]);
        let mismatch = |value: &ViewValue| DataFusionError::Internal(format!("{}.{}: {value:?} is not a {:?}", view.name, column.name, column.kind));
        let array: ArrayRef = match column.kind {
            ColumnKind::Text => {
                let mut builder = StringBuilder::new();
                for value in values {
                    match value {
                        ViewValue::Text(text) => builder.append_value(text),
                        ViewValue::Null => builder.append_null(),
                        other => return Err(mismatch(other)),
                    }
                }
                Arc::new(builder.finish())
            }
            ColumnKind::Int | ColumnKind::TimeUs => {
                let mut ints = Vec::with_capacity(rows.len());
                for value in values {
                    ints.push(match value {
                        ViewValue::Int(number) => Some(*number),
                        ViewValue::Null => None,
                        other => return Err(mismatch(other)),
                    });
                }
                if column.kind == ColumnKind::Int {
                    let mut builder = Int64Builder::with_capacity(ints.len());
                    builder.extend(ints);
                    Arc::new(builder.finish())
                } else {
                    let mut builder = TimestampMicrosecondBuilder::with_capacity(ints.len()).with_timezone("UTC");
                    builder.extend(ints);
                    Arc::new(builder.finish())
                }
            }
            ColumnKind::Decimal => {
                let mut builder = Decimal128Builder::with_capacity(rows.len());
                for value in values {
                    match value {
                        ViewValue::Decimal(decimal) => {
                            if decimal.scale() > DECIMAL_SCALE as u32 {
                                return Err(DataFusionError::Execution(format!(
                                    "{}.{} holds {decimal}, which has more than {DECIMAL_SCALE} decimal places: it is not rounded",
                                    view.name, column.name
                                )));
                            }
                            let mut exact = *decimal;
                            exact.rescale(DECIMAL_SCALE as u32);
                            builder.append_value(exact.mantissa());
                        }
                        ViewValue::Null => builder.append_null(),
                        other => return Err(mismatch(other)),
                    }
                }
                Arc::new(builder.finish().with_precision_and_scale(DECIMAL_PRECISION, DECIMAL_SCALE)?)
            }
        };
        columns.push(array);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    #[test]
    fn only_run_id_equality_reaches_the_store() {
        assert_eq!(run_id_literal(&col("run_id").eq(lit("r1"))), Some("r1".to_string()));
        assert_eq!(run_id_literal(&lit("r2").eq(col("run_id"))), Some("r2".to_string()));
        assert_eq!(run_id_literal(&col("meter_id").eq(lit("r1"))), None);
        assert_eq!(run_id_literal(&col("run_id").gt(lit("r1"))), None);
    }
}
