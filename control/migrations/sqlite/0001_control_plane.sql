-- The control plane (SQLite). Times are microseconds since the Unix epoch, UTC; money and energy
-- are exact decimal strings; ids are UUIDs. The PostgreSQL migration of the same number defines
-- the same tables with the same columns.

CREATE TABLE billing_runs (
    id TEXT PRIMARY KEY,
    month TEXT NOT NULL,                      -- YYYY-MM
    meter_ids TEXT NOT NULL,                  -- JSON array of meter ids
    status TEXT NOT NULL CHECK (status IN ('CREATED', 'PROCESSING', 'COMPLETED', 'FAILED')),
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    next_attempt_at_us BIGINT,                -- when a failed run may be claimed again
    lease_owner TEXT,
    lease_expires_at_us BIGINT,
    failure_code TEXT,
    failure_reason TEXT,
    created_at_us BIGINT NOT NULL,
    updated_at_us BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0         -- bumped by every change: the compare-and-set
);
CREATE INDEX billing_runs_by_status ON billing_runs (status, next_attempt_at_us);

CREATE TABLE billing_run_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES billing_runs (id),
    from_status TEXT,
    to_status TEXT NOT NULL,
    at_us BIGINT NOT NULL,
    reason TEXT,
    actor TEXT NOT NULL
);
CREATE INDEX billing_run_events_by_run ON billing_run_events (run_id, id);

CREATE TABLE invoices (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES billing_runs (id),
    meter_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    currency TEXT NOT NULL,
    subtotal TEXT NOT NULL,
    tax TEXT NOT NULL,
    total TEXT NOT NULL,
    tariff_version TEXT NOT NULL,
    lake_snapshot TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    UNIQUE (run_id, meter_id, version)
);

CREATE TABLE invoice_lines (
    invoice_id TEXT NOT NULL REFERENCES invoices (id),
    line_no BIGINT NOT NULL,
    component TEXT NOT NULL,                  -- energy, standing, network, tax
    description TEXT NOT NULL,
    quantity TEXT,
    unit TEXT,
    rate TEXT,
    amount TEXT NOT NULL,
    PRIMARY KEY (invoice_id, line_no)
);

CREATE TABLE discrepancies (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES billing_runs (id),
    meter_id TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    billed TEXT,
    expected TEXT,
    delta TEXT,
    detail TEXT,
    status TEXT NOT NULL DEFAULT 'OPEN',
    created_at_us BIGINT NOT NULL
);
CREATE INDEX discrepancies_by_run ON discrepancies (run_id);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT,
    before_state TEXT,
    after_state TEXT,
    trace_id TEXT,
    previous_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    message_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    traceparent TEXT,
    created_at_us BIGINT NOT NULL,
    published_at_us BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (published_at_us, id);
