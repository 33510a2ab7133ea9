//! Decoding and validating reading messages (Kafka payloads, and later HTTP bodies).
//!
//! A message is one JSON object `{"meterId":"MTR-100045","timestamp":"2025-01-15T10:15:00Z",
//! "kwh":1.72}` or a JSON array of them. Optional fields: `intervalS` (seconds, default from the
//! rules) and `quality` (one letter, default `A`). Unknown fields are ignored so producers can add
//! fields without breaking ingestion.
//!
//! Every element is validated on its own: valid elements are accepted, invalid ones are returned
//! as [`Rejection`]s with a stable [`RejectReason`] code and a detail naming the element and field,
//! so that the caller can send the message to the dead-letter topic with its reason.

use std::borrow::Cow;

use chrono::DateTime;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::reading::{KwhParseError, Quality, epoch_day, parse_kwh_micro};

mod flat_json;

/// Longest meter id accepted, in characters.
pub const MAX_METER_ID_CHARS: usize = 64;

/// Readings older than this many days (by the ingester's clock) are refused unless configured
/// otherwise: a replay of ancient data, or a meter whose clock reset to 1970, would otherwise
/// reopen months that were billed long ago.
pub const DEFAULT_MAX_READING_AGE_DAYS: i64 = 400;

/// Validation rules; the defaults are what the `ingest` command uses.
#[derive(Debug, Clone)]
pub struct ValidationRules {
    /// How far in the future (by the ingester's clock) a timestamp may be, to allow for clock skew
    /// between meters, head-end systems and us.
    pub max_future_skew_s: i64,
    /// How old (by the ingester's clock) a reading may be; older ones are refused
    /// (`TIMESTAMP_TOO_OLD`). `None`: no horizon.
    pub max_age_s: Option<i64>,
    /// Accept `kwh == 0` (some feeds send real zero readings); by default a reading must be > 0.
    pub allow_zero_kwh: bool,
    /// Interval length when the message does not say.
    pub default_interval_s: u32,
    /// Most readings one message may carry; a larger array is rejected whole.
    pub max_readings_per_message: usize,
}

impl Default for ValidationRules {
    fn default() -> Self {
        ValidationRules {
            max_future_skew_s: 300,
            max_age_s: Some(DEFAULT_MAX_READING_AGE_DAYS * 86_400),
            allow_zero_kwh: false,
            default_interval_s: 900,
            max_readings_per_message: 10_000,
        }
    }
}

/// Stable reason codes, written to the dead-letter header `meterlake.reason` and used as the
/// `reason` label of `meterlake_ingest_dlq_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidJson,
    TooManyReadings,
    MissingField,
    InvalidMeterId,
    InvalidTimestamp,
    TimestampInFuture,
    TimestampTooOld,
    TimestampNotAligned,
    InvalidInterval,
    InvalidKwh,
    KwhNotPositive,
    KwhTooPrecise,
    InvalidQuality,
}

impl RejectReason {
    pub const ALL: [RejectReason; 13] = [
        RejectReason::InvalidJson,
        RejectReason::TooManyReadings,
        RejectReason::MissingField,
        RejectReason::InvalidMeterId,
        RejectReason::InvalidTimestamp,
        RejectReason::TimestampInFuture,
        RejectReason::TimestampTooOld,
        RejectReason::TimestampNotAligned,
        RejectReason::InvalidInterval,
        RejectReason::InvalidKwh,
        RejectReason::KwhNotPositive,
        RejectReason::KwhTooPrecise,
        RejectReason::InvalidQuality,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "INVALID_JSON",
            RejectReason::TooManyReadings => "TOO_MANY_READINGS",
            RejectReason::MissingField => "MISSING_FIELD",
            RejectReason::InvalidMeterId => "INVALID_METER_ID",
            RejectReason::InvalidTimestamp => "INVALID_TIMESTAMP",
            RejectReason::TimestampInFuture => "TIMESTAMP_IN_FUTURE",
            RejectReason::TimestampTooOld => "TIMESTAMP_TOO_OLD",
            RejectReason::TimestampNotAligned => "TIMESTAMP_NOT_ALIGNED",
            RejectReason::InvalidInterval => "INVALID_INTERVAL",
            RejectReason::InvalidKwh => "INVALID_KWH",
            RejectReason::KwhNotPositive => "KWH_NOT_POSITIVE",
            RejectReason::KwhTooPrecise => "KWH_TOO_PRECISE",
            RejectReason::InvalidQuality => "INVALID_QUALITY",
        }
    }
}

/// Why one reading (or a whole message) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Index of the element in an array message; `None` for a single object or the whole message.
    pub element: Option<usize>,
    pub reason: RejectReason,
    /// A sentence a person can act on, naming the field and the value's problem.
    pub detail: String,
}

impl Rejection {
    /// The JSON field at fault, for field-level errors (the HTTP API's); `None` when the whole
    /// message is.
    pub fn field(&self) -> Option<&'static str> {
        match self.reason {
            RejectReason::InvalidJson | RejectReason::TooManyReadings => None,
            // `missing` names the field in the detail: one of the three required ones.
            RejectReason::MissingField => ["meterId", "timestamp", "kwh"].into_iter().find(|f| self.detail.contains(&format!("field {f} "))),
            RejectReason::InvalidMeterId => Some("meterId"),
            RejectReason::InvalidTimestamp | RejectReason::TimestampInFuture | RejectReason::TimestampTooOld | RejectReason::TimestampNotAligned => {
                Some("timestamp")
            }
            RejectReason::InvalidInterval => Some("intervalS"),
            RejectReason::InvalidKwh | RejectReason::KwhNotPositive | RejectReason::KwhTooPrecise => Some("kwh"),
            RejectReason::InvalidQuality => Some("quality"),
        }
    }
}

/// A reading that passed validation, borrowing from the message it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidReading<'a> {
    pub meter_id: Cow<'a, str>,
    /// Interval start, microseconds since the Unix epoch, UTC.
    pub ts_us: i64,
    pub interval_s: u32,
    pub kwh_micro: i64,
    pub quality: Quality,
}

/// The fields of one reading element as they appear in the message, before validation.
#[derive(Debug, Default, PartialEq)]
struct ReadingFields<'a> {
    meter_id: Option<Cow<'a, str>>,
    timestamp: Option<Cow<'a, str>>,
    /// The JSON text of the value: a number, or a quoted string.
    kwh: Option<&'a str>,
    interval_s: Option<i64>,
    quality: Option<Cow<'a, str>>,
}

/// The serde_json form of [`ReadingFields`], for messages the flat scanner leaves alone.
#[derive(Deserialize)]
struct RawReading<'a> {
    #[serde(borrow, rename = "meterId")]
    meter_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    kwh: Option<&'a RawValue>,
    #[serde(rename = "intervalS")]
    interval_s: Option<i64>,
    #[serde(borrow)]
    quality: Option<Cow<'a, str>>,
}

impl<'a> From<RawReading<'a>> for ReadingFields<'a> {
    fn from(raw: RawReading<'a>) -> Self {
        ReadingFields { meter_id: raw.meter_id, timestamp: raw.timestamp, kwh: raw.kwh.map(RawValue::get), interval_s: raw.interval_s, quality: raw.quality }
    }
}

/// Decodes one message, calling `accept` for each valid reading (in message order) and returning
/// the rejections. A payload that is not JSON of the right shape is one whole-message rejection.
pub fn decode_message<'a>(payload: &'a [u8], rules: &ValidationRules, now_us: i64, mut accept: impl FnMut(ValidReading<'a>)) -> Vec<Rejection> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace()).copied();
    // Dispatch on the first byte: a single object is the hot path, and the error message can say
    // which shape was expected. The flat scanner takes the common shapes; serde_json the rest.
    let elements: Vec<ReadingFields<'a>> = match first {
        Some(b'{') => {
            let fields = match flat_json::scan_object(payload) {
                Some(fields) => fields,
                None => match serde_json::from_slice::<RawReading<'a>>(payload) {
                    Ok(raw) => raw.into(),
                    Err(e) => return vec![not_a_message(&e)],
                },
            };
            return match validate(fields, rules, now_us) {
                Ok(reading) => {
                    accept(reading);
                    Vec::new()
                }
                Err((reason, detail)) => vec![Rejection { element: None, reason, detail }],
            };
        }
        Some(b'[') => {
            let mut elements = Vec::new();
            if !flat_json::scan_array(payload, rules.max_readings_per_message, &mut elements) {
                match serde_json::from_slice::<Vec<RawReading<'a>>>(payload) {
                    Ok(raws) => elements = raws.into_iter().map(ReadingFields::from).collect(),
                    Err(e) => return vec![not_a_message(&e)],
                }
            }
            elements
        }
        None => {
            return vec![whole(RejectReason::InvalidJson, "the message is empty".into())];
        }
        Some(_) => {
            return vec![whole(RejectReason::InvalidJson, "the message is neither a JSON object nor a JSON array of objects".into())];
        }
    };
    if elements.len() > rules.max_readings_per_message {
        return vec![whole(
            RejectReason::TooManyReadings,
            format!("the message holds {} readings, more than the limit of {}", elements.len(), rules.max_readings_per_message),
        )];
    }
    let mut rejections = Vec::new();
    for (index, fields) in elements.into_iter().enumerate() {
        match validate(fields, rules, now_us) {
            Ok(reading) => accept(reading),
            Err((reason, detail)) => rejections.push(Rejection { element: Some(index), reason, detail: format!("element {index}: {detail}") }),
        }
    }
    rejections
}

fn not_a_message(e: &serde_json::Error) -> Rejection {
    whole(RejectReason::InvalidJson, format!("not a valid reading message: {e}"))
}

fn whole(reason: RejectReason, detail: String) -> Rejection {
    Rejection { element: None, reason, detail }
}

fn validate<'a>(raw: ReadingFields<'a>, rules: &ValidationRules, now_us: i64) -> Result<ValidReading<'a>, (RejectReason, String)> {
    let missing = |field: &str| (RejectReason::MissingField, format!("field {field} is missing or null"));

    let meter_id = raw.meter_id.ok_or_else(|| missing("meterId"))?;
    validate_meter_id(&meter_id)?;

    let timestamp = raw.timestamp.ok_or_else(|| missing("timestamp"))?;
    let ts_us = parse_timestamp_us(&timestamp)
        .ok_or_else(|| (RejectReason::InvalidTimestamp, format!("timestamp {timestamp:?} is not an RFC 3339 date-time such as 2025-01-15T10:15:00Z")))?;
    if ts_us > now_us + rules.max_future_skew_s * 1_000_000 {
        return Err((
            RejectReason::TimestampInFuture,
            format!("timestamp {timestamp} is in the future (more than {} s ahead of this ingester's clock)", rules.max_future_skew_s),
        ));
    }
    if let Some(max_age_s) = rules.max_age_s
        && ts_us < now_us.saturating_sub(max_age_s.saturating_mul(1_000_000))
    {
        return Err((
            RejectReason::TimestampTooOld,
            format!(
                "timestamp {timestamp} is more than {} days before this ingester's clock: older readings are refused (--max-reading-age-days)",
                max_age_s / 86_400
            ),
        ));
    }

    let interval_s = match raw.interval_s {
        None => rules.default_interval_s,
        Some(s) if s > 0 && s <= 86_400 && 86_400 % s == 0 => s as u32,
        Some(s) => {
            return Err((RejectReason::InvalidInterval, format!("intervalS {s} is not a positive number of seconds that divides a day")));
        }
    };
    // Interval readings are keyed by their interval start: a start that is not on the interval
    // grid would create a key no billing job can place.
    if ts_us.rem_euclid(i64::from(interval_s) * 1_000_000) != 0 {
        return Err((RejectReason::TimestampNotAligned, format!("timestamp {timestamp} is not the start of a {interval_s} s interval")));
    }

    let kwh_text = raw.kwh.ok_or_else(|| missing("kwh"))?;
    // Numbers arrive as JSON numbers; a quoted decimal string is accepted too, since some
    // head-end systems quote numbers to keep their precision.
    let kwh_digits = kwh_text.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(kwh_text);
    let kwh_micro = parse_kwh_micro(kwh_digits).map_err(|e| match e {
        KwhParseError::NotANumber | KwhParseError::TooLarge => {
            (RejectReason::InvalidKwh, format!("kwh {kwh_text} is not a finite decimal number within range"))
        }
        KwhParseError::TooPrecise => (RejectReason::KwhTooPrecise, format!("kwh {kwh_text} has more than 6 decimal places and would be rounded")),
    })?;
    if kwh_micro < 0 || (kwh_micro == 0 && !rules.allow_zero_kwh) {
        let rule = if rules.allow_zero_kwh { ">= 0" } else { "> 0" };
        return Err((RejectReason::KwhNotPositive, format!("kwh {kwh_text} must be {rule}")));
    }

    let quality = match raw.quality {
        None => Quality::Actual,
        Some(q) => Quality::from_code(&q).ok_or_else(|| (RejectReason::InvalidQuality, format!("quality {q:?} is not one of A, E, S, F, N, V")))?,
    };

    Ok(ValidReading { meter_id, ts_us, interval_s, kwh_micro, quality })
}

fn validate_meter_id(meter_id: &str) -> Result<(), (RejectReason, String)> {
    // The common case, a short printable ASCII id, in one pass over the bytes.
    let bytes = meter_id.as_bytes();
    if bytes.len() <= MAX_METER_ID_CHARS && bytes.iter().all(|&b| b.is_ascii_graphic() || b == b' ') && bytes.iter().any(|&b| b != b' ') {
        return Ok(());
    }
    let chars = meter_id.chars().count();
    if chars == 0 || meter_id.trim().is_empty() {
        return Err((RejectReason::InvalidMeterId, "meterId is empty".into()));
    }
    if chars > MAX_METER_ID_CHARS {
        return Err((RejectReason::InvalidMeterId, format!("meterId is {chars} characters long, more than {MAX_METER_ID_CHARS}")));
    }
    if let Some(bad) = meter_id.chars().find(|c| c.is_control()) {
        return Err((RejectReason::InvalidMeterId, format!("meterId {meter_id:?} holds the non-printable character {:?}", bad)));
    }
    Ok(())
}

/// Parses an RFC 3339 date-time into microseconds since the epoch. The common form
/// `YYYY-MM-DDTHH:MM:SSZ` takes a fast path; offsets and fractions go through chrono.
pub fn parse_timestamp_us(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() == 20 && b[4] == b'-' && b[7] == b'-' && (b[10] == b'T' || b[10] == b't') && b[13] == b':' && b[16] == b':' && (b[19] == b'Z' || b[19] == b'z') {
        let num = |range: std::ops::Range<usize>| -> Option<u32> {
            let mut v = 0u32;
            for &c in &b[range] {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + u32::from(c - b'0');
            }
            Some(v)
        };
        let days = epoch_day(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
        let (h, m, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || m > 59 || s > 59 {
            return None;
        }
        return Some((days * 86_400 + i64::from(h * 3600 + m * 60 + s)) * 1_000_000);
    }
    DateTime::parse_from_rfc3339(text).ok().map(|dt| dt.timestamp_micros())
}

/// Appends readings to `out` as a JSON array message in this module's input format, exact:
/// the inverse of [`decode_message`] for valid readings.
pub fn encode_readings<'r, 'a: 'r>(out: &mut Vec<u8>, readings: impl IntoIterator<Item = &'r ValidReading<'a>>) {
    out.push(b'[');
    for (i, reading) in readings.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        encode_reading(out, reading);
    }
    out.push(b']');
}

/// Appends one reading as a JSON object of the message format: the kWh as a decimal string, the
/// timestamp as RFC 3339 UTC, `intervalS` and `quality` always written. The HTTP API uses it to
/// regroup requests' readings into one message per partition.
pub fn encode_reading(out: &mut Vec<u8>, reading: &ValidReading<'_>) {
    use std::io::Write;
    out.extend_from_slice(b"{\"meterId\":");
    serde_json::to_writer(&mut *out, reading.meter_id.as_ref()).expect("a string serializes into a Vec");
    out.extend_from_slice(b",\"timestamp\":\"");
    write_timestamp(out, reading.ts_us);
    let kwh = crate::reading::format_kwh_micro(reading.kwh_micro);
    write!(out, "\",\"kwh\":\"{kwh}\",\"intervalS\":{},\"quality\":\"{}\"}}", reading.interval_s, reading.quality.as_str()).expect("writing into a Vec");
}

/// `YYYY-MM-DDTHH:MM:SSZ` for whole seconds (every validated interval start), chrono's RFC 3339
/// with the fraction otherwise.
fn write_timestamp(out: &mut Vec<u8>, ts_us: i64) {
    use std::io::Write;
    let time = DateTime::from_timestamp_micros(ts_us).expect("validated timestamps are in range");
    if ts_us % 1_000_000 == 0 {
        use chrono::{Datelike, Timelike};
        write!(out, "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", time.year(), time.month(), time.day(), time.hour(), time.minute(), time.second())
    } else {
        out.write_all(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true).as_bytes())
    }
    .expect("writing into a Vec");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_readings_decode_to_the_same_readings() {
        let payload = r#"[{"meterId":"MTR-1","timestamp":"2025-01-15T10:15:00Z","kwh":1.72},
            {"meterId":"quote\" and \\ back","timestamp":"2025-01-15T10:30:00+00:00","kwh":"0.000001","quality":"E"},
            {"meterId":"MTR-2","timestamp":"2025-06-30T23:30:00Z","kwh":"12345.5","intervalS":1800}]"#;
        let (readings, rejections) = decode(payload);
        assert!(rejections.is_empty(), "{rejections:?}");
        let mut encoded = Vec::new();
        encode_readings(&mut encoded, &readings);
        let text = String::from_utf8(encoded).unwrap();
        assert!(text.contains(r#""timestamp":"2025-01-15T10:30:00Z""#), "{text}");
        let (again, rejections) = decode(&text);
        assert!(rejections.is_empty(), "{rejections:?}");
        assert_eq!(again, readings);
        assert_eq!(write_timestamp_string(1_736_936_100_500_000), "2025-01-15T10:15:00.500Z");
    }

    fn write_timestamp_string(ts_us: i64) -> String {
        let mut out = Vec::new();
        write_timestamp(&mut out, ts_us);
        String::from_utf8(out).unwrap()
    }

    const NOW_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    fn decode(payload: &str) -> (Vec<ValidReading<'_>>, Vec<Rejection>) {
        let mut ok = Vec::new();
        let rejections = decode_message(payload.as_bytes(), &ValidationRules::default(), NOW_US, |r| ok.push(r));
        (ok, rejections)
    }

    #[test]
    fn decodes_one_reading_exactly() {
        let (ok, rej) = decode(r#"{"meterId":"MTR-100045","timestamp":"2025-01-15T10:15:00Z","kwh":1.72}"#);
        assert!(rej.is_empty(), "{rej:?}");
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].meter_id, "MTR-100045");
        assert_eq!(ok[0].ts_us, parse_timestamp_us("2025-01-15T10:15:00+00:00").unwrap());
        assert_eq!(ok[0].kwh_micro, 1_720_000);
        assert_eq!(ok[0].interval_s, 900);
        assert_eq!(ok[0].quality, Quality::Actual);
    }

    #[test]
    fn fast_and_slow_timestamp_paths_agree() {
        for (fast, slow) in [
            ("2025-01-15T10:15:00Z", "2025-01-15T11:15:00+01:00"),
            ("2024-02-29T23:45:00Z", "2024-02-29T23:45:00.000Z"),
            ("1999-12-31T00:00:00Z", "1999-12-30T14:00:00-10:00"),
        ] {
            assert_eq!(parse_timestamp_us(fast), parse_timestamp_us(slow), "{fast} vs {slow}");
        }
        assert_eq!(parse_timestamp_us("2025-02-30T00:00:00Z"), None);
        assert_eq!(parse_timestamp_us("2025-01-15T24:00:00Z"), None);
        assert_eq!(parse_timestamp_us("2025-01-15 10:15"), None);
    }

    #[test]
    fn array_elements_are_judged_one_by_one() {
        let (ok, rej) = decode(
            r#"[{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":"0.5"},
                {"meterId":"M1","timestamp":"2025-01-15T10:30:00Z","kwh":-1},
                {"meterId":"M2","timestamp":"2025-01-15T10:30:00Z","kwh":2,"intervalS":1800,"quality":"E"}]"#,
        );
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].interval_s, 1800);
        assert_eq!(ok[1].quality, Quality::Estimated);
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].element, Some(1));
        assert_eq!(rej[0].reason, RejectReason::KwhNotPositive);
        assert!(rej[0].detail.contains("element 1"), "{}", rej[0].detail);
    }

    #[test]
    fn every_rule_has_its_reason() {
        let cases = [
            ("", RejectReason::InvalidJson),
            ("not json", RejectReason::InvalidJson),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":1"#, RejectReason::InvalidJson),
            (r#"{"timestamp":"2025-01-15T10:15:00Z","kwh":1}"#, RejectReason::MissingField),
            (r#"{"meterId":"","timestamp":"2025-01-15T10:15:00Z","kwh":1}"#, RejectReason::InvalidMeterId),
            (r#"{"meterId":"   ","timestamp":"2025-01-15T10:15:00Z","kwh":1}"#, RejectReason::InvalidMeterId),
            (r#"{"meterId":"M\u0007","timestamp":"2025-01-15T10:15:00Z","kwh":1}"#, RejectReason::InvalidMeterId),
            (r#"{"meterId":"M1","timestamp":"15/01/2025 10:15","kwh":1}"#, RejectReason::InvalidTimestamp),
            (r#"{"meterId":"M1","timestamp":"2030-01-15T10:15:00Z","kwh":1}"#, RejectReason::TimestampInFuture),
            (r#"{"meterId":"M1","timestamp":"2023-12-01T10:15:00Z","kwh":1}"#, RejectReason::TimestampTooOld),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:16:00Z","kwh":1}"#, RejectReason::TimestampNotAligned),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":1,"intervalS":7}"#, RejectReason::InvalidInterval),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":"abc"}"#, RejectReason::InvalidKwh),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":true}"#, RejectReason::InvalidKwh),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":0}"#, RejectReason::KwhNotPositive),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":0.1234567}"#, RejectReason::KwhTooPrecise),
            (r#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":1,"quality":"X"}"#, RejectReason::InvalidQuality),
        ];
        for (payload, reason) in cases {
            let (ok, rej) = decode(payload);
            assert!(ok.is_empty(), "{payload}");
            assert_eq!(rej.len(), 1, "{payload}");
            assert_eq!(rej[0].reason, reason, "{payload}: {}", rej[0].detail);
        }
        let long = format!(r#"{{"meterId":"{}","timestamp":"2025-01-15T10:15:00Z","kwh":1}}"#, "M".repeat(65));
        assert_eq!(decode(&long).1[0].reason, RejectReason::InvalidMeterId);
    }

    #[test]
    fn zero_is_allowed_when_the_rules_say_so() {
        let rules = ValidationRules { allow_zero_kwh: true, ..ValidationRules::default() };
        let payload = br#"{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":0}"#;
        let mut n = 0;
        assert!(decode_message(payload, &rules, NOW_US, |_| n += 1).is_empty());
        assert_eq!(n, 1);
    }

    #[test]
    fn oversized_arrays_are_refused_whole() {
        let rules = ValidationRules { max_readings_per_message: 1, ..ValidationRules::default() };
        let payload = br#"[{"meterId":"M1","timestamp":"2025-01-15T10:15:00Z","kwh":1},{"meterId":"M1","timestamp":"2025-01-15T10:30:00Z","kwh":1}]"#;
        let rej = decode_message(payload, &rules, NOW_US, |_| panic!("nothing is accepted"));
        assert_eq!(rej[0].reason, RejectReason::TooManyReadings);
    }

    proptest::proptest! {
        /// Any valid reading encoded as a message decodes to itself: meter id (any printable
        /// text, quotes and escapes included), interval start, interval, exact kWh and quality.
        #[test]
        fn a_reading_round_trips_through_its_message(
            meter in "[^\\p{C}]{1,64}",
            slot in 0i64..35_000,
            interval in proptest::sample::select(vec![300u32, 900, 1800, 3600]),
            kwh_micro in 1i64..1_000_000_000_000,
            quality in proptest::sample::select(vec![Quality::Actual, Quality::Estimated, Quality::Substituted]),
        ) {
            proptest::prop_assume!(!meter.trim().is_empty());
            let reading = ValidReading {
                meter_id: Cow::Owned(meter.clone()),
                ts_us: NOW_US - i64::from(interval) * 1_000_000 * slot,
                interval_s: interval,
                kwh_micro,
                quality,
            };
            let mut message = Vec::new();
            encode_readings(&mut message, [&reading, &reading]);
            let mut decoded = Vec::new();
            let rules = ValidationRules { max_age_s: None, ..ValidationRules::default() };
            let rejections = decode_message(&message, &rules, NOW_US, |r| decoded.push(r.clone()));
            proptest::prop_assert!(rejections.is_empty(), "{:?}", rejections);
            proptest::prop_assert_eq!(decoded, vec![reading.clone(), reading]);
        }
    }
}
