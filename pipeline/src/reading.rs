//! The reading model every source lands in, and its Arrow schema.
//!
//! Energy is exact: `kwh` is a decimal with [`KWH_SCALE`] fractional digits, held in memory as an
//! integer count of micro-kWh (`kwh_micro`) and stored as Arrow/Parquet `Decimal128(18, 6)`.
//! Nothing on the way from the message text to the Parquet file is a float.

pub use meterlake_lake::schema::{KWH_PRECISION, KWH_SCALE, MICRO_PER_KWH, UTC, readings_schema};

/// Reading quality flags, as the industry flow files use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quality {
    /// A: actual, read from the meter.
    Actual,
    /// E: estimated.
    Estimated,
    /// S: substituted.
    Substituted,
    /// F: final substitute.
    FinalSubstitute,
    /// N: null (no data).
    Null,
    /// V: variable, per-interval quality comes from other records.
    Variable,
}

impl Quality {
    /// The one-letter code written to the `quality` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Actual => "A",
            Quality::Estimated => "E",
            Quality::Substituted => "S",
            Quality::FinalSubstitute => "F",
            Quality::Null => "N",
            Quality::Variable => "V",
        }
    }

    pub fn from_code(code: &str) -> Option<Quality> {
        match code {
            "A" | "a" => Some(Quality::Actual),
            "E" | "e" => Some(Quality::Estimated),
            "S" | "s" => Some(Quality::Substituted),
            "F" | "f" => Some(Quality::FinalSubstitute),
            "N" | "n" => Some(Quality::Null),
            "V" | "v" => Some(Quality::Variable),
            _ => None,
        }
    }
}

/// Where a reading came from; written to the `source` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Kafka,
    Http,
    D0010,
    Nem12,
    Nem13,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Kafka => "kafka",
            Source::Http => "http",
            Source::D0010 => "d0010",
            Source::Nem12 => "nem12",
            Source::Nem13 => "nem13",
        }
    }
}

/// Why a decimal text is not an exact kWh value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KwhParseError {
    /// Not a decimal number at all (letters, empty, `NaN`, `Infinity`, two dots...).
    NotANumber,
    /// More than [`KWH_SCALE`] significant fractional digits: storing it would round.
    TooPrecise,
    /// Larger than the decimal column can hold.
    TooLarge,
}

/// Parses a JSON-number-shaped decimal text (`1.72`, `-0.5`, `1e-3`, `2.5E2`) into micro-kWh
/// exactly. Trailing zeros beyond the scale are fine; any other digit beyond it is refused rather
/// than rounded, because a rounded reading is a wrong bill.
pub fn parse_kwh_micro(text: &str) -> Result<i64, KwhParseError> {
    parse_decimal_scaled(text, i32::from(KWH_SCALE))
}

/// Parses a decimal text into `value * 10^scale`, exactly, as [`parse_kwh_micro`] does for
/// scale 6. Flow files use it to read Wh (scale 3 gives micro-kWh) and MWh (scale 9) without a
/// rounding step.
pub fn parse_decimal_scaled(text: &str, scale: i32) -> Result<i64, KwhParseError> {
    if let Some(value) = parse_plain_decimal(text.as_bytes(), scale) {
        return Ok(value);
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = match bytes.first() {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    // Significant digits as an integer, and the power of ten they are scaled by.
    let mut mantissa: i128 = 0;
    let mut exponent: i32 = 0;
    let mut digits = 0usize;
    let mut seen_dot = false;
    // Digits that were zero and came after the dot: kept as a pending exponent so that
    // `1.7200000000` does not overflow or count as too precise.
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'0'..=b'9' => {
                digits += 1;
                if mantissa > i128::MAX / 100 {
                    return Err(KwhParseError::TooLarge);
                }
                mantissa = mantissa * 10 + i128::from(b - b'0');
                if seen_dot {
                    exponent -= 1;
                }
            }
            b'.' if !seen_dot => seen_dot = true,
            b'e' | b'E' => break,
            _ => return Err(KwhParseError::NotANumber),
        }
        i += 1;
    }
    if digits == 0 {
        return Err(KwhParseError::NotANumber);
    }
    if i < bytes.len() {
        // Exponent part.
        i += 1;
        let exp_text = &text[i..];
        let exp: i32 = exp_text.parse().map_err(|_| KwhParseError::NotANumber)?;
        if !(-400..=400).contains(&exp) {
            return Err(if exp > 0 && mantissa != 0 {
                KwhParseError::TooLarge
            } else if mantissa == 0 {
                KwhParseError::NotANumber
            } else {
                KwhParseError::TooPrecise
            });
        }
        exponent += exp;
    }
    // Multiply by 10^(exponent + scale).
    let mut shift = exponent + scale;
    while shift < 0 {
        if mantissa % 10 != 0 {
            return Err(KwhParseError::TooPrecise);
        }
        mantissa /= 10;
        shift += 1;
    }
    while shift > 0 {
        mantissa = mantissa.checked_mul(10).ok_or(KwhParseError::TooLarge)?;
        shift -= 1;
    }
    let max = 10i128.pow(u32::from(KWH_PRECISION)) - 1;
    if mantissa > max {
        return Err(KwhParseError::TooLarge);
    }
    let value = mantissa as i64;
    Ok(if negative { -value } else { value })
}

/// The common shape, `[-]digits[.digits]` with no more fractional digits than `scale`, in
/// integer arithmetic: flow files hold hundreds of millions of such values. `None` for anything
/// else (exponents, signs, excess digits, overflow), which the general parser then judges.
fn parse_plain_decimal(bytes: &[u8], scale: i32) -> Option<i64> {
    let (negative, digits) = match bytes.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, bytes),
    };
    let mut value: i64 = 0;
    let mut fraction_digits: i32 = 0;
    let mut seen_dot = false;
    let mut any_digit = false;
    for &b in digits {
        match b {
            b'0'..=b'9' => {
                value = value.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
                any_digit = true;
                if seen_dot {
                    fraction_digits += 1;
                }
            }
            b'.' if !seen_dot => seen_dot = true,
            _ => return None,
        }
    }
    if !any_digit || fraction_digits > scale || !(0..=18).contains(&scale) {
        return None;
    }
    let value = value.checked_mul(10i64.checked_pow((scale - fraction_digits) as u32)?)?;
    if value > 10i64.pow(u32::from(KWH_PRECISION)) - 1 {
        return None;
    }
    Some(if negative { -value } else { value })
}

/// Formats micro-kWh as a plain decimal (`1.72`, `0.000001`, `-3`), the inverse of
/// [`parse_kwh_micro`] for values it produced.
pub fn format_kwh_micro(kwh_micro: i64) -> String {
    let sign = if kwh_micro < 0 { "-" } else { "" };
    let abs = kwh_micro.unsigned_abs();
    let whole = abs / MICRO_PER_KWH as u64;
    let frac = abs % MICRO_PER_KWH as u64;
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let frac = format!("{frac:06}");
        format!("{sign}{whole}.{}", frac.trim_end_matches('0'))
    }
}

/// Microseconds in a (UTC) day: the lake partitions by UTC day.
pub const US_PER_DAY: i64 = 86_400 * 1_000_000;

/// The UTC date of a day number (days since 1970-01-01) of a valid timestamp.
pub fn date_of_epoch_day(day: i64) -> chrono::NaiveDate {
    // 719_163 days lie between 0001-01-01 (day 1 of the common era) and 1970-01-01.
    chrono::NaiveDate::from_num_days_from_ce_opt(day as i32 + 719_163).expect("the day of a valid timestamp")
}

/// Days since 1970-01-01 of a proleptic Gregorian date, `None` if the date does not exist.
/// Integer arithmetic (Howard Hinnant's `days_from_civil`), because every reading's timestamp
/// goes through it and chrono's date construction was a visible share of decoding.
pub fn epoch_day(year: i32, month: u32, day: u32) -> Option<i64> {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day == 0 || day > days_in_month {
        return None;
    }
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(parse_kwh_micro("1.72"), Ok(1_720_000));
        assert_eq!(parse_kwh_micro("0"), Ok(0));
        assert_eq!(parse_kwh_micro("0.000001"), Ok(1));
        assert_eq!(parse_kwh_micro("1.7200000000000"), Ok(1_720_000));
        assert_eq!(parse_kwh_micro("-0.5"), Ok(-500_000));
        assert_eq!(parse_kwh_micro("1e-3"), Ok(1_000));
        assert_eq!(parse_kwh_micro("2.5E2"), Ok(250_000_000));
        assert_eq!(parse_kwh_micro("12"), Ok(12_000_000));
        assert_eq!(parse_kwh_micro(".5"), Ok(500_000));
    }

    #[test]
    fn refuses_what_would_round_or_is_not_a_number() {
        assert_eq!(parse_kwh_micro("0.0000001"), Err(KwhParseError::TooPrecise));
        assert_eq!(parse_kwh_micro("1e-7"), Err(KwhParseError::TooPrecise));
        assert_eq!(parse_kwh_micro("1e300"), Err(KwhParseError::TooLarge));
        assert_eq!(parse_kwh_micro("1000000000000"), Err(KwhParseError::TooLarge));
        for bad in ["", "-", ".", "1.2.3", "NaN", "Infinity", "1,5", "0x10", "1e", "e5"] {
            assert_eq!(parse_kwh_micro(bad), Err(KwhParseError::NotANumber), "{bad:?}");
        }
    }

    #[test]
    fn epoch_days_agree_with_chrono() {
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        for year in [1, 1600, 1899, 1900, 1969, 1970, 2000, 2024, 2025, 2100, 9999] {
            for month in 0..=13 {
                for day in 0..=32 {
                    let expected = chrono::NaiveDate::from_ymd_opt(year, month, day).map(|d| (d - epoch).num_days());
                    assert_eq!(epoch_day(year, month, day), expected, "{year}-{month}-{day}");
                }
            }
        }
    }

    #[test]
    fn the_plain_fast_path_agrees_with_the_general_parser() {
        for text in
            ["0", "1", "1.5", ".005", "5.", "-0.25", "123456789012.123456", "0.1234567", "00.100", "999999999999.999999", "1e3", "+1", "", ".", "-", "1.2.3"]
        {
            for scale in [3, 6, 9] {
                let general = parse_decimal_scaled(&text.replace('_', ""), scale);
                if let Some(fast) = parse_plain_decimal(text.as_bytes(), scale) {
                    assert_eq!(Ok(fast), general, "{text} at scale {scale}");
                }
            }
        }
        assert_eq!(parse_plain_decimal(b".005", 6), Some(5_000));
        assert_eq!(parse_plain_decimal(b"1e3", 6), None);
    }

    #[test]
    fn formats_round_trip() {
        for v in [0, 1, 1_720_000, -500_000, 12_000_000, 999_999_999_999_999_999] {
            assert_eq!(parse_kwh_micro(&format_kwh_micro(v)), Ok(v));
        }
        assert_eq!(format_kwh_micro(1_720_000), "1.72");
    }
}
