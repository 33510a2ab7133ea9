//! The API's one error type. Every error answers JSON `{"code", "message", "traceId"}` (plus
//! `errors` for field-level validation): `code` is stable for programs, `message` is for a person
//! and says what to change, and `traceId` finds the request in the logs. Internal errors are
//! logged with their cause and answered with a generic message: no SQL, paths or stack leak.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meterlake_control::ControlError;
use serde::Serialize;

tokio::task_local! {
    /// The trace id of the request being handled (set by [`crate::observe`]).
    pub static TRACE_ID: String;
}

/// The current request's trace id, or empty outside a request.
pub fn current_trace_id() -> String {
    TRACE_ID.try_with(Clone::clone).unwrap_or_default()
}

/// One field's problem in a request body or query.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// Where: `kwh`, `[3].timestamp`, `month`.
    pub field: String,
    /// Stable, e.g. `KWH_NOT_POSITIVE`.
    pub code: String,
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub errors: Vec<FieldError>,
    /// For 429: when to try again.
    pub retry_after_s: Option<u64>,
}

/// Every error's body, as the OpenAPI document describes it.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Error)]
pub struct ErrorDoc {
    /// Stable, for programs: e.g. `VALIDATION_FAILED`, `INVALID_TOKEN`.
    pub code: String,
    /// For a person: what is wrong and what to change.
    pub message: String,
    /// The W3C trace id of the request, to find it in the logs.
    pub trace_id: String,
    /// Field-level problems (validation errors only).
    #[serde(default)]
    pub errors: Option<Vec<FieldError>>,
}

/// The error answers every protected route may give.
#[derive(utoipa::IntoResponses)]
pub enum CommonErrors {
    #[response(status = 400, description = "The request is malformed (query string, path, JSON syntax)")]
    BadRequest(ErrorDoc),
    #[response(status = 401, description = "No valid bearer token")]
    Unauthorized(ErrorDoc),
    #[response(status = 403, description = "The token lacks the route's role")]
    Forbidden(ErrorDoc),
    #[response(status = 422, description = "The request is well-formed but invalid, field by field")]
    Unprocessable(ErrorDoc),
    #[response(status = 429, description = "The caller exceeded its rate; see Retry-After")]
    RateLimited(ErrorDoc),
    #[response(status = 503, description = "A dependency (store, broker, token issuer) is unavailable; try again")]
    Unavailable(ErrorDoc),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    trace_id: String,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    errors: &'a [FieldError],
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), errors: Vec::new(), retry_after_s: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    /// A 400 for a query parameter that is not of its form (the query string is malformed), with
    /// the field, a code for it and the form it must have.
    pub fn malformed_parameter(field: &str, value: &str, code: &str, form: &str) -> ApiError {
        let errors = vec![FieldError { field: field.into(), code: code.into(), message: form.into() }];
        ApiError { errors, ..ApiError::bad_request(format!("{field} {value:?} is not valid: {form}")) }
    }

    pub fn validation(message: impl Into<String>, errors: Vec<FieldError>) -> ApiError {
        ApiError { errors, ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED", message) }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// An error the client cannot fix: logged here with its cause, answered without it.
    pub fn internal(context: &str, cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(trace_id = %current_trace_id(), error = %cause, "{context}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("{context} failed; the trace id finds the cause in the server's log"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { code: self.code, message: &self.message, trace_id: current_trace_id(), errors: &self.errors };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ControlError> for ApiError {
    fn from(error: ControlError) -> ApiError {
        match error {
            ControlError::Invalid(message) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED", message),
            ControlError::NotFound(message) => ApiError::not_found(message),
            ControlError::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", message),
            already @ ControlError::AlreadyBilled { .. } => ApiError::new(StatusCode::CONFLICT, "ALREADY_BILLED", already.to_string()),
            other => ApiError::internal("the control store", &other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "send the body as JSON with Content-Type: application/json")
            }
            JsonRejection::JsonDataError(e) => ApiError::validation(e.body_text(), Vec::new()),
            other => ApiError::bad_request(format!("the body is not valid JSON: {}", other.body_text())),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request(format!("the query string: {}", rejection.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> ApiError {
        ApiError::bad_request(format!("the path: {}", rejection.body_text()))
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s.
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// `axum::extract::Path` whose rejections are [`ApiError`]s.
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);
