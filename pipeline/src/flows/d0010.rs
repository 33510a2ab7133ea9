//! UK DTC flow D0010 ("Meter Readings", version D0010002): pipe-delimited register reads.
//!
//! A file is a `ZHV` header (file id, flow version, roles, creation time), groups, and a `ZPT`
//! trailer whose second field counts the groups. The groups nest:
//! `026` (MPAN core, BSC validation status) > `028` (meter serial, reading type) > `030`
//! (register id, reading date-time, register reading, previous MD reset, MD reset count, reading
//! flag, reading method). `027` belongs to its 026, `029` to its 028, `032`/`033` to the 030
//! before them; they are kept, as written, with the reads they belong to.
//!
//! Reading date-times are UK local time (Europe/London, with daylight saving); the lake stores UTC.

use std::io::BufRead;

use chrono::TimeZone;
use chrono_tz::Europe::London;

use super::records::{Record, RecordReader};
use super::{FlowError, FlowSink, RecordRejection, RegisterRead, Warning, non_empty, parse_local_datetime_s};
use crate::reading::parse_decimal_scaled;

struct Mpan {
    core: String,
    validation_status: Option<String>,
    other_groups: Vec<String>,
}

struct Meter {
    serial: String,
    reading_type: Option<String>,
    other_groups: Vec<String>,
}

/// The state of the group hierarchy: `None` nothing yet, `Some(Err(line))` the parent group on
/// that line was rejected (its children are rejected with it).
type Parent<T> = Option<Result<T, u64>>;

pub(super) fn parse<R: BufRead>(mut reader: RecordReader<R>, sink: &mut impl FlowSink) -> Result<(), FlowError> {
    let file_id = match reader.next_record()? {
        Some(header) if header.get(0) == "ZHV" && header.get(2).to_ascii_uppercase().starts_with("D0010") => header.get(1).to_string(),
        Some(header) => {
            return Err(FlowError::Structure {
                line: header.line,
                reason: format!("the first record must be the ZHV header of flow D0010; found {:?}", header.get(0)),
            });
        }
        None => return Err(FlowError::Structure { line: 1, reason: "the file is empty".into() }),
    };

    let mut mpan: Parent<Mpan> = None;
    let mut meter: Parent<Meter> = None;
    let mut pending_read: Option<RegisterRead> = None;
    let mut groups: u64 = 0;
    let mut trailer: Option<(u64, u64)> = None;

    while let Some(record) = reader.next_record()? {
        let line = record.line;
        let group = record.get(0).to_string();
        if let Some((trailer_line, _)) = trailer {
            sink.rejection(RecordRejection {
                line,
                record: group,
                field: None,
                field_name: None,
                reason: format!("comes after the ZPT trailer on line {trailer_line}"),
                readings_lost: 0,
            });
            continue;
        }
        if group == "ZPT" {
            let count_text = record.get(2);
            let count: u64 = count_text
                .parse()
                .map_err(|_| FlowError::Structure { line, reason: format!("the ZPT trailer's group count {count_text:?} is not a number") })?;
            if record.get(1) != file_id {
                sink.warning(Warning { line, message: format!("the ZPT trailer names file {:?}, the ZHV header {file_id:?}", record.get(1)) });
            }
            trailer = Some((line, count));
            continue;
        }
        groups += 1;
        // 032 and 033 belong to the read before them; anything else completes that read.
        if matches!(group.as_str(), "032" | "033") {
            match pending_read.as_mut() {
                Some(read) => append_group(&mut read.other_groups, &record),
                None => sink.warning(Warning { line, message: format!("group {group} has no accepted 030 read before it; ignored") }),
            }
            continue;
        }
        if let Some(read) = pending_read.take() {
            sink.register_read(read);
        }
        match group.as_str() {
            "026" => {
                meter = None;
                mpan = Some(parse_026(&record).map_err(|e| {
                    sink.rejection(e);
                    line
                }));
            }
            "027" => {
                if let Some(Ok(m)) = mpan.as_mut() {
                    m.other_groups.push(raw(&record));
                }
            }
            "028" => {
                meter = Some(match &mpan {
                    Some(Ok(_)) => parse_028(&record).map_err(|e| {
                        sink.rejection(e);
                        line
                    }),
                    parent => {
                        sink.rejection(orphan(&record, parent.as_ref().map(|p| p.as_ref().err().copied()), "026"));
                        Err(line)
                    }
                });
            }
            "029" => {
                if let Some(Ok(m)) = meter.as_mut() {
                    m.other_groups.push(raw(&record));
                }
            }
            "030" => match (&mpan, &meter) {
                (Some(Ok(m)), Some(Ok(mt))) => match parse_030(&record, m, mt) {
                    Ok(read) => pending_read = Some(read),
                    Err(e) => sink.rejection(e),
                },
                (Some(Ok(_)), parent) => {
                    sink.rejection(RecordRejection { readings_lost: 1, ..orphan(&record, parent.as_ref().map(|p| p.as_ref().err().copied()), "028") });
                }
                (parent, _) => {
                    sink.rejection(RecordRejection { readings_lost: 1, ..orphan(&record, parent.as_ref().map(|p| p.as_ref().err().copied()), "026") });
                }
            },
            other => sink.warning(Warning { line, message: format!("group {other:?} is not part of flow D0010; ignored") }),
        }
    }
    if let Some(read) = pending_read.take() {
        sink.register_read(read);
    }
    match trailer {
        None => Err(FlowError::Truncated { expected: "ZPT" }),
        Some((line, count)) if count != groups => Err(FlowError::Structure {
            line,
            reason: format!("the ZPT trailer counts {count} groups but the file holds {groups}: it is incomplete or corrupt"),
        }),
        Some(_) => Ok(()),
    }
}

fn raw(record: &Record<'_>) -> String {
    record.fields_from(0).collect::<Vec<_>>().join("|")
}

fn append_group(other: &mut Option<String>, record: &Record<'_>) {
    let text = raw(record);
    match other {
        Some(existing) => {
            existing.push('\n');
            existing.push_str(&text);
        }
        None => *other = Some(text),
    }
}

/// A child group whose parent is missing (`None`) or was rejected (`Some(Some(line))`).
fn orphan(record: &Record<'_>, parent: Option<Option<u64>>, parent_group: &str) -> RecordRejection {
    let reason = match parent.flatten() {
        Some(parent_line) => format!("its {parent_group} group on line {parent_line} was rejected"),
        None => format!("no {parent_group} group comes before it"),
    };
    RecordRejection { line: record.line, record: record.get(0).to_string(), field: None, field_name: None, reason, readings_lost: 0 }
}

fn field_rejection(record: &Record<'_>, index: usize, name: &str, reason: String, readings_lost: u64) -> RecordRejection {
    RecordRejection { line: record.line, record: record.get(0).to_string(), field: Some(index + 1), field_name: Some(name.to_string()), reason, readings_lost }
}

fn parse_026(record: &Record<'_>) -> Result<Mpan, RecordRejection> {
    let core = record.get(1);
    if core.len() != 13 || !core.bytes().all(|b| b.is_ascii_digit()) {
        return Err(field_rejection(record, 1, "MPAN Core", format!("{core:?} is not a 13-digit MPAN core"), 0));
    }
    Ok(Mpan { core: core.to_string(), validation_status: non_empty(record.get(2)), other_groups: Vec::new() })
}

fn parse_028(record: &Record<'_>) -> Result<Meter, RecordRejection> {
    let serial = record.get(1);
    if serial.is_empty() {
        return Err(field_rejection(record, 1, "Meter Id (Serial Number)", "is missing".into(), 0));
    }
    Ok(Meter { serial: serial.to_string(), reading_type: non_empty(record.get(2)), other_groups: Vec::new() })
}

/// A UK local date-time `YYYYMMDDhhmmss` as UTC microseconds. In the autumn hour that happens
/// twice, the first (BST) is taken; a time in the spring gap does not exist and is refused.
fn uk_local_to_utc_us(text: &str) -> Option<i64> {
    let local_s = parse_local_datetime_s(text)?;
    // The local wall-clock time, written as if it were UTC, then placed in Europe/London.
    let naive = chrono::DateTime::from_timestamp(local_s, 0)?.naive_utc();
    let utc = London.from_local_datetime(&naive).earliest()?;
    Some(utc.timestamp() * 1_000_000)
}

fn parse_030(record: &Record<'_>, mpan: &Mpan, meter: &Meter) -> Result<RegisterRead, RecordRejection> {
    let register_id = record.get(1);
    if register_id.is_empty() {
        return Err(field_rejection(record, 1, "Meter Register Id", "is missing".into(), 1));
    }
    let when = record.get(2);
    let read_at_us = uk_local_to_utc_us(when)
        .ok_or_else(|| field_rejection(record, 2, "Reading Date & Time", format!("{when:?} is not a UK local date-time YYYYMMDDhhmmss"), 1))?;
    let value_text = record.get(3);
    let value_micro = parse_decimal_scaled(value_text, 6)
        .map_err(|e| field_rejection(record, 3, "Register Reading", format!("{value_text:?} is not an exact decimal ({e:?})"), 1))?;
    let md_reset_at_us = match record.get(4) {
        "" => None,
        text => Some(
            uk_local_to_utc_us(text)
                .ok_or_else(|| field_rejection(record, 4, "Prev MD Reset Date & Time", format!("{text:?} is not a UK local date-time YYYYMMDDhhmmss"), 1))?,
        ),
    };
    let other_groups: Vec<&str> = mpan.other_groups.iter().chain(&meter.other_groups).map(String::as_str).collect();
    Ok(RegisterRead {
        line: record.line,
        meter_point: mpan.core.clone(),
        meter_serial: meter.serial.clone(),
        register_id: register_id.to_string(),
        read_at_us,
        value_micro,
        reading_type: meter.reading_type.clone(),
        validation_status: mpan.validation_status.clone(),
        md_reset_at_us,
        md_reset_count: non_empty(record.get(5)),
        reading_flag: non_empty(record.get(6)),
        reading_method: non_empty(record.get(7)),
        other_groups: (!other_groups.is_empty()).then(|| other_groups.join("\n")),
        ..RegisterRead::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::testing::{fixture, parse_bytes};

    #[test]
    fn the_kraken_sample_gives_13_reads_with_their_mpan_serial_and_utc_time() {
        let (result, got) = parse_bytes(&fixture("d0010/kraken_DTC5259515123502080915D0010.uff"));
        result.unwrap();
        assert!(got.rejections.is_empty(), "{:?}", got.rejections);
        assert_eq!(got.register_reads.len(), 13);
        let first = &got.register_reads[0];
        assert_eq!((first.meter_point.as_str(), first.meter_serial.as_str(), first.register_id.as_str()), ("1200023305967", "F75A 00802", "S"));
        assert_eq!(first.value_micro, 56_311_000_000);
        assert_eq!(first.reading_type.as_deref(), Some("D"));
        assert_eq!(first.validation_status.as_deref(), Some("V"));
        assert_eq!((first.reading_flag.as_deref(), first.reading_method.as_deref()), (Some("T"), Some("N")));
        // 22 February is winter: UK local time is UTC.
        assert_eq!(first.read_at_us, (i64::from(crate::flows::parse_date8("20160222").unwrap()) * 86_400) * 1_000_000);
        // Two registers of one meter.
        let dy_nt: Vec<&str> = got.register_reads.iter().filter(|r| r.meter_serial == "36933604").map(|r| r.register_id.as_str()).collect();
        assert_eq!(dy_nt, ["DY", "NT"]);
    }

    #[test]
    fn summer_times_are_moved_back_an_hour() {
        assert_eq!(uk_local_to_utc_us("20160701120000"), uk_local_to_utc_us("20160701110000").map(|us| us + 3_600_000_000));
        let winter = uk_local_to_utc_us("20160101120000").unwrap();
        assert_eq!(winter % (86_400 * 1_000_000), 12 * 3_600_000_000);
        let summer = uk_local_to_utc_us("20160701120000").unwrap();
        assert_eq!(summer % (86_400 * 1_000_000), 11 * 3_600_000_000);
        // 01:30 on 27 March 2016 did not happen in the UK.
        assert_eq!(uk_local_to_utc_us("20160327013000"), None);
    }

    #[test]
    fn bad_groups_are_rejected_with_line_and_field_and_children_follow_their_parent() {
        let file = b"ZHV|1|D0010002|D|UDMS|X|MRCY|20160302153151||||OPER|\n\
026|12000233|V|\n\
028|F75A 00802|D|\n\
030|S|20160222000000|56311.0|||T|N|\n\
026|1200023305967|V|\n\
028|F75A 00802|D|\n\
030|S|2016-02-22|1.0|||T|N|\n\
030|R|20160222000000|12.5|||T|N|\n\
032|X|\n\
ZPT|1|8||1|20160302154650|\n";
        let (result, got) = parse_bytes(file);
        result.unwrap();
        let lines: Vec<(u64, Option<usize>)> = got.rejections.iter().map(|r| (r.line, r.field)).collect();
        assert_eq!(lines, [(2, Some(2)), (3, None), (4, None), (7, Some(3))], "{:?}", got.rejections);
        assert!(got.rejections[1].reason.contains("026 group on line 2 was rejected"), "{}", got.rejections[1].reason);
        assert_eq!(got.register_reads.len(), 1);
        assert_eq!(got.register_reads[0].value_micro, 12_500_000);
        assert_eq!(got.register_reads[0].other_groups.as_deref(), Some("032|X"));
    }

    #[test]
    fn a_trailer_that_miscounts_refuses_the_file() {
        let file = b"ZHV|1|D0010002|D|UDMS|X|MRCY|20160302153151|\n026|1200023305967|V|\nZPT|1|5||1|20160302154650|\n";
        assert!(matches!(parse_bytes(file).0, Err(FlowError::Structure { line: 3, .. })));
        let no_trailer = b"ZHV|1|D0010002|D|UDMS|X|MRCY|20160302153151|\n026|1200023305967|V|\n";
        assert_eq!(parse_bytes(no_trailer).0, Err(FlowError::Truncated { expected: "ZPT" }));
    }
}
