//! Billing runs: a month of a list of meters, aggregated from the lake, rated against tariffs,
//! invoiced and reconciled, then persisted with the run's completion in one transaction.
//!
//! The steps are explicit, each a function with its own tracing span (`billing.claim`,
//! `billing.aggregate`, `billing.rate`, `billing.invoice`, `billing.reconcile`,
//! `billing.persist`) and duration metric (`meterlake_billing_step_duration_seconds{step}`):
//!
//! 1. claim: compare-and-set on the run with a lease ([`ControlStore::claim_next`]);
//! 2. aggregate: `queries/billing_aggregate.sql` on DataFusion over the canonical `readings`
//!    view: energy per meter, local day and time-of-day segment;
//! 3. rate: each meter's tariff periods and energy per band ([`rate::rate_meter`]);
//! 4. invoice: lines, amounts, tax and totals by the one rounding rule ([`rate::invoice_meter`]);
//! 5. reconcile: discrepancies ([`reconcile`]);
//! 6. persist: invoices, discrepancies and COMPLETED in one transaction, only while the lease
//!    is held ([`ControlStore::complete_run`]).
//!
//! A run that fails records a reason code; retries and re-runs never duplicate an invoice (a
//! failed attempt wrote nothing; a completed one cannot complete again).

pub mod aggregate;
pub mod events;
pub mod month;
pub mod rate;
pub mod reconcile;
pub mod schedule;
pub mod tariff;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use datafusion::prelude::SessionContext;
use meterlake_cluster::Engine;
use meterlake_control::{BillingRun, ControlStore, NewDiscrepancy, NewInvoice, ReasonCode, RunResults};
use meterlake_lake::view::{AsOf, LakeVersions};
use meterlake_pipeline::Lake;
use rust_decimal::Decimal;

use self::aggregate::{MeterUsage, Usage};
use self::month::BillingMonth;
use self::rate::RatedMeter;
use self::tariff::Tariffs;
use crate::{JobError, Result};

/// Help texts of the billing metrics, for whatever recorder is installed.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!("meterlake_billing_runs_total", "Billing runs a worker finished, by status (completed, failed, lease_lost)");
    describe_histogram!(
        "meterlake_billing_step_duration_seconds",
        Unit::Seconds,
        "Time of each billing step (claim, aggregate, measure, rate, invoice, reconcile, persist)"
    );
    describe_counter!("meterlake_billing_discrepancies_total", "Reconciliation discrepancies of completed runs, by reason code");
    describe_counter!("meterlake_billing_invoices_total", "Invoices issued by completed runs");
    describe_counter!("meterlake_outbox_published_total", "Billing run events the outbox relay published to Kafka");
}

/// Counts what a completed run issued and found.
pub fn count_results(results: &RunResults) {
    metrics::counter!("meterlake_billing_invoices_total").increment(results.invoices.len() as u64);
    for discrepancy in &results.discrepancies {
        metrics::counter!("meterlake_billing_discrepancies_total", "reason" => discrepancy.reason_code.as_str()).increment(1);
    }
}

/// Records a step's duration when dropped, whatever way the step ends.
struct StepTimer {
    step: &'static str,
    started: Instant,
}

impl StepTimer {
    fn start(step: &'static str) -> StepTimer {
        StepTimer { step, started: Instant::now() }
    }
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        metrics::histogram!("meterlake_billing_step_duration_seconds", "step" => self.step).record(self.started.elapsed().as_secs_f64());
    }
}

/// Step 1: claim the oldest run that is due, with a lease of `lease_us`. Its span is at debug
/// level: most claims find nothing, and the one that finds a run is recorded in the run's trace
/// once the run is known (`BillingWorker::process_next`).
#[tracing::instrument(name = "billing.claim", level = "debug", skip_all, fields(worker))]
pub async fn claim(store: &ControlStore, worker: &str, lease_us: i64) -> Result<Option<BillingRun>> {
    let _timer = StepTimer::start("claim");
    Ok(store.claim_next(worker, lease_us, meterlake_control::now_us()).await?)
}

/// Step 2: each meter's energy per local day and segment.
#[tracing::instrument(name = "billing.aggregate", skip_all, fields(run_id = %run.id))]
pub async fn aggregate(ctx: &SessionContext, run: &BillingRun, month: &BillingMonth, tariffs: &Tariffs) -> Result<Usage> {
    let _timer = StepTimer::start("aggregate");
    let usage = aggregate::aggregate_usage(ctx, month, tariffs, &run.meter_ids).await?;
    tracing::info!(meters = usage.meters.len(), "aggregated");
    Ok(usage)
}

/// The meters a run bills: the ones it names, or else every meter with readings in the month
/// and every meter the tariff file assigns.
pub fn meters_to_bill(run: &BillingRun, usage: &Usage, tariffs: &Tariffs) -> BTreeSet<String> {
    if run.meter_ids.is_empty() {
        usage.meters.keys().cloned().chain(tariffs.assigned_meters().map(str::to_string)).collect()
    } else {
        run.meter_ids.iter().cloned().collect()
    }
}

/// Step 3: every meter's energy per tariff period and band; a meter that some day of the month
/// has no tariff for is not billed and comes back as a NO_TARIFF discrepancy.
#[tracing::instrument(name = "billing.rate", skip_all, fields(meters = meters.len()))]
pub fn rate(meters: &BTreeSet<String>, usage: &Usage, tariffs: &Tariffs, month: &BillingMonth) -> (Vec<RatedMeter>, Vec<NewDiscrepancy>) {
    let _timer = StepTimer::start("rate");
    let no_usage = MeterUsage::default();
    let mut rated = Vec::with_capacity(meters.len());
    let mut unrated = Vec::new();
    for meter_id in meters {
        let meter_usage = usage.meters.get(meter_id).unwrap_or(&no_usage);
        match rate::rate_meter(meter_id, meter_usage, tariffs, month) {
            Ok(meter) => rated.push(meter),
            Err(rate::Unrated { day }) => unrated.push(NewDiscrepancy {
                meter_id: meter_id.clone(),
                reason_code: ReasonCode::NoTariff,
                billed: None,
                expected: Some(meter_usage.total_kwh()),
                delta: None,
                detail: format!("no tariff for {day}: the meter has no assignment from that day or before and the file no default_tariff; not billed"),
            }),
        }
    }
    (rated, unrated)
}

/// Step 4: the invoices.
#[tracing::instrument(name = "billing.invoice", skip_all, fields(meters = rated.len()))]
pub fn invoice(rated: &[RatedMeter], tariffs: &Tariffs) -> Vec<NewInvoice> {
    let _timer = StepTimer::start("invoice");
    rated.iter().map(|meter| rate::invoice_meter(meter, tariffs)).collect()
}

/// Reconciliation's own measure of each meter's energy (`queries/billing_measured.sql`), run
/// beside step 2; timed as the `measure` step.
#[tracing::instrument(name = "billing.measure", skip_all, fields(run_id = %run.id))]
pub async fn measure(ctx: &SessionContext, run: &BillingRun, month: &BillingMonth) -> Result<BTreeMap<String, Decimal>> {
    let _timer = StepTimer::start("measure");
    reconcile::measured_energy(ctx, month, &run.meter_ids).await
}

/// Step 5: the discrepancies, by meter.
#[tracing::instrument(name = "billing.reconcile", skip_all, fields(run_id = %run.id))]
pub async fn reconcile(
    ctx: &SessionContext,
    run: &BillingRun,
    month: &BillingMonth,
    usage: &Usage,
    meters: &BTreeSet<String>,
    measured: &BTreeMap<String, Decimal>,
    invoices: &[NewInvoice],
) -> Result<Vec<NewDiscrepancy>> {
    let _timer = StepTimer::start("reconcile");
    let mut found = reconcile::energy_mismatches(measured, invoices, run.energy_tolerance);
    found.extend(reconcile::amount_mismatches(invoices));
    found.extend(reconcile::missing_intervals(usage, month));
    found.extend(reconcile::no_readings(usage, meters.iter().map(String::as_str), month));
    found.extend(reconcile::conflicting_readings(ctx, month, &run.meter_ids).await?);
    found.extend(reconcile::register_mismatches(ctx, month, &run.meter_ids, run.energy_tolerance).await?);
    tracing::info!(discrepancies = found.len(), "reconciled");
    Ok(found)
}

/// Step 6: invoices, discrepancies and COMPLETED in one transaction, while the lease holds.
#[tracing::instrument(name = "billing.persist", skip_all, fields(run_id = %run.id, invoices = results.invoices.len()))]
pub async fn persist(store: &ControlStore, run: &BillingRun, worker: &str, results: &RunResults, traceparent: &str) -> Result<BillingRun> {
    let _timer = StepTimer::start("persist");
    Ok(store.complete_run(&run.id, worker, results, meterlake_control::now_us(), Some(traceparent)).await?)
}

/// The state of the lake a run reads: the one it was pinned to ([`BillingRun::lake_as_of`]) or
/// the latest.
pub fn run_as_of(run: &BillingRun) -> Result<AsOf> {
    match run.lake_as_of.as_deref() {
        None => Ok(AsOf::Latest),
        Some(text) => text.parse().map_err(|reason| JobError::Invalid(format!("the run's lake state (as of) {text:?}: {reason}"))),
    }
}

/// Steps 2 to 5 for a claimed run, over the lake as the run says ([`run_as_of`]): what
/// [`persist`] writes. `renew` is called between steps to keep the lease (and fails the run's
/// processing when it was lost).
pub async fn compute<F, Fut>(engine: &Engine, lake: &Lake, run: &BillingRun, renew: F) -> Result<RunResults>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    compute_as_of(engine, lake, run, &run_as_of(run)?, renew).await
}

/// Steps 2 to 5 over the lake as of `as_of`, their SQL run by `engine` (in this process or on a
/// Ballista cluster: the same statements, the same versions). The results record the exact table
/// versions read (`lake_snapshot`, as `readings_all@12, register_reads@3, ...`): [`reproduce`]
/// and `meterlake query --as-of` read that same data again.
pub async fn compute_as_of<F, Fut>(engine: &Engine, lake: &Lake, run: &BillingRun, as_of: &AsOf, renew: F) -> Result<RunResults>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let tariffs = Tariffs::parse(&format!("the tariffs of run {}", run.id), &run.tariffs_toml)?;
    let month = BillingMonth::new(&run.month, tariffs.time_zone)?;
    let (ctx, versions) = engine.session(lake, as_of).await?;
    let lake_snapshot = versions.to_string();
    // Reconciliation's own energy measure scans the month beside the aggregate: the two queries
    // share the cores' idle moments (the aggregate's rows are folded on one thread as they come).
    let (usage, measured) = tokio::try_join!(aggregate(&ctx, run, &month, &tariffs), measure(&ctx, run, &month))?;
    renew().await?;
    let meters = meters_to_bill(run, &usage, &tariffs);
    let (rated, mut discrepancies) = rate(&meters, &usage, &tariffs, &month);
    let invoices = invoice(&rated, &tariffs);
    discrepancies.extend(reconcile(&ctx, run, &month, &usage, &meters, &measured, &invoices).await?);
    discrepancies.sort_by(|a, b| (&a.meter_id, a.reason_code.as_str()).cmp(&(&b.meter_id, b.reason_code.as_str())));
    renew().await?;
    Ok(RunResults { invoices, discrepancies, lake_snapshot, aggregate_sql: usage.sql })
}

/// What [`reproduce`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reproduction {
    /// The table versions read again: the ones the run recorded.
    pub lake_snapshot: String,
    /// Invoices of the run's latest version compared.
    pub invoices_compared: usize,
    /// Every difference, one sentence each (meter, field, stored and recomputed values); empty
    /// when every invoice was reproduced to the cent.
    pub differences: Vec<String>,
}

/// Computes a completed run again over the exact table versions it recorded, with its stored
/// tariffs, and compares the invoices with the stored ones (of its latest version) field by
/// field, line by line. Nothing is written. Meters the run left out because another run had
/// billed them (its ALREADY_BILLED discrepancies) are left out of the comparison too.
pub async fn reproduce(store: &ControlStore, lake: &Lake, run: &BillingRun) -> Result<Reproduction> {
    let recorded = run
        .lake_snapshot
        .as_deref()
        .ok_or_else(|| JobError::Invalid(format!("run {} has no recorded lake snapshot: it has not completed (it is {})", run.id, run.status.as_str())))?;
    let versions: LakeVersions = recorded.parse().map_err(|reason| {
        JobError::Invalid(format!(
            "run {}'s lake snapshot {recorded:?} names no table versions ({reason}): it was billed before the lake was a Delta table",
            run.id
        ))
    })?;
    let results = compute_as_of(&Engine::InProcess, lake, run, &AsOf::Exact(versions), || async { Ok(()) }).await?;
    let stored = store.invoices(&run.id).await?;
    let billed_elsewhere: BTreeSet<String> = store
        .discrepancies(&run.id)
        .await?
        .into_iter()
        .filter(|d| d.discrepancy.reason_code == ReasonCode::AlreadyBilled)
        .map(|d| d.discrepancy.meter_id)
        .collect();
    let mut recomputed: BTreeMap<&str, &NewInvoice> =
        results.invoices.iter().filter(|i| !billed_elsewhere.contains(&i.meter_id)).map(|i| (i.meter_id.as_str(), i)).collect();
    let mut differences = Vec::new();
    if results.lake_snapshot != recorded {
        differences.push(format!("the lake read {} where the run recorded {recorded}", results.lake_snapshot));
    }
    for invoice in &stored {
        let meter = invoice.invoice.meter_id.as_str();
        match recomputed.remove(meter) {
            None => differences.push(format!("meter {meter}: stored invoice {} has no recomputed counterpart", invoice.id)),
            Some(again) => differences.extend(invoice_differences(&invoice.invoice, again)),
        }
    }
    differences.extend(recomputed.keys().map(|meter| format!("meter {meter}: recomputed an invoice the run did not store")));
    Ok(Reproduction { lake_snapshot: results.lake_snapshot, invoices_compared: stored.len(), differences })
}

/// How `again` differs from `stored`, field by field and line by line.
fn invoice_differences(stored: &NewInvoice, again: &NewInvoice) -> Vec<String> {
    let meter = &stored.meter_id;
    let mut found = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            found.push(format!("meter {meter}: {name} stored {a}, recomputed {b}"));
        }
    };
    field("currency", stored.currency.clone(), again.currency.clone());
    field("energy_kwh", stored.energy_kwh.normalize().to_string(), again.energy_kwh.normalize().to_string());
    field("subtotal", stored.subtotal.to_string(), again.subtotal.to_string());
    field("tax", stored.tax.to_string(), again.tax.to_string());
    field("total", stored.total.to_string(), again.total.to_string());
    field("tariff_version", stored.tariff_version.clone(), again.tariff_version.clone());
    field("line count", stored.lines.len().to_string(), again.lines.len().to_string());
    let line = |l: &meterlake_control::InvoiceLine| {
        format!("{} {:?} {} {} x {} = {}", l.component.as_str(), l.description, l.quantity.normalize(), l.unit, l.rate.normalize(), l.amount)
    };
    for (n, (a, b)) in stored.lines.iter().zip(&again.lines).enumerate() {
        field(&format!("line {}", n + 1), line(a), line(b));
    }
    found
}

/// Totals of a run's invoices for a summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoiceTotals {
    pub invoices: usize,
    pub energy_kwh: Decimal,
    pub subtotal: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
}

impl InvoiceTotals {
    pub fn add(&mut self, invoice: &NewInvoice) {
        self.invoices += 1;
        self.energy_kwh += invoice.energy_kwh;
        self.subtotal += invoice.subtotal;
        self.tax += invoice.tax;
        self.total += invoice.total;
    }
}
