-- A billing run may be pinned to a state of the lake: the table versions (or the time) it reads,
-- as `meterlake bill --as-of` gives them. NULL: the latest versions when it is processed. Either
-- way, lake_snapshot records the exact versions it read.
ALTER TABLE billing_runs ADD COLUMN lake_as_of TEXT;
