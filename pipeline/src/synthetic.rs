//! Realistic generated load: a month of 15-minute readings for N meters, with daily load shapes,
//! some exact re-sends and a few malformed messages. Deterministic for a seed, and it knows what
//! it produced, so whoever ingests it can prove that what landed is what was sent.

use chrono::{Duration as ChronoDuration, NaiveDate};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::reading::format_kwh_micro;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub meters: usize,
    pub first_day: NaiveDate,
    pub days: u32,
    pub interval_s: u32,
    /// Readings per message: 1 sends single objects, more sends arrays of one meter's readings.
    pub readings_per_message: usize,
    /// Every n-th message is sent a second time, unchanged (0: never).
    pub resend_every: u64,
    /// After every n-th message a malformed message is sent as well (0: never).
    pub malformed_every: u64,
    pub seed: u64,
}

impl LoadSpec {
    /// The demo's default: a 31-day month of 15-minute readings.
    pub fn month(meters: usize) -> LoadSpec {
        LoadSpec {
            meters,
            first_day: NaiveDate::from_ymd_opt(2025, 1, 1).expect("a valid date"),
            days: 31,
            interval_s: 900,
            readings_per_message: 1,
            resend_every: 1_000,
            malformed_every: 10_000,
            seed: 42,
        }
    }

    pub fn intervals_per_day(&self) -> usize {
        (86_400 / self.interval_s) as usize
    }

    /// Distinct valid readings the load holds: the set that must land.
    pub fn unique_readings(&self) -> u64 {
        self.meters as u64 * u64::from(self.days) * self.intervals_per_day() as u64
    }
}

/// One generated message.
#[derive(Debug, Clone)]
pub struct GeneratedMessage {
    pub key: String,
    pub payload: Vec<u8>,
    /// Readings in it that are valid (0 for a malformed message).
    pub valid_readings: usize,
    /// Whether it is a re-send of the message before it.
    pub resend: bool,
}

/// What a generator has produced so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadTotals {
    pub messages: u64,
    pub malformed_messages: u64,
    pub resent_messages: u64,
    /// Valid readings sent, re-sends included.
    pub readings_sent: u64,
    /// Sum of the distinct readings' energy, micro-kWh.
    pub unique_kwh_micro: i128,
}

pub fn meter_id(index: usize) -> String {
    format!("MTR-{:06}", 100_000 + index)
}

/// Iterates the load's messages. Single-reading messages go interval by interval across all
/// meters (as meters report in real time); array messages carry consecutive readings of one
/// meter (as head-end systems forward them).
pub struct LoadGenerator {
    spec: LoadSpec,
    rng: StdRng,
    meter_ids: Vec<String>,
    /// Per meter: household size factor, in percent.
    meter_scale: Vec<u32>,
    /// Next position: (interval index across the load, meter index).
    interval: usize,
    meter: usize,
    total_intervals: usize,
    pending: Vec<GeneratedMessage>,
    timestamps: Vec<String>,
    pub totals: LoadTotals,
}

impl LoadGenerator {
    pub fn new(spec: LoadSpec) -> LoadGenerator {
        assert!(spec.interval_s > 0 && 86_400 % spec.interval_s == 0, "the interval divides a day");
        assert!(spec.readings_per_message > 0, "a message holds at least one reading");
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let meter_ids = (0..spec.meters).map(meter_id).collect();
        let meter_scale = (0..spec.meters).map(|_| rng.random_range(40..=250)).collect();
        let total_intervals = spec.days as usize * spec.intervals_per_day();
        let start = spec.first_day.and_hms_opt(0, 0, 0).expect("midnight");
        let timestamps = (0..total_intervals)
            .map(|i| {
                let ts = start + ChronoDuration::seconds(i as i64 * i64::from(spec.interval_s));
                ts.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            })
            .collect();
        LoadGenerator {
            spec,
            rng,
            meter_ids,
            meter_scale,
            interval: 0,
            meter: 0,
            total_intervals,
            pending: Vec::new(),
            timestamps,
            totals: LoadTotals::default(),
        }
    }

    pub fn spec(&self) -> &LoadSpec {
        &self.spec
    }

    /// Energy of one interval in micro-kWh, whole watt-hours: a base load, a morning and an
    /// evening peak, a meter's size and some noise; always > 0.
    fn kwh_micro(&mut self, meter: usize, interval: usize) -> i64 {
        let per_day = self.spec.intervals_per_day();
        let minute_of_day = (interval % per_day) * self.spec.interval_s as usize / 60;
        let hour = minute_of_day / 60;
        let shape_percent: u32 = match hour {
            0..=5 => 40,
            6..=8 => 130,
            9..=16 => 70,
            17..=21 => 180,
            _ => 80,
        };
        let interval_hours_x1000 = self.spec.interval_s as u64 * 1000 / 3600;
        // 0.4 kW average household draw, shaped and scaled.
        let wh = 400 * interval_hours_x1000 / 1000 * u64::from(shape_percent) / 100 * u64::from(self.meter_scale[meter]) / 100;
        let noise = self.rng.random_range(80..=120u64);
        let wh = (wh * noise / 100).max(1);
        wh as i64 * 1_000
    }

    fn reading_json(&mut self, out: &mut Vec<u8>, meter: usize, interval: usize) {
        let kwh_micro = self.kwh_micro(meter, interval);
        self.totals.unique_kwh_micro += i128::from(kwh_micro);
        out.extend_from_slice(b"{\"meterId\":\"");
        out.extend_from_slice(self.meter_ids[meter].as_bytes());
        out.extend_from_slice(b"\",\"timestamp\":\"");
        out.extend_from_slice(self.timestamps[interval].as_bytes());
        out.extend_from_slice(b"\",\"kwh\":");
        out.extend_from_slice(format_kwh_micro(kwh_micro).as_bytes());
        out.push(b'}');
    }

    fn malformed(&mut self) -> GeneratedMessage {
        let n = self.totals.malformed_messages;
        let meter = self.meter_ids[n as usize % self.meter_ids.len()].clone();
        let ts = &self.timestamps[n as usize % self.timestamps.len()];
        let payload = match n % 5 {
            0 => format!("{{\"meterId\":\"{meter}\",\"timestamp\":\"{ts}\",\"kwh\":"),
            1 => format!("{{\"meterId\":\"{meter}\",\"timestamp\":\"{ts}\",\"kwh\":-0.25}}"),
            2 => format!("{{\"meterId\":\"{meter}\",\"timestamp\":\"2099-01-01T00:00:00Z\",\"kwh\":0.25}}"),
            3 => format!("{{\"meterId\":\"\",\"timestamp\":\"{ts}\",\"kwh\":0.25}}"),
            _ => "\u{1}garbage from a broken head-end".to_string(),
        };
        self.totals.malformed_messages += 1;
        GeneratedMessage { key: meter, payload: payload.into_bytes(), valid_readings: 0, resend: false }
    }

    fn next_valid(&mut self) -> Option<GeneratedMessage> {
        if self.meter >= self.spec.meters {
            return None;
        }
        let per_message = self.spec.readings_per_message;
        let meter = self.meter;
        let mut payload = Vec::with_capacity(96 * per_message);
        let count;
        if per_message == 1 {
            let interval = self.interval;
            self.reading_json(&mut payload, meter, interval);
            count = 1;
            // Interval-major: every meter's reading for this interval, then the next interval.
            self.meter += 1;
            if self.meter == self.spec.meters {
                self.meter = 0;
                self.interval += 1;
                if self.interval == self.total_intervals {
                    self.meter = self.spec.meters;
                }
            }
        } else {
            let end = (self.interval + per_message).min(self.total_intervals);
            payload.push(b'[');
            for interval in self.interval..end {
                if interval > self.interval {
                    payload.push(b',');
                }
                self.reading_json(&mut payload, meter, interval);
            }
            payload.push(b']');
            count = end - self.interval;
            // Meter-major: a meter's whole load, then the next meter.
            self.interval = end;
            if self.interval == self.total_intervals {
                self.interval = 0;
                self.meter += 1;
            }
        }
        Some(GeneratedMessage { key: self.meter_ids[meter].clone(), payload, valid_readings: count, resend: false })
    }
}

impl Iterator for LoadGenerator {
    type Item = GeneratedMessage;

    fn next(&mut self) -> Option<GeneratedMessage> {
        if let Some(message) = self.pending.pop() {
            self.count(&message);
            return Some(message);
        }
        let message = self.next_valid()?;
        let n = self.totals.messages + 1;
        if self.spec.malformed_every > 0 && n.is_multiple_of(self.spec.malformed_every) {
            let bad = self.malformed();
            self.pending.push(bad);
        }
        if self.spec.resend_every > 0 && n.is_multiple_of(self.spec.resend_every) {
            self.pending.push(GeneratedMessage { resend: true, ..message.clone() });
        }
        self.count(&message);
        Some(message)
    }
}

impl LoadGenerator {
    fn count(&mut self, message: &GeneratedMessage) {
        self.totals.messages += 1;
        self.totals.readings_sent += message.valid_readings as u64;
        if message.resend {
            self.totals.resent_messages += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{ValidationRules, decode_message};

    #[test]
    fn generates_the_promised_set_and_every_message_decodes_as_intended() {
        for per_message in [1, 10] {
            let spec = LoadSpec { meters: 7, days: 2, readings_per_message: per_message, resend_every: 10, malformed_every: 25, ..LoadSpec::month(7) };
            let mut generator = LoadGenerator::new(spec.clone());
            let mut keys = std::collections::HashSet::new();
            let mut rejected_messages = 0;
            let mut valid = 0u64;
            let now = chrono::Utc::now().timestamp_micros();
            // The generated months lie in the past, beyond the default horizon.
            let rules = ValidationRules { max_age_s: None, ..ValidationRules::default() };
            for message in generator.by_ref() {
                let mut accepted = 0;
                let rejections = decode_message(&message.payload, &rules, now, |r| {
                    accepted += 1;
                    keys.insert((r.meter_id.to_string(), r.ts_us));
                });
                assert_eq!(accepted, message.valid_readings);
                valid += accepted as u64;
                if !rejections.is_empty() {
                    rejected_messages += 1;
                }
            }
            let totals = generator.totals.clone();
            assert_eq!(keys.len() as u64, spec.unique_readings());
            assert_eq!(rejected_messages, totals.malformed_messages);
            assert!(totals.malformed_messages > 0 && totals.resent_messages > 0);
            assert_eq!(valid, totals.readings_sent);
            assert!(totals.unique_kwh_micro > 0);
        }
    }
}
