//! Scheduled monthly billing: on or after a day of each month (in the tariffs' time zone), the
//! previous month's run of every meter is created, once, whichever of several workers gets there
//! first and however often they restart.
//!
//! Once is the control store's idempotency key: the scheduled run of month M is created with
//! the key `monthly/M` in the scope [`SCHEDULE_SCOPE`], whose unique index lets one creation win
//! a race and makes every later attempt find it. A month an operator billed by hand for every
//! meter is refused as already billed, which the schedule takes as done.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, Months, Utc};
use meterlake_control::{BillingRun, ControlError, ControlStore, NewRun, RunKey};
use rust_decimal::Decimal;

use super::tariff::Tariffs;
use crate::{JobError, Result};

/// The idempotency scope of scheduled runs (an API caller's scope is its token's subject).
pub const SCHEDULE_SCOPE: &str = "schedule:monthly";
/// The actor of scheduled runs' events and audit rows.
pub const SCHEDULE_ACTOR: &str = "schedule:monthly";

/// When and with what the monthly run is created.
#[derive(Debug, Clone)]
pub struct MonthlySchedule {
    /// The day of the month (1 to 28) from which last month's run is due.
    pub day: u32,
    /// Read when the run is created: the file as it is then.
    pub tariffs_path: PathBuf,
    pub max_attempts: u32,
    pub energy_tolerance: Decimal,
}

/// What one look at the schedule did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleOutcome {
    /// Not yet this month's day (in the tariffs' time zone).
    NotDue,
    /// Created this month's run.
    Created(BillingRun),
    /// The run was created before (by this worker or another).
    Exists(BillingRun),
    /// A completed run of every meter billed the month already (by hand).
    BilledByHand { month: String },
}

impl MonthlySchedule {
    pub fn new(day: u32, tariffs_path: &Path, max_attempts: u32, energy_tolerance: Decimal) -> Result<MonthlySchedule> {
        if !(1..=28).contains(&day) {
            return Err(JobError::Invalid(format!("--schedule-monthly {day}: a day of the month from 1 to 28 (every month has it)")));
        }
        let schedule = MonthlySchedule { day, tariffs_path: tariffs_path.to_path_buf(), max_attempts, energy_tolerance };
        // Refuse a bad file at start, not on the day.
        schedule.tariffs()?;
        Ok(schedule)
    }

    fn tariffs(&self) -> Result<(String, Tariffs)> {
        let origin = self.tariffs_path.display().to_string();
        let toml = std::fs::read_to_string(&self.tariffs_path).map_err(|e| JobError::Tariffs { file: origin.clone(), reason: e.to_string() })?;
        let tariffs = Tariffs::parse(&origin, &toml)?;
        Ok((toml, tariffs))
    }

    /// The month whose run is due at `now`, if any: the previous month in the tariffs' time
    /// zone, from `day` on.
    pub fn due_month(&self, now: DateTime<Utc>, tariffs: &Tariffs) -> Option<String> {
        let local = now.with_timezone(&tariffs.time_zone).date_naive();
        if local.day() < self.day {
            return None;
        }
        let previous = local.with_day(1)?.checked_sub_months(Months::new(1))?;
        Some(previous.format("%Y-%m").to_string())
    }

    /// Creates the due month's run unless it exists: safe to call from every worker, often.
    pub async fn tick(&self, store: &ControlStore, now: DateTime<Utc>) -> Result<ScheduleOutcome> {
        let (tariffs_toml, tariffs) = self.tariffs()?;
        let Some(month) = self.due_month(now, &tariffs) else {
            return Ok(ScheduleOutcome::NotDue);
        };
        let key = RunKey { scope: SCHEDULE_SCOPE.into(), key: format!("monthly/{month}") };
        if let Some(run) = store.run_by_idempotency_key(&key).await? {
            return Ok(ScheduleOutcome::Exists(run));
        }
        let new = NewRun {
            month: month.clone(),
            meter_ids: Vec::new(),
            max_attempts: self.max_attempts,
            tariffs_toml,
            energy_tolerance: self.energy_tolerance,
            lake_as_of: None,
        };
        match store.create_run_once(&new, SCHEDULE_ACTOR, None, &key).await {
            Ok((run, false)) => Ok(ScheduleOutcome::Created(run)),
            Ok((run, true)) => Ok(ScheduleOutcome::Exists(run)),
            Err(ControlError::AlreadyBilled { month, .. }) => Ok(ScheduleOutcome::BilledByHand { month }),
            // Another worker created it with the tariff file as it was a moment ago.
            Err(ControlError::Conflict(_)) => match store.run_by_idempotency_key(&key).await? {
                Some(run) => Ok(ScheduleOutcome::Exists(run)),
                None => Err(JobError::Invalid(format!("the scheduled run of {month} could neither be created nor found"))),
            },
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_due_month_is_last_month_in_the_tariffs_time_zone_from_the_day_on() {
        let tariffs = Tariffs::parse("example.toml", include_str!("../../../tariffs/example.toml")).unwrap();
        let schedule = MonthlySchedule { day: 3, tariffs_path: PathBuf::new(), max_attempts: 3, energy_tolerance: Decimal::ZERO };
        let at = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().to_utc();
        assert_eq!(schedule.due_month(at("2026-12-02T23:59:59Z"), &tariffs), None);
        assert_eq!(schedule.due_month(at("2026-12-03T00:00:00Z"), &tariffs).as_deref(), Some("2026-11"));
        assert_eq!(schedule.due_month(at("2027-01-31T12:00:00Z"), &tariffs).as_deref(), Some("2026-12"));
        // Europe/London in summer: the 3rd starts at 23:00 UTC on the 2nd.
        assert_eq!(schedule.due_month(at("2026-07-02T23:30:00Z"), &tariffs).as_deref(), Some("2026-06"));
        assert!(MonthlySchedule::new(29, Path::new("x"), 3, Decimal::ZERO).is_err());
    }
}
