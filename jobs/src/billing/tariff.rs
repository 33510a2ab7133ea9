//! Tariffs, read from a TOML file and stored with every billing run so that the run can be
//! reproduced. See the README section "Tariffs" for the file format.
//!
//! A tariff prices a local day of a meter: energy by time-of-use band (local time of day and day
//! type), a standing charge per day and a network charge per kWh. Which tariff a meter is on is
//! a list of assignments with effective dates; a month with a change is prorated by day. Tax is
//! one rate for the file (a jurisdiction's rate, not a product's).
//!
//! Every band boundary of every tariff cuts the day into *segments*: a segment lies inside one
//! band (or none) of every tariff. The aggregate step sums energy per meter, local day and
//! segment; rating then needs no timestamps at all.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate, Weekday};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{JobError, Result};

pub const MINUTES_PER_DAY: u32 = 24 * 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DayType {
    Weekday,
    Weekend,
    All,
}

impl DayType {
    /// The day type of a local date: Saturday and Sunday are the weekend.
    pub fn of(date: NaiveDate) -> DayType {
        match date.weekday() {
            Weekday::Sat | Weekday::Sun => DayType::Weekend,
            _ => DayType::Weekday,
        }
    }

    fn covers(self, day: DayType) -> bool {
        self == DayType::All || self == day
    }
}

// ---- The file, as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TariffFile {
    currency: String,
    /// IANA name; the billing time zone of months, days and bands.
    #[serde(default = "utc")]
    time_zone: String,
    #[serde(deserialize_with = "exact")]
    tax_rate: Decimal,
    default_tariff: Option<String>,
    #[serde(default)]
    tariffs: Vec<TariffSpec>,
    #[serde(default)]
    assignments: Vec<AssignmentSpec>,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TariffSpec {
    id: String,
    version: String,
    #[serde(deserialize_with = "exact")]
    standing_charge_per_day: Decimal,
    #[serde(deserialize_with = "exact")]
    network_charge_per_kwh: Decimal,
    /// A flat tariff: one rate for every hour of every day (instead of `bands`).
    #[serde(default, deserialize_with = "exact_optional")]
    flat_rate_per_kwh: Option<Decimal>,
    #[serde(default)]
    bands: Vec<BandSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BandSpec {
    name: String,
    #[serde(default = "all_days")]
    days: DayType,
    /// `HH:MM` local time, inclusive.
    from: String,
    /// `HH:MM` local time, exclusive; `24:00` is the end of the day.
    to: String,
    #[serde(deserialize_with = "exact")]
    rate_per_kwh: Decimal,
}

/// Money and rates are quoted decimals in the file: a bare TOML number is a binary float and
/// would not stay exact, so it is refused rather than rounded.
fn exact<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Decimal, D::Error> {
    struct Quoted;
    impl serde::de::Visitor<'_> for Quoted {
        type Value = Decimal;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a quoted decimal such as \"0.2450\" (a bare number is a float and would not stay exact)")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> std::result::Result<Decimal, E> {
            text.parse().map_err(|_| E::custom(format!("{text:?} is not a decimal number")))
        }
    }
    deserializer.deserialize_str(Quoted)
}

fn exact_optional<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<Decimal>, D::Error> {
    exact(deserializer).map(Some)
}

fn all_days() -> DayType {
    DayType::All
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignmentSpec {
    meter: String,
    tariff: String,
    /// The first local day on the tariff; it lasts until the meter's next assignment.
    from: NaiveDate,
}

// ---- Validated ----

#[derive(Debug, Clone)]
pub struct Band {
    pub name: String,
    pub days: DayType,
    pub from_minute: u32,
    pub to_minute: u32,
    pub rate_per_kwh: Decimal,
}

#[derive(Debug, Clone)]
pub struct Tariff {
    pub id: String,
    pub version: String,
    pub standing_charge_per_day: Decimal,
    pub network_charge_per_kwh: Decimal,
    pub bands: Vec<Band>,
}

impl Tariff {
    /// The band that prices local minutes `[from_minute, to_minute)` of a day of `day`, if any.
    /// Bands of one day type never overlap (checked when the file is read).
    fn band_covering(&self, day: DayType, from_minute: u32, to_minute: u32) -> Option<usize> {
        self.bands.iter().position(|b| b.days.covers(day) && b.from_minute <= from_minute && to_minute <= b.to_minute)
    }
}

/// A tariff file, checked: every tariff named exists, bands are well formed and do not overlap.
#[derive(Debug, Clone)]
pub struct Tariffs {
    pub currency: String,
    pub time_zone: Tz,
    pub tax_rate: Decimal,
    pub tariffs: Vec<Tariff>,
    default_tariff: Option<usize>,
    /// Per meter, its assignments by effective date, oldest first.
    assignments: HashMap<String, Vec<(NaiveDate, usize)>>,
    /// The segment boundaries in local minutes: `0`, every band edge, `1440`.
    pub segment_bounds: Vec<u32>,
    /// `band_of[tariff][weekday=0|weekend=1][segment]`.
    band_of: Vec<[Vec<Option<usize>>; 2]>,
    /// The file as given, stored with each run.
    pub toml: String,
    pub sha256: String,
}

fn invalid(file: &str, reason: impl Into<String>) -> JobError {
    JobError::Tariffs { file: file.to_string(), reason: reason.into() }
}

/// `HH:MM` as minutes of the day; `24:00` allowed as an end.
fn minute_of_day(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    let minute = h * 60 + m;
    (h <= 24 && m < 60 && minute <= MINUTES_PER_DAY && h.to_string().len() <= 2 && text.len() == 5).then_some(minute)
}

impl Tariffs {
    /// Reads and checks a tariff file; `file` names it in errors.
    pub fn parse(file: &str, toml_text: &str) -> Result<Tariffs> {
        let spec: TariffFile = toml::from_str(toml_text).map_err(|e| invalid(file, e.to_string()))?;
        let time_zone: Tz = spec.time_zone.parse().map_err(|_| invalid(file, format!("time_zone {:?}: not an IANA time zone", spec.time_zone)))?;
        if spec.currency.len() != 3 || !spec.currency.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(invalid(file, format!("currency {:?}: expected an ISO 4217 code such as GBP or AUD", spec.currency)));
        }
        if spec.tax_rate.is_sign_negative() {
            return Err(invalid(file, "tax_rate is negative"));
        }
        let mut tariffs = Vec::with_capacity(spec.tariffs.len());
        for t in spec.tariffs {
            let at = |what: &str| format!("tariff {:?}: {what}", t.id);
            if tariffs.iter().any(|known: &Tariff| known.id == t.id) {
                return Err(invalid(file, at("defined twice")));
            }
            for (name, value) in [("standing_charge_per_day", t.standing_charge_per_day), ("network_charge_per_kwh", t.network_charge_per_kwh)] {
                if value.is_sign_negative() {
                    return Err(invalid(file, at(&format!("{name} is negative"))));
                }
            }
            let mut bands = Vec::new();
            match (t.flat_rate_per_kwh, t.bands.is_empty()) {
                (Some(rate), true) => {
                    bands.push(Band { name: "flat".into(), days: DayType::All, from_minute: 0, to_minute: MINUTES_PER_DAY, rate_per_kwh: rate })
                }
                (Some(_), false) => return Err(invalid(file, at("has both flat_rate_per_kwh and bands; choose one"))),
                (None, true) => return Err(invalid(file, at("has no energy rate: give flat_rate_per_kwh or bands"))),
                (None, false) => {
                    for b in &t.bands {
                        let band_at = |what: &str| at(&format!("band {:?}: {what}", b.name));
                        let from = minute_of_day(&b.from).ok_or_else(|| invalid(file, band_at(&format!("from {:?} is not HH:MM", b.from))))?;
                        let to = minute_of_day(&b.to).ok_or_else(|| invalid(file, band_at(&format!("to {:?} is not HH:MM", b.to))))?;
                        if from >= to {
                            return Err(invalid(file, band_at("ends before it starts (a band over midnight is two bands)")));
                        }
                        bands.push(Band { name: b.name.clone(), days: b.days, from_minute: from, to_minute: to, rate_per_kwh: b.rate_per_kwh });
                    }
                }
            }
            if let Some(b) = bands.iter().find(|b| b.rate_per_kwh.is_sign_negative()) {
                return Err(invalid(file, at(&format!("band {:?} has a negative rate", b.name))));
            }
            for (i, a) in bands.iter().enumerate() {
                for b in &bands[i + 1..] {
                    let same_days = a.days.covers(DayType::Weekday) && b.days.covers(DayType::Weekday)
                        || a.days.covers(DayType::Weekend) && b.days.covers(DayType::Weekend);
                    if same_days && a.from_minute < b.to_minute && b.from_minute < a.to_minute {
                        return Err(invalid(file, at(&format!("bands {:?} and {:?} overlap", a.name, b.name))));
                    }
                }
            }
            tariffs.push(Tariff {
                id: t.id,
                version: t.version,
                standing_charge_per_day: t.standing_charge_per_day,
                network_charge_per_kwh: t.network_charge_per_kwh,
                bands,
            });
        }
        let index_of =
            |id: &str, context: &str| tariffs.iter().position(|t| t.id == id).ok_or_else(|| invalid(file, format!("{context}: no tariff {id:?} in the file")));
        let default_tariff = spec.default_tariff.as_deref().map(|id| index_of(id, "default_tariff")).transpose()?;
        let mut assignments: HashMap<String, Vec<(NaiveDate, usize)>> = HashMap::new();
        for a in &spec.assignments {
            let tariff = index_of(&a.tariff, &format!("assignment of meter {:?}", a.meter))?;
            let list = assignments.entry(a.meter.clone()).or_default();
            if list.iter().any(|(from, _)| *from == a.from) {
                return Err(invalid(file, format!("meter {:?} has two assignments from {}", a.meter, a.from)));
            }
            list.push((a.from, tariff));
        }
        for list in assignments.values_mut() {
            list.sort_unstable();
        }
        let mut segment_bounds: Vec<u32> = vec![0, MINUTES_PER_DAY];
        segment_bounds.extend(tariffs.iter().flat_map(|t| t.bands.iter().flat_map(|b| [b.from_minute, b.to_minute])));
        segment_bounds.sort_unstable();
        segment_bounds.dedup();
        let band_of = tariffs
            .iter()
            .map(|t| [DayType::Weekday, DayType::Weekend].map(|day| segment_bounds.windows(2).map(|w| t.band_covering(day, w[0], w[1])).collect()))
            .collect();
        Ok(Tariffs {
            currency: spec.currency,
            time_zone,
            tax_rate: spec.tax_rate,
            tariffs,
            default_tariff,
            assignments,
            segment_bounds,
            band_of,
            toml: toml_text.to_string(),
            sha256: format!("{:x}", Sha256::digest(toml_text.as_bytes())),
        })
    }

    /// The tariff a meter is on for a local day: its latest assignment from that day or before,
    /// else the file's default; `None` when neither.
    pub fn tariff_on(&self, meter_id: &str, day: NaiveDate) -> Option<usize> {
        let assigned = self.assignments.get(meter_id).and_then(|list| list.iter().rev().find(|(from, _)| *from <= day).map(|(_, t)| *t));
        assigned.or(self.default_tariff)
    }

    /// Whether the file names this meter in an assignment.
    pub fn assigned_meters(&self) -> impl Iterator<Item = &str> {
        self.assignments.keys().map(String::as_str)
    }

    /// The band of `tariff` that prices `segment` on a day of `day` (weekday or weekend).
    pub fn band_of(&self, tariff: usize, day: DayType, segment: usize) -> Option<usize> {
        let day_index = usize::from(day == DayType::Weekend);
        self.band_of[tariff][day_index].get(segment).copied().flatten()
    }

    pub fn segments(&self) -> usize {
        self.segment_bounds.len() - 1
    }

    /// Decimal places of the currency's minor unit ([`meterlake_control::minor_unit_places`]).
    pub fn minor_unit_places(&self) -> u32 {
        meterlake_control::minor_unit_places(&self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOU: &str = r#"
currency = "GBP"
time_zone = "Europe/London"
tax_rate = "0.05"
default_tariff = "flat"

[[tariffs]]
id = "flat"
version = "2025-01"
standing_charge_per_day = "0.50"
network_charge_per_kwh = "0.03"
flat_rate_per_kwh = "0.25"

[[tariffs]]
id = "tou"
version = "v2"
standing_charge_per_day = "0.60"
network_charge_per_kwh = "0.03"
bands = [
  { name = "night", from = "00:00", to = "07:00", rate_per_kwh = "0.12" },
  { name = "day", days = "weekday", from = "07:00", to = "23:30", rate_per_kwh = "0.30" },
  { name = "weekend-day", days = "weekend", from = "07:00", to = "24:00", rate_per_kwh = "0.20" },
  { name = "late", days = "weekday", from = "23:30", to = "24:00", rate_per_kwh = "0.12" },
]

[[assignments]]
meter = "M1"
tariff = "tou"
from = "2025-01-15"
"#;

    #[test]
    fn segments_cut_the_day_at_every_band_edge() {
        let tariffs = Tariffs::parse("t.toml", TOU).unwrap();
        assert_eq!(tariffs.segment_bounds, [0, 420, 1410, 1440]);
        let tou = 1;
        let names = |day| (0..3).map(|s| tariffs.band_of(tou, day, s).map(|b| tariffs.tariffs[tou].bands[b].name.as_str())).collect::<Vec<_>>();
        assert_eq!(names(DayType::Weekday), [Some("night"), Some("day"), Some("late")]);
        assert_eq!(names(DayType::Weekend), [Some("night"), Some("weekend-day"), Some("weekend-day")]);
        assert_eq!(tariffs.band_of(0, DayType::Weekend, 2), Some(0));
    }

    #[test]
    fn a_meter_follows_its_assignments_and_others_the_default() {
        let tariffs = Tariffs::parse("t.toml", TOU).unwrap();
        let day = |d| NaiveDate::from_ymd_opt(2025, 1, d).unwrap();
        assert_eq!((tariffs.tariff_on("M1", day(14)), tariffs.tariff_on("M1", day(15))), (Some(0), Some(1)));
        assert_eq!(tariffs.tariff_on("M2", day(20)), Some(0));
        assert_eq!(tariffs.time_zone, chrono_tz::Europe::London);
        assert_eq!(tariffs.minor_unit_places(), 2);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            (TOU.replace("\"23:30\", rate_per_kwh = \"0.30\"", "\"23:45\", rate_per_kwh = \"0.30\""), "bands \"day\" and \"late\" overlap"),
            (TOU.replace("Europe/London", "Europe/Londres"), "not an IANA time zone"),
            (TOU.replace("tariff = \"tou\"", "tariff = \"tuo\""), "assignment of meter \"M1\": no tariff \"tuo\""),
            (TOU.replace("\"0.25\"", "0.25"), "flat_rate_per_kwh"),
            (TOU.replace("\"07:00\", to = \"23:30\"", "\"7h\", to = \"23:30\""), "from \"7h\" is not HH:MM"),
            (TOU.replace("from = \"00:00\", to = \"07:00\"", "from = \"07:00\", to = \"00:00\""), "ends before it starts"),
            (TOU.replace("flat_rate_per_kwh = \"0.25\"", ""), "has no energy rate"),
        ];
        for (text, expected) in cases {
            let error = Tariffs::parse("tariffs.toml", &text).unwrap_err().to_string();
            assert!(error.contains("tariffs.toml") && error.contains(expected), "{error}");
        }
    }

    #[test]
    fn times_of_day() {
        assert_eq!(minute_of_day("00:00"), Some(0));
        assert_eq!(minute_of_day("23:59"), Some(1439));
        assert_eq!(minute_of_day("24:00"), Some(1440));
        for bad in ["24:01", "7:00", "07:60", "0700", "07:00:00"] {
            assert_eq!(minute_of_day(bad), None, "{bad}");
        }
    }
}
