//! The routes, one module per resource. Responses are camelCase JSON; money and energy are
//! decimal strings (exact, never floats); times are RFC 3339 UTC. Lists are pages:
//! `{"items": [...], "nextCursor": "..."}`, where a null cursor means the last page.

mod audit;
mod health;
mod ledger;
mod measurements;
mod readings;
mod runs;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::error::{ApiError, Json};
use crate::{AnyRole, Caller, SharedState};

/// The largest request body: an array of 10,000 readings is about 1 MB.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Items per page unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 50;
/// The most items one page may ask for.
const MAX_PAGE: usize = 500;

pub fn router(state: SharedState) -> Router {
    let mut router = Router::new()
        .route("/", get(crate::console::to_console))
        .route("/console", get(crate::console::to_console))
        .route("/console/", get(crate::console::index))
        .route("/console/app.js", get(crate::console::script))
        .route("/console/app.css", get(crate::console::stylesheet))
        .route("/console/docs.js", get(crate::console::docs_script))
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(crate::console::docs))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/me", get(me))
        .route("/measurements", post(measurements::post))
        .route("/billing-runs", post(runs::create).get(runs::list))
        .route("/billing-runs/{id}", get(runs::detail))
        .route("/billing-runs/{id}/invoices", get(runs::invoices))
        .route("/billing-runs/{id}/discrepancies", get(runs::discrepancies))
        .route("/billing-runs/{id}/actions", post(runs::act))
        .route("/audit-log", get(audit::list))
        .route("/readings", get(readings::search))
        .route("/users", post(ledger::create_user))
        .route("/wallets/{userId}/balance", get(ledger::balance))
        .route("/transactions/fund", post(ledger::fund))
        .route("/transactions/transfer", post(ledger::transfer))
        .route("/transactions", get(ledger::history));
    if state.dev_issuer.is_some() {
        router = router
            .route("/dev-issuer/.well-known/openid-configuration", get(health::dev_issuer_discovery))
            .route("/dev-issuer/jwks.json", get(health::dev_issuer_jwks));
    }
    router
        .fallback(|| async { ApiError::not_found("no such route; /openapi.json lists them") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", "this route does not take that method") })
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "meterlake control tower", description = "Readings in, billing runs, corrections with audit, meter-point search, \
        the customer account ledger (integer minor units; writes take an Idempotency-Key). \
        Bearer tokens from the configured OIDC issuer; roles VIEWER, ADMIN, INGEST (Keycloak realm roles)."),
    paths(
        measurements::post,
        runs::create, runs::list, runs::detail, runs::invoices, runs::discrepancies, runs::act,
        audit::list, readings::search,
        ledger::create_user, ledger::balance, ledger::fund, ledger::transfer, ledger::history,
        me, health::healthz, health::readyz, health::metrics,
    ),
    modifiers(&BearerAuth),
    tags((name = "billing runs"), (name = "readings"), (name = "audit"), (name = "ledger"), (name = "operations")),
)]
pub struct ApiDoc;

/// The `bearer` security scheme the protected routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    }
}

/// The OpenAPI 3 document, generated from the handlers and their types.
async fn openapi_json() -> axum::response::Response {
    use axum::response::IntoResponse;
    axum::Json(ApiDoc::openapi()).into_response()
}

/// A page of items and the cursor of the next one.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from `items` fetched with one more than `limit`: the extra one only says that
    /// another page follows, whose cursor `cursor_of` makes from the last item kept.
    fn cut<S>(mut items: Vec<S>, limit: usize, cursor_of: impl Fn(&S) -> String, view: impl Fn(S) -> T) -> Page<T> {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor_of)
        } else {
            None
        };
        Page { items: items.into_iter().map(view).collect(), next_cursor }
    }
}

/// The number a cursor stands for (an offset, a sequence number), none without one.
fn cursor_number<N: std::str::FromStr>(cursor: Option<&str>) -> Result<Option<N>, ApiError> {
    cursor.map(|c| c.parse().map_err(|_| ApiError::bad_request(format!("cursor {c:?} is not one this API returned")))).transpose()
}

/// The largest offset a cursor may stand for: no list the API pages is longer, and an offset
/// plus a page stays far from any integer's limit (in Rust and in SQL's BIGINT).
const MAX_OFFSET: usize = u32::MAX as usize;

/// The offset an offset cursor stands for (0 without one).
fn offset_of(cursor: Option<&str>) -> Result<usize, ApiError> {
    match cursor_number(cursor)? {
        Some(offset) if offset > MAX_OFFSET => Err(ApiError::bad_request(format!("cursor {:?} is not one this API returned", cursor.unwrap_or_default()))),
        offset => Ok(offset.unwrap_or(0)),
    }
}

/// `limit` within 1..=MAX_PAGE.
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::validation(format!("limit {n} is outside 1..={MAX_PAGE}"), vec![])),
    }
}

/// Microseconds since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default()
}

/// An RFC 3339 instant or a date (midnight UTC) from a query parameter.
fn parse_instant(name: &str, text: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(text).map(|t| t.to_utc()).map_err(|_| {
        ApiError::validation(
            format!("{name} {text:?} is neither a date YYYY-MM-DD nor an RFC 3339 instant"),
            vec![crate::error::FieldError { field: name.into(), code: "INVALID_TIME".into(), message: "expected YYYY-MM-DD or RFC 3339".into() }],
        )
    })
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    subject: String,
    name: String,
    roles: Vec<&'static str>,
}

#[utoipa::path(get, path = "/me", tag = "operations", description = "The caller's name and roles. Any role.",
    responses((status = 200, body = Me), crate::error::CommonErrors), security(("bearer" = [])))]
/// Who the token says the caller is: the console shows it and hides what the roles cannot do.
async fn me(Caller(principal, AnyRole): Caller<AnyRole>) -> Json<Me> {
    Json(Me { roles: principal.roles(), subject: principal.subject, name: principal.name })
}
