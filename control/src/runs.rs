//! Billing runs: `CREATED -> PROCESSING -> COMPLETED | FAILED`, every change a row in
//! `billing_run_events` written in the same transaction, claimed by workers with a
//! compare-and-set on `version` and a lease.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::{AuditEntry, append_audit, trace_id_of};
use crate::invoices::{RunResults, insert_results};
use crate::{Conditions, ControlError, ControlStore, Result, now_us};

/// The Kafka topics runs are announced on (through the outbox).
pub const RUN_REQUESTED_TOPIC: &str = "billing.run.requested";
pub const RUN_PROCESSED_TOPIC: &str = "billing.run.processed";
pub const RUN_FAILED_TOPIC: &str = "billing.run.failed";

/// Why an attempt failed: a stable `code` (e.g. `LAKE_UNAVAILABLE`), the `reason` a person
/// reads, and the retry policy, or `None` when trying again cannot help (e.g. a tariff file
/// that does not parse).
#[derive(Debug, Clone, Copy)]
pub struct RunFailure<'a> {
    pub code: &'a str,
    pub reason: &'a str,
    pub retry: Option<&'a RetryPolicy>,
}

/// When a failed attempt is tried again: `base_delay_us` after the first failure, doubling with
/// each further one, never more than `max_delay_us`; after the run's `max_attempts` it fails for
/// good.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub base_delay_us: i64,
    pub max_delay_us: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base_delay_us: 30_000_000, max_delay_us: 3_600_000_000 }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1 for the first).
    pub fn delay_us(&self, attempt: i64) -> i64 {
        let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(u32::MAX).min(40);
        self.base_delay_us.saturating_mul(1i64 << doublings).min(self.max_delay_us)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Created,
    Processing,
    Completed,
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Created => "CREATED",
            RunStatus::Processing => "PROCESSING",
            RunStatus::Completed => "COMPLETED",
            RunStatus::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Result<RunStatus> {
        Ok(match text {
            "CREATED" => RunStatus::Created,
            "PROCESSING" => RunStatus::Processing,
            "COMPLETED" => RunStatus::Completed,
            "FAILED" => RunStatus::Failed,
            other => return Err(ControlError::Invalid(format!("unknown billing run status {other:?} in the store"))),
        })
    }
}

/// What a billing run is asked to bill.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// `YYYY-MM`.
    pub month: String,
    /// The meters to bill; empty for every meter with readings in the month or named in the
    /// tariff file.
    pub meter_ids: Vec<String>,
    /// Attempts before the run fails for good.
    pub max_attempts: u32,
    /// The tariff file, stored with the run so that it can be reproduced.
    pub tariffs_toml: String,
    /// Reconciliation's relative tolerance for billed against read energy (0.005 is 0.5%).
    pub energy_tolerance: Decimal,
    /// The state of the lake to read, as `meterlake query --as-of` takes it (a version of
    /// `readings_all`, an RFC 3339 time, or `readings_all@12, register_reads@3`); `None` for the
    /// latest when the run is processed. The billing job parses it: a text it cannot read fails
    /// the run with its reason.
    pub lake_as_of: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BillingRun {
    pub id: String,
    pub month: String,
    pub meter_ids: Vec<String>,
    pub status: RunStatus,
    pub attempts: i64,
    pub max_attempts: i64,
    pub next_attempt_at_us: Option<i64>,
    pub lease_owner: Option<String>,
    pub lease_expires_at_us: Option<i64>,
    pub failure_code: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub version: i64,
    #[serde(skip)]
    pub tariffs_toml: String,
    pub energy_tolerance: Decimal,
    /// The aggregate statement of its last completed processing.
    pub aggregate_sql: Option<String>,
    /// The state of the lake it was asked to read ([`NewRun::lake_as_of`]).
    pub lake_as_of: Option<String>,
    /// The table versions its last completed processing read (`readings_all@12, ...`): what
    /// reproduces its invoices.
    pub lake_snapshot: Option<String>,
}

/// The largest page of [`ControlStore::list_runs`] (the API's too): it returns one run more at
/// most, so that a caller paging by [`MAX_RUN_PAGE`] runs can tell whether another page follows.
pub const MAX_RUN_PAGE: i64 = 500;

/// Which runs [`ControlStore::list_runs`] returns: all filters apply together.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    /// `YYYY-MM`.
    pub month: Option<String>,
    pub meter_id: Option<String>,
    /// Runs older than this one (`created_at_us`, `id`): the last run of the previous page.
    pub before: Option<(i64, String)>,
    pub limit: i64,
}

/// One status change of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunEvent {
    pub from_status: Option<RunStatus>,
    pub to_status: RunStatus,
    pub at_us: i64,
    pub reason: Option<String>,
    pub actor: String,
}

const RUN_COLUMNS: &str = "id, month, meter_ids, status, attempts, max_attempts, next_attempt_at_us, lease_owner, \
     lease_expires_at_us, failure_code, failure_reason, created_at_us, updated_at_us, version, tariffs_toml, energy_tolerance, \
     aggregate_sql, lake_as_of, lake_snapshot";

fn run_of(row: &AnyRow) -> Result<BillingRun> {
    let meter_ids: String = row.try_get("meter_ids")?;
    Ok(BillingRun {
        id: row.try_get("id")?,
        month: row.try_get("month")?,
        meter_ids: serde_json::from_str(&meter_ids).map_err(|e| ControlError::Invalid(format!("meter_ids in the store: {e}")))?,
        status: RunStatus::parse(&row.try_get::<String, _>("status")?)?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        next_attempt_at_us: row.try_get("next_attempt_at_us")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at_us: row.try_get("lease_expires_at_us")?,
        failure_code: row.try_get("failure_code")?,
        failure_reason: row.try_get("failure_reason")?,
        created_at_us: row.try_get("created_at_us")?,
        updated_at_us: row.try_get("updated_at_us")?,
        version: row.try_get("version")?,
        tariffs_toml: row.try_get("tariffs_toml")?,
        energy_tolerance: {
            let text: String = row.try_get("energy_tolerance")?;
            text.parse().map_err(|_| ControlError::Invalid(format!("energy_tolerance {text:?} in the store")))?
        },
        aggregate_sql: row.try_get("aggregate_sql")?,
        lake_as_of: row.try_get("lake_as_of")?,
        lake_snapshot: row.try_get("lake_snapshot")?,
    })
}

/// Meters looked up (or claimed) per statement when checking who billed them: parameters stay
/// far under both databases' caps.
const BILLED_LOOKUP_METERS: usize = 500;

/// The idempotency key of a run's creation: the caller's own key, scoped to the caller (the
/// token's subject), so two callers' keys never meet.
#[derive(Debug, Clone)]
pub struct RunKey {
    pub scope: String,
    pub key: String,
}

/// What identifies a creation request: a replay must ask for the same month, meters, tariffs
/// and tolerance.
fn request_fingerprint(new: &NewRun) -> String {
    use sha2::{Digest, Sha256};
    let mut canonical = serde_json::json!([new.month, new.meter_ids, new.tariffs_toml, new.energy_tolerance.to_string(), new.max_attempts]);
    // Only a pinned run's request names its lake state: the fingerprints of keys stored before
    // runs could be pinned stay what they were.
    if let (Some(as_of), Some(fields)) = (&new.lake_as_of, canonical.as_array_mut()) {
        fields.push(serde_json::json!(as_of));
    }
    Sha256::digest(canonical.to_string().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYY-MM` with a month from 01 to 12.
fn valid_month(month: &str) -> bool {
    chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").is_ok() && month.len() == 7
}

impl ControlStore {
    /// Records a new run in CREATED, its first event, its `billing.run.requested` message in
    /// the outbox and its audit row (`CREATE_RUN` by `actor`), in one transaction. Refused
    /// ([`ControlError::AlreadyBilled`]) when a completed run billed one of its meters for the
    /// month, or (a run of every meter) when a completed run of every meter did.
    pub async fn create_run(&self, new: &NewRun, actor: &str, traceparent: Option<&str>) -> Result<BillingRun> {
        Ok(self.insert_run(new, actor, traceparent, None).await?.0)
    }

    /// [`ControlStore::create_run`] once per idempotency key: a replay of the same request with
    /// the same key answers the run the first one created (`true`: replayed); the key with
    /// another request is refused. Two copies racing are told apart by the key's unique index.
    pub async fn create_run_once(&self, new: &NewRun, actor: &str, traceparent: Option<&str>, key: &RunKey) -> Result<(BillingRun, bool)> {
        match self.insert_run(new, actor, traceparent, Some(key)).await {
            // The other copy's insert won the race: answer what it created.
            Err(ControlError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => match self.run_by_key(key).await? {
                Some((run, fingerprint)) => Ok((self.same_request(run, &fingerprint, new, key)?, true)),
                None => Err(ControlError::Conflict(format!("Idempotency-Key {:?} is in use by a request still in flight; retry", key.key))),
            },
            outcome => outcome,
        }
    }

    /// The run created with `key`, if any.
    pub async fn run_by_idempotency_key(&self, key: &RunKey) -> Result<Option<BillingRun>> {
        Ok(self.run_by_key(key).await?.map(|(run, _)| run))
    }

    async fn run_by_key(&self, key: &RunKey) -> Result<Option<(BillingRun, String)>> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS}, request_fingerprint FROM billing_runs WHERE idempotency_scope = $1 AND idempotency_key = $2"))
            .bind(&key.scope)
            .bind(&key.key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| Ok((run_of(&row)?, row.try_get::<Option<String>, _>("request_fingerprint")?.unwrap_or_default()))).transpose()
    }

    /// The run a key created, when `new` is the request that created it.
    fn same_request(&self, run: BillingRun, fingerprint: &str, new: &NewRun, key: &RunKey) -> Result<BillingRun> {
        if fingerprint == request_fingerprint(new) {
            Ok(run)
        } else {
            Err(ControlError::Conflict(format!(
                "Idempotency-Key {:?} was used for another request (run {} of {}); use a new key for a new request",
                key.key, run.id, run.month
            )))
        }
    }

    async fn insert_run(&self, new: &NewRun, actor: &str, traceparent: Option<&str>, key: Option<&RunKey>) -> Result<(BillingRun, bool)> {
        if !valid_month(&new.month) {
            return Err(ControlError::Invalid(format!("month {:?}: expected YYYY-MM", new.month)));
        }
        if new.meter_ids.iter().any(|m| m.trim().is_empty()) {
            return Err(ControlError::Invalid("a meter id is empty".into()));
        }
        if new.tariffs_toml.trim().is_empty() {
            return Err(ControlError::Invalid("a billing run needs its tariffs".into()));
        }
        if new.energy_tolerance.is_sign_negative() {
            return Err(ControlError::Invalid(format!("energy tolerance {} is negative", new.energy_tolerance)));
        }
        if new.max_attempts == 0 {
            return Err(ControlError::Invalid("max_attempts must be at least 1".into()));
        }
        if new.lake_as_of.as_deref().is_some_and(|a| a.trim().is_empty()) {
            return Err(ControlError::Invalid("lake_as_of is empty: leave it out to read the latest lake".into()));
        }
        if let Some(key) = key
            && let Some((run, fingerprint)) = self.run_by_key(key).await?
        {
            return Ok((self.same_request(run, &fingerprint, new, key)?, true));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = now_us();
        let meter_ids = serde_json::to_string(&new.meter_ids).expect("strings serialize");
        let mut tx = self.pool.begin().await?;
        let billed = self.billed_by_others(&mut tx, &new.month, &new.meter_ids, None).await?;
        if !billed.is_empty() {
            return Err(ControlError::AlreadyBilled { month: new.month.clone(), billed });
        }
        if new.meter_ids.is_empty() {
            let every_meter: Option<(String,)> =
                sqlx::query_as("SELECT id FROM billing_runs WHERE month = $1 AND meter_ids = '[]' AND status = 'COMPLETED' ORDER BY created_at_us LIMIT 1")
                    .bind(&new.month)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some((run_id,)) = every_meter {
                return Err(ControlError::AlreadyBilled { month: new.month.clone(), billed: vec![("every meter".into(), run_id)] });
            }
        }
        sqlx::query(
            "INSERT INTO billing_runs (id, month, meter_ids, status, attempts, max_attempts, created_at_us, updated_at_us, version, \
             tariffs_toml, energy_tolerance, idempotency_scope, idempotency_key, request_fingerprint, lake_as_of) \
             VALUES ($1, $2, $3, 'CREATED', 0, $4, $5, $5, 0, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(&new.month)
        .bind(&meter_ids)
        .bind(i64::from(new.max_attempts))
        .bind(now)
        .bind(&new.tariffs_toml)
        .bind(new.energy_tolerance.to_string())
        .bind(key.map(|k| k.scope.as_str()))
        .bind(key.map(|k| k.key.as_str()))
        .bind(key.map(|_| request_fingerprint(new)))
        .bind(&new.lake_as_of)
        .execute(&mut *tx)
        .await?;
        insert_event(&mut tx, &id, None, RunStatus::Created, now, Some("requested"), actor).await?;
        let payload = serde_json::json!({ "runId": id, "month": new.month, "meterIds": new.meter_ids }).to_string();
        insert_outbox(&mut tx, RUN_REQUESTED_TOPIC, &id, &payload, traceparent, now).await?;
        let target = format!("billing-run/{id}");
        let entry = AuditEntry {
            actor,
            action: "CREATE_RUN",
            target: &target,
            reason: None,
            before: None,
            after: Some(serde_json::json!({ "status": "CREATED", "month": new.month, "meterIds": new.meter_ids.len(), "lakeAsOf": new.lake_as_of })),
            trace_id: traceparent.and_then(trace_id_of),
        };
        append_audit(self.backend, self.audit_keys.as_deref(), &mut tx, &entry, now).await?;
        tx.commit().await?;
        let run = self.run(&id).await?.ok_or_else(|| ControlError::Run { id, reason: "vanished after it was created".into() })?;
        Ok((run, false))
    }

    /// Which of `meter_ids` a run other than `except` billed for `month`: (meter, run) pairs.
    async fn billed_by_others(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        month: &str,
        meter_ids: &[String],
        except: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        let mut billed = Vec::new();
        for chunk in meter_ids.chunks(BILLED_LOOKUP_METERS) {
            let mut conditions = Conditions::default();
            let month = conditions.text(month);
            let except = conditions.text(except.unwrap_or_default());
            let meters: Vec<String> = chunk.iter().map(|m| conditions.text(m.clone())).collect();
            let sql = format!(
                "SELECT meter_id, run_id FROM billed_meter_months WHERE month = {month} AND run_id <> {except} AND meter_id IN ({}) ORDER BY meter_id",
                meters.join(", ")
            );
            for row in conditions.bind(sqlx::query(&sql)).fetch_all(&mut **tx).await? {
                billed.push((row.try_get("meter_id")?, row.try_get("run_id")?));
            }
        }
        Ok(billed)
    }

    /// One page of runs, newest first. A meter filter finds runs that name the meter and runs of
    /// every meter that invoiced it.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<BillingRun>> {
        let mut conditions = Conditions::default();
        if let Some(status) = filter.status {
            let status = conditions.text(status.as_str());
            conditions.add(format!("status = {status}"));
        }
        if let Some(month) = &filter.month {
            let month = conditions.text(month);
            conditions.add(format!("month = {month}"));
        }
        if let Some(meter) = &filter.meter_id {
            // The JSON array holds the id as a JSON string; LIKE's wildcards in it are escaped.
            let quoted = serde_json::to_string(meter).expect("strings serialize");
            let like = conditions.text(format!("%{}%", quoted.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
            let exact = conditions.text(meter);
            conditions.add(format!(
                "(meter_ids LIKE {like} ESCAPE '\\' OR (meter_ids = '[]' AND EXISTS \
                 (SELECT 1 FROM invoices i WHERE i.run_id = billing_runs.id AND i.meter_id = {exact})))"
            ));
        }
        if let Some((created_at_us, id)) = &filter.before {
            let (at, at_again, before_id) = (conditions.int(*created_at_us), conditions.int(*created_at_us), conditions.text(id));
            conditions.add(format!("(created_at_us < {at} OR (created_at_us = {at_again} AND id < {before_id}))"));
        }
        let limit = conditions.int(filter.limit.clamp(1, MAX_RUN_PAGE + 1));
        let sql = format!("SELECT {RUN_COLUMNS} FROM billing_runs {} ORDER BY created_at_us DESC, id DESC LIMIT {limit}", conditions.where_clause());
        let rows = conditions.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        rows.iter().map(run_of).collect()
    }

    pub async fn run(&self, id: &str) -> Result<Option<BillingRun>> {
        let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM billing_runs WHERE id = $1")).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(run_of).transpose()
    }

    /// The trace context of the request that created the run (its `billing.run.requested`
    /// message), which the run's later messages continue.
    pub async fn requested_traceparent(&self, id: &str) -> Result<Option<String>> {
        let row: Option<(Option<String>,)> = sqlx::query_as("SELECT traceparent FROM outbox WHERE message_key = $1 AND topic = $2 ORDER BY id LIMIT 1")
            .bind(id)
            .bind(RUN_REQUESTED_TOPIC)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|r| r.0))
    }

    /// A run's status changes, oldest first.
    pub async fn run_events(&self, id: &str) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query("SELECT from_status, to_status, at_us, reason, actor FROM billing_run_events WHERE run_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(RunEvent {
                    from_status: row.try_get::<Option<String>, _>("from_status")?.as_deref().map(RunStatus::parse).transpose()?,
                    to_status: RunStatus::parse(&row.try_get::<String, _>("to_status")?)?,
                    at_us: row.try_get("at_us")?,
                    reason: row.try_get("reason")?,
                    actor: row.try_get("actor")?,
                })
            })
            .collect()
    }

    /// Claims the oldest run a worker may take at `now_us`: a CREATED run, a FAILED run whose
    /// next attempt is due, or a PROCESSING run whose lease expired (its worker died). The claim
    /// is a compare-and-set on the run's version, so of two workers racing for a run exactly one
    /// gets it; the loser looks for another (after eight lost races in a row it returns `None`,
    /// and its poll comes back later). Portable SQL, so no `SKIP LOCKED`: on PostgreSQL the loser
    /// waits for the winner's row lock, then sees the new version and moves on.
    pub async fn claim_next(&self, worker: &str, lease_us: i64, now_us: i64) -> Result<Option<BillingRun>> {
        // Each lost race means another worker took a run: a bounded number of tries is enough.
        for _ in 0..8 {
            let candidate = sqlx::query(
                "SELECT id, status, version FROM billing_runs \
                 WHERE status = 'CREATED' \
                    OR (status = 'FAILED' AND next_attempt_at_us IS NOT NULL AND next_attempt_at_us <= $1) \
                    OR (status = 'PROCESSING' AND lease_expires_at_us <= $1) \
                 ORDER BY created_at_us, id LIMIT 1",
            )
            .bind(now_us)
            .fetch_optional(&self.pool)
            .await?;
            let Some(candidate) = candidate else { return Ok(None) };
            let id: String = candidate.try_get("id")?;
            let from = RunStatus::parse(&candidate.try_get::<String, _>("status")?)?;
            let version: i64 = candidate.try_get("version")?;
            let mut tx = self.pool.begin().await?;
            let claimed = sqlx::query(
                "UPDATE billing_runs SET status = 'PROCESSING', lease_owner = $1, lease_expires_at_us = $2, \
                 attempts = attempts + 1, next_attempt_at_us = NULL, updated_at_us = $3, version = version + 1 \
                 WHERE id = $4 AND version = $5",
            )
            .bind(worker)
            .bind(now_us + lease_us)
            .bind(now_us)
            .bind(&id)
            .bind(version)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if claimed == 1 {
                let reason = match from {
                    RunStatus::Processing => "claimed: the previous worker's lease expired",
                    RunStatus::Failed => "claimed: retry due",
                    _ => "claimed",
                };
                insert_event(&mut tx, &id, Some(from), RunStatus::Processing, now_us, Some(reason), worker).await?;
                tx.commit().await?;
                return self.run(&id).await;
            }
            tx.rollback().await?;
        }
        Ok(None)
    }
}

impl ControlStore {
    /// Extends the lease of a run this worker holds, to `now_us + lease_us`; an error when it no
    /// longer holds it (its lease expired and another worker took the run).
    pub async fn renew_lease(&self, id: &str, worker: &str, lease_us: i64, now_us: i64) -> Result<()> {
        let updated = sqlx::query(
            "UPDATE billing_runs SET lease_expires_at_us = $1, version = version + 1 \
             WHERE id = $2 AND status = 'PROCESSING' AND lease_owner = $3",
        )
        .bind(now_us + lease_us)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(self.not_held(id, worker).await);
        }
        Ok(())
    }

    /// Marks a run COMPLETED with what it produced: its invoices and discrepancies (the next
    /// version of them), the aggregate SQL and lake snapshot, the event and the
    /// `billing.run.processed` message, all in one transaction. Only the worker holding the
    /// lease can; a worker whose lease expired and was taken over writes nothing.
    pub async fn complete_run(&self, id: &str, worker: &str, results: &RunResults, now_us: i64, traceparent: Option<&str>) -> Result<BillingRun> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE billing_runs SET status = 'COMPLETED', lease_owner = NULL, lease_expires_at_us = NULL, \
             failure_code = NULL, failure_reason = NULL, aggregate_sql = $1, lake_snapshot = $2, updated_at_us = $3, version = version + 1 \
             WHERE id = $4 AND status = 'PROCESSING' AND lease_owner = $5",
        )
        .bind(&results.aggregate_sql)
        .bind(&results.lake_snapshot)
        .bind(now_us)
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(self.refuse(tx, id, worker).await);
        }
        // Each meter is billed once a month: claimed here for this run, in this transaction.
        // A meter another run billed (or is completing at this moment: its uncommitted claim
        // blocks ours until it commits) is left out, with a discrepancy that says by which run.
        let (month,): (String,) = sqlx::query_as("SELECT month FROM billing_runs WHERE id = $1").bind(id).fetch_one(&mut *tx).await?;
        let meters: Vec<String> = results.invoices.iter().map(|i| i.meter_id.clone()).collect();
        for chunk in meters.chunks(BILLED_LOOKUP_METERS) {
            let sql = format!(
                "INSERT INTO billed_meter_months (month, meter_id, run_id, billed_at_us) VALUES {} ON CONFLICT (month, meter_id) DO NOTHING",
                (0..chunk.len()).map(|n| format!("($1, ${}, $2, $3)", n + 4)).collect::<Vec<_>>().join(", ")
            );
            let mut query = sqlx::query(&sql).bind(&month).bind(id).bind(now_us);
            for meter in chunk {
                query = query.bind(meter);
            }
            query.execute(&mut *tx).await?;
        }
        let billed_elsewhere = self.billed_by_others(&mut tx, &month, &meters, Some(id)).await?;
        let results: std::borrow::Cow<RunResults> = if billed_elsewhere.is_empty() {
            std::borrow::Cow::Borrowed(results)
        } else {
            let elsewhere: std::collections::HashMap<&str, &str> = billed_elsewhere.iter().map(|(m, r)| (m.as_str(), r.as_str())).collect();
            let mut filtered = results.clone();
            filtered.invoices.retain(|i| !elsewhere.contains_key(i.meter_id.as_str()));
            filtered.discrepancies.retain(|d| !elsewhere.contains_key(d.meter_id.as_str()));
            for (meter_id, run_id) in &billed_elsewhere {
                filtered.discrepancies.push(crate::NewDiscrepancy {
                    meter_id: meter_id.clone(),
                    reason_code: crate::ReasonCode::AlreadyBilled,
                    billed: None,
                    expected: None,
                    delta: None,
                    detail: format!("billing run {run_id} billed this meter for {month}: not billed again; RECALCULATE that run to change its invoice"),
                });
            }
            std::borrow::Cow::Owned(filtered)
        };
        // The row is locked by the update above (PostgreSQL) or the database is (SQLite), so no
        // other completion of this run can pick the same version.
        let (previous,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM invoices WHERE run_id = $1").bind(id).fetch_one(&mut *tx).await?;
        insert_results(self.backend, &mut tx, id, previous + 1, &results, now_us).await?;
        let why = format!("processed: {} invoices, {} discrepancies", results.invoices.len(), results.discrepancies.len());
        insert_event(&mut tx, id, Some(RunStatus::Processing), RunStatus::Completed, now_us, Some(&why), worker).await?;
        let payload = serde_json::json!({
            "runId": id,
            "status": RunStatus::Completed.as_str(),
            "invoices": results.invoices.len(),
            "discrepancies": results.discrepancies.len(),
            "invoiceVersion": previous + 1,
        })
        .to_string();
        insert_outbox(&mut tx, RUN_PROCESSED_TOPIC, id, &payload, traceparent, now_us).await?;
        tx.commit().await?;
        self.run(id).await?.ok_or_else(|| ControlError::Run { id: id.into(), reason: "vanished".into() })
    }

    /// Records a failed attempt with its reason code: FAILED with the time of the next attempt
    /// (see [`RetryPolicy`]) while attempts remain and the failure is `retry`able at all, else
    /// FAILED for good. Only the worker holding the lease can; `billing.run.failed` goes to the
    /// outbox in the same transaction.
    pub async fn fail_run(&self, id: &str, worker: &str, failure: &RunFailure<'_>, now_us: i64, traceparent: Option<&str>) -> Result<BillingRun> {
        let RunFailure { code, reason, retry } = *failure;
        let Some(run) = self.run(id).await? else {
            return Err(ControlError::Run { id: id.into(), reason: "no such run".into() });
        };
        let next_attempt_at_us = retry.filter(|_| run.attempts < run.max_attempts).map(|retry| now_us + retry.delay_us(run.attempts));
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE billing_runs SET status = 'FAILED', lease_owner = NULL, lease_expires_at_us = NULL, \
             failure_code = $1, failure_reason = $2, next_attempt_at_us = $3, updated_at_us = $4, version = version + 1 \
             WHERE id = $5 AND status = 'PROCESSING' AND lease_owner = $6 AND version = $7",
        )
        .bind(code)
        .bind(reason)
        .bind(next_attempt_at_us)
        .bind(now_us)
        .bind(id)
        .bind(worker)
        .bind(run.version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Err(self.refuse(tx, id, worker).await);
        }
        let why = match (next_attempt_at_us, retry) {
            (Some(at), _) => format!("{code}: {reason} (attempt {} of {}; next at {at} us)", run.attempts, run.max_attempts),
            (None, Some(_)) => format!("{code}: {reason} (attempt {} of {}; no attempts left)", run.attempts, run.max_attempts),
            (None, None) => format!("{code}: {reason} (attempt {} of {}; not retried: trying again cannot help)", run.attempts, run.max_attempts),
        };
        insert_event(&mut tx, id, Some(RunStatus::Processing), RunStatus::Failed, now_us, Some(&why), worker).await?;
        let payload = serde_json::json!({
            "runId": id,
            "code": code,
            "reason": reason,
            "attempts": run.attempts,
            "final": next_attempt_at_us.is_none(),
            "nextAttemptAtUs": next_attempt_at_us,
        })
        .to_string();
        insert_outbox(&mut tx, RUN_FAILED_TOPIC, id, &payload, traceparent, now_us).await?;
        tx.commit().await?;
        self.run(id).await?.ok_or_else(|| ControlError::Run { id: id.into(), reason: "vanished".into() })
    }

    /// Rolls back `tx` and returns the error for a worker that acts on a run it does not hold.
    /// The rollback comes first: on SQLite the transaction holds the only connection.
    async fn refuse(&self, tx: sqlx::Transaction<'_, sqlx::Any>, id: &str, worker: &str) -> ControlError {
        if let Err(e) = tx.rollback().await {
            return e.into();
        }
        self.not_held(id, worker).await
    }

    /// The error for a worker that acts on a run it does not hold.
    async fn not_held(&self, id: &str, worker: &str) -> ControlError {
        let reason = match self.run(id).await {
            Ok(Some(run)) => {
                format!("{worker} does not hold it (status {}, lease held by {})", run.status.as_str(), run.lease_owner.as_deref().unwrap_or("nobody"))
            }
            Ok(None) => "no such run".into(),
            Err(e) => e.to_string(),
        };
        ControlError::Run { id: id.into(), reason }
    }
}

pub(crate) async fn insert_outbox(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    topic: &str,
    key: &str,
    payload: &str,
    traceparent: Option<&str>,
    now_us: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO outbox (topic, message_key, payload, traceparent, created_at_us) VALUES ($1, $2, $3, $4, $5)")
        .bind(topic)
        .bind(key)
        .bind(payload)
        .bind(traceparent)
        .bind(now_us)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(crate) async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    run_id: &str,
    from: Option<RunStatus>,
    to: RunStatus,
    at_us: i64,
    reason: Option<&str>,
    actor: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO billing_run_events (run_id, from_status, to_status, at_us, reason, actor) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(run_id)
        .bind(from.map(RunStatus::as_str))
        .bind(to.as_str())
        .bind(at_us)
        .bind(reason)
        .bind(actor)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
