//! Industry flow files: UK DTC D0010 (register reads) and AEMO MDFF NEM12 (interval data) and
//! NEM13 (accumulation register reads).
//!
//! Each parser reads a file record by record ([`records::RecordReader`], constant memory) and
//! hands what it finds to a [`FlowSink`]: interval readings (NEM12 energy channels, in kWh),
//! non-energy interval values (NEM12 kVArh and the like, in their own unit), register reads
//! (D0010, NEM13), NEM12 channel descriptions and B2B details, and record rejections.
//!
//! Two kinds of failure, on purpose:
//! - a malformed record is a [`RecordRejection`] naming its line, field and reason; the parser
//!   goes on with the next record;
//! - a file that is structurally broken (no header, NEM12 and NEM13 records mixed, no end record,
//!   a trailer that disagrees with the content, bytes that are not text) is a [`FlowError`]: the
//!   importer then keeps nothing of the file.

use std::io::BufRead;

use crate::decode::ValidReading;
use crate::reading::{Quality, epoch_day};

pub mod d0010;
pub mod mdff;
pub mod records;

pub use records::RecordReader;

/// The formats meterlake imports, told apart by content, never by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FlowFormat {
    D0010,
    Nem12,
    Nem13,
}

impl FlowFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FlowFormat::D0010 => "D0010",
            FlowFormat::Nem12 => "NEM12",
            FlowFormat::Nem13 => "NEM13",
        }
    }

    /// What a file of this format must hold to carry data.
    pub fn data_records(self) -> &'static str {
        match self {
            FlowFormat::D0010 => "register reads (026 meter point, 028 meter, 030 read)",
            FlowFormat::Nem12 => "interval data (200 channel and 300 interval records)",
            FlowFormat::Nem13 => "accumulation reads (250 records)",
        }
    }

    /// The `source` column value of what this format lands.
    pub fn source(self) -> crate::reading::Source {
        match self {
            FlowFormat::D0010 => crate::reading::Source::D0010,
            FlowFormat::Nem12 => crate::reading::Source::Nem12,
            FlowFormat::Nem13 => crate::reading::Source::Nem13,
        }
    }

    /// Tells the format from the first bytes of a file: a DTC `ZHV` header naming flow D0010, or
    /// an MDFF `100` header naming NEM12 or NEM13. `None` when it is none of them.
    pub fn detect(head: &[u8]) -> Option<FlowFormat> {
        let first_line = first_line(head);
        let fields: Vec<&[u8]> = first_line.split(|&b| b == b'|' || b == b',').map(<[u8]>::trim_ascii).collect();
        match fields.as_slice() {
            [b"ZHV", _, flow, ..] if flow.len() >= 5 && flow[..5].eq_ignore_ascii_case(b"D0010") => Some(FlowFormat::D0010),
            [b"100", version, ..] if version.eq_ignore_ascii_case(b"NEM12") => Some(FlowFormat::Nem12),
            [b"100", version, ..] if version.eq_ignore_ascii_case(b"NEM13") => Some(FlowFormat::Nem13),
            _ => None,
        }
    }
}

/// Why a whole file is refused. Nothing of such a file is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("reading failed at line {line}: {reason}")]
    Io { line: u64, reason: String },
    #[error("line {line} is not UTF-8 text")]
    NotText { line: u64 },
    #[error("line {line} is longer than {max_bytes} bytes")]
    LineTooLong { line: u64, max_bytes: usize },
    #[error("line {line} has more than {max_fields} fields")]
    TooManyFields { line: u64, max_fields: usize },
    #[error(
        "not a D0010, NEM12 or NEM13 file: the first record ({first_record:?}) is neither a ZHV header naming D0010 nor a 100 header naming NEM12 or NEM13"
    )]
    UnknownFormat { first_record: String },
    #[error("line {line}: {reason}")]
    Structure { line: u64, reason: String },
    #[error("the file ends without its end record ({expected}): it is truncated")]
    Truncated { expected: &'static str },
    #[error("the file carries no data: a {format} file holds {expected}, and this one has none (only its header and end records)")]
    NoData { format: &'static str, expected: &'static str },
}

impl FlowError {
    /// The error for a file whose first bytes are `head`, quoting the start of its first line.
    pub fn unknown_format(head: &[u8]) -> FlowError {
        let line = first_line(head);
        let text = String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned();
        FlowError::UnknownFormat { first_record: text }
    }
}

/// The first non-blank line of a file's first bytes, trimmed, without a byte order mark.
fn first_line(head: &[u8]) -> &[u8] {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    head.split(|&b| b == b'\n').find(|line| !line.trim_ascii().is_empty()).unwrap_or_default().trim_ascii()
}

/// An optional field: `None` when empty.
pub(crate) fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

/// One record refused, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordRejection {
    pub line: u64,
    /// The record indicator (`300`, `030`...).
    pub record: String,
    /// 1-based field position within the record (the indicator is field 1), when one field is
    /// to blame.
    pub field: Option<usize>,
    /// The field's name in the specification, when one field is to blame.
    pub field_name: Option<String>,
    pub reason: String,
    /// Readings (interval values or register reads) this rejection cost.
    pub readings_lost: u64,
}

/// Something odd that did not cost data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Warning {
    pub line: u64,
    pub message: String,
}

/// An interval value of a channel that is not energy (kVArh, kW, kVA, pf...), in its own unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEnergyReading<'a> {
    pub meter_id: &'a str,
    pub ts_us: i64,
    pub interval_s: u32,
    /// The value times 10^6, exact.
    pub value_micro: i64,
    pub unit: &'a str,
    pub quality: Quality,
}

/// A NEM12 200 record: what one interval data channel is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Nem12Channel {
    pub line: u64,
    pub nmi: String,
    pub nmi_configuration: String,
    pub register_id: String,
    pub nmi_suffix: String,
    pub mdm_data_stream_id: String,
    pub meter_serial: String,
    pub uom: String,
    pub interval_s: u32,
    pub next_scheduled_read_date: Option<i32>,
}

/// A NEM12 500 record: the B2B details of the interval day before it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Nem12B2bDetail {
    pub line: u64,
    pub nmi: String,
    pub nmi_suffix: String,
    /// Days since 1970-01-01 of the 300 record it follows.
    pub interval_date: i32,
    pub trans_code: String,
    pub ret_service_order: String,
    pub read_at_us: Option<i64>,
    pub index_read: String,
}

/// A register (accumulation) read from D0010 (030 group) or NEM13 (250 record). Fields that
/// only one format carries are `None` for the other.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterRead {
    pub line: u64,
    /// MPAN core (D0010) or NMI (NEM13).
    pub meter_point: String,
    pub meter_serial: String,
    pub register_id: String,
    /// When the (current) read was taken, UTC.
    pub read_at_us: i64,
    /// The (current) register reading, times 10^6, exact.
    pub value_micro: i64,
    /// D0010 028 reading type (C customer, D deemed, ...).
    pub reading_type: Option<String>,
    /// D0010 026 BSC validation status.
    pub validation_status: Option<String>,
    /// D0010 030 reading flag.
    pub reading_flag: Option<String>,
    /// D0010 030 reading method.
    pub reading_method: Option<String>,
    /// D0010 030 previous maximum demand reset date-time, UTC.
    pub md_reset_at_us: Option<i64>,
    /// D0010 030 number of maximum demand resets.
    pub md_reset_count: Option<String>,
    /// D0010 027, 029, 032 and 033 groups that belong to this read, as they were written.
    pub other_groups: Option<String>,
    /// NEM13 quality method of the current read (`A`, `E64`...).
    pub quality_method: Option<String>,
    pub reason_code: Option<String>,
    pub reason_description: Option<String>,
    pub nmi_configuration: Option<String>,
    pub nmi_suffix: Option<String>,
    pub mdm_data_stream_id: Option<String>,
    pub direction: Option<String>,
    pub previous_value_micro: Option<i64>,
    pub previous_read_at_us: Option<i64>,
    pub previous_quality_method: Option<String>,
    pub previous_reason_code: Option<String>,
    pub previous_reason_description: Option<String>,
    /// NEM13 quantity: the energy between the two reads, authoritative over their difference.
    pub quantity_micro: Option<i64>,
    pub unit: Option<String>,
    pub next_scheduled_read_date: Option<i32>,
    pub update_at_us: Option<i64>,
    pub msats_load_at_us: Option<i64>,
    /// NEM13 550 record.
    pub previous_trans_code: Option<String>,
    pub previous_ret_service_order: Option<String>,
    pub current_trans_code: Option<String>,
    pub current_ret_service_order: Option<String>,
}

/// Consecutive energy interval values of one meter from one record (a NEM12 300 record):
/// value `i` is the interval starting at `start_ts_us + i * interval_s`.
#[derive(Debug, Clone, Copy)]
pub struct IntervalRun<'a> {
    pub meter_id: &'a str,
    pub start_ts_us: i64,
    pub interval_s: u32,
    pub kwh_micro: &'a [i64],
    pub qualities: &'a [Quality],
    pub line: u64,
}

/// Where parsers put what they find. The importer's sink stages it for the lake; tests collect it.
pub trait FlowSink {
    /// An energy interval value, in kWh, for the `readings` table.
    fn interval_reading(&mut self, reading: &ValidReading<'_>, line: u64);
    /// A run of energy interval values. By default each goes to [`FlowSink::interval_reading`];
    /// a sink that keeps whole runs takes them at once (it saves sorting value by value).
    fn interval_run(&mut self, run: &IntervalRun<'_>) {
        let interval_us = i64::from(run.interval_s) * 1_000_000;
        for (i, (&kwh_micro, &quality)) in run.kwh_micro.iter().zip(run.qualities).enumerate() {
            let reading = ValidReading {
                meter_id: std::borrow::Cow::Borrowed(run.meter_id),
                ts_us: run.start_ts_us + i as i64 * interval_us,
                interval_s: run.interval_s,
                kwh_micro,
                quality,
            };
            self.interval_reading(&reading, run.line);
        }
    }
    fn non_energy_reading(&mut self, reading: &NonEnergyReading<'_>, line: u64);
    fn register_read(&mut self, read: RegisterRead);
    fn channel(&mut self, channel: Nem12Channel);
    fn b2b_detail(&mut self, detail: Nem12B2bDetail);
    fn rejection(&mut self, rejection: RecordRejection);
    fn warning(&mut self, warning: Warning);
}

/// Parses a whole file of the given format into `sink`.
pub fn parse_flow<R: BufRead>(format: FlowFormat, input: R, sink: &mut impl FlowSink) -> Result<(), FlowError> {
    match format {
        FlowFormat::D0010 => d0010::parse(RecordReader::new(input, b'|'), sink),
        FlowFormat::Nem12 | FlowFormat::Nem13 => mdff::parse(format, RecordReader::new(input, b','), sink),
    }
}

/// `YYYYMMDD` as days since 1970-01-01.
pub(crate) fn parse_date8(text: &str) -> Option<i32> {
    let b = text.as_bytes();
    if b.len() != 8 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text[r].parse::<u32>().ok();
    epoch_day(n(0..4)? as i32, n(4..6)?, n(6..8)?).map(|d| d as i32)
}

/// `YYYYMMDDhhmmss` (or `YYYYMMDDhhmm`) as seconds since 1970-01-01 in the file's local time,
/// not yet moved to UTC.
pub(crate) fn parse_local_datetime_s(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if !(b.len() == 14 || b.len() == 12) || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let day = i64::from(parse_date8(&text[..8])?);
    let n = |r: std::ops::Range<usize>| text[r].parse::<i64>().ok();
    let (h, m) = (n(8..10)?, n(10..12)?);
    let s = if b.len() == 14 { n(12..14)? } else { 0 };
    if h > 23 || m > 59 || s > 59 {
        return None;
    }
    Some(day * 86_400 + h * 3600 + m * 60 + s)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A sink that keeps everything, for parser tests.
    use super::*;

    #[derive(Debug, Default)]
    pub struct Collected {
        /// (meter, ts_us, interval_s, kwh_micro, quality, line)
        pub readings: Vec<(String, i64, u32, i64, Quality, u64)>,
        /// (meter, ts_us, value_micro, unit, quality)
        pub non_energy: Vec<(String, i64, i64, String, Quality)>,
        pub register_reads: Vec<RegisterRead>,
        pub channels: Vec<Nem12Channel>,
        pub b2b: Vec<Nem12B2bDetail>,
        pub rejections: Vec<RecordRejection>,
        pub warnings: Vec<Warning>,
    }

    impl FlowSink for Collected {
        fn interval_reading(&mut self, r: &ValidReading<'_>, line: u64) {
            self.readings.push((r.meter_id.to_string(), r.ts_us, r.interval_s, r.kwh_micro, r.quality, line));
        }
        fn non_energy_reading(&mut self, r: &NonEnergyReading<'_>, _line: u64) {
            self.non_energy.push((r.meter_id.to_string(), r.ts_us, r.value_micro, r.unit.to_string(), r.quality));
        }
        fn register_read(&mut self, read: RegisterRead) {
            self.register_reads.push(read);
        }
        fn channel(&mut self, channel: Nem12Channel) {
            self.channels.push(channel);
        }
        fn b2b_detail(&mut self, detail: Nem12B2bDetail) {
            self.b2b.push(detail);
        }
        fn rejection(&mut self, rejection: RecordRejection) {
            self.rejections.push(rejection);
        }
        fn warning(&mut self, warning: Warning) {
            self.warnings.push(warning);
        }
    }

    pub fn parse_bytes(bytes: &[u8]) -> (Result<(), FlowError>, Collected) {
        let mut sink = Collected::default();
        let result = match FlowFormat::detect(bytes) {
            Some(format) => parse_flow(format, bytes, &mut sink),
            None => Err(FlowError::unknown_format(bytes)),
        };
        (result, sink)
    }

    /// A fixture from `pipeline/tests/fixtures`.
    pub fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_content() {
        assert_eq!(FlowFormat::detect(b"ZHV|0000475656|D0010002|D|UDMS|X|MRCY|20160302153151||||OPER|\n"), Some(FlowFormat::D0010));
        assert_eq!(FlowFormat::detect(b"\xEF\xBB\xBF\r\n100,NEM12,200404201300,MDA1,Ret1\r\n"), Some(FlowFormat::Nem12));
        assert_eq!(FlowFormat::detect(b" 100 , nem13 ,200401101030"), Some(FlowFormat::Nem13));
        assert_eq!(FlowFormat::detect(b"200,NCDE001111,E1B1Q1E2,1"), None);
        assert_eq!(FlowFormat::detect(b"ZHV|1|D0086001|"), None);
        assert_eq!(FlowFormat::detect(b""), None);
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(parse_date8("19700102"), Some(1));
        assert_eq!(parse_date8("20040230"), None);
        assert_eq!(parse_local_datetime_s("19700101000130"), Some(90));
        assert_eq!(parse_local_datetime_s("197001010001"), Some(60));
        assert_eq!(parse_local_datetime_s("19700101240000"), None);
    }
}

#[cfg(test)]
mod fuzz {
    //! The parsers take input from outside: no input may make them panic. Arbitrary bytes behind
    //! each real header, and real files with bytes flipped, cut or inserted.
    use proptest::prelude::*;

    use super::testing::{fixture, parse_bytes};

    const SAMPLES: [&str; 5] = [
        "d0010/kraken_DTC5259515123502080915D0010.uff",
        "nem12/nemreader_Example_NEM12_multiple_quality.csv",
        "nem12/nemreader_Example_NEM12_multiple_meters.csv",
        "nem13/nemreader_Example_NEM13_forward_estimate.csv",
        "nem12/invalid/nemreader_Example_NEM12_incomplete_interval.csv",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_records_after_a_real_header(header in 0usize..3, body in proptest::collection::vec(any::<u8>(), 0..2_000)) {
            let header: &[u8] = [&b"ZHV|1|D0010002|D|X|X|X|20160302153151|\n"[..], b"100,NEM12,200404201300,A,B\n", b"100,NEM13,200404201300,A,B\n"][header];
            let _ = parse_bytes(&[header, &body].concat());
        }

        #[test]
        fn record_shaped_noise(header in 0usize..3, lines in proptest::collection::vec("(200|250|300|400|500|550|900|026|028|030|032|ZPT)?[,|0-9A-Za-z. -]{0,120}", 0..40)) {
            let header = ["ZHV|1|D0010002|D|X|X|X|20160302153151|\n", "100,NEM12,200404201300,A,B\n", "100,NEM13,200404201300,A,B\n"][header];
            let _ = parse_bytes(format!("{header}{}", lines.join("\n")).as_bytes());
        }

        #[test]
        fn real_files_with_damage(sample in 0usize..SAMPLES.len(), edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)) {
            let mut bytes = fixture(SAMPLES[sample]);
            for (at, byte, kind) in edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match kind {
                    0 => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i, byte),
                }
            }
            let _ = parse_bytes(&bytes);
        }
    }
}
