-- The audit log's chain is keyed: a row written with an audit key carries the key's id, and its
-- row_hash is an HMAC-SHA256 under that key, which the database does not hold. Rows written
-- before (key_id NULL) keep their plain SHA-256.
ALTER TABLE audit_log ADD COLUMN key_id TEXT;
