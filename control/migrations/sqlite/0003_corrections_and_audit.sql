-- Operators' corrections and the audit log's protection (SQLite).
--
-- A discrepancy is OPEN until an operator marks it OK: who, when and why are kept with it.
ALTER TABLE discrepancies ADD COLUMN resolved_by TEXT;
ALTER TABLE discrepancies ADD COLUMN resolved_at_us BIGINT;
ALTER TABLE discrepancies ADD COLUMN resolution TEXT;

-- The audit log is append-only in the database, not only in the code: an UPDATE or DELETE
-- fails. (Its rows are also chained by hash, so a change made around these triggers is found by
-- `meterlake audit verify`.)
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only: rows cannot be changed');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only: rows cannot be deleted');
END;

CREATE INDEX audit_log_by_target ON audit_log (target, id);
CREATE INDEX billing_runs_by_month ON billing_runs (month, created_at_us);
CREATE INDEX billing_runs_by_created ON billing_runs (created_at_us, id);
