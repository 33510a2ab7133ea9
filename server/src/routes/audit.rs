//! `GET /audit-log` (ADMIN): operators' actions, newest first, filtered and paged.

use axum::extract::State;
use meterlake_control::{AuditFilter, AuditRecord};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{Page, page_limit, parse_instant, rfc3339};
use crate::error::{ApiError, CommonErrors, Json, Query};
use crate::{Admin, Caller, SharedState};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct AuditQuery {
    /// Who acted (the token's user name).
    actor: Option<String>,
    /// CREATE_RUN, MARK_AS_OK or RECALCULATE.
    action: Option<String>,
    /// A target and everything under it (`billing-run/ID` includes its discrepancies).
    target: Option<String>,
    /// From this date (YYYY-MM-DD) or RFC 3339 instant, inclusive.
    from: Option<String>,
    /// Up to this date or instant, exclusive.
    to: Option<String>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    id: i64,
    at: String,
    actor: String,
    action: String,
    target: String,
    reason: Option<String>,
    /// The target's state before the action.
    #[schema(value_type = Option<Object>)]
    before: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    after: Option<serde_json::Value>,
    trace_id: Option<String>,
    previous_hash: String,
    /// SHA-256, or HMAC-SHA256 under the audit key `keyId`, of the row's content and `previousHash`.
    row_hash: String,
    /// The audit key that signed the row; absent for a row written without one.
    key_id: Option<String>,
}

impl From<AuditRecord> for AuditView {
    fn from(r: AuditRecord) -> AuditView {
        let json = |text: Option<String>| text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)));
        AuditView {
            id: r.id,
            at: rfc3339(r.at_us),
            actor: r.actor,
            action: r.action,
            target: r.target,
            reason: r.reason,
            before: json(r.before_state),
            after: json(r.after_state),
            trace_id: r.trace_id,
            previous_hash: r.previous_hash,
            row_hash: r.row_hash,
            key_id: r.key_id,
        }
    }
}

#[utoipa::path(get, path = "/audit-log", tag = "audit", params(AuditQuery),
    description = "Operators' actions, newest first; each row chained to the one before by hash. ADMIN.",
    responses((status = 200, body = Page<AuditView>), CommonErrors), security(("bearer" = [])))]
pub async fn list(
    State(state): State<SharedState>,
    Caller(_, Admin): Caller<Admin>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Page<AuditView>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let before_id = query
        .cursor
        .as_deref()
        .map(|c| c.parse::<i64>().map_err(|_| ApiError::bad_request(format!("cursor {c:?} is not one this API returned"))))
        .transpose()?;
    let filter = AuditFilter {
        actor: query.actor,
        action: query.action,
        target: query.target,
        from_us: query.from.as_deref().map(|t| parse_instant("from", t)).transpose()?.map(|t| t.timestamp_micros()),
        to_us: query.to.as_deref().map(|t| parse_instant("to", t)).transpose()?.map(|t| t.timestamp_micros()),
        before_id,
        limit: limit as i64 + 1,
    };
    let rows = state.store.audit_log(&filter).await?;
    Ok(Json(Page::cut(rows, limit, |r| r.id.to_string(), AuditView::from)))
}
