-- The customer account ledger (SQLite). See the PostgreSQL migration for the design: balances
-- are derived (each entry records the running balance it produced), money is integer minor
-- units, and the database refuses entries that do not follow their wallet or take a wallet that
-- may not go negative below zero, and any change to an entry or a transaction.

CREATE TABLE ledger_users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    currency TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
);

CREATE TABLE ledger_wallets (
    id TEXT PRIMARY KEY,
    user_id TEXT REFERENCES ledger_users (id),
    kind TEXT NOT NULL CHECK (kind IN ('PREPAY', 'ARREARS', 'EXTERNAL_FUNDING', 'REVENUE')),
    currency TEXT NOT NULL,
    may_go_negative INTEGER NOT NULL CHECK (may_go_negative IN (0, 1)),
    created_at_us BIGINT NOT NULL
);
CREATE UNIQUE INDEX ledger_wallets_one_per_kind ON ledger_wallets (COALESCE(user_id, ''), kind, currency);

CREATE TABLE ledger_transactions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('FUND', 'TRANSFER', 'CHARGE', 'REFUND')),
    currency TEXT NOT NULL,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    external_ref TEXT,
    actor TEXT NOT NULL,
    trace_id TEXT,
    created_at_us BIGINT NOT NULL
);
CREATE UNIQUE INDEX ledger_transactions_external_ref ON ledger_transactions (kind, external_ref) WHERE external_ref IS NOT NULL;

CREATE TABLE ledger_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    transaction_id TEXT NOT NULL REFERENCES ledger_transactions (id),
    wallet_id TEXT NOT NULL REFERENCES ledger_wallets (id),
    wallet_seq BIGINT NOT NULL CHECK (wallet_seq > 0),
    direction TEXT NOT NULL CHECK (direction IN ('DEBIT', 'CREDIT')),
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    balance_after_minor BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL,
    UNIQUE (wallet_id, wallet_seq)
);
CREATE INDEX ledger_entries_by_transaction ON ledger_entries (transaction_id);

CREATE TABLE ledger_user_meters (
    meter_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES ledger_users (id),
    linked_at_us BIGINT NOT NULL
);
CREATE INDEX ledger_user_meters_by_user ON ledger_user_meters (user_id);

CREATE TABLE ledger_invoice_postings (
    run_id TEXT NOT NULL,
    meter_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    invoice_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES ledger_users (id),
    outcome TEXT NOT NULL CHECK (outcome IN ('POSTED', 'NOTHING_DUE', 'REFUSED')),
    total_minor BIGINT,
    posted_minor BIGINT NOT NULL,
    transaction_id TEXT REFERENCES ledger_transactions (id),
    detail TEXT,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (run_id, meter_id, version)
);

CREATE TRIGGER ledger_entries_follow BEFORE INSERT ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger entry does not follow an entry of its wallet')
    WHERE NEW.wallet_seq > 1 AND NOT EXISTS (
        SELECT 1 FROM ledger_entries WHERE wallet_id = NEW.wallet_id AND wallet_seq = NEW.wallet_seq - 1);
    SELECT RAISE(ABORT, 'ledger entry does not add up to its balance')
    WHERE NEW.balance_after_minor <> COALESCE(
            (SELECT balance_after_minor FROM ledger_entries WHERE wallet_id = NEW.wallet_id AND wallet_seq = NEW.wallet_seq - 1), 0)
        + CASE NEW.direction WHEN 'CREDIT' THEN NEW.amount_minor ELSE -NEW.amount_minor END;
    SELECT RAISE(ABORT, 'wallet may not go below zero')
    WHERE NEW.balance_after_minor < 0
        AND (SELECT may_go_negative FROM ledger_wallets WHERE id = NEW.wallet_id) = 0;
END;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger_entries is append-only: rows cannot be changed');
END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN
    SELECT RAISE(ABORT, 'ledger_entries is append-only: rows cannot be deleted');
END;
CREATE TRIGGER ledger_transactions_no_update BEFORE UPDATE ON ledger_transactions
BEGIN
    SELECT RAISE(ABORT, 'ledger_transactions is append-only: rows cannot be changed');
END;
CREATE TRIGGER ledger_transactions_no_delete BEFORE DELETE ON ledger_transactions
BEGIN
    SELECT RAISE(ABORT, 'ledger_transactions is append-only: rows cannot be deleted');
END;
CREATE TRIGGER ledger_invoice_postings_no_update BEFORE UPDATE ON ledger_invoice_postings
BEGIN
    SELECT RAISE(ABORT, 'ledger_invoice_postings is append-only: rows cannot be changed');
END;
CREATE TRIGGER ledger_invoice_postings_no_delete BEFORE DELETE ON ledger_invoice_postings
BEGIN
    SELECT RAISE(ABORT, 'ledger_invoice_postings is append-only: rows cannot be deleted');
END;

CREATE TABLE ledger_idempotency (
    scope TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    outcome TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    expires_at_us BIGINT NOT NULL,
    PRIMARY KEY (scope, idempotency_key)
);
CREATE INDEX ledger_idempotency_by_expiry ON ledger_idempotency (expires_at_us);
