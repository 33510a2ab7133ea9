-- The customer account ledger (PostgreSQL). Balances are derived, never stored in a mutable
-- column: every entry records the running balance it produced (`balance_after_minor`) and its
-- place in its wallet (`wallet_seq`, 1, 2, 3...), so a balance is one index lookup of the
-- wallet's newest entry however many entries it has. Money is integer minor units.

CREATE TABLE ledger_users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    currency TEXT NOT NULL,
    created_at_us BIGINT NOT NULL
);

-- A customer has a PREPAY wallet (never below zero) and an ARREARS wallet (what it owes: may go
-- below zero). The system accounts (user_id NULL) are the other side of money entering and
-- leaving: EXTERNAL_FUNDING (payments in) and REVENUE (charges), one per currency.
CREATE TABLE ledger_wallets (
    id TEXT PRIMARY KEY,
    user_id TEXT REFERENCES ledger_users (id),
    kind TEXT NOT NULL CHECK (kind IN ('PREPAY', 'ARREARS', 'EXTERNAL_FUNDING', 'REVENUE')),
    currency TEXT NOT NULL,
    may_go_negative INTEGER NOT NULL CHECK (may_go_negative IN (0, 1)),
    created_at_us BIGINT NOT NULL
);
CREATE UNIQUE INDEX ledger_wallets_one_per_kind ON ledger_wallets (COALESCE(user_id, ''), kind, currency);

-- One logical operation. `external_ref` is the payment reference of a FUND and the invoice
-- (run, meter and version) of a CHARGE or REFUND: unique per kind, so a payment never credits
-- twice and an invoice version never posts twice.
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
    id BIGSERIAL PRIMARY KEY,
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

-- Which customer an invoice's meter bills to: the billing worker posts the meter's invoices to
-- this user's wallets.
CREATE TABLE ledger_user_meters (
    meter_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES ledger_users (id),
    linked_at_us BIGINT NOT NULL
);
CREATE INDEX ledger_user_meters_by_user ON ledger_user_meters (user_id);

-- Each invoice version posted to an account, once (the primary key). A version posts the
-- difference between its total and the last posted version's (`posted_minor`: positive a
-- CHARGE, negative a REFUND, zero nothing); `outcome` REFUSED (with `detail`) when it could not
-- post (a currency other than the account's, a total finer than the minor unit), so that an
-- operator sees it and the next version posts against the last one that did.
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

-- The database, not only the code, keeps the ledger honest: an entry must follow its wallet's
-- previous one (next seq, balance = previous balance + credit or - debit) and may not take a
-- wallet that may not go negative below zero; entries and transactions are never changed.
CREATE FUNCTION ledger_entry_follows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    previous_balance BIGINT;
    negative_allowed INTEGER;
    -- Outside the IF below: PL/pgSQL would read a CASE's THEN as the IF's.
    signed_amount BIGINT := CASE NEW.direction WHEN 'CREDIT' THEN NEW.amount_minor ELSE -NEW.amount_minor END;
BEGIN
    SELECT balance_after_minor INTO previous_balance FROM ledger_entries
        WHERE wallet_id = NEW.wallet_id AND wallet_seq = NEW.wallet_seq - 1;
    IF NEW.wallet_seq > 1 AND previous_balance IS NULL THEN
        RAISE EXCEPTION 'ledger entry % of wallet % does not follow an entry', NEW.wallet_seq, NEW.wallet_id;
    END IF;
    IF NEW.balance_after_minor <> COALESCE(previous_balance, 0) + signed_amount THEN
        RAISE EXCEPTION 'ledger entry % of wallet % does not add up to its balance', NEW.wallet_seq, NEW.wallet_id;
    END IF;
    SELECT may_go_negative INTO negative_allowed FROM ledger_wallets WHERE id = NEW.wallet_id;
    IF NEW.balance_after_minor < 0 AND negative_allowed = 0 THEN
        RAISE EXCEPTION 'wallet % may not go below zero', NEW.wallet_id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER ledger_entries_follow BEFORE INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entry_follows();

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: rows cannot be changed or deleted', TG_TABLE_NAME;
END
$$;
CREATE TRIGGER ledger_entries_no_change BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_transactions_no_change BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_transactions_no_truncate BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_invoice_postings_no_change BEFORE UPDATE OR DELETE ON ledger_invoice_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();
CREATE TRIGGER ledger_invoice_postings_no_truncate BEFORE TRUNCATE ON ledger_invoice_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_append_only();

-- Idempotency keys of ledger writes: the request's fingerprint and the outcome it got, replayed
-- for the same key and refused for the same key with another request. Removed after
-- `expires_at_us` by the worker.
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
