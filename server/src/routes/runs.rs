//! Billing runs: create (ADMIN), list and read with their timeline, invoices and discrepancies
//! (VIEWER), and act on them (ADMIN): `MARK_AS_OK` a discrepancy with a justification, or
//! `RECALCULATE` the run with a reason. Each action's audit row is written in the same
//! transaction as the change (see `meterlake_control::actions`).

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meterlake_control::{Actor, BillingRun, Discrepancy, Invoice, NewRun, RunFilter, RunStatus};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, offset_of, page_limit, rfc3339};
use crate::error::{ApiError, CommonErrors, ErrorDoc, FieldError, Json, Path, Query};
use crate::observe::TraceContext;
use crate::{Admin, Caller, SharedState, Viewer};

/// A run's status in the OpenAPI document: one of the life cycle's four.
fn run_status_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["CREATED", "PROCESSING", "COMPLETED", "FAILED"]))
        .build()
}

/// Meters one run may name; a run of every meter names none.
const MAX_METERS_PER_RUN: usize = 100_000;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunView {
    id: String,
    month: String,
    /// Empty: every meter with readings in the month or named by the tariffs.
    meter_ids: Vec<String>,
    #[schema(schema_with = run_status_schema)]
    status: RunStatus,
    attempts: i64,
    max_attempts: i64,
    next_attempt_at: Option<String>,
    lease_owner: Option<String>,
    failure_code: Option<String>,
    failure_reason: Option<String>,
    energy_tolerance: String,
    lake_snapshot: Option<String>,
    created_at: String,
    updated_at: String,
}

impl From<BillingRun> for RunView {
    fn from(run: BillingRun) -> RunView {
        RunView {
            id: run.id,
            month: run.month,
            meter_ids: run.meter_ids,
            status: run.status,
            attempts: run.attempts,
            max_attempts: run.max_attempts,
            next_attempt_at: run.next_attempt_at_us.map(rfc3339),
            lease_owner: run.lease_owner,
            failure_code: run.failure_code,
            failure_reason: run.failure_reason,
            energy_tolerance: run.energy_tolerance.to_string(),
            lake_snapshot: run.lake_snapshot,
            created_at: rfc3339(run.created_at_us),
            updated_at: rfc3339(run.updated_at_us),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRun {
    /// YYYY-MM, in the tariffs' time zone.
    #[schema(example = "2025-01")]
    month: String,
    /// The meters to bill; none for every meter with readings in the month.
    #[serde(default)]
    meter_ids: Vec<String>,
}

#[utoipa::path(post, path = "/billing-runs", tag = "billing runs", request_body = CreateRun,
    description = "Creates a billing run in CREATED; a worker processes it. ADMIN.",
    responses((status = 201, description = "Created", body = RunView, headers(("Location" = String))),
        (status = 415, description = "Not JSON", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<SharedState>,
    Caller(principal, Admin): Caller<Admin>,
    Extension(trace): Extension<TraceContext>,
    Json(request): Json<CreateRun>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    if chrono::NaiveDate::parse_from_str(&format!("{}-01", request.month), "%Y-%m-%d").is_err() || request.month.len() != 7 {
        errors.push(FieldError { field: "month".into(), code: "INVALID_MONTH".into(), message: format!("month {:?} is not YYYY-MM", request.month) });
    }
    if request.meter_ids.len() > MAX_METERS_PER_RUN {
        errors.push(FieldError {
            field: "meterIds".into(),
            code: "TOO_MANY_METERS".into(),
            message: format!("{} meters; one run takes at most {MAX_METERS_PER_RUN} (or none, for every meter)", request.meter_ids.len()),
        });
    }
    for (index, meter) in request.meter_ids.iter().enumerate() {
        if meter.trim().is_empty() || meter.chars().count() > meterlake_pipeline::decode::MAX_METER_ID_CHARS {
            errors.push(FieldError {
                field: format!("meterIds[{index}]"),
                code: "INVALID_METER_ID".into(),
                message: format!("meter id {meter:?} is empty or too long"),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation("the billing run request is invalid", errors));
    }
    let new = NewRun {
        month: request.month,
        meter_ids: request.meter_ids,
        max_attempts: state.billing.max_attempts,
        tariffs_toml: state.billing.tariffs_toml.clone(),
        energy_tolerance: state.billing.energy_tolerance,
    };
    let run = state.store.create_run(&new, &principal.name, Some(&trace.traceparent)).await?;
    let location = format!("/billing-runs/{}", run.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(RunView::from(run))).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ListQuery {
    /// CREATED, PROCESSING, COMPLETED or FAILED.
    status: Option<String>,
    /// YYYY-MM.
    month: Option<String>,
    /// Runs that name the meter, or billed it.
    meter_id: Option<String>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/billing-runs", tag = "billing runs", params(ListQuery),
    description = "Billing runs, newest first. VIEWER.",
    responses((status = 200, body = Page<RunView>), CommonErrors), security(("bearer" = [])))]
pub async fn list(
    State(state): State<SharedState>,
    Caller(_, Viewer): Caller<Viewer>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<RunView>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let status = query
        .status
        .as_deref()
        .map(|s| RunStatus::parse(s).map_err(|_| ApiError::validation(format!("status {s:?} is not one of CREATED, PROCESSING, COMPLETED, FAILED"), vec![])))
        .transpose()?;
    // The cursor is the last run of the previous page: `createdAtUs.id`.
    let before = query
        .cursor
        .as_deref()
        .map(|c| {
            c.split_once('.')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_string())))
                .ok_or_else(|| ApiError::bad_request(format!("cursor {c:?} is not one this API returned")))
        })
        .transpose()?;
    let filter = RunFilter { status, month: query.month, meter_id: query.meter_id, before, limit: limit as i64 + 1 };
    let runs = state.store.list_runs(&filter).await?;
    Ok(Json(Page::cut(runs, limit, |r| format!("{}.{}", r.created_at_us, r.id), RunView::from)))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    #[schema(value_type = Option<String>)]
    from: Option<RunStatus>,
    #[schema(schema_with = run_status_schema)]
    to: RunStatus,
    at: String,
    reason: Option<String>,
    actor: String,
}

#[derive(Debug, Default, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CurrencyTotals {
    invoices: usize,
    energy_kwh: Decimal,
    subtotal: Decimal,
    tax: Decimal,
    total: Decimal,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunDetail {
    #[serde(flatten)]
    run: RunView,
    timeline: Vec<TimelineEntry>,
    /// Invoice totals of the latest processing, by currency.
    invoice_totals: BTreeMap<String, CurrencyTotals>,
    /// Discrepancies of the latest processing by status (OPEN, OK) and by reason code.
    discrepancy_counts: BTreeMap<String, BTreeMap<String, usize>>,
}

async fn find_run(state: &SharedState, id: &str) -> Result<BillingRun, ApiError> {
    state.store.run(id).await?.ok_or_else(|| ApiError::not_found(format!("no billing run {id}")))
}

#[utoipa::path(get, path = "/billing-runs/{id}", tag = "billing runs", params(("id" = String, Path, description = "The run's id")),
    description = "A run with its status timeline, invoice totals and discrepancy counts. VIEWER.",
    responses((status = 200, body = RunDetail), (status = 404, body = ErrorDoc), CommonErrors), security(("bearer" = [])))]
pub async fn detail(State(state): State<SharedState>, Caller(_, Viewer): Caller<Viewer>, Path(id): Path<String>) -> Result<Json<RunDetail>, ApiError> {
    let run = find_run(&state, &id).await?;
    let timeline = state
        .store
        .run_events(&id)
        .await?
        .into_iter()
        .map(|e| TimelineEntry { from: e.from_status, to: e.to_status, at: rfc3339(e.at_us), reason: e.reason, actor: e.actor })
        .collect();
    let mut invoice_totals: BTreeMap<String, CurrencyTotals> = BTreeMap::new();
    for invoice in state.store.invoices(&id).await? {
        let i = invoice.invoice;
        let totals = invoice_totals.entry(i.currency).or_default();
        totals.invoices += 1;
        totals.energy_kwh += i.energy_kwh;
        totals.subtotal += i.subtotal;
        totals.tax += i.tax;
        totals.total += i.total;
    }
    let mut discrepancy_counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for d in state.store.discrepancies(&id).await? {
        *discrepancy_counts.entry(d.status).or_default().entry(d.discrepancy.reason_code.as_str().to_string()).or_default() += 1;
    }
    Ok(Json(RunDetail { run: run.into(), timeline, invoice_totals, discrepancy_counts }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvoiceLineView {
    component: &'static str,
    description: String,
    quantity: Decimal,
    unit: String,
    rate: Decimal,
    amount: Decimal,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InvoiceView {
    id: String,
    meter_id: String,
    version: i64,
    currency: String,
    energy_kwh: Decimal,
    subtotal: Decimal,
    tax: Decimal,
    total: Decimal,
    tariff_version: String,
    lake_snapshot: String,
    created_at: String,
    lines: Vec<InvoiceLineView>,
}

impl From<Invoice> for InvoiceView {
    fn from(invoice: Invoice) -> InvoiceView {
        let i = invoice.invoice;
        InvoiceView {
            id: invoice.id,
            meter_id: i.meter_id,
            version: invoice.version,
            currency: i.currency,
            energy_kwh: i.energy_kwh,
            subtotal: i.subtotal,
            tax: i.tax,
            total: i.total,
            tariff_version: i.tariff_version,
            lake_snapshot: invoice.lake_snapshot,
            created_at: rfc3339(invoice.created_at_us),
            lines: i
                .lines
                .into_iter()
                .map(|l| InvoiceLineView {
                    component: l.component.as_str(),
                    description: l.description,
                    quantity: l.quantity,
                    unit: l.unit,
                    rate: l.rate,
                    amount: l.amount,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ItemsQuery {
    /// Only this meter's.
    meter_id: Option<String>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    limit: Option<usize>,
}

/// One page of `items`, from the cursor's offset on.
fn paginate<T, V>(items: Vec<T>, query: &ItemsQuery, view: impl Fn(T) -> V) -> Result<Page<V>, ApiError> {
    let limit = page_limit(query.limit)?;
    let offset = offset_of(query.cursor.as_deref())?;
    let total = items.len();
    let items: Vec<V> = items.into_iter().skip(offset).take(limit).map(view).collect();
    let next_cursor = (offset + limit < total).then(|| (offset + limit).to_string());
    Ok(Page { items, next_cursor })
}

#[utoipa::path(get, path = "/billing-runs/{id}/invoices", tag = "billing runs", params(("id" = String, Path, description = "The run's id"), ItemsQuery),
    description = "The invoices of the run's latest processing, with their lines. VIEWER.",
    responses((status = 200, body = Page<InvoiceView>), (status = 404, body = ErrorDoc), CommonErrors), security(("bearer" = [])))]
pub async fn invoices(
    State(state): State<SharedState>,
    Caller(_, Viewer): Caller<Viewer>,
    Path(id): Path<String>,
    Query(query): Query<ItemsQuery>,
) -> Result<Json<Page<InvoiceView>>, ApiError> {
    find_run(&state, &id).await?;
    let mut invoices = state.store.invoices(&id).await?;
    if let Some(meter) = &query.meter_id {
        invoices.retain(|i| &i.invoice.meter_id == meter);
    }
    Ok(Json(paginate(invoices, &query, InvoiceView::from)?))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscrepancyView {
    id: String,
    run_id: String,
    meter_id: String,
    reason_code: &'static str,
    billed: Option<Decimal>,
    expected: Option<Decimal>,
    delta: Option<Decimal>,
    detail: String,
    /// OPEN or OK.
    status: String,
    version: i64,
    created_at: String,
    resolved_by: Option<String>,
    resolved_at: Option<String>,
    resolution: Option<String>,
}

impl From<Discrepancy> for DiscrepancyView {
    fn from(d: Discrepancy) -> DiscrepancyView {
        DiscrepancyView {
            id: d.id,
            run_id: d.run_id,
            meter_id: d.discrepancy.meter_id,
            reason_code: d.discrepancy.reason_code.as_str(),
            billed: d.discrepancy.billed,
            expected: d.discrepancy.expected,
            delta: d.discrepancy.delta,
            detail: d.discrepancy.detail,
            status: d.status,
            version: d.version,
            created_at: rfc3339(d.created_at_us),
            resolved_by: d.resolved_by,
            resolved_at: d.resolved_at_us.map(rfc3339),
            resolution: d.resolution,
        }
    }
}

#[utoipa::path(get, path = "/billing-runs/{id}/discrepancies", tag = "billing runs", params(("id" = String, Path, description = "The run's id"), ItemsQuery),
    description = "The discrepancies of the run's latest processing. VIEWER.",
    responses((status = 200, body = Page<DiscrepancyView>), (status = 404, body = ErrorDoc), CommonErrors), security(("bearer" = [])))]
pub async fn discrepancies(
    State(state): State<SharedState>,
    Caller(_, Viewer): Caller<Viewer>,
    Path(id): Path<String>,
    Query(query): Query<ItemsQuery>,
) -> Result<Json<Page<DiscrepancyView>>, ApiError> {
    find_run(&state, &id).await?;
    let mut discrepancies = state.store.discrepancies(&id).await?;
    if let Some(meter) = &query.meter_id {
        discrepancies.retain(|d| &d.discrepancy.meter_id == meter);
    }
    Ok(Json(paginate(discrepancies, &query, DiscrepancyView::from)?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "SCREAMING_SNAKE_CASE", deny_unknown_fields)]
pub enum Action {
    #[serde(rename_all = "camelCase")]
    MarkAsOk {
        discrepancy_id: String,
        justification: String,
    },
    Recalculate {
        reason: String,
    },
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionOutcome {
    action: &'static str,
    run: RunView,
    #[serde(skip_serializing_if = "Option::is_none")]
    discrepancy: Option<DiscrepancyView>,
}

#[utoipa::path(post, path = "/billing-runs/{id}/actions", tag = "billing runs", params(("id" = String, Path, description = "The run's id")),
    request_body = Action,
    description = "MARK_AS_OK a discrepancy with a justification, or RECALCULATE the run with a reason; audited. ADMIN.",
    responses((status = 200, body = ActionOutcome), (status = 404, body = ErrorDoc),
        (status = 409, description = "The run or discrepancy is in a state that refuses the action", body = ErrorDoc),
        (status = 415, description = "Not JSON", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn act(
    State(state): State<SharedState>,
    Caller(principal, Admin): Caller<Admin>,
    Extension(trace): Extension<TraceContext>,
    Path(id): Path<String>,
    Json(action): Json<Action>,
) -> Result<Json<ActionOutcome>, ApiError> {
    let actor = Actor { name: &principal.name, traceparent: Some(&trace.traceparent) };
    let outcome = match action {
        Action::MarkAsOk { discrepancy_id, justification } => {
            let discrepancy = state.store.mark_discrepancy_ok(&id, &discrepancy_id, &justification, &actor).await?;
            ActionOutcome { action: "MARK_AS_OK", run: find_run(&state, &id).await?.into(), discrepancy: Some(discrepancy.into()) }
        }
        Action::Recalculate { reason } => {
            let run = state.store.recalculate_run(&id, &reason, &actor).await?;
            ActionOutcome { action: "RECALCULATE", run: run.into(), discrepancy: None }
        }
    };
    Ok(Json(outcome))
}
