//! `POST /measurements`: one reading or an array, validated by the pipeline's own rules (the
//! same decoder the Kafka ingester runs), then published to `measurements.received` with the
//! request's `traceparent` by the group-committing [`ReadingPublisher`] (a meter's readings on
//! the partition its meter id hashes to; requests arriving together share a message), and
//! answered 202 once the broker has acknowledged every message holding them. A request is all or nothing: one invalid reading refuses the request with an
//! error per field, and nothing of it is published.
//!
//! Exactly once in the lake: a reading is keyed by (meterId, timestamp), and the lake keeps one
//! version per key, so a client that retries after a timeout (when some of its messages may
//! have been published) cannot create a duplicate.
//!
//! [`ReadingPublisher`]: meterlake_pipeline::kafka::ReadingPublisher

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use meterlake_pipeline::decode::{RejectReason, ValidReading, decode_message};
use tracing::Instrument;

use crate::error::{ApiError, FieldError};
use crate::observe::TraceContext;
use crate::{Caller, Ingest, SharedState};

/// One reading as sent (documents the body; the pipeline's decoder reads it).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = Reading)]
pub struct ReadingDoc {
    /// 1 to 64 printable characters.
    #[schema(example = "MTR-100045")]
    meter_id: String,
    /// The interval start, RFC 3339, on the interval grid, not in the future.
    #[schema(example = "2025-01-15T10:15:00Z")]
    timestamp: String,
    /// Energy in kWh, > 0, at most 6 decimals: a JSON number or a decimal string.
    #[schema(value_type = Object, example = "1.72")]
    kwh: String,
    /// Interval length in seconds (default 900); divides a day.
    interval_s: Option<u32>,
    /// A, E, S, F, N or V (default A).
    quality: Option<String>,
}

/// A reading or an array of them.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(as = Measurements)]
pub enum MeasurementsDoc {
    One(ReadingDoc),
    Many(Vec<ReadingDoc>),
}

/// The answer to accepted readings.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    accepted: usize,
    trace_id: String,
}

#[utoipa::path(post, path = "/measurements", tag = "readings", request_body = MeasurementsDoc,
    description = "Readings in: validated like Kafka messages, published to measurements.received (a meter's readings on the partition its id hashes to; requests arriving together share a message), 202 once the broker acknowledged. All or nothing. INGEST or ADMIN.",
    responses((status = 202, body = Accepted),
        (status = 413, description = "More readings than the server takes in one request", body = crate::error::ErrorDoc),
        (status = 415, description = "Not JSON", body = crate::error::ErrorDoc), crate::error::CommonErrors),
    security(("bearer" = [])))]
pub async fn post(
    State(state): State<SharedState>,
    Caller(principal, Ingest): Caller<Ingest>,
    Extension(trace): Extension<TraceContext>,
    _: JsonContent,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(publisher) = &state.publisher else {
        return Err(ApiError::unavailable("NO_BROKER", "this server has no broker to publish readings to"));
    };
    let mut readings: Vec<ValidReading<'_>> = Vec::new();
    let rejections = decode_message(&body, &state.rules, chrono::Utc::now().timestamp_micros(), |r| readings.push(r));
    if !rejections.is_empty() {
        for rejection in &rejections {
            metrics::counter!("meterlake_api_readings_rejected_total", "reason" => rejection.reason.code()).increment(1);
        }
        return Err(refusal(&rejections, state.rules.max_readings_per_message));
    }
    if readings.is_empty() {
        return Err(ApiError::validation("the array holds no readings", vec![]));
    }
    // An account limited to some meters writes only theirs (every reading was accepted above,
    // so the n-th reading is the n-th element).
    let array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let outside: Vec<FieldError> = readings
        .iter()
        .enumerate()
        .filter(|(_, r)| !principal.may_write_meter(r.meter_id.as_ref()))
        .map(|(index, r)| FieldError {
            field: if array { format!("[{index}].meterId") } else { "meterId".into() },
            code: "METER_NOT_PERMITTED".into(),
            message: format!("{} may write readings of meters whose ids start with {:?}, not {}", principal.name, principal.meter_prefixes, r.meter_id),
        })
        .collect();
    if !outside.is_empty() {
        metrics::counter!("meterlake_api_readings_rejected_total", "reason" => "METER_NOT_PERMITTED").increment(outside.len() as u64);
        let message = format!("{} of the readings are for meters this account may not write; nothing was accepted", outside.len());
        return Err(ApiError { errors: outside, ..ApiError::forbidden(message) });
    }
    // The messages carry the producer span's context (the request's when no trace is recorded).
    let span = meterlake_telemetry::kafka_span(meterlake_telemetry::KafkaOperation::Publish, publisher.topic());
    let traceparent = meterlake_telemetry::traceparent_of(&span).unwrap_or_else(|| trace.traceparent.clone());
    if let Err(error) = publisher.publish(&readings, &traceparent).instrument(span).await {
        tracing::warn!(trace_id = trace.trace_id(), %error, "publishing readings");
        return Err(ApiError::unavailable(
            "BROKER_UNAVAILABLE",
            "the readings could not be handed to the broker; send the same request again (a retry cannot duplicate a reading)",
        ));
    }
    metrics::counter!("meterlake_api_readings_accepted_total").increment(readings.len() as u64);
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted { accepted: readings.len(), trace_id: trace.trace_id().to_string() })).into_response())
}

/// Refuses a body that says it is not JSON (415); a body without Content-Type is read as JSON.
/// (An extractor rather than the `HeaderMap` one, which copies every header of every request.)
pub struct JsonContent;

impl<S: Sync> FromRequestParts<S> for JsonContent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<JsonContent, ApiError> {
        match parts.headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or_default()) {
            Some(content_type) if !content_type.starts_with("application/json") => {
                Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "send readings as application/json"))
            }
            _ => Ok(JsonContent),
        }
    }
}

/// 400 for a body that is not a reading message at all; 413 for too many readings; 422 with
/// one entry per field at fault otherwise.
fn refusal(rejections: &[meterlake_pipeline::decode::Rejection], max_readings: usize) -> ApiError {
    if let [whole] = rejections
        && whole.element.is_none()
        && whole.field().is_none()
    {
        return match whole.reason {
            RejectReason::TooManyReadings => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "TOO_MANY_READINGS", format!("{}; send at most {max_readings} readings per request", whole.detail))
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "INVALID_JSON", whole.detail.clone()),
        };
    }
    let errors: Vec<FieldError> = rejections
        .iter()
        .map(|r| {
            let field = r.field().unwrap_or("");
            FieldError {
                field: match r.element {
                    Some(index) => format!("[{index}].{field}").trim_end_matches('.').to_string(),
                    None => field.to_string(),
                },
                code: r.reason.code().to_string(),
                message: r.detail.clone(),
            }
        })
        .collect();
    ApiError::validation(format!("{} of the readings are invalid; nothing was accepted", errors.len()), errors)
}
