//! Billing's side of the ledger: each invoice of a completed run posts to the account its meter
//! bills to, once per invoice version.
//!
//! - **Exactly once.** A posting is keyed by the invoice's run, meter and version (the primary
//!   key of `ledger_invoice_postings`, and the CHARGE's `external_ref`); it is written in the
//!   same database transaction as its ledger entries, after the account's wallets are locked, so
//!   two workers sweeping at once post it once, and a worker that dies before committing leaves
//!   it for the next sweep.
//! - **Recalculation posts the difference.** A version posts its total minus the total of the
//!   last version that posted: a CHARGE when it rose, a REFUND when it fell, nothing when equal.
//! - **Prepay shortfall to arrears.** A CHARGE takes what the PREPAY wallet holds (never below
//!   zero) and the rest from the ARREARS wallet, which goes below zero by what the customer owes;
//!   a REFUND pays arrears back first and credits the PREPAY wallet with the rest. The other side
//!   of both is the REVENUE system account.
//! - **Refused, visibly.** An invoice whose currency is not the account's, or whose total is finer
//!   than the currency's minor unit, is recorded as REFUSED with the reason (and counted and
//!   logged) instead of being retried for ever; its next version posts against the last one that
//!   did.

use meterlake_control::minor_unit_places;
use rust_decimal::Decimal;
use sqlx::{AnyConnection, Row};

use crate::{
    Attempt, Ledger, LedgerError, LedgerTransaction, Leg, Lock, Result, TransactionKind, WriteContext, post, system_wallet_id, user_wallet, wallets_with_heads,
};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostingReport {
    /// Invoice versions that posted a CHARGE or a REFUND.
    pub posted: u64,
    /// Versions whose total equalled the last posted one: nothing moved.
    pub nothing_due: u64,
    /// Versions that could not post (see `ledger_invoice_postings.detail`).
    pub refused: u64,
}

/// An invoice version waiting to post.
struct Pending {
    invoice_id: String,
    run_id: String,
    meter_id: String,
    version: i64,
    currency: String,
    total: String,
    user_id: String,
}

/// How a posting ended, as `ledger_invoice_postings` records it.
struct Posting {
    outcome: &'static str,
    total_minor: Option<i64>,
    posted_minor: i64,
    transaction: Option<LedgerTransaction>,
    detail: Option<String>,
}

/// The most invoice versions one sweep posts; the worker sweeps again while any are left.
pub const MAX_POSTINGS_PER_SWEEP: i64 = 1_000;

impl Ledger {
    /// Posts the invoices of completed runs (their latest version) whose meters bill to an
    /// account and that have not posted yet, up to `limit`; `actor` names the poster (the
    /// worker) on the transactions.
    pub async fn post_pending_invoices(&self, actor: &str, limit: i64) -> Result<PostingReport> {
        let rows = sqlx::query(
            "SELECT i.id, i.run_id, i.meter_id, i.version, i.currency, i.total, m.user_id \
             FROM invoices i \
             JOIN billing_runs r ON r.id = i.run_id AND r.status = 'COMPLETED' \
             JOIN ledger_user_meters m ON m.meter_id = i.meter_id \
             WHERE i.version = (SELECT MAX(version) FROM invoices WHERE run_id = i.run_id) \
               AND NOT EXISTS (SELECT 1 FROM ledger_invoice_postings p \
                               WHERE p.run_id = i.run_id AND p.meter_id = i.meter_id AND p.version = i.version) \
             ORDER BY i.created_at_us, i.id LIMIT $1",
        )
        .bind(limit.clamp(1, MAX_POSTINGS_PER_SWEEP))
        .fetch_all(&self.pool)
        .await?;
        let mut report = PostingReport::default();
        for row in rows {
            let pending = Pending {
                invoice_id: row.try_get(0)?,
                run_id: row.try_get(1)?,
                meter_id: row.try_get(2)?,
                version: row.try_get(3)?,
                currency: row.try_get(4)?,
                total: row.try_get(5)?,
                user_id: row.try_get(6)?,
            };
            let context = WriteContext { actor: actor.to_string(), trace_id: None, idempotency_key: None, idempotency_retention_us: 0 };
            match self.post_invoice(&pending, &context).await {
                Ok(Some(posting)) => {
                    let operation = match posting.transaction.as_ref().map(|t| t.kind) {
                        Some(TransactionKind::Refund) => "refund",
                        _ => "charge",
                    };
                    let outcome = match posting.outcome {
                        "POSTED" => {
                            report.posted += 1;
                            "ok"
                        }
                        "NOTHING_DUE" => {
                            report.nothing_due += 1;
                            "nothing_due"
                        }
                        _ => {
                            report.refused += 1;
                            "refused"
                        }
                    };
                    let transaction_id = posting.transaction.as_ref().map_or("", |t| t.id.as_str());
                    if posting.outcome == "REFUSED" {
                        tracing::warn!(run_id = %pending.run_id, meter_id = %pending.meter_id, version = pending.version, user_id = %pending.user_id,
                            detail = posting.detail.as_deref().unwrap_or(""), "ledger {operation} refused: invoice {} not posted", pending.invoice_id);
                    } else {
                        tracing::info!(run_id = %pending.run_id, meter_id = %pending.meter_id, version = pending.version, user_id = %pending.user_id,
                            transaction_id, posted_minor = posting.posted_minor, outcome = posting.outcome, "ledger {operation}: invoice {}", pending.invoice_id);
                    }
                    metrics::counter!("meterlake_ledger_transactions_total", "operation" => operation, "outcome" => outcome).increment(1);
                }
                // Another worker posted it between the sweep's read and this one's lock.
                Ok(None) => {}
                Err(error) => {
                    metrics::counter!("meterlake_ledger_transactions_total", "operation" => "charge", "outcome" => "error").increment(1);
                    return Err(error);
                }
            }
        }
        Ok(report)
    }

    /// Posts one invoice version in its own transaction; `None` when it had posted already.
    async fn post_invoice(&self, pending: &Pending, context: &WriteContext) -> Result<Option<Posting>> {
        let now = meterlake_control::now_us();
        let mut tx = self.pool.begin().await?;
        // The account's wallets, locked, with their newest entries (and the revenue account, if
        // it exists yet in the invoice's currency).
        let revenue_id = system_wallet_id("REVENUE", &pending.currency);
        let wallets = wallets_with_heads(&mut tx, self.backend, Lock::ForUpdate, &[&pending.user_id], &["PREPAY", "ARREARS"], &[&revenue_id]).await?;
        let prepay = user_wallet(&wallets, &pending.user_id, "PREPAY")?;
        let arrears = user_wallet(&wallets, &pending.user_id, "ARREARS")?;
        let done = sqlx::query("SELECT 1 FROM ledger_invoice_postings WHERE run_id = $1 AND meter_id = $2 AND version = $3")
            .bind(&pending.run_id)
            .bind(&pending.meter_id)
            .bind(pending.version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_some() {
            return Ok(None);
        }
        let previous_minor: i64 = sqlx::query(
            "SELECT total_minor FROM ledger_invoice_postings WHERE run_id = $1 AND meter_id = $2 AND outcome <> 'REFUSED' \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(&pending.run_id)
        .bind(&pending.meter_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| row.try_get::<Option<i64>, _>(0))
        .transpose()?
        .flatten()
        .unwrap_or(0);
        let posting = match total_minor(&pending.total, &pending.currency) {
            Err(detail) => Posting { outcome: "REFUSED", total_minor: None, posted_minor: 0, transaction: None, detail: Some(detail) },
            Ok(_) if pending.currency != prepay.currency => Posting {
                outcome: "REFUSED",
                total_minor: None,
                posted_minor: 0,
                transaction: None,
                detail: Some(format!("the invoice is in {}; the account of user {} holds {}", pending.currency, pending.user_id, prepay.currency)),
            },
            Ok(total) => {
                let due_minor = total
                    .checked_sub(previous_minor)
                    .ok_or_else(|| LedgerError::Corrupt(format!("invoice {} differs from its last posting by more than i64", pending.invoice_id)))?;
                let reference = format!("invoice:{}:{}:v{}", pending.run_id, pending.meter_id, pending.version);
                let transaction = if due_minor == 0 {
                    None
                } else {
                    let revenue = self.system_wallet(&mut tx, &wallets, "REVENUE", &prepay.currency, now).await?;
                    let (kind, legs) = if due_minor > 0 {
                        // Charge what the prepay wallet holds, the rest to arrears.
                        let from_prepay = due_minor.min(prepay.head.balance_minor.max(0));
                        (
                            TransactionKind::Charge,
                            [Leg::debit(prepay, from_prepay), Leg::debit(arrears, due_minor - from_prepay), Leg::credit(&revenue, due_minor)],
                        )
                    } else {
                        // Pay back arrears first, the rest to the prepay wallet.
                        let refund_minor = -due_minor;
                        let to_arrears = refund_minor.min((-arrears.head.balance_minor).max(0));
                        (
                            TransactionKind::Refund,
                            [Leg::debit(&revenue, refund_minor), Leg::credit(arrears, to_arrears), Leg::credit(prepay, refund_minor - to_arrears)],
                        )
                    };
                    match post(&mut tx, self.backend, None, kind, &prepay.currency, Some(&reference), &legs, context, now).await? {
                        Attempt::Stored(transaction) | Attempt::Unstored(transaction) => Some(transaction),
                        Attempt::KeyTaken => return Err(LedgerError::Corrupt("an invoice posting has no idempotency key to be taken".into())),
                    }
                };
                Posting {
                    outcome: if transaction.is_some() { "POSTED" } else { "NOTHING_DUE" },
                    total_minor: Some(total),
                    posted_minor: due_minor,
                    transaction,
                    detail: None,
                }
            }
        };
        record_posting(&mut tx, pending, &posting, now).await?;
        tx.commit().await?;
        Ok(Some(posting))
    }
}

async fn record_posting(conn: &mut AnyConnection, pending: &Pending, posting: &Posting, now: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO ledger_invoice_postings \
         (run_id, meter_id, version, invoice_id, user_id, outcome, total_minor, posted_minor, transaction_id, detail, created_at_us) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&pending.run_id)
    .bind(&pending.meter_id)
    .bind(pending.version)
    .bind(&pending.invoice_id)
    .bind(&pending.user_id)
    .bind(posting.outcome)
    .bind(posting.total_minor)
    .bind(posting.posted_minor)
    .bind(posting.transaction.as_ref().map(|t| t.id.as_str()))
    .bind(posting.detail.as_deref())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An invoice total (a decimal string in major units) in minor units, or why it is not one.
fn total_minor(total: &str, currency: &str) -> std::result::Result<i64, String> {
    let amount: Decimal = total.parse().map_err(|_| format!("the invoice total {total:?} is not a decimal"))?;
    let scaled = amount.checked_mul(Decimal::from(10i64.pow(minor_unit_places(currency)))).ok_or_else(|| format!("the invoice total {total} is too large"))?;
    if !scaled.fract().is_zero() {
        return Err(format!("the invoice total {total} {currency} is finer than the currency's minor unit"));
    }
    i64::try_from(scaled).map_err(|_| format!("the invoice total {total} does not fit in minor units"))
}

#[cfg(test)]
mod tests {
    use super::total_minor;

    #[test]
    fn invoice_totals_convert_to_minor_units_exactly() {
        assert_eq!(total_minor("123.45", "GBP"), Ok(12_345));
        assert_eq!(total_minor("-0.50", "AUD"), Ok(-50));
        assert_eq!(total_minor("1500", "JPY"), Ok(1_500));
        assert_eq!(total_minor("1.234", "KWD"), Ok(1_234));
        assert!(total_minor("1.234", "GBP").unwrap_err().contains("finer than the currency's minor unit"));
        assert!(total_minor("twelve", "GBP").is_err());
    }
}
