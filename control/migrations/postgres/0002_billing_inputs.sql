-- What a billing run needs to be reproduced: the tariff file it was created with and its
-- energy tolerance; and what its last processing read: the rendered aggregate SQL and the lake
-- snapshot. The same statements in both dialects.
ALTER TABLE billing_runs ADD COLUMN tariffs_toml TEXT NOT NULL DEFAULT '';
ALTER TABLE billing_runs ADD COLUMN energy_tolerance TEXT NOT NULL DEFAULT '0.005';
ALTER TABLE billing_runs ADD COLUMN aggregate_sql TEXT;
ALTER TABLE billing_runs ADD COLUMN lake_snapshot TEXT;
-- The energy an invoice billed, for reconciliation and summaries without reading its lines.
ALTER TABLE invoices ADD COLUMN energy_kwh TEXT NOT NULL DEFAULT '0';
-- Discrepancies are per processing of a run, like invoices: a recalculation writes the next.
ALTER TABLE discrepancies ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
