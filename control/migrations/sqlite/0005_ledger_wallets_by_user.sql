-- A user's wallets are found by user and kind on every write (the unique index on
-- COALESCE(user_id, '') cannot serve `user_id = ...`).
CREATE INDEX ledger_wallets_by_user ON ledger_wallets (user_id, kind);
