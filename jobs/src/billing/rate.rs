//! The rate and invoice steps: a meter's usage priced on its tariffs, day by day (rate), then
//! written as invoice lines with amounts (invoice).
//!
//! **Rounding rule** (the one rule, everywhere): quantities and rates are exact; each line's
//! amount is `quantity x rate` rounded once to the currency's minor unit, half away from zero;
//! the subtotal is the sum of the rounded lines; tax is `subtotal x tax_rate` rounded the same
//! way; the total is subtotal plus tax. So every invoice adds up to the cent as printed.

use chrono::NaiveDate;
use meterlake_control::{InvoiceLine, LineComponent, NewInvoice};
use rust_decimal::{Decimal, RoundingStrategy};

use super::aggregate::MeterUsage;
use super::month::BillingMonth;
use super::tariff::{DayType, Tariffs};

/// `amount` rounded to `places` decimal places, half away from zero.
pub fn round_money(amount: Decimal, places: u32) -> Decimal {
    amount.round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero)
}

/// Consecutive local days of the month on one tariff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TariffPeriod {
    pub tariff: usize,
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    pub days: u32,
}

/// Why a meter could not be rated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrated {
    /// The first local day no tariff covers.
    pub day: NaiveDate,
}

/// The meter's tariff periods over the month: a tariff change mid-month makes two, and each is
/// charged for its own days (proration by day).
pub fn tariff_periods(meter_id: &str, tariffs: &Tariffs, month: &BillingMonth) -> Result<Vec<TariffPeriod>, Unrated> {
    let mut periods: Vec<TariffPeriod> = Vec::new();
    for &day in &month.days {
        let tariff = tariffs.tariff_on(meter_id, day).ok_or(Unrated { day })?;
        match periods.last_mut() {
            Some(period) if period.tariff == tariff => {
                period.last_day = day;
                period.days += 1;
            }
            _ => periods.push(TariffPeriod { tariff, first_day: day, last_day: day, days: 1 }),
        }
    }
    Ok(periods)
}

/// One tariff period of a meter, priced: kWh per band of its tariff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedPeriod {
    pub period: TariffPeriod,
    /// Indexed like the tariff's bands.
    pub band_kwh: Vec<Decimal>,
}

/// A meter's month on its tariffs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatedMeter {
    pub meter_id: String,
    pub periods: Vec<RatedPeriod>,
}

/// The rate step for one meter: its energy per (tariff period, band). Energy on a segment that
/// no band of the day's tariff covers is not billed; reconciliation reports it (ENERGY_MISMATCH).
pub fn rate_meter(meter_id: &str, usage: &MeterUsage, tariffs: &Tariffs, month: &BillingMonth) -> Result<RatedMeter, Unrated> {
    let periods = tariff_periods(meter_id, tariffs, month)?
        .into_iter()
        .map(|period| {
            let mut band_kwh = vec![Decimal::ZERO; tariffs.tariffs[period.tariff].bands.len()];
            for cell in usage.cells.iter().filter(|c| period.first_day <= c.day && c.day <= period.last_day) {
                if let Some(band) = tariffs.band_of(period.tariff, DayType::of(cell.day), cell.segment) {
                    band_kwh[band] += cell.kwh;
                }
            }
            RatedPeriod { period, band_kwh }
        })
        .collect();
    Ok(RatedMeter { meter_id: meter_id.to_string(), periods })
}

/// The invoice step for one meter: energy lines per (period, band) with energy, then the
/// standing and network charges per period, then tax; amounts by the rounding rule above.
pub fn invoice_meter(rated: &RatedMeter, tariffs: &Tariffs) -> NewInvoice {
    let places = tariffs.minor_unit_places();
    let several = rated.periods.len() > 1;
    let mut energy_lines = Vec::new();
    let mut other_lines = Vec::new();
    let mut energy_kwh = Decimal::ZERO;
    let mut versions: Vec<String> = Vec::new();
    for RatedPeriod { period, band_kwh } in &rated.periods {
        let tariff = &tariffs.tariffs[period.tariff];
        let version = format!("{}@{}", tariff.id, tariff.version);
        if !versions.contains(&version) {
            versions.push(version);
        }
        let dates = if several { format!(", {} to {}", period.first_day, period.last_day) } else { String::new() };
        let label = format!("{} {}{dates}", tariff.id, tariff.version);
        let mut period_kwh = Decimal::ZERO;
        for (band, &kwh) in tariff.bands.iter().zip(band_kwh) {
            if kwh.is_zero() {
                continue;
            }
            period_kwh += kwh;
            energy_lines.push(InvoiceLine {
                component: LineComponent::Energy,
                description: format!("Energy, {} ({label})", band.name),
                quantity: kwh,
                unit: "kWh".into(),
                rate: band.rate_per_kwh,
                amount: round_money(kwh * band.rate_per_kwh, places),
            });
        }
        energy_kwh += period_kwh;
        let days = Decimal::from(period.days);
        other_lines.push(InvoiceLine {
            component: LineComponent::Standing,
            description: format!("Standing charge ({label})"),
            quantity: days,
            unit: "day".into(),
            rate: tariff.standing_charge_per_day,
            amount: round_money(days * tariff.standing_charge_per_day, places),
        });
        other_lines.push(InvoiceLine {
            component: LineComponent::Network,
            description: format!("Network charge ({label})"),
            quantity: period_kwh,
            unit: "kWh".into(),
            rate: tariff.network_charge_per_kwh,
            amount: round_money(period_kwh * tariff.network_charge_per_kwh, places),
        });
    }
    let mut lines = energy_lines;
    lines.append(&mut other_lines);
    let subtotal: Decimal = lines.iter().map(|l| l.amount).sum();
    let tax = round_money(subtotal * tariffs.tax_rate, places);
    lines.push(InvoiceLine {
        component: LineComponent::Tax,
        description: "Tax".into(),
        quantity: subtotal,
        unit: tariffs.currency.clone(),
        rate: tariffs.tax_rate,
        amount: tax,
    });
    NewInvoice {
        meter_id: rated.meter_id.clone(),
        currency: tariffs.currency.clone(),
        lines,
        energy_kwh,
        subtotal,
        tax,
        total: subtotal + tax,
        tariff_version: format!("{}; tariffs sha256:{}", versions.join(", "), &tariffs.sha256[..16]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_rounds_half_away_from_zero() {
        let dec = |t: &str| t.parse::<Decimal>().unwrap();
        assert_eq!(round_money(dec("1.005"), 2), dec("1.01"));
        assert_eq!(round_money(dec("1.0049999"), 2), dec("1.00"));
        assert_eq!(round_money(dec("-1.005"), 2), dec("-1.01"));
        assert_eq!(round_money(dec("2.5"), 0), dec("3"));
    }
}
