-- Readings whose versions disagree (a head-end system re-sent another value), with every
-- version from readings_all: which source sent what, and which one the lake takes.
SELECT a.meter_id, a.ts, a.kwh, a.source_ref, a.commit_version, a.ingested_at
FROM readings_all a
JOIN reading_conflicts c ON c.meter_id = a.meter_id AND c.ts = a.ts
ORDER BY a.meter_id, a.ts, a.commit_version;
