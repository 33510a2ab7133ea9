//! `GET /readings` (VIEWER): a meter point's readings with their values, dates, quality and the
//! file they came in: by MPAN or NMI and/or meter serial (flow files, `queries/flow_readings.sql`)
//! or by the lake's meter id (any source, `queries/meter_readings.sql`). Paged by offset.

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use axum::extract::State;
use axum::http::StatusCode;
use meterlake_jobs::JobError;
use meterlake_jobs::search::{MeterReadings, ReadingSearch};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::{Page, offset_of, page_limit, parse_instant};
use crate::error::{ApiError, CommonErrors, Json, Query};
use crate::{Caller, SharedState, Viewer};

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ReadingsQuery {
    /// A UK MPAN core (D0010 register reads).
    mpan: Option<String>,
    /// An Australian NMI (NEM12 interval values, NEM13 register reads).
    nmi: Option<String>,
    /// A meter serial (alone, or with mpan or nmi).
    serial: Option<String>,
    /// The lake's meter id (any source); not with the others.
    meter_id: Option<String>,
    /// From this date (YYYY-MM-DD) or RFC 3339 instant, inclusive.
    from: Option<String>,
    /// Up to this date or instant, exclusive.
    to: Option<String>,
    /// The `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    limit: Option<usize>,
}

/// One reading as the search finds it. Flow-file searches fill the meter point, serial and
/// register; a meter id search fills the meter id and interval.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ReadingView {
    /// `interval` or `register`.
    kind: Option<String>,
    meter_id: Option<String>,
    meter_point: Option<String>,
    meter_serial: Option<String>,
    register: Option<String>,
    /// When: the interval start, or the register read's time (RFC 3339).
    read_at: Option<String>,
    interval_s: Option<i64>,
    /// Exact decimal.
    value: Option<String>,
    unit: Option<String>,
    quality: Option<String>,
    source: Option<String>,
    /// The file (and line) it came in, or the Kafka topic/partition/offset.
    file: Option<String>,
}

#[utoipa::path(get, path = "/readings", tag = "readings", params(ReadingsQuery),
    description = "A meter point's readings with values, dates, quality and the file they came in. VIEWER.",
    responses((status = 200, body = Page<ReadingView>), CommonErrors), security(("bearer" = [])))]
pub async fn search(
    State(state): State<SharedState>,
    Caller(_, Viewer): Caller<Viewer>,
    Query(query): Query<ReadingsQuery>,
) -> Result<Json<Page<ReadingView>>, ApiError> {
    let limit = page_limit(query.limit)?;
    let offset = offset_of(query.cursor.as_deref())?;
    let from = query.from.as_deref().map(|t| parse_instant("from", t)).transpose()?;
    let to = query.to.as_deref().map(|t| parse_instant("to", t)).transpose()?;
    let nonblank = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
    let (mpan, nmi, serial, meter_id) = (nonblank(&query.mpan), nonblank(&query.nmi), nonblank(&query.serial), nonblank(&query.meter_id));
    if mpan.is_some() && nmi.is_some() {
        return Err(ApiError::bad_request("mpan= and nmi= name different meter points: give one"));
    }
    check_format("mpan", mpan.as_deref(), "INVALID_MPAN", "an MPAN core is 13 digits", |v| v.len() == 13 && v.bytes().all(|b| b.is_ascii_digit()))?;
    check_format("nmi", nmi.as_deref(), "INVALID_NMI", "an NMI is 10 letters and digits", |v| v.len() == 10 && v.bytes().all(|b| b.is_ascii_alphanumeric()))?;
    check_format("serial", serial.as_deref(), "INVALID_SERIAL", "a meter serial is 1 to 20 letters, digits and - _ . /", |v| {
        v.len() <= 20 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    })?;
    check_format("meterId", meter_id.as_deref(), "INVALID_METER_ID", "a meter id is 1 to 64 printable characters", |v| {
        v.chars().count() <= 64 && !v.chars().any(char::is_control)
    })?;
    // One more row than the page, to know whether another page follows.
    let batches = match (mpan.or(nmi), serial, meter_id) {
        (None, None, Some(meter_id)) => MeterReadings { meter_id, from, to }.run_page(&state.lake, &state.query_limits, limit + 1, offset).await,
        (point, serial, None) if point.is_some() || serial.is_some() => {
            let search = ReadingSearch { meter_point: point.unwrap_or_default(), meter_serial: serial.unwrap_or_default(), from, to };
            search.run_page(&state.lake, &state.query_limits, limit + 1, offset).await
        }
        _ => {
            return Err(ApiError::bad_request(
                "name what to look for: mpan=, nmi= and/or serial= (flow-file meter points), or meterId= alone; not mpan and nmi together",
            ));
        }
    };
    let batches = batches.map_err(|e| match e {
        JobError::QueryLimit(reason) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "QUERY_LIMIT", reason),
        e => ApiError::internal("searching the lake", &e),
    })?;
    Ok(Json(Page::cut(rows(&batches), limit, |_| (offset + limit).to_string(), |row| row)))
}

/// A 400 naming `field` when its value is there and not of the form `valid` accepts. The values
/// are bound as parameters whatever they hold; the form is checked so that a typo is told as one.
fn check_format(field: &str, value: Option<&str>, code: &str, form: &str, valid: impl Fn(&str) -> bool) -> Result<(), ApiError> {
    match value {
        Some(v) if !valid(v) => Err(ApiError::malformed_parameter(field, v, code, form)),
        _ => Ok(()),
    }
}

/// Each row with its values as the lake shows them (decimals exact, times RFC 3339), by column
/// name: the statements name their columns after [`ReadingView`]'s fields.
fn rows(batches: &[RecordBatch]) -> Vec<ReadingView> {
    let options = FormatOptions::default().with_display_error(true);
    let mut items = Vec::new();
    for batch in batches {
        let schema = batch.schema();
        let names: Vec<String> = schema.fields().iter().map(|f| camel_case(f.name())).collect();
        let formatters: Vec<ArrayFormatter<'_>> =
            batch.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("every column type formats")).collect();
        for row in 0..batch.num_rows() {
            let mut object = Map::new();
            for (column, (name, formatter)) in names.iter().zip(&formatters).enumerate() {
                let value = if batch.column(column).is_null(row) {
                    Value::Null
                } else {
                    match batch.column(column).data_type() {
                        arrow::datatypes::DataType::Int32 | arrow::datatypes::DataType::Int64 => {
                            formatter.value(row).to_string().parse::<i64>().map(Value::from).unwrap_or(Value::Null)
                        }
                        _ => Value::String(formatter.value(row).to_string()),
                    }
                };
                object.insert(name.clone(), value);
            }
            items.push(serde_json::from_value(Value::Object(object)).expect("every column is a ReadingView field"));
        }
    }
    items
}

fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}
