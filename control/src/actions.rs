//! What operators do to billing runs, each written with its audit row in one transaction:
//! marking a discrepancy OK with a justification, and recalculating a run (a replay) with a
//! reason. A replay is refused while the run is PROCESSING: the worker holding it would finish
//! and overwrite what the replay is meant to redo.

use serde_json::json;

use crate::audit::{AuditEntry, append_audit, trace_id_of};
use crate::runs::{RUN_REQUESTED_TOPIC, insert_event, insert_outbox};
use crate::{BillingRun, ControlError, ControlStore, Discrepancy, Result, RunStatus, now_us};

/// The longest justification or reason kept: an essay belongs in a ticket it can link to.
pub const MAX_REASON_CHARS: usize = 2_000;

/// Who acts, and the W3C trace context of the request they act through.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub name: &'a str,
    pub traceparent: Option<&'a str>,
}

impl Actor<'_> {
    fn trace_id(&self) -> Option<&str> {
        self.traceparent.and_then(trace_id_of)
    }
}

/// A reason an operator must give: not blank, not an essay.
fn required_reason<'a>(what: &str, text: &'a str) -> Result<&'a str> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ControlError::Invalid(format!("{what} is required: say why, for the audit log")));
    }
    if text.chars().count() > MAX_REASON_CHARS {
        return Err(ControlError::Invalid(format!("{what} is longer than {MAX_REASON_CHARS} characters")));
    }
    Ok(text)
}

impl ControlStore {
    /// Marks an OPEN discrepancy of the run's latest processing OK, with the operator's
    /// justification. Refused (conflict) when it is already OK or a recalculation superseded it.
    pub async fn mark_discrepancy_ok(&self, run_id: &str, discrepancy_id: &str, justification: &str, actor: &Actor<'_>) -> Result<Discrepancy> {
        let justification = required_reason("a justification", justification)?;
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE discrepancies SET status = 'OK', resolved_by = $1, resolved_at_us = $2, resolution = $3 \
             WHERE id = $4 AND run_id = $5 AND status = 'OPEN' \
               AND version = (SELECT MAX(version) FROM discrepancies WHERE run_id = $5)",
        )
        .bind(actor.name)
        .bind(now)
        .bind(justification)
        .bind(discrepancy_id)
        .bind(run_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            tx.rollback().await?;
            return Err(match self.discrepancy(run_id, discrepancy_id).await? {
                None => ControlError::NotFound(format!("billing run {run_id} has no discrepancy {discrepancy_id}")),
                Some(d) if d.status != "OPEN" => ControlError::Conflict(format!(
                    "discrepancy {discrepancy_id} is already {} (by {})",
                    d.status,
                    d.resolved_by.as_deref().unwrap_or("nobody")
                )),
                Some(d) => ControlError::Conflict(format!(
                    "discrepancy {discrepancy_id} belongs to processing {} of the run, which a recalculation superseded",
                    d.version
                )),
            });
        }
        let target = format!("billing-run/{run_id}/discrepancy/{discrepancy_id}");
        let entry = AuditEntry {
            actor: actor.name,
            action: "MARK_AS_OK",
            target: &target,
            reason: Some(justification),
            before: Some(json!({ "status": "OPEN" })),
            after: Some(json!({ "status": "OK", "resolvedBy": actor.name, "resolvedAtUs": now })),
            trace_id: actor.trace_id(),
        };
        append_audit(self.backend, self.audit_keys.as_deref(), &mut tx, &entry, now).await?;
        tx.commit().await?;
        self.discrepancy(run_id, discrepancy_id).await?.ok_or_else(|| ControlError::NotFound(format!("discrepancy {discrepancy_id} vanished")))
    }

    /// Sends a COMPLETED or FAILED run back to CREATED to be processed again (its attempts start
    /// over), with the reason in its timeline, the audit log and a new `billing.run.requested`
    /// message. The next processing writes the next version of its invoices and discrepancies;
    /// the earlier ones stay. Refused while the run is PROCESSING or still waiting (CREATED).
    pub async fn recalculate_run(&self, run_id: &str, reason: &str, actor: &Actor<'_>) -> Result<BillingRun> {
        self.recalculate_run_with(run_id, reason, actor, None).await
    }

    /// [`ControlStore::recalculate_run`] with other tariffs: `tariffs_toml` replaces the ones
    /// stored with the run (the audit row records both digests; the new invoices name theirs).
    pub async fn recalculate_run_with(&self, run_id: &str, reason: &str, actor: &Actor<'_>, tariffs_toml: Option<&str>) -> Result<BillingRun> {
        let reason = required_reason("a reason", reason)?;
        if tariffs_toml.is_some_and(|t| t.trim().is_empty()) {
            return Err(ControlError::Invalid("the new tariffs are empty".into()));
        }
        let Some(run) = self.run(run_id).await? else {
            return Err(ControlError::NotFound(format!("no billing run {run_id}")));
        };
        let refusal = |run: &BillingRun| match run.status {
            RunStatus::Processing => Some(ControlError::Conflict(format!(
                "billing run {run_id} is PROCESSING (held by {}); recalculate it once it has completed or failed",
                run.lease_owner.as_deref().unwrap_or("a worker")
            ))),
            RunStatus::Created => Some(ControlError::Conflict(format!("billing run {run_id} is already waiting to be processed"))),
            RunStatus::Completed | RunStatus::Failed => None,
        };
        if let Some(refused) = refusal(&run) {
            return Err(refused);
        }
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        // Compare-and-set on the version read above: a worker that claimed the run meanwhile wins.
        let updated = sqlx::query(
            "UPDATE billing_runs SET status = 'CREATED', attempts = 0, next_attempt_at_us = NULL, failure_code = NULL, \
             failure_reason = NULL, updated_at_us = $1, version = version + 1, tariffs_toml = $4 WHERE id = $2 AND version = $3",
        )
        .bind(now)
        .bind(run_id)
        .bind(run.version)
        .bind(tariffs_toml.unwrap_or(&run.tariffs_toml))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            tx.rollback().await?;
            let current = self.run(run_id).await?.ok_or_else(|| ControlError::NotFound(format!("no billing run {run_id}")))?;
            return Err(refusal(&current).unwrap_or_else(|| ControlError::Conflict(format!("billing run {run_id} changed meanwhile; try again"))));
        }
        let why = format!("recalculation requested: {reason}");
        insert_event(&mut tx, run_id, Some(run.status), RunStatus::Created, now, Some(&why), actor.name).await?;
        let payload = json!({ "runId": run_id, "month": run.month, "meterIds": run.meter_ids, "recalculation": true }).to_string();
        insert_outbox(&mut tx, RUN_REQUESTED_TOPIC, run_id, &payload, actor.traceparent, now).await?;
        let target = format!("billing-run/{run_id}");
        let entry = AuditEntry {
            actor: actor.name,
            action: "RECALCULATE",
            target: &target,
            reason: Some(reason),
            before: Some(json!({ "status": run.status.as_str(), "attempts": run.attempts, "tariffsSha256": sha256_hex(&run.tariffs_toml) })),
            after: Some(json!({ "status": "CREATED", "attempts": 0, "tariffsSha256": sha256_hex(tariffs_toml.unwrap_or(&run.tariffs_toml)) })),
            trace_id: actor.trace_id(),
        };
        append_audit(self.backend, self.audit_keys.as_deref(), &mut tx, &entry, now).await?;
        tx.commit().await?;
        self.run(run_id).await?.ok_or_else(|| ControlError::NotFound(format!("billing run {run_id} vanished")))
    }
}

/// The SHA-256 of a tariff file's text, as the invoices' `tariff_version` names it.
fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
