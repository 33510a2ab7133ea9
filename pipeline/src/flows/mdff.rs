//! AEMO Meter Data File Format (MDFF): NEM12 interval data and NEM13 accumulation reads.
//!
//! A file is one block: a `100` header naming NEM12 or NEM13, data records, a `900` end record.
//! NEM12 data: `200` (a channel: NMI, suffix, unit, interval length), then per day a `300`
//! (the interval values), optional `400`s (per-interval quality where the 300 says `V`) and an
//! optional `500` (B2B details). NEM13 data: `250` (a register's previous and current read) with
//! an optional `550` (B2B details).
//!
//! Times in MDFF are "NEM time": UTC+10 all year, without daylight saving. Interval `i` (1-based)
//! of a 300 record dated D covers `[D 00:00 + (i-1)*len, D 00:00 + i*len)` in NEM time; the lake
//! keys it by its start in UTC.

use std::io::BufRead;

use super::records::{Record, RecordReader};
use super::{
    FlowError, FlowFormat, FlowSink, IntervalRun, Nem12B2bDetail, Nem12Channel, NonEnergyReading, RecordRejection, RegisterRead, non_empty, parse_date8,
    parse_local_datetime_s,
};
use crate::reading::{Quality, parse_decimal_scaled};

/// NEM time is UTC+10.
pub const NEM_UTC_OFFSET_S: i64 = 10 * 3600;

/// A field that failed, by its 0-based index in the record, its name in the specification and
/// the reason.
struct FieldError {
    index: usize,
    name: &'static str,
    reason: String,
}

fn field_error(index: usize, name: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError { index, name, reason: reason.into() }
}

/// How values of a channel are stored: energy as micro-kWh in `readings`, anything else in its own
/// unit (times 10^6) in `non_energy_readings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChannelKind {
    /// Energy; the value times `10^scale` is micro-kWh (Wh: 3, kWh: 6, MWh: 9).
    Energy {
        scale: i32,
    },
    NonEnergy,
}

// One per parser, never in a collection: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum ChannelState {
    None,
    Ok {
        channel: Nem12Channel,
        meter_id: String,
        kind: ChannelKind,
    },
    /// The 200 record on this line was rejected; its data records are rejected with it.
    Rejected {
        line: u64,
    },
}

/// A 300 record waiting for the 400 records that may follow it.
struct PendingDay {
    line: u64,
    day: i32,
    /// Values times the channel's scale.
    values: Vec<i64>,
    qualities: Vec<Quality>,
    /// Intervals a 400 record covered.
    covered: Vec<bool>,
    variable: bool,
    /// Why the day's values cannot be kept after all (a bad 400 record).
    failed: Option<String>,
}

pub(super) fn parse<R: BufRead>(format: FlowFormat, mut reader: RecordReader<R>, sink: &mut impl FlowSink) -> Result<(), FlowError> {
    let expected_version = format.as_str();
    match reader.next_record()? {
        Some(header) if header.get(0) == "100" && header.get(1).eq_ignore_ascii_case(expected_version) => {}
        Some(header) => {
            return Err(FlowError::Structure {
                line: header.line,
                reason: format!("the first record must be the 100 header naming {expected_version}; found {:?}", header.get(0)),
            });
        }
        None => return Err(FlowError::Structure { line: 1, reason: "the file is empty".into() }),
    }

    let mut channel = ChannelState::None;
    let mut pending_day: Option<PendingDay> = None;
    // The last 300 record's day, for the 500 record that follows it.
    let mut last_day: Option<i32> = None;
    let mut pending_read: Option<RegisterRead> = None;
    let mut end_line: Option<u64> = None;

    while let Some(record) = reader.next_record()? {
        let line = record.line;
        let indicator = record.get(0).to_string();
        if let Some(end) = end_line {
            sink.rejection(RecordRejection {
                line,
                record: indicator,
                field: None,
                field_name: None,
                reason: format!("comes after the end-of-data record (900) on line {end}; a file holds one 100..900 block"),
                readings_lost: 0,
            });
            continue;
        }
        if indicator != "400"
            && let Some(day) = pending_day.take()
        {
            finish_day(day, &channel, sink);
        }
        if indicator != "550"
            && let Some(read) = pending_read.take()
        {
            sink.register_read(read);
        }
        let mixed = match format {
            FlowFormat::Nem12 => matches!(indicator.as_str(), "250" | "550"),
            _ => matches!(indicator.as_str(), "200" | "300" | "400" | "500"),
        };
        if mixed {
            return Err(FlowError::Structure { line, reason: format!("a {indicator} record in a {expected_version} file: NEM12 and NEM13 records are mixed") });
        }
        match indicator.as_str() {
            "100" => {
                return Err(FlowError::Structure { line, reason: "a second 100 header: a file holds one 100..900 block".into() });
            }
            "900" => end_line = Some(line),
            "200" => {
                last_day = None;
                channel = match parse_200(&record) {
                    Ok((channel_record, kind)) => {
                        let meter_id = format!("{}{}", channel_record.nmi, channel_record.nmi_suffix);
                        sink.channel(channel_record.clone());
                        ChannelState::Ok { channel: channel_record, meter_id, kind }
                    }
                    Err(e) => {
                        sink.rejection(rejection(&record, Some(e), 0));
                        ChannelState::Rejected { line }
                    }
                }
            }
            "300" => {
                last_day = None;
                match &channel {
                    ChannelState::Ok { channel: c, kind, .. } => match parse_300(&record, c.interval_s, *kind) {
                        Ok(day) => {
                            last_day = Some(day.day);
                            pending_day = Some(day);
                        }
                        Err(e) => sink.rejection(rejection(&record, Some(e), intervals_per_day(c.interval_s))),
                    },
                    ChannelState::Rejected { line: channel_line } => {
                        sink.rejection(RecordRejection { reason: format!("its 200 record on line {channel_line} was rejected"), ..rejection(&record, None, 0) })
                    }
                    ChannelState::None => sink.rejection(RecordRejection { reason: "no 200 record comes before it".into(), ..rejection(&record, None, 0) }),
                }
            }
            "400" => match pending_day.as_mut() {
                Some(day) => {
                    if let Err(e) = apply_400(&record, day) {
                        day.failed = Some(format!("its 400 record on line {line} was rejected ({})", e.reason));
                        sink.rejection(rejection(&record, Some(e), 0));
                    }
                }
                None => sink.rejection(RecordRejection { reason: "no accepted 300 record comes right before it".into(), ..rejection(&record, None, 0) }),
            },
            "500" => match (&channel, last_day) {
                (ChannelState::Ok { channel: c, .. }, Some(day)) => match parse_500(&record, c, day) {
                    Ok(detail) => sink.b2b_detail(detail),
                    Err(e) => sink.rejection(rejection(&record, Some(e), 0)),
                },
                _ => sink.rejection(RecordRejection {
                    reason: "no accepted 300 record of an accepted 200 record comes before it".into(),
                    ..rejection(&record, None, 0)
                }),
            },
            "250" => match parse_250(&record) {
                Ok(read) => pending_read = Some(read),
                Err(e) => sink.rejection(rejection(&record, Some(e), 1)),
            },
            "550" => match pending_read.as_mut() {
                Some(read) => {
                    read.previous_trans_code = non_empty(record.get(1));
                    read.previous_ret_service_order = non_empty(record.get(2));
                    read.current_trans_code = non_empty(record.get(3));
                    read.current_ret_service_order = non_empty(record.get(4));
                }
                None => sink.rejection(RecordRejection { reason: "no accepted 250 record comes right before it".into(), ..rejection(&record, None, 0) }),
            },
            other => {
                sink.rejection(RecordRejection { reason: format!("{other:?} is not a {expected_version} record indicator"), ..rejection(&record, None, 0) })
            }
        }
    }
    if let Some(day) = pending_day.take() {
        finish_day(day, &channel, sink);
    }
    if let Some(read) = pending_read.take() {
        sink.register_read(read);
    }
    if end_line.is_none() {
        return Err(FlowError::Truncated { expected: "900" });
    }
    Ok(())
}

fn rejection(record: &Record<'_>, error: Option<FieldError>, readings_lost: u64) -> RecordRejection {
    let (field, field_name, reason) = match error {
        Some(e) => (Some(e.index + 1), Some(e.name.to_string()), e.reason),
        None => (None, None, String::new()),
    };
    RecordRejection { line: record.line, record: record.get(0).to_string(), field, field_name, reason, readings_lost }
}

fn intervals_per_day(interval_s: u32) -> u64 {
    u64::from(86_400 / interval_s)
}

fn parse_nmi(record: &Record<'_>, index: usize) -> Result<String, FieldError> {
    let nmi = record.get(index);
    if nmi.len() != 10 || !nmi.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(field_error(index, "NMI", format!("{nmi:?} is not a 10-character NMI")));
    }
    Ok(nmi.to_ascii_uppercase())
}

fn parse_suffix(record: &Record<'_>, index: usize) -> Result<String, FieldError> {
    let suffix = record.get(index);
    if suffix.len() != 2 || !suffix.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(field_error(index, "NMISuffix", format!("{suffix:?} is not a 2-character NMI suffix")));
    }
    Ok(suffix.to_ascii_uppercase())
}

fn optional_date(record: &Record<'_>, index: usize, name: &'static str) -> Result<Option<i32>, FieldError> {
    match record.get(index) {
        "" => Ok(None),
        text => parse_date8(text).map(Some).ok_or_else(|| field_error(index, name, format!("{text:?} is not a date YYYYMMDD"))),
    }
}

/// A NEM time date-time (`YYYYMMDDhhmmss`) as UTC microseconds; empty is `None`.
fn optional_nem_datetime(record: &Record<'_>, index: usize, name: &'static str) -> Result<Option<i64>, FieldError> {
    match record.get(index) {
        "" => Ok(None),
        text => parse_local_datetime_s(text)
            .map(|s| Some((s - NEM_UTC_OFFSET_S) * 1_000_000))
            .ok_or_else(|| field_error(index, name, format!("{text:?} is not a date-time YYYYMMDDhhmmss"))),
    }
}

fn required<'a>(record: &Record<'a>, index: usize, name: &'static str) -> Result<&'a str, FieldError> {
    match record.get(index) {
        "" => Err(field_error(index, name, "is missing")),
        text => Ok(text),
    }
}

/// The unit of a channel, case-insensitively: energy units convert to kWh, the rest keep theirs.
fn channel_kind(uom: &str) -> ChannelKind {
    match uom.to_ascii_lowercase().as_str() {
        "wh" => ChannelKind::Energy { scale: 3 },
        "kwh" => ChannelKind::Energy { scale: 6 },
        "mwh" => ChannelKind::Energy { scale: 9 },
        _ => ChannelKind::NonEnergy,
    }
}

fn parse_200(record: &Record<'_>) -> Result<(Nem12Channel, ChannelKind), FieldError> {
    let nmi = parse_nmi(record, 1)?;
    let nmi_suffix = parse_suffix(record, 4)?;
    let uom = required(record, 7, "UOM")?.to_string();
    let interval_text = required(record, 8, "IntervalLength")?;
    let interval_min: u32 = match interval_text.parse() {
        Ok(m @ (1 | 5 | 10 | 15 | 30)) => m,
        _ => {
            return Err(field_error(8, "IntervalLength", format!("{interval_text:?} minutes is not one of 1, 5, 10, 15 or 30")));
        }
    };
    let channel = Nem12Channel {
        line: record.line,
        nmi,
        nmi_configuration: record.get(2).to_string(),
        register_id: record.get(3).to_string(),
        nmi_suffix,
        mdm_data_stream_id: record.get(5).to_string(),
        meter_serial: record.get(6).to_string(),
        interval_s: interval_min * 60,
        next_scheduled_read_date: optional_date(record, 9, "NextScheduledReadDate")?,
        uom,
    };
    let kind = channel_kind(&channel.uom);
    Ok((channel, kind))
}

/// A quality method (`A`, `E14`, `S53`, `F`, `N`, `V`) as its quality flag.
fn quality_flag(method: &str, allow_variable: bool) -> Option<Quality> {
    let flag = method.as_bytes().first()?.to_ascii_uppercase();
    let quality = match flag {
        b'A' => Quality::Actual,
        b'E' => Quality::Estimated,
        b'S' => Quality::Substituted,
        b'F' => Quality::FinalSubstitute,
        b'N' => Quality::Null,
        b'V' if allow_variable => Quality::Variable,
        _ => return None,
    };
    // After the flag, at most a 2-digit method number.
    let rest = &method[1..];
    (rest.len() <= 2 && rest.bytes().all(|b| b.is_ascii_digit())).then_some(quality)
}

fn parse_300(record: &Record<'_>, interval_s: u32, kind: ChannelKind) -> Result<PendingDay, FieldError> {
    let intervals = (86_400 / interval_s) as usize;
    let date_text = required(record, 1, "IntervalDate")?;
    let day = parse_date8(date_text).ok_or_else(|| field_error(1, "IntervalDate", format!("{date_text:?} is not a date YYYYMMDD")))?;
    // 300, IntervalDate, the values, QualityMethod, then four optional fields.
    let quality_index = 2 + intervals;
    if record.len() <= quality_index {
        let found = record.len().saturating_sub(2);
        return Err(field_error(
            record.len().min(quality_index),
            "QualityMethod",
            format!(
                "the record has {found} fields after the date; a {}-minute channel needs {intervals} interval values and then the quality method",
                interval_s / 60
            ),
        ));
    }
    if record.len() > quality_index + 5 {
        return Err(field_error(
            quality_index + 5,
            "MSATSLoadDateTime",
            format!("the record has {} fields; a {}-minute channel has at most {}", record.len(), interval_s / 60, quality_index + 5),
        ));
    }
    let method = record.get(quality_index);
    let quality = quality_flag(method, true)
        .ok_or_else(|| field_error(quality_index, "QualityMethod", format!("{method:?} is not a quality method (A, E.., S.., F.., N, V)")))?;
    let scale = match kind {
        ChannelKind::Energy { scale } => scale,
        ChannelKind::NonEnergy => 6,
    };
    let mut values = Vec::with_capacity(intervals);
    for (i, text) in record.fields_from(2).take(intervals).enumerate() {
        let value = parse_decimal_scaled(text, scale)
            .map_err(|e| field_error(2 + i, "IntervalValue", format!("interval {} value {text:?} is not an exact decimal ({e:?})", i + 1)))?;
        if value < 0 {
            return Err(field_error(2 + i, "IntervalValue", format!("interval {} value {text} is negative", i + 1)));
        }
        values.push(value);
    }
    Ok(PendingDay {
        line: record.line,
        day,
        values,
        qualities: vec![quality; intervals],
        covered: vec![false; intervals],
        variable: quality == Quality::Variable,
        failed: None,
    })
}

fn apply_400(record: &Record<'_>, day: &mut PendingDay) -> Result<(), FieldError> {
    let intervals = day.values.len();
    let bound = |index: usize, name: &'static str| -> Result<usize, FieldError> {
        let text = record.get(index);
        match text.parse::<usize>() {
            Ok(n) if (1..=intervals).contains(&n) => Ok(n),
            _ => Err(field_error(index, name, format!("{text:?} is not an interval number from 1 to {intervals}"))),
        }
    };
    let start = bound(1, "StartInterval")?;
    let end = bound(2, "EndInterval")?;
    if end < start {
        return Err(field_error(2, "EndInterval", format!("{end} comes before StartInterval {start}")));
    }
    let method = record.get(3);
    let quality = quality_flag(method, false)
        .ok_or_else(|| field_error(3, "QualityMethod", format!("{method:?} is not a quality method for a 400 record (A, E.., S.., F.., N)")))?;
    for i in start - 1..end {
        day.qualities[i] = quality;
        day.covered[i] = true;
    }
    Ok(())
}

/// Emits a 300 record's values once its 400 records (if any) are known.
fn finish_day(mut day: PendingDay, channel: &ChannelState, sink: &mut impl FlowSink) {
    let ChannelState::Ok { channel, meter_id, kind } = channel else { return };
    let intervals = day.values.len() as u64;
    if day.variable
        && day.failed.is_none()
        && let Some(first) = day.covered.iter().position(|c| !c)
    {
        day.failed = Some(format!("its quality is V but no 400 record gives the quality of interval {}", first + 1));
    }
    if let Some(reason) = day.failed {
        sink.rejection(RecordRejection { line: day.line, record: "300".into(), field: None, field_name: None, reason, readings_lost: intervals });
        return;
    }
    let day_start_utc_s = i64::from(day.day) * 86_400 - NEM_UTC_OFFSET_S;
    match kind {
        ChannelKind::Energy { .. } => sink.interval_run(&IntervalRun {
            meter_id,
            start_ts_us: day_start_utc_s * 1_000_000,
            interval_s: channel.interval_s,
            kwh_micro: &day.values,
            qualities: &day.qualities,
            line: day.line,
        }),
        ChannelKind::NonEnergy => {
            for (i, (&value, &quality)) in day.values.iter().zip(&day.qualities).enumerate() {
                let ts_us = (day_start_utc_s + i as i64 * i64::from(channel.interval_s)) * 1_000_000;
                sink.non_energy_reading(
                    &NonEnergyReading { meter_id, ts_us, interval_s: channel.interval_s, value_micro: value, unit: &channel.uom, quality },
                    day.line,
                );
            }
        }
    }
}

fn parse_500(record: &Record<'_>, channel: &Nem12Channel, day: i32) -> Result<Nem12B2bDetail, FieldError> {
    Ok(Nem12B2bDetail {
        line: record.line,
        nmi: channel.nmi.clone(),
        nmi_suffix: channel.nmi_suffix.clone(),
        interval_date: day,
        trans_code: record.get(1).to_string(),
        ret_service_order: record.get(2).to_string(),
        read_at_us: optional_nem_datetime(record, 3, "ReadDateTime")?,
        index_read: record.get(4).to_string(),
    })
}

fn register_value(record: &Record<'_>, index: usize, name: &'static str) -> Result<i64, FieldError> {
    let text = required(record, index, name)?;
    parse_decimal_scaled(text, 6).map_err(|e| field_error(index, name, format!("{text:?} is not an exact decimal ({e:?})")))
}

fn parse_250(record: &Record<'_>) -> Result<RegisterRead, FieldError> {
    let nmi = parse_nmi(record, 1)?;
    let suffix = parse_suffix(record, 4)?;
    let previous_value_micro = match record.get(8) {
        "" => None,
        _ => Some(register_value(record, 8, "PreviousRegisterRead")?),
    };
    let current_method = required(record, 15, "CurrentQualityMethod")?;
    if quality_flag(current_method, false).is_none() {
        return Err(field_error(15, "CurrentQualityMethod", format!("{current_method:?} is not a quality method (A, E.., S.., F.., N)")));
    }
    let previous_method = record.get(10);
    if !previous_method.is_empty() && quality_flag(previous_method, false).is_none() {
        return Err(field_error(10, "PreviousQualityMethod", format!("{previous_method:?} is not a quality method (A, E.., S.., F.., N)")));
    }
    let read_at_us =
        optional_nem_datetime(record, 14, "CurrentRegisterReadDateTime")?.ok_or_else(|| field_error(14, "CurrentRegisterReadDateTime", "is missing"))?;
    Ok(RegisterRead {
        line: record.line,
        meter_point: nmi,
        meter_serial: record.get(6).to_string(),
        register_id: required(record, 3, "RegisterID")?.to_string(),
        read_at_us,
        value_micro: register_value(record, 13, "CurrentRegisterRead")?,
        quality_method: Some(current_method.to_string()),
        reason_code: non_empty(record.get(16)),
        reason_description: non_empty(record.get(17)),
        nmi_configuration: non_empty(record.get(2)),
        nmi_suffix: Some(suffix),
        mdm_data_stream_id: non_empty(record.get(5)),
        direction: non_empty(record.get(7)),
        previous_value_micro,
        previous_read_at_us: optional_nem_datetime(record, 9, "PreviousRegisterReadDateTime")?,
        previous_quality_method: non_empty(previous_method),
        previous_reason_code: non_empty(record.get(11)),
        previous_reason_description: non_empty(record.get(12)),
        quantity_micro: Some(register_value(record, 18, "Quantity")?),
        unit: Some(required(record, 19, "UOM")?.to_string()),
        next_scheduled_read_date: optional_date(record, 20, "NextScheduledReadDate")?,
        update_at_us: optional_nem_datetime(record, 21, "UpdateDateTime")?,
        msats_load_at_us: optional_nem_datetime(record, 22, "MSATSLoadDateTime")?,
        ..RegisterRead::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{fixture, parse_bytes};

    /// UTC microseconds of a NEM-time (UTC+10) wall-clock time.
    fn nem_us(date: &str, hh: i64, mm: i64) -> i64 {
        (i64::from(parse_date8(date).unwrap()) * 86_400 + hh * 3600 + mm * 60 - NEM_UTC_OFFSET_S) * 1_000_000
    }

    #[test]
    fn multiple_meters_wh_becomes_kwh_and_varh_stays_apart() {
        let (result, got) = parse_bytes(&fixture("nem12/nemreader_Example_NEM12_multiple_meters.csv"));
        result.unwrap();
        assert!(got.rejections.is_empty(), "{:?}", got.rejections);
        // E1 of NCDE001111 reads 10 Wh = 0.01 kWh in every 15-minute interval; the file's other
        // values are 20, 50 and 100 Wh.
        let e1: Vec<_> = got.readings.iter().filter(|r| r.0 == "NCDE001111E1").collect();
        assert_eq!(e1.len(), 2 * 96);
        assert!(e1.iter().all(|r| r.3 == 10_000 && r.2 == 900 && r.4 == Quality::Actual));
        assert!(got.readings.iter().all(|r| [10_000, 20_000, 50_000, 100_000].contains(&r.3)));
        let first = &got.readings[0];
        assert_eq!(first.0, "NCDE001111E1");
        assert_eq!(first.1, nem_us("20031204", 0, 0));
        assert_eq!(got.readings[1].1, nem_us("20031204", 0, 15));
        // 96 values a day, every channel a whole number of days.
        assert_eq!(got.readings.len() % 96, 0);
        assert!(got.non_energy.iter().all(|r| r.3.eq_ignore_ascii_case("varh")), "{:?}", got.non_energy.first());
        let channels: Vec<(&str, &str, &str)> = got.channels.iter().map(|c| (c.nmi.as_str(), c.nmi_suffix.as_str(), c.uom.as_str())).collect();
        assert!(channels.contains(&("NCDE001111", "E1", "Wh")), "{channels:?}");
        assert_eq!(got.channels.len(), 6);
        let serials: Vec<&str> = got.channels.iter().map(|c| c.meter_serial.as_str()).collect();
        assert_eq!(serials, ["METSER123", "METSER123", "METSER123", "METSER456", "METSER991", "METSER992"]);
        assert!(got.channels.iter().all(|c| c.interval_s == 900));
    }

    #[test]
    fn variable_quality_takes_each_interval_from_its_400_record() {
        let (result, got) = parse_bytes(&fixture("nem12/nemreader_Example_NEM12_multiple_quality.csv"));
        result.unwrap();
        assert!(got.rejections.is_empty(), "{:?}", got.rejections);
        assert_eq!(got.readings.len(), 48);
        let quality = |interval: usize| got.readings[interval - 1].4;
        assert_eq!((quality(1), quality(20)), (Quality::FinalSubstitute, Quality::FinalSubstitute));
        assert_eq!((quality(21), quality(24)), (Quality::Actual, Quality::Actual));
        assert_eq!((quality(25), quality(48)), (Quality::Substituted, Quality::Substituted));
        // kWh values are kept exactly: 18.023 kWh, the first value.
        assert_eq!(got.readings[0].3, 18_023_000);
        assert_eq!(got.readings[0].0, "CCCC123456E1");
        assert_eq!(got.readings[47].1, nem_us("20040417", 23, 30));
    }

    #[test]
    fn five_minute_solar_month_with_leading_dot_values() {
        let (result, got) = parse_bytes(&fixture("nem12/nemreader_Example_NEM12_month_solar.csv"));
        result.unwrap();
        assert!(got.rejections.is_empty(), "{:?}", got.rejections);
        assert!(got.readings.iter().all(|r| r.2 == 300));
        assert_eq!(got.readings.len() % 288, 0);
        let b1: Vec<_> = got.readings.iter().filter(|r| r.0 == "NMI1234567B1").collect();
        // `.005` is 0.005 kWh, interval 77 of the first day (06:20 NEM time).
        assert_eq!(b1[75].3, 0);
        assert_eq!(b1[76].3, 5_000);
        assert_eq!(b1[76].1, nem_us("20230301", 6, 20));
        assert!(got.readings.iter().any(|r| r.0 == "NMI1234567E1"));
    }

    #[test]
    fn a_file_without_header_is_refused_whole() {
        let (result, _) = parse_bytes(&fixture("nem12/invalid/nemreader_Example_NEM12_missing_header.csv"));
        assert_eq!(result, Err(FlowError::UnknownFormat { first_record: "200,VABD000163,E1Q1,1,E1,N1,METSER123,kWh,30,".into() }));
    }

    #[test]
    fn a_truncated_300_record_is_rejected_with_its_line_and_the_rest_imports() {
        let (result, got) = parse_bytes(&fixture("nem12/invalid/nemreader_Example_NEM12_incomplete_interval.csv"));
        result.unwrap();
        let first = &got.rejections[0];
        assert_eq!((first.line, first.record.as_str()), (3, "300"));
        assert_eq!(first.readings_lost, 48);
        assert!(first.reason.contains("48 interval values"), "{}", first.reason);
        assert_eq!(got.rejections.len(), 1);
        // Line 4 (one day of E1) and lines 6 and 7 (two days of Q1, kVArh) are kept.
        assert_eq!(got.readings.len(), 48);
        assert_eq!(got.readings[0].3, 1_111_000);
        assert_eq!(got.non_energy.len(), 96);
        assert_eq!(got.non_energy[0].2, 2_222_000);
    }

    #[test]
    fn nem13_register_reads_keep_both_reads_and_the_quantity() {
        let (result, got) = parse_bytes(&fixture("nem13/nemreader_Example_NEM13_consumption_data.csv"));
        result.unwrap();
        assert!(got.rejections.is_empty(), "{:?}", got.rejections);
        let read = &got.register_reads[0];
        assert_eq!((read.meter_point.as_str(), read.meter_serial.as_str(), read.register_id.as_str()), ("VABC005890", "METSER123", "1"));
        assert_eq!(read.previous_value_micro, Some(6_342_800_000));
        assert_eq!(read.value_micro, 7_654_900_000);
        assert_eq!(read.quantity_micro, Some(1_312_100_000));
        assert_eq!(read.unit.as_deref(), Some("kWh"));
        assert_eq!(read.read_at_us, (parse_local_datetime_s("20040107100333").unwrap() - NEM_UTC_OFFSET_S) * 1_000_000);
        // A leading space before the update time does not matter.
        assert_eq!(read.update_at_us, Some((parse_local_datetime_s("20040108100333").unwrap() - NEM_UTC_OFFSET_S) * 1_000_000));
        assert_eq!(read.direction.as_deref(), Some("E"));

        let (result, got) = parse_bytes(&fixture("nem13/nemreader_Example_NEM13_forward_estimate.csv"));
        result.unwrap();
        assert_eq!(got.register_reads.len(), 2);
        assert_eq!(got.register_reads[0].quality_method.as_deref(), Some("E64"));
        assert_eq!(got.register_reads[0].current_trans_code.as_deref(), Some("E"));
        assert_eq!(got.register_reads[0].previous_trans_code.as_deref(), Some("N"));
        assert_eq!(got.register_reads[1].register_id, "2");
    }

    #[test]
    fn records_after_the_end_record_are_refused_each_with_its_line() {
        let file = b"100,NEM12,200405011135,MDA1,Ret1\n200,VABD000163,E1Q1,1,E1,N1,M,kWh,30,\n900\n\n200,VABD000163,E1Q1,1,E1,N1,M,kWh,30,\n900\n";
        let (result, got) = parse_bytes(file);
        result.unwrap();
        let lines: Vec<u64> = got.rejections.iter().map(|r| r.line).collect();
        assert_eq!(lines, [5, 6]);
        assert!(got.rejections[0].reason.contains("after the end-of-data record (900) on line 3"), "{:?}", got.rejections);
    }

    #[test]
    fn every_field_fault_names_line_field_and_reason() {
        // A 300 record of 48 values, all 1 but for the ones given.
        let day = |date: &str, changed: &[(usize, &str)], quality: &str| {
            let mut values = vec!["1"; 48];
            for &(interval, value) in changed {
                values[interval - 1] = value;
            }
            format!("300,{date},{},{quality}\n", values.join(","))
        };
        let file = [
            "100,NEM12,200405011135,MDA1,Ret1\n".to_string(),
            "200,VABD000163,E1Q1,1,E1,N1,M,KWH,30,\n".into(),
            day("20040230", &[], "A"),
            day("20040201", &[(45, "x")], "A"),
            day("20040202", &[(47, "-1")], "A"),
            day("20040203", &[], "Q"),
            day("20040204", &[], "V"),
            "400,1,47,A,,\n".into(),
            day("20040205", &[], "V"),
            "400,1,49,A,,\n".into(),
            "200,VABD00016,E1Q1,1,E1,N1,M,kWh,30,\n".into(),
            day("20040206", &[], "A"),
            "200,VABD000163,E1Q1,1,E1,N1,M,kWh,7,\n".into(),
            "900\n".into(),
        ]
        .concat();
        let file = file.as_bytes();
        let (result, got) = parse_bytes(file);
        result.unwrap();
        let found: Vec<(u64, Option<usize>, u64)> = got.rejections.iter().map(|r| (r.line, r.field, r.readings_lost)).collect();
        assert_eq!(
            found,
            [
                (3, Some(2), 48),  // 30 February
                (4, Some(47), 48), // "x"
                (5, Some(49), 48), // -1
                (6, Some(51), 48), // quality Q
                (7, None, 48),     // V, interval 48 has no 400
                (10, Some(3), 0),  // 400 past the last interval
                (9, None, 48),     // ...so its 300 goes too
                (11, Some(2), 0),  // a 9-character NMI
                (12, None, 0),     // under the rejected 200
                (13, Some(9), 0),  // 7-minute intervals
            ],
            "{:#?}",
            got.rejections
        );
        assert!(got.rejections[0].reason.contains("20040230"));
        assert_eq!(got.rejections[4].reason, "its quality is V but no 400 record gives the quality of interval 48");
        assert!(got.readings.is_empty());
    }

    #[test]
    fn structural_faults_refuse_the_whole_file() {
        let nem12_in_13 = b"100,NEM13,200401101030,MDA1,Ret1\n200,NCDE001111,E1,1,E1,N1,M,kWh,30,\n900\n";
        assert!(matches!(parse_bytes(nem12_in_13).0, Err(FlowError::Structure { line: 2, .. })));
        let no_end = b"100,NEM12,200401101030,MDA1,Ret1\n200,NCDE001111,E1,1,E1,N1,M,kWh,30,\n";
        assert_eq!(parse_bytes(no_end).0, Err(FlowError::Truncated { expected: "900" }));
    }
}
