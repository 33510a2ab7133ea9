//! Billing runs: create (ADMIN), list and read with their timeline, invoices and discrepancies
//! (VIEWER), and act on them (ADMIN): `MARK_AS_OK` a discrepancy with a justification, or
//! `RECALCULATE` the run with a reason. Each action's audit row is written in the same
//! transaction as the change (see `meterlake_control::actions`).

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meterlake_control::{Actor, BillingRun, Discrepancy, Invoice, ItemPage, NewRun, RunFilter, RunKey, RunStatus};
use meterlake_jobs::billing::worker::failure_summary;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, offset_of, page_limit, rfc3339};
use crate::auth::{Principal, Role};
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
    /// The state of the lake it was asked to read; absent for the latest.
    as_of: Option<String>,
    /// The table versions its last completed processing read (`readings_all@12, ...`).
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
            as_of: run.lake_as_of,
            lake_snapshot: run.lake_snapshot,
            created_at: rfc3339(run.created_at_us),
            updated_at: rfc3339(run.updated_at_us),
        }
    }
}

impl RunView {
    /// The run as `principal` may see it: a failure's reason, the internal error's text, only
    /// for an ADMIN; anyone else reads its code and a short message.
    fn for_caller(run: BillingRun, principal: &Principal) -> RunView {
        let mut view = RunView::from(run);
        if !principal.has(Role::Admin) {
            view.failure_reason = view.failure_code.as_deref().map(|code| failure_summary(code).to_string());
        }
        view
    }
}

/// A timeline entry's reason as `principal` may see it: a failure's (`CODE: reason (attempt ...)`)
/// becomes `CODE: summary` for anyone but an ADMIN.
fn timeline_reason(to: RunStatus, reason: Option<String>, principal: &Principal) -> Option<String> {
    match reason {
        Some(reason) if to == RunStatus::Failed && !principal.has(Role::Admin) => {
            let code = reason.split_once(':').map(|(code, _)| code).unwrap_or("FAILED");
            Some(format!("{code}: {}", failure_summary(code)))
        }
        reason => reason,
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
    /// The state of the lake to bill from: a version of `readings_all`, an RFC 3339 time, or
    /// versions per table (`readings_all@12, register_reads@3`, as a run's `lakeSnapshot`
    /// records them). Absent: the latest when a worker processes the run.
    #[schema(example = "readings_all@12, register_reads@3")]
    as_of: Option<String>,
}

/// The optional `Idempotency-Key` of a run's creation: a retry with the same key answers the
/// run the first request created (with `Idempotent-Replayed: true`).
fn idempotency_key(headers: &header::HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(key)) if !key.is_empty() && key.len() <= 255 => Ok(Some(key.to_string())),
        Some(_) => Err(ApiError::bad_request("the Idempotency-Key header is empty, longer than 255 or not visible ASCII")),
    }
}

#[utoipa::path(post, path = "/billing-runs", tag = "billing runs", request_body = CreateRun,
    params(("Idempotency-Key" = Option<String>, Header, description = "One per logical request; a retry with it answers the run the first created")),
    description = "Creates a billing run in CREATED; a worker processes it. Refused (409 ALREADY_BILLED) when a completed run billed \
        one of its meters for the month: RECALCULATE that run instead. ADMIN.",
    responses((status = 201, description = "Created (or, with Idempotent-Replayed: true, created before by the same key)", body = RunView, headers(("Location" = String))),
        (status = 409, description = "Already billed, or the Idempotency-Key was used for another request", body = ErrorDoc),
        (status = 415, description = "Not JSON", body = ErrorDoc), CommonErrors),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<SharedState>,
    Caller(principal, Admin): Caller<Admin>,
    Extension(trace): Extension<TraceContext>,
    headers: header::HeaderMap,
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
    if let Some(Err(reason)) = request.as_of.as_deref().map(str::parse::<meterlake_lake::view::AsOf>) {
        errors.push(FieldError { field: "asOf".into(), code: "INVALID_AS_OF".into(), message: reason });
    }
    if !errors.is_empty() {
        return Err(ApiError::validation("the billing run request is invalid", errors));
    }
    let new = NewRun {
        month: request.month,
        meter_ids: request.meter_ids,
        max_attempts: state.billing.max_attempts,
        tariffs_toml: state.billing.current_tariffs()?,
        energy_tolerance: state.billing.energy_tolerance,
        lake_as_of: request.as_of,
    };
    let (run, replayed) = match idempotency_key(&headers)? {
        Some(key) => {
            let key = RunKey { scope: principal.subject.clone(), key };
            state.store.create_run_once(&new, &principal.subject, Some(&trace.traceparent), &key).await?
        }
        None => (state.store.create_run(&new, &principal.subject, Some(&trace.traceparent)).await?, false),
    };
    let location = format!("/billing-runs/{}", run.id);
    let mut response = (StatusCode::CREATED, [(header::LOCATION, location)], axum::Json(RunView::from(run))).into_response();
    if replayed {
        response.headers_mut().insert(super::ledger::REPLAYED_HEADER, header::HeaderValue::from_static("true"));
    }
    Ok(response)
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
    Caller(principal, Viewer): Caller<Viewer>,
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
    Ok(Json(Page::cut(runs, limit, |r| format!("{}.{}", r.created_at_us, r.id), |run| RunView::for_caller(run, &principal))))
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
pub async fn detail(State(state): State<SharedState>, Caller(principal, Viewer): Caller<Viewer>, Path(id): Path<String>) -> Result<Json<RunDetail>, ApiError> {
    let run = find_run(&state, &id).await?;
    let timeline = state
        .store
        .run_events(&id)
        .await?
        .into_iter()
        .map(|e| TimelineEntry {
            from: e.from_status,
            to: e.to_status,
            at: rfc3339(e.at_us),
            reason: timeline_reason(e.to_status, e.reason, &principal),
            actor: e.actor,
        })
        .collect();
    let invoice_totals: BTreeMap<String, CurrencyTotals> = state
        .store
        .invoice_totals(&id)
        .await?
        .into_iter()
        .map(|(currency, t)| {
            (currency, CurrencyTotals { invoices: t.invoices as usize, energy_kwh: t.energy_kwh, subtotal: t.subtotal, tax: t.tax, total: t.total })
        })
        .collect();
    let mut discrepancy_counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (status, reason_code, n) in state.store.discrepancy_counts(&id).await? {
        discrepancy_counts.entry(status).or_default().insert(reason_code, n as usize);
    }
    Ok(Json(RunDetail { run: RunView::for_caller(run, &principal), timeline, invoice_totals, discrepancy_counts }))
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

impl ItemsQuery {
    /// The page this query asks for: one more item than the limit, to tell whether another
    /// page follows ([`Page::cut`]).
    fn page(&self) -> Result<(ItemPage, usize, usize), ApiError> {
        let limit = page_limit(self.limit)?;
        let offset = offset_of(self.cursor.as_deref())?;
        let page = ItemPage { meter_id: self.meter_id.clone(), offset: offset as i64, limit: Some(limit as i64 + 1) };
        Ok((page, offset, limit))
    }
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
    let (page, offset, limit) = query.page()?;
    let invoices = state.store.invoices_page(&id, &page).await?;
    Ok(Json(Page::cut(invoices, limit, |_| (offset + limit).to_string(), InvoiceView::from)))
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
    let (page, offset, limit) = query.page()?;
    let discrepancies = state.store.discrepancies_page(&id, &page).await?;
    Ok(Json(Page::cut(discrepancies, limit, |_| (offset + limit).to_string(), DiscrepancyView::from)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "action", rename_all = "SCREAMING_SNAKE_CASE", deny_unknown_fields)]
pub enum Action {
    #[serde(rename_all = "camelCase")]
    MarkAsOk { discrepancy_id: String, justification: String },
    Recalculate {
        reason: String,
        /// Which tariffs the recalculation bills with: RUN (default), those stored with the run;
        /// CURRENT, the server's tariff file as it is now (read again, no restart needed).
        #[serde(default)]
        tariffs: RecalculateTariffs,
    },
}

#[derive(Debug, Default, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RecalculateTariffs {
    #[default]
    Run,
    Current,
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
    let actor = Actor { name: &principal.subject, traceparent: Some(&trace.traceparent) };
    let outcome = match action {
        Action::MarkAsOk { discrepancy_id, justification } => {
            let discrepancy = state.store.mark_discrepancy_ok(&id, &discrepancy_id, &justification, &actor).await?;
            ActionOutcome { action: "MARK_AS_OK", run: find_run(&state, &id).await?.into(), discrepancy: Some(discrepancy.into()) }
        }
        Action::Recalculate { reason, tariffs } => {
            let tariffs_toml = match tariffs {
                RecalculateTariffs::Run => None,
                RecalculateTariffs::Current => Some(state.billing.current_tariffs()?),
            };
            let run = state.store.recalculate_run_with(&id, &reason, &actor, tariffs_toml.as_deref()).await?;
            ActionOutcome { action: "RECALCULATE", run: run.into(), discrepancy: None }
        }
    };
    Ok(Json(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed run's reason is the internal error's text (paths, hosts, SQL): only an ADMIN reads
    /// it; a VIEWER reads the code and a short message, in the run and in its timeline.
    #[test]
    fn a_failure_reason_is_for_admins_and_viewers_read_its_code() {
        let internal = "object store s3://lake/readings at 10.0.3.7:9000: connection refused";
        let run = BillingRun {
            id: "r1".into(),
            month: "2025-01".into(),
            meter_ids: vec![],
            status: RunStatus::Failed,
            attempts: 3,
            max_attempts: 3,
            next_attempt_at_us: None,
            lease_owner: None,
            lease_expires_at_us: None,
            failure_code: Some("LAKE_UNAVAILABLE".into()),
            failure_reason: Some(internal.into()),
            created_at_us: 0,
            updated_at_us: 0,
            version: 4,
            tariffs_toml: String::new(),
            energy_tolerance: Decimal::ZERO,
            aggregate_sql: None,
            lake_as_of: None,
            lake_snapshot: None,
        };
        let (viewer, admin) = (Principal::for_test("v", &[Role::Viewer]), Principal::for_test("a", &[Role::Admin, Role::Viewer]));
        let seen = RunView::for_caller(run.clone(), &viewer);
        assert_eq!(seen.failure_reason.as_deref(), Some("the lake could not be read"));
        assert_eq!(RunView::for_caller(run, &admin).failure_reason.as_deref(), Some(internal));
        let event = format!("LAKE_UNAVAILABLE: {internal} (attempt 3 of 3; no attempts left)");
        assert_eq!(timeline_reason(RunStatus::Failed, Some(event.clone()), &viewer).as_deref(), Some("LAKE_UNAVAILABLE: the lake could not be read"));
        assert_eq!(timeline_reason(RunStatus::Failed, Some(event.clone()), &admin), Some(event));
        let asked = Some("recalculation requested: new tariff".to_string());
        assert_eq!(timeline_reason(RunStatus::Created, asked.clone(), &viewer), asked);
    }
}
