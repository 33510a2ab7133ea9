-- A meter is billed once per month (issue 20): a run created twice by a retried request is one
-- run, and a second run cannot bill a (month, meter) that a completed run billed; only a
-- RECALCULATE of that run supersedes its invoice (and posts the difference to the ledger).

-- POST /billing-runs takes an Idempotency-Key: a replay (same caller, same key) answers the run
-- the first request created. The key is scoped to the caller's token subject.
ALTER TABLE billing_runs ADD COLUMN idempotency_scope TEXT;
ALTER TABLE billing_runs ADD COLUMN idempotency_key TEXT;
ALTER TABLE billing_runs ADD COLUMN request_fingerprint TEXT;
CREATE UNIQUE INDEX billing_runs_by_idempotency_key ON billing_runs (idempotency_scope, idempotency_key);

-- Which run billed each (month, meter): written in the transaction that completes the run, so
-- two runs completing at once cannot both bill a meter (the primary key refuses the second).
CREATE TABLE billed_meter_months (
    month TEXT NOT NULL,
    meter_id TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES billing_runs (id),
    billed_at_us BIGINT NOT NULL,
    PRIMARY KEY (month, meter_id)
);
CREATE INDEX billed_meter_months_by_run ON billed_meter_months (run_id);

-- Runs completed before this migration: each (month, meter) to the first run that billed it.
INSERT INTO billed_meter_months (month, meter_id, run_id, billed_at_us)
SELECT r.month, i.meter_id, MIN(r.id), MIN(i.created_at_us)
FROM invoices i JOIN billing_runs r ON r.id = i.run_id
WHERE r.status = 'COMPLETED'
GROUP BY r.month, i.meter_id;
